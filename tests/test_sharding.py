"""Sharded output (``--shard-size``): shards are what ``save_pretrained`` writes,
``from_pretrained`` loads them, and they hold exactly the tensors of the unsharded output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import matcher
from matcher.cli import main
from matcher.convert import convert
from matcher.errors import MatcherError
from matcher.sources import open_tree
from matcher.writer import INDEX_NAME, OutputTensor, parse_size, plan_shards

DEMO = Path(__file__).resolve().parent / "fixtures" / "demo"
SOURCE, CONFIG = DEMO / "siglip_tiny.npz", DEMO / "siglip_tiny_config.json"
SHARD = 20_000  # bytes; the demo's weights are about 95 KB


def weights(directory: Path) -> dict[str, np.ndarray]:
    tree = open_tree(directory)  # the save_pretrained-directory reader: single file or index + shards
    return {key: tree.read(key) for key in tree.keys()}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    single = convert(SOURCE, "SiglipModel", CONFIG, "known_mappings/siglip.yaml", root / "single")
    sharded = convert(SOURCE, "SiglipModel", CONFIG, "known_mappings/siglip.yaml", root / "sharded", shard_size=SHARD)  # verify=True
    return single, sharded


def test_sharded_output_is_laid_out_as_save_pretrained_lays_it_out(outputs):
    single, sharded = outputs
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "mapping.yaml", "model.safetensors"]
    names = sorted(p.name for p in sharded.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    count = len(shards)
    assert count > 2
    assert names == sorted(["config.json", "mapping.yaml", INDEX_NAME, *shards])
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        tensors = load_file(str(sharded / shard))
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
        size = sum(t.nbytes for t in tensors.values())
        assert size <= SHARD or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total


def test_sharded_output_loads_with_from_pretrained_and_equals_the_unsharded_one(outputs):
    import torch
    from transformers import SiglipModel

    single, sharded = outputs
    expected = load_file(str(single / "model.safetensors"))
    assert weights(sharded).keys() == expected.keys()
    for key, value in weights(sharded).items():
        assert np.array_equal(value, expected[key]), key
    a, b = SiglipModel.from_pretrained(single), SiglipModel.from_pretrained(sharded)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


def test_a_shard_size_larger_than_the_model_gives_one_file(tmp_path):
    out = convert(SOURCE, "SiglipModel", CONFIG, "known_mappings/siglip.yaml", tmp_path / "out", shard_size="1GB", verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mapping.yaml", "model.safetensors"]


def test_cli_shard_size(tmp_path):
    out = tmp_path / "out"
    args = [str(SOURCE), "--target", "SiglipModel", "--config", str(CONFIG), "--mapping", "siglip", "--yes"]
    result = CliRunner().invoke(main, [*args, "--save", str(out), "--shard-size", "20KB"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / INDEX_NAME).exists() and not (out / "model.safetensors").exists()
    result = CliRunner().invoke(main, [*args, "--save", str(tmp_path / "bad"), "--shard-size", "lots"])
    assert result.exit_code == 2 and "--shard-size" in result.output
    assert not (tmp_path / "bad").exists()


def test_api_save_passes_the_shard_size(tmp_path):
    report = matcher.match(SOURCE, "SiglipModel", CONFIG, mapping="known_mappings/siglip.yaml")
    out = report.save(tmp_path / "out", shard_size=SHARD)
    assert (Path(out) / INDEX_NAME).exists()


@pytest.mark.parametrize(
    "text, size",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5 KB", 1500), ("123", 123), (4096, 4096), ("10kib", 10240)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1GB", "0", 0])
def test_parse_size_refuses_what_is_not_a_positive_size(text):
    with pytest.raises(MatcherError):
        parse_size(text)


def test_plan_shards_keeps_order_and_gives_an_oversized_tensor_its_own_shard():
    def t(name, n):
        return OutputTensor(name, (n,), "uint8")

    tensors = [t("a", 4), t("b", 4), t("c", 3), t("big", 20), t("d", 8), t("e", 1)]
    shards = plan_shards(tensors, 10)
    assert [[x.name for x in shard] for shard in shards] == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert plan_shards([], 10) == [[]]


def test_a_safetensors_file_whose_header_length_looks_like_a_msgpack_map_is_read_as_safetensors(tmp_path):
    """The low byte of the header length is the file's first byte: 0x81-0x8F is also how a
    msgpack map starts (this writer's shards hit it often)."""
    from safetensors.numpy import save_file

    for pad in range(300):
        path = tmp_path / f"m{pad}.safetensors"
        save_file({"w": np.arange(3, dtype=np.float32)}, str(path), metadata={"pad": "x" * pad})
        if 0x81 <= path.read_bytes()[0] <= 0x8F:
            break
    else:
        pytest.fail("no padding gave such a header length")
    tree = open_tree(path)
    assert tree.format == "safetensors" and tree.read("w").tolist() == [0, 1, 2]


def test_thousands_of_shards_are_written_with_a_few_files_open(tmp_path, monkeypatch):
    """A 300 GB model in 200 MB shards has 1 500 files: more than a process may hold open."""
    import matcher.writer as writer_module

    monkeypatch.setattr(writer_module, "OPEN_FILES", 3)
    open_now, most = set(), [0]
    real_open, real_close = writer_module.os.open, writer_module.os.close

    def tracked_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        open_now.add(fd)
        most[0] = max(most[0], len(open_now))
        return fd

    def tracked_close(fd):
        open_now.discard(fd)
        return real_close(fd)

    monkeypatch.setattr(writer_module.os, "open", tracked_open)
    monkeypatch.setattr(writer_module.os, "close", tracked_close)
    rng = np.random.default_rng(5)
    arrays = {f"t{i}": rng.standard_normal((4, 3 + i % 5)).astype(np.float32) for i in range(40)}
    tensors = [OutputTensor(name, a.shape, "float32") for name, a in arrays.items()]
    order = tensors[::-1]  # produced in another order than the files hold them: files are reopened
    names = writer_module.write_model(tmp_path, tensors, lambda t: arrays[t.name], max_shard_size=100, order=order)
    assert len(names) == 41 and most[0] <= 3 and not open_now
    index = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    for name, array in arrays.items():
        assert np.array_equal(load_file(str(tmp_path / index[name]))[name], array), name
