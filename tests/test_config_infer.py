"""Config inference from source shapes (matcher.config_infer).

Acceptance: building the target with the inferred config gives exactly the state_dict shapes the
true config gives, and the fields that size tensors (widths, layers, MLP size, patch and image
size, vocabulary, positions) are reported as inferred, each with evidence.

The tiny fixtures are the family fixtures (tests/fixtures/make_*.py). The real sizes are shape-only
trees (no data, no loader): big_vision SigLIP through the reverse of known_mappings/siglip.yaml,
timm ViTs and OpenAI CLIP built on the meta device.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from matcher.config_infer import DEFAULT, INFERRED, infer_config, probe
from matcher.errors import TargetError
from matcher.sources import open_tree
from matcher.targets import build_target, load_config, resolve_class
from matcher.tree import ParamTree, TensorSpec
from tests.fixtures import make_chinese_clip, make_clip, make_owlvit, make_siglip, make_vit

ROOT = Path(__file__).resolve().parents[1]

TOWER = ["hidden_size", "intermediate_size", "num_hidden_layers"]
TEXT = [f"text_config.{f}" for f in TOWER + ["vocab_size", "max_position_embeddings"]]
VISION = [f"vision_config.{f}" for f in TOWER + ["image_size", "patch_size", "num_channels"]]
VIT = TOWER + ["image_size", "patch_size", "num_channels"]


def _fixture(maker, tmp_path_factory, name):
    return maker.make(tmp_path_factory.mktemp(name))


# (fixture maker, variant, target class, fields that must be reported as inferred)
FAMILIES = {
    "siglip": (make_siglip, None, "SiglipModel", TEXT + VISION + ["text_config.projection_size", "text_config.num_attention_heads", "vision_config.num_attention_heads"]),
    "clip": (make_clip, None, "CLIPModel", TEXT + VISION + ["projection_dim"]),
    "chinese_clip": (make_chinese_clip, None, "ChineseCLIPModel", TEXT + VISION + ["projection_dim", "text_config.type_vocab_size"]),
    "owlvit": (make_owlvit, None, "OwlViTForObjectDetection", TEXT + VISION + ["projection_dim", "text_config.num_attention_heads", "vision_config.num_attention_heads"]),
    "vit": (make_vit, "vit", "ViTForImageClassification", VIT + ["num_labels"]),
    "vit_headless": (make_vit, "vit_headless", "ViTModel", VIT),
    "deit": (make_vit, "deit", "ViTForImageClassification", VIT + ["num_labels"]),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        maker, variant, _, _ = FAMILIES[family]
        key = maker.__name__
        if key not in cache:
            cache[key] = _fixture(maker, tmp_path_factory, family)
        out = cache[key]
        return out["variants"][variant] if variant else out

    return get


def _shapes(model_class, config) -> dict:
    return build_target(model_class, config).tree.shapes()


def _diff(expected: dict, got: dict) -> dict:
    return {k: (expected.get(k), got.get(k)) for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fixture_config_is_inferred(family, made):
    info = made(family)
    _, _, class_name, required = FAMILIES[family]
    model_class = resolve_class(class_name)
    result = infer_config(model_class, open_tree(info["source"]))

    true_config = load_config(model_class, info["config"])
    assert _diff(_shapes(model_class, true_config), _shapes(model_class, result.config)) == {}

    inferred = {f.path: f for f in result.inferred}
    missing = [path for path in required if path not in inferred]
    assert not missing, f"not inferred: {missing}\n{result.summary()}"
    for path in required:
        assert inferred[path].evidence, path
        assert inferred[path].value == _value(true_config, path), path
    assert json.dumps(result.to_dict())  # the report is plain JSON


def _value(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def test_fields_the_weights_cannot_show_are_defaults(made):
    result = infer_config(resolve_class("CLIPModel"), open_tree(made("clip")["source"]))
    for path in ("text_config.hidden_act", "vision_config.layer_norm_eps", "text_config.eos_token_id", "logit_scale_init_value"):
        assert result[path].how == DEFAULT, path
        assert not result[path].shape_determining
    # OpenAI CLIP fuses q, k, v (in_proj): the head count is not visible; 12 does not divide the
    # 64-wide tiny tower, so the nearest value that builds is taken, and said so
    heads = result["vision_config.num_attention_heads"]
    assert heads.how == DEFAULT and 64 % heads.value == 0 and "does not build" in heads.evidence
    assert result.complete and result.unexplained == []


def test_heads_come_from_split_attention_kernels(made):
    result = infer_config(resolve_class("SiglipModel"), open_tree(made("siglip")["source"]))
    heads = result["vision_config.num_attention_heads"]
    assert heads.how == INFERRED and heads.value == 4  # (32, 4, 8) kernels
    assert "split attention kernel" in heads.evidence and "(32, 4, 8)" in heads.evidence


def test_heads_a_fused_source_does_not_show_stay_undetermined(made):
    """timm fuses qkv: ViT's head count only has to divide the width, so it is not inferred."""
    result = infer_config(resolve_class("ViTForImageClassification"), open_tree(made("vit")["source"]))
    heads = result["num_attention_heads"]
    assert heads.how == DEFAULT and 32 % heads.value == 0
    assert "allow any of" in heads.evidence
    assert [f.path for f in result.undetermined] == ["num_attention_heads"]
    assert result["qkv_bias"].how == INFERRED and result["qkv_bias"].value is True


