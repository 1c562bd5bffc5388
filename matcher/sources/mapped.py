"""Read-only memory maps of checkpoint files: tensors as views of the file, with a bound on
how much of it stays resident.

Reading through a map costs no copy and no fresh memory (the pages are the page cache's),
but every page touched counts in the process's RSS until the map goes away: converting a
1 GB checkpoint would end with 1 GB resident. So the pages of what was read are handed back
(``madvise(MADV_DONTNEED)``): each time another ``budget / 3`` bytes have been read (a
generation), every range read before the two latest generations is released, again (a range
may be touched after it was first released: a view read ahead and written later). The two
latest generations stay, so a view read ahead is not released before it is written, and at
most ``budget`` bytes read stay resident. The map is read-only and shared, so this is invisible to the arrays:
touching a page again reads it back from the page cache.

``locate`` tells a writer when an array's bytes are a range of a mapped file (a tensor
renamed, squeezed or cut along its first axis), so that it can copy the range file to file
in the kernel (``copy_file_range``) instead of through memory.
"""

import mmap
import os
import threading
import weakref
from pathlib import Path

import numpy as np

RESIDENT_BYTES = 128 * 2**20
POPULATE_BYTES = 1 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+


_MAPPED: "weakref.WeakSet[MappedFile]" = weakref.WeakSet()
_LOCK = threading.Lock()


def locate(array: np.ndarray) -> "tuple[MappedFile, int] | None":
    """``(mapped, offset)`` when ``array``'s bytes, in C order, are the range at ``offset`` of a
    mapped file (open read-only as ``mapped.fd`` while ``mapped`` lives: hold it); else None."""
    if not array.flags.c_contiguous or not array.nbytes:
        return None
    address = array.__array_interface__["data"][0]
    with _LOCK:
        files = list(_MAPPED)
    for mapped in files:
        if mapped.base <= address and address + array.nbytes <= mapped.base + mapped.size:
            return mapped, address - mapped.base
    return None


class MappedFile:
    def __init__(self, path: Path, budget: int = RESIDENT_BYTES):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(self.fd)
            raise
        weakref.finalize(self, os.close, self.fd)
        self.size = len(self.map)
        self.base = np.frombuffer(self.map, np.uint8, count=1).__array_interface__["data"][0]
        self.populate = hasattr(self.map, "madvise")
        with _LOCK:
            _MAPPED.add(self)
        self.budget = budget
        self.old: list[tuple[int, int]] = []  # merged [start, end) intervals, released at every sweep
        self.before: list[tuple[int, int]] = []  # read two generations ago
        self.previous: list[tuple[int, int]] = []  # read in the generation before the current one
        self.current: list[tuple[int, int]] = []
        self.since = 0

    @classmethod
    def open(cls, path: Path) -> "MappedFile | None":
        """The file mapped, or None where it cannot be (an empty file, a filesystem without mmap)."""
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def view(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` (ValueError if the file is shorter)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"truncated: {length} bytes at offset {offset} are beyond the file's {self.size}")
        self._read(offset, length)
        return memoryview(self.map)[offset : offset + length]

    def array(self, offset: int, dtype: np.dtype, count: int, populate: bool = False) -> np.ndarray:
        """A read-only 1-d array of ``count`` items at ``offset``; ``populate``: map its pages now,
        in one call, rather than one fault at a time as they are touched (for data about to be
        read in full)."""
        data = self.view(offset, count * dtype.itemsize)
        if populate and len(data) >= POPULATE_BYTES and self.populate:
            aligned = offset - offset % mmap.PAGESIZE
            try:
                self.map.madvise(MADV_POPULATE_READ, aligned, offset + len(data) - aligned)
            except (OSError, ValueError):  # before Linux 5.14: pages are mapped as they are touched
                self.populate = False
        return np.frombuffer(data, dtype=dtype, count=count)

    def _read(self, offset: int, length: int) -> None:
        self.current.append((offset, offset + length))
        self.since += length
        if self.since >= self.budget // 3:
            self.old = _merged(self.old + self.before)
            self.before, self.previous, self.current, self.since = self.previous, self.current, [], 0
            for start, end in self.old:
                self._release(start, end)

    def _release(self, start: int, end: int) -> None:
        aligned = start - start % mmap.PAGESIZE
        try:
            self.map.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
        except (AttributeError, OSError, ValueError):  # no madvise here: the pages just stay
            pass


MAX_RELEASED_RANGES = 64  # ranges re-released at every sweep, at most (see _merged)


def _merged(intervals: list[tuple[int, int]], limit: int = MAX_RELEASED_RANGES) -> list[tuple[int, int]]:
    """``intervals`` sorted and merged, at most ``limit`` of them: the narrowest gaps are closed
    first. Every sweep releases all of them again, so their number must not grow with the
    tensors read (a torch zip puts a record header between every two storages, so its ranges
    never touch); releasing a gap too only drops pages that are read back if needed."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    if len(merged) > limit:
        gaps = sorted(merged[i + 1][0] - merged[i][1] for i in range(len(merged) - 1))
        widest_closed = gaps[len(merged) - limit - 1]
        closed: list[tuple[int, int]] = [merged[0]]
        for start, end in merged[1:]:
            if start - closed[-1][1] <= widest_closed:
                closed[-1] = (closed[-1][0], end)
            else:
                closed.append((start, end))
        merged = closed
    return merged
