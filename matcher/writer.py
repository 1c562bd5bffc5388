"""Writing outputs: a streaming safetensors writer and atomic output directories.

The safetensors header needs every tensor's shape and offset up front; the plan knows
them without data, so the header is written first and each tensor is then produced,
written at its offset and released, one at a time. Large outputs are split into shards
with an index, as ``save_pretrained`` does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import MatcherError
from .sources.mapped import locate
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


SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 10**9  # "5GB", in huggingface_hub's decimal units
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1.5GiB`` or a plain number of bytes (KB/MB/GB/TB decimal, as
    huggingface_hub counts them; KiB/MiB/GiB/TiB binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise MatcherError(f"cannot read the size {value!r} (write e.g. 5GB, 500MB, 2GiB or a number of bytes)")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise MatcherError(f"a shard size must be positive, got {value!r}")
    return size


def plan_shards(tensors: Sequence[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Split ``tensors`` in order into shards of at most ``max_shard_size`` bytes, as
    huggingface_hub's ``split_torch_state_dict_into_shards`` does (a tensor larger than the
    limit gets a shard of its own), keeping the shards in the tensors' order."""
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    size = 0
    for tensor in tensors:
        if tensor.nbytes > max_shard_size:
            if current:
                shards.append(current)
                current, size = [], 0
            shards.append([tensor])
            continue
        if current and size + tensor.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_files(tensors: Sequence[OutputTensor], max_shard_size: int | None = None) -> list[tuple[str, list[OutputTensor]]]:
    """File names and contents as ``save_pretrained`` lays them out: ``model.safetensors`` when
    everything fits one shard, else ``model-00001-of-0000N.safetensors``..."""
    shards = plan_shards(tensors, max_shard_size or DEFAULT_SHARD_SIZE)
    if len(shards) == 1:
        return [(SAFETENSORS_NAME, shards[0])]
    return [(f"model-{index:05d}-of-{len(shards):05d}.safetensors", shard) for index, shard in enumerate(shards, 1)]


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    from .sources.torch_pickle import to_numpy

    return to_numpy(array)


_SAME_SIZE_INTS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
# torch warns when it wraps a read-only array (a view of a mapped source), which is only read
# here. A filter for that one message, set once: catch_warnings would save and restore the
# process's filters from two threads (the reader thread uses it too) and could lose them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
POOL_BYTES = 64 * 2**20  # buffers kept for reuse, at most


class _Buffers:
    """Byte buffers for the C-order copies of transposed tensors, handed back once written and
    reused: a conversion transposes most of a checkpoint, and fresh memory for every copy
    (page faults, zeroing) costs more than the copy. At most ``POOL_BYTES`` are kept."""

    def __init__(self, limit: int = POOL_BYTES):
        self.limit = limit
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            fitting = [i for i, b in enumerate(self.free) if b.nbytes >= nbytes]
            if fitting:
                return self.free.pop(min(fitting, key=lambda i: self.free[i].nbytes))
        return np.empty(nbytes, np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        with self.lock:
            if buffer.nbytes > self.limit:
                return
            self.free.append(buffer)
            while sum(b.nbytes for b in self.free) > self.limit:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].nbytes))


