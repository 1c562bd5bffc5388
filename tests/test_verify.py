"""Numeric checks against the original implementation (``--source-model``): opaque q/k/v settled
by running both models, and a wrong conversion localised to the first module that diverges."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import matcher
from matcher.cli import main
from matcher.convert import convert_arrays
from matcher.mapping import Declared, Mapping, Rule
from matcher.ops import Chunk
from matcher.sources import open_tree
from matcher.verify import check_with_source_model, compare, module_pairs
from tests.fixtures import make_vit, opaque_vit

KNOWN_VIT = Path(__file__).resolve().parents[1] / "known_mappings" / "vit.yaml"
TARGET = "ViTForImageClassification"
TIMM = "timm:vit_tiny_patch16_224"  # the architecture kwargs are read off the checkpoint


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """q/k/v under opaque names, in a different order in each block."""
    return opaque_vit.make(tmp_path_factory.mktemp("opaque_shuffled"), "shuffled")


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """q/k/v under opaque names, in the same order in every block."""
    return opaque_vit.make(tmp_path_factory.mktemp("opaque_aligned"), "aligned")


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    return make_vit.make_variant(tmp_path_factory.mktemp("timm_vit"), "vit")


@pytest.fixture(scope="module")
def known():
    return Mapping.load(KNOWN_VIT)


def _concrete(mapping: Mapping, change) -> Mapping:
    """``mapping`` with every rule matching ``change`` (a function of (rule, layer) returning the
    layer's rule) written out per layer."""
    rules = []
    for rule in mapping.rules:
        layered = [change(rule, i) for i in (0, 1)]
        if any(r is not None for r in layered):
            rules += layered
        else:
            rules.append(rule)
    return replace(mapping, rules=tuple(rules))


def _layer(rule: Rule, i: int, ops=None, sources=None) -> Rule:
    return Rule(rule.target.replace("{i}", str(i)), tuple(s.replace("{i}", str(i)) for s in (sources or rule.sources)),
                rule.ops if ops is None else ops)


# ---------------------------------------------------------------------- settling ambiguity


def test_opaque_qkv_is_resolved_end_to_end_by_running_the_source_model(shuffled, known, tmp_path):
    common = (shuffled["source"], "--target", TARGET, "--config", shuffled["config"], "--yes")
    without = invoke(*common, "--json")
    assert without.exit_code == 3
    open_targets = {u["target"] for u in json.loads(without.output)["unresolved"]}
    assert "vit.layers.{i}.attention.q_proj.weight" in open_targets

    out = tmp_path / "out"
    result = invoke(*common, "--source-model", shuffled["spec"], "--save", out)
    assert result.exit_code == 0, result.output

    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    original = open_tree(shuffled["original"])
    expected = convert_arrays(original, matcher.match(original, TARGET, config=shuffled["config"], mapping=known).target.tree, known)
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], torch.as_tensor(value)), key


def test_a_different_order_per_block_gives_one_rule_per_layer(shuffled):
    report = check_with_source_model(matcher.match(shuffled["source"], TARGET, config=shuffled["config"]), shuffled["spec"])
    assert report.complete
    rules = {d.rule.target: d.rule.sources for d in report.decisions}
    for layer, (q, k, v) in enumerate(opaque_vit.LAYOUTS["shuffled"]):
        for role, name in (("q", q), ("k", k), ("v", v)):
            assert rules[f"vit.layers.{layer}.attention.{role}_proj.weight"] == (f"blocks.{layer}.attn.{name}.weight",)
            assert rules[f"vit.layers.{layer}.attention.{role}_proj.bias"] == (f"blocks.{layer}.attn.{name}.bias",)
    assert "vit.layers.{i}.attention.q_proj.weight" not in rules
    settled = report.numeric["settled"]
    assert [entry["compared_at"] for entry in settled] == ["vit.layers.0.attention ~ blocks.0.attn", "vit.layers.1.attention ~ blocks.1.attn"]
    assert all(entry["max_abs_diff"] <= 1e-5 < entry["runner_up_diff"] for entry in settled)


def test_the_same_order_in_every_block_gives_templated_rules(aligned):
    report = check_with_source_model(matcher.match(aligned["source"], TARGET, config=aligned["config"]), aligned["spec"])
    assert report.complete
    q, k, v = opaque_vit.LAYOUTS["aligned"][0]
    rules = {d.rule.target: d.rule.sources for d in report.decisions}
    assert rules["vit.layers.{i}.attention.q_proj.weight"] == (f"blocks.{{i}}.attn.{q}.weight",)
    assert rules["vit.layers.{i}.attention.k_proj.weight"] == (f"blocks.{{i}}.attn.{k}.weight",)
    assert rules["vit.layers.{i}.attention.v_proj.weight"] == (f"blocks.{{i}}.attn.{v}.weight",)
    assert rules["vit.layers.{i}.attention.o_proj.weight"] == ("blocks.{i}.attn.proj.weight",)


