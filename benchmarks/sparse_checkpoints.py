"""Real-size checkpoints whose tensor data is a hole, and a syscall-level count of what is read.

- ``write_sparse_safetensors``: a valid safetensors file (8-byte length, JSON header, offsets
  contiguous) whose data section is never written: the file is ``truncate()``-d to its full
  size, so a 141 GB Llama-70B file occupies one disk block. Reading its data would give zeros.
- ``write_sparse_npz``: a valid npz (a stored zip of ``.npy`` members with correct sizes and
  CRCs) whose array bytes are holes: the npy headers are written, the data is skipped with
  ``seek``. (The CRC of the zeros is computed by ``zipfile`` as usual; that costs ~0.2 s/GB
  at generation time and nothing at match time.)
- ``traced_reads``: run a command under ``strace -f -P FILE`` and return every byte range of
  FILE delivered by a read syscall (``read``, ``pread64``, ``readv``...), plus any ``mmap`` of it.
  This sees every reader (Python, numpy, Rust) in the process, not just our own code.
- ``data_regions``: where a file's tensor bytes are (safetensors: everything after the header;
  npz: each member's bytes after its npy header), to intersect with what was read.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SAFETENSORS_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
Range = tuple[int, int]


# ---------------------------------------------------------------------------------------- writers


def write_sparse_safetensors(path: Path, specs: Iterable[tuple[str, Sequence[int], str]]) -> dict:
    """``specs``: (key, shape, dtype name) in file order. Returns sizes of the file written."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype in specs:
        code, itemsize = SAFETENSORS_DTYPES[dtype]
        nbytes = math.prod(shape) * itemsize
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        handle.truncate(8 + len(text) + offset)
    return {"header_bytes": 8 + len(text), "data_bytes": offset, "file_bytes": 8 + len(text) + offset}


class _HoleWriter:
    """A file wrapper that turns writes into seeks while ``hole`` is set (zipfile writes through it)."""

    def __init__(self, handle):
        self.handle = handle
        self.hole = False

    def write(self, data) -> int:
        n = len(data)
        if self.hole:
            self.handle.seek(n, os.SEEK_CUR)
        else:
            self.handle.write(data)
        return n

    def seek(self, *args):
        return self.handle.seek(*args)

    def tell(self):
        return self.handle.tell()

    def flush(self):
        return self.handle.flush()

    def close(self):
        return self.handle.close()


_ZEROS = bytes(64 << 20)


