"""PyTorch checkpoints (.pt/.pth/.bin), loaded with ``weights_only=True``: a pickle that
would run code is refused, never executed.

Released checkpoints nest their weights (``{"state_dict": {"module.x": ...}, "epoch": 3}``):
the reader descends through the usual containers, strips a DDP ``module.`` prefix shared
by every key, and records what it unwrapped and which non-tensor entries it ignored.

Sizes are checked before torch allocates anything, by format (chosen from the first
bytes, not from what ``torch.load`` happens to say when it fails):

- zip checkpoints (torch >= 1.6): the zip directory is checked against the archive
  (``checks.open_checked_zip``), then the pickle is loaded onto the meta device, so no
  storage is allocated (let alone of the size the pickle claims); each storage records its
  offset in the file, and a tensor is a read-only view of the memory-mapped file there
  (``mapped.py``: the pages read are released as reading goes on, so converting a whole
  checkpoint never keeps it all resident, as torch's own mmap would).
  Each offset must be the start of a storage record holding exactly that storage's bytes.
  Files in the other byte order, or whose offsets do not check out (torch computes them
  from the layout torch.save writes; a zip rewritten by another tool differs), are loaded
  with ``mmap=True`` instead: storages are views of the file.
- legacy checkpoints (pickles followed by raw storages): torch allocates every storage
  the pickle names before reading it, and cannot mmap them. A dry run of the pickles, in
  which every global is an inert stub (nothing imported, nothing called), sums the bytes
  the storages claim; they must fit the file. The file is then loaded from memory.
- afterwards every tensor must be a dense CPU tensor of a dtype numpy can hold, whose
  bytes (numel x itemsize) fit the file: a stride-0 view claiming 1 TB of a few bytes
  is refused.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec, dtype_name
from . import register
from .checks import ExactFile, open_checked_zip, reason, short, stored_data_offset
from .mapped import MappedFile

CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "params", "weights")
_PICKLE_PROTOCOL_2_PLUS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_LEGACY_PICKLES = 4  # magic number, protocol version, system info, the object
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
_STORAGE_ITEMSIZE = {  # what a pickle's storage type says about the unit of its numel
    "torch.DoubleStorage": 8, "torch.FloatStorage": 4, "torch.HalfStorage": 2, "torch.BFloat16Storage": 2,
    "torch.LongStorage": 8, "torch.IntStorage": 4, "torch.ShortStorage": 2, "torch.CharStorage": 1,
    "torch.ByteStorage": 1, "torch.BoolStorage": 1, "torch.ComplexDoubleStorage": 16,
    "torch.ComplexFloatStorage": 8, "torch.QUInt8Storage": 1, "torch.QInt8Storage": 1, "torch.QInt32Storage": 4,
    "torch.QUInt4x2Storage": 1, "torch.QUInt2x4Storage": 1, "torch.storage.UntypedStorage": 1, "torch.UntypedStorage": 1,
}
_REFUSAL_MARKERS = ("GLOBAL", "reduce", "safe_globals")
MAX_DEPTH = 100  # nesting of dicts/lists holding the tensors
MAX_ENTRIES = 1_000_000  # entries visited while flattening


def _is_torch(head: bytes, path: Path) -> bool:
    if head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        return True
    if not head.startswith(_ZIP_MAGIC):
        return False
    try:
        import zipfile

        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except Exception:  # any broken zip: a torch suffix still deserves this reader's error
        return path.suffix.lower() in _TORCH_SUFFIXES


class _Stub:
    """Whatever global a pickle names during the dry run: accepts any call, state or item."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _DryRun(pickle._Unpickler):  # the pure-Python unpickler: reads only what is there, allocates nothing claimed
    def __init__(self, file, storages: dict):
        super().__init__(file, encoding="latin1")
        self.storages = storages
        self.stubs: dict[str, type] = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full not in self.stubs:
            self.stubs[full] = type("Stub", (_Stub,), {"name": full})
        return self.stubs[full]

    def load_bytearray8(self):
        # the stock version allocates (and zeroes) the claimed length before reading
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)
        if len(data) < size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            storage_type, key, numel = pid[1], pid[2], pid[4]
            itemsize = _STORAGE_ITEMSIZE.get(getattr(storage_type, "name", None))
            if isinstance(key, (str, bytes, int)) and isinstance(numel, int) and key not in self.storages:
                # an unknown type is refused by torch before anything is allocated
                self.storages[key] = (max(numel, 0) * itemsize) if itemsize else None
        return _Stub()


