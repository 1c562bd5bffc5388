"""Every op: reverse(apply(x)) == x over random shapes, output_shape predicts apply, numpy and torch agree."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matcher.errors import MappingError
from matcher.ops import (
    OPS, Chunk, Concat, MergeAxes, Select, SplitAxis, Squeeze, Stack, Transpose, Unsqueeze,
    apply_chain, op_from_dict, reverse_unary_chain,
)

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def arange(shape):
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


@st.composite
def unary_case(draw):
    shape = draw(shapes)
    ndim = len(shape)
    kind = draw(st.sampled_from(["transpose", "merge", "split", "squeeze", "unsqueeze"]))
    if kind == "transpose":
        return shape, Transpose(tuple(draw(st.permutations(range(ndim)))))
    if kind == "merge" and ndim >= 2:
        start = draw(st.integers(0, ndim - 2))
        return shape, MergeAxes(start, draw(st.integers(start + 1, ndim - 1)))
    if kind == "split":
        axis = draw(st.integers(0, ndim - 1))
        factor = draw(st.integers(1, 3))
        shape = shape[:axis] + (shape[axis] * factor,) + shape[axis + 1 :]
        return shape, SplitAxis(axis, (factor, -1))
    if kind == "squeeze":
        axis = draw(st.integers(0, ndim))
        return shape[:axis] + (1,) + shape[axis:], Squeeze(axis)
    return shape, Unsqueeze(draw(st.integers(0, ndim)))


@settings(max_examples=200, deadline=None)
@given(unary_case())
def test_reverse_of_apply_is_identity_for_unary_ops(case):
    shape, op = case
    x = arange(shape)
    y = op.apply(x)
    assert y.shape == op.output_shape(shape)
    assert np.array_equal(op.reverse(shape).apply(y), x)


@settings(max_examples=100, deadline=None)
@given(unary_case())
def test_numpy_and_torch_give_the_same_result(case):
    shape, op = case
    x = arange(shape)
    assert np.array_equal(op.apply(torch.from_numpy(x)).numpy(), op.apply(x))


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(2, 4), st.data())
def test_chunks_concatenated_give_back_the_whole(shape, parts, data):
    axis = data.draw(st.integers(0, len(shape) - 1))
    shape = shape[:axis] + (shape[axis] * parts,) + shape[axis + 1 :]
    x = arange(shape)
    pieces = [Chunk(axis=axis, index=k, parts=parts).apply(x) for k in range(parts)]
    assert np.array_equal(Concat(axis).apply(pieces), x)
    # and the concat's own inverse takes each piece back out
    for k, piece in enumerate(pieces):
        assert np.array_equal(Concat(axis).part_inverse(k, [p.shape for p in pieces]).apply(Concat(axis).apply(pieces)), piece)


def test_unequal_chunks_q_plus_kv():
    q, kv = arange((4, 3)), arange((8, 3)) + 100
    fused = Concat(0).apply([q, kv])
    sizes = [Concat(0).part_inverse(k, [q.shape, kv.shape]) for k in range(2)]
    assert sizes[1] == Chunk(axis=0, index=1, sizes=(4, 8))
    assert np.array_equal(sizes[0].apply(fused), q) and np.array_equal(sizes[1].apply(fused), kv)


def test_stack_and_select_are_inverse():
    layers = [arange((2, 3)) + 10 * k for k in range(4)]
    stacked = Stack(0).apply(layers)
    assert stacked.shape == (4, 2, 3)
    for k in range(4):
        assert np.array_equal(Select(0, "{i}").bind({"i": k}).apply(stacked), layers[k])


def test_attention_kernel_chain_matches_the_seed_converter():
    # big_vision: kernel (D, H, Dh) -> reshape(D, -1).T, as the SigLIP seed does
    kernel = np.random.default_rng(0).normal(size=(8, 2, 4))
    ops = [MergeAxes(1, 2), Transpose((1, 0))]
    assert np.array_equal(apply_chain(ops, [kernel]), kernel.reshape(8, -1).T)
    back = reverse_unary_chain(ops, kernel.shape)
    assert np.array_equal(apply_chain(back, [apply_chain(ops, [kernel])]), kernel)


def test_conv_hwio_to_oihw():
    kernel = arange((3, 3, 2, 5))  # H, W, I, O
    assert Transpose((3, 2, 0, 1)).apply(kernel).shape == (5, 2, 3, 3)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_registered_op_round_trips_through_its_dict_form(name):
    examples = {
        "transpose": Transpose((1, 0)), "merge_axes": MergeAxes(1, 2), "split_axis": SplitAxis(0, (2, -1)),
        "squeeze": Squeeze(0), "unsqueeze": Unsqueeze(0), "chunk": Chunk(axis=0, index=1, parts=3),
        "select": Select(0, "{i}"), "concat": Concat(0), "stack": Stack(1),
    }
    op = examples[name]
    assert op_from_dict(op.to_dict()) == op


@pytest.mark.parametrize(
    "data, message",
    [
        ({"transpose": [0, 0]}, "not a permutation"),
        ({"reshape": [1]}, "unknown op 'reshape'"),
        ({"chunk": {"axis": 0, "index": 3, "parts": 3}}, "out of range"),
        ({"merge_axes": {"start": 1, "end": 2, "size": 3}}, "unknown argument"),
        ({"concat": "zero"}, "one integer axis"),
    ],
)
def test_malformed_ops_are_rejected_with_a_reason(data, message):
    with pytest.raises(MappingError, match=message):
        op_from_dict(data)


def test_shape_mismatches_are_errors_not_silent_reshapes():
    with pytest.raises(MappingError, match="needs a 2-d array"):
        Transpose((1, 0)).apply(arange((2, 3, 4)))
    with pytest.raises(MappingError, match="not divisible"):
        Chunk(axis=0, index=0, parts=3).apply(arange((4, 2)))
    with pytest.raises(MappingError, match="not of size 1"):
        Squeeze(0).apply(arange((2, 3)))
