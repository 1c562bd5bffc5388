"""known_mappings/owlvit.yaml: an OWL-ViT v1 scenic flax checkpoint -> transformers OwlViTForObjectDetection.

Scenic does not install here, so the fixture checkpoint is made from a random OwlViTForObjectDetection
through the reverse of the mapping, and its layout is pinned against a table written from the scenic
modules (tests/fixtures/make_owlvit.py). The proof converts that file, compares the detection outputs
and the weights with the model it came from, checks the weights against a port of the seed converter
(which stages the CLIP backbone in an OpenAI torch CLIP, as the seed does), inverts the mapping back to
the checkpoint bit-exactly, and rejects every mapping one mistake away.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import OwlViTForObjectDetection, OwlViTModel

from matcher.convert import convert_arrays
from matcher.ops import Transpose
from tests.fixtures import make_owlvit
from tests.families.common import KNOWN, assert_loaded_cleanly, assert_outputs_match, assert_reverse_gives_back
from tests.families.common import assert_same_tensors, complete_expansion, family_fixtures, in_memory, model_check
from tests.families.common import mutant_survivors, written_weights
from tests.proof import mutants

PREFIX = make_owlvit.PREFIX
NO_SOURCE = {"owlvit.visual_projection.weight"}  # declared `initialised`: the checkpoint has no visual/proj
OUTPUTS = ("logits", "pred_boxes", "image_embeds", "text_embeds", "class_embeds")

fixture, mapping, source_tree, target, converted_dir = family_fixtures(
    make_owlvit.make, KNOWN / "owlvit.yaml", "OwlViTForObjectDetection"
)


@pytest.fixture(scope="module")
def original(fixture):
    """The random transformers model the checkpoint was made from."""
    return fixture["build_model"]()


@pytest.fixture(scope="module")
def inputs(fixture):
    """Two images with three text queries each; queries of different lengths, zero-padded after EOS."""
    generator = torch.Generator().manual_seed(0)
    size, length, eos = fixture["image_size"], fixture["context_length"], fixture["eos_id"]
    images = torch.randn(2, 3, size, size, generator=generator)
    ids = torch.randint(1, eos - 1, (6, length), generator=generator)
    for row, end in enumerate([5, 9, 15, 3, 12, 7]):
        ids[row, end] = eos
        ids[row, end + 1 :] = 0
    return images, ids, (ids != 0).long()


def outputs_of(model: OwlViTForObjectDetection, inputs) -> dict[str, torch.Tensor]:
    images, ids, mask = inputs
    with torch.no_grad():
        result = model(input_ids=ids, pixel_values=images, attention_mask=mask)
    return {name: getattr(result, name) for name in OUTPUTS}


@pytest.fixture(scope="module")
def expected(original, inputs):
    return outputs_of(original, inputs)


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        flat.update(flatten(value, path) if isinstance(value, dict) else {path: value})
    return flat


def restore_like_the_seed(path) -> dict:
    """The seed's `checkpoints.restore_checkpoint(path, target=None)["optimizer"]["target"]`."""
    from flax.training import checkpoints

    variables = checkpoints.restore_checkpoint(str(path), target=None)["optimizer"]["target"]
    # the seed casts bfloat16 leaves to float32 here; the fixture is float32, so only make them writable
    return _map_leaves(variables, np.array)