def _check_legacy(data: bytes, path: Path) -> None:
    """Refuse a legacy checkpoint whose storages claim more bytes than the file holds."""
    stream, storages = io.BytesIO(data), {}
    for index in range(_LEGACY_PICKLES):
        try:
            value = _DryRun(stream, storages).load()
        except Exception as exc:
            if index == 0:
                return  # not even a first pickle: torch fails on it too (or refuses it), allocating nothing
            raise SourceError(f"cannot load the PyTorch checkpoint (corrupt or truncated legacy pickle: {reason(exc)})", path=str(path)) from exc
        if (index, value) in ((0, _LEGACY_MAGIC), (1, _LEGACY_PROTOCOL)) or index > 1:
            continue
        return  # not a legacy torch preamble: torch stops there (or refuses it) before any storage
    claimed = sum(size for size in storages.values() if size is not None)
    if claimed > len(data):
        raise SourceError(
            f"cannot load the PyTorch checkpoint: its storages claim {short(claimed, 40)} bytes but the file has {len(data)} (corrupt or truncated)",
            path=str(path),
        )


def _check_zip_storages(archive: Any, path: Path) -> dict[int, int]:
    """Refuse a zip checkpoint whose pickle claims storages its records do not hold; return
    the size of each storage record by the offset of its bytes in the file.

    With ``mmap=True`` (or on the meta device) torch slices storages out of the file without
    comparing the size the pickle claims with the record's (it does otherwise), so this does.
    """
    pickles = [m for m in archive.infolist() if m.filename == "data.pkl" or m.filename.endswith("/data.pkl")]
    if not pickles:
        raise SourceError("cannot load the PyTorch checkpoint (the zip holds no data.pkl)", path=str(path))
    prefix = pickles[0].filename[: -len("data.pkl")]
    storages: dict = {}
    try:
        _DryRun(io.BytesIO(archive.read(pickles[0])), storages).load()
    except Exception:
        return {}  # torch will fail on this pickle too, allocating nothing meanwhile
    records: dict[int, int] = {}
    with ExactFile(path) as exact:  # local headers read exactly: none of the storages' bytes
        for key, claimed in storages.items():
            _check_storage(archive, exact, prefix, key, claimed, records, path)
    return records


def _check_storage(archive: Any, exact: ExactFile, prefix: str, key: Any, claimed: Any, records: dict[int, int], path: Path) -> None:
    """One storage's claimed size against its record; a stored record's data offset into ``records``."""
    if claimed is None or not isinstance(key, str):
        return  # torch names records by string keys; anything else it refuses
    try:
        record = archive.getinfo(f"{prefix}data/{key}")
    except KeyError:
        raise SourceError(f"cannot load the PyTorch checkpoint: storage {short(key)} has no record in the archive", path=str(path)) from None
    if record.file_size != claimed:
        raise SourceError(
            f"cannot load the PyTorch checkpoint: storage {short(key)} claims {short(claimed, 40)} bytes but its record holds {record.file_size}",
            path=str(path),
        )
    if record.compress_type == zipfile.ZIP_STORED:
        try:
            records[stored_data_offset(exact.read, record)] = record.file_size
        except ValueError:  # not where the directory says: torch will complain itself
            pass


