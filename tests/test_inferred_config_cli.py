"""`match SRC --target CLASS --save OUT` with neither a mapping nor a config: the config is
inferred from the checkpoint's shapes and the saved weights are those the known mapping
writes under the true config."""

import importlib
import json

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from matcher.cli import main
from matcher.convert import convert

CASES = [
    ("siglip", "SiglipModel", "siglip", lambda info: info),
    ("clip", "CLIPModel", "clip", lambda info: info),
    ("vit", "ViTForImageClassification", "vit", lambda info: info),
]


@pytest.mark.parametrize("family, target_class, known, pick", CASES, ids=[c[0] for c in CASES])
def test_no_config_and_no_mapping_still_writes_the_known_conversion(family, target_class, known, pick, tmp_path):
    info = pick(importlib.import_module(f"tests.fixtures.make_{family}").make(tmp_path / "fixture"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(info["source"]), "--target", target_class, "--save", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    inferred = {f["field"] for f in report["config"] if f["how"] == "inferred"}
    assert any(name.endswith("hidden_size") for name in inferred) and any(name.endswith("num_hidden_layers") for name in inferred)
    assert any(f["how"] == "default" and f["field"].endswith("layer_norm_eps") for f in report["config"])  # listed as an assumption
    reference = convert(info["source"], target_class, info["config"], f"known_mappings/{known}.yaml", tmp_path / "reference", verify=False)
    written, expected = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert written.keys() == expected.keys()
    for key in expected:
        assert (written[key] == expected[key]).all(), key
