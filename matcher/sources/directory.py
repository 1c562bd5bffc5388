"""A ``save_pretrained`` directory: one or several (sharded) safetensors files or a torch .bin."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SourceError
from ..tree import ParamTree
from . import register

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _never(head: bytes, path: Path) -> bool:
    return False  # chosen by open_tree for directories, not by bytes


def _shard_files(path: Path) -> list[Path]:
    for name in INDEX_FILES:
        index_path = path / name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SourceError("malformed shard index (needs a 'weight_map')", path=str(index_path)) from exc
            return [path / shard for shard in dict.fromkeys(weight_map.values())]
    for name in WEIGHT_FILES:
        if (path / name).exists():
            return [path / name]
    candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.npz"))
    if len(candidates) == 1:
        return candidates
    raise SourceError(
        "directory holds no weights (expected model.safetensors, a shard index or pytorch_model.bin)"
        if not candidates
        else f"directory holds several weight files and no index: {', '.join(c.name for c in candidates)}",
        path=str(path),
    )


@register("directory", _never)
def open_directory(path: Path) -> ParamTree:
    from . import open_tree

    shards = _shard_files(path)
    specs, owners, info = {}, {}, {"shards": [s.name for s in shards]}
    for shard in shards:
        if not shard.exists():
            raise SourceError(f"shard {shard.name} listed in the index is missing", path=str(path))
        tree = open_tree(shard)
        for key, spec in tree.specs.items():
            if key in specs:
                raise SourceError(f"tensor {key!r} appears in two shards", path=str(path))
            specs[key] = spec
            owners[key] = tree
    config = path / "config.json"
    if config.exists():
        info["config"] = str(config)
    return ParamTree(specs, loader=lambda key: owners[key].read(key), origin=str(path), format="directory", info=info)
