"""Readers on broken and hostile files.

Every outcome is a tree whose tensors match their specs, or one ``SourceError`` line
naming the file: never another exception, never a hang, never an allocation of what a
header merely claims. Part one builds each failure the reliability issue lists by hand;
part two fuzzes every format with seeded mutations of a small valid file (some formats
with the mutation inside one zip member and the zip rebuilt around it, so the member's own
parser is reached); part three reads back random valid torch checkpoints exactly (the
checks raise no false alarms); the last part goes through the CLI (exit 1, one line).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import resource
import signal
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors

from matcher.errors import SourceError
from matcher.sources import READERS, detect, open_tree
from matcher.tree import dtype_name

ARRAYS = {
    "enc/layer_0/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
    "enc/layer_0/bias": np.arange(4, dtype=np.float16),
    "head/w": np.arange(6, dtype=np.int64).reshape(2, 3),
    "bf": np.arange(5, dtype=np.float32).astype(ml_dtypes.bfloat16),
}


# ---------------------------------------------------------------------------------------
# helpers


def read_everything(path: Path):
    """Open ``path`` and read every tensor, checking each against its spec."""
    tree = open_tree(path)
    for key, spec in tree.specs.items():
        array = tree.read(key)
        assert tuple(array.shape) == spec.shape, (key, array.shape, spec)
        assert dtype_name(array) == spec.dtype, (key, array.dtype, spec)
    return tree


def clean_error(path: Path, match: str | None = None) -> str:
    """The one-line SourceError reading ``path`` gives (it must name the file)."""
    with pytest.raises(SourceError) as info:
        read_everything(path)
    line = info.value.line()
    assert str(path) in line and "\n" not in line and len(line) < 700, line
    if match:
        assert re.search(match, line), line
    return line


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def npz_bytes(arrays=ARRAYS, compressed=False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy_bytes(header: str, data: bytes = b"", version=(1, 0)) -> bytes:
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    length = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text + data


def torch_tensors():
    tensors = {key.replace("/", "."): torch.from_numpy(a) for key, a in ARRAYS.items() if a.dtype != ml_dtypes.bfloat16}
    return tensors | {"bf": torch.arange(5, dtype=torch.bfloat16)}


def torch_bytes(obj=None, legacy=False) -> bytes:
    buffer = io.BytesIO()
    torch.save(torch_tensors() if obj is None else obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def torch_zip_with_pickle(pkl: bytes, obj=None) -> bytes:
    """A torch zip checkpoint whose data.pkl is replaced by ``pkl`` (records kept)."""
    source = zipfile.ZipFile(io.BytesIO(torch_bytes(obj)))
    return zip_bytes({m.filename: pkl if m.filename.endswith("data.pkl") else source.read(m) for m in source.infolist()})


def data_pkl(data: bytes) -> bytes:
    archive = zipfile.ZipFile(io.BytesIO(data))
    return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


def patch_int(pkl: bytes, position: int, old_size: int, value: int) -> bytes:
    """Replace the BININT1/BININT at ``position`` (``old_size`` bytes with opcode) by ``value``."""
    encoded = b"J" + struct.pack("<i", value) if value < 2**31 else b"\x8a" + bytes([8]) + value.to_bytes(8, "little")
    return pkl[:position] + encoded + pkl[position + old_size :]


def int_ops(pkl: bytes) -> list[tuple[int, int, int]]:
    """(position, size with opcode, value) of every small-int opcode in a pickle."""
    import pickletools

    ops = list(pickletools.genops(pkl))
    out = []
    for (op, arg, pos), (_, _, following) in zip(ops, ops[1:]):
        if op.name in ("BININT1", "BININT2", "BININT"):
            out.append((pos, following - pos, arg))
    return out


def flax_bytes(tree) -> bytes:
    """flax.serialization.msgpack_serialize's format, without importing jax."""

    def default(obj):
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes()), use_bin_type=True))
        if isinstance(obj, np.generic):
            return msgpack.ExtType(3, msgpack.packb(((), obj.dtype.name, obj.tobytes()), use_bin_type=True))
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=default, use_bin_type=True)


def ext_array(shape, dtype: str, payload: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((list(shape), dtype, payload), use_bin_type=True))


