"""numpy .npz archives (big_vision checkpoints): headers read from the zip, arrays on demand.

Keys are kept as stored ('/'-joined in big_vision). Pickled object arrays are refused.
bfloat16 arrays written by numpy/JAX carry no dtype name (descr ``|V2``): they are read
as bfloat16, the only 2-byte void type such checkpoints use.

Uncompressed members (what ``np.savez`` writes) are read as read-only views of the
memory-mapped file (``mapped.py``), CRC-checked; deflated ones through zipfile.

Nothing is trusted before it is checked: the zip directory against the archive size
(``checks``), each .npy header's length before it is read, and each header's shape ×
itemsize against the member's size, so an array is only allocated once its bytes are
known to be in the file.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec
from . import register
from .checks import ExactFile, open_checked_zip, reason, short, stored_data_offset
from .mapped import MappedFile

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 10000  # numpy's own limit for untrusted files
_NUMERIC_KINDS = "biufc"


def _is_npz(head: bytes, path: Path) -> bool:
    if not head.startswith(_ZIP_MAGIC):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # any broken zip: an .npz suffix still deserves the npz reader's error
        return path.suffix.lower() == ".npz"
    if any(name.endswith("data.pkl") for name in names):
        return False  # a PyTorch zip checkpoint
    return any(name.endswith(".npy") for name in names)


def _dtype_name(dtype: np.dtype, key: str, origin: Path) -> str:
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None and dtype.subdtype is None:
        return "bfloat16"
    if dtype.hasobject or dtype.kind == "V":
        raise SourceError(f"array {short(key)} has dtype {short(str(dtype), 60)} (pickled objects or records are not loaded)", path=str(origin))
    if dtype.kind not in _NUMERIC_KINDS:
        raise SourceError(f"array {short(key)} has dtype {short(str(dtype), 60)}, not a numeric type", path=str(origin))
    return dtype.name


def _read_header(handle) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """shape, Fortran order, dtype and header size of one .npy member; the header's length
    is checked before the header is read."""
    prefix = handle.read(8)
    if len(prefix) < 8 or not prefix.startswith(_NPY_MAGIC):
        raise ValueError("not an .npy array (bad magic)" if len(prefix) == 8 else "member ends inside the .npy magic")
    version = (prefix[6], prefix[7])
    if version == (1, 0):
        length_field, fmt, read = handle.read(2), "<H", np.lib.format.read_array_header_1_0
    elif version in ((2, 0), (3, 0)):
        length_field, fmt, read = handle.read(4), "<I", np.lib.format.read_array_header_2_0
    else:
        raise ValueError(f"unsupported npy version {version[0]}.{version[1]}")
    if len(length_field) != struct.calcsize(fmt):
        raise ValueError("member ends inside the .npy header")
    (length,) = struct.unpack(fmt, length_field)
    if length > MAX_NPY_HEADER:
        raise ValueError(f"header claims {length} bytes (limit {MAX_NPY_HEADER})")
    header = handle.read(length)
    if len(header) != length:
        raise ValueError("member ends inside the .npy header")
    with warnings.catch_warnings():  # e.g. numpy's note on headers written by Python 2
        warnings.simplefilter("ignore")
        shape, fortran, dtype = read(io.BytesIO(length_field + header))
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    return shape, bool(fortran), dtype, len(prefix) + len(length_field) + length


def _read_headers(archive: zipfile.ZipFile, path: Path) -> tuple[dict[str, TensorSpec], dict[str, tuple[zipfile.ZipInfo, np.dtype, bool, int]]]:
    with ExactFile(path) as exact:
        return _read_members(archive, exact, path)


def _read_members(archive: zipfile.ZipFile, exact: ExactFile, path: Path) -> tuple[dict[str, TensorSpec], dict[str, tuple[zipfile.ZipInfo, np.dtype, bool, int]]]:
    specs: dict[str, TensorSpec] = {}
    layout: dict[str, tuple[zipfile.ZipInfo, np.dtype, bool, int]] = {}
    for member in archive.infolist():
        if not member.filename.endswith(".npy"):
            raise SourceError(f"member {short(member.filename)} is not an .npy array", path=str(path))
        key = member.filename[: -len(".npy")]
        if key in specs:
            raise SourceError(f"array {short(key)} appears twice in the archive", path=str(path))
        try:
            if member.compress_type == zipfile.ZIP_STORED:  # exactly the header's bytes, none of the data's
                shape, fortran, dtype, header_size = _read_header(_MemberCursor(exact, member))
            else:  # the header is inside the compressed stream
                with archive.open(member) as handle:
                    shape, fortran, dtype, header_size = _read_header(handle)
        except Exception as exc:  # zipfile/zlib/numpy header parsing on untrusted bytes
            raise SourceError(f"array {short(key)}: unreadable npy header ({reason(exc)})", path=str(path)) from exc
        name = _dtype_name(dtype, key, path)
        expected = math.prod(shape) * dtype.itemsize + header_size
        if member.file_size != expected:
            raise SourceError(
                f"array {short(key)}: header says {short(shape)} {name} ({short(expected, 40)} bytes) but the entry holds {member.file_size}",
                path=str(path),
            )
        specs[key] = TensorSpec(key, shape, name)
        layout[key] = (member, dtype, fortran, header_size)
    return specs, layout


class _MemberCursor:
    """A stored member's bytes read in sequence, within the member, by exact reads."""

    def __init__(self, exact: ExactFile, member: zipfile.ZipInfo):
        self.exact = exact
        self.position = stored_data_offset(exact.read, member)
        self.end = self.position + member.file_size

    def read(self, length: int) -> bytes:
        data = self.exact.read(self.position, max(0, min(length, self.end - self.position)))
        self.position += len(data)
        return data


