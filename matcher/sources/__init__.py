"""Checkpoint readers, chosen by the file's content (magic bytes), never by its suffix.

Each reader module registers itself with ``@register(name, sniff)``; ``open_tree`` reads
the first bytes of the file and asks each reader in turn whether they are its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SourceError
from ..tree import ParamTree
from .checks import ExactFile

SNIFF_BYTES = 64
# Only for files no reader claims by their bytes (a safetensors file whose header length is
# broken has no magic left); broken zips are routed by suffix in the npz and torch sniffers.
_SUFFIX_FALLBACK = {".safetensors": "safetensors"}


@dataclass(frozen=True)
class Reader:
    name: str
    sniff: Callable[[bytes, Path], bool]
    open: Callable[[Path], ParamTree]


READERS: dict[str, Reader] = {}


def register(name: str, sniff: Callable[[bytes, Path], bool]):
    def decorate(open_fn: Callable[[Path], ParamTree]) -> Callable[[Path], ParamTree]:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = Reader(name, sniff, open_fn)
        return open_fn

    return decorate


def _load_readers() -> None:
    from . import directory, flax_msgpack, npz, safetensors_file, torch_pickle  # noqa: F401


def detect(path: str | os.PathLike) -> Reader:
    """The reader for ``path``, or a SourceError naming the known formats."""
    _load_readers()
    path = Path(path)
    try:
        if not path.exists():
            raise SourceError("no such file or directory", path=str(path))
        if path.is_dir():
            return READERS["directory"]
        if not path.is_file():  # a FIFO or device would block or never end
            raise SourceError("not a regular file", path=str(path))
        with ExactFile(path) as handle:
            head = handle.read(0, SNIFF_BYTES)
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror or exc}", path=str(path)) from exc
    if not head:
        raise SourceError("empty file", path=str(path))
    for reader in READERS.values():
        if reader.name != "directory" and reader.sniff(head, path):
            return reader
    if path.suffix.lower() in _SUFFIX_FALLBACK:  # unrecognised bytes under this suffix: that reader's error says most
        return READERS[_SUFFIX_FALLBACK[path.suffix.lower()]]
    known = ", ".join(sorted(r for r in READERS if r != "directory"))
    if head.startswith(b"PK\x03\x04"):
        raise SourceError(f"unrecognised checkpoint format: a zip archive that is neither an npz (.npy members) nor a PyTorch checkpoint (data.pkl), or is corrupt; known formats: {known}", path=str(path))
    raise SourceError(f"unrecognised checkpoint format (first bytes {head[:8]!r}); known formats: {known}", path=str(path))


def open_tree(path: str | os.PathLike) -> ParamTree:
    """Read a checkpoint's parameter tree (shapes and dtypes; data on demand)."""
    reader = detect(path)
    tree = reader.open(Path(path))
    if not tree.specs:
        raise SourceError("the checkpoint holds no tensors", path=str(path))
    return tree
