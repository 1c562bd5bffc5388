"""The streaming conversion path: sources read once and in production order, views of the
mapped file with bounded residency, byte-identical tensors copied file to file, and a writer
thread whose errors reach the caller."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

import matcher.sources.mapped as mapped_module
import matcher.writer as writer_module
from matcher.convert import Producer, make_plan, production_order
from matcher.errors import MatcherError
from matcher.mapping import Mapping
from matcher.sources import open_tree
from matcher.sources.mapped import MappedFile, locate
from matcher.tree import ParamTree, TensorSpec
from matcher.writer import OutputTensor, write_model


FUSED = """
matcher_mapping: 1
rules:
- {target: "layers.{i}.q", source: "blocks.{i}.qkv", ops: [{chunk: {axis: 0, parts: 3, index: 0}}]}
- {target: "layers.{i}.k", source: "blocks.{i}.qkv", ops: [{chunk: {axis: 0, parts: 3, index: 1}}]}
- {target: "layers.{i}.v", source: "blocks.{i}.qkv", ops: [{chunk: {axis: 0, parts: 3, index: 2}}]}
- {target: "layers.{i}.w", source: "blocks.{i}.w", ops: [{transpose: [1, 0]}]}
"""


def test_each_source_is_read_once_and_the_file_keeps_the_planned_order(tmp_path):
    """q, k and v of every layer cut from one fused tensor: written layer by layer, each fused
    tensor read once, and held no longer than its three outputs need it."""
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(3):
        arrays[f"blocks.{i}.qkv"] = rng.standard_normal((12, 5)).astype(np.float32)
        arrays[f"blocks.{i}.w"] = rng.standard_normal((5, 7)).astype(np.float32)
    reads: list[str] = []
    source = ParamTree.from_arrays(arrays)
    counting = ParamTree(source.specs, loader=lambda key: reads.append(key) or arrays[key])
    target = ParamTree({f"layers.{i}.{p}": TensorSpec(f"layers.{i}.{p}", (4, 5) if p != "w" else (7, 5), "float32") for i in range(3) for p in "qkvw"})
    plan = make_plan(counting, target, Mapping.from_dict(yaml.safe_load(FUSED)))
    assert not plan.problems
    order = production_order(plan)
    assert [o.name for o in order[:3]] == ["layers.0.q", "layers.0.k", "layers.0.v"]
    producer = Producer(plan, counting, order)
    held = []
    write_model(tmp_path, plan.outputs, lambda o: (held.append(len(producer.cache)), producer(o))[1], order=order)
    assert sorted(reads) == sorted(arrays) and len(reads) == len(arrays)
    assert max(held) <= 1 and not producer.cache
    written = load_file(str(tmp_path / "model.safetensors"))
    for i in range(3):
        q, k, v = np.split(arrays[f"blocks.{i}.qkv"], 3)
        assert np.array_equal(written[f"layers.{i}.q"], q) and np.array_equal(written[f"layers.{i}.v"], v)
        assert np.array_equal(written[f"layers.{i}.w"], arrays[f"blocks.{i}.w"].T)
    data = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    starts = [header[o.name]["data_offsets"][0] for o in plan.outputs]
    assert starts == sorted(starts)  # the file follows the plan, whatever order the tensors were produced in


def test_a_failing_producer_stops_the_writer_and_raises(tmp_path):
    tensors = [OutputTensor(f"t{i}", (1000,), "float32") for i in range(5)]

    def produce(tensor):
        if tensor.name == "t3":
            raise MatcherError("boom")
        return np.zeros(1000, np.float32)

    with pytest.raises(MatcherError, match="boom"):
        write_model(tmp_path, tensors, produce)


def test_a_write_error_in_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    import matcher.writer as writer

    calls = []

    def failing(fd, data, position):
        calls.append(position)
        if len(calls) > 2:  # the header, then one tensor
            raise OSError(28, "No space left on device")
        return original(fd, data, position)

    original = writer.os.pwrite
    monkeypatch.setattr(writer.os, "pwrite", failing)
    tensors = [OutputTensor(f"t{i}", (1000,), "float32") for i in range(20)]
    reported = []
    with pytest.raises(OSError, match="No space"):
        write_model(tmp_path, tensors, lambda t: np.zeros(1000, np.float32), progress=lambda t: reported.append(t.name))
    assert reported in ([], ["t0"])  # the tensor whose write failed is not reported as written



# ---------------------------------------------------------------------------- npz and torch reads


def test_npz_arrays_are_read_only_views_equal_to_numpy_s_own_reading(tmp_path):
    arrays = {
        "c": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "f": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        "be": np.arange(5, dtype=">i4"),
        "bf": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 3), np.float32),
    }
    path = tmp_path / "a.npz"
    np.savez(path, **arrays)
    tree = open_tree(path)
    with np.load(path) as expected:
        for key in arrays:
            array = tree.read(key)
            reference = expected[key].view(ml_dtypes.bfloat16) if key == "bf" else expected[key]
            assert array.shape == reference.shape and array.dtype == reference.dtype, key
            assert np.array_equal(array, reference), key
            if array.size:
                assert not array.flags.writeable, key


def test_npz_compressed_members_are_still_read(tmp_path):
    path = tmp_path / "c.npz"
    np.savez_compressed(path, w=np.arange(10.0))
    assert open_tree(path).read("w").tolist() == list(range(10))


def test_torch_views_sharing_storages_are_read_from_the_file(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "base": base,
        "t": base.t(),  # a transposed view of the same storage
        "row": base[2],  # a storage offset
        "cols": base[:, 3:7],  # strided
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "bf": torch.arange(4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 2),
    }
    path = tmp_path / "m.pt"
    torch.save(state, path)
    tree = open_tree(path)
    for key, value in state.items():
        expected = value.float().numpy() if key == "bf" else value.numpy()
        array = tree.read(key)
        assert array.shape == tuple(value.shape), key
        assert np.array_equal(array.astype(np.float32) if key == "bf" else array, expected), key


def test_a_torch_zip_rewritten_by_another_tool_is_read_correctly(tmp_path):
    """torch computes meta storages' offsets from torch.save's own layout; Python's zipfile lays
    records out differently, so those offsets do not check out and the file is mapped by torch."""
    original = tmp_path / "m.pt"
    state = {"a": torch.arange(100.0), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(3, 5)}
    torch.save(state, original)
    rewritten = tmp_path / "r.pt"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member))
    tree = open_tree(rewritten)
    for key, value in state.items():
        assert np.array_equal(tree.read(key), value.numpy()), key


# ---------------------------------------------------------------------------- residency and file-to-file copies


def test_a_mapped_file_releases_what_was_read_two_generations_ago_again_and_again(tmp_path, monkeypatch):
    page = mapped_module.mmap.PAGESIZE
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * (64 * page // 256))
    released: list[tuple[int, int]] = []
    mapped = MappedFile(path, budget=12 * page)
    monkeypatch.setattr(mapped, "_release", lambda start, end: released.append((start, end)))
    for index in range(12):  # 12 reads of 2 pages; a sweep every 4 pages read
        array = mapped.array(index * 2 * page, np.dtype(np.uint8), 2 * page)
        assert array[0] == 0 and not array.flags.writeable
    # a sweep every 4 pages read (2 reads); from the third sweep on, each releases everything read
    # before the two latest generations, again: reads 1-2, then 1-4, 1-6, 1-8 (each as one interval)
    assert released == [(0, 4 * page), (0, 8 * page), (0, 12 * page), (0, 16 * page)]


def test_ranges_released_again_stay_few_however_many_tensors_were_read():
    """Ranges that never touch (a torch zip's storages, each after its record header) are merged
    across their narrowest gaps, so a sweep costs the same after 50 000 tensors as after 50."""
    ranges = [(i * 1000, i * 1000 + 900) for i in range(50_000)]  # 100-byte gaps
    ranges += [(10**9, 10**9 + 5)]  # far away
    merged = mapped_module._merged(ranges, limit=8)
    assert len(merged) <= 8
    assert merged[0][0] == 0 and merged[-1] == (10**9, 10**9 + 5)
    assert all(any(a <= start and end <= b for a, b in merged) for start, end in ranges)  # everything read is still released
    assert mapped_module._merged([(0, 5), (5, 9), (20, 30)]) == [(0, 9), (20, 30)]  # few: only touching ranges merge


def test_resident_pages_stay_bounded_while_a_whole_file_is_read(tmp_path):
    def resident_file_kb() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    path = tmp_path / "big.npz"
    np.savez(path, **{f"w{i}": np.full(2**20, i, np.float32) for i in range(48)})  # 48 x 4 MB
    tree = open_tree(path)
    before = resident_file_kb()
    for key in tree.keys():
        assert tree.read(key)[-1] == int(key[1:])
    assert resident_file_kb() - before < (mapped_module.RESIDENT_BYTES + 16 * 2**20) // 1024


def test_locate_finds_byte_ranges_of_a_mapped_file_only(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(np.arange(1000, dtype=np.float32).tobytes())
    mapped = MappedFile(path)
    whole = mapped.array(0, np.dtype(np.float32), 1000).reshape(10, 100)
    assert locate(whole[3:5])[1] == 300 * 4  # rows: a range
    assert locate(whole[:, :2]) is None  # columns: not one
    assert locate(whole.T) is None
    assert locate(np.arange(10.0)) is None  # not mapped at all


def fused_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    state = {}
    for i in range(3):
        state[f"blocks.{i}.qkv"] = torch.from_numpy(rng.standard_normal((12, 5)).astype(np.float32))
        state[f"blocks.{i}.w"] = torch.from_numpy(rng.standard_normal((5, 7)).astype(np.float32))
    torch.save(state, tmp_path / "fused.pt")
    return tmp_path / "fused.pt", {k: v.numpy() for k, v in state.items()}


def convert_fused(source_path: Path, out: Path) -> dict[str, np.ndarray]:
    out.mkdir()
    source = open_tree(source_path)
    target = ParamTree({f"layers.{i}.{p}": TensorSpec(f"layers.{i}.{p}", (4, 5) if p != "w" else (7, 5), "float32") for i in range(3) for p in "qkvw"})
    plan = make_plan(source, target, Mapping.from_dict(yaml.safe_load(FUSED)))
    order = production_order(plan)
    producer = Producer(plan, source, order, prefetch=True)
    try:
        write_model(out, plan.outputs, producer, order=order)
    finally:
        producer.close()
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("how", ["copy_file_range", "unsupported", "no_such_call"])
def test_byte_ranges_are_copied_file_to_file_or_written_from_memory_alike(tmp_path, monkeypatch, how):
    source, arrays = fused_checkpoint(tmp_path)
    calls = []
    if how == "unsupported":
        def refuse(*args):
            calls.append(args)
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(writer_module.os, "copy_file_range", refuse, raising=False)
    elif how == "no_such_call":
        monkeypatch.delattr(writer_module.os, "copy_file_range", raising=False)
    elif hasattr(os, "copy_file_range"):
        real = os.copy_file_range
        monkeypatch.setattr(writer_module.os, "copy_file_range", lambda *a: calls.append(a) or real(*a))
    written = convert_fused(source, tmp_path / "out")
    for i in range(3):
        q, k, v = np.split(arrays[f"blocks.{i}.qkv"], 3)
        assert np.array_equal(written[f"layers.{i}.q"], q) and np.array_equal(written[f"layers.{i}.k"], k)
        assert np.array_equal(written[f"layers.{i}.v"], v) and np.array_equal(written[f"layers.{i}.w"], arrays[f"blocks.{i}.w"].T)
    if how == "copy_file_range" and hasattr(os, "copy_file_range"):
        assert len(calls) >= 9  # q, k and v of three layers: rows of the fused tensor, ranges of the file
    if how == "unsupported":
        assert len(calls) == 1  # tried once, then written from memory


def test_a_copy_error_other_than_unsupported_reaches_the_caller(tmp_path, monkeypatch):
    source, _ = fused_checkpoint(tmp_path)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module.os, "copy_file_range", full, raising=False)
    with pytest.raises(OSError, match="No space"):
        convert_fused(source, tmp_path / "out")


def test_where_a_file_cannot_be_mapped_its_arrays_are_read_into_memory_alike(tmp_path, monkeypatch):
    """A filesystem without mmap: npz members and torch storages are read with exact preads."""
    rng = np.random.default_rng(3)
    arrays = {"a": rng.standard_normal((7, 5)).astype(np.float32), "b": np.asfortranarray(rng.standard_normal((4, 6)))}
    np.savez(tmp_path / "m.npz", **arrays)
    state = {"w": torch.from_numpy(rng.standard_normal((6, 3)).astype(np.float32)), "t": torch.arange(12.0).reshape(3, 4).t()}
    torch.save(state, tmp_path / "m.pt")
    monkeypatch.setattr(MappedFile, "open", classmethod(lambda cls, path: None))
    npz = open_tree(tmp_path / "m.npz")
    for key, value in arrays.items():
        assert np.array_equal(npz.read(key), value) and npz.read(key).flags.writeable, key
    pt = open_tree(tmp_path / "m.pt")
    for key, value in state.items():
        assert np.array_equal(pt.read(key), value.numpy()), key
