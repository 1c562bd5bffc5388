"""Flax msgpack checkpoints (``flax.serialization.to_bytes``, scenic/T5X-style restores).

Nested dicts are flattened with '/' like big_vision keys. Arrays are flax's msgpack
extension type 1 ``(shape, dtype name, C-order bytes)``; chunked giant arrays are joined.

The whole file is parsed in memory (msgpack bounds every length by the buffer's); each
array's shape × itemsize is checked against its payload before numpy sees it, only
numeric dtypes are accepted, and nesting is bounded (msgpack's own stack limit, then an
iterative flatten).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec, numpy_dtype
from . import register
from .checks import reason, short

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_NUMERIC_KINDS = "biufc"
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz")
MAX_DEPTH = 100  # nesting of dicts holding the arrays (msgpack itself stops at 1024)
MAX_ENTRIES = 1_000_000


class _BadArray(Exception):
    """An ndarray extension whose payload is inconsistent (raised inside msgpack's ext hook)."""


def _is_msgpack_map(head: bytes, path: Path) -> bool:
    from .safetensors_file import _is_safetensors

    first = head[0]
    if _is_safetensors(head, path):
        # a safetensors header length whose low byte is 0x81-0x8F (one file in 17) starts like a
        # msgpack fixmap; a msgpack map never has seven more bytes forming a small length and '{'
        return False
    # 0x80 alone is an empty map: no checkpoint starts so, but every pickle (protocol 2+) does.
    return 0x81 <= first <= 0x8F or first in (0xDE, 0xDF)


def _dtype(name: Any) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode("ascii", errors="replace")
    if not isinstance(name, str) or len(name) > 32:
        raise _BadArray(f"dtype {short(name, 40)} is not a dtype name")
    try:
        dtype = numpy_dtype(name)
    except Exception as exc:  # np.dtype parses many strings; ml_dtypes' lookup may fail in several ways
        raise _BadArray(f"unsupported dtype {short(name, 40)}") from exc
    if dtype.kind not in _NUMERIC_KINDS and dtype.name not in _ML_DTYPES:
        raise _BadArray(f"dtype {short(name, 40)} is not a numeric type")
    return dtype


def _ndarray(data: bytes) -> np.ndarray:
    import msgpack

    try:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    except Exception as exc:  # not msgpack, or not a 3-item array
        raise _BadArray(f"array payload is not (shape, dtype, bytes): {reason(exc)}") from exc
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _BadArray(f"bad array shape {short(shape)}")
    if not isinstance(buffer, bytes):
        raise _BadArray("array data is not a byte string")
    dtype = _dtype(dtype_name)
    expected = math.prod(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise _BadArray(f"array of shape {short(tuple(shape))} {dtype.name} holds {len(buffer)} bytes, needs {short(expected, 40)}")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code == _EXT_NDARRAY:
        return _ndarray(data)
    if code == _EXT_SCALAR:
        return _ndarray(data)[()]
    return msgpack.ExtType(code, data)


def _key_text(key: Any) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", errors="backslashreplace")
    try:
        return str(key)
    except ValueError as exc:  # an int beyond sys.get_int_max_str_digits()
        raise _BadArray(f"a key cannot be turned into a name ({reason(exc)})") from exc


def _chunked(obj: dict, prefix: str) -> np.ndarray:
    """A ``__msgpack_chunked_array__`` entry joined back into one array."""
    chunks, shape = obj.get("chunks"), obj.get("shape")
    if isinstance(shape, dict):  # flax writes tuples as {"0": d0, "1": d1, ...}
        shape = [shape.get(str(i)) for i in range(len(shape))]
    if not isinstance(chunks, dict) or not chunks or not isinstance(shape, (list, tuple)):
        raise _BadArray(f"chunked array {short(prefix)} lacks its chunks or shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _BadArray(f"chunked array {short(prefix)} has a bad shape {short(shape)}")
    parts = [chunks.get(str(i)) for i in range(len(chunks))]
    if not all(isinstance(p, np.ndarray) for p in parts) or len({p.dtype for p in parts}) != 1:
        raise _BadArray(f"chunked array {short(prefix)} has missing or mixed chunks")
    if sum(p.size for p in parts) != math.prod(shape):
        raise _BadArray(f"chunked array {short(prefix)}: chunks hold {sum(p.size for p in parts)} values, shape {short(tuple(shape))} needs {short(math.prod(shape), 40)}")
    return np.concatenate([p.ravel() for p in parts]).reshape(shape)


def _flatten(tree: dict) -> tuple[dict[str, np.ndarray], list[str]]:
    out: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", tree, 0)]
    visited = 0
    while stack:
        prefix, obj, depth = stack.pop()
        visited += 1
        if depth > MAX_DEPTH or visited > MAX_ENTRIES:
            raise _BadArray(f"entries nested more than {MAX_DEPTH} deep" if depth > MAX_DEPTH else f"more than {MAX_ENTRIES} entries")
        if isinstance(obj, dict) and "__msgpack_chunked_array__" in obj:
            array = _chunked(obj, prefix)
        elif isinstance(obj, dict):
            items = [(_key_text(key), value) for key, value in obj.items()]
            stack.extend((f"{prefix}/{key}" if prefix else key, value, depth + 1) for key, value in reversed(items))
            continue
        elif isinstance(obj, (np.ndarray, np.generic)):
            array = np.asarray(obj)
        else:
            ignored.append(prefix or "<root>")
            continue
        if prefix in out:
            raise _BadArray(f"two entries flatten to the same name {short(prefix)}")
        out[prefix] = array
    return out, ignored


@register("flax_msgpack", _is_msgpack_map)
def open_msgpack(path: Path) -> ParamTree:
    try:
        import msgpack
    except ImportError as exc:  # pragma: no cover - msgpack is a dependency
        raise SourceError("reading flax checkpoints needs the 'msgpack' package", path=str(path)) from exc
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror or exc}", path=str(path)) from exc
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except _BadArray as exc:
        raise SourceError(f"not a readable flax msgpack checkpoint ({exc})", path=str(path)) from exc
    except Exception as exc:  # ExtraData, FormatError, StackError, unhashable keys, bad UTF-8...
        raise SourceError(f"not a readable flax msgpack checkpoint ({reason(exc)})", path=str(path)) from exc
    if not isinstance(tree, dict):
        raise SourceError("a flax checkpoint holds a nested dict of arrays", path=str(path))
    try:
        arrays, ignored = _flatten(tree)
    except _BadArray as exc:
        raise SourceError(f"not a readable flax msgpack checkpoint ({exc})", path=str(path)) from exc
    specs = {k: TensorSpec(k, tuple(int(d) for d in a.shape), a.dtype.name) for k, a in arrays.items()}
    return ParamTree(specs, loader=arrays.__getitem__, origin=str(path), format="flax_msgpack", info={"ignored_entries": ignored})
