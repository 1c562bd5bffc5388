"""Proof of known_mappings/siglip.yaml: big_vision SigLIP .npz -> transformers SiglipModel (seed 000).

The fixture (tests/fixtures/make_siglip.py) is a random tiny SiglipModel written out as a
big_vision checkpoint by the reverse of the mapping. Two independent big_vision readers, open_clip's
``load_big_vision_weights`` and timm's ``_load_weights``, read that same file into their own models
and must produce the converted model's features: this is what shows the fixture has the real
big_vision layout rather than being merely our mapping's inverse. Conversely, the fixture written
by any self-consistent wrong mutant (a flipped transpose on a square kernel) is read by open_clip
into a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from matcher.convert import convert
from matcher.errors import MatcherError
from matcher.mapping import Mapping
from matcher.sources import open_tree
from matcher.targets import build_target
from tests.fixtures import make_siglip
from tests.families.common import TOLERANCE, assert_loaded_cleanly, assert_outputs_match, assert_reverse_gives_back
from tests.families.common import in_memory, max_differences, model_check, rejection
from tests.proof import mutants

MAPPING_PATH = make_siglip.MAPPING
KNOWN_RULES = len(Mapping.load(MAPPING_PATH).rules)
MUTANTS = list(mutants(Mapping.load(MAPPING_PATH)))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mapping() -> Mapping:
    return Mapping.load(MAPPING_PATH)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict:
    return make_siglip.make(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def config(fixture):
    from transformers import SiglipConfig

    return SiglipConfig.from_pretrained(Path(fixture["config"]).parent)


@pytest.fixture(scope="module")
def inputs(config) -> dict[str, torch.Tensor]:
    """Two deterministic images and two full-length token sequences."""
    rng = np.random.default_rng(7)
    v, t = config.vision_config, config.text_config
    pixels = rng.uniform(-1, 1, size=(2, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    ids = rng.integers(0, t.vocab_size, size=(2, t.max_position_embeddings))
    return {"pixel_values": torch.from_numpy(pixels), "input_ids": torch.from_numpy(ids)}


def siglip_outputs(model, inputs) -> dict[str, torch.Tensor]:
    """Pooled image and text features (before normalisation) and the image-text logits."""
    with torch.no_grad():
        out = model(**inputs)
    return {
        "image_features": out.vision_model_output.pooler_output,
        "text_features": out.text_model_output.pooler_output,
        "logits_per_image": out.logits_per_image,
    }


@pytest.fixture(scope="module")
def original_outputs(fixture, config, inputs):
    model = make_siglip.reference_model(config, fixture["reference_arrays"])
    return siglip_outputs(model, inputs)


@pytest.fixture(scope="module")
def converted(fixture, mapping, tmp_path_factory):
    """The fixture converted to disk and loaded back with from_pretrained."""
    from transformers import SiglipModel

    out = tmp_path_factory.mktemp("out") / "siglip"
    convert(fixture["source"], "SiglipModel", fixture["config"], mapping, out)
    model, info = SiglipModel.from_pretrained(out, output_loading_info=True)
    return {"dir": out, "model": model.eval(), "info": info}


# ---------------------------------------------------------------------------- a. conversion


def test_converted_checkpoint_loads_without_missing_unexpected_or_mismatched_keys(converted):
    assert_loaded_cleanly(converted["info"])


def test_converted_weights_equal_the_weights_the_checkpoint_was_made_from(converted, fixture):
    state = converted["model"].state_dict()
    reference = fixture["reference_arrays"]
    assert set(state) == set(reference)
    for key, array in reference.items():
        assert state[key].dtype == torch.float32, key
        assert np.array_equal(state[key].numpy(), array), key


def test_converted_model_computes_what_the_original_model_computes(converted, inputs, original_outputs):
    assert_outputs_match(siglip_outputs(converted["model"], inputs), original_outputs)


# ---------------------------------------------------------------------------- independent big_vision readers


def tiny_timm_siglip_vit(vision_config) -> str:
    """Register (once) a timm entrypoint for a SigLIP ViT of this size and return its name.

    timm's SigLIP ViT: no class token, MAP pooling, LayerNorm eps 1e-6 (timm's ViT default);
    the tanh GELU matches big_vision's flax nn.gelu (timm's released SigLIP-1 entrypoints keep
    the exact GELU, which differs by ~1e-4).
    """
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    v = vision_config
    sizes = (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size)
    name = "matcher_test_siglip_vit_" + "_".join(map(str, sizes))
    if timm.is_model(name):
        return name

    def entrypoint(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        assert not pretrained
        return VisionTransformer(
            img_size=v.image_size,
            patch_size=v.patch_size,
            embed_dim=v.hidden_size,
            depth=v.num_hidden_layers,
            num_heads=v.num_attention_heads,
            mlp_ratio=v.intermediate_size / v.hidden_size,
            class_token=False,
            act_layer="gelu_tanh",
            **dict({"global_pool": "map", "num_classes": 0}, **kwargs),
        )

    entrypoint.__name__ = name
    register_model(entrypoint)
    return name


def open_clip_siglip(config):
    """A tiny open_clip SigLIP (CustomTextCLIP, timm image trunk), as ViT-B-16-SigLIP.json but small."""
    from open_clip.model import CustomTextCLIP

    v, t = config.vision_config, config.text_config
    model = CustomTextCLIP(
        embed_dim=t.projection_size,
        vision_cfg={
            "image_size": v.image_size,
            "timm_model_name": tiny_timm_siglip_vit(v),
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        text_cfg={
            "context_length": t.max_position_embeddings,
            "vocab_size": t.vocab_size,
            "width": t.hidden_size,
            "heads": t.num_attention_heads,
            "layers": t.num_hidden_layers,
            "mlp_ratio": t.intermediate_size / t.hidden_size,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": t.layer_norm_eps},
            "act_kwargs": {"approximate": "tanh"},
        },
        init_logit_bias=-10.0,
    )
    return model.eval()


class RecordingNpz:
    """np.load's NpzFile, remembering which arrays a reader asked for."""

    def __init__(self, npz):
        self.npz, self.read = npz, set()

    def __getitem__(self, key):
        self.read.add(key)
        return self.npz[key]

    def __contains__(self, key):
        return key in self.npz


