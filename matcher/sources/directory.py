"""A ``save_pretrained`` directory: one or several (sharded) safetensors files or a torch .bin.

A shard index must be a JSON object with a ``weight_map`` of tensor name -> shard file
name; the shards must be plain files in the directory (no paths out of it, no
subdirectories), every tensor the index lists must be in the shard it names, and no
tensor may appear in two shards.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SourceError
from ..tree import ParamTree
from . import register
from .checks import reason, short

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _never(head: bytes, path: Path) -> bool:
    return False  # chosen by open_tree for directories, not by bytes


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_bytes())
    except OSError as exc:
        raise SourceError(f"cannot read the shard index ({exc.strerror or exc})", path=str(index_path)) from exc
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"shard index is not valid JSON ({reason(exc)})", path=str(index_path)) from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError("malformed shard index (needs a 'weight_map' of tensor name -> shard file)", path=str(index_path))
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise SourceError(f"malformed shard index: tensor {short(key)} names shard {short(shard)}, not a file name in the directory", path=str(index_path))
    return weight_map


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    for name in INDEX_FILES:
        index_path = path / name
        if index_path.exists():
            weight_map = _read_index(index_path)
            return [path / shard for shard in dict.fromkeys(weight_map.values())], weight_map
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name], None
    candidates = [
        c
        for c in (sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.npz")))
        if c.is_file()
    ]
    if len(candidates) == 1:
        return candidates, None
    raise SourceError(
        "directory holds no weights (expected model.safetensors, a shard index or pytorch_model.bin)"
        if not candidates
        else f"directory holds several weight files and no index: {', '.join(c.name for c in candidates)}",
        path=str(path),
    )


@register("directory", _never)
def open_directory(path: Path) -> ParamTree:
    from . import open_tree

    shards, weight_map = _shard_files(path)
    specs, owners, info = {}, {}, {"shards": [s.name for s in shards]}
    for shard in shards:
        if not shard.is_file():
            what = "missing" if not shard.exists() else "not a file"
            raise SourceError(f"shard {short(shard.name)} listed in the index is {what}", path=str(path))
        tree = open_tree(shard)
        for key, spec in tree.specs.items():
            if key in specs:
                raise SourceError(f"tensor {short(key)} appears in two shards ({Path(owners[key].origin).name} and {shard.name})", path=str(path))
            specs[key] = spec
            owners[key] = tree
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in specs or Path(owners[key].origin).name != shard:
                raise SourceError(f"the shard index puts tensor {short(key)} in {short(shard)}, but it is not there", path=str(path))
    config = path / "config.json"
    if config.exists():
        info["config"] = str(config)
    return ParamTree(specs, loader=lambda key: owners[key].read(key), origin=str(path), format="directory", info=info)