def test_two_assignments_that_compute_the_same_thing_stay_unresolved(shuffled, tmp_path):
    state = torch.load(shuffled["source"], weights_only=True)
    q, k, _ = opaque_vit.LAYOUTS["shuffled"][0]
    for leaf in ("weight", "bias"):  # block 0's k is a copy of its q: swapping them changes nothing
        state[f"blocks.0.attn.{k}.{leaf}"] = state[f"blocks.0.attn.{q}.{leaf}"].clone()
    source = tmp_path / "twins.pth"
    torch.save(state, source)
    report = check_with_source_model(matcher.match(source, TARGET, config=shuffled["config"]), shuffled["spec"])
    assert not report.complete
    (unsettled,) = report.numeric["unsettled"]
    assert "2 of 24" in unsettled["reason"] and "does not tell them apart" in unsettled["reason"]
    assert {u.target for u in report.unresolved} >= {"vit.layers.0.attention.q_proj.weight", "vit.layers.0.attention.k_proj.weight"}
    assert any(d.rule.target == "vit.layers.1.attention.q_proj.weight" for d in report.decisions)  # layer 1 still settled


def test_a_wrong_config_settles_nothing_and_says_which_fields_were_assumed(shuffled):
    report = check_with_source_model(matcher.match(shuffled["source"], TARGET), shuffled["spec"])  # config inferred: heads unknown
    assert not report.complete and not report.numeric["settled"]
    reason = report.numeric["unsettled"][0]["reason"]
    assert "none of 24" in reason and "num_attention_heads=" in reason
    assert "vit.layers.{i}.attention.q_proj.weight" in {u.target for u in report.unresolved}


# ---------------------------------------------------------------------- localisation


def test_a_correct_conversion_matches_module_by_module_and_at_the_outputs(timm_vit, known, tmp_path):
    result = invoke(timm_vit["source"], "--target", TARGET, "--config", timm_vit["config"], "--mapping", KNOWN_VIT,
                    "--source-model", TIMM, "--save", tmp_path / "out", "--yes")
    assert result.exit_code == 0, result.output
    report = check_with_source_model(matcher.match(timm_vit["source"], TARGET, config=timm_vit["config"], mapping=known), TIMM)
    numeric = report.numeric
    assert numeric["status"] == "matches" and numeric["first_divergence"] is None
    assert {o["name"].split(" ")[0] for o in numeric["outputs"] if o["matches"]} == {"logits", "features"}
    compared = {m["target_module"]: m["source_module"] for m in numeric["modules"]}
    assert compared["vit.layers.1.attention"] == "blocks.1.attn" and compared["classifier"] == "head"
    assert "vit.layers.1.attention.q_proj" not in compared  # cut out of the fused qkv: no counterpart


def test_q_and_k_swapped_in_one_layer_is_localised_to_that_attention(timm_vit, known, tmp_path):
    def swap_in_layer_1(rule, i):
        if ".q_proj." not in rule.target and ".k_proj." not in rule.target:
            return None
        (chunk,) = rule.ops
        return _layer(rule, i, ops=(Chunk(0, 1 - chunk.index if i == 1 else chunk.index, 3),))

    bad = tmp_path / "bad.yaml"
    _concrete(known, swap_in_layer_1).save(bad)
    result = invoke(timm_vit["source"], "--target", TARGET, "--config", timm_vit["config"], "--mapping", bad,
                    "--source-model", TIMM, "--save", tmp_path / "out", "--yes", "--json")
    assert result.exit_code == 3
    assert not (tmp_path / "out").exists()
    (divergence,) = [u for u in json.loads(result.output)["unresolved"]]
    assert divergence["target"] == "vit.layers.1.attention"
    assert "source blocks.1.attn" in divergence["reason"] and "vit.layers.1.attention.o_proj" in divergence["reason"]


def test_a_bias_from_the_wrong_layer_is_localised_to_its_module(timm_vit, known):
    def fc2_bias_of_layer_0_twice(rule, i):
        if not rule.target.endswith("mlp.fc2.bias"):
            return None
        return _layer(rule, i, sources=("blocks.0.mlp.fc2.bias",))

    bad = _concrete(known, fc2_bias_of_layer_0_twice)
    bad = replace(bad, dropped=bad.dropped + (Declared("blocks.1.mlp.fc2.bias", "planted bug"),))
    report = check_with_source_model(matcher.match(timm_vit["source"], TARGET, config=timm_vit["config"], mapping=bad), TIMM)
    first = report.numeric["first_divergence"]
    assert (first["target_module"], first["source_module"], first["input_matches"]) == ("vit.layers.1.mlp.fc2", "blocks.1.mlp.fc2", True)
    assert not report.complete


