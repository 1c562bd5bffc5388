"""Writing outputs: a streaming safetensors writer and atomic output directories.

The safetensors header needs every tensor's shape and offset up front; the plan knows
them without data, so the header is written first and each tensor is then produced,
written and released one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import MatcherError
from .tree import numpy_dtype

SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    from .sources.torch_pickle import to_numpy

    return to_numpy(array)


def write_safetensors(
    path: Path,
    tensors: Sequence[OutputTensor],
    produce: Callable[[OutputTensor], Any],
    metadata: dict[str, str] | None = None,
    progress: Callable[[OutputTensor], None] | None = None,
) -> None:
    """Write ``tensors`` in order, calling ``produce`` for each one's data just before writing it."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise MatcherError(f"{tensor.name}: dtype {tensor.dtype} cannot be stored in safetensors")
        header[tensor.name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors:
            array = _as_numpy(produce(tensor))
            if tuple(array.shape) != tensor.shape or array.dtype != numpy_dtype(tensor.dtype):
                raise MatcherError(f"{tensor.name}: produced {tuple(array.shape)} {array.dtype}, planned {tensor.shape} {tensor.dtype}")
            handle.write(np.ascontiguousarray(array).tobytes())
            if progress:
                progress(tensor)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it becomes ``out``.

    On any failure or interruption the temporary directory is removed and ``out`` is
    untouched. An existing ``out`` is replaced only with ``force``.
    """
    out = Path(out)
    if out.exists() and not force:
        raise MatcherError("output already exists (use --force to replace it)", path=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "replaced")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
