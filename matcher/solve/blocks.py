"""Repeated blocks: the layers of a model, found from numeric path segments.

A block template is a path prefix with one number replaced by ``{i}`` whose instances
all hold the same relative keys with the same shapes (``encoderblock_{i}``,
``resblocks.{i}``, ``layers.{i}``). The outermost such number wins, so the two layer
norms inside a layer (``LayerNorm_0``, ``LayerNorm_1``) stay leaves of the layer.
A block is solved once and replicated; every instance is checked by construction.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from ..tree import ParamTree, TensorSpec, natural_key

_NUMBER_IN_SEGMENT = re.compile(r"(?:(?<=[/.])|^)([^/.]*?)(\d+)(?=[/.]|$)")


@dataclass
class Block:
    prefix: str  # template with {i}, e.g. "visual.transformer.resblocks.{i}"
    indices: list[int]
    leaves: dict[str, TensorSpec]  # relative suffix (with its leading separator) -> spec of instance 0
    keys: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.indices)

    def key(self, suffix: str, index: int) -> str:
        return self.prefix.replace("{i}", str(index)) + suffix

    def template(self, suffix: str) -> str:
        return self.prefix + suffix


@dataclass
class Units:
    """A tree split into repeated blocks and the leaves outside them."""

    blocks: list[Block]
    singles: dict[str, TensorSpec]


def _candidates(key: str) -> list[tuple[str, int, str]]:
    """(prefix template, index, suffix) for each number in ``key``, leftmost first."""
    found = []
    for match in _NUMBER_IN_SEGMENT.finditer(key):
        start, end = match.span(2)
        prefix = key[:start] + "{i}" + key[end:match.end()]
        found.append((prefix, int(match.group(2)), key[match.end():]))
    return found


def find_blocks(tree: ParamTree) -> Units:
    by_prefix: dict[str, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    for key, spec in tree.specs.items():
        for prefix, index, suffix in _candidates(key):
            by_prefix[prefix][index][suffix] = (spec.shape, spec.dtype)
    valid: dict[str, list[int]] = {}
    for prefix, instances in by_prefix.items():
        if len(instances) < 2:
            continue
        signatures = {tuple(sorted(content.items())) for content in instances.values()}
        if len(signatures) == 1:
            valid[prefix] = sorted(instances)
    blocks: dict[str, Block] = {}
    singles: dict[str, TensorSpec] = {}
    for key, spec in tree.specs.items():
        chosen = next(((p, i, s) for p, i, s in _candidates(key) if p in valid), None)
        if chosen is None:
            singles[key] = spec
            continue
        prefix, index, suffix = chosen
        block = blocks.get(prefix)
        if block is None:
            block = blocks[prefix] = Block(prefix, valid[prefix], {})
        block.keys.add(key)
        if index == valid[prefix][0]:
            block.leaves[suffix] = spec
    ordered = sorted(blocks.values(), key=lambda b: natural_key(b.prefix))
    return Units(ordered, singles)


def ancestors(path: str) -> list[str]:
    """Proper ancestors of a path, nearest first, without the root."""
    cut = [m.start() for m in re.finditer(r"[/.]", path)]
    return [path[:c] for c in reversed(cut)]
