"""The op algebra: pure transforms of arrays, each with a shape rule and an inverse.

Ops are written in axes, not sizes ("merge axes 1..2", "chunk axis 0 in 3"), so one
mapping serves every model size of a family. Where an inverse needs sizes the forward
op threw away (the factors of a merged axis, the sizes of concatenated parts), the
caller passes the forward input shape to ``reverse``.

Three arities:
- unary ops map one array to one array (and map over every array of a multi-source rule);
- selecting ops (``chunk``, ``select``) are unary too, but their inverse combines several
  rules' outputs, so ``Mapping.reverse`` groups them;
- combining ops (``concat``, ``stack``) turn the list of a multi-source rule into one array.

Every op works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from .errors import MappingError

Shape = tuple[int, ...]

# --------------------------------------------------------------------------- backends


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


class _NumpyBackend:
    permute = staticmethod(lambda x, perm: np.transpose(x, perm))
    reshape = staticmethod(lambda x, shape: np.reshape(x, shape))
    concat = staticmethod(lambda xs, axis: np.concatenate(xs, axis=axis))
    stack = staticmethod(lambda xs, axis: np.stack(xs, axis=axis))
    squeeze = staticmethod(lambda x, axis: np.squeeze(x, axis=axis))
    unsqueeze = staticmethod(lambda x, axis: np.expand_dims(x, axis))


class _TorchBackend:
    permute = staticmethod(lambda x, perm: x.permute(*perm))
    reshape = staticmethod(lambda x, shape: x.reshape(shape))
    concat = staticmethod(lambda xs, axis: __import__("torch").cat(list(xs), dim=axis))
    stack = staticmethod(lambda xs, axis: __import__("torch").stack(list(xs), dim=axis))
    squeeze = staticmethod(lambda x, axis: x.squeeze(axis))
    unsqueeze = staticmethod(lambda x, axis: x.unsqueeze(axis))


def _backend(x: Any):
    return _TorchBackend if _is_torch(x) else _NumpyBackend


def _norm_axis(axis: int, ndim: int, op: str) -> int:
    if not -ndim <= axis < ndim:
        raise MappingError(f"{op}: axis {axis} out of range for a {ndim}-d array")
    return axis % ndim


# --------------------------------------------------------------------------- registry

OPS: dict[str, type["Op"]] = {}


def register(cls: type["Op"]) -> type["Op"]:
    if cls.name in OPS:
        raise ValueError(f"op {cls.name!r} registered twice")
    OPS[cls.name] = cls
    return cls


class Op(ABC):
    """One transform. Subclasses are frozen dataclasses registered under ``name``."""

    name: ClassVar[str]
    combines: ClassVar[bool] = False  # takes the list of a multi-source rule
    selects: ClassVar[bool] = False  # picks one part; the inverse combines rules

    # ---- data
    @abstractmethod
    def apply(self, x: Any) -> Any:
        """Apply to one array (or, for combining ops, a sequence of arrays)."""

    @abstractmethod
    def output_shape(self, shape: Any) -> Shape:
        """The output shape, from the input shape (a list of shapes for combining ops)."""

    # ---- inverse
    def reverse(self, input_shape: Shape | None = None) -> "Op":
        """The op that maps this op's output back to its input (unary ops only)."""
        raise MappingError(f"{self.name} has no unary inverse; Mapping.reverse regroups it")

    # ---- templates
    def bind(self, bindings: dict[str, int]) -> "Op":
        """Resolve template placeholders such as ``index: "{i}"``."""
        return self

    # ---- serialisation
    def to_dict(self) -> dict:
        return {self.name: self._args()}

    def _args(self) -> Any:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def _from_args(cls, args: Any) -> "Op":
        if not isinstance(args, dict):
            raise MappingError(f"op {cls.name}: expected a mapping of arguments, got {args!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise MappingError(f"op {cls.name}: unknown argument(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            return cls(**args)
        except TypeError as exc:
            raise MappingError(f"op {cls.name}: {exc}") from exc

    def __str__(self) -> str:
        args = self._args()
        if isinstance(args, dict):
            inner = ", ".join(f"{k}={v}" for k, v in args.items() if v is not None)
        else:
            inner = str(args)
        return f"{self.name}({inner})"


def op_from_dict(data: Any) -> Op:
    if isinstance(data, str):
        data = {data: {}}
    if not isinstance(data, dict) or len(data) != 1:
        raise MappingError(f"an op is written as {{name: arguments}}, got {data!r}")
    ((name, args),) = data.items()
    if name not in OPS:
        raise MappingError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}")
    return OPS[name]._from_args(args)


class AxisOnly:
    """Ops whose only argument is an axis are written ``{name: axis}``."""

    def _args(self):
        return self.axis

    @classmethod
    def _from_args(cls, args):
        if isinstance(args, dict) and set(args) == {"axis"}:
            args = args["axis"]
        if isinstance(args, bool) or not isinstance(args, int):
            raise MappingError(f"op {cls.name} takes one integer axis, got {args!r}")
        return cls(axis=args)


# --------------------------------------------------------------------------- unary ops


@register
@dataclass(frozen=True)
class Transpose(Op):
    """Permute axes: ``perm[k]`` is the input axis that becomes output axis k.

    Flax dense kernels (in, out) -> torch (out, in) is ``[1, 0]``; conv HWIO -> OIHW is ``[3, 2, 0, 1]``.
    """

    name: ClassVar[str] = "transpose"
    perm: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "perm", tuple(int(p) for p in self.perm))
        if sorted(self.perm) != list(range(len(self.perm))):
            raise MappingError(f"transpose: {list(self.perm)} is not a permutation")

    def apply(self, x):
        if x.ndim != len(self.perm):
            raise MappingError(f"transpose {list(self.perm)} needs a {len(self.perm)}-d array, got shape {tuple(x.shape)}")
        return _backend(x).permute(x, self.perm)

    def output_shape(self, shape):
        if len(shape) != len(self.perm):
            raise MappingError(f"transpose {list(self.perm)} needs a {len(self.perm)}-d array, got shape {tuple(shape)}")
        return tuple(shape[p] for p in self.perm)

    def reverse(self, input_shape=None):
        return Transpose(tuple(int(i) for i in np.argsort(self.perm)))

    def _args(self):
        return list(self.perm)

    @classmethod
    def _from_args(cls, args):
        if not isinstance(args, (list, tuple)):
            raise MappingError(f"transpose takes a list of axes, got {args!r}")
        return cls(tuple(args))


