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


def _probe(shape: Shape, dims: int = 0) -> np.ndarray:
    """An array of distinct values; sizes are capped so huge shapes stay cheap (the
    function a chain computes depends on the axis structure, not on the sizes)."""
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)


def _is_transposed(ops: tuple[Op, ...]) -> bool:
    return any(isinstance(op, Transpose) and (len(op.perm) == 2 or op.perm[:2] != (0, 1)) for op in ops)


@functools.lru_cache(maxsize=65536)
def chains_between(source: Shape, target: Shape) -> tuple[Chain, ...]:
    """Distinct chains (up to MAX_STEPS ops) from ``source`` to ``target``, simplest first."""
    if int(np.prod(source)) != int(np.prod(target)):
        return ()
    # Search on small stand-in shapes with the same equalities, so the result does not
    # depend on the absolute sizes and the probe arrays stay tiny.
    small_source, small_target = _stand_ins(source, target)
    found: dict[bytes, tuple[Op, ...]] = {}
    frontier: list[tuple[Shape, tuple[Op, ...]]] = [(small_source, ())]
    probe = _probe(small_source)
    for depth in range(MAX_STEPS + 1):
        next_frontier = []
        for shape, ops in frontier:
            if shape == small_target:
                key = apply_chain(ops, [probe]).tobytes()
                found.setdefault(key, ops)
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
    return tuple(sorted(_stable(chains, small_source), key=lambda c: (len(c.ops), c.transposed)))


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


def _stand_ins(source: Shape, target: Shape) -> tuple[Shape, Shape]:
    """Replace sizes by small primes-based stand-ins preserving which products are equal.

    Exact sizes matter only through the factorisation structure; for the shapes of
    neural network tensors, mapping each distinct size to a distinct small number while
    keeping products consistent is done by keeping sizes when small, else solving on the
    real sizes (falls back to the real shapes)."""
    if int(np.prod(source)) <= 4096:
        return source, target
    sizes = sorted(set(source) | set(target))
    small = {size: size for size in sizes}
    # Try shrinking every size by its gcd with the others only when products still agree.
    for size in sizes:
        for candidate in (2, 3, 5, 7, 11, 13):
            trial = dict(small)
            trial[size] = candidate
            if _products_agree(source, target, small, trial):
                small = trial
                break
    s, t = tuple(small[d] for d in source), tuple(small[d] for d in target)
    if int(np.prod(s)) != int(np.prod(t)) or int(np.prod(s)) > 1 << 16:
        return source, target
    return s, t


def _products_agree(source: Shape, target: Shape, before: dict, after: dict) -> bool:
    """A substitution is safe if every size it changes appears the same number of times on
    both sides and is not itself a product of other sizes present."""
    changed = [d for d in before if before[d] != after[d]]
    for size in changed:
        if source.count(size) != target.count(size):
            return False
    values = [after[d] for d in set(source) | set(target)]
    return len(set(values)) == len(values)


def chain_shape(chain: Chain, source: Shape) -> Shape:
    return chain_output_shape(chain.ops, [source])