def test_a_wrong_activation_is_localised_to_the_mlp_holding_it(timm_vit, known, tmp_path):
    config = json.loads(Path(timm_vit["config"]).read_text())
    config["hidden_act"] = "gelu_new"  # tanh approximation; timm uses the exact erf GELU
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = check_with_source_model(matcher.match(timm_vit["source"], TARGET, config=tmp_path, mapping=known), TIMM)
    first = report.numeric["first_divergence"]
    assert (first["target_module"], first["source_module"]) == ("vit.layers.0.mlp", "blocks.0.mlp")
    assert first["first_diverging_output"]["target_module"] == "vit.layers.0.mlp.fc2"  # the activation itself has no weights to pair
    assert not any(o["matches"] for o in report.numeric["outputs"])


def test_explicit_timm_kwargs_build_the_same_model(timm_vit, known):
    spec = f"{TIMM}?img_size=32&patch_size=8&embed_dim=32&depth=2&num_heads=4&num_classes=10"
    report = check_with_source_model(matcher.match(timm_vit["source"], TARGET, config=timm_vit["config"], mapping=known), spec)
    assert report.numeric["status"] == "matches"


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
    from tests.fixtures import make_clip

    made = make_clip.make(tmp_path_factory.mktemp("clip"))
    made["spec"] = "clip.model:CLIP?" + "&".join(f"{k}={v}" for k, v in make_clip.HPARAMS.items())
    return made


def test_openai_clip_runs_sequence_first_and_is_compared_layer_by_layer(openai_clip):
    report = matcher.match(openai_clip["source"], "CLIPModel", config=openai_clip["config"], mapping=KNOWN_VIT.parent / "clip.yaml")
    numeric = check_with_source_model(report, openai_clip["spec"]).numeric
    assert numeric["status"] == "matches" and set(numeric["inputs"]) == {"pixel_values", "input_ids"}
    by_module = {m["target_module"]: m for m in numeric["modules"]}
    assert by_module["text_model.encoder.layers.1"]["source_module"] == "transformer.resblocks.1"
    assert by_module["text_model.encoder.layers.1"].get("seq_first")  # OpenAI's transformer runs (tokens, batch, width)
    assert by_module[""]["matches"]  # logits_per_image, both sides


def test_a_wrong_text_activation_in_clip_is_localised_to_the_first_text_mlp(openai_clip, tmp_path):
    config = json.loads(Path(openai_clip["config"]).read_text())
    config["text_config"]["hidden_act"] = "gelu"  # OpenAI CLIP uses QuickGELU
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = matcher.match(openai_clip["source"], "CLIPModel", config=tmp_path, mapping=KNOWN_VIT.parent / "clip.yaml")
    first = check_with_source_model(report, openai_clip["spec"]).numeric["first_divergence"]
    assert (first["target_module"], first["source_module"]) == ("text_model.encoder.layers.0.mlp", "transformer.resblocks.0.mlp")


# ---------------------------------------------------------------------- pieces


def test_modules_pair_through_the_mapping_and_a_fused_qkv_pairs_with_nothing(timm_vit, known):
    report = matcher.match(timm_vit["source"], TARGET, config=timm_vit["config"], mapping=known)
    rules = report.mapping.expand(report.source.keys(), report.target.tree.keys()).rules
    numel = lambda tree: {k: max(1, torch.Size(s.shape).numel()) for k, s in tree.specs.items()}  # noqa: E731
    pairs = dict(module_pairs(rules, numel(report.source), numel(report.target.tree)))
    assert pairs["vit.layers.0.attention"] == "blocks.0.attn"
    assert pairs["vit.layers.0.mlp.fc1"] == "blocks.0.mlp.fc1"
    assert pairs[""] == ""
    assert not any(t.endswith(("q_proj", "k_proj", "v_proj")) for t in pairs)
    assert "blocks.0.attn.qkv" not in pairs.values()


def test_sequence_first_outputs_are_compared_after_swapping_the_first_two_axes():
    batch_first = torch.randn(2, 5, 4)
    assert compare(batch_first, batch_first.transpose(0, 1).contiguous()).seq_first
    assert compare(batch_first, batch_first.transpose(0, 1).contiguous()).matches
    assert not compare(batch_first, batch_first.transpose(0, 1) + 1e-3).matches
    assert compare(batch_first, torch.randn(3, 3)) is None


@pytest.mark.parametrize("spec, says", [
    ("timm:no_such_model_anywhere", "timm has no model"),
    (f"{TIMM}?depth=3", "not in the checkpoint: blocks.2."),
    ("missing/file.py:factory", "no such file"),
    ("tests.fixtures.opaque_vit:no_factory", "has no callable"),
    ("just-a-name", "expected timm:MODEL"),
    ("open_clip:no-such-config", "open_clip has no model config"),
])
def test_a_bad_source_model_is_one_line_and_exit_1(timm_vit, spec, says):
    result = CliRunner().invoke(main, [timm_vit["source"], "--target", TARGET, "--config", timm_vit["config"], "--mapping", str(KNOWN_VIT),
                                       "--source-model", spec, "--yes"])
    assert result.exit_code == 1, result.output
    assert says in result.output and "Traceback" not in result.output
