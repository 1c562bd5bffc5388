"""The match command as users run it: exit codes, one-line errors, nothing half-written."""

import json

import pytest
import torch
from click.testing import CliRunner

from matcher.cli import main
from matcher.mapping import Mapping, Rule

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    """A tiny ViTModel saved as a state-dict .pt, its config, and a templated identity mapping."""
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(**VIT)
    model = ViTModel(config).eval()
    torch.save(model.state_dict(), root / "vit.pt")
    config.save_pretrained(root)
    templated = sorted({k.replace(".0.", ".{i}.").replace(".1.", ".{i}.") for k in model.state_dict()})
    Mapping(tuple(Rule(k, (k,)) for k in templated)).save(root / "identity.yaml")
    return root, model


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_explains_every_option_and_the_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--target", "--config", "--mapping", "--save", "--mapping-out", "--json", "--yes", "--allow-partial", "--force", "--no-verify"):
        assert option in result.output
    assert "Exit codes" in result.output and "3  unresolved or unmatched" in result.output


def test_save_writes_a_directory_that_from_pretrained_loads(vit_checkpoint, tmp_path):
    from transformers import ViTModel

    root, model = vit_checkpoint
    out = tmp_path / "out"
    result = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--mapping", root / "identity.yaml", "--save", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mapping.yaml", "model.safetensors"]
    loaded = ViTModel.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_without_a_mapping_the_matcher_infers_it(vit_checkpoint, tmp_path):
    from transformers import ViTModel

    root, model = vit_checkpoint
    out = tmp_path / "out"
    result = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--save", out, "--mapping-out", tmp_path / "m.yaml")
    assert result.exit_code == 0, result.output
    assert "complete" in result.output or "saved to" in result.output
    loaded = ViTModel.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inferred = Mapping.load(tmp_path / "m.yaml")
    assert any("{i}" in rule.target for rule in inferred.rules)  # solved once per block, templated


def test_json_report_lists_every_tensor_with_its_confidence(vit_checkpoint):
    root, model = vit_checkpoint
    result = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["complete"] is True and report["saved"] is None
    expanded = Mapping.from_dict({"rules": [{k: r[k] for k in ("target", "source", "sources", "ops") if k in r} for r in report["rules"]]})
    assert {r.target for r in expanded.expand(model.state_dict(), model.state_dict()).rules} == set(model.state_dict())
    assert all(0 < r["confidence"] <= 1 for r in report["rules"])


def test_an_existing_output_is_not_overwritten_without_force(vit_checkpoint, tmp_path):
    root, _ = vit_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [root / "vit.pt", "--target", "ViTModel", "--config", root, "--mapping", root / "identity.yaml", "--save", out]
    refused = invoke(*args)
    assert refused.exit_code == 1 and "already exists" in refused.output
    assert (out / "keep.txt").read_text() == "mine"
    assert invoke(*args, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_a_partial_mapping_is_completed_by_the_matcher(vit_checkpoint, tmp_path):
    root, _ = vit_checkpoint
    full = Mapping.load(root / "identity.yaml")
    Mapping(full.rules[1:]).save(tmp_path / "partial.yaml")
    result = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--mapping", tmp_path / "partial.yaml", "--json")
    assert result.exit_code == 0
    targets = {r["target"] for r in json.loads(result.stdout)["rules"]}
    assert full.rules[0].target in targets


@pytest.fixture(scope="module")
def opaque_qkv_checkpoint(vit_checkpoint):
    """The ViT checkpoint with q, k, v renamed to opaque names in a different order per layer."""
    root, model = vit_checkpoint
    state = dict(model.state_dict())
    for layer, order in enumerate(["kqv", "vkq"]):
        for opaque, role in zip("abc", order):
            for kind in ("weight", "bias"):
                state[f"layers.{layer}.attention.w_{opaque}.{kind}"] = state.pop(f"layers.{layer}.attention.{role}_proj.{kind}")
    torch.save(state, root / "opaque.pt")
    return root / "opaque.pt"


def test_opaque_q_k_v_are_flagged_not_guessed(vit_checkpoint, opaque_qkv_checkpoint, tmp_path):
    root, _ = vit_checkpoint
    out = tmp_path / "out"
    result = invoke(opaque_qkv_checkpoint, "--target", "ViTModel", "--config", root, "--save", out, "--json")
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    unresolved = {u["target"] for u in report["unresolved"]}
    assert {"layers.{i}.attention.q_proj.weight", "layers.{i}.attention.k_proj.weight", "layers.{i}.attention.v_proj.weight"} <= unresolved
    decided = {r["target"] for r in report["rules"]}
    assert not any("_proj" in t and "o_proj" not in t for t in decided)
    assert not out.exists()


def test_allow_partial_writes_what_is_decided_and_still_exits_3(vit_checkpoint, opaque_qkv_checkpoint, tmp_path):
    root, _ = vit_checkpoint
    out = tmp_path / "out"
    result = invoke(opaque_qkv_checkpoint, "--target", "ViTModel", "--config", root, "--save", out, "--allow-partial", "--no-verify")
    assert result.exit_code == 3
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "np") as handle:
        keys = set(handle.keys())
    assert "layers.0.mlp.fc1.weight" in keys and "layers.0.attention.q_proj.weight" not in keys


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda root, tmp: [tmp / "missing.npz", "--target", "ViTModel", "--config", root, "--mapping", root / "identity.yaml"], "no such file"),
        (lambda root, tmp: [root / "vit.pt", "--target", "ViTModle", "--config", root, "--mapping", root / "identity.yaml"], "did you mean ViTModel"),
        (lambda root, tmp: [root / "vit.pt", "--target", "ViTModel", "--config", tmp / "bad.json", "--mapping", root / "identity.yaml"], "not valid JSON"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(vit_checkpoint, tmp_path, make_args, message):
    root, _ = vit_checkpoint
    (tmp_path / "bad.json").write_text("{not json")
    result = invoke(*make_args(root, tmp_path))
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_usage_errors_exit_2(vit_checkpoint):
    root, _ = vit_checkpoint
    assert invoke(root / "vit.pt").exit_code == 2  # --target missing
    unknown = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--mapping", "nosuchfamily")
    assert unknown.exit_code == 2 and "known mapping" in unknown.output


def test_known_mappings_are_found_by_name():
    result = invoke("x", "--target", "ViTModel", "--config", "y", "--mapping", "chinese_clip")
    assert "neither a file nor a known mapping" not in result.output
