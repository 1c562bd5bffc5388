"""Config inference from a source checkpoint's shapes ("shape probing").

``infer_config(model_class, source)`` returns a config of ``model_class.config_class`` under
which the target's ``state_dict`` shapes fit the source's tensors, and says for every field
whether it was inferred (naming the source tensor that fixes it) or left at the class' default.

Nothing here knows a model family. The method:

1. **Probe the class** (once per class, cached). The class' own defaults are the starting point.
   Every integer (and boolean) field of the config and of its sub-configs (``text_config``,
   ``vision_config``, ...) is perturbed one at a time and the model is rebuilt on the meta
   device (milliseconds). A field whose increment adds ``prefix.N.*`` keys is a *count* field
   (layers); those are shrunk to the smallest value that builds, so every later probe is cheap
   at any real size. For the other fields the probes give, per target tensor axis, which fields
   drive it, and for an axis driven by one field a polynomial (``dim == f``, ``3 * f``,
   ``f + 1``, ``(f / 16) ** 2``...), fitted exactly on four points. Axes driven by several fields
   together (positions from image and patch size) are evaluated by memoised meta builds.
2. **Read the source's structure**: repeated blocks (a numbered path segment whose sub-trees have
   identical shapes, e.g. ``encoderblock_{i}``, ``resblocks.{i}``) and scanned stacks (a sub-tree
   whose tensors all share one leading axis).
3. **Match shapes**: a target tensor is explained by a source tensor with the same dims in any
   order (transposes, HWIO/OIHW, squeezed 1s), by a source tensor whose adjacent axes merge to
   it (flax ``(D, H, Dh)`` kernels), by a k-th of a fused source tensor (``qkv = 3 x q``), or by k
   source tensors together (one fused target tensor). The score counts explained target tensors
   (matrices weigh more than vectors), minus unexplained ones, then the number of distinct
   source shapes used (so an optimizer state's duplicate tensors cannot stand in for a missing one).
4. **Solve**: first each target block stack against each source block stack alone (this pins a
   tower's widths without confusing it with another tower, and pairs stacks for the layer
   counts), then every shape field against the whole source, by coordinate descent. Candidate
   values come from inverting the fitted polynomials on the source's own dims; a field coupled to
   another through one axis is also tried with the partner scaled by the same ratio (patch and
   image size together keep the number of positions).
5. **Decide**: a field is *inferred* when every other value that changes a target shape fits the
   source worse; otherwise it keeps the class default (or what the config derives from the
   inferred fields), and is listed as ``default`` with the reason. Layer counts are the number of
   repeated source blocks. Attention heads rarely change a transformers shape; they are read from
   split attention kernels ``(D, H, Dh)`` when the source has them, else left at the default (or
   the nearest value that builds). Fields the weights cannot show (``layer_norm_eps``,
   ``hidden_act``, token ids...) are listed as ``default``.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, Iterable

from .errors import TargetError
from .tree import ParamTree, Shape

FieldPath = tuple[str, ...]
Score = tuple[int, int, int]

INFERRED = "inferred"
DEFAULT = "default"

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


def _weight(canon: Shape | None) -> int:
    return max(1, len(canon or ()))


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
        self.values = frozenset(values)

    def __len__(self) -> int:
        return len(self.shapes)

    def _take(self, canon: Shape, units: int, budget: list[int]) -> list[int] | None:
        entries = self.views.get(canon)
        if not entries:
            return None
        taken: list[tuple[int, int]] = []
        spare = {}
        for _, i, cost in entries:
            left = spare.get(i, budget[i])
            while left >= cost and len(taken) < units:
                left -= cost
                taken.append((i, cost))
            spare[i] = left
            if len(taken) == units:
                for j, c in taken:
                    budget[j] -= c
                return sorted({j for j, _ in taken})
        return None

    def match(self, target: Iterable[tuple[str, Shape | None]]) -> "_Match":
        budget = [_BUDGET] * len(self.shapes)
        items = [(key, shape, _canon(shape)) for key, shape in target]
        items.sort(key=lambda t: (-(len(t[2]) if t[2] is not None else -1), -(math.prod(t[2]) if t[2] else 0), t[0]))
        total = matched = 0
        pairs: dict[str, list[int]] = {}
        for key, shape, canon in items:
            weight = _weight(canon)
            total += weight
            if canon is None:
                continue
            got = self._take(canon, 1, budget)
            if got is None and len(canon) <= 2:  # one fused target matrix or vector from k source tensors
                for k in _CHUNKS:
                    for j, d in enumerate(canon):
                        if d % k == 0 and d > k and got is None:
                            got = self._take(_canon(canon[:j] + (d // k,) + canon[j + 1 :]), k, budget)
                    if got is not None:
                        break
            if got is not None:
                matched += weight
                pairs[key] = got
        used = {i for got in pairs.values() for i in got}
        unused = sum(1 for b in budget if b == _BUDGET)
        consumed = sum(_weight(kind) * (_BUDGET - b) for kind, b in zip(self.kinds, budget))
        return _Match(2 * matched - total, consumed, len({self.kinds[i] for i in used}), pairs, unused)


@dataclass
class _Match:
    fit: int  # explained target weight minus unexplained target weight
    consumed: int  # source weight used (a k-th of a fused tensor counts a k-th)
    kinds: int  # distinct source shapes used (duplicates, e.g. optimizer moments, cannot stand in)
    pairs: dict[str, list[int]]
    unused: int  # source tensors not used at all

    @property
    def score(self) -> Score:
        return (self.fit, self.consumed, self.kinds)


# --------------------------------------------------------------------------- source structure


@dataclass
class _SourceGroup:
    """Repeated blocks in the source: numbered sub-trees with identical shapes, or a scanned stack."""

    template: str  # e.g. params/img/Transformer/encoderblock_{i}
    count: int
    keys: frozenset[str]
    block: list[tuple[str, Shape]]  # one block: (source key, shape without the stacked axis)
    scanned: bool = False

    def describe(self) -> str:
        if self.scanned:
            return f"{self.count} stacked blocks {self.template} (leading axis)"
        return f"{self.count} repeated blocks {self.template}"


def _source_groups(specs: dict[str, Shape]) -> list[_SourceGroup]:
    table: dict[str, dict[int, dict[str, tuple[str, Shape]]]] = defaultdict(lambda: defaultdict(dict))
    for key, shape in specs.items():
        parts = _SEPARATORS.split(key)
        for j in range(0, len(parts), 2):
            m = _NUMBERED.match(parts[j])
            if m:
                head = "".join(parts[:j]) + m.group(1)
                table[head][int(m.group(2))]["".join(parts[j + 1 :])] = (key, shape)
    multi, single = [], []
    for head, blocks in table.items():
        indices = sorted(blocks)
        if indices[0] not in (0, 1) or indices != list(range(indices[0], indices[0] + len(indices))):
            continue
        first = {tail: shape for tail, (_, shape) in blocks[indices[0]].items()}
        if any({tail: shape for tail, (_, shape) in blocks[i].items()} != first for i in indices[1:]):
            continue
        keys = frozenset(key for i in indices for key, _ in blocks[i].values())
        block = [blocks[indices[0]][tail] for tail in blocks[indices[0]]]
        group = _SourceGroup(head + "{i}", len(indices), keys, block)
        (multi if len(indices) > 1 else single).append(group)
    chosen: list[_SourceGroup] = []
    for group in sorted(multi, key=lambda g: (-len(g.keys), g.template)):  # outermost first
        if all(group.keys.isdisjoint(other.keys) for other in chosen):
            chosen.append(group)
    covered = set().union(*(g.keys for g in chosen)) if chosen else set()
    singles = [g for g in single if not g.keys <= covered]
    return chosen + singles + _scanned_groups(specs, covered)


def _scanned_groups(specs: dict[str, Shape], covered: set[str]) -> list[_SourceGroup]:
    """Sub-trees whose tensors (4 or more, none a vector) all share one leading axis: scanned layers."""
    leaves: dict[str, list[str]] = defaultdict(list)
    for key in specs:
        if key in covered:
            continue
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
        if x is None:
            return None
        y = self.value(x)
        return int(y) if y.denominator == 1 and y >= 1 else None

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

            self.build_count += 1
            try:
                config = self.make_config(values)
                with torch.device("meta"):
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

    # -- step 3: what every other field does

    def _probe_fields(self) -> None:
        self.deps: dict[tuple[str, int], set[FieldPath]] = defaultdict(set)
        points: dict[tuple[str, int], dict[FieldPath, list[tuple[int, int]]]] = defaultdict(dict)
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

    # -- predictions

    def memo(self, values: dict[FieldPath, Any]) -> dict[str, Shape] | None:
        shapes = self.build({**self.base, **values})
        if shapes is None:  # e.g. a width the default head count does not divide: free fields do not matter
            shapes = self.build({**self.base, **{p: 1 for p in self.free if p in self.defaults and not isinstance(self.defaults[p], bool)}, **values})
        return shapes

    def predict(self, values: dict[FieldPath, Any], keys: Iterable[str]) -> list[tuple[str, Shape | None]]:
        """Target shapes (one block per stack) under ``values`` (unset fields: the class default)."""
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
                if form is not None:
                    (path,) = deps
                    dims[axis] = form.at(values[path])
                else:
                    shapes = self.memo({p: values.get(p) for p in deps})
                    dims[axis] = shapes[key][axis] if shapes is not None and key in shapes else None
            out.append((key, None if None in dims else tuple(dims)))
        return out

    def effective(self, values: dict[FieldPath, Any], path: FieldPath) -> int:
        value = values.get(path)
        return self.defaults[path] if value is None else value


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
        self.specs = {path: tuple(spec.shape) for path, spec in source.specs.items()}
        self.groups = _source_groups(self.specs)
        self._scores: dict[tuple, tuple[Score, _Match]] = {}
        self._indexes: list[_SourceIndex] = []  # kept alive: the score cache is keyed by their ids

    def index(self, items: list[tuple[str, Shape]]) -> _SourceIndex:
        index = _SourceIndex(items)
        self._indexes.append(index)
        return index

    # -- scoring

    def score(self, values: dict[FieldPath, Any], keys: list[str], index: _SourceIndex) -> tuple[Score, _Match]:
        cache_key = (id(index), keys, tuple(sorted((p, v) for p, v in values.items() if v is not None)))
        if cache_key not in self._scores:
            result = index.match(self.p.predict(values, keys))
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
            x0 = self.p.effective(values, path) or 1
            xs = [x0, 2 * x0, 3 * x0, 4 * x0]
            rows = [dict(self.p.predict({**values, path: x}, sorted({k for k, _ in local}))) for x in xs]
            for key, axis in local:
                pts = [(x, row[key][axis]) for x, row in zip(xs, rows) if row.get(key) is not None]
                poly = _fit(pts) if len(pts) == 4 else None
                if poly is not None:
                    for s in index.values:
                        found.update(_solve(poly, s))
        return found

    def trials(self, path: FieldPath, values: dict[FieldPath, Any], keys: list[str], index: _SourceIndex) -> list[dict]:
        current = self.p.effective(values, path)
        out = []
        for v in sorted(self.candidates(path, values, keys, index)):
            if v == values.get(path):
                continue
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
        best, _ = self.score(values, keys, index)
        order = sorted(fields, key=lambda p: (-len(self.p.positions[p]), p))
        for _ in range(rounds):
            improved = False
            for path in order:
                top, top_values = best, None
                for trial in self.trials(path, values, keys, index):
                    s, _ = self.score(trial, keys, index)
                    if s > top:
                        top, top_values = s, trial
                if top_values is not None:
                    best, values, improved = top, top_values, True
            if not improved:
                break
        return values, best

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
            for source in self.groups:
                if not keys or not (len(keys) / 4 <= len(source.block) <= 4 * len(keys)):
                    continue
                index = self.index(source.block)
                values, _ = self.descend(fields, {}, keys, index)
                score, result = self.score(values, keys, index)
                if result.pairs:
                    rows.append(((score, source.count > 1, -result.unused), source, values, index))
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


def infer_config(model_class: type, source: ParamTree) -> InferredConfig:
    """A config for ``model_class`` whose target shapes fit ``source`` (shapes only; no data read)."""
    started = time.perf_counter()
    p = probe(model_class)
    with _quiet():
        result = _infer(p, source)
    result.seconds = time.perf_counter() - started
    return result


def _infer(p: _Probe, source: ParamTree) -> InferredConfig:
    solver = _Solver(p, source)

    # phase 1: every target stack against every source stack
    ranked = solver.solve_blocks()
    values: dict[FieldPath, Any] = {}
    strength: dict[FieldPath, tuple] = {}
    for n, rows in ranked.items():
        if rows:
            rank, _, found, _ = rows[0]
            for path, value in found.items():
                if value is not None and (path not in strength or rank > strength[path]):
                    values[path], strength[path] = value, rank
    chosen_sources = []
    for rows in ranked.values():
        if rows and rows[0][1] not in chosen_sources and rows[0][0][0][0] > 0:
            chosen_sources.append(rows[0][1])

    # phase 2: all shape fields against the whole source (one block per stack on both sides)
    index = solver.collapsed_index(chosen_sources)
    keys = p.keys
    fields = [f for f in p.shape_fields if f not in p.counts and f not in p.structural]
    values, best = solver.descend(fields, values, keys, index)

    # which fields the source actually fixes
    reports: dict[FieldPath, FieldInference] = {}
    final: dict[FieldPath, Any] = {}
    base_pred = dict(p.predict(values, keys))
    _, best_match = solver.score(values, keys, index)
    for path in fields:
        rivals = []
        alternatives = solver.candidates(path, values, keys, index) | {None}
        value = p.effective(values, path)
        alternatives |= {2 * value, value + 1, max(1, value // 2)}
        for alt in alternatives:
            if alt == values.get(path) or (alt == value and values.get(path) is None):
                continue
            trial = {**values, path: alt}
            if dict(p.predict(trial, keys)) == base_pred:
                continue
            s, _ = solver.score(trial, keys, index)
            if s >= best:
                rivals.append(alt)
        dependent = sorted({k for k, _ in p.positions[path]})
        evidence = _pair_evidence(dependent, base_pred, best_match, index)
        if rivals or evidence is None:
            why = "the source does not fix it" if evidence is None else f"ties with {sorted(r for r in rivals if r is not None)[:4] or 'the default'}"
            reports[path] = FieldInference(_fmt(path), None, DEFAULT, f"shape field; {why}", True)
        else:
            final[path] = value
            reports[path] = FieldInference(_fmt(path), value, INFERRED, evidence, True)

    # layer counts: the best-fitting source stack of each target stack
    counts: dict[FieldPath, tuple[int, str, tuple]] = {}
    matched_groups: dict[FieldPath, _SourceGroup] = {}
    for n, group in enumerate(p.groups):
        bkeys = solver.block_keys(group)
        rows = []
        for source_group in solver.groups:
            if not bkeys or not (len(bkeys) / 4 <= len(source_group.block) <= 4 * len(bkeys)):
                continue
            sidx = _SourceIndex(source_group.block)
            result = sidx.match(p.predict(final, bkeys))
            if result.pairs:
                rows.append(((result.score, source_group.count > 1, -result.unused), source_group))
        if not rows:
            continue
        rows.sort(key=lambda r: r[0], reverse=True)
        tied = [g for r, g in rows if r == rows[0][0]]
        pick = tied[0]
        if len({g.count for g in tied}) > 1:
            pick = _tie_break(p, solver, group, tied, final)
        if rows[0][0][0][0] <= 0:
            continue
        previous = counts.get(group.field)
        if previous is None or rows[0][0] > previous[2]:
            counts[group.field] = (pick.count, f"{pick.describe()} ~ {group.template}", rows[0][0])
            matched_groups[group.field] = pick
    for path in p.counts:
        if path in counts:
            final[path] = counts[path][0]
            reports[path] = FieldInference(_fmt(path), counts[path][0], INFERRED, counts[path][1], True)
        else:
            reports[path] = FieldInference(_fmt(path), None, DEFAULT, "layer count; no source stack of blocks fits the target's", True)

    # attention heads: from split kernels (D, H, Dh) in the matched source blocks
    for count_path, source_group in matched_groups.items():
        scope = count_path[:-1]
        name = p.attribute_maps.get(scope, {}).get("num_attention_heads", "num_attention_heads")
        heads = scope + (name,)
        if heads not in p.defaults or heads in final:
            continue
        found = _split_heads(source_group.block)
        if found is not None:
            value, key, shape = found
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
            scored.append((index.match(kept).score, option))
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

    unexplained = []
    import torch

    try:
        with torch.device("meta"):
            model = p.model_class(config)
        target = [(k, tuple(int(d) for d in t.shape)) for k, t in model.state_dict().items()]
        full = _SourceIndex(list(solver.specs.items())).match(target)
        unexplained = [k for k, _ in target if k not in full.pairs]
    except Exception as exc:  # _final_config checked the build; this is a safety net
        raise TargetError(f"cannot build {p.model_class.__name__} from the inferred config: {exc}") from exc
    return InferredConfig(config, fields_out, unexplained)


def _kept(p: _Probe, key: str) -> bool:
    for group in p.groups:
        for i in range(1, p.counts[group.field]):
            if key.startswith(f"{group.prefix}.{i}."):
                return False
    return True


def _pair_evidence(dependent: list[str], predicted: dict, match: _Match, index: _SourceIndex) -> str | None:
    """'target key shape ~ source key shape' for the first target tensor the field shapes that is explained."""
    ranked = sorted(dependent, key=lambda k: (-len(_canon(predicted.get(k)) or ()), k))
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
        if len(shape) != 3:
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


def _tie_break(p: _Probe, solver: _Solver, group: _TargetGroup, tied: list[_SourceGroup], final: dict) -> _SourceGroup:
    """Source stacks that fit a block equally well: pick the one whose surroundings fit the target stack's."""
    others = [g.prefix for g in p.groups if g is not group]
    scope = _exclusive_ancestor(group.prefix, others, ".")
    stacked = tuple(f"{g.prefix}." for g in p.groups)
    target_ctx = [k for k in p.keys if k.startswith(scope) and not k.startswith(stacked)]
    best, pick = None, tied[0]
    for candidate in tied:
        ancestor = _exclusive_ancestor(candidate.template, [g.template for g in tied if g is not candidate], "./")
        items = [(k, s) for k, s in solver.specs.items() if k.startswith(ancestor) and k not in candidate.keys]
        if not items:
            continue
        score = _SourceIndex(items).match(p.predict(final, target_ctx)).score
        if best is None or score > best:
            best, pick = score, candidate
    return pick


