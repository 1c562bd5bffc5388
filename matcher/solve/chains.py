"""Which op chains turn a source shape into a target shape.

A small search over the op algebra: squeeze size-1 axes, merge adjacent axes, transpose
a 2-d matrix, permute a 4-d kernel. Chains that compute the same function are collapsed
(decided by applying them to a tiny array of distinct values), so what is left are the
genuinely different ways to read the source — one for most pairs, two for a square matrix
(as is, or transposed), which orientation conventions then decide.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from ..ops import MergeAxes, Op, Squeeze, Transpose, apply_chain, chain_output_shape

Shape = tuple[int, ...]
MAX_STEPS = 3


@dataclass(frozen=True)
class Chain:
    ops: tuple[Op, ...]
    transposed: bool  # reads the source's matrix the other way round (flax kernel -> torch weight)

    def __str__(self) -> str:
        return " | ".join(map(str, self.ops)) or "rename"


def _moves(shape: Shape):
    ndim = len(shape)
    for axis, size in enumerate(shape):
        if size == 1 and ndim > 1:
            yield Squeeze(axis)
    for start in range(ndim - 1):
        for end in range(start + 1, ndim):
            yield MergeAxes(start, end)
    if ndim == 2:
        yield Transpose((1, 0))
    if ndim == 4:
        for perm in itertools.permutations(range(4)):
            if perm != (0, 1, 2, 3):
                yield Transpose(perm)


_SMALL_SIZES = (2, 3, 5, 7, 11, 13, 17, 19)


def _probe(shape: Shape) -> np.ndarray:
    """Distinct values in a stand-in of ``shape`` whose axes have small distinct sizes.

    The chains searched here (squeeze, merge, permute) act on axes, never on sizes, so the
    element permutation a chain computes is the same on the stand-in: two chains compute
    the same function iff they agree on it. This keeps the probe tiny at any real size.
    """
    small = tuple(1 if size == 1 else _SMALL_SIZES[axis % len(_SMALL_SIZES)] for axis, size in enumerate(shape))
    return np.arange(int(np.prod(small)), dtype=np.int64).reshape(small)


def _is_transposed(ops: tuple[Op, ...]) -> bool:
    return any(isinstance(op, Transpose) and (len(op.perm) == 2 or op.perm[:2] != (0, 1)) for op in ops)


@functools.lru_cache(maxsize=65536)
def chains_between(source: Shape, target: Shape) -> tuple[Chain, ...]:
    """Distinct chains (up to MAX_STEPS ops) from ``source`` to ``target``, simplest first."""
    if int(np.prod(source)) != int(np.prod(target)):
        return ()
    found: dict[bytes, tuple[Op, ...]] = {}
    frontier: list[tuple[Shape, tuple[Op, ...]]] = [(tuple(source), ())]
    probe = _probe(tuple(source))
    for depth in range(MAX_STEPS + 1):
        next_frontier = []
        for shape, ops in frontier:
            if shape == tuple(target):
                result = apply_chain(ops, [probe])
                found.setdefault(repr(result.shape).encode() + result.tobytes(), ops)
            if depth == MAX_STEPS:
                continue
            for move in _moves(shape):
                if ops and _redundant(ops[-1], move):
                    continue
                try:
                    next_shape = move.output_shape(shape)
                except Exception:  # noqa: BLE001 - a move that does not apply to this shape
                    continue
                next_frontier.append((next_shape, ops + (move,)))
        frontier = next_frontier
    chains = [Chain(ops, _is_transposed(ops)) for ops in found.values()]
    return tuple(sorted(_stable(chains, tuple(source)), key=lambda c: (len(c.ops), c.transposed)))


def _equal_size_inversions(chain: Chain, shape: Shape) -> int:
    """How many pairs of equal-sized axes a chain's permutations put out of order
    (H and W of a conv kernel swapped); 2-d transposes are orientation, not counted."""
    count = 0
    for op in chain.ops:
        if isinstance(op, Transpose) and len(op.perm) > 2:
            for a, b in itertools.combinations(range(len(op.perm)), 2):
                src_a, src_b = op.perm[a], op.perm[b]
                if shape[src_a] == shape[src_b] and src_a > src_b:
                    count += 1
        shape = op.output_shape(shape)
    return count


def _stable(chains: list[Chain], shape: Shape) -> list[Chain]:
    """Of chains that differ only by reordering equal-sized axes (a spatial H/W swap),
    keep the order-preserving ones: formats agree on H before W."""
    kept = []
    for transposed in (False, True):
        group = [c for c in chains if c.transposed == transposed]
        if group:
            best = min(_equal_size_inversions(c, shape) for c in group)
            kept += [c for c in group if _equal_size_inversions(c, shape) == best]
    return kept


def _redundant(previous: Op, move: Op) -> bool:
    # A 2-d transpose reorients the final matrix, so it comes last; two permutations in a
    # row are one permutation.
    return isinstance(previous, Transpose) and (len(previous.perm) == 2 or isinstance(move, Transpose))


def chain_shape(chain: Chain, source: Shape) -> Shape:
    return chain_output_shape(chain.ops, [source])