@register
@dataclass(frozen=True)
class MergeAxes(Op):
    """Merge the contiguous axes ``start..end`` (inclusive) into one: (D, H, Dh) -> (D, H*Dh)."""

    name: ClassVar[str] = "merge_axes"
    start: int
    end: int

    def __post_init__(self):
        if self.end <= self.start:
            raise MappingError(f"merge_axes: end ({self.end}) must be after start ({self.start})")

    def _span(self, ndim: int) -> tuple[int, int]:
        start, end = _norm_axis(self.start, ndim, self.name), _norm_axis(self.end, ndim, self.name)
        if end <= start:
            raise MappingError(f"merge_axes {self.start}..{self.end}: empty span for a {ndim}-d array")
        return start, end

    def output_shape(self, shape):
        start, end = self._span(len(shape))
        return tuple(shape[:start]) + (math.prod(shape[start : end + 1]),) + tuple(shape[end + 1 :])

    def apply(self, x):
        return _backend(x).reshape(x, self.output_shape(tuple(x.shape)))

    def reverse(self, input_shape=None):
        if input_shape is None:
            raise MappingError("merge_axes: the inverse needs the input shape (the sizes that were merged)")
        start, end = self._span(len(input_shape))
        return SplitAxis(axis=start, sizes=tuple(input_shape[start : end + 1]))


