"""known_mappings/clip.yaml: an OpenAI CLIP checkpoint (``import clip``) -> transformers CLIPModel.

The proof compares the converted model with OpenAI's own CLIP on the same images and tokens
(image features, text features, logits), checks the written weights against seed 002's renames
(the CLIP part of transformers' CLIPSeg converter), inverts the mapping back to the checkpoint
bit-exactly, and rejects every mapping one mistake away.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel

from matcher.convert import convert, convert_arrays
from matcher.errors import MatcherError
from matcher.mapping import Mapping
from matcher.ops import apply_chain
from matcher.tree import ParamTree
from tests.fixtures import make_clip, make_clipseg
from tests.families.common import family_fixtures
from tests.proof import mutants

MAPPING = Path(__file__).resolve().parents[2] / "known_mappings" / "clip.yaml"
TOLERANCE = 1e-5


fixture, mapping, source_tree, target = family_fixtures(make_clip.make, MAPPING, "CLIPModel")


@pytest.fixture(scope="module")
def original(fixture):
    """OpenAI's clip.model.CLIP with the checkpoint's weights."""
    return fixture["load_original"]()


@pytest.fixture(scope="module")
def inputs(fixture):
    """Three images and three token rows ending in end-of-text at different places, zero-padded after it."""
    generator = torch.Generator().manual_seed(0)
    size, length, eot = fixture["hparams"]["image_resolution"], fixture["hparams"]["context_length"], fixture["eot_token"]
    images = torch.randn(3, 3, size, size, generator=generator)
    ids = torch.randint(1, eot, (3, length), generator=generator)
    for row, end in enumerate((5, length - 1, 9)):
        ids[row, end] = eot
        ids[row, end + 1 :] = 0
    return images, ids


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


def max_differences(got: dict, want: dict) -> dict[str, float]:
    return {name: (got[name] - want[name]).abs().max().item() for name in want}


# ---------------------------------------------------------------------------- the file


def test_fixture_is_an_openai_clip_state_dict(source_tree, original):
    assert set(source_tree.specs) == set(original.state_dict())
    assert source_tree["text_projection"].shape == (32, 24)  # (width, embed_dim), applied as x @ proj
    assert source_tree["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)


def test_mapping_covers_the_checkpoint_and_the_model_exactly(mapping, source_tree, target):
    expansion = mapping.expand(source_tree.specs, target.tree.specs)
    assert expansion.complete, expansion.summary()
    assert expansion.dropped == [] and expansion.initialised == []


# ---------------------------------------------------------------------------- a. conversion


@pytest.fixture(scope="module")
def converted_dir(fixture, mapping, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_converted") / "hf"
    return convert(fixture["source"], "CLIPModel", fixture["config"], mapping, out)


def test_converted_model_loads_without_missing_or_unexpected_keys(converted_dir):
    _, info = CLIPModel.from_pretrained(converted_dir, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info.get("error_msgs")


def test_converted_model_computes_what_openai_clip_computes(converted_dir, inputs, expected):
    model = CLIPModel.from_pretrained(converted_dir).float().eval()
    differences = max_differences(outputs_of(model, inputs), expected)
    assert all(d <= TOLERANCE for d in differences.values()), differences


def test_written_weights_equal_the_seed_renames_bit_for_bit(converted_dir, original):
    """Seed 002 converts the OpenAI CLIP inside a CLIPSeg checkpoint (`clip_model.` -> `clip.`)."""
    written = load_file(converted_dir / "model.safetensors")
    inside_clipseg = {f"clip_model.{key}": value for key, value in original.state_dict().items()}
    reference = make_clipseg.seed_converter(inside_clipseg, make_clip.target_config())
    reference = {key.removeprefix("clip."): value for key, value in reference.items()}
    assert written.keys() == reference.keys()
    different = [key for key in reference if not torch.equal(written[key], reference[key])]
    assert different == []


def test_from_pretrained_keeps_the_written_weights(converted_dir):
    written = load_file(converted_dir / "model.safetensors")
    loaded = CLIPModel.from_pretrained(converted_dir).state_dict()
    assert loaded.keys() == written.keys()
    assert [key for key in written if not torch.equal(loaded[key], written[key])] == []


# ---------------------------------------------------------------------------- b. round trip


def test_reverse_mapping_gives_back_the_checkpoint_bit_exactly(mapping, source_tree, target):
    forward = convert_arrays(source_tree, target.tree, mapping)
    backward = mapping.reverse(source_tree.shapes())
    expansion = backward.expand(forward.keys(), source_tree.specs)
    assert expansion.complete, expansion.summary()
    restored = {rule.target: np.asarray(apply_chain(rule.ops, [forward[s] for s in rule.sources])) for rule in expansion.rules}
    assert restored.keys() == set(source_tree.specs)
    for key, array in restored.items():
        original = np.asarray(source_tree.read(key))
        assert array.dtype == original.dtype and array.shape == original.shape, key
        assert np.array_equal(array, original), key


# ---------------------------------------------------------------------------- c. mutants


def test_every_mapping_one_mistake_away_is_rejected(mapping, source_tree, target, inputs, expected):
    model = CLIPModel(make_clip.target_config()).eval()
    arrays = {key: source_tree.read(key) for key in source_tree.specs}
    source = ParamTree.from_arrays(arrays)  # read the file once; every mutant converts from memory

    def rejection(mutant: Mapping) -> str | None:
        try:
            state = convert_arrays(source, target.tree, mutant)
        except MatcherError as exc:
            return f"conversion refused: {exc}"
        result = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
        if result.missing_keys or result.unexpected_keys:
            return f"load reports missing {result.missing_keys} unexpected {result.unexpected_keys}"
        differences = max_differences(outputs_of(model, inputs), expected)
        if max(differences.values()) > TOLERANCE:
            return f"outputs differ: {differences}"
        return None

    assert rejection(mapping) is None  # the proof passes on the real mapping...
    all_mutants = list(mutants(mapping))
    assert len(all_mutants) == len(mapping.rules) + 2  # every rule removed once; both projections' transposes flipped
    survivors = [description for description, mutant in all_mutants if rejection(mutant) is None]
    assert survivors == []  # ...and fails on every mutant