def write_sparse_npz(path: Path, specs: Iterable[tuple[str, Sequence[int], str]]) -> dict:
    """An npz (stored members, zip64 where needed) whose array data are holes."""
    handle = _HoleWriter(open(path, "wb"))
    data_bytes = 0
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, shape, dtype in specs:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            with archive.open(key + ".npy", "w", force_zip64=nbytes > (1 << 31)) as member:
                member.write(header.getvalue())
                handle.hole = True
                left = nbytes
                while left:
                    chunk = min(left, len(_ZEROS))
                    member.write(memoryview(_ZEROS)[:chunk])
                    left -= chunk
                handle.hole = False
            data_bytes += nbytes
    handle.close()
    return {"data_bytes": data_bytes, "file_bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------- regions


def data_regions(path: Path) -> list[Range]:
    """Byte ranges of ``path`` holding tensor data (sorted, disjoint)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK"):
        regions = []
        with zipfile.ZipFile(path) as archive:
            with open(path, "rb") as raw:
                for member in archive.infolist():
                    raw.seek(member.header_offset)
                    local = raw.read(30)
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    start = member.header_offset + 30 + name_len + extra_len
                    raw.seek(start)
                    prefix = raw.read(10)
                    header_len = struct.unpack("<H", prefix[8:10])[0] if prefix[6] == 1 else None
                    if header_len is None:
                        raw.seek(start + 8)
                        header_len = struct.unpack("<I", raw.read(4))[0]
                        npy_header = 12 + header_len
                    else:
                        npy_header = 10 + header_len
                    regions.append((start + npy_header, start + member.file_size))
        return sorted(regions)
    (size,) = struct.unpack("<Q", head)
    return [(8 + size, path.stat().st_size)]


def _merge(ranges: Iterable[Range]) -> list[Range]:
    merged: list[list[int]] = []
    for start, stop in sorted(ranges):
        if stop <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def overlap(ranges: Iterable[Range], regions: Sequence[Range]) -> int:
    """Bytes of ``ranges`` (merged) that fall inside ``regions``."""
    import bisect

    starts = [r[0] for r in regions]
    total = 0
    for start, stop in _merge(ranges):
        k = max(0, bisect.bisect_right(starts, start) - 1)
        while k < len(regions) and regions[k][0] < stop:
            a, b = regions[k]
            total += max(0, min(b, stop) - max(a, start))
            k += 1
    return total


# ---------------------------------------------------------------------------------------- tracing

_CALL = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)\)\s+=\s+(-?\d+|0x[0-9a-f]+)")
_FD = re.compile(r"^(\d+)<([^>]*)>")
_TRACED = "openat,open,read,pread64,readv,preadv,preadv2,lseek,mmap,sendfile,copy_file_range,splice,close,dup,dup2,dup3"


def strace_available() -> bool:
    return shutil.which("strace") is not None


def traced_reads(argv: Sequence[str], path: Path, env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``argv`` under strace; every byte range of ``path`` that a syscall delivered."""
    path = Path(path).resolve()
    log = log or path.with_suffix(path.suffix + ".strace")
    command = ["strace", "-f", "-qq", "-s", "0", "-y", "-e", f"trace={_TRACED}", "-P", str(path), "-o", str(log), *argv]
    completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranges: list[Range] = []
    mmaps: list[Range] = []
    position: dict[int, int] = {}
    calls = 0
    pending: dict[str, str] = {}
    for line in log.read_text().splitlines():
        if "<unfinished ...>" in line:
            pid = line.split()[0]
            pending[pid] = line.split("<unfinished ...>")[0]
            continue
        resumed = re.match(r"^(\d+)\s+<\.\.\. \w+ resumed>(.*)$", line)
        if resumed:
            line = pending.pop(resumed.group(1), "") + resumed.group(2)
        match = _CALL.match(line)
        if not match:
            continue
        _, name, args, result = match.groups()
        value = int(result, 0)
        fd_match = _FD.match(args)
        fd = int(fd_match.group(1)) if fd_match else None
        if name in ("openat", "open"):
            if value >= 0:
                position[value] = 0
            continue
        if value < 0 or fd is None:
            continue
        calls += 1
        if name == "lseek":
            position[fd] = value
        elif name in ("read", "readv"):
            start = position.get(fd, 0)
            ranges.append((start, start + value))
            position[fd] = start + value
        elif name in ("pread64", "preadv", "preadv2"):
            fields = [f.strip() for f in args.rsplit(",", 2)]
            offset = int(fields[1] if name == "preadv2" else fields[2], 0)
            ranges.append((offset, offset + value))
        elif name == "mmap":
            parts = [p.strip() for p in args.split(",")]
            length, offset = int(parts[1]), int(parts[-1], 0)
            mmaps.append((offset, offset + length))
        elif name in ("sendfile", "copy_file_range", "splice"):
            ranges.append((position.get(fd, 0), position.get(fd, 0) + value))  # conservative
        elif name == "close":
            position.pop(fd, None)
    merged = _merge(ranges)
    return {
        "returncode": completed.returncode,
        "syscalls": calls,
        "ranges": merged,
        "bytes_read": sum(b - a for a, b in merged),
        "mmaps": mmaps,
        "stdout": completed.stdout,
        "stderr": completed.stderr,
    }


# ---------------------------------------------------------------------------------------- page cache


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache (so that residency afterwards shows what was touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_pages(path: Path) -> np.ndarray:
    """Indices of the file's pages that are in the page cache (``mincore``), whoever brought them
    there: read syscalls, page faults on a memory map, kernel read-ahead."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return np.flatnonzero(np.frombuffer(vector, dtype=np.uint8) & 1)


def pages_inside(pages: np.ndarray, regions: Sequence[Range]) -> int:
    """How many of ``pages`` lie wholly inside ``regions`` (pages holding only tensor data)."""
    import mmap

    size = mmap.PAGESIZE
    starts = np.array([a for a, _ in regions], dtype=np.int64)
    stops = np.array([b for _, b in regions], dtype=np.int64)
    first = pages.astype(np.int64) * size
    k = np.searchsorted(starts, first, side="right") - 1
    valid = k >= 0
    inside = np.zeros(len(pages), dtype=bool)
    inside[valid] = (first[valid] >= starts[k[valid]]) & (first[valid] + size <= stops[k[valid]])
    return int(inside.sum())


def disk_usage(path: Path) -> dict:
    stat = path.stat()
    return {"apparent_bytes": stat.st_size, "allocated_bytes": stat.st_blocks * 512}