def test_optimizer_state_and_missing_tensors(made):
    """OWL-ViT's scenic file carries Adam moments for every parameter: they must not count as
    spare tensors; and transformers' visual_projection has no source at all."""
    tree = open_tree(made("owlvit")["source"])
    assert any("grad_sq_ema" in k for k in tree)
    result = infer_config(resolve_class("OwlViTForObjectDetection"), tree)
    assert result["projection_dim"].value == 32
    assert result.unexplained == ["owlvit.visual_projection.weight"]


def test_headless_source_leaves_the_pooler_unexplained(made):
    result = infer_config(resolve_class("ViTModel"), open_tree(made("vit_headless")["source"]))
    assert sorted(result.unexplained) == ["pooler.dense.bias", "pooler.dense.weight"]
    pooler = result["pooler_output_size"]
    assert pooler.how == DEFAULT and pooler.value == 32  # what ViTConfig derives from the width


def test_layer_counts_name_the_stacks(made):
    result = infer_config(resolve_class("SiglipModel"), open_tree(made("siglip")["source"]))
    text = result["text_config.num_hidden_layers"]
    assert text.value == 2 and "params/txt/Encoder_0/encoderblock_{i}" in text.evidence
    vision = result["vision_config.num_hidden_layers"]
    assert vision.value == 2 and "params/img/Transformer/encoderblock_{i}" in vision.evidence


def test_probe_is_cached_and_cheap():
    model_class = resolve_class("ViTModel")
    first = probe(model_class)
    started = time.perf_counter()
    assert probe(model_class) is first
    assert time.perf_counter() - started < 0.01
    assert ("num_hidden_layers",) in first.counts and first.counts[("num_hidden_layers",)] == 1


def test_an_empty_source_is_an_error():
    with pytest.raises(TargetError, match="no tensors"):
        infer_config(resolve_class("ViTModel"), ParamTree({}, origin="empty.pt"))


def test_a_source_of_another_architecture_is_reported_not_guessed(made):
    """A timm ViT read as SigLIP: it runs, and says what it could not fix."""
    result = infer_config(resolve_class("SiglipModel"), open_tree(made("vit")["source"]))
    assert not result.complete
    assert "text_config.vocab_size" in {f.path for f in result.undetermined}
    assert result.unexplained


# --------------------------------------------------------------------------- real sizes, shapes only


def _tree(shapes: dict) -> ParamTree:
    return ParamTree({k: TensorSpec(k, tuple(s), "float32") for k, s in shapes.items()}, loader=None, origin="<shapes>", format="shapes")


