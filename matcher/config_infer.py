"""Config inference from a source checkpoint's shapes ("shape probing").

``infer_config(model_class, source)`` returns a config of ``model_class.config_class`` under
which the target's ``state_dict`` shapes fit the source's tensors, and says for every field
whether it was inferred (naming a target/source tensor pair that fixes it) or left at the
class' default (and why).

Nothing here knows a model family; the only names used are transformers-wide conventions
(``num_labels``, ``num_attention_heads`` through ``attribute_map``). The method:

1. **Probe the class** (once per class, cached). Every integer and boolean field of the config
   and of its sub-configs (``text_config``, ``vision_config``...) is perturbed one at a time and
   the model rebuilt on the meta device (a few milliseconds). A field whose increment adds
   ``prefix.N.*`` keys is a *count* field (layers); those are shrunk to the smallest value that
   builds, so every later build is cheap at any real size. For the other fields the probes give,
   per target tensor axis, which fields drive it, and for an axis driven by one field a
   polynomial (``dim == f``, ``3 * f``, ``f + 1``, ``(f / 16) ** 2``...) fitted exactly on four
   points. An axis driven by several fields is predicted by the field that decides it alone once
   set (``projection_size`` over ``hidden_size``) or else by memoised meta builds (positions from
   image and patch size; ``heads * (hidden // heads)``).
2. **Read the source's structure**: repeated blocks (a numbered path segment whose sub-trees have
   identical shapes: ``encoderblock_{i}``, ``resblocks.{i}``), scanned stacks (a sub-tree whose
   tensors all share one leading axis), and shadows (a large sub-tree repeating other tensors'
   paths and shapes: optimizer moments, an aliased sub-model), which are ignored. Inside a block,
   repeated inner instances (the E experts of a MoE layer, ``experts.{e}.w1``) are also offered
   gathered, one item of shape (E,) + leaf shape per leaf, for target blocks that stack instances
   on a first axis (``experts.gate_up_proj`` (E, 2I, D)). Everything after this step works on one
   block per stack, so its cost does not grow with layers x experts; this step is one pass over
   the keys per numbered segment (a 66 x 256 MoE, 51 153 tensors, takes about a second).
3. **Match shapes** (greedy, one block per stack on both sides): a target tensor is explained by
   a source tensor of the very same shape, of the same dims in another order (transposes,
   HWIO/OIHW, squeezed 1s), whose adjacent axes merge to it (flax ``(D, H, Dh)`` kernels), by a
   k-th of a fused source (``qkv``: its chunks go to sibling targets, all of them), or, for a
   target the probe showed to be a k-fold stack (``in_proj`` = 3 x hidden), by k sibling source
   tensors. Same-shape pairs are made by name similarity (``pos`` ~ ``position_embedding``). The
   score is explained target weight (by match quality) minus unexplained target weight minus
   unused source weight, then the number of distinct source shapes used (duplicates cannot stand
   in for a missing tensor), then name similarity.
4. **Solve**: each target block stack against each source block stack alone (pins a tower's
   widths, pairs stacks for the layer counts; equally good pairings are told apart by scoring
   the whole model), then every shape field against the whole source by coordinate descent,
   with pair moves (a value that takes another field's tensors re-solves that field) and value
   swaps. Candidate values invert the fitted polynomials on the source's own dims; a field
   coupled to another through one axis is also tried with the partner scaled by the same ratio
   (patch and image size together keep the number of positions).
5. **Decide**: a field is *inferred* when every other value that changes a target shape fits
   the source worse. When several values give the very same shapes (any divisor of the width for
   a head count), the default or the nearest value to it is kept and listed as ``default``; so is
   a field the source does not fix. Layer counts are the number of repeated source blocks; head
   counts come from split attention kernels ``(D, H, Dh)`` when the source has them. Fields the
   weights cannot show (``layer_norm_eps``, ``hidden_act``, token ids...) are listed as
   ``default``; a free field whose default does not build with the inferred sizes (12 heads for
   width 64) takes the nearest value that does. Fields that only move together without changing
   any shape (a GQA decoder's heads and kv heads: k_proj rows = kv x hidden / heads; Llama's
   head_dim with both) are found by meta builds and listed as ``default`` together, at the
   assignment nearest the class defaults, naming the alternatives that fit as well.

The whole inference gives up after ``TIME_BUDGET`` seconds (checked before each meta build and
each new scoring) with a one-line TargetError asking for ``--config``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import re
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, Iterable

from .errors import MatcherError, TargetError
from .tree import ParamTree, Shape

FieldPath = tuple[str, ...]
Score = tuple[int, int, float, int]

INFERRED = "inferred"
DEFAULT = "default"

TIME_BUDGET = 30.0  # seconds infer_config may spend (probe included) before it gives up with a TargetError
_ENUMERATE_UP_TO = 4096  # largest source number tried directly for a field no polynomial describes
_BUDGET = 12  # a source tensor's capacity; a k-th of a fused tensor costs _BUDGET // k
_CHUNKS = (2, 3, 4)
_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_SEPARATORS = re.compile(r"([./])")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FieldInference:
    """One config field: its final value, how it was chosen and why."""

    path: str
    value: Any
    how: str  # "inferred" | "default"
    evidence: str
    shape_determining: bool = False

    def to_dict(self) -> dict:
        value = self.value if isinstance(self.value, (int, float, str, bool, type(None))) else repr(self.value)
        return {"path": self.path, "value": value, "how": self.how, "evidence": self.evidence, "shape_determining": self.shape_determining}


@dataclass
class InferredConfig:
    """The config built from the source's shapes, and the account of every field."""

    config: Any
    fields: list[FieldInference]
    unexplained: list[str] = field(default_factory=list)  # target tensors no source tensor accounts for
    seconds: float = 0.0

    def __getitem__(self, path: str) -> FieldInference:
        for item in self.fields:
            if item.path == path:
                return item
        raise KeyError(path)

    @property
    def inferred(self) -> list[FieldInference]:
        return [f for f in self.fields if f.how == INFERRED]

    @property
    def defaulted(self) -> list[FieldInference]:
        return [f for f in self.fields if f.how == DEFAULT]

    @property
    def undetermined(self) -> list[FieldInference]:
        """Fields that change the target's shapes but that the source does not fix."""
        return [f for f in self.fields if f.shape_determining and f.how == DEFAULT]

    @property
    def complete(self) -> bool:
        return not self.undetermined

    def to_dict(self) -> dict:
        return {
            "complete": self.complete,
            "inferred": [f.to_dict() for f in self.inferred],
            "default": [f.to_dict() for f in self.defaulted],
            "undetermined": [f.path for f in self.undetermined],
            "unexplained_target_tensors": list(self.unexplained),
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        lines = [f"{f.path} = {f.value!r} ({f.evidence})" for f in self.inferred]
        if self.undetermined:
            lines.append("not determined by the source (default kept): " + ", ".join(f"{f.path}={f.value!r}" for f in self.undetermined))
        return "\n".join(lines)


# --------------------------------------------------------------------------- shapes and matching


def _canon(shape: Shape | None) -> Shape | None:
    """Dims in sorted order without 1s: equal for transposes, squeezes, HWIO vs OIHW."""
    if shape is None:
        return None
    return tuple(sorted(d for d in shape if d != 1))


def _weight(shape: Shape | None) -> int:
    """A tensor's weight in the score: its number of axes longer than 1 (at least 1)."""
    return max(1, sum(1 for d in shape or () if d != 1))


class _SourceIndex:
    """Views of a list of source shapes, for many-times matching against target shape lists."""

    def __init__(self, items: list[tuple[str, Shape]]):
        self.names = [name for name, _ in items]
        self.shapes = [tuple(shape) for _, shape in items]
        self.kinds = [_canon(shape) for shape in self.shapes]
        views: dict[Shape, list[tuple[int, int, int]]] = defaultdict(list)
        values: set[int] = {1}
        for i, shape in enumerate(self.shapes):
            squeezed = tuple(d for d in shape if d != 1)
            values.update(squeezed)
            seen: set[tuple[Shape, int]] = set()

            def add(view: Shape, cost: int, rank: int, i: int = i, seen: set = seen) -> None:
                key = (_canon(view), cost)
                if key not in seen:
                    seen.add(key)
                    views[key[0]].append((rank, i, cost))

            add(squeezed, _BUDGET, 0)
            for width in (2, 3):  # adjacent axes merged: flax (D, H, Dh) kernels, (p, p, C) patches
                for j in range(len(squeezed) - width + 1):
                    merged = math.prod(squeezed[j : j + width])
                    values.add(merged)
                    add(squeezed[:j] + (merged,) + squeezed[j + width :], _BUDGET, 1)
            for k in _CHUNKS if len(squeezed) <= 2 else ():  # a k-th of a fused matrix or vector (qkv, gate/up)
                for j, d in enumerate(squeezed):
                    if d % k == 0 and d > k:
                        values.add(d // k)
                        add(squeezed[:j] + (d // k,) + squeezed[j + 1 :], _BUDGET // k, 2)
        self.views = {key: sorted(entries) for key, entries in views.items()}
        self.identical: dict[Shape, list[tuple[int, int, int]]] = defaultdict(list)
        for i, shape in enumerate(self.shapes):
            self.identical[shape].append((-1, i, _BUDGET))
        self.values = frozenset(values)
        self.family = [_family(name) for name in self.names]
        self.kind_count: dict[Shape, int] = defaultdict(int)
        for kind in self.kinds:
            self.kind_count[kind] += 1
        self.splittable: list[tuple[int, list[tuple[int, Shape]]]] = []  # matrices and vectors: (k, one k-th's dims)
        for i, shape in enumerate(self.shapes):
            squeezed = tuple(d for d in shape if d != 1)
            if 1 <= len(squeezed) <= 2:
                parts = [(k, _canon(squeezed[:a] + (d // k,) + squeezed[a + 1 :])) for k in (3, 2, 4) for a, d in enumerate(squeezed) if d % k == 0 and d != k]
                if parts:
                    self.splittable.append((i, parts))
        self._pairings: dict[tuple, list[tuple[int, str]]] = {}

    def __len__(self) -> int:
        return len(self.shapes)

    def _take(self, canon: Shape, units: int, budget: list[int], state: "_MatchState", owner: str | None = None, identical: bool = False):
        """Consume ``units`` views of shape ``canon``: the source indices and the worst view rank, or None.

        Several units (one target tensor fused from k source tensors) must come from sibling source
        tensors. A chunk of a fused source goes only to target tensors that are siblings of the
        chunk's other takers (``owner`` is the taker's sibling key).
        """
        entries = (self.identical if identical else self.views).get(canon)
        if not entries:
            return None
        if units > 1:
            by_family: dict[tuple, list] = defaultdict(list)
            for entry in entries:
                by_family[self.family[entry[1]]].append(entry)
            candidates = list(by_family.values())
        else:
            candidates = [entries]
        for group in candidates:
            taken: list[tuple[int, int, int]] = []
            spare: dict[int, int] = {}
            for rank, i, cost in group:
                if rank == 2 and state.chunk_owner.get(i, owner) != owner:
                    continue
                left = spare.get(i, budget[i])
                while left >= cost and len(taken) < units:
                    left -= cost
                    taken.append((i, cost, rank))
                spare[i] = left
                if len(taken) == units:
                    for j, c, r in taken:
                        budget[j] -= c
                        if r == 2:
                            state.chunk_owner[j] = owner
                    return sorted({j for j, _, _ in taken}), max(r for _, _, r in taken)
        return None

    def _pairing(self, shape: Shape, keys: tuple[str, ...]) -> list[tuple[int, str]]:
        """Target keys and same-shape source tensors, best-named pairs first (cached per target set)."""
        cached = self._pairings.get((shape, keys))
        if cached is None:
            sources = [i for _, i, _ in self.identical[shape]]
            ranked = sorted((-_affinity(key, self.names[i]), order, i, key) for order, key in enumerate(keys) for i in sources)
            cached = self._pairings[(shape, keys)] = [(i, key) for _, _, i, key in ranked]
        return cached

    def _split_fused(self, items, budget: list[int], pairs: dict, quality: dict) -> None:
        """A source matrix or vector that no target tensor matches whole, but k sibling target tensors
        match in equal parts along one axis, is split among them first (timm's ``qkv``: q, k, v)."""
        whole: dict[Shape, list[str]] = defaultdict(list)
        for key, _, canon in items:
            if canon is not None:
                whole[canon].append(key)
        families: dict[Shape, list[list[str]]] = defaultdict(list)
        grouped: dict[tuple, list[str]] = defaultdict(list)
        for key, shape, canon in items:
            if canon is not None:
                grouped[(_family(key), canon)].append(key)
        for (_, canon), keys in grouped.items():
            families[canon].append(keys)
        for i, parts in self.splittable:
            if len(whole.get(self.kinds[i], ())) > self.kind_count[self.kinds[i]] - 1:
                continue  # some target tensor needs it whole
            for k, part in parts:
                taken = False
                for keys in families.get(part, ()):
                    free = [key for key in keys if key not in pairs]
                    if len(free) >= k:
                        free.sort(key=lambda key: -_affinity(key, self.names[i]))  # stable: q, k, v before o
                        for key in free[:k]:
                            pairs[key], quality[key] = [i], _QUALITY[2]
                        budget[i] = 0
                        taken = True
                        break
                if taken:
                    break

    def match(self, target: Iterable[tuple[str, Shape | None]], fused: dict[str, tuple[int, int]] | None = None, ranks: dict[str, int] | None = None) -> "_Match":
        """Greedy matching of target shapes to these source tensors (``ranks``: fixed target weights).

        ``fused`` names target tensors stacked from k equal parts along one axis, ``key: (k, axis)``
        (``in_proj`` = 3 x hidden on axis 0, a MoE's ``experts.gate_up_proj`` (E, 2 x I, D) on axis 1):
        only those may be matched by k sibling source tensors together.
        """
        fused, ranks = fused or {}, ranks or {}
        budget = [_BUDGET] * len(self.shapes)
        state = _MatchState()
        items = [(key, shape, _canon(shape)) for key, shape in target]
        items.sort(key=lambda t: (-(len(t[2]) if t[2] is not None else -1), -(math.prod(t[2]) if t[2] else 0), t[0]))
        pairs: dict[str, list[int]] = {}
        quality: dict[str, int] = {}
        self._split_fused(items, budget, pairs, quality)
        same: dict[Shape, list[tuple[int, str]]] = defaultdict(list)  # then the very same shape, paired by name
        for order, (key, shape, canon) in enumerate(items):
            if key not in pairs and shape is not None and shape in self.identical:
                same[shape].append((order, key))
        for shape, keys in same.items():
            for i, key in self._pairing(shape, tuple(key for _, key in keys)):
                if key not in pairs and budget[i] == _BUDGET:
                    budget[i] = 0
                    pairs[key], quality[key] = [i], _QUALITY[-1]
        for key, shape, canon in items:
            if key in pairs or canon is None:
                continue
            got = self._take(canon, 1, budget, state, owner=_family(key))
            k, axis = fused.get(key, (0, 0))
            if got is None and k and shape[axis] % k == 0:
                got = self._take(_canon(tuple(shape[:axis]) + (shape[axis] // k,) + tuple(shape[axis + 1 :])), k, budget, state)
                if got is not None:
                    got = (got[0], 2)
            if got is not None:
                pairs[key], quality[key] = got[0], _QUALITY[got[1]]
        # a fused source tensor whose chunks did not all find sibling takers explains nothing
        partial = {i for i in state.chunk_owner if budget[i] > 0}
        if partial:
            for key in [k for k, got in pairs.items() if quality[k] == _QUALITY[2] and set(got) & partial and k not in fused]:
                del pairs[key], quality[key]
            for i in partial:
                budget[i] = _BUDGET
        fit = 0
        for key, shape, canon in items:
            weight = ranks[key] if key in ranks else _weight(shape)
            fit += quality[key] * weight if key in pairs else -_QUALITY[-1] * weight
        used = {i for got in pairs.values() for i in got}
        unused = sum(1 for b in budget if b == _BUDGET)
        spare = sum(_weight(shape) * b for shape, b in zip(self.shapes, budget))
        names = round(sum(_affinity(key, self.names[got[0]]) for key, got in pairs.items()), 6)
        return _Match(fit, -spare, len({self.kinds[i] for i in used}), pairs, quality, unused, names)


_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")


@lru_cache(maxsize=None)
def _words(name: str) -> frozenset[str]:
    return frozenset(w.lower() for w in _WORDS.findall(name))


@lru_cache(maxsize=None)
def _similar(a: str, b: str) -> bool:
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    if len(short) >= 4 and long.endswith(short):  # norm ~ layernorm
        return True
    if len(short) < 3 or short[0] != long[0]:
        return False
    if long.startswith(short):  # proj ~ projection
        return True
    rest = iter(long)
    return all(ch in rest for ch in short)  # txt ~ text, img ~ image


def _affinity(target_key: str, source_key: str) -> float:
    """Word overlap of two names, 0..1 (cosine; a shortened word such as pos ~ position, txt ~ text counts 3/4)."""
    return _word_affinity(_words(target_key), _words(source_key))


@lru_cache(maxsize=100_000)
def _word_affinity(target: frozenset[str], source: frozenset[str]) -> float:
    if not target or not source:
        return 0.0
    total = 0.0
    for word in source:
        if word in target:
            total += 1.0
        elif any(_similar(word, t) for t in target):
            total += 0.75
        elif len(word) <= 5 and any(len(t) == 1 and (word.startswith(t) or (len(word) <= 4 and t in word)) for t in target):
            total += 0.5  # one-letter abbreviations: q ~ query, q ~ qkv, o ~ out
    return round(total / math.sqrt(len(target) * len(source)), 6)


@dataclass
class _MatchState:
    chunk_owner: dict[int, str | None] = field(default_factory=dict)


def _family(key: str) -> tuple[str, str]:
    """Sibling key: the path without its last two names, and the last name (q/k/v weights share it)."""
    parts = _SEPARATORS.split(key)
    return ("".join(parts[:-4]), parts[-1])


_QUALITY = {-1: 4, 0: 3, 1: 2, 2: 1}  # same shape, same dims in another order, merged axes, a share of a fused tensor


@dataclass
class _Match:
    fit: int  # explained target weight (by match quality) minus unexplained target weight
    spare: int  # minus the source weight left unused (a k-th of a fused tensor counts a k-th)
    kinds: int  # distinct source shapes used (duplicates, e.g. optimizer moments, cannot stand in)
    pairs: dict[str, list[int]]
    quality: dict[str, int]
    unused: int  # source tensors not used at all
    names: float = 0.0  # name similarity of matched pairs: the last tie-breaker (pos ~ position_embedding)

    @property
    def balance(self) -> int:
        """Explained target minus unexplained target minus unused source (weights alike; scaled by 3)."""
        return 3 * self.fit + self.spare  # an unused source tensor costs _QUALITY[-1] * weight, as an unexplained target

    @property
    def score(self) -> Score:
        return (self.balance, self.kinds, self.names, self.fit)


# --------------------------------------------------------------------------- source structure


@dataclass
class _SourceGroup:
    """Repeated blocks in the source: numbered sub-trees with identical shapes, or a scanned stack."""

    template: str  # e.g. params/img/Transformer/encoderblock_{i}
    count: int
    keys: frozenset[str]
    block: list[tuple[str, Shape]]  # one block: (source key, shape without the stacked axis)
    scanned: bool = False
    gathered: int = 0  # inner instances (experts) folded into one item per leaf, shape (E,) + leaf shape

    def describe(self) -> str:
        inner = f", {self.gathered} inner instances gathered" if self.gathered else ""
        if self.scanned:
            return f"{self.count} stacked blocks {self.template} (leading axis{inner})"
        return f"{self.count} repeated blocks {self.template}" + (f" ({inner[2:]})" if inner else "")


_Instances = dict[int, dict[str, tuple[str, Shape]]]  # index -> {tail: (key, shape)}


def _repeated(specs: dict[str, Shape]) -> list[tuple[str, list[int], _Instances]]:
    """Numbered path segments whose instances (contiguous from 0 or 1) hold the same tails and shapes.

    One pass over the keys: each numbered segment files the key under its head and index.
    """
    table: dict[str, _Instances] = defaultdict(lambda: defaultdict(dict))
    for key, shape in specs.items():
        parts = _SEPARATORS.split(key)
        for j in range(0, len(parts), 2):
            m = _NUMBERED.match(parts[j])
            if m:
                head = "".join(parts[:j]) + m.group(1)
                table[head][int(m.group(2))]["".join(parts[j + 1 :])] = (key, shape)
    out = []
    for head, blocks in table.items():
        indices = sorted(blocks)
        if indices[0] not in (0, 1) or indices[-1] != indices[0] + len(indices) - 1:
            continue
        first = blocks[indices[0]]
        if any(len(blocks[i]) != len(first) for i in indices[1:]):
            continue
        if any(tail not in other or other[tail][1] != shape for i in indices[1:] for other in (blocks[i],) for tail, (_, shape) in first.items()):
            continue
        out.append((head, indices, blocks))
    return out


def _outermost(found: list[tuple[str, list[int], _Instances]]) -> list[tuple[str, list[int], _Instances]]:
    """Repeated groups of two or more instances, outermost first, sharing no key."""
    multi = [g for g in found if len(g[1]) > 1]
    multi.sort(key=lambda g: (-len(g[1]) * len(g[2][g[1][0]]), g[0]))
    taken: set[str] = set()
    chosen = []
    for group in multi:
        keys = [key for i in group[1] for key, _ in group[2][i].values()]
        if taken.isdisjoint(keys):
            taken.update(keys)
            chosen.append(group)
    return chosen


def _source_groups(specs: dict[str, Shape]) -> list[_SourceGroup]:
    found = _repeated(specs)
    multi, single = [], []
    for head, indices, blocks in found:
        keys = frozenset(key for i in indices for key, _ in blocks[i].values())
        block = list(blocks[indices[0]].values())
        group = _SourceGroup(head + "{i}", len(indices), keys, block)
        (multi if len(indices) > 1 else single).append(group)
    scanned = _scanned_groups(specs)
    stacked = set().union(*(g.keys for g in scanned)) if scanned else set()
    chosen: list[_SourceGroup] = []
    taken: set[str] = set()
    for group in sorted(multi, key=lambda g: (-len(g.keys), g.template)):  # outermost first
        if group.keys <= stacked:
            continue  # numbered parts inside a scanned block (LayerNorm_0, LayerNorm_1)
        if taken.isdisjoint(group.keys):
            taken |= group.keys
            chosen.append(group)
    covered = taken
    scanned = [g for g in scanned if g.keys.isdisjoint(covered)]
    covered = covered | stacked
    singles = [g for g in single if not g.keys <= covered]
    groups = chosen + singles + scanned
    return groups + [g for g in map(_gathered, groups) if g is not None]


def _gathered(group: _SourceGroup) -> _SourceGroup | None:
    """The same blocks with their inner repeated instances (the experts of a MoE layer, E of them)
    gathered: one item per leaf, ``experts.{e}.w1.weight`` of shape (E,) + the leaf's shape.

    Kept beside the plain group: which of the two explains the target's block is for the
    matching to say (``LayerNorm_0/1`` are two tensors, not a stack of two)."""
    specs = dict(group.block)
    if len(specs) < 2:
        return None
    inner = _outermost(_repeated(specs))
    if not inner:
        return None
    folded: set[str] = set()
    items: list[tuple[str, Shape]] = []
    count = 0
    for head, indices, blocks in inner:
        count = max(count, len(indices))
        for tail, (_, shape) in blocks[indices[0]].items():
            items.append((f"{head}{{e}}{tail}", (len(indices),) + tuple(shape)))
        folded.update(key for i in indices for key, _ in blocks[i].values())
    block = [(k, s) for k, s in group.block if k not in folded] + items
    return _SourceGroup(group.template, group.count, group.keys, block, group.scanned, gathered=count)


def _shadows(specs: dict[str, Shape]) -> set[str]:
    """Tensors that repeat other tensors under another root: optimizer moments, aliased sub-models.

    A sub-tree S is a shadow when every tensor under it (at least 4, and an eighth of the file)
    has the path and shape of a tensor elsewhere with a shorter path, maybe with one extra trailing
    name: ``optimizer/state/param_states/<path>/grad_ema`` repeats ``optimizer/target/<path>``.

    Only sub-trees big enough to be a shadow are looked at (at most eight per depth), so the cost
    is the number of tensors times the depth, however many layers and experts repeat the same
    short relative paths (``experts.{e}.w1.weight``).
    """
    segments = {k: tuple(_SEPARATORS.split(k)[::2]) for k in specs}
    under: dict[tuple, int] = defaultdict(int)
    for segs in segments.values():
        for a in range(1, len(segs)):
            under[segs[:a]] += 1
    least = max(4, len(specs) / 8)
    roots = {root for root, n in under.items() if n >= least}
    if not roots:
        return set()
    wanted: set[tuple] = set()  # the (relative path, shape) pairs a shadow candidate asks about
    for key, segs in segments.items():
        for a in range(1, len(segs) - 1):
            if segs[:a] in roots:
                for drop in (0, 1):
                    rel = segs[a : len(segs) - drop]
                    if len(rel) >= 2:
                        wanted.add((rel, specs[key]))
    index: dict[tuple, set[tuple]] = defaultdict(set)
    for key, segs in segments.items():
        for a in range(len(segs)):
            probe_key = (segs[a:], specs[key])
            if probe_key in wanted:
                index[probe_key].add(segs[:a])
    hits: dict[tuple, set[str]] = defaultdict(set)
    for key, segs in segments.items():
        for a in range(1, len(segs) - 1):
            root = segs[:a]
            if root not in roots:
                continue
            for drop in (0, 1):
                rel = segs[a : len(segs) - drop]
                if len(rel) < 2:
                    continue
                for other in index.get((rel, specs[key]), ()):
                    if other != root and len(other) + len(rel) < len(segs):
                        hits[(root, other, drop)].add(key)
    shadows: set[str] = set()
    for (root, _, _), keys in hits.items():
        if len(keys) >= 4 and len(keys) == under[root] and len(keys) >= len(specs) / 8:
            shadows |= keys
    return shadows


def _scanned_groups(specs: dict[str, Shape]) -> list[_SourceGroup]:
    """Sub-trees whose tensors (4 or more, none a vector) all share one leading axis: scanned layers."""
    leaves: dict[str, list[str]] = defaultdict(list)
    for key in specs:
        parts = _SEPARATORS.split(key)
        for j in range(1, len(parts) - 1, 2):
            leaves["".join(parts[:j])].append(key)
    found = []
    for prefix, keys in leaves.items():
        shapes = [specs[k] for k in keys]
        if len(keys) >= 4 and all(len(s) >= 2 for s in shapes) and len({s[0] for s in shapes}) == 1 and shapes[0][0] >= 2:
            found.append((prefix, keys))
    groups = []
    prefixes = {p for p, _ in found}
    for prefix, keys in found:
        if any(prefix.startswith(other) and prefix != other and prefix[len(other)] in "./" for other in prefixes):
            continue  # keep the outermost stack
        block = [(k, specs[k][1:]) for k in keys]
        groups.append(_SourceGroup(prefix, specs[keys[0]][0], frozenset(keys), block, scanned=True))
    return groups


# --------------------------------------------------------------------------- polynomials


@dataclass(frozen=True)
class _Poly:
    """c0 + c1 x + c2 x^2 with exact rational coefficients."""

    coeffs: tuple[Fraction, ...]

    def value(self, x: int) -> Fraction:
        return sum((c * x**i for i, c in enumerate(self.coeffs)), Fraction(0))

    def at(self, x: int | None) -> int | None:
        return None if x is None else _poly_at(self, x)

    def solve(self, y: int) -> list[int]:
        c0, c1, c2 = (list(self.coeffs) + [Fraction(0)] * 3)[:3]
        if c2 == 0:
            if c1 == 0:
                return []
            roots = [(y - c0) / c1]
        else:
            disc = c1 * c1 - 4 * c2 * (c0 - y)
            if disc < 0:
                return []
            num, den = math.isqrt(disc.numerator), math.isqrt(disc.denominator)
            if num * num != disc.numerator or den * den != disc.denominator:
                return []
            root = Fraction(num, den)
            roots = [(-c1 + root) / (2 * c2), (-c1 - root) / (2 * c2)]
        return [int(r) for r in roots if r.denominator == 1 and r >= 1]


@lru_cache(maxsize=65536)
def _poly_at(poly: _Poly, x: int) -> int | None:
    y = poly.value(x)
    return int(y) if y.denominator == 1 and y >= 1 else None


@lru_cache(maxsize=65536)
def _solve(poly: _Poly, y: int) -> tuple[int, ...]:
    return tuple(poly.solve(y))


def _fit(points: list[tuple[int, int]]) -> _Poly | None:
    """The lowest-degree polynomial (at most 2) through all points, or None."""
    pts = sorted(set(points))
    if len(pts) < 2 or len({x for x, _ in pts}) != len(pts):
        return None
    (x0, y0), (x1, y1) = pts[0], pts[1]
    a = Fraction(y1 - y0, x1 - x0)
    poly = _Poly((y0 - a * x0, a))
    if all(poly.value(x) == y for x, y in pts):
        return poly
    if len(pts) < 4:
        return None
    (x0, y0), (x1, y1), (x2, y2) = pts[:3]
    d0, d1, d2 = Fraction((x0 - x1) * (x0 - x2)), Fraction((x1 - x0) * (x1 - x2)), Fraction((x2 - x0) * (x2 - x1))
    c2 = y0 / d0 + y1 / d1 + y2 / d2
    c1 = -(y0 * (x1 + x2)) / d0 - (y1 * (x0 + x2)) / d1 - (y2 * (x0 + x1)) / d2
    c0 = y0 * x1 * x2 / d0 + y1 * x0 * x2 / d1 + y2 * x0 * x1 / d2
    poly = _Poly((c0, c1, c2))
    return poly if all(poly.value(x) == y for x, y in pts) else None


# --------------------------------------------------------------------------- the class probe


@contextlib.contextmanager
def _quiet():
    """Silence transformers' config warnings (token ids outside a probe's vocabulary, ...)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _no_init_weights():
    """Skip weight initialisation in probe builds (only shapes are read; on the meta device the
    init functions do nothing but still cost about half of each build)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers version: build with initialisation
        return contextlib.nullcontext()
    return no_init_weights()


def _get(config: Any, path: FieldPath) -> Any:
    obj = config
    for part in path:
        obj = getattr(obj, part)
    return obj


@dataclass
class _TargetGroup:
    field: FieldPath
    prefix: str  # keys of block i start with f"{prefix}.{i}."

    @property
    def template(self) -> str:
        return f"{self.prefix}.{{i}}"


class _Probe:
    """What each config field does to the target's shapes (built once per class)."""

    def __init__(self, model_class: type):
        from .targets import import_transformers

        transformers = import_transformers()
        self.model_class = model_class
        self.config_class = model_class.config_class
        self.base_config_type = transformers.PreTrainedConfig
        self._builds: dict[tuple, dict[str, Shape] | None] = {}
        self._configs: dict[tuple, Any] = {}
        self._shaped: dict[FieldPath, frozenset[str]] = {}
        self._parents: dict[FieldPath, set[FieldPath]] = {}
        self._instance_fields: set[FieldPath] | None = None
        self.build_count = 0
        started = time.perf_counter()
        with _quiet():
            self._enumerate()
            self._find_counts()
            self._probe_fields()
        self.seconds = time.perf_counter() - started

    # -- config construction and builds

    def make_config(self, values: dict[FieldPath, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for path, value in values.items():
            if value is None:
                continue
            node = kwargs
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return self.config_class(**kwargs)

    def build(self, values: dict[FieldPath, Any]) -> dict[str, Shape] | None:
        """State-dict shapes of the class built on the meta device (None if it does not build)."""
        key = tuple(sorted((p, v) for p, v in values.items() if v is not None))
        if key not in self._builds:
            import torch

            _check_time()
            self.build_count += 1
            try:
                config = self.make_config(values)
                with torch.device("meta"), _no_init_weights():
                    model = self.model_class(config)
                self._builds[key] = {k: tuple(int(d) for d in t.shape) for k, t in model.state_dict().items()}
            except Exception:  # any failure means "this combination does not build"
                self._builds[key] = None
        return self._builds[key]

    # -- step 1: which fields exist

    def _enumerate(self) -> None:
        generic = set(self.base_config_type().to_dict())
        default = self.config_class()
        self.ints: list[FieldPath] = []
        self.bools: list[FieldPath] = []
        self.others: list[FieldPath] = []
        self.attribute_maps: dict[FieldPath, dict[str, str]] = {}

        def walk(config: Any, prefix: FieldPath) -> None:
            self.attribute_maps[prefix] = dict(getattr(config, "attribute_map", {}) or {})
            for key, value in config.to_dict().items():
                if key in generic or key.startswith("_"):
                    continue
                attr = getattr(config, key, value)
                path = prefix + (key,)
                if isinstance(attr, self.base_config_type):
                    walk(attr, path)
                elif isinstance(attr, bool):
                    self.bools.append(path)
                elif isinstance(attr, int):
                    self.ints.append(path)
                else:
                    self.others.append(path)

        walk(default, ())
        self.ints.append(("num_labels",))  # every PreTrainedConfig has it (classification heads)
        self.default_config = default

    # -- step 2: count fields (layers), shrunk for cheap probes

    def _find_counts(self) -> None:
        self.counts: dict[FieldPath, int] = {}
        self.groups: list[_TargetGroup] = []
        self.structural: set[FieldPath] = set()
        values: dict[FieldPath, Any] = {}
        current = self.build(values)
        if current is None:
            raise TargetError(f"cannot build {self.model_class.__name__} from its default config on the meta device")
        for path in sorted(self.ints, key=lambda p: (_get(self.default_config, p), p)):
            b = _get(self.default_config, path)
            if b < 1:
                continue
            grown = self.build({**values, path: b + 1})
            if grown is None or set(grown) == set(current):
                continue
            prefixes = _added_blocks(set(current), set(grown), b)
            if prefixes is None:
                self.structural.add(path)
                continue
            for m in range(1, b + 1):
                small = self.build({**values, path: m})
                bigger = self.build({**values, path: m + 1})
                if small is not None and bigger is not None:
                    found = _added_blocks(set(small), set(bigger), m)
                    if found:
                        values[path], current, prefixes = m, small, found
                        break
            self.counts[path] = values.get(path, b)
            self.groups.extend(_TargetGroup(path, prefix) for prefix in sorted(prefixes))
        self.base: dict[FieldPath, Any] = dict(values)
        self.base_shapes = current
        base_config = self.make_config(self.base)
        self.defaults = {path: _get(base_config, path) for path in self.ints + self.bools}
        dropped = set()
        for group in self.groups:
            for i in range(1, self.counts[group.field]):
                dropped.update(k for k in current if k.startswith(f"{group.prefix}.{i}."))
        self.keys = tuple(k for k in current if k not in dropped)  # one block per stack
        self.ranks = {k: _weight(s) for k, s in current.items()}  # from the default sizes: fixed per tensor

    # -- step 3: what every other field does

    def _probe_fields(self) -> None:
        self.deps: dict[tuple[str, int], set[FieldPath]] = defaultdict(set)
        points: dict[tuple[str, int], dict[FieldPath, list[tuple[int, int]]]] = defaultdict(dict)
        probes: dict[FieldPath, list[int]] = {}
        self.free: set[FieldPath] = set()
        base = self.base_shapes
        for path in self.ints:
            if path in self.counts or path in self.structural:
                continue
            b = self.defaults[path]
            tries = [2 * b, 3 * b, 4 * b, b + 1, b + 2, b + 3] if b >= 1 else [b + 1, b + 2, b + 3, b + 4]
            results = []
            for v in dict.fromkeys(t for t in tries if t >= 0 and t != b):
                if len(results) == 3:
                    break
                shapes = self.build({**self.base, path: v})
                if shapes is not None:
                    results.append((v, shapes))
            probes[path] = [v for v, _ in results]
            if any(set(shapes) != set(base) for _, shapes in results):
                self.structural.add(path)
                continue
            changed = False
            for key in self.keys:
                for axis, d in enumerate(base[key]):
                    ys = [(v, shapes[key][axis]) for v, shapes in results]
                    if any(y != d for _, y in ys):
                        changed = True
                        self.deps[(key, axis)].add(path)
                        points[(key, axis)][path] = [(b, d)] + ys
            if not changed:
                self.free.add(path)
        for path in self.bools:
            flipped = self.build({**self.base, path: not self.defaults[path]})
            if flipped is None or flipped == base:
                self.free.add(path)
            else:
                self.structural.add(path)
        self.forms: dict[tuple[str, int], _Poly] = {}
        for position, deps in self.deps.items():
            if len(deps) == 1:
                (path,) = deps
                poly = _fit(points[position][path])
                if poly is not None:
                    self.forms[position] = poly
        self._find_dominant(points, probes)
        self.fused: dict[str, tuple[int, int]] = {}  # key: (k, axis) of a target stacked from k equal parts
        for (key, axis), form in sorted(self.forms.items()):
            if len(form.coeffs) == 2 and form.coeffs[0] == 0 and form.coeffs[1] in _CHUNKS:
                self.fused.setdefault(key, (int(form.coeffs[1]), axis))
        self.shape_fields = sorted({p for deps in self.deps.values() for p in deps})
        self.positions: dict[FieldPath, list[tuple[str, int]]] = defaultdict(list)
        for position, deps in self.deps.items():
            for path in deps:
                self.positions[path].append(position)
        self.partners: dict[FieldPath, set[FieldPath]] = defaultdict(set)
        for position, deps in self.deps.items():
            if position not in self.forms and len(deps) > 1:
                for path in deps:
                    self.partners[path] |= deps - {path}

    def _find_dominant(self, points: dict, probes: dict[FieldPath, list[int]]) -> None:
        """Axes driven by several fields where one, once set, decides alone (projection_size over hidden_size)."""
        self.dominant: dict[tuple[str, int], tuple[FieldPath, _Poly, FieldPath | None, _Poly | None]] = {}
        by_deps: dict[frozenset, list[tuple[str, int]]] = defaultdict(list)
        for position, deps in self.deps.items():
            if len(deps) > 1:
                by_deps[frozenset(deps)].append(position)
        for deps, positions in by_deps.items():
            for path in sorted(deps):
                others = sorted(deps - {path})
                set_alone = self.build({**self.base, path: self.defaults[path]})
                if set_alone is None or any(not probes.get(o) for o in others):
                    continue
                moved = [self.build({**self.base, path: self.defaults[path], o: v}) for o in others for v in probes[o]]
                if any(m is None for m in moved):
                    continue
                for key, axis in positions:
                    if (key, axis) in self.dominant or key not in set_alone:
                        continue
                    if all(m.get(key) is not None and m[key][axis] == set_alone[key][axis] for m in moved):
                        own = _fit(points[(key, axis)].get(path, []))
                        if own is None:
                            continue
                        fallback = _fit(points[(key, axis)].get(others[0], [])) if len(others) == 1 else None
                        self.dominant[(key, axis)] = (path, own, others[0] if fallback else None, fallback)

    # -- predictions

    def memo(self, values: dict[FieldPath, Any]) -> dict[str, Shape] | None:
        shapes = self.build({**self.base, **values})
        if shapes is None:  # e.g. a width the default head count does not divide: free fields do not matter
            shapes = self.build({**self.base, **{p: 1 for p in self.free if p in self.defaults and not isinstance(self.defaults[p], bool)}, **values})
        return shapes

    def predict(self, values: dict[FieldPath, Any], keys: Iterable[str], cheap: bool = False) -> list[tuple[str, Shape | None]]:
        """Target shapes (one block per stack) under ``values`` (unset fields: the class default).

        ``cheap``: no new meta builds; a tensor whose shape would need one is left out.
        """
        changed = {p for p, v in values.items() if v is not None}
        out = []
        for key in keys:
            base = self.base_shapes[key]
            dims: list[int | None] = list(base)
            for axis in range(len(base)):
                deps = self.deps.get((key, axis))
                if not deps or not (deps & changed):
                    continue
                form = self.forms.get((key, axis))
                ruled = self.dominant.get((key, axis))
                if form is not None:
                    (path,) = deps
                    dims[axis] = form.at(values[path])
                elif ruled is not None and (values.get(ruled[0]) is not None or ruled[2] is not None):
                    path, own, other, fallback = ruled
                    if values.get(path) is not None:
                        dims[axis] = own.at(values[path])
                    elif values.get(other) is not None:
                        dims[axis] = fallback.at(values[other])
                else:
                    wanted = {p: values.get(p) for p in deps}
                    if cheap and not self.memoised(wanted):
                        dims = None
                        break
                    shapes = self.memo(wanted)
                    dims[axis] = shapes[key][axis] if shapes is not None and key in shapes else None
            if dims is not None:
                out.append((key, None if None in dims else tuple(dims)))
        return out

    def memoised(self, values: dict[FieldPath, Any]) -> bool:
        key = tuple(sorted((p, v) for p, v in {**self.base, **values}.items() if v is not None))
        return key in self._builds and self._builds[key] is not None

    def fused_for(self, keys: Iterable[str]) -> dict[str, tuple[int, int]]:
        """``fused`` for keys of a full model (any block index, not only block 0)."""
        out = {}
        for key in keys:
            base = key
            for group in self.groups:
                head = group.prefix + "."
                if key.startswith(head):
                    rest = key[len(head):].split(".", 1)
                    if len(rest) == 2 and rest[0].isdigit():
                        base = f"{head}0.{rest[1]}"
            if base in self.fused:
                out[key] = self.fused[base]
        return out

    def shaped_by(self, path: FieldPath) -> frozenset[str]:
        """Target keys with an axis this field drives."""
        if path not in self._shaped:
            self._shaped[path] = frozenset(k for k, _ in self.positions.get(path, ()))
        return self._shaped[path]

    def stacks_instances(self, keys: Iterable[str]) -> bool:
        """Whether some tensor among ``keys`` stacks instances on its first axis: a 3-d or larger
        tensor whose axis 0 is sized by a field that sizes nothing but first axes (a MoE layer's
        ``experts.gate_up_proj`` (E, 2I, D), E = ``num_local_experts``). Only then may the source's
        inner repeated instances (experts) be gathered to match it."""
        if self._instance_fields is None:
            self._instance_fields = {f for f, positions in self.positions.items() if all(axis == 0 for _, axis in positions)}
        for key in keys:
            deps = self.deps.get((key, 0), ())
            if len(self.base_shapes.get(key, ())) >= 3 and len(deps) == 1 and next(iter(deps)) in self._instance_fields:
                return True
        return False

    def parents(self, path: FieldPath) -> set[FieldPath]:
        """Integer fields the config derives this field from when it is unset (head_dim from the head count)."""
        if path not in self._parents:
            base = self.effective({}, path)
            found = set()
            for other in self.ints:
                if other == path or other in self.counts or other not in self.defaults or isinstance(self.defaults[other], bool):
                    continue
                d = self.defaults[other]
                if isinstance(d, int) and d >= 1 and self.effective({other: 2 * d}, path) != base:
                    found.add(other)
            self._parents[path] = found
        return self._parents[path]

    def effective(self, values: dict[FieldPath, Any], path: FieldPath) -> Any:
        """The field's value under ``values``; for an unset field, what the config derives (e.g. from hidden_size)."""
        value = values.get(path)
        if value is not None:
            return value
        key = tuple(sorted((p, v) for p, v in values.items() if v is not None))
        if key not in self._configs:
            try:
                self._configs[key] = self.make_config({**self.base, **values})
            except Exception:
                self._configs[key] = None
        config = self._configs[key]
        return self.defaults[path] if config is None else _get(config, path)


def _added_blocks(before: set[str], after: set[str], index: int) -> set[str] | None:
    """Prefixes ``p`` such that growing a count from ``index`` added exactly ``p.{index}.*`` keys."""
    added, removed = after - before, before - after
    if removed or not added or index < 1:
        return None
    prefixes = set()
    for key in added:
        parts = key.split(".")
        found = None
        for j, part in enumerate(parts):
            if part == str(index) and ".".join(parts[:j] + [str(index - 1)] + parts[j + 1 :]) in before:
                found = ".".join(parts[:j])
        if found is None:
            return None
        prefixes.add(found)
    return prefixes


@lru_cache(maxsize=32)
def probe(model_class: type) -> _Probe:
    """The (cached) probe of a class: count fields, shape-driving fields and their forms."""
    if not isinstance(model_class, type) or not hasattr(model_class, "config_class"):
        raise TargetError(f"{model_class!r} is not a transformers model class")
    return _Probe(model_class)


# --------------------------------------------------------------------------- the solver


class _Solver:
    def __init__(self, probe: _Probe, source: ParamTree):
        self.p = probe
        specs = {path: tuple(spec.shape) for path, spec in source.specs.items()}
        self.shadows = _shadows(specs)
        self.specs = {k: s for k, s in specs.items() if k not in self.shadows}
        self.groups = _source_groups(self.specs)
        self._scores: dict[tuple, tuple[Score, _Match]] = {}
        self._indexes: list[_SourceIndex] = []  # kept alive: the score cache is keyed by their ids

    def index(self, items: list[tuple[str, Shape]]) -> _SourceIndex:
        index = _SourceIndex(items)
        self._indexes.append(index)
        return index

    # -- scoring

    def score(self, values: dict[FieldPath, Any], keys: tuple[str, ...], index: _SourceIndex) -> tuple[Score, _Match]:
        """Fit of the target predicted under ``values`` to ``index`` (memoised)."""
        cache_key = (id(index), keys, tuple(sorted((p, v) for p, v in values.items() if v is not None)))
        if cache_key not in self._scores:
            _check_time()
            result = index.match(self.p.predict(values, keys), self.p.fused, self.p.ranks)
            self._scores[cache_key] = (result.score, result)
        return self._scores[cache_key]

    # -- candidates

    def candidates(self, path: FieldPath, values: dict[FieldPath, Any], keys: list[str], index: _SourceIndex) -> set[int]:
        keyset = set(keys)
        positions = [pos for pos in self.p.positions[path] if pos[0] in keyset]
        found: set[int] = set()
        local = [pos for pos in positions if pos not in self.p.forms]
        for form in {self.p.forms[pos] for pos in positions if pos in self.p.forms}:
            for s in index.values:
                found.update(_solve(form, s))
        if local:  # axes driven together with other fields: fit along this field at the current values
            x0 = self.p.effective(values, path)
            if not x0:
                x0 = self.p.effective({}, path) or 1
            xs = [x0, 2 * x0, 3 * x0, 4 * x0]
            local_keys = sorted({k for k, _ in local})
            rows = [dict(self.p.predict({**values, path: x}, local_keys)) for x in xs]
            unfitted = False
            for key, axis in local:
                pts = [(x, row[key][axis]) for x, row in zip(xs, rows) if row.get(key) is not None]
                poly = _fit(pts) if len(pts) == 4 else None
                if poly is None:
                    unfitted = True
                else:
                    for s in index.values:
                        found.update(_solve(poly, s))
            if unfitted:  # e.g. heads * (hidden // heads): try the source's own numbers
                wanted = set(index.values)
                for x in sorted(v for v in index.values if v <= _ENUMERATE_UP_TO):
                    row = dict(self.p.predict({**values, path: x}, local_keys))
                    if any(row.get(k) is not None and row[k][a] in wanted for k, a in local):
                        found.add(x)
        return found

    def trials(self, path: FieldPath, values: dict[FieldPath, Any], keys: list[str], index: _SourceIndex) -> list[dict]:
        current = self.p.effective(values, path)
        own = sorted(self.p.shaped_by(path) & set(keys))

        def promising(trial: dict) -> bool:  # one of the field's own tensors could find a partner
            known = [shape for _, shape in self.p.predict(trial, own, cheap=True)]
            if not known:
                return True
            return any(shape is not None and (_canon(shape) in index.views or shape in index.identical) for shape in known)

        out = []
        for v in sorted(self.candidates(path, values, keys, index)):
            if v == values.get(path):
                continue
            if promising({**values, path: v}):
                out.append({**values, path: v})
            if not current:
                continue
            ratio = Fraction(v, current)
            for partner in sorted(self.p.partners.get(path, ())):
                if partner in self.p.counts:
                    continue
                pv = self.p.effective(values, partner)
                for scaled in (pv * ratio, pv / ratio):
                    if scaled.denominator == 1 and scaled >= 1 and scaled != pv:
                        out.append({**values, path: v, partner: int(scaled)})
        return out

    def descend(self, fields: list[FieldPath], values: dict[FieldPath, Any], keys: list[str], index: _SourceIndex, rounds: int = 6):
        values = dict(values)
        order = sorted(fields, key=lambda p: (-len(self.p.positions[p]), p))
        for _ in range(rounds):
            improved = False
            for path in order:  # single moves
                top, top_values = self.score(values, keys, index)[0], None
                for trial in self.trials(path, values, keys, index):
                    s, _ = self.score(trial, keys, index)
                    if s > top:
                        top, top_values = s, trial
                if top_values is not None:
                    values, improved = top_values, True
            if not improved:  # pair moves: a value for one field that takes another field's source tensors
                moved = self.pair_move(order, values, keys, index)
                if moved is None:
                    break
                values = moved
        return values, self.score(values, keys, index)[0]

    def pair_move(self, order: list[FieldPath], values: dict, keys: tuple[str, ...], index: _SourceIndex, tries: int = 3) -> dict | None:
        """Move f to a value that explains more of f's own tensors, and re-solve the fields whose tensors lose out."""
        best, current = self.score(values, keys, index)
        matched = set(current.pairs)
        fields = set(order)

        def explained(result: _Match, own: frozenset[str]) -> float:
            return sum(result.quality[k] + _affinity(k, index.names[result.pairs[k][0]]) for k in own if k in result.pairs)

        for path in order:
            own = self.p.shaped_by(path)
            before = explained(current, own)
            ranked = []
            for trial in self.trials(path, values, keys, index):
                _, result = self.score(trial, keys, index)
                gain = explained(result, own) - before
                if gain > 0:
                    ranked.append((gain, result.score, trial, result))
            ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
            for _, _, trial, result in ranked[:tries]:
                lost = matched - set(result.pairs)
                others = [g for g in order if g != path and g in fields and self.p.shaped_by(g) & lost]
                for other in others:
                    for second in self.trials(other, trial, keys, index):
                        s, _ = self.score(second, keys, index)
                        if s > best:
                            return second
        return None

    def swaps(self, fields: list[FieldPath], values: dict[FieldPath, Any], keys: tuple[str, ...], index: _SourceIndex) -> dict:
        """Exchange the values of two fields while that fits better (vocabulary and positions can trade places)."""
        best, _ = self.score(values, keys, index)
        for _ in range(3):
            improved = False
            for f, g in itertools.combinations(fields, 2):
                a, b = self.p.effective(values, f), self.p.effective(values, g)
                if a == b or a is None or b is None:
                    continue
                trial = {**values, f: b, g: a}
                s, _ = self.score(trial, keys, index)
                if s > best:
                    best, values, improved = s, trial, True
            if not improved:
                break
        return values

    # -- phase 1: one block stack against one source stack

    def block_keys(self, group: _TargetGroup) -> tuple[str, ...]:
        head = f"{group.prefix}.0."
        return tuple(k for k in self.p.keys if k.startswith(head))

    def solve_blocks(self) -> dict[int, list[tuple[tuple, _SourceGroup, dict]]]:
        """For every target stack: the source stacks ranked by how well one block fits one block."""
        ranked: dict[int, list] = {}
        for n, group in enumerate(self.p.groups):
            keys = self.block_keys(group)
            fields = sorted({p for k in keys for axis in range(len(self.p.base_shapes[k])) for p in self.p.deps.get((k, axis), ())} - set(self.p.counts))
            rows = []
            stacked = self.p.stacks_instances(keys)
            for source in self.groups:
                if not keys or not (len(keys) / 4 <= len(source.block) <= 4 * len(keys)) or (source.gathered and not stacked):
                    continue
                index = self.index(source.block)
                values, _ = self.descend(fields, {}, keys, index)
                score, result = self.score(values, keys, index)
                if result.pairs:
                    rows.append(((result.balance, source.count > 1, score), source, values, index))
            rows.sort(key=lambda r: r[0], reverse=True)
            ranked[n] = rows
        return ranked

    # -- phase 2: everything against the whole source

    def collapsed_index(self, chosen: list[_SourceGroup]) -> _SourceIndex:
        drop: set[str] = set()
        items: list[tuple[str, Shape]] = []
        for group in chosen:
            drop |= group.keys
            items.extend(group.block)
        items.extend((k, s) for k, s in self.specs.items() if k not in drop)
        return self.index(items)


def _fmt(path: FieldPath) -> str:
    return ".".join(path)


def _shape_str(shape: Shape | None) -> str:
    return "?" if shape is None else str(tuple(shape))


# --------------------------------------------------------------------------- entry point


_DEADLINE: contextvars.ContextVar[tuple[float, TargetError] | None] = contextvars.ContextVar("config_infer_deadline", default=None)


def _check_time() -> None:
    """Give up when the running inference has spent its TIME_BUDGET (checked before each meta
    build and each new scoring of the source, so the overrun is at most one of those)."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.perf_counter() >= deadline[0]:
        raise deadline[1]


def infer_config(model_class: type, source: ParamTree) -> InferredConfig:
    """A config for ``model_class`` whose target shapes fit ``source`` (shapes only; no data read).

    Gives up with a one-line TargetError after ``TIME_BUDGET`` seconds."""
    started = time.perf_counter()
    if not source.specs:
        raise TargetError("cannot infer a config: the source holds no tensors", path=source.origin or None)
    name = getattr(model_class, "__name__", repr(model_class))
    error = TargetError(f"cannot infer a config for {name} from this checkpoint in {TIME_BUDGET:g} s; give --config", path=source.origin or None)
    token = _DEADLINE.set((started + TIME_BUDGET, error))
    try:
        p = probe(model_class)
        _check_time()
        with _quiet():
            result = _infer(p, source)
    except MatcherError:
        raise
    except Exception as exc:  # a config class refusing the values inferred (its own validators): one line, not a traceback
        raise TargetError(f"cannot infer a config for {name} from this checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); give --config",
                          path=source.origin or None) from exc
    finally:
        _DEADLINE.reset(token)
    result.seconds = time.perf_counter() - started
    return result


def _infer(p: _Probe, source: ParamTree) -> InferredConfig:
    solver = _Solver(p, source)
    _check_time()

    # phase 1: every target stack against every source stack
    ranked = solver.solve_blocks()

    def block_values(picked: dict[int, _SourceGroup]) -> tuple[dict, list[_SourceGroup]]:
        values: dict[FieldPath, Any] = {}
        strength: dict[FieldPath, tuple] = {}
        chosen: list[_SourceGroup] = []
        for n, source_group in picked.items():
            rank, _, found, _ = next(r for r in ranked[n] if r[1] is source_group)
            for path, value in found.items():
                if value is not None and (path not in strength or rank > strength[path]):
                    values[path], strength[path] = value, rank
            if source_group not in chosen:
                chosen.append(source_group)
        return values, chosen

    def whole(picked: dict[int, _SourceGroup]) -> Score:  # an assignment's block values, scored on everything
        values, chosen = block_values(picked)
        return solver.score(values, p.keys, solver.collapsed_index(chosen))[0]

    picked = _assign(p, solver, {n: [(r[0], r[1]) for r in rows if r[0][2][3] > 0] for n, rows in ranked.items()}, {}, tie=whole)
    values, chosen_sources = block_values(picked)

    # phase 2: all shape fields against the whole source (one block per stack on both sides)
    index = solver.collapsed_index(chosen_sources)
    keys = p.keys
    fields = [f for f in p.shape_fields if f not in p.counts and f not in p.structural]
    # the block widths first stay as the blocks fixed them (an untouched default elsewhere, say
    # 64 positions, must not push the MLP width 64 off its own tensors), then everything moves
    values, _ = solver.descend([f for f in fields if f not in values], values, keys, index)
    values, _ = solver.descend(fields, values, keys, index)
    values = solver.swaps(fields, values, keys, index)

    # which fields the source actually fixes
    reports: dict[FieldPath, FieldInference] = {}
    final: dict[FieldPath, Any] = {}
    base_pred = dict(p.predict(values, keys))
    classes: dict[FieldPath, set[int]] = {}
    for path in fields:
        best, best_match = solver.score(values, keys, index)
        rivals, same = [], set()
        value = p.effective(values, path)
        if not isinstance(value, int) or isinstance(value, bool):
            reports[path] = FieldInference(_fmt(path), None, DEFAULT, "shape field; not an integer here", True)
            continue
        inverted = solver.candidates(path, values, keys, index) | {None}
        for alt in inverted | {2 * value, value + 1, max(1, value // 2)}:
            trial = {**values, path: alt}
            effective = p.effective(trial, path)
            if effective == value:
                continue
            if dict(p.predict(trial, keys)) == base_pred:
                if alt in inverted:
                    same.add(effective)  # another of the source's numbers gives the very same shapes
                continue
            s, _ = solver.score(trial, keys, index)
            if s >= best:
                rivals.append(effective)
        dependent = sorted({k for k, _ in p.positions[path]})
        evidence = _pair_evidence(dependent, base_pred, best_match, index)
        default = p.effective({}, path)
        if rivals or evidence is None:
            why = "the source does not fix it" if evidence is None else f"other values fit as well: {sorted(rivals)[:4]}"
            reports[path] = FieldInference(_fmt(path), None, DEFAULT, f"shape field; {why}", True)
        elif same:
            allowed = same | {value}
            classes[path] = allowed
            pick = default if default in allowed else min(allowed, key=lambda v: (abs(math.log(v / default)) if v > 0 and default > 0 else math.inf, v))
            if pick != default:
                final[path] = pick
            shown = ", ".join(map(str, sorted(allowed)[:8])) + (", ..." if len(allowed) > 8 else "")
            reports[path] = FieldInference(
                _fmt(path), pick, DEFAULT, f"the shapes allow any of {shown}; the {'default' if pick == default else 'nearest to the default ' + str(default)} is kept", True
            )
        else:
            final[path] = value
            reports[path] = FieldInference(_fmt(path), value, INFERRED, evidence, True)

    # layer counts: the best-fitting source stack of each target stack
    counts: dict[FieldPath, tuple[int, str, tuple]] = {}
    matched_groups: dict[FieldPath, _SourceGroup] = {}
    rows_by_group: dict[int, list] = {}
    for n, group in enumerate(p.groups):
        bkeys = solver.block_keys(group)
        rows = []
        stacked = p.stacks_instances(bkeys)
        for source_group in solver.groups:
            if not bkeys or not (len(bkeys) / 4 <= len(source_group.block) <= 4 * len(bkeys)) or (source_group.gathered and not stacked):
                continue
            result = _SourceIndex(source_group.block).match(p.predict(final, bkeys), fused=p.fused, ranks=p.ranks)
            if result.pairs and result.fit > 0:
                rows.append(((result.balance, source_group.count > 1, result.score), source_group))
        rows.sort(key=lambda r: r[0], reverse=True)
        rows_by_group[n] = rows
    for n, pick in _assign(p, solver, rows_by_group, final).items():
        group = p.groups[n]
        rank = next(r for r, g in rows_by_group[n] if g is pick)
        previous = counts.get(group.field)
        if previous is None or rank > previous[2]:
            counts[group.field] = (pick.count, f"{pick.describe()} ~ {group.template}", rank)
            matched_groups[group.field] = pick
    for path in p.counts:
        if path in counts:
            final[path] = counts[path][0]
            reports[path] = FieldInference(_fmt(path), counts[path][0], INFERRED, counts[path][1], True)
        else:
            reports[path] = FieldInference(_fmt(path), None, DEFAULT, "layer count; no source stack of blocks fits the target's", True)

    # fields the shapes fix only together (heads x head_dim, kv heads / heads): the defaults kept
    tied: dict[FieldPath, list[dict[FieldPath, int]]] = {}
    for states, chosen in _ties(p, final):
        group = sorted({f for s in states for f in s if s[f] != states[0][f]})
        if len(group) < 2:
            continue  # one field alone: "the shapes allow any of" above says so already
        others = sorted((s for s in states if s != chosen), key=lambda s: _distance(p, s))
        shown = "; ".join(", ".join(f"{_fmt(f)}={s[f]}" for f in group) for s in others[:3])
        names = ", ".join(_fmt(f) for f in group)
        for f in group:
            final[f] = chosen[f]
            tied[f] = states
            why = f"the shapes fix {names} only together; kept nearest the defaults ({shown} fit as well)"
            reports[f] = FieldInference(_fmt(f), chosen[f], DEFAULT, why, True)

    # attention heads: from split kernels (D, H, Dh) in the matched source blocks
    for count_path, source_group in matched_groups.items():
        scope = count_path[:-1]
        name = p.attribute_maps.get(scope, {}).get("num_attention_heads", "num_attention_heads")
        heads = scope + (name,)
        if heads not in p.defaults or (heads in final and reports.get(heads, None) and reports[heads].how == INFERRED):
            continue
        found = _split_heads(source_group.block)
        if found is None:
            continue
        value, key, shape = found
        if heads in tied:  # the head count settles the fields tied to it
            fitting = [s for s in tied[heads] if s[heads] == value]
            if len(fitting) == 1:
                for f, v in fitting[0].items():
                    if f != heads and reports.get(f) is not None and reports[f].how == DEFAULT:
                        final[f] = v
                        reports[f] = FieldInference(_fmt(f), v, INFERRED, f"from {_fmt(heads)} = {value} (split attention kernel {key} {shape}) and the shapes", True)
                final[heads] = value
                reports[heads] = FieldInference(_fmt(heads), value, INFERRED, f"split attention kernel {key} {shape}", True)
        elif heads not in classes or value in classes[heads]:
            final[heads] = value
            reports[heads] = FieldInference(_fmt(heads), value, INFERRED, f"split attention kernel {key} {shape}", heads in p.shape_fields)

    # booleans and other key-set-changing fields: compare real builds
    for path in sorted(p.structural):
        if path in p.counts or not isinstance(p.defaults.get(path), bool):
            continue
        scored = []
        for option in (p.defaults[path], not p.defaults[path]):
            shapes = p.build({**final, **p.base, path: option})
            if shapes is None:
                continue
            kept = [(k, s) for k, s in shapes.items() if _kept(p, k)]
            scored.append((index.match(kept, fused=p.fused).score, option))
        if len(scored) == 2 and scored[0][0] != scored[1][0]:
            best_score, option = max(scored)
            final[path] = option
            what = "present" if option == p.defaults[path] else "absent"
            reports[path] = FieldInference(_fmt(path), option, INFERRED, f"the tensors this switch adds are {what} in the source", True)
        else:
            reports[path] = FieldInference(_fmt(path), None, DEFAULT, "switch that changes the key set; the source does not decide it", True)

    config, adjusted = _final_config(p, final)
    for path, (value, why) in adjusted.items():
        reports[path] = FieldInference(_fmt(path), value, DEFAULT, why, path in p.shape_fields)

    # the account of every field, in config order
    fields_out: list[FieldInference] = []
    for path in p.ints + p.bools + p.others:
        if path == ("num_labels",) and path not in p.shape_fields:
            continue
        value = _get(config, path)
        if path in reports:
            item = reports[path]
            fields_out.append(FieldInference(item.path, value, item.how, item.evidence, item.shape_determining))
        elif path in p.structural:
            fields_out.append(FieldInference(_fmt(path), value, DEFAULT, "changes the key set in a way not solved for", True))
        elif path in p.free:
            fields_out.append(FieldInference(_fmt(path), value, DEFAULT, "changes no tensor shape", False))
        else:
            fields_out.append(FieldInference(_fmt(path), value, DEFAULT, "not visible in the weights", False))

    # what the source does not account for: one block per stack, as the solver saw it
    built_values = {path: _get(config, path) for path in p.ints + p.bools if path not in p.counts and path in p.defaults}
    shapes = p.build({**built_values, **p.base}) or {}
    kept = [(k, s) for k, s in shapes.items() if _kept(p, k)]
    result = index.match(kept, fused=p.fused)
    templates = [(f"{g.prefix}.0.", f"{g.prefix}.{{i}}.") for g in p.groups]
    unexplained = []
    for key, _ in kept:
        if key not in result.pairs:
            for head, template in templates:
                if key.startswith(head):
                    key = template + key[len(head):]
            unexplained.append(key)
    return InferredConfig(config, fields_out, unexplained)


_TIE_STATES = 12  # equal-shape assignments explored per tie
_TIE_BUILDS = 400  # meta builds spent on ties at most


def _ties(p: _Probe, final: dict[FieldPath, Any]) -> list[tuple[list[dict[FieldPath, int]], dict[FieldPath, int]]]:
    """Integer fields that can move together without changing any target shape.

    Candidates are the fields that share an axis with another field and own no axis alone
    (``num_attention_heads`` and ``num_key_value_heads`` of a GQA decoder: k_proj rows =
    kv x hidden / heads), plus the fields the config derives them from (``head_dim`` from the
    head count). Moves multiply one field by 2 or 1/2 and each other candidate by the same ratio,
    its inverse or 1; a move is kept when a meta build gives exactly the same state dict shapes.
    Returns, per tie, every equal-shape assignment found and the one nearest the defaults: most
    fields equal to what the config would derive without them, then the smallest log-distance
    to the class defaults.
    """
    anchored = {next(iter(deps)) for deps in p.deps.values() if len(deps) == 1}
    movable = {f for f in p.partners if f not in anchored and f not in p.counts and f not in p.structural}
    for f in list(movable):
        movable |= {h for h in p.parents(f) if h not in anchored and h not in p.counts and h not in p.structural}
    state0: dict[FieldPath, int] = {}
    for f in sorted(movable):
        value = p.effective(final, f)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            state0[f] = value
    if len(state0) < 2:
        return []
    fixed = {k: v for k, v in final.items() if k not in state0}
    reference = p.build({**fixed, **state0, **p.base})
    if reference is None:
        return []
    fields = sorted(state0)
    budget = [_TIE_BUILDS]

    def same(state: dict[FieldPath, int]) -> bool:
        budget[0] -= 1
        return p.build({**fixed, **state, **p.base}) == reference

    equal = [state0]
    seen = {tuple(state0[f] for f in fields)}
    frontier = [state0]
    while frontier and len(equal) < _TIE_STATES and budget[0] > 0:
        state = frontier.pop(0)
        for f in fields:
            for r in (Fraction(2), Fraction(1, 2)):
                others = [g for g in fields if g != f]
                for mults in itertools.product((Fraction(1), r, 1 / r), repeat=len(others)):
                    trial = {f: state[f] * r, **{g: state[g] * m for g, m in zip(others, mults)}}
                    if any(v.denominator != 1 or v < 1 for v in trial.values()):
                        continue
                    trial = {g: int(v) for g, v in trial.items()}
                    key = tuple(trial[g] for g in fields)
                    if key in seen or budget[0] <= 0:
                        continue
                    seen.add(key)
                    if same(trial):
                        equal.append(trial)
                        frontier.append(trial)
    if len(equal) < 2:
        return []

    def rank(state: dict[FieldPath, int]) -> tuple:
        derived = sum(1 for f in fields if p.effective({**fixed, **{g: v for g, v in state.items() if g != f}}, f) == state[f])
        return (derived, -_distance(p, state))

    return [(equal, max(equal, key=rank))]


def _distance(p: _Probe, state: dict[FieldPath, int]) -> float:
    """Log-distance of an assignment to the class defaults."""
    total = 0.0
    for f, v in state.items():
        default = p.effective({}, f)
        if isinstance(default, int) and default >= 1:
            total += abs(math.log(v / default))
    return round(total, 9)


def _kept(p: _Probe, key: str) -> bool:
    for group in p.groups:
        for i in range(1, p.counts[group.field]):
            if key.startswith(f"{group.prefix}.{i}."):
                return False
    return True


def _pair_evidence(dependent: list[str], predicted: dict, match: _Match, index: _SourceIndex) -> str | None:
    """'target key shape ~ source key shape' for the best-explained target tensor the field shapes."""
    ranked = sorted(dependent, key=lambda k: (-match.quality.get(k, 0), -len(_canon(predicted.get(k)) or ()), k))
    for key in ranked:
        got = match.pairs.get(key)
        if got:
            sources = ", ".join(f"{index.names[i]} {_shape_str(index.shapes[i])}" for i in got[:3])
            return f"{key} {_shape_str(predicted.get(key))} ~ {sources}"
    return None


def _split_heads(block: list[tuple[str, Shape]]) -> tuple[int, str, Shape] | None:
    """H from flax-style attention kernels: (D, H, Dh) with H*Dh == D, or (H, Dh, D)."""
    found = {}
    for key, shape in block:
        if len(shape) != 3 or "{e}" in key:  # a gathered stack of experts is not a split kernel
            continue
        a, b, c = shape
        if a == b * c and b > 1 and c > 1:
            found.setdefault(b, (key, shape))
        elif c == a * b and a > 1 and b > 1:
            found.setdefault(a, (key, shape))
    if len(found) == 1:
        (heads, (key, shape)), = found.items()
        return heads, key, shape
    return None


def _assign(p: _Probe, solver: _Solver, rows: dict[int, list], final: dict, tie=None) -> dict[int, _SourceGroup]:
    """One source stack per target stack: distinct stacks where possible, best total fit.

    Assignments that fit equally well are told apart by ``tie(assignment)`` when given, else
    by the surroundings of each stack (the tensors beside it in its tower) fitted under ``final``.
    """
    live = {n: r[:4] for n, r in rows.items() if r}
    if not live:
        return {}
    order = sorted(live)
    best_key, best = None, []
    for combo in itertools.product(*(live[n] for n in order)):
        sources = [g for _, g in combo]
        distinct = len({g.template for g in sources}) == len(sources)  # a gathered variant is the same stack
        key = (distinct, sum(r[0] for r, _ in combo), sum(r[1] for r, _ in combo))
        if best_key is None or key > best_key:
            best_key, best = key, [combo]
        elif key == best_key:
            best.append(combo)
    if len(best) > 1 and tie is not None:
        best.sort(key=lambda combo: tie({n: g for n, (_, g) in zip(order, combo)}), reverse=True)
    elif len(best) > 1 and len({tuple(g.count for _, g in combo) for combo in best}) > 1:
        involved = list({id(g): g for combo in best for _, g in combo}.values())
        cache: dict[tuple[int, int], Score] = {}

        def context(n: int, g: _SourceGroup) -> Score:
            if (n, id(g)) not in cache:
                cache[(n, id(g))] = _context(p, solver, p.groups[n], g, involved, final)
            return cache[(n, id(g))]

        best.sort(key=lambda combo: tuple(map(sum, zip(*(context(n, g) for n, (_, g) in zip(order, combo))))), reverse=True)
    return {n: g for n, (_, g) in zip(order, best[0])}


def _context(p: _Probe, solver: _Solver, group: _TargetGroup, source: _SourceGroup, involved: list[_SourceGroup], final: dict) -> Score:
    """How well the tensors beside a target stack fit the tensors beside a source stack."""
    scope = _exclusive_ancestor(group.prefix, [g.prefix for g in p.groups if g is not group], ".")
    stacked = tuple(f"{g.prefix}." for g in p.groups)
    target_ctx = [k for k in p.keys if k.startswith(scope) and not k.startswith(stacked)]
    ancestor = _exclusive_ancestor(source.template, [g.template for g in involved if g is not source], "./")
    items = [(k, s) for k, s in solver.specs.items() if k.startswith(ancestor) and k not in source.keys]
    if not items or not target_ctx:
        return (0, 0, 0)
    return _SourceIndex(items).match(p.predict(final, target_ctx), fused=p.fused, ranks=p.ranks).score


def _exclusive_ancestor(prefix: str, others: list[str], seps: str) -> str:
    """The shortest leading part of ``prefix`` (cut at a separator) that no other prefix starts with."""
    for j, ch in enumerate(prefix):
        if ch in seps:
            head = prefix[: j + 1]
            if not any(o.startswith(head) for o in others):
                return head
    return prefix


def _final_config(p: _Probe, final: dict[FieldPath, Any]) -> tuple[Any, dict[FieldPath, tuple[Any, str]]]:
    """The config of the inferred values; free fields moved off a default that does not build.

    A head count is the usual case: the default 12 does not divide an inferred width of 64. All
    such fields start at 1 (divides anything), then each goes back to its default, or to the value
    nearest the default (among divisors of the sizes inferred beside it) that still builds.
    """
    if p.build(final) is not None:
        return p.make_config(final), {}
    free_ints = [f for f in sorted(p.free) if f in p.defaults and not isinstance(p.defaults[f], bool) and f not in final and (p.defaults[f] or 0) >= 1]
    trial = {**final, **{f: 1 for f in free_ints}}
    if p.build(trial) is None:
        shown = {_fmt(k): v for k, v in final.items()}
        raise TargetError(f"cannot build {p.model_class.__name__} from the inferred config {shown}", hint="pass --config with the sizes")
    adjusted: dict[FieldPath, tuple[Any, str]] = {}
    for path in free_ints:
        default = p.defaults[path]
        scope = path[:-1]
        sizes = {v for q, v in final.items() if q[:-1] == scope and isinstance(v, int) and not isinstance(v, bool) and v > 0}
        options = sorted(({d for s in sizes for d in _divisors(s)} | {1}) - {default}, key=lambda v: (abs(math.log(v / default)), v))
        for option in [default] + options:
            if p.build({**trial, path: option}) is not None:
                trial[path] = option
                break
        if trial[path] != default:
            adjusted[path] = (trial[path], f"default {default} does not build with the inferred sizes; nearest value that does")
    for path in free_ints:
        if path not in adjusted:
            del trial[path]  # back to unset: the class default (or what it derives)
    return p.make_config(trial), adjusted


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