def _unpickling_message(exc: pickle.UnpicklingError) -> tuple[bool, str]:
    """(whether torch refused something the pickle wanted to build, the line that says what)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        detail = match.group(1).strip()
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in lines if any(m in line for m in _REFUSAL_MARKERS + ("Unsupported",))), lines[0] if lines else type(exc).__name__)
    detail = detail.split(". Please use")[0]
    refused = "Weights only load failed" in text and any(marker in detail for marker in _REFUSAL_MARKERS)
    return refused, detail[:200]


def _native_byte_order(archive: Any) -> bool:
    """Whether a zip checkpoint's storages are in this machine's byte order (torch byteswaps
    them on load otherwise; files without the record are little-endian)."""
    try:
        records = [m for m in archive.infolist() if m.filename == "byteorder" or m.filename.endswith("/byteorder")]
        order = archive.read(records[0]).decode(errors="replace").strip() if records and records[0].file_size <= 16 else "little"
    except Exception:  # a damaged record: the mapped load below fails (or copes) as torch does
        return False
    return order == sys.byteorder


def _load(path: Path, lazy: bool = True) -> tuple[Any, dict[int, int] | None]:
    """The unpickled checkpoint and, when its tensors are on the meta device (zip files in
    native byte order, when ``lazy``), the size of each storage record by file offset: meta
    storages carry their offset in the file (``_checkpoint_offset``), and nothing has been
    read or mapped. ``None`` when the tensors hold their data (mapped or in memory)."""
    import torch

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_ZIP_MAGIC))
        if head == _ZIP_MAGIC:
            with open_checked_zip(path, "PyTorch checkpoint") as archive:
                records = _check_zip_storages(archive, path)
                lazy = lazy and _native_byte_order(archive)
            source, mmap = path, not lazy
        else:
            data = path.read_bytes()
            _check_legacy(data, path)
            source, mmap, lazy, records = io.BytesIO(data), False, False, {}
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror or exc}", path=str(path)) from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(source, map_location="meta" if lazy else "cpu", weights_only=True, mmap=mmap)
        return loaded, (records if lazy else None)
    except pickle.UnpicklingError as exc:
        refused, detail = _unpickling_message(exc)
        if refused:
            raise SourceError(f"refused: the pickle wants to run code or build objects beyond tensors ({detail})", path=str(path)) from exc
        raise SourceError(f"cannot load the PyTorch checkpoint (corrupt pickle: {detail})", path=str(path)) from exc
    except Exception as exc:  # torch raises many types on corrupt input (RuntimeError, EOFError, IndexError...)
        raise SourceError(f"cannot load the PyTorch checkpoint ({reason(exc)})", path=str(path)) from exc


def _offsets_verified(loaded: Any, records: dict[int, int]) -> bool:
    """Whether every meta storage's ``_checkpoint_offset`` is the start of a storage record of
    the file holding exactly its bytes, one record per storage. On the meta device torch
    computes these offsets from the layout torch.save writes rather than reading each
    record's header; a zip rewritten by another tool fails this and is mapped instead."""
    import torch

    stack, seen, owners = [loaded], set(), {}
    while stack:
        obj = stack.pop()
        if id(obj) in seen or len(seen) > MAX_ENTRIES:
            continue  # cycles and runaway structures are _flatten's to report
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_quantized or obj.device.type != "meta":
                continue  # refused by _check_tensor
            offset, storage = _checkpoint_offset(obj), obj.untyped_storage()
            if offset not in records or storage.nbytes() != records[offset] or owners.setdefault(offset, storage._cdata) != storage._cdata:
                return False
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return True


def _key_text(key: Any, path: Path) -> str:
    try:
        return str(key)
    except Exception as exc:  # e.g. an int key beyond sys.get_int_max_str_digits()
        raise SourceError(f"an entry's key cannot be turned into a name ({reason(exc)})", path=str(path)) from exc


