"""known_mappings/clipseg.yaml: a CLIPSeg checkpoint (CLIPDensePredT + its OpenAI CLIP) -> CLIPSegForImageSegmentation.

The checkpoint is made from a random CLIPSegForImageSegmentation with the reverse mapping (the
CLIPSeg repository does not install), saved from a replica of CLIPSeg's module tree built from
OpenAI's CLIP and torch's nn.TransformerEncoderLayer. The proof converts it back and checks: the
weights equal the random model's bit for bit; the logits equal what CLIPSeg's own forward computes
with those modules (which a self-consistent but wrong mapping, e.g. q and k swapped both ways,
would not pass); the weights equal seed 002's converter; the reverse is bit-exact; every mapping
one mistake away is rejected; and the CLIP part says exactly what known_mappings/clip.yaml says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPSegForImageSegmentation

from matcher.convert import convert, convert_arrays
from matcher.errors import MatcherError
from matcher.mapping import Mapping
from matcher.ops import apply_chain
from matcher.tree import ParamTree
from tests.fixtures import make_clipseg
from tests.families.common import family_fixtures
from tests.proof import mutants

KNOWN = Path(__file__).resolve().parents[2] / "known_mappings"
MAPPING = KNOWN / "clipseg.yaml"
TOLERANCE = 1e-5


fixture, mapping, source_tree, target = family_fixtures(make_clipseg.make, MAPPING, "CLIPSegForImageSegmentation")


@pytest.fixture(scope="module")
def original(fixture):
    """CLIPSeg's module tree (OpenAI CLIP + FiLM decoder) with the checkpoint's weights."""
    return fixture["load_original"]()


@pytest.fixture(scope="module")
def random_model(fixture):
    """The CLIPSegForImageSegmentation the checkpoint was made from."""
    return fixture["build_random_model"]()


@pytest.fixture(scope="module")
def inputs(fixture):
    """Three query images and three text prompts ending in end-of-text at different places."""
    generator = torch.Generator().manual_seed(0)
    clip_hparams, eot = fixture["clip_hparams"], fixture["eot_token"]
    size, length = clip_hparams["image_resolution"], clip_hparams["context_length"]
    images = torch.randn(3, 3, size, size, generator=generator)
    ids = torch.randint(1, eot, (3, length), generator=generator)
    for row, end in enumerate((5, length - 1, 9)):
        ids[row, end] = eot
        ids[row, end + 1 :] = 0
    return images, ids


@pytest.fixture(scope="module")
def expected(original, inputs):
    """What CLIPSeg computes: mask logits, the text conditional, the pooled image embedding."""
    images, ids = inputs
    with torch.no_grad():
        logits, conditional = original(images, ids)
        pooled, _ = original.visual_forward(images, extract_layers=())
    return {"logits": logits[:, 0], "conditional": conditional, "pooled": pooled}


def outputs_of(model: CLIPSegForImageSegmentation, inputs) -> dict[str, torch.Tensor]:
    """The same quantities from transformers (no attention mask: OpenAI's text tower masks only causally)."""
    images, ids = inputs
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=images)
        pooled = model.clip.get_image_features(pixel_values=images).pooler_output
    return {"logits": out.logits, "conditional": out.conditional_embeddings, "pooled": pooled}


def max_differences(got: dict, want: dict) -> dict[str, float]:
    return {name: (got[name] - want[name]).abs().max().item() for name in want}


# ---------------------------------------------------------------------------- the file and the mapping


def test_fixture_holds_what_a_clipseg_checkpoint_holds(fixture, source_tree, original):
    raw = torch.load(fixture["source"], map_location="cpu", weights_only=True)
    assert set(source_tree.specs) == set(raw) == set(original.state_dict())
    # the image tower twice (self.model aliases self.clip_model.visual), fused in_proj, (width, embed) projections
    visual = [k.removeprefix("clip_model.visual.") for k in raw if k.startswith("clip_model.visual.")]
    assert sorted(visual) == sorted(k.removeprefix("model.") for k in raw if k.startswith("model."))
    assert all(torch.equal(raw[f"model.{k}"], raw[f"clip_model.visual.{k}"]) for k in visual)
    assert {"clip_model.text_projection", "clip_model.visual.proj", "reduce.weight", "trans_conv.weight"} <= set(raw)
    assert "blocks.0.self_attn.in_proj_weight" in raw and "clip_model.transformer.resblocks.0.attn.in_proj_weight" in raw


