"""Decoders whose layers are not all alike: dense layers followed by mixture-of-experts layers
(Qwen3-MoE ``mlp_only_layers``, DeepSeek-V3 ``first_k_dense_replace``).

``find_blocks`` makes one block per structure class of ``model.layers.{i}`` (dense {0, 1}, MoE
{2, ...}); classes pair with the class of the same layers on the other side, each pair is solved
once, and rules equal in every class are one templated rule. The expected mappings here are written
by hand, one concrete rule per layer, and compared by what the ops compute (``equivalent``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from matcher.mapping import Mapping, Rule
from matcher.ops import Chunk, MergeAxes, SplitAxis, Stack, Transpose
from matcher.solve import match_trees
from matcher.solve.blocks import find_blocks
from matcher.targets import build_target
from matcher.tree import ParamTree, TensorSpec
from tests.matching.harness import equivalent

HIDDEN, DENSE_I, MOE_I, VOCAB = 16, 40, 24, 64


def specs(shapes: dict) -> ParamTree:
    return ParamTree({k: TensorSpec(k, tuple(v), "float32") for k, v in shapes.items()})


def _qwen3_config(layers: int = 6, dense=(0, 1), experts: int = 4, kv_heads: int = 2):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=DENSE_I, moe_intermediate_size=MOE_I,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=4,
                          num_experts=experts, num_experts_per_tok=2, mlp_only_layers=list(dense), tie_word_embeddings=False)


def _deepseek_config(layers: int = 5, dense: int = 2, experts: int = 4):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=DENSE_I, moe_intermediate_size=8,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                            n_routed_experts=experts, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, v_head_dim=6,
                            qk_nope_head_dim=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=dense,
                            tie_word_embeddings=False)


_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _hub(target: ParamTree) -> ParamTree:
    """The hub layout of ``target``: one tensor per expert (``mlp.experts.{e}.gate_proj/up_proj/down_proj``),
    every other key as is."""
    shapes = {}
    for key, spec in target.specs.items():
        found = _FUSED_EXPERTS.match(key)
        if not found:
            shapes[key] = spec.shape
            continue
        module, which = found.groups()
        for e in range(spec.shape[0]):
            if which == "down_proj":
                shapes[f"{module}.{e}.down_proj.weight"] = spec.shape[1:]
            else:
                half = (spec.shape[1] // 2, spec.shape[2])
                shapes[f"{module}.{e}.gate_proj.weight"] = half
                shapes[f"{module}.{e}.up_proj.weight"] = half
    return specs(shapes)


def _expected(target: ParamTree, kernels: bool = False) -> Mapping:
    """By hand, one rule per concrete target key: the experts of each MoE layer stacked (gate|up per
    expert, spelled here as a stack on axis 1), everything else renamed to itself. ``kernels``: the
    source stores every linear matrix (in, out) as ``kernel`` (experts one by one)."""
    leaf = "kernel" if kernels else "weight"
    turn = (Transpose((1, 0)),) if kernels else ()
    rules = []
    for key, spec in target.specs.items():
        found = _FUSED_EXPERTS.match(key)
        if found is None:
            linear = kernels and len(spec.shape) == 2 and key.endswith(".weight") and "embed_tokens" not in key
            rules.append(Rule(key, (key[: -len("weight")] + "kernel",), turn) if linear else Rule(key, (key,)))
        elif found.group(2) == "down_proj":
            rules.append(Rule(key, (f"{found.group(1)}.{{e}}.down_proj.{leaf}",), turn + (Stack(0),)))
        else:
            # [gate_0..gate_E-1, up_0..up_E-1], (I, D) each -> (I, 2E, D) -> (I, 2, E, D) -> (E, 2, I, D) -> (E, 2I, D)
            rules.append(Rule(key, (f"{found.group(1)}.{{e}}.gate_proj.{leaf}", f"{found.group(1)}.{{e}}.up_proj.{leaf}"),
                              turn + (Stack(1), SplitAxis(1, (2, -1)), Transpose((2, 1, 0, 3)), MergeAxes(1, 2))))
    return Mapping(tuple(rules))


def _as_kernels(tree: ParamTree) -> ParamTree:
    """The same checkpoint with every linear matrix stored (in, out) and named ``kernel`` (flax style)."""
    def linear(key, shape):
        return len(shape) == 2 and key.endswith(".weight") and "embed_tokens" not in key

    return specs({(k[: -len("weight")] + "kernel" if linear(k, s.shape) else k): (s.shape[::-1] if linear(k, s.shape) else s.shape)
                  for k, s in tree.specs.items()})


def _layer_of(key: str) -> int | None:
    found = re.match(r"model\.layers\.(\d+)\.", key)
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------------- blocks


def test_a_numbered_prefix_whose_instances_differ_makes_one_block_per_structure_class():
    tree = specs({
        **{f"layers.{i}.attn.weight": (8, 8) for i in range(7)},
        **{f"layers.{i}.mlp.fc.weight": (16, 8) for i in (0, 1)},
        **{f"layers.{i}.moe.experts.{e}.fc.weight": (4, 8) for i in (2, 3, 4, 6) for e in range(3)},
        "layers.5.odd.weight": (3,),  # alone in its class: stays outside blocks
        "head.weight": (2, 8),
    })
    units = find_blocks(tree)
    assert [(b.prefix, b.indices, b.classed) for b in units.blocks] == [("layers.{i}", [0, 1], True), ("layers.{i}", [2, 3, 4, 6], True)]
    assert set(units.blocks[0].leaves) == {".attn.weight", ".mlp.fc.weight"}
    assert set(units.blocks[1].leaves) == {".attn.weight"} | {f".moe.experts.{e}.fc.weight" for e in range(3)}
    assert set(units.singles) == {"layers.5.attn.weight", "layers.5.odd.weight", "head.weight"}
    # all alike: one block, as before
    uniform = find_blocks(specs({f"layers.{i}.attn.weight": (8, 8) for i in range(3)}))
    assert [(b.prefix, b.indices, b.classed) for b in uniform.blocks] == [("layers.{i}", [0, 1, 2], False)]


# ---------------------------------------------------------------------- (a) Qwen3-MoE with dense layers


@pytest.mark.parametrize("kernels", [False, True], ids=["weights", "kernels"])
@pytest.mark.parametrize("dense", [(0, 1), (1, 4)], ids=["dense-first", "dense-interleaved"])
def test_qwen3_moe_with_dense_layers_matches_completely_one_rule_per_leaf(dense, kernels):
    target = build_target("Qwen3MoeForCausalLM", _qwen3_config(dense=dense)).tree
    source = _as_kernels(_hub(target)) if kernels else _hub(target)
    report = match_trees(source, target)
    assert report.complete, (report.unresolved[:3], report.unmatched_targets[:5], report.unused_sources[:5])
    comparison = equivalent(report.mapping, _expected(target, kernels), source, target)
    assert comparison.exact, str(comparison)
    assert not report.mapping.expand(source.keys(), target.keys()).problems
    # solved once per class: every rule is templated over {i}, the attention rule shared by both classes
    assert all("{i}" in d.rule.target or _layer_of(d.rule.target) is None for d in report.decisions)
    targets = {d.rule.target for d in report.decisions}
    assert {"model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.mlp.gate_proj.weight",
            "model.layers.{i}.mlp.experts.gate_up_proj"} <= targets
    moe = [i for i in range(6) if i not in dense]
    assert sorted(t["indices"] for t in report.towers if "indices" in t) == sorted([list(dense), moe])


# ---------------------------------------------------------------------- (b) DeepSeek-V3


def test_deepseek_v3_dense_then_moe_layers_with_shared_experts_and_mla_attention():
    """Three dense layers' worth of structure the MoE layers do not have (``mlp.gate_proj``), MoE
    layers with a router, its correction bias, shared experts and routed experts, and MLA attention
    (``q_a_proj`` and ``kv_a_proj_with_mqa`` both (12, 16): names decide)."""
    target = build_target("DeepseekV3ForCausalLM", _deepseek_config()).tree
    assert "model.layers.1.mlp.gate_proj.weight" in target.keys() and "model.layers.2.mlp.shared_experts.up_proj.weight" in target.keys()
    source = _hub(target)
    report = match_trees(source, target)
    assert report.complete, (report.unresolved[:3], report.unmatched_targets[:5], report.unused_sources[:5])
    comparison = equivalent(report.mapping, _expected(target), source, target)
    assert comparison.exact, str(comparison)
    assert all("{i}" in d.rule.target or _layer_of(d.rule.target) is None for d in report.decisions)


def test_an_odd_layer_with_no_counterpart_is_left_over_and_no_template_reaches_it():
    """DeepSeek-V3 hub checkpoints hold one more layer than the model (the multi-token-prediction
    layer: a MoE layer plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head``). It is alone in its
    class: matched with the leaves outside blocks, it finds no target and stays unused. Templates
    over ``{i}`` would bind it too (``self_attn.q_a_proj`` exists there), so the class rules are
    written layer by layer: every expanded rule is right and nothing binds the extra layer."""
    layers = 5
    target = build_target("DeepseekV3ForCausalLM", _deepseek_config(layers=layers)).tree
    shapes = {k: s.shape for k, s in _hub(target).specs.items()}
    extra = f"model.layers.{layers}."
    for key, shape in list(shapes.items()):
        if key.startswith(f"model.layers.{layers - 1}."):
            shapes[key.replace(f"model.layers.{layers - 1}.", extra)] = shape
    shapes.update({extra + "embed_tokens.weight": (VOCAB, HIDDEN), extra + "enorm.weight": (HIDDEN,), extra + "hnorm.weight": (HIDDEN,),
                   extra + "eh_proj.weight": (HIDDEN, 2 * HIDDEN), extra + "shared_head.norm.weight": (HIDDEN,),
                   extra + "shared_head.head.weight": (VOCAB, HIDDEN)})
    source = specs(shapes)
    report = match_trees(source, target)
    assert not report.unresolved and not report.unmatched_targets
    assert set(report.unused_sources) == {k for k in source.keys() if k.startswith(extra)}
    comparison = equivalent(report.mapping, _expected(target), source, target)
    assert comparison.exact, str(comparison)
    expansion = report.mapping.expand(source.keys(), target.keys())
    assert not expansion.problems
    assert all(_layer_of(s) != layers for rule in expansion.rules for s in rule.sources)


# ---------------------------------------------------------------------- the rules of different classes


def _fused_qkv_in(layers, target: ParamTree) -> ParamTree:
    """The hub layout, but the given layers store q, k and v as one ``self_attn.qkv_proj.weight``."""
    shapes = {k: s.shape for k, s in _hub(target).specs.items()}
    for i in layers:
        parts = [shapes.pop(f"model.layers.{i}.self_attn.{n}_proj.weight") for n in "qkv"]
        shapes[f"model.layers.{i}.self_attn.qkv_proj.weight"] = (sum(p[0] for p in parts), parts[0][1])
    return specs(shapes)


def test_one_target_template_with_different_rules_per_class_is_written_so_they_cannot_collide():
    """Dense layers store q|k|v fused, MoE layers one tensor each: ``self_attn.q_proj`` needs a chunk
    in layers 0, 1 and a rename in layers 2..5. One rule keeps the template (it binds only where its
    source exists), the other is written per layer; no key is written twice and none from the
    other class's rule."""
    dense = (0, 1)
    target = build_target("Qwen3MoeForCausalLM", _qwen3_config(dense=dense, kv_heads=4)).tree
    source = _fused_qkv_in(dense, target)
    report = match_trees(source, target)
    assert report.complete, (report.unresolved[:3], report.unmatched_targets[:5], report.unused_sources[:5])
    comparison = equivalent(report.mapping, _fused_expected(target, dense), source, target)
    assert comparison.exact, str(comparison)
    assert not report.mapping.expand(source.keys(), target.keys()).problems
    q_rules = [d.rule for d in report.decisions if re.fullmatch(r"model\.layers\.(\d+|\{i\})\.self_attn\.q_proj\.weight", d.rule.target)]
    assert sorted(r.target for r in q_rules) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                                                  "model.layers.{i}.self_attn.q_proj.weight"]


