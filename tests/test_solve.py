"""The matcher's parts: blocks, op-chain search, names, orientation, and scanned layers end to end."""

import re

import numpy as np
import pytest

from matcher.convert import convert_arrays
from matcher.ops import Chunk, MergeAxes, Select, Transpose
from matcher.solve import match_trees
from matcher.solve.blocks import find_blocks
from matcher.solve.chains import chains_between
from matcher.solve.names import describe_names, fused_parts
from matcher.tree import ParamTree, TensorSpec


def specs(shapes: dict) -> ParamTree:
    return ParamTree({k: TensorSpec(k, tuple(v), "float32") for k, v in shapes.items()})


def test_outermost_repeated_numbers_are_blocks_and_inner_ones_stay_leaves():
    tree = specs({
        **{f"enc/block_{i}/LayerNorm_{j}/scale": (8,) for i in range(3) for j in range(2)},
        **{f"enc/block_{i}/Dense_0/kernel": (8, 16) for i in range(3)},
        "head/Dense_0/kernel": (8, 4), "head/Dense_1/kernel": (4, 2),
    })
    units = find_blocks(tree)
    assert [(b.prefix, b.count) for b in units.blocks] == [("enc/block_{i}", 3)]
    assert set(units.blocks[0].leaves) == {"/LayerNorm_0/scale", "/LayerNorm_1/scale", "/Dense_0/kernel"}
    assert set(units.singles) == {"head/Dense_0/kernel", "head/Dense_1/kernel"}  # shapes differ: not a block


@pytest.mark.parametrize(
    "source, target, expected",
    [
        ((32, 4, 8), (32, 32), [[MergeAxes(1, 2)], [MergeAxes(1, 2), Transpose((1, 0))]]),  # flax q kernel: orientation open
        ((4, 8, 32), (32, 32), [[MergeAxes(0, 1)], [MergeAxes(0, 1), Transpose((1, 0))]]),  # flax out kernel
        ((4, 8), (32,), [[MergeAxes(0, 1)]]),  # attention bias
        ((16, 16, 3, 64), (64, 3, 16, 16), [[Transpose((3, 2, 0, 1))]]),  # conv HWIO -> OIHW, H stays before W
        ((1, 17, 32), (17, 32), [[MergeAxes(0, 1)]]),  # squeezing the leading 1 is a merge of it
        ((64, 32), (32, 64), [[Transpose((1, 0))]]),
        ((64, 32), (48, 32), []),
    ],
)
def test_chains_between_shapes_are_the_distinct_ways_to_read_a_tensor(source, target, expected):
    found = chains_between(source, target)
    probe = np.arange(int(np.prod(source))).reshape(source)
    from matcher.ops import apply_chain

    assert len(found) == len(expected)
    for chain, ops in zip(found, expected):
        assert np.array_equal(apply_chain(chain.ops, [probe]), apply_chain(ops, [probe]))


def test_sibling_numbers_become_order_whatever_they_start_at():
    source = describe_names(["LayerNorm_0/scale", "LayerNorm_1/scale"])
    target = describe_names(["layer_norm1.weight", "layer_norm2.weight", "layernorm_before.weight", "layernorm_after.weight"])
    assert source["LayerNorm_1/scale"].orders == target["layer_norm2.weight"].orders == target["layernorm_after.weight"].orders == (1,)
    assert "norm" in source["LayerNorm_0/scale"].tokens and "weight" in source["LayerNorm_0/scale"].tokens


def test_fused_tensors_are_recognised_by_name():
    assert fused_parts("blocks.3.attn.qkv.weight") == ("query", "key", "value")
    assert fused_parts("attn.in_proj_weight") == ("query", "key", "value")
    assert fused_parts("mlp.fc1.weight") is None