def test_mapping_covers_the_checkpoint_and_the_model_exactly(mapping, source_tree, target):
    expansion = mapping.expand(source_tree.specs, target.tree.specs)
    assert expansion.complete, expansion.summary()
    dropped = set(expansion.dropped)
    assert dropped == {k for k in source_tree.specs if k.startswith("model.")} | {"reduce.weight", "reduce.bias"}
    assert expansion.initialised == []


def test_clip_part_is_known_mappings_clip_under_the_clip_model_prefix(mapping):
    clip_rules = {rule.target: rule for rule in Mapping.load(KNOWN / "clip.yaml").rules}
    inside = {rule.target.removeprefix("clip."): rule for rule in mapping.rules if rule.target.startswith("clip.")}
    assert inside.keys() == clip_rules.keys()
    for name, rule in inside.items():
        assert rule.sources == tuple(f"clip_model.{s}" for s in clip_rules[name].sources), name
        assert rule.ops == clip_rules[name].ops, name


# ---------------------------------------------------------------------------- a. conversion


@pytest.fixture(scope="module")
def converted_dir(fixture, mapping, tmp_path_factory):
    out = tmp_path_factory.mktemp("clipseg_converted") / "hf"
    return convert(fixture["source"], "CLIPSegForImageSegmentation", fixture["config"], mapping, out)


@pytest.fixture(scope="module")
def converted(converted_dir):
    model, info = CLIPSegForImageSegmentation.from_pretrained(converted_dir, output_loading_info=True)
    return model.float().eval(), info


def test_converted_model_loads_without_missing_or_unexpected_keys(converted):
    _, info = converted
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info.get("error_msgs")


def test_converted_model_is_the_random_model_it_came_from(converted, random_model, inputs):
    model, _ = converted
    got, want = model.state_dict(), random_model.state_dict()
    assert got.keys() == want.keys()
    assert [key for key in want if not torch.equal(got[key], want[key])] == []
    differences = max_differences(outputs_of(model, inputs), outputs_of(random_model, inputs))
    assert all(d <= TOLERANCE for d in differences.values()), differences


def test_converted_model_computes_what_clipseg_computes(converted, inputs, expected):
    model, _ = converted
    differences = max_differences(outputs_of(model, inputs), expected)
    assert all(d <= TOLERANCE for d in differences.values()), differences


def test_written_weights_equal_the_seed_converter_bit_for_bit(converted_dir, fixture):
    written = load_file(converted_dir / "model.safetensors")
    raw = torch.load(fixture["source"], map_location="cpu", weights_only=True)
    reference = make_clipseg.seed_converter(raw, make_clipseg.target_config())
    # the seed loads with strict=False and expects exactly these two unexpected keys: the unused `reduce`
    assert reference.keys() - written.keys() == {"decoder.reduce.weight", "decoder.reduce.bias"}
    assert written.keys() <= reference.keys()
    assert [key for key in written if not torch.equal(written[key], reference[key])] == []


# ---------------------------------------------------------------------------- b. round trip


def test_reverse_mapping_gives_back_the_checkpoint_bit_exactly(mapping, source_tree, target):
    forward = convert_arrays(source_tree, target.tree, mapping)
    backward = mapping.reverse(source_tree.shapes())
    expansion = backward.expand(forward.keys(), source_tree.specs)
    assert expansion.complete, expansion.summary()
    # what the forward mapping drops is all the reverse cannot restore
    assert set(expansion.initialised) == {k for k in source_tree.specs if k.startswith("model.") or k.startswith("reduce.")}
    restored = {rule.target: np.asarray(apply_chain(rule.ops, [forward[s] for s in rule.sources])) for rule in expansion.rules}
    assert restored.keys() == set(source_tree.specs) - set(expansion.initialised)
    for key, array in restored.items():
        original = np.asarray(source_tree.read(key))
        assert array.dtype == original.dtype and array.shape == original.shape, key
        assert np.array_equal(array, original), key


# ---------------------------------------------------------------------------- c. mutants


def test_every_mapping_one_mistake_away_is_rejected(mapping, source_tree, target, inputs, expected):
    model = CLIPSegForImageSegmentation(make_clipseg.target_config()).eval()
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