@register
@dataclass(frozen=True)
class SplitAxis(Op):
    """Split one axis into several: (H*Dh,) -> (H, Dh). One size may be -1."""

    name: ClassVar[str] = "split_axis"
    axis: int
    sizes: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if len(self.sizes) < 2 or sum(s == -1 for s in self.sizes) > 1 or any(s == 0 or s < -1 for s in self.sizes):
            raise MappingError(f"split_axis: sizes {list(self.sizes)} must be 2+ positive sizes, at most one -1")

    def output_shape(self, shape):
        axis = _norm_axis(self.axis, len(shape), self.name)
        known = math.prod(s for s in self.sizes if s != -1)
        sizes = tuple(shape[axis] // known if s == -1 else s for s in self.sizes)
        if math.prod(sizes) != shape[axis]:
            raise MappingError(f"split_axis: cannot split axis of size {shape[axis]} into {list(self.sizes)}")
        return tuple(shape[:axis]) + sizes + tuple(shape[axis + 1 :])

    def apply(self, x):
        return _backend(x).reshape(x, self.output_shape(tuple(x.shape)))

    def reverse(self, input_shape=None):
        if input_shape is not None:
            axis = _norm_axis(self.axis, len(input_shape), self.name)
        elif self.axis >= 0:
            axis = self.axis
        else:
            raise MappingError("split_axis: the inverse of a negative axis needs the input shape")
        return MergeAxes(start=axis, end=axis + len(self.sizes) - 1)

    def _args(self):
        return {"axis": self.axis, "sizes": list(self.sizes)}


@register
@dataclass(frozen=True)
class Squeeze(AxisOnly, Op):
    """Drop an axis of size 1: pos-embedding (1, N, D) -> (N, D)."""

    name: ClassVar[str] = "squeeze"
    axis: int

    def output_shape(self, shape):
        axis = _norm_axis(self.axis, len(shape), self.name)
        if shape[axis] != 1:
            raise MappingError(f"squeeze: axis {self.axis} of shape {tuple(shape)} is not of size 1")
        return tuple(shape[:axis]) + tuple(shape[axis + 1 :])

    def apply(self, x):
        self.output_shape(tuple(x.shape))
        return _backend(x).squeeze(x, self.axis)

    def reverse(self, input_shape=None):
        if self.axis < 0 and input_shape is None:
            raise MappingError("squeeze: the inverse of a negative axis needs the input shape")
        axis = self.axis if input_shape is None else _norm_axis(self.axis, len(input_shape), self.name)
        return Unsqueeze(axis=axis)



@register
@dataclass(frozen=True)
class Unsqueeze(AxisOnly, Op):
    """Insert an axis of size 1 before ``axis``: (N, D) -> (1, N, D)."""

    name: ClassVar[str] = "unsqueeze"
    axis: int

    def output_shape(self, shape):
        axis = _norm_axis(self.axis, len(shape) + 1, self.name)
        return tuple(shape[:axis]) + (1,) + tuple(shape[axis:])

    def apply(self, x):
        return _backend(x).unsqueeze(x, self.axis)

    def reverse(self, input_shape=None):
        if self.axis < 0 and input_shape is None:
            raise MappingError("unsqueeze: the inverse of a negative axis needs the input shape")
        axis = self.axis if input_shape is None else _norm_axis(self.axis, len(input_shape) + 1, self.name)
        return Squeeze(axis=axis)



# --------------------------------------------------------------------------- selecting ops

_PLACEHOLDER = re.compile(r"^\{(\w+)\}$")


def _bind_int(value: int | str, bindings: dict[str, int], what: str) -> int | str:
    if isinstance(value, str):
        match = _PLACEHOLDER.match(value)
        if not match:
            raise MappingError(f"{what}: {value!r} is neither an integer nor a placeholder like '{{i}}'")
        if match.group(1) in bindings:
            return int(bindings[match.group(1)])
    return value


def _need_int(value: int | str, what: str) -> int:
    if isinstance(value, str):
        raise MappingError(f"{what}: placeholder {value} is not bound")
    return value


@register
@dataclass(frozen=True)
class Chunk(Op):
    """Take part ``index`` of an axis cut into ``parts`` equal parts or into ``sizes``.

    Fused qkv / in_proj -> q, k, v are three rules with indices 0, 1, 2.
    """

    name: ClassVar[str] = "chunk"
    selects: ClassVar[bool] = True
    axis: int
    index: int
    parts: int | None = None
    sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        if (self.parts is None) == (self.sizes is None):
            raise MappingError("chunk: give exactly one of parts or sizes")
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        count = self.parts if self.parts is not None else len(self.sizes)
        if count < 2:
            raise MappingError("chunk: needs at least 2 parts")
        if not 0 <= self.index < count:
            raise MappingError(f"chunk: index {self.index} out of range for {count} parts")

    @property
    def count(self) -> int:
        return self.parts if self.parts is not None else len(self.sizes)

    def _bounds(self, shape) -> tuple[int, int, int]:
        axis = _norm_axis(self.axis, len(shape), self.name)
        if self.sizes is not None:
            if sum(self.sizes) != shape[axis]:
                raise MappingError(f"chunk: sizes {list(self.sizes)} do not add up to axis size {shape[axis]}")
            start = sum(self.sizes[: self.index])
            return axis, start, start + self.sizes[self.index]
        if shape[axis] % self.parts:
            raise MappingError(f"chunk: axis size {shape[axis]} is not divisible into {self.parts} parts")
        step = shape[axis] // self.parts
        return axis, step * self.index, step * (self.index + 1)

    def output_shape(self, shape):
        axis, start, stop = self._bounds(shape)
        return tuple(shape[:axis]) + (stop - start,) + tuple(shape[axis + 1 :])

    def apply(self, x):
        axis, start, stop = self._bounds(tuple(x.shape))
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    def _args(self):
        args = {"axis": self.axis, "index": self.index}
        if self.parts is not None:
            args["parts"] = self.parts
        else:
            args["sizes"] = list(self.sizes)
        return args


@register
@dataclass(frozen=True)
class Select(Op):
    """Take one index of an axis, dropping it: a scanned layer stack (L, ...) -> layer i."""

    name: ClassVar[str] = "select"
    selects: ClassVar[bool] = True
    axis: int
    index: int | str

    def bind(self, bindings):
        return Select(axis=self.axis, index=_bind_int(self.index, bindings, self.name))

    def output_shape(self, shape):
        axis = _norm_axis(self.axis, len(shape), self.name)
        index = _need_int(self.index, self.name)
        if not 0 <= index < shape[axis]:
            raise MappingError(f"select: index {index} out of range for axis of size {shape[axis]}")
        return tuple(shape[:axis]) + tuple(shape[axis + 1 :])

    def apply(self, x):
        self.output_shape(tuple(x.shape))
        index = [slice(None)] * x.ndim
        index[_norm_axis(self.axis, x.ndim, self.name)] = self.index
        return x[tuple(index)]


# --------------------------------------------------------------------------- combining ops


def _check_list(xs: Sequence[Any], op: str) -> None:
    if isinstance(xs, (np.ndarray,)) or _is_torch(xs) or len(xs) < 2:
        raise MappingError(f"{op} combines two or more arrays")


@register
@dataclass(frozen=True)
class Concat(AxisOnly, Op):
    """Join arrays along an existing axis: q, k, v -> in_proj; q + kv."""

    name: ClassVar[str] = "concat"
    combines: ClassVar[bool] = True
    axis: int

    def output_shape(self, shapes):
        _check_list(shapes, self.name)
        first = tuple(shapes[0])
        axis = _norm_axis(self.axis, len(first), self.name)
        for shape in shapes[1:]:
            if len(shape) != len(first) or any(a != b for k, (a, b) in enumerate(zip(shape, first)) if k != axis):
                raise MappingError(f"concat on axis {self.axis}: shapes {[tuple(s) for s in shapes]} do not fit")
        return first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1 :]

    def apply(self, xs):
        self.output_shape([tuple(x.shape) for x in xs])
        return _backend(xs[0]).concat(xs, self.axis)

    def part_inverse(self, index: int, input_shapes: Sequence[Shape]) -> Chunk:
        """The op that takes source ``index`` back out of the concatenation."""
        axis = _norm_axis(self.axis, len(input_shapes[0]), self.name)
        sizes = [s[axis] for s in input_shapes]
        if len(set(sizes)) == 1:
            return Chunk(axis=axis, index=index, parts=len(sizes))
        return Chunk(axis=axis, index=index, sizes=tuple(sizes))



