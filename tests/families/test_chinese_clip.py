"""known_mappings/chinese_clip.yaml: a cn_clip (Chinese-CLIP) ViT checkpoint -> transformers ChineseCLIPModel.

The proof compares the converted model with cn_clip's own CLIP on the same image and text batch
(features and logits), checks the weights against a port of the seed converter, inverts the
mapping back to the checkpoint bit-exactly, and rejects every mapping one mistake away.
"""

from __future__ import annotations

import pytest
import torch
from transformers import ChineseCLIPModel

from matcher.convert import convert_arrays
from tests.fixtures import make_chinese_clip
from tests.families.common import KNOWN, assert_loaded_cleanly, assert_outputs_match, assert_reverse_gives_back
from tests.families.common import assert_same_tensors, complete_expansion, family_fixtures, in_memory, model_check
from tests.families.common import differing_outputs, mutant_survivors, written_weights
from tests.proof import mutants

fixture, mapping, source_tree, target, converted_dir = family_fixtures(
    make_chinese_clip.make, KNOWN / "chinese_clip.yaml", "ChineseCLIPModel"
)


@pytest.fixture(scope="module")
def original(fixture):
    """cn_clip's CLIP loaded from the checkpoint file the way cn_clip loads it."""
    return fixture["load_source_model"]()


@pytest.fixture(scope="module")
def inputs(fixture):
    """Three images and three token rows, two of them padded with [PAD] so the attention mask matters."""
    generator = torch.Generator().manual_seed(0)
    size, length = fixture["image_size"], fixture["context_length"]
    images = torch.randn(3, 3, size, size, generator=generator)
    ids = torch.randint(1, fixture["vocab_size"], (3, length), generator=generator)
    ids[0, 9:] = fixture["pad_id"]
    ids[1, 4:] = fixture["pad_id"]
    return images, ids


@pytest.fixture(scope="module")
def expected(original, inputs):
    """What cn_clip computes: encode_image, encode_text, and its similarity logits."""
    images, ids = inputs
    with torch.no_grad():
        logits_per_image, _ = original.get_similarity(images, ids)
        return {"image": original.encode_image(images), "text": original.encode_text(ids), "logits": logits_per_image}


def outputs_of(model: ChineseCLIPModel, inputs, pad_id: int) -> dict[str, torch.Tensor]:
    """The same three quantities from the transformers model (cn_clip masks exactly the [PAD] tokens)."""
    images, ids = inputs
    mask = (ids != pad_id).long()
    with torch.no_grad():
        return {
            "image": model.get_image_features(pixel_values=images).pooler_output,
            "text": model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
            "logits": model(input_ids=ids, attention_mask=mask, pixel_values=images).logits_per_image,
        }


