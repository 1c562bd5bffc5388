"""The mapping format: templates expand over layers, files round-trip, reverse inverts, nothing goes unaccounted."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matcher.errors import MappingError, MatcherError
from matcher.mapping import Declared, Mapping, Rule
from matcher.ops import Chunk, Concat, MergeAxes, Select, Stack, Transpose, apply_chain
from matcher.tree import ParamTree, TensorSpec

RNG = np.random.default_rng(0)

ATTENTION = Mapping(
    rules=(
        Rule("layers.{i}.q.weight", ("block{i}/q/kernel",), (MergeAxes(1, 2), Transpose((1, 0)))),
        Rule("layers.{i}.q_fused", ("block{i}/qkv",), (Chunk(axis=0, index=0, parts=3),)),
        Rule("layers.{i}.k_fused", ("block{i}/qkv",), (Chunk(axis=0, index=1, parts=3),)),
        Rule("layers.{i}.v_fused", ("block{i}/qkv",), (Chunk(axis=0, index=2, parts=3),)),
        Rule("head.in_proj", ("head/q", "head/k", "head/v"), (MergeAxes(1, 2), Transpose((1, 0)), Concat(0))),
        Rule("scanned.{i}.fc", ("scan/fc",), (Select(0, "{i}"), Transpose((1, 0)))),
        Rule("experts", ("expert{e}/w",), (Stack(0),)),
    ),
    dropped=(Declared("opt/*", "optimizer state"),),
    initialised=(Declared("position_ids", "buffer"),),
    meta={"family": "example"},
)


def source_arrays(layers=3):
    arrays = {}
    for i in range(layers):
        arrays[f"block{i}/q/kernel"] = RNG.normal(size=(8, 2, 4))
        arrays[f"block{i}/qkv"] = RNG.normal(size=(24, 8))
    for name in "qkv":
        arrays[f"head/{name}"] = RNG.normal(size=(8, 2, 4))
    arrays["scan/fc"] = RNG.normal(size=(layers, 3, 5))
    for e in range(4):
        arrays[f"expert{e}/w"] = RNG.normal(size=(2, 2))
    arrays["opt/momentum"] = np.zeros(3)
    return arrays


def target_keys(layers=3):
    keys = [f"layers.{i}.{n}" for i in range(layers) for n in ("q.weight", "q_fused", "k_fused", "v_fused")]
    return keys + ["head.in_proj"] + [f"scanned.{i}.fc" for i in range(layers)] + ["experts", "position_ids"]


def run(mapping, arrays, targets):
    expansion = mapping.expand(arrays.keys(), targets)
    assert expansion.complete, expansion.summary()
    return {r.target: apply_chain(r.ops, [arrays[s] for s in r.sources]) for r in expansion.rules}


def test_one_templated_rule_serves_every_layer_and_every_declared_key_is_accounted_for():
    expansion = ATTENTION.expand(source_arrays().keys(), target_keys())
    assert expansion.complete
    assert [r.target for r in expansion.rules if r.rule is ATTENTION.rules[0]] == [f"layers.{i}.q.weight" for i in range(3)]
    assert expansion.dropped == ["opt/momentum"] and expansion.initialised == ["position_ids"]
    experts = next(r for r in expansion.rules if r.target == "experts")
    assert experts.sources == tuple(f"expert{e}/w" for e in range(4))


def test_reverse_of_apply_gives_back_the_source_bit_exactly():
    arrays = source_arrays()
    converted = run(ATTENTION, arrays, target_keys())
    back = run(ATTENTION.reverse({k: v.shape for k, v in arrays.items()}), converted, list(arrays))
    assert set(back) == set(arrays) - {"opt/momentum"}
    for key, value in back.items():
        assert np.array_equal(value, arrays[key]), key


def test_reverse_refuses_when_a_chunk_part_is_never_used():
    partial = Mapping(tuple(r for r in ATTENTION.rules if r.target != "layers.{i}.k_fused"))
    with pytest.raises(MappingError, match="cannot be restored"):
        partial.reverse({k: v.shape for k, v in source_arrays().items()})


def test_unaccounted_tensors_are_listed_not_ignored():
    arrays = source_arrays()
    arrays["extra/gamma"] = np.ones(3)
    lean = Mapping(ATTENTION.rules[1:], ATTENTION.dropped, ATTENTION.initialised)
    expansion = lean.expand(arrays.keys(), target_keys())
    assert not expansion.complete
    assert "extra/gamma" in expansion.unused_sources and "block0/q/kernel" in expansion.unused_sources
    assert "layers.0.q.weight" in expansion.unmapped_targets


def test_missing_source_instance_is_a_problem():
    arrays = source_arrays()
    del arrays["block1/q/kernel"]
    expansion = ATTENTION.expand(arrays.keys(), target_keys())
    assert any("layers.1.q.weight" in p for p in expansion.unmapped_targets)


def test_yaml_and_json_files_round_trip(tmp_path):
    for name in ("m.yaml", "m.json"):
        ATTENTION.save(tmp_path / name)
        loaded = Mapping.load(tmp_path / name)
        assert loaded == ATTENTION
        assert loaded.to_yaml() == ATTENTION.to_yaml()


names = st.from_regex(r"[a-z]{1,6}(\.[a-z]{1,6}){0,2}", fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(names, names, st.permutations(range(3))), min_size=1, max_size=5, unique_by=lambda t: t[0]))
def test_yaml_to_mapping_to_yaml_is_identity(items):
    mapping = Mapping(tuple(Rule(t, (s,), (Transpose(tuple(p)),)) for t, s, p in items))
    text = mapping.to_yaml()
    import yaml

    assert Mapping.from_dict(yaml.safe_load(text)).to_yaml() == text


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": [{"target": "a", "source": "b", "opz": []}]}, "unknown key"),
        ({"rules": [{"target": "a"}]}, "exactly one of 'source' or 'sources'"),
        ({"rules": [{"target": "a", "sources": ["b", "c"]}]}, "need exactly one concat/stack"),
        ({"rules": [{"target": "a.{i}", "source": "b"}]}, "appear in no source"),
        ({"rules": [{"target": "a", "source": "b"}, {"target": "a", "source": "c"}]}, "two rules write a"),
        ({"rules": [], "extra": 1}, "unknown key"),
        ({"rules": [], "matcher_mapping": 7}, "not supported"),
    ],
)
def test_malformed_mappings_are_rejected_naming_the_problem(data, message):
    with pytest.raises(MappingError, match=message):
        Mapping.from_dict(data)


def test_a_mapping_file_that_is_not_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed")
    with pytest.raises(MappingError, match="not valid YAML"):
        Mapping.load(bad)


def test_sources_gathered_together_must_hold_the_same_instances():
    """Gate experts 0-3 and up experts 0, 1, 2, 4: stacking them side by side would pair gate 3
    with up 4 silently; the rule is refused, naming both instance lists."""
    from matcher.convert import convert_arrays
    from matcher.ops import SplitAxis

    arrays = {f"x.experts.{e}.w1": np.full((2, 3), e, np.float32) for e in (0, 1, 2, 3)}
    arrays |= {f"x.experts.{e}.w3": np.full((2, 3), 10 + e, np.float32) for e in (0, 1, 2, 4)}
    source = ParamTree({k: TensorSpec(k, v.shape, "float32") for k, v in arrays.items()}, loader=arrays.__getitem__)
    target = ParamTree({"y": TensorSpec("y", (4, 4, 3), "float32")})
    rule = Rule("y", ("x.experts.{e}.w1", "x.experts.{e}.w3"), (Stack(0), SplitAxis(0, (2, -1)), Transpose((1, 0, 2, 3)), MergeAxes(1, 2)))
    with pytest.raises(MatcherError, match=r"gather different instances \(0, 1, 2, 3 vs 0, 1, 2, 4\)"):
        convert_arrays(source, target, Mapping((rule,)))
    arrays["x.experts.3.w3"] = arrays.pop("x.experts.4.w3")  # the same instances: accepted
    source = ParamTree({k: TensorSpec(k, v.shape, "float32") for k, v in arrays.items()}, loader=arrays.__getitem__)
    assert convert_arrays(source, target, Mapping((rule,)))["y"].shape == (4, 4, 3)