def _flatten(root: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Tensors under ``root`` by dotted path, and the non-tensor entries ignored.

    Iterative, with a depth limit (a pickle can build cycles) and a limit on entries
    visited (shared containers can make a small pickle expand exponentially).
    """
    import torch

    tensors: dict[str, Any] = {}
    ignored: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", root, 0)]
    visited = 0
    while stack:
        prefix, obj, depth = stack.pop()
        visited += 1
        if depth > MAX_DEPTH:
            raise SourceError(f"entries nested more than {MAX_DEPTH} deep, or cyclic (at {short(prefix)})", path=str(path))
        if visited > MAX_ENTRIES:
            raise SourceError(f"more than {MAX_ENTRIES} entries (shared or cyclic containers?)", path=str(path))
        if isinstance(obj, torch.Tensor):
            if prefix in tensors:
                raise SourceError(f"two entries flatten to the same name {short(prefix)}", path=str(path))
            tensors[prefix] = obj
            continue
        if isinstance(obj, dict):
            items = [(_key_text(key, path), value) for key, value in obj.items()]
        elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, (torch.Tensor, dict)) for v in obj):
            items = [(str(index), value) for index, value in enumerate(obj)]
        else:
            ignored.append(prefix or "<root>")
            continue
        # pushed in reverse so that they come off the stack in order
        stack.extend((f"{prefix}.{key}" if prefix else key, value, depth + 1) for key, value in reversed(items))
    return tensors, ignored


def _unwrap(obj: Any) -> tuple[Any, list[str]]:
    path: list[str] = []
    seen: set[int] = set()
    while isinstance(obj, dict) and id(obj) not in seen:
        seen.add(id(obj))
        container = next((c for c in CONTAINERS if isinstance(obj.get(c), dict) and obj[c]), None)
        if container is None:
            break
        path.append(container)
        obj = obj[container]
    return obj, path


def _check_tensor(key: str, tensor: Any, file_size: int, path: Path, device: str = "cpu") -> None:
    import torch

    problem = None
    if tensor.layout != torch.strided:
        problem = f"is a {str(tensor.layout).removeprefix('torch.')} tensor"
    elif tensor.is_quantized or tensor.device.type != device:
        problem = "is a quantized tensor" if tensor.is_quantized else f"is on the {tensor.device.type} device"
    elif not _numpy_compatible(tensor.dtype):
        problem = f"has dtype {str(tensor.dtype).removeprefix('torch.')}, which numpy cannot hold"
    elif tensor.numel() * tensor.element_size() > file_size:
        problem = f"of shape {short(tuple(tensor.shape))} claims {tensor.numel() * tensor.element_size()} bytes but the file has {file_size}"
    if problem:
        raise SourceError(f"tensor {short(key)} {problem}", path=str(path))


def _check_within_storage(key: str, tensor: Any, records: dict[int, int], path: Path) -> None:
    """A meta tensor's storage is a record of the file and its view fits in that record (what
    torch checks when it sets a loaded tensor on a real storage; a meta storage just grows)."""
    import torch

    if tensor.layout != torch.strided or tensor.is_quantized:
        return  # refused by _check_tensor
    size = records.get(_checkpoint_offset(tensor))
    if size is None:
        raise SourceError(f"cannot load the PyTorch checkpoint: tensor {short(key)} has no storage record in the archive", path=str(path))
    if tensor.numel() == 0:
        return
    last = tensor.storage_offset() + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    if tensor.storage_offset() < 0 or (last + 1) * tensor.element_size() > size:
        raise SourceError(
            f"cannot load the PyTorch checkpoint: tensor {short(key)} of shape {short(tuple(tensor.shape))} reaches beyond its storage ({size} bytes)",
            path=str(path),
        )


@functools.lru_cache(maxsize=None)
def _numpy_compatible(dtype: Any) -> bool:
    import torch

    if dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.empty(0, dtype=dtype).numpy()
    except Exception:
        return False
    return True


def to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        import ml_dtypes

        view, target = {
            torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
            torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
            torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
        }[tensor.dtype]
        return tensor.view(view).numpy().view(target)
    return tensor.numpy()


@functools.lru_cache(maxsize=None)
def _numpy_dtype(dtype: Any) -> np.dtype:
    import torch

    return to_numpy(torch.empty(0, dtype=dtype)).dtype


def _checkpoint_offset(tensor: Any) -> int | None:
    offset = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
    return offset if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0 else None


def _read_from_file(path: Path, mapped: MappedFile | None, tensor: Any) -> np.ndarray:
    """A meta tensor's data from its storage's place in the file: a read-only view of the
    mapped file (``mapped.py`` bounds how much of it stays resident) or, where the file cannot
    be mapped, a fresh array read from it. The view was checked against its storage record
    when the file was opened."""
    shape, strides, start = tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()
    dtype = _numpy_dtype(tensor.dtype)
    if tensor.numel() == 0:
        return np.empty(shape, dtype)
    last = start + sum((size - 1) * stride for size, stride in zip(shape, strides))
    itemsize = dtype.itemsize
    offset, count = _checkpoint_offset(tensor) + start * itemsize, last - start + 1
    if mapped is not None:
        buffer = mapped.array(offset, dtype, count)
    else:
        buffer = np.empty(count, dtype)
        with ExactFile(path, headers_only=False) as handle:
            handle.read_into(offset, memoryview(buffer.view(np.uint8)))
    if count == tensor.numel() and tensor.is_contiguous():
        return buffer.reshape(shape)
    return np.lib.stride_tricks.as_strided(buffer, shape, tuple(stride * itemsize for stride in strides), writeable=False)


@register("torch", _is_torch)
def open_torch(path: Path) -> ParamTree:
    loaded, records = _load(path)
    if records is not None and not _offsets_verified(loaded, records):
        loaded, records = _load(path, lazy=False)
    lazy = records is not None
    if not isinstance(loaded, dict):
        import torch

        what = "a single tensor" if isinstance(loaded, torch.Tensor) else f"a {type(loaded).__name__}"
        raise SourceError(f"the checkpoint holds {what}, not a dict of named tensors", path=str(path))
    obj, unwrapped = _unwrap(loaded)
    tensors, ignored = _flatten(obj, path)
    stripped = None
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
        stripped = "module."
    file_size = path.stat().st_size
    for key, tensor in tensors.items():
        if lazy:
            _check_within_storage(key, tensor, records, path)
        _check_tensor(key, tensor, file_size, path, device="meta" if lazy else "cpu")
    specs = {k: TensorSpec(k, tuple(int(d) for d in t.shape), dtype_name(t)) for k, t in tensors.items()}
    info = {"unwrapped": unwrapped, "stripped_prefix": stripped, "ignored_entries": ignored}

    mapped = MappedFile.open(path) if lazy else None

    def load(key: str) -> np.ndarray:
        try:
            return _read_from_file(path, mapped, tensors[key]) if lazy else to_numpy(tensors[key])
        except Exception as exc:  # e.g. a storage mapped from a file truncated since
            raise SourceError(f"tensor {short(key)}: data unreadable ({reason(exc)})", path=str(path)) from exc

    return ParamTree(specs, loader=load, origin=str(path), format="torch", info=info)
