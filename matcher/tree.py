"""TensorSpec and ParamTree: what a checkpoint or a model holds, without its data."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .errors import SourceError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: shape, dtype name (numpy spelling, e.g. ``float32``, ``bfloat16``) and kind.

    ``kind`` is what the owning module says (``Linear.weight``, ``LayerNorm.bias``...) or,
    for source formats, ``None`` until something knows better.
    """

    path: str
    shape: Shape
    dtype: str
    kind: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(numpy_dtype(self.dtype)).itemsize


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a dtype name, including ml_dtypes' bfloat16 and float8 types."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        try:
            return np.dtype(getattr(ml_dtypes, name))
        except AttributeError as exc:
            raise SourceError(f"unsupported dtype {name!r}") from exc


_NATURAL = re.compile(r"(\d+)")


def natural_key(path: str) -> tuple:
    """Sort key that puts layer 10 after layer 9."""
    return tuple(int(part) if part.isdigit() else part for part in _NATURAL.split(path))


@dataclass
class ParamTree:
    """Ordered ``path -> TensorSpec`` with lazy access to the data of one tensor at a time."""

    specs: dict[str, TensorSpec]
    loader: Callable[[str], Any] | None = None
    origin: str = ""
    format: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, path: object) -> bool:
        return path in self.specs

    def __getitem__(self, path: str) -> TensorSpec:
        return self.specs[path]

    def keys(self):
        return self.specs.keys()

    def shapes(self) -> dict[str, Shape]:
        return {path: spec.shape for path, spec in self.specs.items()}

    def read(self, path: str) -> Any:
        """The data of one tensor, as a numpy array (or a torch tensor where numpy cannot hold it)."""
        if self.loader is None:
            raise SourceError("this tree has shapes only, no data", path=self.origin)
        if path not in self.specs:
            raise SourceError(f"no tensor named {path!r}", path=self.origin)
        return self.loader(path)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], origin: str = "<memory>", format: str = "memory") -> "ParamTree":
        """A tree over in-memory numpy arrays or torch tensors (tests, converter audits)."""
        specs = {path: TensorSpec(path, tuple(int(d) for d in a.shape), dtype_name(a)) for path, a in arrays.items()}
        return cls(specs, loader=arrays.__getitem__, origin=origin, format=format)


def dtype_name(array: Any) -> str:
    """numpy-style dtype name of a numpy array or torch tensor."""
    dtype = array.dtype
    if isinstance(dtype, np.dtype):
        return dtype.name
    return str(dtype).removeprefix("torch.")
