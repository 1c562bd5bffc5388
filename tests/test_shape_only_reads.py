"""Matching needs shapes only: opening a checkpoint reads its headers and none of its tensor
bytes (benchmarks/scale.py proves the same at real size with strace)."""

import os
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from matcher.sources import checks, open_tree


@pytest.fixture
def record_reads(monkeypatch):
    """Call to start recording the byte ranges read at offsets; returns the list they go to."""
    reads: list[tuple[int, int]] = []
    real = os.pread

    def pread(fd, length, offset):
        data = real(fd, length, offset)
        reads.append((offset, offset + len(data)))
        return data

    def start() -> list[tuple[int, int]]:
        monkeypatch.setattr(checks.os, "pread", pread)
        # zipfile's buffered member reads would pull in data: stored members must not go through it
        monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("a member was opened through zipfile"))
        return reads

    return start


def arrays():
    rng = np.random.default_rng(0)
    return {f"layer{i}/w": rng.standard_normal((64, 32)).astype(np.float32) for i in range(5)}


def overlaps(reads, regions):
    return [(r, g) for r in reads for g in regions if r[0] < g[1] and g[0] < r[1]]


def test_opening_an_npz_reads_no_array_bytes(tmp_path, record_reads):
    path = tmp_path / "c.npz"
    np.savez(path, **arrays())
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:  # each array's bytes end its member (after the local and .npy headers)
        regions = []
        for member in archive.infolist():
            local = member.header_offset
            start = local + 30 + int.from_bytes(raw[local + 26 : local + 28], "little") + int.from_bytes(raw[local + 28 : local + 30], "little")
            regions.append((start + member.file_size - 64 * 32 * 4, start + member.file_size))
    recorded_reads = record_reads()
    tree = open_tree(path)
    assert tree["layer3/w"].shape == (64, 32)
    assert recorded_reads and not overlaps(recorded_reads, regions)


def test_opening_a_safetensors_file_reads_its_header_only(tmp_path, record_reads):
    path = tmp_path / "c.safetensors"
    save_file(arrays(), str(path))
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    recorded_reads = record_reads()
    tree = open_tree(path)
    assert tree["layer0/w"].shape == (64, 32)
    assert recorded_reads and max(end for _, end in recorded_reads) <= header_end


def bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_opening_a_torch_checkpoint_reads_its_pickle_and_directory_not_its_storages(tmp_path):
    import torch

    state = {f"layers.{i}.w": torch.full((64, 64), float(i)) for i in range(300)}  # 300 storages of 16 KiB
    path = tmp_path / "m.pt"
    torch.save(state, path)
    open_tree(path)  # warm-up: imports and lazy initialisation read files of their own
    before = bytes_read_by_this_process()
    tree = open_tree(path)
    read = bytes_read_by_this_process() - before
    assert tree["layers.7.w"].shape == (64, 64)
    assert read < 300 * 1024  # the pickle and the zip directory: well under a KiB per storage (4 KiB each were read before)
