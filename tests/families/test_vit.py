"""Proof of known_mappings/vit.yaml and vit_base.yaml: timm ViT / non-distilled DeiT -> transformers (seed 004).

The fixture (tests/fixtures/make_vit.py) is a set of tiny random timm models saved with
``torch.save(model.state_dict())``: a ViT with a 10-class head, a headless ViT (timm's feature
extractor, the seed's ``base_model=True`` path) and a DeiT. timm itself is the original
implementation: converted ViTForImageClassification logits must equal timm's logits and
ViTModel's last_hidden_state must equal timm's ``forward_features``. The converted weights
must also equal, bit for bit, what the seed's own renaming and qkv split produce.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from matcher.convert import convert
from matcher.mapping import Mapping
from matcher.ops import Chunk
from matcher.sources import open_tree
from matcher.targets import build_target
from tests.fixtures import make_vit
from tests.families.common import KNOWN, assert_loaded_cleanly, assert_outputs_match, assert_reverse_gives_back
from tests.families.common import assert_same_tensors, differing_outputs, in_memory, model_check, rejection
from tests.proof import mutants

MAPPINGS = {"ViTForImageClassification": KNOWN / "vit.yaml", "ViTModel": KNOWN / "vit_base.yaml"}

# (fixture variant, target class): every checkpoint kind the seed converts, plus a classifier
# checkpoint converted as a backbone (the head is a declared drop).
CASES = [
    ("vit", "ViTForImageClassification"),
    ("deit", "ViTForImageClassification"),
    ("vit_headless", "ViTModel"),
    ("vit", "ViTModel"),
    ("deit", "ViTModel"),
]
CASE_IDS = [f"{variant}->{target}" for variant, target in CASES]


def load_mapping(target_class: str) -> Mapping:
    return Mapping.load(MAPPINGS[target_class])


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, dict]:
    return make_vit.make(tmp_path_factory.mktemp("vit"))["variants"]


@pytest.fixture(scope="module")
def timm_models(variants) -> dict:
    return {name: make_vit.load_timm(info) for name, info in variants.items()}


@pytest.fixture(scope="module")
def pixels(variants) -> dict[str, torch.Tensor]:
    """Two deterministic images per variant through its ViT / DeiT image processor."""
    return {name: make_vit.pixel_values(info) for name, info in variants.items()}


def new_target_model(target_class: str, config):
    """The model the seed builds: ViTModel without the pooler timm does not have."""
    from transformers import ViTForImageClassification, ViTModel

    if target_class == "ViTModel":
        return ViTModel(config, add_pooling_layer=False).eval()
    return ViTForImageClassification(config).eval()


def saved_config(info):
    from transformers import ViTConfig

    return ViTConfig.from_pretrained(info["dir"])


def outputs(model, pixel_values) -> dict[str, torch.Tensor]:
    """What seed 004 compares: the token features, and the logits when there is a head."""
    with torch.no_grad():
        if hasattr(model, "classifier"):
            # ViTForImageClassification's inner ViTModel gives the features (after the final norm).
            return {"features": model.vit(pixel_values).last_hidden_state, "logits": model(pixel_values).logits}
        return {"features": model(pixel_values).last_hidden_state}


def timm_outputs(timm_model, pixel_values, target_class: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        result = {"features": timm_model.forward_features(pixel_values)}
        if target_class == "ViTForImageClassification":
            result["logits"] = timm_model(pixel_values)
    return result


@pytest.fixture(scope="module")
def converted(variants, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Every case converted to disk and loaded back with from_pretrained."""
    import transformers

    results = {}
    for variant, target_class in CASES:
        info = variants[variant]
        out = tmp_path_factory.mktemp("out") / f"{variant}_{target_class}"
        convert(info["source"], target_class, info["config"], MAPPINGS[target_class], out)
        extra = {"add_pooling_layer": False} if target_class == "ViTModel" else {}
        model, loading = getattr(transformers, target_class).from_pretrained(out, output_loading_info=True, **extra)
        results[variant, target_class] = {"dir": out, "model": model.eval(), "info": loading}
    return results