def open_clip_outputs(model, inputs) -> dict[str, torch.Tensor]:
    """open_clip's image and text features and logits, named as in ``siglip_outputs``."""
    from torch.nn.functional import normalize

    with torch.no_grad():
        image = model.encode_image(inputs["pixel_values"])
        text = model.encode_text(inputs["input_ids"])
        logits = model.logit_scale.exp() * normalize(image, dim=-1) @ normalize(text, dim=-1).T + model.logit_bias
    return {"image_features": image, "text_features": text, "logits_per_image": logits}


def test_open_clip_reads_the_fixture_into_the_model_we_convert_it_to(fixture, config, inputs, converted, monkeypatch):
    import open_clip.convert

    model = open_clip_siglip(config)
    opened: list[RecordingNpz] = []
    real_load = np.load

    def recording_load(path):
        opened.append(RecordingNpz(real_load(path)))
        return opened[-1]

    monkeypatch.setattr(open_clip.convert.np, "load", recording_load)
    open_clip.convert.load_big_vision_weights(model, fixture["source"])
    monkeypatch.undo()

    assert opened[0].read == set(np.load(fixture["source"]).files), "open_clip ignores arrays the fixture holds"
    assert_outputs_match(open_clip_outputs(model, inputs), siglip_outputs(converted["model"], inputs))


# A mutant that flips a transpose on a square kernel is self-consistent: the fixture written by its
# reverse converts back to the original model. Only an independent reader can tell such a fixture
# from the real layout, so open_clip must read every such fixture into a different model.
ORIENTATION_MUTANTS = [(d, m) for d, m in MUTANTS if len(m.rules) == KNOWN_RULES]


@pytest.fixture(scope="module")
def open_clip_model(config):
    return open_clip_siglip(config)