def _read_stored(path: Path, mapped: MappedFile | None, member: zipfile.ZipInfo, shape: tuple[int, ...], dtype: np.dtype,
                 fortran: bool, header_size: int) -> np.ndarray:
    """An uncompressed member's array without zipfile's chunked copies: a read-only view of the
    mapped file (or, where it cannot be mapped, read straight into its buffer), with the
    member's CRC-32 checked as zipfile checks it."""
    count = math.prod(shape)
    stored_shape = shape[::-1] if fortran else shape
    if mapped is not None:
        start = stored_data_offset(mapped.view, member)
        header = mapped.view(start, header_size)
        array = mapped.array(start + header_size, dtype, count, populate=True)  # the CRC reads it all
        data = memoryview(array.view(np.uint8))
    else:
        with ExactFile(path, headers_only=False) as handle:
            start = stored_data_offset(handle.read, member)
            header = handle.read(start, header_size)
            if len(header) != header_size:
                raise ValueError("member ends inside the .npy header")
            array = np.empty(count, dtype=dtype)
            data = memoryview(array.view(np.uint8))
            handle.read_into(start + header_size, data)
    if zlib.crc32(data, zlib.crc32(header)) != member.CRC:
        raise ValueError(f"Bad CRC-32 for file {member.filename!r}")
    array = array.reshape(stored_shape)
    return array.T if fortran else array


@register("npz", _is_npz)
def open_npz(path: Path) -> ParamTree:
    archive = open_checked_zip(path, "npz archive")
    try:
        specs, layout = _read_headers(archive, path)
    except BaseException:
        archive.close()
        raise

    stored = any(member.compress_type == zipfile.ZIP_STORED for member, *_ in layout.values())
    mapped = MappedFile.open(path) if stored else None  # deflated members are read through zipfile

    def load(key: str) -> np.ndarray:
        member, dtype, fortran, header_size = layout[key]
        try:
            if member.compress_type == zipfile.ZIP_STORED:
                array = _read_stored(path, mapped, member, specs[key].shape, dtype, fortran, header_size)
            else:
                with archive.open(member) as handle, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    array = np.lib.format.read_array(handle, allow_pickle=False)
        except Exception as exc:  # truncated data, bad CRC (BadZipFile), zlib.error...
            raise SourceError(f"array {short(key)}: data unreadable ({reason(exc)})", path=str(path)) from exc
        if array.shape != specs[key].shape or array.dtype != dtype:
            raise SourceError(f"array {short(key)}: data does not match its header", path=str(path))
        if specs[key].dtype == "bfloat16":
            import ml_dtypes

            array = array.view(ml_dtypes.bfloat16)
        return array

    return ParamTree(specs, loader=load, origin=str(path), format="npz")
