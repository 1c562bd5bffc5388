"""known_mappings/clip.yaml: an OpenAI CLIP checkpoint (``import clip``) -> transformers CLIPModel.

The proof compares the converted model with OpenAI's own CLIP on the same images and tokens
(image features, text features, logits), checks the written weights against seed 002's renames
(the CLIP part of transformers' CLIPSeg converter), inverts the mapping back to the checkpoint
bit-exactly, and rejects every mapping one mistake away.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel

from matcher.convert import convert_arrays
from tests.fixtures import make_clip, make_clipseg
from tests.families.common import KNOWN, assert_loaded_cleanly, assert_outputs_match, assert_reverse_gives_back
from tests.families.common import assert_same_tensors, complete_expansion, family_fixtures, in_memory, model_check
from tests.families.common import differing_outputs, mutant_survivors, openai_clip_inputs, written_weights
from tests.proof import mutants

fixture, mapping, source_tree, target, converted_dir = family_fixtures(make_clip.make, KNOWN / "clip.yaml", "CLIPModel")


@pytest.fixture(scope="module")
def original(fixture):
    """OpenAI's clip.model.CLIP with the checkpoint's weights."""
    return fixture["load_original"]()


@pytest.fixture(scope="module")
def inputs(fixture):
    """Three images and three token rows ending in end-of-text at different places, zero-padded after it."""
    return openai_clip_inputs(fixture["hparams"], fixture["eot_token"])


@pytest.fixture(scope="module")
def expected(original, inputs):
    """What OpenAI's CLIP computes: encode_image, encode_text and its logits."""
    images, ids = inputs
    with torch.no_grad():
        logits_per_image, _ = original(images, ids)
        return {"image": original.encode_image(images), "text": original.encode_text(ids), "logits": logits_per_image}


def outputs_of(model: CLIPModel, inputs) -> dict[str, torch.Tensor]:
    """The same three quantities from transformers (no attention mask: OpenAI masks only causally,
    and the causal mask already keeps the padding after end-of-text out of the pooled token)."""
    images, ids = inputs
    with torch.no_grad():
        return {
            "image": model.get_image_features(pixel_values=images).pooler_output,
            "text": model.get_text_features(input_ids=ids).pooler_output,
            "logits": model(input_ids=ids, pixel_values=images).logits_per_image,
        }


# ---------------------------------------------------------------------------- the file


def test_fixture_is_an_openai_clip_state_dict(source_tree, original):
    assert set(source_tree.specs) == set(original.state_dict())
    assert source_tree["text_projection"].shape == (32, 24)  # (width, embed_dim), applied as x @ proj
    assert source_tree["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)


def test_mapping_covers_the_checkpoint_and_the_model_exactly(mapping, source_tree, target):
    expansion = complete_expansion(mapping, source_tree, target.tree)
    assert expansion.dropped == [] and expansion.initialised == []


# ---------------------------------------------------------------------------- a. conversion


def test_converted_model_loads_without_missing_or_unexpected_keys(converted_dir):
    _, info = CLIPModel.from_pretrained(converted_dir, output_loading_info=True)
    assert_loaded_cleanly(info)


def test_converted_model_computes_what_openai_clip_computes(converted_dir, inputs, expected):
    model = CLIPModel.from_pretrained(converted_dir).float().eval()
    assert_outputs_match(outputs_of(model, inputs), expected)


def test_written_weights_equal_the_seed_renames_bit_for_bit(converted_dir, original):
    """Seed 002 converts the OpenAI CLIP inside a CLIPSeg checkpoint (`clip_model.` -> `clip.`)."""
    inside_clipseg = {f"clip_model.{key}": value for key, value in original.state_dict().items()}
    reference = make_clipseg.seed_converter(inside_clipseg, make_clip.target_config())
    assert_same_tensors(written_weights(converted_dir), {key.removeprefix("clip."): value for key, value in reference.items()})


def test_from_pretrained_keeps_the_written_weights(converted_dir):
    assert_same_tensors(CLIPModel.from_pretrained(converted_dir).state_dict(), written_weights(converted_dir))


# ---------------------------------------------------------------------------- b. round trip


def test_reverse_mapping_gives_back_the_checkpoint_bit_exactly(mapping, source_tree, target):
    expansion = assert_reverse_gives_back(mapping, source_tree, convert_arrays(source_tree, target.tree, mapping))
    assert expansion.initialised == []  # every tensor of the checkpoint comes back


# ---------------------------------------------------------------------------- c. mutants


def test_every_mapping_one_mistake_away_is_rejected(mapping, source_tree, target, inputs, expected):
    model = CLIPModel(make_clip.target_config()).eval()
    check = model_check(model, lambda m: outputs_of(m, inputs), expected)
    all_mutants = list(mutants(mapping))
    assert len(all_mutants) == len(mapping.rules) + 2  # every rule removed once; both projections' transposes flipped
    # the proof passes on the real mapping and fails on every mutant
    assert mutant_survivors(mapping, all_mutants, in_memory(source_tree), target.tree, check) == []


# ---------------------------------------------------------------------------- what the weights cannot show


@pytest.mark.parametrize("field, wrong", [("hidden_act", "gelu"), ("layer_norm_eps", 1e-6)])
def test_a_config_field_the_weights_cannot_show_is_caught_numerically(converted_dir, inputs, expected, field, wrong):
    """QuickGELU vs GELU, or the layer-norm eps, leave every weight as it is; only the numeric
    proof against OpenAI's CLIP tells a config that gets them wrong."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(converted_dir)
    for tower in (config.text_config, config.vision_config):
        setattr(tower, field, wrong)
    model = CLIPModel.from_pretrained(converted_dir, config=config).float().eval()
    assert differing_outputs(outputs_of(model, inputs), expected) is not None