def flax_block(prefix: str, d: int = 8, heads: int = 2) -> dict:
    return {
        f"{prefix}/LayerNorm_0/scale": (d,), f"{prefix}/LayerNorm_0/bias": (d,),
        f"{prefix}/LayerNorm_1/scale": (d,), f"{prefix}/LayerNorm_1/bias": (d,),
        **{f"{prefix}/Attn/{n}/kernel": (d, heads, d // heads) for n in ("query", "key", "value")},
        **{f"{prefix}/Attn/{n}/bias": (heads, d // heads) for n in ("query", "key", "value")},
        f"{prefix}/Attn/out/kernel": (heads, d // heads, d), f"{prefix}/Attn/out/bias": (d,),
        f"{prefix}/MlpBlock_0/Dense_0/kernel": (d, 4 * d), f"{prefix}/MlpBlock_0/Dense_0/bias": (4 * d,),
        f"{prefix}/MlpBlock_0/Dense_1/kernel": (4 * d, d), f"{prefix}/MlpBlock_0/Dense_1/bias": (d,),
    }


def torch_layer(prefix: str, d: int = 8) -> dict:
    return {
        f"{prefix}.layer_norm1.weight": (d,), f"{prefix}.layer_norm1.bias": (d,),
        f"{prefix}.layer_norm2.weight": (d,), f"{prefix}.layer_norm2.bias": (d,),
        **{f"{prefix}.self_attn.{n}_proj.weight": (d, d) for n in "qkv"},
        **{f"{prefix}.self_attn.{n}_proj.bias": (d,) for n in "qkv"},
        f"{prefix}.self_attn.out_proj.weight": (d, d), f"{prefix}.self_attn.out_proj.bias": (d,),
        f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
        f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,),
    }


def test_square_kernels_take_the_orientation_the_non_square_ones_reveal():
    source = specs({k: v for i in range(2) for k, v in flax_block(f"enc/block_{i}").items()})
    target = specs({k: v for i in range(2) for k, v in torch_layer(f"layers.{i}").items()})
    report = match_trees(source, target)
    assert report.complete, (report.unresolved, report.unmatched_targets, report.unused_sources)
    assert report.conventions["kernel"] is True  # learned from the MLP kernels, whose shapes decide
    rules = {rule.target: rule for rule in report.mapping.rules}
    assert rules["layers.{i}.self_attn.q_proj.weight"].ops == (MergeAxes(1, 2), Transpose((1, 0)))
    assert rules["layers.{i}.self_attn.q_proj.weight"].sources == ("enc/block_{i}/Attn/query/kernel",)
    assert rules["layers.{i}.layer_norm2.weight"].sources == ("enc/block_{i}/LayerNorm_1/scale",)


def test_without_any_orientation_evidence_a_square_matrix_is_flagged():
    source = specs({f"blocks.{i}.{n}.kernel": (8, 8) for i in range(2) for n in ("query", "key", "value")})
    target = specs({f"layers.{i}.{n}_proj.weight": (8, 8) for i in range(2) for n in "qkv"})
    report = match_trees(source, target)
    assert not report.complete
    assert {u.target for u in report.unresolved} == {f"layers.{{i}}.{n}_proj.weight" for n in "qkv"}
    assert all("layout convention" in u.reason for u in report.unresolved)
    assert not report.decisions


def test_fused_qkv_is_split_by_chunks_in_q_k_v_order():
    source = specs({f"blocks.{i}.attn.qkv.weight": (24, 8) for i in range(2)} | {f"blocks.{i}.mlp.fc1.weight": (32, 8) for i in range(2)})
    target = specs({f"layers.{i}.attention.{n}_proj.weight": (8, 8) for i in range(2) for n in "qkv"} | {f"layers.{i}.mlp.fc1.weight": (32, 8) for i in range(2)})
    report = match_trees(source, target)
    assert report.complete
    rules = {rule.target: rule for rule in report.mapping.rules}
    for index, name in enumerate("qkv"):
        assert rules[f"layers.{{i}}.attention.{name}_proj.weight"].ops == (Chunk(axis=0, index=index, parts=3),)


def test_scanned_layers_are_unstacked_with_select():
    rng = np.random.default_rng(0)
    layers = [flax_block(f"enc/block_{i}") for i in range(3)]
    per_layer = [{k: rng.normal(size=v).astype(np.float32) for k, v in layer.items()} for layer in layers]
    stacked = {re.sub(r"block_\d+", "block", k): np.stack([per_layer[i][k.replace("block_0", f"block_{i}")] for i in range(3)]) for k in per_layer[0]}
    unstacked = {k: v for layer in per_layer for k, v in layer.items()}
    target = specs({k: v for i in range(3) for k, v in torch_layer(f"layers.{i}").items()})
    scanned_report = match_trees(ParamTree.from_arrays(stacked), target)
    plain_report = match_trees(ParamTree.from_arrays(unstacked), target)
    assert scanned_report.complete and plain_report.complete
    assert all(rule.ops[0] == Select(0, "{i}") for rule in scanned_report.mapping.rules)
    from_scanned = convert_arrays(ParamTree.from_arrays(stacked), target, scanned_report.mapping)
    from_plain = convert_arrays(ParamTree.from_arrays(unstacked), target, plain_report.mapping)
    assert from_scanned.keys() == from_plain.keys()
    for key in from_plain:
        assert np.array_equal(from_scanned[key], from_plain[key]), key


def test_containment_graph_carries_sizes_and_the_report_names_the_towers():
    from matcher.graph import containment_graph, subtree_params

    source = specs({k: v for i in range(2) for k, v in flax_block(f"params/img/enc/block_{i}").items()}
                   | {k: v for i in range(2) for k, v in flax_block(f"params/txt/enc/block_{i}", d=16).items()})
    target = specs({k: v for i in range(2) for k, v in torch_layer(f"vision.layers.{i}").items()}
                   | {k: v for i in range(2) for k, v in torch_layer(f"text.layers.{i}", d=16).items()})
    graph = containment_graph(source)
    assert subtree_params(graph, "params") == subtree_params(graph, "params/img") + subtree_params(graph, "params/txt")
    assert graph.nodes["params/img/enc/block_0/LayerNorm_0"]["tensors"] == 2  # scale and bias
    report = match_trees(source, target)
    assert report.complete
    towers = {t["source"]: t["target"] for t in report.towers if "layers" not in t}
    assert towers["params/img/enc"] == "vision" and towers["params/txt/enc"] == "text"
    assert "params" not in towers  # holds both towers: no single partner


def test_a_fitting_shape_with_unrelated_names_is_not_a_match():
    # a classifier head (10, 32) and a pooler dense (10, 32): same shape, nothing else in common
    source = specs({"head.weight": (10, 32), "head.bias": (10,), "norm.weight": (32,)})
    target = specs({"pooler.dense.weight": (10, 32), "pooler.dense.bias": (10,), "layernorm.weight": (32,)})
    report = match_trees(source, target)
    assert [rule.target for rule in report.mapping.rules] == ["layernorm.weight"]
    assert set(report.unused_sources) == {"head.weight", "head.bias"}
    assert set(report.unmatched_targets) == {"pooler.dense.weight", "pooler.dense.bias"}


def test_a_flax_scale_makes_its_module_a_norm_bias_included():
    source = specs({"backbone/merged_class_token/scale": (32,), "backbone/merged_class_token/bias": (32,)})
    target = specs({"layer_norm.weight": (32,), "layer_norm.bias": (32,)})
    report = match_trees(source, target)
    assert report.complete
    assert {r.target: r.sources[0] for r in report.mapping.rules} == {
        "layer_norm.weight": "backbone/merged_class_token/scale", "layer_norm.bias": "backbone/merged_class_token/bias"}