def test_a_question_in_one_class_stays_in_that_class_and_its_answer_completes_the_mapping():
    """The dense layers' gate and up projections have names that say nothing (``wa``, ``wb``, same
    shape): asked for the dense layers only; the MoE class is decided. Pinning the right option
    gives the hand-written conversion, the other one does not."""
    from matcher.api import _match_with_pins

    target = build_target("Qwen3MoeForCausalLM", _qwen3_config()).tree
    shapes = {}
    for key, spec in _hub(target).specs.items():
        shapes[re.sub(r"^(model\.layers\.\d+\.mlp\.)(gate|up)_proj", lambda m: m.group(1) + {"gate": "wa", "up": "wb"}[m.group(2)], key)] = spec.shape
    source = specs(shapes)
    report = match_trees(source, target)
    assert {u.target for u in report.unresolved} == {"model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"}
    assert not report.unmatched_targets and not report.unused_sources
    item = next(u for u in report.unresolved if u.target.endswith("gate_proj.weight"))
    by_source = {o.sources: o for o in item.options}
    wa, wb = "model.layers.{i}.mlp.wa.weight", "model.layers.{i}.mlp.wb.weight"
    assert {(wa,), (wb,)} <= set(by_source)
    expected = Mapping(tuple(Rule(r.target, (re.sub(r"^(model\.layers\.[01]\.mlp\.)(gate|up)_proj", lambda m: m.group(1) + {"gate": "wa", "up": "wb"}[m.group(2)], r.sources[0]),) + r.sources[1:], r.ops)
                             for r in _expected(target).rules))
    for pick_gate, right in ((wa, True), (wb, False)):
        pick_up = wb if pick_gate == wa else wa
        pinned = Mapping((Rule("model.layers.{i}.mlp.gate_proj.weight", (pick_gate,)), Rule("model.layers.{i}.mlp.up_proj.weight", (pick_up,))))
        resolved = _match_with_pins(source, target, pinned)
        assert resolved.complete, (resolved.unresolved[:3], resolved.unmatched_targets[:3], resolved.unused_sources[:3])
        assert equivalent(resolved.mapping, expected, source, target).exact == right