def _siglip_config(hidden, intermediate, layers, heads, image, patch, vocab=32000, text_len=64):
    from transformers import SiglipConfig

    tower = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads)
    return SiglipConfig(text_config=dict(tower, vocab_size=vocab, max_position_embeddings=text_len), vision_config=dict(tower, image_size=image, patch_size=patch))


def _big_vision_shapes(config) -> dict:
    """big_vision's arrays for a SiglipModel config, by the reverse of the known mapping."""
    from matcher.mapping import Mapping
    from matcher.ops import chain_output_shape

    target = _shapes(resolve_class("SiglipModel"), config)
    layout = make_siglip.big_vision_shapes(config)  # the sizes the reverse needs to split merged axes
    expansion = Mapping.load(ROOT / "known_mappings" / "siglip.yaml").reverse(layout).expand(list(target), list(layout))
    assert expansion.complete, expansion.summary()
    shapes = {rule.target: tuple(chain_output_shape(rule.ops, [target[s] for s in rule.sources])) for rule in expansion.rules}
    assert shapes == {k: tuple(v) for k, v in layout.items()}
    return shapes


def _timm_shapes(name: str, **kwargs) -> dict:
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _openai_clip_shapes(**hparams) -> dict:
    from clip.model import CLIP

    with torch.device("meta"):
        model = CLIP(**hparams)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _vit_config(**kwargs):
    from transformers import ViTConfig

    return ViTConfig(**kwargs)


def _clip_l14_336():
    from transformers import CLIPConfig

    return CLIPConfig(
        projection_dim=768,
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=336, patch_size=14),
    )


REAL = {
    "siglip-base-patch16-224": ("SiglipModel", lambda: _siglip_config(768, 3072, 12, 12, 224, 16), _big_vision_shapes),
    "siglip-so400m-patch14-384": ("SiglipModel", lambda: _siglip_config(1152, 4304, 27, 16, 384, 14), _big_vision_shapes),
    "timm-vit-b16-224": ("ViTForImageClassification", lambda: _vit_config(num_labels=1000), lambda c: _timm_shapes("vit_base_patch16_224")),
    "timm-vit-l16-384": (
        "ViTForImageClassification",
        lambda: _vit_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=384, num_labels=1000),
        lambda c: _timm_shapes("vit_large_patch16_384"),
    ),
    "openai-clip-vit-l14-336": (
        "CLIPModel",
        _clip_l14_336,
        lambda c: _openai_clip_shapes(
            embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024, vision_patch_size=14,
            context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12,
        ),
    ),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_sizes_from_shapes_only(name):
    class_name, make_config, make_shapes = REAL[name]
    model_class = resolve_class(class_name)
    config = make_config()
    source = _tree(make_shapes(config))
    probe(model_class)  # once per class; measured apart
    started = time.perf_counter()
    result = infer_config(model_class, source)
    seconds = time.perf_counter() - started
    assert _diff(_shapes(model_class, config), _shapes(model_class, result.config)) == {}
    assert result.unexplained == []
    assert seconds < 6, f"{name}: {seconds:.1f}s"  # about 0.3-1.5 s alone on 2 cores


def test_scanned_layers_stacked_on_a_leading_axis():
    """big_vision's scan layout: encoderblock/<param> arrays of shape (layers, ...)."""
    config = _siglip_config(64, 128, 3, 4, 32, 8, vocab=50, text_len=12)
    scanned = {}
    for key, shape in make_siglip.big_vision_shapes(config).items():
        m = re.match(r"(.*)/encoderblock_(\d+)/(.*)", key)
        if m:
            scanned.setdefault(f"{m.group(1)}/encoderblock/{m.group(3)}", (3,) + tuple(shape))
        else:
            scanned[key] = tuple(shape)
    model_class = resolve_class("SiglipModel")
    result = infer_config(model_class, _tree(scanned))
    assert _diff(_shapes(model_class, config), _shapes(model_class, result.config)) == {}
    layers = result["vision_config.num_hidden_layers"]
    assert layers.how == INFERRED and layers.value == 3 and "stacked" in layers.evidence
    assert result["vision_config.num_attention_heads"].value == 4