# ---------------------------------------------------------------------------- a. conversion


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_converted_checkpoint_loads_without_missing_unexpected_or_mismatched_keys(case, converted):
    assert_loaded_cleanly(converted[case]["info"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_converted_model_computes_what_timm_computes(case, converted, timm_models, pixels):
    variant, target_class = case
    ours = outputs(converted[case]["model"], pixels[variant])
    theirs = timm_outputs(timm_models[variant], pixels[variant], target_class)
    assert_outputs_match(ours, theirs)
    assert all(float(t.abs().max()) > 0.1 for t in theirs.values()), "outputs too small to tell anything apart"


def seed_004_state_dict(timm_state: dict, config, base_model: bool) -> dict[str, torch.Tensor]:
    """convert_vit_timm_to_pytorch.py's create_rename_keys + read_in_q_k_v, in its legacy names."""
    state = dict(timm_state)
    if base_model:  # remove_classification_head_
        for key in ("head.weight", "head.bias"):
            state.pop(key, None)
    renames = []
    for i in range(config.num_hidden_layers):
        for timm_name, hf_name in [
            ("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"), ("norm2", "layernorm_after"),
            ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
        ]:
            for kind in ("weight", "bias"):
                renames.append((f"blocks.{i}.{timm_name}.{kind}", f"vit.encoder.layer.{i}.{hf_name}.{kind}"))
    renames += [
        ("cls_token", "vit.embeddings.cls_token"),
        ("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
        ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
        ("pos_embed", "vit.embeddings.position_embeddings"),
        ("norm.weight", "vit.layernorm.weight"),
        ("norm.bias", "vit.layernorm.bias"),
    ]
    if base_model:
        renames = [(old, new.removeprefix("vit.")) for old, new in renames]
    else:
        renames += [("head.weight", "classifier.weight"), ("head.bias", "classifier.bias")]
    for old, new in renames:
        state[new] = state.pop(old)
    prefix, d = ("" if base_model else "vit."), config.hidden_size
    for i in range(config.num_hidden_layers):
        weight, bias = state.pop(f"blocks.{i}.attn.qkv.weight"), state.pop(f"blocks.{i}.attn.qkv.bias")
        for name, part in (("query", slice(None, d)), ("key", slice(d, 2 * d)), ("value", slice(-d, None))):
            state[f"{prefix}encoder.layer.{i}.attention.attention.{name}.weight"] = weight[part]
            state[f"{prefix}encoder.layer.{i}.attention.attention.{name}.bias"] = bias[part]
    return state


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_converted_weights_equal_what_the_seed_converter_writes(case, converted, variants, tmp_path):
    """The seed's state dict (legacy names, which from_pretrained renames itself) loads into the same weights."""
    import transformers
    from safetensors.torch import save_file

    variant, target_class = case
    info = variants[variant]
    config = saved_config(info)
    seed_state = seed_004_state_dict(torch.load(info["source"], weights_only=True), config, target_class == "ViTModel")
    config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in seed_state.items()}, str(tmp_path / "model.safetensors"))
    extra = {"add_pooling_layer": False} if target_class == "ViTModel" else {}
    seed_model, loading = getattr(transformers, target_class).from_pretrained(tmp_path, output_loading_info=True, **extra)
    assert_loaded_cleanly(loading)
    assert_same_tensors(converted[case]["model"].state_dict(), seed_model.state_dict())


# ---------------------------------------------------------------------------- timm variants the seed refuses


REFUSED_VARIANTS = {
    # timm constructor arguments -> a source key no rule reads (seed 004 raises ValueError for each)
    "layer scale": ({"init_values": 1e-5}, "blocks.0.ls1.gamma"),
    "global average pooling with fc_norm": ({"global_pool": "avg"}, "fc_norm.weight"),
    "CLIP-style norm_pre": ({"pre_norm": True}, "norm_pre.weight"),
    "SigLIP-style attention pooling": ({"global_pool": "map"}, "attn_pool.latent"),
    "register tokens": ({"reg_tokens": 2}, "reg_token"),
}


@pytest.mark.parametrize("kwargs, offending", REFUSED_VARIANTS.values(), ids=REFUSED_VARIANTS.keys())
def test_timm_variants_the_seed_refuses_do_not_fit_the_mapping(kwargs, offending, variants):
    from timm.models.vision_transformer import VisionTransformer

    info = variants["vit"]
    size = {k: info["timm_kwargs"][k] for k in ("embed_dim", "depth", "num_heads", "num_classes")}
    source = VisionTransformer(img_size=make_vit.IMAGE_SIZE, patch_size=make_vit.PATCH_SIZE, **size, **kwargs).state_dict()
    target = build_target("ViTForImageClassification", info["config"]).tree
    expansion = load_mapping("ViTForImageClassification").expand(source.keys(), target.keys())
    assert not expansion.complete
    assert offending in expansion.unused_sources


def test_the_plain_timm_constructor_fits_the_mapping(variants):
    """The refusals above are about the extra keys: the same constructor without them fits."""
    from timm.models.vision_transformer import VisionTransformer

    info = variants["vit"]
    size = {k: info["timm_kwargs"][k] for k in ("embed_dim", "depth", "num_heads", "num_classes")}
    source = VisionTransformer(img_size=make_vit.IMAGE_SIZE, patch_size=make_vit.PATCH_SIZE, **size).state_dict()
    target = build_target("ViTForImageClassification", info["config"]).tree
    expansion = load_mapping("ViTForImageClassification").expand(source.keys(), target.keys())
    assert expansion.complete, expansion.summary()


# ---------------------------------------------------------------------------- b. round trip


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reverse_mapping_gives_back_the_timm_state_dict_bit_exactly(case, converted, variants):
    from safetensors.numpy import load_file

    variant, target_class = case
    mapping = load_mapping(target_class)
    converted_arrays = load_file(str(Path(converted[case]["dir"]) / "model.safetensors"))
    expansion = assert_reverse_gives_back(mapping, open_tree(variants[variant]["source"]), converted_arrays)
    # Only the classification head of a classifier converted as a backbone cannot come back.
    assert all(key.startswith("head.") for key in expansion.initialised)


# ---------------------------------------------------------------------------- c. mutations

BENCH_VARIANT = {"ViTForImageClassification": "vit", "ViTModel": "vit_headless"}


def qkv_order_mutants(mapping: Mapping):
    """The mistake a rename-only proof cannot see: q, k, v taken from the wrong thirds of qkv."""
    rules = list(mapping.rules)
    for kind in ("weight", "bias"):
        chunked = [k for k, rule in enumerate(rules) if rule.target.endswith(f"_proj.{kind}") and rule.ops]
        assert len(chunked) == 3
        for order in itertools.permutations(range(3)):
            if order == (0, 1, 2):
                continue
            indices = [rules[k].ops[0].index for k in chunked]
            mutated = list(rules)
            for k, pick in zip(chunked, order):
                mutated[k] = replace(rules[k], ops=(replace(rules[k].ops[0], index=indices[pick]),))
            yield f"qkv {kind} parts in order {order}", replace(mapping, rules=tuple(mutated))


def all_mutants(target_class: str) -> list[tuple[str, Mapping]]:
    mapping = load_mapping(target_class)
    return list(mutants(mapping)) + list(qkv_order_mutants(mapping))


MUTANT_CASES = [(target_class, description, mutant) for target_class in MAPPINGS for description, mutant in all_mutants(target_class)]


@pytest.fixture(scope="module")
def proof_benches(variants, timm_models, pixels) -> dict[str, dict]:
    """Per mapping: in-memory trees, one model built once, timm's outputs."""
    benches = {}
    for target_class, variant in BENCH_VARIANT.items():
        info, images = variants[variant], pixels[variant]
        benches[target_class] = {
            "source": in_memory(open_tree(info["source"])),
            "target": build_target(target_class, info["config"]).tree,
            "check": model_check(
                new_target_model(target_class, saved_config(info)),
                lambda model, images=images: outputs(model, images),
                timm_outputs(timm_models[variant], images, target_class),
            ),
        }
    return benches


@pytest.mark.parametrize("target_class", MAPPINGS)
def test_the_unmutated_mapping_passes_the_mutation_bench(target_class, proof_benches):
    assert rejection(load_mapping(target_class), **proof_benches[target_class]) is None


@pytest.mark.parametrize("target_class", MAPPINGS)
def test_there_are_mutants_for_every_rule_and_every_qkv_order(target_class):
    mapping = load_mapping(target_class)
    assert len(all_mutants(target_class)) == len(mapping.rules) + 2 * 5


@pytest.mark.parametrize(
    "target_class, mutant",
    [(c, m) for c, _, m in MUTANT_CASES],
    ids=[f"{c}: {d}" for c, d, _ in MUTANT_CASES],
)
def test_every_one_mistake_mutant_of_the_mapping_is_caught(target_class, mutant, proof_benches):
    assert rejection(mutant, **proof_benches[target_class]) is not None


def test_qkv_chunks_are_the_only_ops_in_the_mappings():
    """Everything else is a pure rename, so no transpose mutants exist; the qkv order mutants stand in."""
    for target_class in MAPPINGS:
        ops = [op for rule in load_mapping(target_class).rules for op in rule.ops]
        assert ops and all(isinstance(op, Chunk) and op.axis == 0 and op.parts == 3 for op in ops)


# ---------------------------------------------------------------------------- what the weights cannot show

EXACT = 1e-6  # the ViT path is exact (timm and transformers agree to 0.0), so the proof can be this strict


@pytest.mark.parametrize("field, wrong", [("hidden_act", "gelu_new"), ("layer_norm_eps", 1e-12)])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_config_field_the_weights_cannot_show_is_caught_numerically(case, converted, timm_models, pixels, field, wrong):
    """The tanh GELU, or transformers' default eps 1e-12 instead of timm's 1e-6, leave every weight
    as it is; only the numeric proof against timm tells. (1e-12 moves outputs by ~6e-6: under the
    family tolerance 1e-5, over EXACT, which the correct config meets.)"""
    import transformers

    variant, target_class = case
    theirs = timm_outputs(timm_models[variant], pixels[variant], target_class)
    assert_outputs_match(outputs(converted[case]["model"], pixels[variant]), theirs, tolerance=EXACT)
    config = saved_config(converted[case])
    setattr(config, field, wrong)
    extra = {"add_pooling_layer": False} if target_class == "ViTModel" else {}
    model = getattr(transformers, target_class).from_pretrained(converted[case]["dir"], config=config, **extra).eval()
    assert differing_outputs(outputs(model, pixels[variant]), theirs, tolerance=EXACT) is not None
