"""Trace a converted tensor to the source tensor(s) and op chain that reproduce it bit-exactly.

Three shapes of explanation, tried in this order, each found through a fingerprint and
then confirmed by running the ops and comparing every bit:

- whole: one source under a unary chain (rename, transpose, conv permutation, merged or
  split head axes, squeeze) — candidates are the sources with the target's sorted-value digest;
- part: a chunk or a select of one source, then a unary chain (a fused qkv cut into q, k, v;
  one layer of a scanned stack) — candidates are the larger sources holding a sample of the
  target's values, cut where the target's values lie;
- combined: several sources, each under the same unary chain, concatenated or stacked along
  a target axis (q, k, v -> in_proj) — the walk along the axis finds, at each offset, the
  source that holds the value there and checks that it fills the next slice exactly.

A target every one of whose values is equal (a fresh bias) is only matched whole: any
region of any source holding that value would "explain" it.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import MappingError
from ..ops import Chunk, Concat, Op, Select, Squeeze, Stack, Transpose, Unsqueeze, apply_chain, chain_output_shape, reverse_unary_chain
from ..solve.chains import chains_between
from .fingerprints import cast_note, digest, keys, to_numpy, value_kind

Shape = tuple[int, ...]
MAX_OWNERS = 16  # sources holding a probe value that are worth cutting
PROBES = 8  # distinct values of a target looked up in the sources before cutting any
MAX_CUTS = 64  # chunk/select positions tried per source axis
MAX_COMBINATIONS = 16  # explanations listed when several pieces have identical candidates
PROBE_LIMIT = 1 << 22  # chains on larger shapes are told apart by their spelling only


@dataclass(frozen=True)
class Explanation:
    """``target == cast(apply_chain(ops, sources))``, bit for bit."""

    sources: tuple[str, ...]
    ops: tuple[Op, ...]
    cast: tuple[str, str, bool] | None = None  # (from dtype, to dtype, values changed)

    @property
    def chain(self) -> str:
        return " | ".join(map(str, self.ops)) or "rename"

    def describe(self) -> str:
        text = f"{self.chain} <- {', '.join(self.sources)}"
        if self.cast:
            source, target, lossy = self.cast
            text += f" [cast {source} -> {target}{', precision lost' if lossy else ''}]"
        return text

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"sources": list(self.sources), "ops": [op.to_dict() for op in self.ops], "transform": self.chain}
        if self.cast:
            data["cast"] = {"from": self.cast[0], "to": self.cast[1], "precision_lost": self.cast[2]}
        return data


@dataclass
class Trace:
    target: str
    explanations: list[Explanation] = field(default_factory=list)
    reason: str = ""  # why nothing reproduces it
    agreeing: int | None = None  # index of the explanation that computes what the expected one computes
    found_by: str = "values"  # or "the reference...": its rule was confirmed bit for bit, not found by the search

    @property
    def traced(self) -> bool:
        return bool(self.explanations)

    @property
    def ambiguous(self) -> bool:
        return len(self.explanations) > 1

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(s for e in self.explanations for s in e.sources))

    def describe(self) -> str:
        if not self.explanations:
            return f"nothing ({self.reason})" if self.reason else "nothing"
        if len(self.explanations) == 1:
            return self.explanations[0].describe()
        count, first = len(self.explanations), self.explanations[0]
        if all(len(e.sources) == 1 and e.ops == first.ops for e in self.explanations):
            names = ", ".join(e.sources[0] for e in self.explanations[:4]) + (f", ... {count - 4} more" if count > 4 else "")
            return f"{first.chain} <- any of {count} identical sources: {names}"
        shown = "; ".join(e.describe() for e in self.explanations[:4]) + (f"; ... {count - 4} more" if count > 4 else "")
        return f"any of {count} readings the values cannot tell apart: {shown}"


# ---------------------------------------------------------------------- unary chains


@functools.lru_cache(maxsize=4096)
def unary_chains(source: Shape, target: Shape) -> tuple[tuple[Op, ...], ...]:
    """Distinct layout chains from ``source`` to ``target``, simplest first: the matcher's
    chains, the inverses of the chains from ``target`` back (split axes, unsqueeze), and any
    permutation of a 3-d or 4-d source's axes first (heads and head dims swapped, H and W of a
    conv kernel swapped) — so a wrong layout is named, not just found wanting."""
    if math.prod(source) != math.prod(target):
        return ()
    candidates: list[tuple[Op, ...]] = [c.ops for c in chains_between(source, target)]
    candidates += [tuple(reverse_unary_chain(c.ops, target)) for c in chains_between(target, source)]
    if len(source) in (3, 4):
        for perm in itertools.permutations(range(len(source))):
            if list(perm) == sorted(perm):
                continue
            moved = tuple(source[p] for p in perm)
            if len(source) == 4:
                candidates += [(Transpose(perm),)] if moved == target else []
            else:
                candidates += [(Transpose(perm),) + c.ops for c in chains_between(moved, target)]
    if math.prod(source) == 1 and source != target:
        candidates.append(_scalar_reshape(source, target))
    return _distinct(candidates, source, target)


def _scalar_reshape(source: Shape, target: Shape) -> tuple[Op, ...]:
    return tuple(Squeeze(0) for _ in source) + tuple(Unsqueeze(0) for _ in target)


def _distinct(candidates: list[tuple[Op, ...]], source: Shape, target: Shape) -> tuple[tuple[Op, ...], ...]:
    size = math.prod(source)
    probe = np.arange(size, dtype=np.int64).reshape(source) if size <= PROBE_LIMIT else None
    seen: dict[Any, tuple[Op, ...]] = {}
    for ops in sorted(dict.fromkeys(candidates), key=len):
        try:
            if chain_output_shape(ops, [source]) != tuple(target):
                continue
            function = apply_chain(ops, [probe]).tobytes() if probe is not None else ops
        except (MappingError, ValueError):
            continue
        seen.setdefault(function, ops)
    return tuple(seen.values())


def reproduces(ops: Sequence[Op], arrays: Sequence[np.ndarray], target: np.ndarray) -> bool:
    try:
        result = apply_chain(ops, list(arrays))
    except (MappingError, ValueError):
        return False
    return tuple(result.shape) == tuple(target.shape) and np.array_equal(result, target)


# ---------------------------------------------------------------------- the tracer


class Tracer:
    """Traces target arrays against a fixed set of source arrays (fingerprints cached per dtype).

    With ``search_always`` every target is searched for, and the expected explanation (the
    reference's rule) is only compared with what the values give; without it, a target the
    expected explanation reproduces is confirmed by that alone (plus whatever identical
    copies of its sources reproduce it too), and only the others are searched for — the
    same verdicts, without searching a large checkpoint for what its reference already explains.
    """

    def __init__(self, sources: Mapping[str, Any], search_always: bool = True):
        self.arrays = {name: to_numpy(a) for name, a in sources.items()}
        self.arrays = {name: a for name, a in self.arrays.items() if value_kind(a.dtype)}
        self.search_always = search_always
        self._keys: dict[tuple[str, str], np.ndarray] = {}
        self._digests: dict[tuple[str, str], str] = {}
        self._by_digest: dict[str, dict[tuple[int, str], list[str]]] = {}

    # ---- fingerprints of the sources, in the dtype of the target being traced

    def _comparable(self, dtype: np.dtype) -> list[str]:
        kind = value_kind(dtype)
        return [name for name, a in self.arrays.items() if value_kind(a.dtype) == kind]

    def source_keys(self, name: str, dtype: np.dtype) -> np.ndarray:
        slot = (name, np.dtype(dtype).str)
        if slot not in self._keys:
            self._keys[slot] = keys(self.arrays[name], dtype)
        return self._keys[slot]

    def source_digest(self, name: str, dtype: np.dtype) -> str:
        slot = (name, np.dtype(dtype).str)
        if slot not in self._digests:
            self._digests[slot] = digest(self.source_keys(name, dtype))
        return self._digests[slot]

    def _digest_index(self, dtype: np.dtype) -> dict[tuple[int, str], list[str]]:
        slot = np.dtype(dtype).str
        if slot not in self._by_digest:
            index: dict[tuple[int, str], list[str]] = {}
            for name in self._comparable(dtype):
                index.setdefault((self.arrays[name].size, self.source_digest(name, dtype)), []).append(name)
            self._by_digest[slot] = index
        return self._by_digest[slot]

    # ---- comparing explanations

    def positions(self, explanation: Explanation) -> np.ndarray:
        """The explanation applied to the element indices of its sources (one index space for all)."""
        shapes = [self.arrays[s].shape for s in explanation.sources]
        offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
        probes = [np.arange(offsets[k], offsets[k + 1], dtype=np.int64).reshape(shape) for k, shape in enumerate(shapes)]
        return np.asarray(apply_chain(explanation.ops, probes))

    def same(self, a: Explanation, b: Explanation) -> bool:
        """Same sources, and ops that read the same elements into the same places (however spelled)."""
        if a.sources != b.sources:
            return False
        if a.ops == b.ops:
            return True
        try:
            return np.array_equal(self.positions(a), self.positions(b))
        except (MappingError, ValueError):
            return False

    def holds(self, explanation: Explanation, target: np.ndarray, dtype: np.dtype) -> bool:
        """Does ``explanation`` reproduce the target keys bit for bit (sources cast to ``dtype``)?"""
        kind = value_kind(dtype)
        if not all(s in self.arrays and value_kind(self.arrays[s].dtype) == kind for s in explanation.sources):
            return False
        return reproduces(explanation.ops, [self.source_keys(s, dtype) for s in explanation.sources], target)

    # ---- tracing

    def trace(self, name: str, array: Any, expected: Explanation | None = None) -> Trace:
        array = to_numpy(array)
        if not value_kind(array.dtype):
            return Trace(name, [], f"dtype {array.dtype} holds no comparable values")
        dtype = array.dtype
        target = keys(array, dtype)
        holds = expected is not None and self.holds(expected, target, dtype)
        if holds and not self.search_always:
            found = self._alternatives(expected, target, dtype)
            return Trace(name, self._with_casts(found, dtype), agreeing=0, found_by="the reference")
        found, reason = self._search(target, dtype)
        agreeing, found_by = None, "values"
        if holds:
            agreeing = next((k for k, e in enumerate(found) if self.same(e, expected)), None)
            if agreeing is None:  # a chain the search does not try, or one more reading of equal values
                found.insert(0, expected)
                agreeing, found_by = 0, "the reference" if not found[1:] else "the reference, among readings of equal values"
        return Trace(name, self._with_casts(found, dtype), reason if not found else "", agreeing, found_by)

    def _alternatives(self, expected: Explanation, target: np.ndarray, dtype: np.dtype) -> list[Explanation]:
        """The expected explanation, the same ops on identical copies of its sources, and any whole
        source that reproduces the target too: what the values cannot tell from the expected one."""
        found = [expected]
        index = self._digest_index(dtype)
        for k, source in enumerate(expected.sources):
            for copy in index.get((self.arrays[source].size, self.source_digest(source, dtype)), []):
                candidate = Explanation(expected.sources[:k] + (copy,) + expected.sources[k + 1 :], expected.ops)
                if copy != source and self.holds(candidate, target, dtype):
                    found.append(candidate)
        for e in self._whole(target, dtype, index.get((target.size, digest(target)), [])):
            if not any(self.same(e, f) for f in found):
                found.append(e)
        return found

    def _search(self, target: np.ndarray, dtype: np.dtype) -> tuple[list[Explanation], str]:
        whole = self._whole(target, dtype, self._digest_index(dtype).get((target.size, digest(target)), []))
        if whole:
            return whole, ""
        if target.size == 0:
            return [], "empty tensor"
        flat = target.reshape(-1)
        if (flat == flat[0]).all():
            what = "a single value" if target.size == 1 else "one value in every element"
            return [], f"holds {what}, and no source of its size holds exactly that: where it came from cannot be told from values"
        probes = np.unique(flat[np.linspace(0, flat.size - 1, min(flat.size, 4 * PROBES)).astype(np.int64)])[:PROBES]
        found = self._distinct(self._parts(target, dtype, probes) or self._combined(target, dtype))
        return found, "" if found else self._why_not(target, dtype, probes)

    def _distinct(self, explanations: list[Explanation]) -> list[Explanation]:
        """One explanation per function (a stack is also unsqueeze-then-concat), the shortest spelling."""
        kept: list[Explanation] = []
        for e in sorted(explanations, key=lambda e: len(e.ops)):
            if not any(self.same(e, k) for k in kept):
                kept.append(e)
        return kept

    def _holding(self, value: Any, dtype: np.dtype, names: Sequence[str], limit: int = MAX_OWNERS) -> list[str]:
        """The first ``limit`` of ``names`` whose arrays hold ``value`` somewhere."""
        found = []
        for name in names:
            if (self.source_keys(name, dtype) == value).any():
                found.append(name)
                if len(found) == limit:
                    break
        return found

    def _with_casts(self, explanations: list[Explanation], dtype: np.dtype) -> list[Explanation]:
        out = []
        for e in explanations:
            note = cast_note(self.arrays[e.sources[0]], dtype)
            if note and len(e.sources) > 1:  # a combined target loses precision if any of its sources does
                note["lossy"] = any(cast_note(self.arrays[s], dtype)["lossy"] for s in e.sources)
            out.append(Explanation(e.sources, e.ops, (note["from"], note["to"], note["lossy"]) if note else None))
        return out

    def _whole(self, target: np.ndarray, dtype: np.dtype, candidates: Sequence[str]) -> list[Explanation]:
        found = []
        for source in candidates:
            array = self.source_keys(source, dtype)
            for ops in unary_chains(tuple(array.shape), tuple(target.shape)):
                if reproduces(ops, [array], target):
                    found.append(Explanation((source,), ops))
        return found

    def _parts(self, target: np.ndarray, dtype: np.dtype, probes: np.ndarray) -> list[Explanation]:
        larger = [name for name in self._comparable(dtype) if self.arrays[name].size > target.size]
        holders = [name for name in larger if _holds_all(self.source_keys(name, dtype), probes)][:MAX_OWNERS]
        values = np.unique(target) if holders else None
        found = []
        for source in holders:
            array = self.source_keys(source, dtype)
            present = np.isin(array, values)
            for cut in _cuts(array.shape, present, target.size):
                part = cut.apply(array)
                for ops in unary_chains(tuple(part.shape), tuple(target.shape)):
                    if reproduces(ops, [part], target):
                        found.append(Explanation((source,), (cut, *ops)))
        return found

    def _combined(self, target: np.ndarray, dtype: np.dtype) -> list[Explanation]:
        found = []
        for axis, size in enumerate(target.shape):
            if size > 1:
                found += self._joined(target, dtype, axis, concat=True)
                found += self._joined(target, dtype, axis, concat=False)
        return found

    def _joined(self, target: np.ndarray, dtype: np.dtype, axis: int, concat: bool) -> list[Explanation]:
        """Walk along ``axis``: at each offset, a source whose values fill the next slice exactly."""
        size = target.shape[axis]
        row = target.size // size
        fitting = [name for name in self._comparable(dtype) if (self.arrays[name].size % row == 0 if concat else self.arrays[name].size == row)]
        pieces: list[list[tuple[str, list[tuple[Op, ...]]]]] = []
        offset = 0
        while offset < size:
            corner = tuple(offset if k == axis else 0 for k in range(target.ndim))
            candidates, step = [], None
            for source in self._holding(target[corner], dtype, fitting):
                array = self.source_keys(source, dtype)
                length = array.size // row if concat else 1
                if not 0 < length < size or offset + length > size or (step is not None and length != step):
                    continue
                piece = np.take(target, offset, axis=axis) if not concat else np.take(target, range(offset, offset + length), axis=axis)
                if digest(piece) != self.source_digest(source, dtype):
                    continue
                chains = [ops for ops in unary_chains(tuple(array.shape), tuple(piece.shape)) if reproduces(ops, [array], piece)]
                if chains:
                    candidates.append((source, chains))
                    step = length
            if not candidates:
                return []
            pieces.append(candidates)
            offset += step
        if len(pieces) < 2:
            return []
        common = [ops for ops in pieces[0][0][1] if all(any(ops in chains for _, chains in piece) for piece in pieces)]
        if not common:
            return []
        join = Concat(axis) if concat else Stack(axis)
        choices = [[source for source, chains in piece if common[0] in chains] for piece in pieces]
        return [Explanation(tuple(combo), (*common[0], join)) for combo in itertools.islice(itertools.product(*choices), MAX_COMBINATIONS)]

    def _why_not(self, target: np.ndarray, dtype: np.dtype, probes: np.ndarray) -> str:
        same = self._digest_index(dtype).get((target.size, digest(target)), [])
        if same:
            return f"holds the values of {same[0]} in an order no transpose or reshape reproduces"
        homeless = [p for p in probes if not self._holding(p, dtype, self._comparable(dtype), limit=1)]
        if homeless:
            return f"{len(homeless)} of {len(probes)} of its values looked up are in no source tensor (left at initialisation, or computed?)"
        return "the values looked up occur in the sources, but no rename, transpose, reshape, chunk, select, concat or stack of them reproduces it"


def _holds_all(array: np.ndarray, values: np.ndarray) -> bool:
    return all((array == value).any() for value in values)  # stops at the first value missing


def _cuts(shape: Shape, present: np.ndarray, wanted: int) -> Iterator[Op]:
    """Chunks and selects of a source of ``shape`` with ``wanted`` elements, at positions whose
    every row holds some of the target's values (``present``)."""
    total = math.prod(shape)
    for axis, size in enumerate(shape):
        if size < 2:
            continue
        row = total // size
        rows = present.any(axis=tuple(k for k in range(len(shape)) if k != axis)) if len(shape) > 1 else present
        hits = np.flatnonzero(rows)
        if wanted % row == 0 and 1 < wanted // row < size:
            length = wanted // row
            starts = [k * length for k in range(size // length) if rows[k * length : (k + 1) * length].all()] if size % length == 0 else []
            if len(hits) and hits[-1] - hits[0] + 1 == length and hits[0] not in starts:
                starts.append(int(hits[0]))
            for start in starts[:MAX_CUTS]:
                yield _chunk(axis, int(start), length, size)
        if wanted == row:
            for index in hits[:MAX_CUTS]:
                yield Select(axis=axis, index=int(index))


def _chunk(axis: int, start: int, length: int, size: int) -> Chunk:
    if size % length == 0 and start % length == 0:
        return Chunk(axis=axis, index=start // length, parts=size // length)
    sizes = tuple(s for s in (start, length, size - start - length) if s)
    return Chunk(axis=axis, index=0 if start == 0 else 1, sizes=sizes)
