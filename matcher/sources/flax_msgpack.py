"""Flax msgpack checkpoints (``flax.serialization.to_bytes``, scenic/T5X-style restores).

Nested dicts are flattened with '/' like big_vision keys. Arrays are flax's msgpack
extension type 1 ``(shape, dtype name, C-order bytes)``; chunked giant arrays are joined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec, numpy_dtype
from . import register

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3


def _is_msgpack_map(head: bytes, path: Path) -> bool:
    first = head[0]
    # 0x80 alone is an empty map: no checkpoint starts so, but every pickle (protocol 2+) does.
    return 0x81 <= first <= 0x8F or first in (0xDE, 0xDF)


def _ndarray(data: bytes) -> np.ndarray:
    import msgpack

    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    dtype_name = dtype.decode() if isinstance(dtype, bytes) else dtype
    expected = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype_name).itemsize
    if len(buffer) != expected:
        raise ValueError(f"array of shape {tuple(shape)} {dtype_name} holds {len(buffer)} bytes, needs {expected}")
    return np.frombuffer(buffer, dtype=numpy_dtype(dtype_name)).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code == _EXT_NDARRAY:
        return _ndarray(data)
    if code == _EXT_SCALAR:
        return _ndarray(data)[()]
    return msgpack.ExtType(code, data)


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], ignored: list[str]) -> None:
    if isinstance(obj, dict):
        if obj.get("__msgpack_chunked_array__"):
            chunks = obj["chunks"]
            joined = np.concatenate([chunks[str(i)].ravel() for i in range(len(chunks))])
            out[prefix] = joined.reshape(tuple(obj["shape"]))
            return
        for key, value in obj.items():
            key = key.decode() if isinstance(key, bytes) else str(key)
            _flatten(value, f"{prefix}/{key}" if prefix else key, out, ignored)
    elif isinstance(obj, np.ndarray) and obj.ndim > 0:
        out[prefix] = obj
    elif isinstance(obj, (np.ndarray, np.generic)):
        out[prefix] = np.asarray(obj)
    else:
        ignored.append(prefix or "<root>")


@register("flax_msgpack", _is_msgpack_map)
def open_msgpack(path: Path) -> ParamTree:
    try:
        import msgpack
    except ImportError as exc:  # pragma: no cover - msgpack is a dependency
        raise SourceError("reading flax checkpoints needs the 'msgpack' package", path=str(path)) from exc
    try:
        with open(path, "rb") as handle:
            tree = msgpack.unpackb(handle.read(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise SourceError(f"not a readable flax msgpack checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", path=str(path)) from exc
    if not isinstance(tree, dict):
        raise SourceError("a flax checkpoint holds a nested dict of arrays", path=str(path))
    arrays: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    _flatten(tree, "", arrays, ignored)
    specs = {k: TensorSpec(k, tuple(int(d) for d in a.shape), a.dtype.name) for k, a in arrays.items()}
    return ParamTree(specs, loader=arrays.__getitem__, origin=str(path), format="flax_msgpack", info={"ignored_entries": ignored})