def _map_leaves(tree: dict, fn) -> dict:
    return {k: _map_leaves(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def seed_converter(flax_params: dict, config) -> dict[str, torch.Tensor]:
    """The seed's convert_owlvit_original_flax_to_hf.py, ported (minus the hub repo and processor):
    the flax CLIP is staged into an OpenAI torch CLIP, attention q/k/v/out are copied separately, then
    the merged-class-token LayerNorm and the heads. Returns the reference state dict."""
    from clip.model import CLIP

    text, vision = config.text_config, config.vision_config
    torch_config = dict(
        embed_dim=config.projection_dim,
        image_resolution=vision.image_size,
        vision_layers=vision.num_hidden_layers,
        vision_width=vision.hidden_size,
        vision_patch_size=vision.patch_size,
        context_length=text.max_position_embeddings,
        vocab_size=text.vocab_size,
        transformer_width=text.hidden_size,
        transformer_heads=text.num_attention_heads,
        transformer_layers=text.num_hidden_layers,
    )

    # convert_clip_backbone
    torch_model = CLIP(**torch_config).eval()
    torch_clip_params = torch_model.state_dict()
    new_torch_params = {}
    for flax_key, v in flatten(flax_params["backbone"]["clip"]).items():
        torch_key = flax_key.replace("/", ".")
        torch_key = torch_key.replace("text.token_embedding.embedding", "token_embedding.kernel")
        if torch_key.startswith(("text.transformer", "text.text_projection", "text.ln_final", "text.positional_embedding")):
            torch_key = torch_key[5:]
        torch_key = torch_key.replace("text_projection.kernel", "text_projection")
        torch_key = torch_key.replace("visual.proj.kernel", "visual.proj")
        torch_key = torch_key.replace(".scale", ".weight")
        torch_key = torch_key.replace(".kernel", ".weight")
        if "conv" in torch_key or "downsample.0.weight" in torch_key:
            v = v.transpose(3, 2, 0, 1)
        elif "weight" in torch_key and v.ndim == 2 and "embedding" not in torch_key:
            v = v.T
        new_torch_params[torch_key] = v
    converted, done = {}, []
    for k, v in new_torch_params.items():  # _convert_attn_layers
        if "attn." in k:
            base = k[: k.rindex("attn.") + 5]
            if base in done:
                continue
            done.append(base)
            dim = new_torch_params[base + "out.weight"].shape[-1]
            converted[base + "out_proj.weight"] = new_torch_params[base + "out.weight"].reshape(dim, dim).T
            converted[base + "out_proj.bias"] = new_torch_params[base + "out.bias"]
        else:
            converted[k] = v
    new_torch_params.update(converted)
    attn_params = {}
    with torch.no_grad():
        for name, param in new_torch_params.items():
            if name in torch_clip_params:
                torch_clip_params[name].copy_(torch.from_numpy(param))
            else:
                attn_params[name] = param

    # convert_owlvit_checkpoint
    hf_backbone = OwlViTModel(config).eval()
    hf_model = OwlViTForObjectDetection(config).eval()

    def copy_linear(hf_linear, pt_linear):
        hf_linear.weight = pt_linear.weight
        hf_linear.bias = pt_linear.bias

    def copy_layers(hf_layers, pt_layers):
        for hf_layer, pt_layer in zip(hf_layers, pt_layers):
            copy_linear(hf_layer.layer_norm1, pt_layer.ln_1)
            copy_linear(hf_layer.layer_norm2, pt_layer.ln_2)
            copy_linear(hf_layer.mlp.fc1, pt_layer.mlp.c_fc)
            copy_linear(hf_layer.mlp.fc2, pt_layer.mlp.c_proj)
            attn, pt_attn = hf_layer.self_attn, pt_layer.attn  # copy_attn_layer: from the staging CLIP
            q, k, v = pt_attn.in_proj_weight.chunk(3, dim=0)
            qb, kb, vb = pt_attn.in_proj_bias.chunk(3, dim=0)
            attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data = q, k, v
            attn.q_proj.bias.data, attn.k_proj.bias.data, attn.v_proj.bias.data = qb, kb, vb
            attn.out_proj.weight = pt_attn.out_proj.weight
            attn.out_proj.bias = pt_attn.out_proj.bias

    pt = torch_model
    hf_backbone.text_projection.weight.data = pt.text_projection.data.T
    hf_backbone.text_model.embeddings.token_embedding.weight = pt.token_embedding.weight
    hf_backbone.text_model.embeddings.position_embedding.weight.data = pt.positional_embedding
    copy_linear(hf_backbone.text_model.final_layer_norm, pt.ln_final)
    copy_layers(hf_backbone.text_model.encoder.layers, pt.transformer.resblocks)
    hf_backbone.visual_projection.weight.data = pt.visual.proj.data.T
    copy_linear(hf_backbone.vision_model.pre_layernorm, pt.visual.ln_pre)
    copy_linear(hf_backbone.vision_model.post_layernorm, pt.visual.ln_post)
    hf_backbone.vision_model.embeddings.patch_embedding.weight.data = pt.visual.conv1.weight.data
    hf_backbone.vision_model.embeddings.class_embedding = pt.visual.class_embedding
    hf_backbone.vision_model.embeddings.position_embedding.weight.data = pt.visual.positional_embedding.data
    copy_layers(hf_backbone.vision_model.encoder.layers, pt.visual.transformer.resblocks)
    hf_backbone.logit_scale = pt.logit_scale

    with torch.no_grad():  # copy_flax_attn_params: the real q/k/v/out, over the staging CLIP's
        for k, v in attn_params.items():
            if k.startswith("transformer"):
                torch_key = k.replace("transformer.resblocks", "text_model.encoder.layers")
            else:
                torch_key = k.replace("visual.transformer.resblocks", "vision_model.encoder.layers")
            torch_key = torch_key.replace("attn", "self_attn").replace("key", "k_proj").replace("value", "v_proj")
            torch_key = torch_key.replace("query", "q_proj").replace("out", "out_proj")
            if "bias" in torch_key and v.ndim == 2:
                v = v.reshape(v.shape[0] * v.shape[1])
            if "weight" in torch_key and "out" in torch_key:
                v = v.reshape(v.shape[0] * v.shape[1], v.shape[2]).T
            if "weight" in torch_key and "out" not in torch_key:
                v = v.reshape(v.shape[0], v.shape[1] * v.shape[2]).T
            hf_backbone.state_dict()[torch_key].copy_(torch.from_numpy(v))

    hf_model.owlvit = hf_backbone
    merged = flatten(flax_params["backbone"]["merged_class_token"])  # copy_class_merge_token
    hf_model.layer_norm.weight = torch.nn.Parameter(torch.from_numpy(merged["scale"]))
    hf_model.layer_norm.bias = torch.nn.Parameter(torch.from_numpy(merged["bias"]))

    pt_params = hf_model.state_dict()  # copy_class_box_heads: names not in the model are skipped silently
    new_params = {}
    for head, prefix, fix in (
        ("class_head", "class_head.", lambda key: key.replace("Dense_0", "dense0")),
        ("obj_box_head", "box_head.", lambda key: key.replace("_", "").lower()),
    ):
        for flax_key, v in flatten(flax_params[head]).items():
            torch_key = prefix + fix(flax_key.replace("/", ".").replace(".kernel", ".weight"))
            if "weight" in torch_key and v.ndim == 2:
                v = v.T
            new_params[torch_key] = torch.from_numpy(v)
    with torch.no_grad():
        for name, param in new_params.items():
            if name in pt_params:
                pt_params[name].copy_(param)
    return hf_model.state_dict()


# ---------------------------------------------------------------------------- the file


def test_fixture_is_a_pre_optax_scenic_train_state_the_seed_can_restore(fixture, source_tree):
    params = restore_like_the_seed(fixture["source"])
    assert set(params) == {"backbone", "class_head", "obj_box_head"}
    assert set(params["backbone"]) == {"clip", "merged_class_token"}
    # matcher's reader sees the same parameters, under optimizer/target/, plus the optimizer state
    from_seed = {PREFIX + key: value for key, value in flatten(params).items()}
    assert {key for key in source_tree.specs if key.startswith(PREFIX)} == set(from_seed)
    assert all(np.array_equal(source_tree.read(key), value) for key, value in from_seed.items())
    others = {key for key in source_tree.specs if not key.startswith(PREFIX)}
    assert others == {"optimizer/state/step"} | {
        f"optimizer/state/param_states/{key[len(PREFIX):]}/{moment}" for key in from_seed for moment in ("grad_ema", "grad_sq_ema")
    }


def test_fixture_has_the_scenic_module_layout(source_tree):
    """Names and shapes exactly as the scenic CLIP / OWL-ViT modules create them (independent of the mapping)."""
    params = {key: spec.shape for key, spec in source_tree.specs.items() if key.startswith(PREFIX)}
    assert params == make_owlvit.scenic_param_shapes()
    assert all(source_tree.specs[key].dtype == "float32" for key in params)


def test_mapping_covers_the_checkpoint_and_the_model_exactly(mapping, source_tree, target):
    expansion = complete_expansion(mapping, source_tree, target.tree)
    assert set(expansion.initialised) == NO_SOURCE
    unused_params = {key for key in expansion.dropped if key.startswith(PREFIX)}
    assert unused_params == {PREFIX + "class_head/padding", PREFIX + "class_head/padding_bias"}
    assert all(key.startswith("optimizer/state/") for key in set(expansion.dropped) - unused_params)


# ---------------------------------------------------------------------------- a. conversion


def test_converted_model_loads_with_only_the_declared_initialised_key_missing(converted_dir):
    _, info = OwlViTForObjectDetection.from_pretrained(converted_dir, output_loading_info=True)
    assert_loaded_cleanly(info, allowed_missing=NO_SOURCE)


def test_converted_model_detects_what_the_original_model_detects(converted_dir, inputs, expected):
    model = OwlViTForObjectDetection.from_pretrained(converted_dir).float().eval()
    assert_outputs_match(outputs_of(model, inputs), expected)


def test_written_weights_equal_the_original_model_bit_for_bit(converted_dir, original):
    reference = original.state_dict()
    assert NO_SOURCE <= reference.keys()
    assert_same_tensors(written_weights(converted_dir), {k: v for k, v in reference.items() if k not in NO_SOURCE})


def test_written_weights_equal_the_seed_converter_bit_for_bit(converted_dir, fixture):
    reference = seed_converter(restore_like_the_seed(fixture["source"]), make_owlvit.target_config())
    assert NO_SOURCE <= reference.keys()
    assert_same_tensors(written_weights(converted_dir), {k: v for k, v in reference.items() if k not in NO_SOURCE})


# ---------------------------------------------------------------------------- b. round trip


def test_reverse_mapping_gives_back_the_checkpoint_bit_exactly(mapping, source_tree, target):
    # everything but what the mapping drops (the padding leftovers and the optimizer state) comes back
    assert_reverse_gives_back(mapping, source_tree, convert_arrays(source_tree, target.tree, mapping))


# ---------------------------------------------------------------------------- c. mutants


def test_every_mapping_one_mistake_away_is_rejected(mapping, source_tree, target, inputs, expected):
    model = OwlViTForObjectDetection(make_owlvit.target_config()).eval()
    check = model_check(model, lambda m: outputs_of(m, inputs), expected, allowed_missing=NO_SOURCE)
    all_mutants = list(mutants(mapping))
    transposes = sum(isinstance(op, Transpose) for rule in mapping.rules for op in rule.ops)
    assert transposes == 18
    assert len(all_mutants) == len(mapping.rules) + transposes  # every rule removed once; every transpose flipped
    # the proof passes on the real mapping and fails on every mutant
    assert mutant_survivors(mapping, all_mutants, in_memory(source_tree), target.tree, check) == []