# ---------------------------------------------------------------------- (d) flagged, not guessed


def test_classes_on_different_layers_are_not_paired_by_their_structure():
    """The source's dense layers are {0, 1}, the target's {2, 3} (a config that does not describe this
    checkpoint): the dense class of one side fits the dense class of the other in every name and shape,
    but nothing says layer 0 is layer 2. The classes of the same layers (source dense {0, 1} ~ target
    MoE {0, 1}) share only attention and norms: those are paired layer to layer; every MLP tensor is
    left over, none is moved to another layer."""
    source = _hub(build_target("Qwen3MoeForCausalLM", _qwen3_config(layers=4, dense=(0, 1))).tree)
    target = build_target("Qwen3MoeForCausalLM", _qwen3_config(layers=4, dense=(2, 3))).tree
    report = match_trees(source, target)
    assert not report.complete
    expansion = report.mapping.expand(source.keys(), target.keys())
    assert not expansion.problems
    for rule in expansion.rules:  # what is decided keeps its layer and its name
        assert all(_layer_of(s) == _layer_of(rule.target) for s in rule.sources), rule
        assert ".mlp." not in rule.target, rule
    open_targets = set(report.unmatched_targets) | {k for u in report.unresolved for k in target.keys() if re.fullmatch(re.escape(u.target).replace(r"\{i\}", r"\d+"), k)}
    assert {k for k in target.keys() if ".mlp." in k} <= open_targets
    assert {k for k in source.keys() if ".mlp." in k} <= set(report.unused_sources) | {s for u in report.unresolved for o in u.options for s in o.sources}