def _exclusive_ancestor(prefix: str, others: list[str], seps: str) -> str:
    """The shortest leading part of ``prefix`` (cut at a separator) that no other prefix starts with."""
    for j, ch in enumerate(prefix):
        if ch in seps:
            head = prefix[: j + 1]
            if not any(o.startswith(head) for o in others):
                return head
    return prefix


def _final_config(p: _Probe, final: dict[FieldPath, Any]) -> tuple[Any, dict[FieldPath, tuple[Any, str]]]:
    """The config of the inferred values; free fields moved off a default that does not build."""
    if p.build(final) is not None:
        return p.make_config(final), {}
    adjusted: dict[FieldPath, tuple[Any, str]] = {}
    free_ints = [f for f in sorted(p.free) if not isinstance(p.defaults.get(f), bool) and f in p.defaults and f not in final]
    trial = dict(final)
    for path in free_ints:
        scope = path[:-1]
        sizes = {v for q, v in final.items() if q[:-1] == scope and isinstance(v, int) and not isinstance(v, bool) and v > 0}
        options = {d for s in sizes for d in _divisors(s)} | {1}
        default = p.defaults[path]
        if default is None or default < 1:
            continue
        for option in sorted(options, key=lambda v: (abs(math.log(v / default)), v)):
            if option == default:
                continue
            if p.build({**trial, path: option}) is not None:
                trial[path] = option
                adjusted[path] = (option, f"default {default} does not build with the inferred sizes; nearest value that does")
                return p.make_config(trial), adjusted
    raise TargetError(f"cannot build {p.model_class.__name__} from the inferred config {({_fmt(k): v for k, v in final.items()})}")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