def safetensors_raw(header: dict | list | str, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ---------------------------------------------------------------------------------------
# detection: from the bytes, never the suffix


@pytest.mark.parametrize(
    "make, suffix, reader",
    [
        (lambda: save_safetensors({"a": np.ones(2, np.float32)}), ".npz", "safetensors"),
        (npz_bytes, ".pt", "npz"),
        (torch_bytes, ".npz", "torch"),
        (lambda: torch_bytes(legacy=True), ".safetensors", "torch"),
        (lambda: flax_bytes({"a": np.ones(2, np.float32)}), ".pt", "flax_msgpack"),
    ],
)
def test_the_reader_comes_from_the_bytes(tmp_path, make, suffix, reader):
    path = write(tmp_path / f"model{suffix}", make())
    assert detect(path).name == reader
    assert read_everything(path).format == reader


@pytest.mark.parametrize(
    "name, message",
    [("model.npz", "not a readable npz archive"), ("model.pt", "PyTorch checkpoint"), ("model.weights", "zip archive .* or is corrupt")],
)
def test_a_broken_zip_gets_the_error_its_suffix_suggests(tmp_path, name, message):
    data = npz_bytes() if name.endswith(".npz") else torch_bytes()
    clean_error(write(tmp_path / name, data[: len(data) // 2]), message)


def test_fifos_and_other_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    clean_error(fifo, "not a regular file")


# ---------------------------------------------------------------------------------------
# npz


def test_npz_stored_member_whose_sizes_disagree_is_refused_before_reading(tmp_path):
    data = bytearray(npz_bytes())
    directory = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, directory + 24, 2**31)  # uncompressed size of the first member
    clean_error(write(tmp_path / "a.npz", bytes(data)), "is stored but claims 2147483648 bytes")


def test_npz_member_claiming_more_than_the_archive_is_refused(tmp_path):
    data = bytearray(npz_bytes())
    directory = data.index(b"PK\x01\x02")
    struct.pack_into("<II", data, directory + 20, 0xFFFFFFF0, 0xFFFFFFF0)
    clean_error(write(tmp_path / "a.npz", bytes(data)), "beyond the archive")


def test_npz_deflated_member_beyond_deflates_ratio_is_refused(tmp_path):
    data = bytearray(npz_bytes(compressed=True))
    directory = data.index(b"PK\x01\x02")
    (compressed,) = struct.unpack_from("<I", data, directory + 20)
    struct.pack_into("<I", data, directory + 24, compressed * 2000)
    clean_error(write(tmp_path / "a.npz", bytes(data)), "beyond deflate's limit")


def test_npz_overlapping_members_are_refused(tmp_path):
    data = bytearray(npz_bytes({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}))
    first = data.index(b"PK\x01\x02")
    second = data.index(b"PK\x01\x02", first + 4)
    struct.pack_into("<I", data, second + 42, struct.unpack_from("<I", data, first + 42)[0])  # b's local header offset = a's
    clean_error(write(tmp_path / "a.npz", bytes(data)), "overlaps")


def test_npz_header_shape_overflowing_int64_is_a_clean_error(tmp_path):
    npy = npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776), }", b"\0" * 16)
    line = clean_error(write(tmp_path / "a.npz", zip_bytes({"w.npy": npy})), "header says")
    assert "(4835703278458516698824832 bytes)" in line  # Python ints (with the 128-byte header), not a wrapped int64


def test_npz_header_length_is_checked_before_the_header_is_read(tmp_path):
    npy = b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{}"
    clean_error(write(tmp_path / "a.npz", zip_bytes({"w.npy": npy})), r"header claims 2147483648 bytes")


@pytest.mark.parametrize(
    "npy, message",
    [
        (b"not numpy at all", "bad magic"),
        (b"\x93NUMPY\x01\x00", "ends inside"),
        (b"\x93NUMPY\x07\x00" + b"\0" * 8, "unsupported npy version"),
        (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,"), "unreadable npy header"),
        (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }"), "unreadable npy header"),
        (npy_bytes("{'descr': 'U5', 'fortran_order': False, 'shape': (1,), }", b"\0" * 20), "not a numeric type"),
        (npy_bytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", b"\0" * 4), "records are not loaded"),
        (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 3000 + ")" * 3000 + ", }"), "unreadable npy header"),
    ],
)
def test_npz_corrupt_npy_headers_are_clean_errors(tmp_path, npy, message):
    clean_error(write(tmp_path / "a.npz", zip_bytes({"w.npy": npy})), message)


def test_npz_bad_crc_is_found_when_the_array_is_read(tmp_path):
    data = bytearray(npz_bytes({"w": np.arange(8192, dtype=np.float32)}))
    data[data.index(b"\x93NUMPY") + 128 + 30000] ^= 0xFF  # a data byte far beyond what reading the header buffers
    path = write(tmp_path / "a.npz", bytes(data))
    tree = open_tree(path)  # headers are fine
    with pytest.raises(SourceError, match="data unreadable .*CRC") as info:
        tree.read("w")
    assert str(path) in info.value.line()


def test_npz_with_a_member_that_is_not_an_array_is_refused(tmp_path):
    data = zip_bytes({"w.npy": npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", b"\0" * 4), "README": b"hi"})
    clean_error(write(tmp_path / "a.npz", data), "'README' is not an .npy array")


@pytest.mark.parametrize("cut", [1, 10, 31, 100, 300, -200, -22, -1])
def test_truncated_npz_is_a_clean_error(tmp_path, cut):
    data = npz_bytes()
    clean_error(write(tmp_path / "t.npz", data[:cut]))


# ---------------------------------------------------------------------------------------
# torch


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.99])
def test_truncated_torch_checkpoints_are_clean_errors(tmp_path, legacy, cut):
    data = torch_bytes(legacy=legacy)
    clean_error(write(tmp_path / "m.pt", data[: int(len(data) * cut)]), "PyTorch checkpoint")


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", [_System, _Open])
@pytest.mark.parametrize("container", ["legacy pickle", "raw pickle", "zip"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, payload, container):
    marker = tmp_path / "pwned"
    obj = {"w": torch.ones(2), "x": payload(str(marker))}
    if container == "zip":
        data = torch_bytes(obj)
    elif container == "legacy pickle":
        data = torch_bytes(obj, legacy=True)
    else:
        data = pickle.dumps(obj, protocol=2)
    clean_error(write(tmp_path / "evil.pt", data), "refused: the pickle wants to run code")
    assert not marker.exists()


def test_legacy_storage_claiming_more_than_the_file_is_refused_before_torch_allocates(tmp_path, monkeypatch):
    data = torch_bytes({"w": torch.ones(3)}, legacy=True)
    stream = io.BytesIO(data)
    for _ in range(3):
        pickle.load(stream)
    start = stream.tell()
    main = data[start:]
    (position, size, value) = next(op for op in int_ops(main) if op[2] == 3)  # the storage's numel
    path = write(tmp_path / "big.pt", data[:start] + patch_int(main, position, size, 10**12))
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    clean_error(path, "storages claim 4000000000000 bytes but the file has")
    assert not calls  # refused before torch saw it


def test_legacy_pickle_claiming_a_huge_bytearray_allocates_nothing(tmp_path):
    data = torch_bytes({"w": torch.ones(3)}, legacy=True)
    stream = io.BytesIO(data)
    for _ in range(3):
        pickle.load(stream)
    start = stream.tell() + 2  # after the main pickle's PROTO
    path = write(tmp_path / "claim.pt", data[:start] + b"\x96" + struct.pack("<Q", 2**31) + data[start:])  # BYTEARRAY8 of 2 GiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clean_error(path, "truncated")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_zip_storage_claiming_more_than_its_record_is_refused(tmp_path):
    pkl = data_pkl(torch_bytes({"w": torch.ones(4, 4)}))
    position, size, _ = next(op for op in int_ops(pkl) if op[2] == 16)  # numel of the storage
    path = write(tmp_path / "big.pt", torch_zip_with_pickle(patch_int(pkl, position, size, 10**12), {"w": torch.ones(4, 4)}))
    clean_error(path, "storage '0' claims 4000000000000 bytes but its record holds 64")


def test_zip_tensor_larger_than_its_storage_is_a_clean_error(tmp_path):
    pkl = data_pkl(torch_bytes({"w": torch.ones(4, 4)}))
    sizes = [op for op in int_ops(pkl) if op[2] == 4]  # size (4, 4), then stride (4, 1)
    position, size, _ = sizes[0]
    path = write(tmp_path / "big.pt", torch_zip_with_pickle(patch_int(pkl, position, size, 2**30), {"w": torch.ones(4, 4)}))
    clean_error(path, "cannot load the PyTorch checkpoint")


def test_zip_stride_zero_view_claiming_a_terabyte_is_refused(tmp_path):
    pkl = data_pkl(torch_bytes({"w": torch.ones(4, 4)}))
    ops = [op for op in int_ops(pkl) if op[2] == 4]  # size 4, 4 then stride 4
    stride = ops[2]
    pkl = pkl[: stride[0]] + b"K\x00" + pkl[stride[0] + stride[1] :]  # stride (0, 1)
    pkl = patch_int(pkl, ops[0][0], ops[0][1], 2**38)  # size (2**38, 4): 4 TiB of float32
    clean_error(write(tmp_path / "big.pt", torch_zip_with_pickle(pkl, {"w": torch.ones(4, 4)})), r"claims 4398046511104 bytes but the file has")


@pytest.mark.parametrize(
    "obj, message",
    [
        ([torch.ones(2)], "holds a list, not a dict"),
        (torch.ones(2), "holds a single tensor"),
        (5, "holds a int"),
        ({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, "same name 'a.b'"),
        ({"w": torch.empty(2, device="meta")}, "on the meta device"),
        ({"w": torch.eye(2).to_sparse()}, "sparse_coo tensor"),
        ({"epoch": 3, "args": {"lr": 0.1}}, "holds no tensors"),
    ],
)
def test_torch_checkpoints_that_are_not_dicts_of_dense_tensors(tmp_path, obj, message):
    clean_error(write(tmp_path / "m.pt", torch_bytes(obj)), message)


def test_cyclic_and_deeply_nested_torch_containers_are_clean_errors(tmp_path):
    cyclic: dict = {"w": torch.ones(1)}
    cyclic["state_dict"] = cyclic
    clean_error(write(tmp_path / "cyclic.pt", torch_bytes(cyclic)), "nested more than 100 deep, or cyclic")
    deep: dict = {"w": torch.ones(1)}
    for _ in range(150):
        deep = {"x": deep}
    clean_error(write(tmp_path / "deep.pt", torch_bytes(deep)), "nested more than 100 deep")


def test_shared_containers_cannot_expand_a_small_pickle_exponentially(tmp_path, monkeypatch):
    import matcher.sources.torch_pickle as torch_pickle

    monkeypatch.setattr(torch_pickle, "MAX_ENTRIES", 20_000)
    level: dict = {"w": torch.ones(1)}
    for _ in range(40):  # 2**40 paths through 40 dicts
        level = {"a": level, "b": level}
    start = time.perf_counter()
    clean_error(write(tmp_path / "dag.pt", torch_bytes(level)), "more than 20000 entries")
    assert time.perf_counter() - start < 5


def test_legacy_files_load_in_memory_and_zip_files_on_the_meta_device(tmp_path, monkeypatch):
    """zip checkpoints are unpickled onto the meta device (nothing allocated, nothing mapped);
    each tensor is read from the file when asked for."""
    original = torch.load
    seen = []

    def spy(source, *args, **kwargs):
        seen.append((kwargs.get("map_location"), kwargs.get("mmap")))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for legacy in (True, False):
        path = write(tmp_path / f"m{legacy}.pt", torch_bytes(legacy=legacy))
        tree = read_everything(path)
        assert np.array_equal(tree.read("enc.layer_0.kernel"), ARRAYS["enc/layer_0/kernel"])
        assert tree.read("bf").astype(np.float32).tolist() == list(range(5))
    assert seen == [("cpu", False), ("meta", False)]


# ---------------------------------------------------------------------------------------
# safetensors

F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x10\x00\x00", "no header length"),
        (struct.pack("<Q", 10**6) + b'{"a": 1}', "header length 1000000 does not fit"),
        (safetensors_raw([1, 2, 3]), "not a JSON object"),
        (safetensors_raw("text"), "not a JSON object"),
        (safetensors_raw({"a": {**F32_4, "dtype": "F7"}}, b"\0" * 16), "unsupported dtype 'F7'"),
        (safetensors_raw({"a": {**F32_4, "dtype": ["F32"]}}, b"\0" * 16), "unsupported dtype"),
        (safetensors_raw({"a": {**F32_4, "shape": 4}}, b"\0" * 16), "do not fit the file"),
        (safetensors_raw({"a": {**F32_4, "shape": [True, 4]}}, b"\0" * 16), "do not fit the file"),
        (safetensors_raw({"a": {**F32_4, "data_offsets": ["0", "16"]}}, b"\0" * 16), "do not fit the file"),
        (safetensors_raw({"a": {**F32_4, "data_offsets": [0.0, 16.0]}}, b"\0" * 16), "do not fit the file"),
        (safetensors_raw({"a": {**F32_4, "data_offsets": [0]}}, b"\0" * 16), "malformed header entry"),
        (safetensors_raw({"a": [1, 2]}, b"\0" * 16), "malformed header entry"),
        (safetensors_raw({"a": F32_4, "b": F32_4}, b"\0" * 32), "overlaps or leaves gaps"),
        (safetensors_raw({"a": F32_4, "b": {**F32_4, "data_offsets": [20, 36]}}, b"\0" * 36), "overlaps or leaves gaps"),
        (safetensors_raw({"a": {**F32_4, "shape": [5]}}, b"\0" * 16), r"needs 20 bytes, entry spans 16"),
        (safetensors_raw({"a": {**F32_4, "shape": [2**40, 2**40]}}, b"\0" * 16), r"needs 4835703278458516698824704 bytes"),
        (safetensors_raw({"a": {**F32_4, "shape": [2**62] * 80}}, b"\0" * 16), r"needs <int too large to print>|needs \d+"),
        (safetensors_raw({"a": {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, 1 << 40]}}, b"\0" * 1024), "do not fit the file"),
        (safetensors_raw({"a": F32_4}, b"\0" * 8), "do not fit the file"),
        (safetensors_raw({"a": F32_4}, b"\0" * 20), "truncated or padded"),
        (safetensors_raw({"a": F32_4}, b"\0" * 16)[:-1], "do not fit the file"),
        (struct.pack("<Q", 3000) + b"{" + b"[" * 2999, "not valid JSON"),
        (struct.pack("<Q", 2) + b"{\xff", "not valid JSON"),
    ],
)
def test_malformed_safetensors_headers_are_clean_errors(tmp_path, data, message):
    clean_error(write(tmp_path / "m.safetensors", data), message)


def test_safetensors_claiming_a_terabyte_in_a_kilobyte_is_refused_from_the_header(tmp_path):
    path = write(tmp_path / "sparse.safetensors", safetensors_raw({"w": {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, 1 << 40]}}, b"\0" * 1024))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clean_error(path, "do not fit the file")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