def seed_converter(pt_weights: dict[str, torch.Tensor], model: ChineseCLIPModel) -> dict[str, torch.Tensor]:
    """The seed's convert_chinese_clip_original_pytorch_to_hf.py, ported: the reference state dict."""

    def copy_linear(module, prefix):
        module.weight.data = pt_weights[f"{prefix}.weight"]
        module.bias.data = pt_weights[f"{prefix}.bias"]

    def copy_layer(layer, prefix):
        copy_linear(layer.layer_norm1, f"{prefix}.ln_1")
        copy_linear(layer.layer_norm2, f"{prefix}.ln_2")
        copy_linear(layer.mlp.fc1, f"{prefix}.mlp.c_fc")
        copy_linear(layer.mlp.fc2, f"{prefix}.mlp.c_proj")
        attn = layer.self_attn
        q, k, v = pt_weights[f"{prefix}.attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = pt_weights[f"{prefix}.attn.in_proj_bias"].chunk(3, dim=0)
        attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data = q, k, v
        attn.q_proj.bias.data, attn.k_proj.bias.data, attn.v_proj.bias.data = qb, kb, vb
        copy_linear(attn.out_proj, f"{prefix}.attn.out_proj")

    model.text_projection.weight.data = pt_weights["text_projection"].T
    for name, param in model.text_model.named_parameters():
        param.data = pt_weights[f"bert.{name}"]
    vision = model.vision_model
    model.visual_projection.weight.data = pt_weights["visual.proj"].T
    copy_linear(vision.pre_layrnorm, "visual.ln_pre")
    copy_linear(vision.post_layernorm, "visual.ln_post")
    vision.embeddings.patch_embedding.weight.data = pt_weights["visual.conv1.weight"]
    vision.embeddings.class_embedding.data = pt_weights["visual.class_embedding"]
    vision.embeddings.position_embedding.weight.data = pt_weights["visual.positional_embedding"]
    for i, layer in enumerate(vision.encoder.layers):
        copy_layer(layer, f"visual.transformer.resblocks.{i}")
    model.logit_scale.data = pt_weights["logit_scale"]
    return model.state_dict()


# ---------------------------------------------------------------------------- the file


def test_fixture_is_saved_like_a_released_cn_clip_checkpoint(fixture, source_tree, original):
    raw = torch.load(fixture["source"], map_location="cpu", weights_only=True)
    assert {"epoch", "step", "name", "state_dict"} <= set(raw)
    assert all(key.startswith("module.") for key in raw["state_dict"])
    # the reader unwraps state_dict and strips the DDP prefix: the tree is the model's own state dict
    assert set(source_tree.specs) == set(original.state_dict())


def test_mapping_covers_the_checkpoint_and_the_model_exactly(mapping, source_tree, target):
    expansion = complete_expansion(mapping, source_tree, target.tree)
    assert expansion.dropped == [] and expansion.initialised == []


# ---------------------------------------------------------------------------- a. conversion


def test_converted_model_loads_without_missing_or_unexpected_keys(converted_dir):
    _, info = ChineseCLIPModel.from_pretrained(converted_dir, output_loading_info=True)
    assert_loaded_cleanly(info)


def test_converted_model_computes_what_cn_clip_computes(converted_dir, inputs, expected, fixture):
    model = ChineseCLIPModel.from_pretrained(converted_dir).float().eval()
    assert_outputs_match(outputs_of(model, inputs, fixture["pad_id"]), expected)


def test_written_weights_equal_the_seed_converter_bit_for_bit(converted_dir, original):
    reference = seed_converter(dict(original.state_dict()), ChineseCLIPModel(make_chinese_clip.target_config()).eval())
    assert_same_tensors(written_weights(converted_dir), reference)


def test_from_pretrained_keeps_the_written_weights_except_the_pad_embedding_row(converted_dir, fixture):
    """transformers 5's ChineseCLIP _init_weights zeroes word_embeddings[pad_token_id] after loading
    (it zeroes an indexed view, which lacks the loaded tensor's _is_hf_initialized flag). cn_clip masks
    [PAD] tokens, so the features do not change; everything else must load exactly as written."""
    written = written_weights(converted_dir)
    loaded = ChineseCLIPModel.from_pretrained(converted_dir).state_dict()
    pad, words = fixture["pad_id"], "text_model.embeddings.word_embeddings.weight"
    assert written[words][pad].abs().max() > 0  # the checkpoint's [PAD] row is not zero...
    rows = torch.arange(written[words].shape[0]) != pad
    assert torch.equal(loaded[words][rows], written[words][rows])  # ...the other rows load as written
    different = [key for key in written if key != words and not torch.equal(loaded[key], written[key])]
    assert different == []


# ---------------------------------------------------------------------------- b. round trip


def test_reverse_mapping_gives_back_the_checkpoint_bit_exactly(mapping, source_tree, target):
    expansion = assert_reverse_gives_back(mapping, source_tree, convert_arrays(source_tree, target.tree, mapping))
    assert expansion.initialised == []  # every tensor of the checkpoint comes back


# ---------------------------------------------------------------------------- c. mutants


def test_every_mapping_one_mistake_away_is_rejected(mapping, source_tree, target, inputs, expected, fixture):
    model = ChineseCLIPModel(make_chinese_clip.target_config()).eval()
    check = model_check(model, lambda m: outputs_of(m, inputs, fixture["pad_id"]), expected)
    all_mutants = list(mutants(mapping))
    assert len(all_mutants) == len(mapping.rules) + 2  # every rule removed once; two transposes flipped
    # the proof passes on the real mapping and fails on every mutant
    assert mutant_survivors(mapping, all_mutants, in_memory(source_tree), target.tree, check) == []


# ---------------------------------------------------------------------------- what the weights cannot show


@pytest.mark.parametrize("tower, field, wrong", [("vision_config", "hidden_act", "gelu"), ("text_config", "layer_norm_eps", 1e-5)])
def test_a_config_field_the_weights_cannot_show_is_caught_numerically(converted_dir, inputs, expected, fixture, tower, field, wrong):
    """QuickGELU in the vision tower, and BERT's eps 1e-12 in the text tower, leave every weight
    as it is; only the numeric proof against cn_clip tells a config that gets them wrong."""
    from transformers import ChineseCLIPConfig

    config = ChineseCLIPConfig.from_pretrained(converted_dir)
    setattr(getattr(config, tower), field, wrong)
    model = ChineseCLIPModel.from_pretrained(converted_dir, config=config).float().eval()
    assert differing_outputs(outputs_of(model, inputs, fixture["pad_id"]), expected) is not None
