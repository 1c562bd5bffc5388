"""PyTorch checkpoints (.pt/.pth/.bin), loaded with ``weights_only=True``: a pickle that
would run code is refused, never executed.

Released checkpoints nest their weights (``{"state_dict": {"module.x": ...}, "epoch": 3}``):
the reader descends through the usual containers, strips a DDP ``module.`` prefix shared
by every key, and records what it unwrapped and which non-tensor entries it ignored.

Sizes are checked before torch allocates anything, by format (chosen from the first
bytes, not from what ``torch.load`` happens to say when it fails):

- zip checkpoints (torch >= 1.6): the zip directory is checked against the archive
  (``checks.open_checked_zip``), then the file is loaded with ``mmap=True``, so storages
  are views of the file, never buffers of the size the pickle claims.
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
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec, dtype_name
from . import register
from .checks import open_checked_zip, reason, short

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


def _check_zip_storages(archive: Any, path: Path) -> None:
    """Refuse a zip checkpoint whose pickle claims storages its records do not hold.

    With ``mmap=True`` torch slices storages out of the mapped file without comparing the
    size the pickle claims with the record's (it does without mmap), so this does.
    """
    pickles = [m for m in archive.infolist() if m.filename == "data.pkl" or m.filename.endswith("/data.pkl")]
    if not pickles:
        raise SourceError("cannot load the PyTorch checkpoint (the zip holds no data.pkl)", path=str(path))
    prefix = pickles[0].filename[: -len("data.pkl")]
    storages: dict = {}
    try:
        _DryRun(io.BytesIO(archive.read(pickles[0])), storages).load()
    except Exception:
        return  # torch will fail on this pickle too; with mmap it allocates nothing meanwhile
    for key, claimed in storages.items():
        if claimed is None or not isinstance(key, str):
            continue  # torch names records by string keys; anything else it refuses
        try:
            record = archive.getinfo(f"{prefix}data/{key}")
        except KeyError:
            raise SourceError(f"cannot load the PyTorch checkpoint: storage {short(key)} has no record in the archive", path=str(path)) from None
        if record.file_size != claimed:
            raise SourceError(
                f"cannot load the PyTorch checkpoint: storage {short(key)} claims {short(claimed, 40)} bytes but its record holds {record.file_size}",
                path=str(path),
            )


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


def _load(path: Path) -> Any:
    import torch

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_ZIP_MAGIC))
        if head == _ZIP_MAGIC:
            with open_checked_zip(path, "PyTorch checkpoint") as archive:
                _check_zip_storages(archive, path)
            source, mmap = path, True
        else:
            data = path.read_bytes()
            _check_legacy(data, path)
            source, mmap = io.BytesIO(data), False
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror or exc}", path=str(path)) from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused, detail = _unpickling_message(exc)
        if refused:
            raise SourceError(f"refused: the pickle wants to run code or build objects beyond tensors ({detail})", path=str(path)) from exc
        raise SourceError(f"cannot load the PyTorch checkpoint (corrupt pickle: {detail})", path=str(path)) from exc
    except Exception as exc:  # torch raises many types on corrupt input (RuntimeError, EOFError, IndexError...)
        raise SourceError(f"cannot load the PyTorch checkpoint ({reason(exc)})", path=str(path)) from exc


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


def _check_tensor(key: str, tensor: Any, file_size: int, path: Path) -> None:
    import torch

    problem = None
    if tensor.layout != torch.strided:
        problem = f"is a {str(tensor.layout).removeprefix('torch.')} tensor"
    elif tensor.is_quantized or tensor.device.type != "cpu":
        problem = "is a quantized tensor" if tensor.is_quantized else f"is on the {tensor.device.type} device"
    elif not _numpy_compatible(tensor.dtype):
        problem = f"has dtype {str(tensor.dtype).removeprefix('torch.')}, which numpy cannot hold"
    elif tensor.numel() * tensor.element_size() > file_size:
        problem = f"of shape {short(tuple(tensor.shape))} claims {tensor.numel() * tensor.element_size()} bytes but the file has {file_size}"
    if problem:
        raise SourceError(f"tensor {short(key)} {problem}", path=str(path))


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


@register("torch", _is_torch)
def open_torch(path: Path) -> ParamTree:
    loaded = _load(path)
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
        _check_tensor(key, tensor, file_size, path)
    specs = {k: TensorSpec(k, tuple(int(d) for d in t.shape), dtype_name(t)) for k, t in tensors.items()}
    info = {"unwrapped": unwrapped, "stripped_prefix": stripped, "ignored_entries": ignored}

    def load(key: str) -> np.ndarray:
        try:
            return to_numpy(tensors[key])
        except Exception as exc:  # e.g. a storage mapped from a file truncated since
            raise SourceError(f"tensor {short(key)}: data unreadable ({reason(exc)})", path=str(path)) from exc

    return ParamTree(specs, loader=load, origin=str(path), format="torch", info=info)