# ---------------------------------------------------------------------------------------
# flax msgpack


@pytest.mark.parametrize(
    "data, message",
    [
        (flax_bytes({"a": np.ones((2, 3), np.float32)})[:-5], "not a readable flax msgpack"),
        (flax_bytes({"a": np.ones(2, np.float32)}) + b"\x01\x02", "not a readable flax msgpack"),
        (msgpack.packb({"a": ext_array([2, 3], "float32", b"\0" * 20)}), "holds 20 bytes, needs 24"),
        (msgpack.packb({"a": ext_array([2**40, 2**40], "float32", b"\0" * 16)}), "needs 4835703278458516698824704"),
        (msgpack.packb({"a": ext_array([2**62] * 100, "float32", b"\0" * 16)}), "needs"),
        (msgpack.packb({"a": ext_array([-1, 4], "float32", b"\0" * 16)}), "bad array shape"),
        (msgpack.packb({"a": ext_array("ab", "float32", b"\0" * 16)}), "bad array shape"),
        (msgpack.packb({"a": ext_array([2], "O", b"\0" * 16)}), "not a numeric type"),
        (msgpack.packb({"a": ext_array([2], "U2", b"\0" * 16)}), "not a numeric type"),
        (msgpack.packb({"a": ext_array([1], "(1000000000,)f8", b"\0" * 16)}), "not a numeric type|unsupported dtype"),
        (msgpack.packb({"a": ext_array([1], "float99", b"\0" * 16)}), "unsupported dtype"),
        (msgpack.packb({"a": ext_array([1], 7, b"\0" * 16)}), "not a dtype name"),
        (msgpack.packb({"a": msgpack.ExtType(1, b"\xc1garbage")}), "not \\(shape, dtype, bytes\\)"),
        (msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb([1, 2]))}), "not \\(shape, dtype, bytes\\)"),
        (b"\x81" + b"\x91" * 5000, "not a readable flax msgpack"),
        (msgpack.packb({"a/b": np.float32(1).tobytes(), "a": {"b": 1}}), "holds no tensors"),
        (flax_bytes({"a/b": np.ones(1, np.float32), "a": {"b": np.ones(1, np.float32)}}), "same name 'a/b'"),
        (msgpack.packb({"w": {"__msgpack_chunked_array__": True, "shape": {"0": 10}, "chunks": {"0": ext_array([4], "float32", b"\0" * 16)}}}), "chunks hold 4 values"),
        (msgpack.packb({"w": {"__msgpack_chunked_array__": True, "shape": [4], "chunks": [1]}}), "lacks its chunks"),
    ],
)
def test_malformed_flax_checkpoints_are_clean_errors(tmp_path, data, message):
    clean_error(write(tmp_path / "checkpoint_1", data), message)


