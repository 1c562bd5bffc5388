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
    for option in ("--target", "--config", "--mapping", "--save", "--force", "--json", "--no-verify", "--mapping-out"):
        assert option in result.output
    assert "Exit codes" in result.output and "3  the mapping leaves" in result.output


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


def test_json_report_lists_every_tensor(vit_checkpoint):
    root, model = vit_checkpoint
    result = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--mapping", root / "identity.yaml", "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["complete"] is True and report["saved"] is None
    assert {t["target"] for t in report["tensors"]} == set(model.state_dict())


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


def test_a_mapping_that_misses_tensors_exits_3_and_writes_nothing(vit_checkpoint, tmp_path):
    root, _ = vit_checkpoint
    full = Mapping.load(root / "identity.yaml")
    Mapping(full.rules[1:]).save(tmp_path / "partial.yaml")
    out = tmp_path / "out"
    result = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--mapping", tmp_path / "partial.yaml", "--save", out)
    assert result.exit_code == 3
    assert "nothing written" in result.output and full.rules[0].target.split("{")[0] in result.output
    assert not out.exists()


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
    no_mapping = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root)
    assert no_mapping.exit_code == 2 and "--mapping is required" in no_mapping.output
    unknown = invoke(root / "vit.pt", "--target", "ViTModel", "--config", root, "--mapping", "nosuchfamily")
    assert unknown.exit_code == 2 and "known mapping" in unknown.output


def test_known_mappings_are_found_by_name():
    result = invoke("x", "--target", "ViTModel", "--config", "y", "--mapping", "chinese_clip")
    assert "neither a file nor a known mapping" not in result.output
