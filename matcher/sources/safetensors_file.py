"""safetensors files: the JSON header is validated against the file before any data is read."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec, numpy_dtype
from . import register
from .checks import ExactFile, short

MAX_HEADER = 100 * 1024 * 1024
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def _is_safetensors(head: bytes, path: Path) -> bool:
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 0 < size <= MAX_HEADER and head[8:9] == b"{"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> tuple[dict, int]:
    """The validated header (tensor entries only) and the offset where data starts.

    Everything is checked against the file's size before any tensor is read: the header
    length, each entry's types, shape × itemsize (Python integers, no overflow) against its
    offsets, and the offsets covering the data section exactly, without overlaps or gaps.
    """
    try:
        file_size = path.stat().st_size
        with ExactFile(path) as handle:
            raw = handle.read(0, 8)
            if len(raw) < 8:
                raise SourceError("truncated safetensors file (no header length)", path=str(path))
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER or 8 + size > file_size:
                raise SourceError(f"header length {size} does not fit a file of {file_size} bytes", path=str(path))
            text = handle.read(8, size)
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror or exc}", path=str(path)) from exc
    if len(text) != size:
        raise SourceError("file ended inside the header", path=str(path))
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise SourceError(f"header is not valid JSON ({exc if isinstance(exc, ValueError) else 'nested too deeply'})", path=str(path)) from exc
    if not isinstance(header, dict):
        raise SourceError("header is not a JSON object", path=str(path))
    header.pop("__metadata__", None)
    data_size = file_size - 8 - size
    spans = []
    for key, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"tensor {short(key)}: malformed header entry", path=str(path)) from exc
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SourceError(f"tensor {short(key)}: unsupported dtype {short(dtype)}", path=str(path))
        if (
            not isinstance(shape, list)
            or not all(_is_int(d) and d >= 0 for d in shape)
            or not (_is_int(start) and _is_int(stop))
            or not (0 <= start <= stop <= data_size)
        ):
            raise SourceError(f"tensor {short(key)}: offsets {short(start, 30)}..{short(stop, 30)} or shape {short(shape)} do not fit the file", path=str(path))
        nbytes = math.prod(shape) * numpy_dtype(DTYPES[dtype]).itemsize
        if nbytes != stop - start:
            raise SourceError(f"tensor {short(key)}: shape {short(shape)} {dtype} needs {short(nbytes, 40)} bytes, entry spans {stop - start}", path=str(path))
        spans.append((start, stop))
    spans.sort()
    position = 0
    for start, stop in spans:
        if start != position:
            raise SourceError("tensor data overlaps or leaves gaps", path=str(path))
        position = stop
    if position != data_size:
        raise SourceError(f"data section is {data_size} bytes but tensors cover {position} (truncated or padded)", path=str(path))
    return header, 8 + size


@register("safetensors", _is_safetensors)
def open_safetensors(path: Path) -> ParamTree:
    header, data_start = read_header(path)
    specs = {k: TensorSpec(k, tuple(e["shape"]), DTYPES[e["dtype"]]) for k, e in header.items()}

    def load(key: str) -> np.ndarray:
        start, stop = header[key]["data_offsets"]
        try:
            with open(path, "rb") as handle:
                handle.seek(data_start + start)
                buffer = handle.read(stop - start)
        except OSError as exc:
            raise SourceError(f"tensor {short(key)}: cannot read ({exc.strerror or exc})", path=str(path)) from exc
        if len(buffer) != stop - start:
            raise SourceError(f"tensor {short(key)}: file ended early", path=str(path))
        return np.frombuffer(buffer, dtype=numpy_dtype(specs[key].dtype)).reshape(specs[key].shape)

    return ParamTree(specs, loader=load, origin=str(path), format="safetensors")
