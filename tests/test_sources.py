"""Readers: the format comes from the bytes, trees list shapes and dtypes, data comes on demand."""

import json
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from matcher.errors import SourceError
from matcher.sources import detect, open_tree

ARRAYS = {"params/img/embedding/kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "params/t": np.array([1.5], dtype=np.float32)}


def test_npz_reads_headers_then_data_and_keeps_slash_keys(tmp_path):
    path = tmp_path / "ckpt.weights"  # the suffix says nothing; the bytes decide
    np.savez(path.with_suffix(".npz"), **ARRAYS)
    path.with_suffix(".npz").rename(path)
    tree = open_tree(path)
    assert tree.format == "npz"
    assert tree["params/img/embedding/kernel"].shape == (2, 3, 4)
    assert np.array_equal(tree.read("params/t"), ARRAYS["params/t"])


def test_npz_bfloat16_arrays_come_back_as_bfloat16(tmp_path):
    path = tmp_path / "bf16.npz"
    np.savez(path, w=np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16))
    tree = open_tree(path)
    assert tree["w"].dtype == "bfloat16"
    assert tree.read("w").astype(np.float32).tolist() == list(range(6))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SourceError, match="pickled objects"):
        open_tree(path)


def test_torch_checkpoint_is_unwrapped_and_module_prefix_stripped(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"module.visual.conv1.weight": torch.ones(2, 3), "module.logit_scale": torch.tensor(1.0)}, "epoch": 3}, path)
    tree = open_tree(path)
    assert tree.format == "torch"
    assert set(tree.keys()) == {"visual.conv1.weight", "logit_scale"}
    assert tree.info["unwrapped"] == ["state_dict"] and tree.info["stripped_prefix"] == "module."
    assert tree.read("visual.conv1.weight").shape == (2, 3)


def test_torch_bfloat16_tensors_read_as_numpy(tmp_path):
    path = tmp_path / "bf16.pt"
    torch.save({"w": torch.arange(4, dtype=torch.bfloat16)}, path)
    assert open_tree(path).read("w").astype(np.float32).tolist() == [0, 1, 2, 3]


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    victim = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": _Payload(str(victim))}, handle, protocol=2)
    with pytest.raises(SourceError, match="refused"):
        open_tree(path)
    assert not victim.exists()


def test_safetensors_header_is_validated_against_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones((2, 2), np.float32)}, str(path))
    assert open_tree(path)["a"].shape == (2, 2)
    header = json.dumps({"a": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}).encode()
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(SourceError, match="needs .* bytes"):
        open_tree(lying)


def test_flax_msgpack_is_flattened_with_slashes(tmp_path):
    from flax import serialization

    path = tmp_path / "checkpoint_100"
    path.write_bytes(serialization.msgpack_serialize({"backbone": {"clip": {"w": np.ones((2, 3), np.float32)}}, "step": np.int32(7)}))
    tree = open_tree(path)
    assert tree.format == "flax_msgpack"
    assert tree["backbone/clip/w"].shape == (2, 3)


def test_save_pretrained_directory_reads_its_weights(tmp_path):
    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    tree = open_tree(tmp_path)
    assert tree.format == "directory" and list(tree.keys()) == ["a"]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty file"), (b"hello world, not weights", "unrecognised checkpoint format")],
)
def test_unreadable_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=message) as info:
        open_tree(path)
    assert str(path) in info.value.line() and "\n" not in info.value.line()


def test_truncated_npz_is_a_clean_error(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, **ARRAYS)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SourceError):
        open_tree(path)


def test_directory_without_weights_is_a_clean_error(tmp_path):
    with pytest.raises(SourceError, match="holds no weights"):
        open_tree(tmp_path)
