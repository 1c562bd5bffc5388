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

import pytest
import torch
from transformers import CLIPSegForImageSegmentation

from matcher.convert import convert_arrays
from matcher.mapping import Mapping
from tests.fixtures import make_clipseg
from tests.families.common import KNOWN, assert_loaded_cleanly, assert_outputs_match, assert_reverse_gives_back
from tests.families.common import assert_same_tensors, complete_expansion, family_fixtures, in_memory, model_check
from tests.families.common import mutant_survivors, openai_clip_inputs, written_weights
from tests.proof import mutants

fixture, mapping, source_tree, target, converted_dir = family_fixtures(
    make_clipseg.make, KNOWN / "clipseg.yaml", "CLIPSegForImageSegmentation"
)


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
    return openai_clip_inputs(fixture["clip_hparams"], fixture["eot_token"])


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
    expansion = complete_expansion(mapping, source_tree, target.tree)
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
def converted(converted_dir):
    model, info = CLIPSegForImageSegmentation.from_pretrained(converted_dir, output_loading_info=True)
    return model.float().eval(), info


def test_converted_model_loads_without_missing_or_unexpected_keys(converted):
    _, info = converted
    assert_loaded_cleanly(info)


def test_converted_model_is_the_random_model_it_came_from(converted, random_model, inputs):
    model, _ = converted
    assert_same_tensors(model.state_dict(), random_model.state_dict())
    assert_outputs_match(outputs_of(model, inputs), outputs_of(random_model, inputs))


def test_converted_model_computes_what_clipseg_computes(converted, inputs, expected):
    model, _ = converted
    assert_outputs_match(outputs_of(model, inputs), expected)


def test_written_weights_equal_the_seed_converter_bit_for_bit(converted_dir, fixture):
    written = written_weights(converted_dir)
    raw = torch.load(fixture["source"], map_location="cpu", weights_only=True)
    reference = make_clipseg.seed_converter(raw, make_clipseg.target_config())
    # the seed loads with strict=False and expects exactly these two unexpected keys: the unused `reduce`
    assert reference.keys() - written.keys() == {"decoder.reduce.weight", "decoder.reduce.bias"}
    assert written.keys() <= reference.keys()
    assert [key for key in written if not torch.equal(written[key], reference[key])] == []


# ---------------------------------------------------------------------------- b. round trip


def test_reverse_mapping_gives_back_the_checkpoint_bit_exactly(mapping, source_tree, target):
    expansion = assert_reverse_gives_back(mapping, source_tree, convert_arrays(source_tree, target.tree, mapping))
    # what the forward mapping drops is all the reverse cannot restore
    assert set(expansion.initialised) == {k for k in source_tree.specs if k.startswith("model.") or k.startswith("reduce.")}


# ---------------------------------------------------------------------------- c. mutants


def test_every_mapping_one_mistake_away_is_rejected(mapping, source_tree, target, inputs, expected):
    model = CLIPSegForImageSegmentation(make_clipseg.target_config()).eval()
    check = model_check(model, lambda m: outputs_of(m, inputs), expected)
    all_mutants = list(mutants(mapping))
    assert len(all_mutants) == len(mapping.rules) + 2  # every rule removed once; both projections' transposes flipped
    # the proof passes on the real mapping and fails on every mutant
    assert mutant_survivors(mapping, all_mutants, in_memory(source_tree), target.tree, check) == []