@pytest.mark.parametrize("mutant", [m for _, m in ORIENTATION_MUTANTS], ids=[d for d, _ in ORIENTATION_MUTANTS])
def test_open_clip_tells_a_fixture_written_by_a_mutant_from_the_real_layout(
    mutant, fixture, config, inputs, original_outputs, open_clip_model, tmp_path
):
    from open_clip.convert import load_big_vision_weights

    try:
        arrays = make_siglip.to_big_vision(fixture["reference_arrays"], config, mutant)
    except (MatcherError, RuntimeError) as exc:  # a non-square kernel: the mutant cannot even write big_vision's shapes
        assert "shape" in str(exc)
        return
    load_big_vision_weights(open_clip_model, make_siglip.write_npz(tmp_path / "mutant.npz", arrays))
    diffs = max_differences(open_clip_outputs(open_clip_model, inputs), original_outputs)
    assert max(diffs.values()) > TOLERANCE, diffs


def test_timm_reads_the_image_tower_of_the_fixture_into_the_model_we_convert_it_to(fixture, config, inputs, converted):
    import timm
    from timm.models.vision_transformer import _load_weights

    vit = timm.create_model(tiny_timm_siglip_vit(config.vision_config), pretrained=False).eval()
    with torch.no_grad():
        _load_weights(vit, fixture["source"], prefix="params/img/")
        timm_features = vit(inputs["pixel_values"])
    ours = siglip_outputs(converted["model"], inputs)["image_features"]
    assert float((timm_features - ours).abs().max()) <= TOLERANCE


# ---------------------------------------------------------------------------- b. round trip


def test_reverse_mapping_gives_back_the_big_vision_arrays_bit_exactly(mapping, fixture, converted):
    from safetensors.numpy import load_file

    converted_arrays = load_file(str(Path(converted["dir"]) / "model.safetensors"))
    expansion = assert_reverse_gives_back(mapping, open_tree(fixture["source"]), converted_arrays)
    assert expansion.initialised == []  # every array of the checkpoint comes back


# ---------------------------------------------------------------------------- c. mutations


@pytest.fixture(scope="module")
def proof_bench(fixture, config, inputs, original_outputs):
    """What every mutant runs through: in-memory trees, one model, the original outputs."""
    from transformers import SiglipModel

    model = SiglipModel(config).eval()
    return {
        "source": in_memory(open_tree(fixture["source"])),
        "target": build_target("SiglipModel", fixture["config"]).tree,
        "check": model_check(model, lambda m: siglip_outputs(m, inputs), original_outputs),
    }


def test_the_unmutated_mapping_passes_the_mutation_bench(mapping, proof_bench):
    assert rejection(mapping, **proof_bench) is None


def test_there_are_mutants_for_every_rule_and_every_transpose(mapping):
    transposes = sum(op.name == "transpose" for rule in mapping.rules for op in rule.ops)
    assert len(MUTANTS) >= len(mapping.rules) + transposes


@pytest.mark.parametrize("mutant", [m for _, m in MUTANTS], ids=[d for d, _ in MUTANTS])
def test_every_one_mistake_mutant_of_the_mapping_is_caught(mutant, proof_bench):
    assert rejection(mutant, **proof_bench) is not None


# ---------------------------------------------------------------------------- the checked-in demo


DEMO_NPZ = make_siglip.DEMO_DIR / "siglip_tiny.npz"
DEMO_CONFIG = make_siglip.DEMO_DIR / "siglip_tiny_config.json"


def test_demo_checkpoint_is_small_and_regenerates_byte_for_byte(tmp_path):
    assert DEMO_NPZ.stat().st_size + DEMO_CONFIG.stat().st_size < 150_000
    made = make_siglip.make_demo(tmp_path)
    assert Path(made["source"]).read_bytes() == DEMO_NPZ.read_bytes()
    strip = lambda path: {k: v for k, v in json.loads(Path(path).read_text()).items() if k != "transformers_version"}
    assert strip(made["config"]) == strip(DEMO_CONFIG)


def test_demo_converts_to_the_model_it_was_made_from(mapping, tmp_path):
    from transformers import SiglipModel

    config = make_siglip.siglip_config("demo")
    reference = make_siglip.reference_arrays(config, make_siglip.SIZES["demo"]["seed"])
    out = convert(DEMO_NPZ, "SiglipModel", DEMO_CONFIG, MAPPING_PATH, tmp_path / "demo")
    state = SiglipModel.from_pretrained(out).state_dict()
    assert set(state) == set(reference)
    assert all(np.array_equal(state[k].numpy(), reference[k]) for k in reference)