def _contiguous(array: np.ndarray, buffers: _Buffers | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``array`` in C order, and the pooled buffer holding it if one was taken: ``array`` itself
    when it already is, else one copy (by torch where it can: its blocked, threaded copy
    transposes big matrices several times faster than numpy's)."""
    if array.flags.c_contiguous:
        return array, None
    as_int = _SAME_SIZE_INTS.get(array.dtype.itemsize)
    if as_int is not None and array.size >= 1 << 12 and "torch" in sys.modules and all(s >= 0 for s in array.strides):
        import torch

        buffer = buffers.take(array.nbytes) if buffers is not None else np.empty(array.nbytes, np.uint8)
        out = buffer[: array.nbytes].view(array.dtype).reshape(array.shape)
        try:  # same-size integers: any dtype (bfloat16, float8, bool) is copied bit for bit
            torch.from_numpy(out.view(as_int)).copy_(torch.from_numpy(array.view(as_int)))
            return out, (buffer if buffers is not None else None)
        except (TypeError, ValueError, RuntimeError):  # strides torch cannot express: numpy copies
            if buffers is not None:
                buffers.give(buffer)
    return np.ascontiguousarray(array), None


def _as_bytes(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written


def _header(tensors: Sequence[OutputTensor], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: dict[str, int] = {}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise MatcherError(f"{tensor.name}: dtype {tensor.dtype} cannot be stored in safetensors")
        if tensor.name in offsets or tensor.name == "__metadata__":
            raise MatcherError(f"{tensor.name}: written twice")
        header[tensor.name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offsets[tensor.name] = offset
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = len(encoded).to_bytes(8, "little") + encoded
    return prefix, {name: len(prefix) + at for name, at in offsets.items()}


OVERLAP_BYTES = 64 * 2**20  # produced bytes that may wait for the disk while the next tensor is produced


# copy_file_range errors meaning "not here" (another filesystem, an old kernel): write from memory
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.ENOTSUP}


OPEN_FILES = 64  # output files held open at once (a model may have thousands of shards)


class _OpenFiles:
    """Output files opened for writing as needed, at most ``limit`` at a time (the least recently
    used is closed first). Used by the writer thread only."""

    def __init__(self, limit: int | None = None):
        self.limit = limit or OPEN_FILES
        self.fds: collections.OrderedDict[Path, int] = collections.OrderedDict()

    def get(self, path: Path) -> int:
        fd = self.fds.pop(path, None)
        if fd is None:
            while len(self.fds) >= self.limit:
                os.close(self.fds.popitem(last=False)[1])
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        self.fds[path] = fd
        return fd

    def close_all(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])


class _BackgroundWriter:
    """Writes in a thread, so that reading and transposing the next tensor overlaps writing
    this one (``pwrite`` releases the GIL). At most ``limit`` bytes wait or are being written,
    or a single tensor of any size: memory stays one tensor plus ``limit``.

    A tensor whose bytes are a range of a memory-mapped source file (renamed, squeezed, cut
    along its first axis: ``sources.mapped.locate``) is copied file to file in the kernel
    (``copy_file_range``), which moves page-cache pages without mapping or copying them
    through this process."""

    def __init__(self, limit: int = OVERLAP_BYTES):
        self.limit = limit
        self.condition = threading.Condition()
        self.jobs: collections.deque = collections.deque()
        self.pending = 0
        self.written: list[OutputTensor] = []
        self.error: BaseException | None = None
        self.closing = self.aborted = False
        self.buffers = _Buffers()
        self.files = _OpenFiles()
        self.copy_range = hasattr(os, "copy_file_range")
        self.thread = threading.Thread(target=self._run, name="matcher-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.jobs and not self.closing:
                    self.condition.wait()
                if not self.jobs:
                    return
                path, data, position, tensor, buffer, origin = self.jobs[0]
                skip = self.aborted or self.error is not None
            try:
                if not skip:
                    fd = self.files.get(path)
                    done = self._copy_range(fd, origin, len(data), position) if origin is not None else 0
                    _pwrite_all(fd, data[done:], position + done)
            except BaseException as exc:  # handed to the producing thread, which raises it
                skip = True  # not written: not reported as written either
                with self.condition:
                    self.error = exc
            if buffer is not None:
                self.buffers.give(buffer)
            with self.condition:
                self.jobs.popleft()
                self.pending -= len(data)
                if not skip:
                    self.written.append(tensor)
                self.condition.notify_all()

    def _copy_range(self, fd: int, origin: tuple[Any, int], length: int, position: int) -> int:
        """Copy a source file's range into place in the kernel; how many bytes were copied (the
        rest is written from memory: the filesystems may not support it)."""
        if not self.copy_range:
            return 0
        mapped, offset = origin
        done = 0
        try:
            while done < length:
                copied = os.copy_file_range(mapped.fd, fd, length - done, offset + done, position + done)
                if not copied:
                    raise OSError(errno.EIO, f"the source file ends before byte {offset + length}")
                done += copied
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            self.copy_range = False
        return done

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def reserve(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit the limit (or nothing is pending)."""
        with self.condition:
            while self.pending and self.pending + nbytes > self.limit and self.error is None:
                self.condition.wait()
            self._raise()

    def submit(self, path: Path, array: np.ndarray, position: int, tensor: OutputTensor) -> None:
        """Queue ``array`` (any layout) to be written at ``position`` of ``path`` (its header written already)."""
        origin = locate(array) if self.copy_range else None
        buffer = None
        if origin is None:
            array, buffer = _contiguous(array, self.buffers)
        data = _as_bytes(array)
        with self.condition:
            self._raise()
            self.jobs.append((path, data, position, tensor, buffer, origin))
            self.pending += len(data)
            self.condition.notify_all()

    def take_written(self) -> list[OutputTensor]:
        with self.condition:
            written, self.written = self.written, []
        return written

    def close(self, abort: bool = False) -> None:
        """Finish (or, with ``abort``, drop) what is queued and stop; raises a write error."""
        with self.condition:
            self.closing = True
            self.aborted = self.aborted or abort
            self.condition.notify_all()
        self.thread.join()
        self.files.close_all()
        if not abort:
            self._raise()


def write_files(
    files: Sequence[tuple[Path, Sequence[OutputTensor]]],
    produce: Callable[[OutputTensor], Any],
    metadata: dict[str, str] | None = None,
    progress: Callable[[OutputTensor], None] | None = None,
    order: Sequence[OutputTensor] | None = None,
) -> None:
    """Write safetensors ``files`` (each a path and its tensors, in file order), calling
    ``produce`` for each tensor just before writing it, in ``order`` (default: file order).

    Every header is written first (the plan knows every shape), then each tensor at its
    offset, so tensors may be produced in any order (e.g. grouped by the source they share)
    while each file keeps the planned layout. Writing happens in a background thread while
    the next tensor is produced; the tensors waiting for it are bounded (``OVERLAP_BYTES``).
    """
    everything = [tensor for _, tensors in files for tensor in tensors]
    order = list(everything if order is None else order)
    if sorted(t.name for t in order) != sorted(t.name for t in everything) or len({t.name for t in order}) != len(order):
        raise MatcherError("internal error: the writing order is not a permutation of the planned tensors")
    headers = [_header(tensors, metadata) for _, tensors in files]  # every dtype checked before any file is opened
    places: dict[str, tuple[Path, int]] = {}
    for (path, _), (prefix, positions) in zip(files, headers):
        with open(path, "wb", buffering=0) as handle:
            _pwrite_all(handle.fileno(), memoryview(prefix), 0)
        places.update((name, (Path(path), position)) for name, position in positions.items())
    writer = None
    try:
        writer = _BackgroundWriter()
        for tensor in order:
            writer.reserve(tensor.nbytes)
            array = _as_numpy(produce(tensor))
            if tuple(array.shape) != tensor.shape or array.dtype != numpy_dtype(tensor.dtype):
                raise MatcherError(f"{tensor.name}: produced {tuple(array.shape)} {array.dtype}, planned {tensor.shape} {tensor.dtype}")
            path, position = places[tensor.name]
            writer.submit(path, array, position, tensor)
            del array
            for done in writer.take_written() if progress else ():
                progress(done)
        writer.close()
        for done in writer.take_written() if progress else ():
            progress(done)
    finally:
        if writer is not None and writer.thread.is_alive():
            writer.close(abort=True)


def write_model(
    directory: Path,
    tensors: Sequence[OutputTensor],
    produce: Callable[[OutputTensor], Any],
    *,
    max_shard_size: int | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[OutputTensor], None] | None = None,
    order: Sequence[OutputTensor] | None = None,
) -> list[str]:
    """Write the weights of a ``save_pretrained`` directory: ``model.safetensors``, or shards of at
    most ``max_shard_size`` bytes (default 5 GB) plus ``model.safetensors.index.json``. The names
    of the files written are returned."""
    directory = Path(directory)
    layout = shard_files(tensors, max_shard_size)
    write_files([(directory / name, shard) for name, shard in layout], produce, metadata, progress, order)
    if len(layout) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {tensor.name: name for name, shard in layout for tensor in shard},
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [name for name, _ in layout] + ([INDEX_NAME] if len(layout) > 1 else [])


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