def _fused_expected(target: ParamTree, layers) -> Mapping:
    rules = list(_expected(target).rules)
    for n, rule in enumerate(rules):
        found = re.match(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$", rule.target)
        if found and int(found.group(1)) in layers:
            rules[n] = Rule(rule.target, (f"model.layers.{found.group(1)}.self_attn.qkv_proj.weight",), (Chunk(0, "qkv".index(found.group(2)), parts=3),))
    return Mapping(tuple(rules))


def test_a_block_of_alike_layers_is_cut_into_the_classes_the_other_side_has_over_the_same_layers():
    """The target's layers are all alike, the source's fall into two classes over the same layer
    numbers (layers 0, 1 store q|k|v fused): the target block is cut into the same classes, and
    each pairs with the source class of its layers."""
    target = build_target("Qwen3MoeForCausalLM", _qwen3_config(layers=4, dense=(), kv_heads=4)).tree
    source = _fused_qkv_in((0, 1), target)
    assert len(find_blocks(source).blocks) == 2 and len(find_blocks(target).blocks) == 1
    report = match_trees(source, target)
    assert report.complete, (report.unresolved[:3], report.unmatched_targets[:5], report.unused_sources[:5])
    comparison = equivalent(report.mapping, _fused_expected(target, (0, 1)), source, target)
    assert comparison.exact, str(comparison)


def test_layers_that_cannot_be_lined_up_are_flagged_not_guessed():
    """Five source layers in two classes, four target layers (a config that does not describe the
    checkpoint): no class has a partner with its layers and the block cannot be cut alike, so the
    layers are loose tensors, where layer numbers are no evidence. No per-layer tensor is decided."""
    target = build_target("Qwen3MoeForCausalLM", _qwen3_config(layers=4, dense=(), kv_heads=4)).tree
    source = _fused_qkv_in((0, 1), build_target("Qwen3MoeForCausalLM", _qwen3_config(layers=5, dense=(), kv_heads=4)).tree)
    report = match_trees(source, target)
    assert not report.complete
    assert [d.rule for d in report.decisions if _layer_of(d.rule.target) is not None] == []
    questioned = {k for u in report.unresolved for k in target.keys() if re.fullmatch(re.escape(u.target).replace(r"\{i\}", r"\d+"), k)}
    assert {k for k in target.keys() if _layer_of(k) is not None} <= set(report.unmatched_targets) | questioned


# ---------------------------------------------------------------------- (c) real values, through the CLI


def test_qwen3_moe_with_dense_layers_converts_through_the_cli(tmp_path: Path):
    from click.testing import CliRunner
    from safetensors.numpy import load_file, save_file

    from matcher.cli import main

    dense = (0, 1)
    config = _qwen3_config(dense=dense)
    target = build_target("Qwen3MoeForCausalLM", config).tree
    rng = np.random.default_rng(3)
    arrays = {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in _hub(target).specs.items()}
    save_file(arrays, str(tmp_path / "hub.safetensors"))
    config.save_pretrained(tmp_path / "config")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(tmp_path / "hub.safetensors"), "--target", "Qwen3MoeForCausalLM",
                                       "--config", str(tmp_path / "config" / "config.json"), "--save", str(out), "--yes"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "(2 layers: 0-1)" in result.output and "(4 layers: 2-5)" in result.output  # which layers each kind holds
    converted = {}
    for shard in sorted(out.glob("*.safetensors")):
        converted.update(load_file(str(shard)))
    assert set(converted) == set(target.keys())
    for layer in range(6):
        p = f"model.layers.{layer}."
        if layer in dense:
            for name in ("gate_proj", "up_proj", "down_proj"):
                np.testing.assert_array_equal(converted[p + f"mlp.{name}.weight"], arrays[p + f"mlp.{name}.weight"])
            assert p + "mlp.experts.gate_up_proj" not in converted
            continue
        experts = range(config.num_experts)
        want_gate_up = np.stack([np.concatenate([arrays[f"{p}mlp.experts.{e}.gate_proj.weight"], arrays[f"{p}mlp.experts.{e}.up_proj.weight"]]) for e in experts])
        np.testing.assert_array_equal(converted[p + "mlp.experts.gate_up_proj"], want_gate_up)
        np.testing.assert_array_equal(converted[p + "mlp.experts.down_proj"], np.stack([arrays[f"{p}mlp.experts.{e}.down_proj.weight"] for e in experts]))
        np.testing.assert_array_equal(converted[p + "mlp.gate.weight"], arrays[p + "mlp.gate.weight"])
    for key in target.keys():
        if ".mlp." not in key:
            np.testing.assert_array_equal(converted[key], arrays[key], err_msg=key)
