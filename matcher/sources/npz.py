"""numpy .npz archives (big_vision checkpoints): headers read from the zip, arrays on demand.

Keys are kept as stored ('/'-joined in big_vision). Pickled object arrays are refused.
bfloat16 arrays written by numpy/JAX carry no dtype name (descr ``|V2``): they are read
as bfloat16, the only 2-byte void type such checkpoints use.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec
from . import register

_ZIP_MAGIC = b"PK\x03\x04"


def _is_npz(head: bytes, path: Path) -> bool:
    if not head.startswith(_ZIP_MAGIC):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return path.suffix == ".npz"  # a broken npz still deserves the npz reader's error
    return bool(names) and all(name.endswith(".npy") for name in names)


def _dtype_name(dtype: np.dtype, key: str, origin: Path) -> str:
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
        return "bfloat16"
    if dtype.hasobject or dtype.kind == "V":
        raise SourceError(f"array {key!r} has dtype {dtype} (pickled objects or records are not loaded)", path=str(origin))
    return dtype.name


def _read_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(handle)
    raise ValueError(f"unsupported npy version {version}")


@register("npz", _is_npz)
def open_npz(path: Path) -> ParamTree:
    try:
        archive = zipfile.ZipFile(path)
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SourceError(f"not a readable npz archive ({exc})", path=str(path)) from exc
    specs: dict[str, TensorSpec] = {}
    layout: dict[str, tuple[str, bool, np.dtype]] = {}
    for member in members:
        key = member.filename[: -len(".npy")]
        try:
            with archive.open(member) as handle:
                shape, fortran, dtype = _read_header(handle)
                header_size = handle.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise SourceError(f"array {key!r}: unreadable npy header ({exc})", path=str(path)) from exc
        name = _dtype_name(dtype, key, path)
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + header_size
        if member.file_size != expected:
            raise SourceError(
                f"array {key!r}: header says {shape} {name} ({expected} bytes) but the entry holds {member.file_size}",
                path=str(path),
            )
        specs[key] = TensorSpec(key, tuple(int(d) for d in shape), name)
        layout[key] = (member.filename, fortran, dtype)

    def load(key: str) -> np.ndarray:
        filename, _, dtype = layout[key]
        try:
            with archive.open(filename) as handle:
                array = np.lib.format.read_array(handle, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise SourceError(f"array {key!r}: data unreadable ({exc})", path=str(path)) from exc
        if specs[key].dtype == "bfloat16":
            import ml_dtypes

            array = array.view(ml_dtypes.bfloat16)
        return array

    return ParamTree(specs, loader=load, origin=str(path), format="npz")