@register
@dataclass(frozen=True)
class Stack(AxisOnly, Op):
    """Join equal-shaped arrays along a new axis: layers or experts -> one stacked tensor."""

    name: ClassVar[str] = "stack"
    combines: ClassVar[bool] = True
    axis: int

    def output_shape(self, shapes):
        if len(shapes) < 1:
            raise MappingError("stack needs at least one array")
        first = tuple(shapes[0])
        if any(tuple(s) != first for s in shapes):
            raise MappingError(f"stack: shapes differ: {sorted({tuple(s) for s in shapes})}")
        axis = _norm_axis(self.axis, len(first) + 1, self.name)
        return first[:axis] + (len(shapes),) + first[axis:]

    def apply(self, xs):
        self.output_shape([tuple(x.shape) for x in xs])
        return _backend(xs[0]).stack(xs, self.axis)

    def part_inverse(self, index: int, input_shapes: Sequence[Shape]) -> Select:
        return Select(axis=_norm_axis(self.axis, len(input_shapes[0]) + 1, self.name), index=index)



# --------------------------------------------------------------------------- chains


def chain_output_shape(ops: Sequence[Op], shapes: Sequence[Shape]) -> Shape:
    """Shape after running ``ops`` on sources of ``shapes`` (unary ops map over all)."""
    current: list[Shape] | Shape = [tuple(s) for s in shapes]
    for op in ops:
        if op.combines:
            current = op.output_shape(current)
        elif isinstance(current, list):
            current = [op.output_shape(s) for s in current]
        else:
            current = op.output_shape(current)
    if isinstance(current, list):
        if len(current) != 1:
            raise MappingError(f"{len(current)} sources but no op combines them")
        current = current[0]
    return tuple(current)


def apply_chain(ops: Sequence[Op], arrays: Sequence[Any]) -> Any:
    """Run ``ops`` over the source arrays of one rule and return the single result."""
    current: Any = list(arrays)
    for op in ops:
        if op.combines:
            current = op.apply(current)
        elif isinstance(current, list):
            current = [op.apply(x) for x in current]
        else:
            current = op.apply(current)
    if isinstance(current, list):
        if len(current) != 1:
            raise MappingError(f"{len(current)} sources but no op combines them")
        current = current[0]
    return current


def reverse_unary_chain(ops: Sequence[Op], input_shape: Shape) -> list[Op]:
    """Inverse of a chain of unary ops applied to an array of ``input_shape``."""
    shapes = [tuple(input_shape)]
    for op in ops:
        shapes.append(op.output_shape(shapes[-1]))
    return [op.reverse(shape) for op, shape in zip(reversed(ops), reversed(shapes[:-1]))]