def test_flax_deep_nesting_within_msgpacks_limit_is_a_clean_error(tmp_path):
    tree: dict = {"w": np.ones(1, np.float32)}
    for _ in range(500):
        tree = {"x": tree}
    clean_error(write(tmp_path / "deep", flax_bytes(tree)), "nested more than 100 deep")


def test_flax_top_level_that_is_not_a_map_is_refused(tmp_path):
    path = write(tmp_path / "list", flax_bytes([np.ones(1, np.float32)]))
    clean_error(path, "unrecognised checkpoint format")  # by bytes, it is not a flax checkpoint
    with pytest.raises(SourceError, match="nested dict of arrays"):
        READERS["flax_msgpack"].open(path)


def test_flax_chunked_arrays_are_joined(tmp_path):
    chunks = {"0": np.arange(4, dtype=np.float32), "1": np.arange(4, 6, dtype=np.float32)}
    path = write(tmp_path / "chunked", flax_bytes({"w": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 3}, "chunks": chunks}}))
    assert read_everything(path).read("w").tolist() == [[0, 1, 2], [3, 4, 5]]


# ---------------------------------------------------------------------------------------
# save_pretrained directories


def _sharded(root: Path, weight_map: dict | None = None) -> Path:
    root.mkdir(exist_ok=True)
    (root / "a.safetensors").write_bytes(save_safetensors({"x": np.ones(2, np.float32)}))
    (root / "b.safetensors").write_bytes(save_safetensors({"y": np.ones(3, np.float32)}))
    index = {"metadata": {}, "weight_map": weight_map if weight_map is not None else {"x": "a.safetensors", "y": "b.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_sharded_directory_reads_every_shard(tmp_path):
    assert set(read_everything(_sharded(tmp_path / "m")).keys()) == {"x", "y"}


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d.mkdir(), "holds no weights"),
        (lambda d: (d.mkdir(), (d / "model.safetensors").mkdir()), "holds no weights"),
        (lambda d: (_sharded(d), (d / "model.safetensors.index.json").write_text("{oops")), "shard index is not valid JSON"),
        (lambda d: (_sharded(d), (d / "model.safetensors.index.json").write_text("[1]")), "needs a 'weight_map'"),
        (lambda d: (_sharded(d), (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}')), "needs a 'weight_map'"),
        (lambda d: _sharded(d, {"x": "a.safetensors", "y": "../b.safetensors"}), "not a file name in the directory"),
        (lambda d: _sharded(d, {"x": "a.safetensors", "y": 7}), "not a file name in the directory"),
        (lambda d: _sharded(d, {"x": "a.safetensors", "y": "."}), "not a file name in the directory"),
        (lambda d: _sharded(d, {"x": "a.safetensors", "y": "c.safetensors"}), "shard 'c.safetensors' listed in the index is missing"),
        (lambda d: (_sharded(d), (d / "sub").mkdir(), (d / "model.safetensors.index.json").write_text('{"weight_map": {"x": "sub"}}')), "is not a file"),
        (lambda d: (_sharded(d), (d / "b.safetensors").write_bytes(save_safetensors({"x": np.ones(2, np.float32)}))), "'x' appears in two shards"),
        (lambda d: _sharded(d, {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}), "puts tensor 'z' in 'b.safetensors', but it is not there"),
        (lambda d: (_sharded(d), (d / "b.safetensors").write_bytes(b"")), "empty file"),
    ],
)
def test_broken_directories_are_clean_errors(tmp_path, setup, message):
    root = tmp_path / "model"
    setup(root)
    clean_error(root, message)


# ---------------------------------------------------------------------------------------
# the fuzz

MUTATIONS_PER_FORMAT = 300
CASE_SECONDS = 10


@dataclass
class Seed:
    """A valid input for one format: the bytes the fuzz mutates and how they become a file."""

    target: Path  # what open_tree is given
    original: bytes  # what is mutated
    write: Callable[[bytes], None]  # puts (mutated) bytes in place


def _rezipped(path: Path, archive_bytes: bytes, inner: str) -> Seed:
    """Mutations go to one member (``inner`` suffix) and the zip is rebuilt around it, so its
    CRC and sizes are right and the member's own parser (numpy, the unpickler) sees them."""
    members = {m.filename: zipfile.ZipFile(io.BytesIO(archive_bytes)).read(m) for m in zipfile.ZipFile(io.BytesIO(archive_bytes)).infolist()}
    name = next(n for n in members if n.endswith(inner))
    return Seed(path, members[name], lambda data: path.write_bytes(zip_bytes({**members, name: data})))


def _seeds(tmp_path: Path) -> dict[str, Seed]:
    def plain(path: Path, data: bytes, target: Path | None = None) -> Seed:
        path.write_bytes(data)
        return Seed(target or path, data, path.write_bytes)

    flax_tree = {"params": {"enc": {k: v for k, v in ARRAYS.items() if k != "bf"}}, "step": np.int32(3)}
    index = _sharded(tmp_path / "dir") / "model.safetensors.index.json"
    seeds = {
        "npz": plain(tmp_path / "v.npz", npz_bytes()),
        "npz_deflated": plain(tmp_path / "vc.npz", npz_bytes(compressed=True)),
        "npz_member": _rezipped(tmp_path / "vm.npz", npz_bytes(), "kernel.npy"),
        "safetensors": plain(tmp_path / "v.safetensors", save_safetensors(ARRAYS)),
        "torch_zip": plain(tmp_path / "v.pt", torch_bytes()),
        "torch_data_pkl": _rezipped(tmp_path / "vp.pt", torch_bytes(), "data.pkl"),
        "torch_legacy": plain(tmp_path / "vl.pt", torch_bytes(legacy=True)),
        "flax": plain(tmp_path / "v.msgpack", flax_bytes(flax_tree)),
        "directory_index": plain(index, index.read_bytes(), target=index.parent),
    }
    for seed in seeds.values():  # every seed is valid to begin with
        seed.write(seed.original)
        read_everything(seed.target)
    return seeds


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of ``data`` and a description of it."""
    out = bytearray(data)
    n = len(out)
    kind = rng.choice(["flip", "flip_head", "flip_tail", "truncate", "insert", "delete", "header", "duplicate", "huge", "zero", "append"])
    if kind.startswith("flip"):
        low, high = {"flip": (0, n), "flip_head": (0, max(1, n // 8)), "flip_tail": (n - max(1, n // 4), n)}[kind]
        spots = sorted(rng.randrange(low, high) for _ in range(rng.randint(1, 8)))
        for spot in spots:
            out[spot] ^= rng.randint(1, 255)
        return bytes(out), f"{kind} at {spots}"
    if kind == "truncate":
        cut = rng.randrange(n)
        return bytes(out[:cut]), f"truncate to {cut}"
    if kind == "insert":
        spot, run = rng.randrange(n + 1), bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return bytes(out[:spot] + run + out[spot:]), f"insert {len(run)} bytes at {spot}"
    if kind == "delete":
        spot, length = rng.randrange(n), rng.randint(1, 64)
        return bytes(out[:spot] + out[spot + length :]), f"delete {length} at {spot}"
    if kind == "header":
        length = rng.randint(1, 64)
        out[:length] = bytes(rng.randrange(256) for _ in range(length))
        return bytes(out[:n]), f"overwrite first {length} bytes"
    if kind == "duplicate":
        start = rng.randrange(n)
        chunk, spot = out[start : start + rng.randint(1, 256)], rng.randrange(n + 1)
        return bytes(out[:spot] + chunk + out[spot:]), f"duplicate {len(chunk)} bytes from {start} at {spot}"
    if kind == "huge":  # a size field somewhere claims a lot
        value = rng.choice([2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 10**12])
        width = 8 if value >= 2**32 else 4
        spot = rng.randrange(max(1, n - width))
        out[spot : spot + width] = value.to_bytes(width, "little")
        return bytes(out), f"write {value} at {spot}"
    if kind == "zero":
        spot, length = rng.randrange(n), rng.randint(1, 64)
        out[spot : spot + length] = bytes(len(out[spot : spot + length]))
        return bytes(out), f"zero {length} at {spot}"
    run = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(out) + run, f"append {len(run)} bytes"


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.fixture
def memory_ceiling():
    """Cap the address space while fuzzing: a real allocation of what a header claims fails
    loudly (and is reported) instead of exhausting the machine."""
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = (vm_kib * 1024) + 3 * 1024**3
    if hard != resource.RLIM_INFINITY and hard < ceiling:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


FORMATS = ["npz", "npz_deflated", "npz_member", "safetensors", "torch_zip", "torch_data_pkl", "torch_legacy", "flax", "directory_index"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_every_reader_gives_a_tree_or_a_clean_error(tmp_path, fmt, memory_ceiling):
    seed = _seeds(tmp_path)[fmt]
    rng = random.Random(f"matcher-fuzz-{fmt}")
    failures, outcomes = [], {"ok": 0, "error": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(MUTATIONS_PER_FORMAT):
            data, what = mutate(seed.original, rng)
            seed.write(data)
            signal.alarm(CASE_SECONDS)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        read_everything(seed.target)
                    finally:
                        if caught:  # printed to stderr, they would break the one-line error
                            failures.append(f"case {case} ({what}): warning {caught[0].message}"[:400])
                outcomes["ok"] += 1
            except SourceError as exc:
                line = exc.line()
                outcomes["error"] += 1
                if str(seed.target) not in line or "\n" in line or re.search(r"allocate|MemoryError|out of memory", line, re.I):
                    failures.append(f"case {case} ({what}): unclean error {line!r}")
            except _Hang:
                failures.append(f"case {case} ({what}): no outcome within {CASE_SECONDS} s")
            except Exception as exc:  # noqa: BLE001 - that is what the fuzz looks for
                failures.append(f"case {case} ({what}): {type(exc).__name__}: {exc}"[:400])
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not failures, f"{fmt}: {len(failures)} of {MUTATIONS_PER_FORMAT} mutations escaped:\n" + "\n".join(failures[:15])
    assert outcomes["error"] > MUTATIONS_PER_FORMAT // 4, outcomes  # the mutations do break things


# ---------------------------------------------------------------------------------------
# through the CLI: exit 1 and one line naming the file


@pytest.mark.parametrize(
    "name, make",
    [
        ("fifo.pt", lambda path: os.mkfifo(path)),
        ("claims.safetensors", lambda path: path.write_bytes(safetensors_raw({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16))),
        ("legacy.pt", lambda path: path.write_bytes(torch_bytes(legacy=True)[:400])),
        ("stride0.pt", lambda path: path.write_bytes(torch_bytes({"w": torch.ones(1).expand(10**6)}))),
        ("absurd", lambda path: path.write_bytes(msgpack.packb({"a": ext_array([2**40, 2**40], "float32", b"\0" * 16)}))),
        ("truncated.npz", lambda path: path.write_bytes(npz_bytes()[:-10])),
    ],
)
def test_the_cli_reports_each_broken_input_in_one_line_with_exit_1(tmp_path, name, make):
    from click.testing import CliRunner

    from matcher.cli import main

    path = tmp_path / name
    make(path)
    result = CliRunner().invoke(main, [str(path), "--target", "ViTModel"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), result.stderr


# ---------------------------------------------------------------------------------------
# valid torch checkpoints of random structure are read exactly (no false alarms)

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]


def _random_tensor(rng: random.Random, legacy: bool):
    dtype = rng.choice(_DTYPES[:-1] if legacy else _DTYPES)  # torch cannot load float8 from legacy files
    shape = [rng.randint(0 if rng.random() < 0.1 else 1, 4) for _ in range(rng.randint(0, 3))]
    base = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(rng.randrange(2**31))) * 10
    tensor = base.to(dtype) if dtype != torch.float8_e4m3fn else base.clamp(-400, 400).to(dtype)
    if tensor.dim() >= 2 and rng.random() < 0.3:
        tensor = tensor.transpose(0, 1)  # non-contiguous
    elif tensor.dim() >= 1 and tensor.shape[0] > 1 and rng.random() < 0.3:
        tensor = tensor[1:]  # a storage offset
    return tensor


def _random_tree(rng: random.Random, legacy: bool, depth: int = 0):
    """A nested checkpoint and the {name: tensor} the reader should find in it."""
    tree, expected = {}, {}
    for index in range(rng.randint(1, 4)):
        key = f"k{index}"
        choice = rng.random()
        if choice < 0.45 or depth >= 3:
            tree[key] = expected[key] = _random_tensor(rng, legacy)
        elif choice < 0.7:
            sub, sub_expected = _random_tree(rng, legacy, depth + 1)
            tree[key] = sub
            expected.update({f"{key}.{name}": t for name, t in sub_expected.items()})
        elif choice < 0.85:
            items = [_random_tensor(rng, legacy) for _ in range(rng.randint(1, 3))]
            tree[key] = items if rng.random() < 0.5 else tuple(items)
            expected.update({f"{key}.{i}": t for i, t in enumerate(items)})
        else:
            tree[key] = rng.choice([3, "text", None, 1.5, [1, 2], {"lr": 0.1}])
    return tree, expected


def _as_bytes(array) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_random_valid_torch_checkpoints_read_back_exactly(tmp_path, legacy):
    rng = random.Random(f"valid-{legacy}")
    for case in range(60):
        tree, expected = _random_tree(rng, legacy)
        tree["anchor"] = expected["anchor"] = torch.ones(1)
        if rng.random() < 0.2:
            tree["tied"] = expected["tied"] = expected["anchor"]  # shared storage
        path = write(tmp_path / f"c{case}.pt", torch_bytes(tree, legacy=legacy))
        read = read_everything(path)
        assert set(read.keys()) == set(expected), case
        for name, tensor in expected.items():
            want = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            assert np.array_equal(_as_bytes(read.read(name)), want), (case, name, tensor.dtype)
