"""Repeated blocks: the layers of a model, found from numeric path segments.

A block template is a path prefix with one number replaced by ``{i}`` whose instances
all hold the same relative keys with the same shapes (``encoderblock_{i}``,
``resblocks.{i}``, ``layers.{i}``). The outermost such number wins, so the two layer
norms inside a layer (``LayerNorm_0``, ``LayerNorm_1``) stay leaves of the layer.
A block is solved once and replicated; every instance is checked by construction.

Layers that are not all alike (a mixture-of-experts decoder whose first layers are dense) make
one block per *structure class*: the instances of a numbered prefix grouped by their relative
keys and shapes (dense layers {0, 1}, MoE layers {2, ..., 5}), each class with two or more
instances a block of its own, with the same ``{i}`` template and its own ``indices``. An
instance alone in its class stays outside blocks (its keys fall to inner numbers, or are leaves).
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
    stacked: bool = False  # scanned layers: one tensor per leaf, layers on a leading axis
    classed: bool = False  # one structure class of a prefix whose instances are not all alike
    among: tuple[int, ...] = ()  # for a class: every instance of its prefix, in every class

    @property
    def count(self) -> int:
        return len(self.indices)

    def key(self, suffix: str, index: int) -> str:
        return self.prefix.replace("{i}", str(index)) + suffix

    def template(self, suffix: str) -> str:
        return self.prefix + suffix

    def instance_keys(self) -> dict[str, TensorSpec]:
        """Every concrete key of the block with its own spec."""
        if self.stacked:
            return {self.prefix + suffix: TensorSpec(self.prefix + suffix, (self.count,) + spec.shape, spec.dtype) for suffix, spec in self.leaves.items()}
        return {self.key(suffix, index): spec for suffix, spec in self.leaves.items() for index in self.indices}


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
    uniform: dict[str, tuple[int, ...]] = {}  # prefix -> its instances, all alike
    classed: dict[str, dict[int, tuple[int, ...]]] = {}  # prefix -> instance -> the instances of its class (two or more)
    among: dict[str, tuple[int, ...]] = {}  # prefix with classes -> all its instances
    for prefix, instances in by_prefix.items():
        if len(instances) < 2:
            continue
        classes: dict[tuple, list[int]] = defaultdict(list)
        for index, content in instances.items():
            classes[tuple(sorted(content.items()))].append(index)
        if len(classes) == 1:
            uniform[prefix] = tuple(sorted(instances))
            continue
        members = {index: tuple(sorted(indices)) for indices in classes.values() if len(indices) >= 2 for index in indices}
        if members:
            classed[prefix] = members
            among[prefix] = tuple(sorted(instances))
    blocks: dict[tuple[str, int], Block] = {}  # (prefix, first instance of the class)
    singles: dict[str, TensorSpec] = {}
    for key, spec in tree.specs.items():
        chosen = None
        for prefix, index, suffix in _candidates(key):
            if prefix in uniform:
                chosen = prefix, index, suffix, uniform[prefix], False
                break
            if index in classed.get(prefix, ()):
                chosen = prefix, index, suffix, classed[prefix][index], True
                break
        if chosen is None:
            singles[key] = spec
            continue
        prefix, index, suffix, indices, several = chosen
        block = blocks.get((prefix, indices[0]))
        if block is None:
            block = blocks[(prefix, indices[0])] = Block(prefix, list(indices), {}, classed=several, among=among.get(prefix, ()))
        block.keys.add(key)
        if index == indices[0]:
            block.leaves[suffix] = spec
    ordered = sorted(blocks.values(), key=lambda b: (natural_key(b.prefix), b.indices))
    return Units(ordered, singles)


def split_like(units: Units, other: Units) -> Units:
    """Blocks of ``units`` whose layers are all alike, cut into the structure classes the other side
    has over the same layers: the other side's prefix has instances exactly these layer numbers and
    falls into classes (layers 0, 1 hold q|k|v fused, layers 2.. do not), so each class can pair with
    the same layers here. Instances alone in their class on the other side become leaves here too.
    A block with a partner of its own layers, or facing several such prefixes, is kept whole."""
    partitions: dict[tuple[int, ...], dict[str, list[list[int]]]] = defaultdict(lambda: defaultdict(list))
    for block in other.blocks:
        if block.classed and block.among:
            partitions[block.among][block.prefix].append(block.indices)
    if not partitions:
        return units
    whole = {tuple(b.indices) for b in other.blocks}
    blocks: list[Block] = []
    singles = dict(units.singles)
    for block in units.blocks:
        found = partitions.get(tuple(block.indices), {})
        if block.classed or block.stacked or tuple(block.indices) in whole or len(found) != 1:
            blocks.append(block)
            continue
        classes = next(iter(found.values()))
        alone = sorted(set(block.indices) - {i for indices in classes for i in indices})
        for indices in classes:
            keys = {block.key(suffix, i) for suffix in block.leaves for i in indices}
            blocks.append(Block(block.prefix, list(indices), dict(block.leaves), keys, classed=True, among=tuple(block.indices)))
        for i in alone:
            singles.update({block.key(suffix, i): spec for suffix, spec in block.leaves.items()})
    ordered = sorted(blocks, key=lambda b: (natural_key(b.prefix), b.indices))
    return Units(ordered, singles)


def find_stacked(units: Units, counts: set[int]) -> Units:
    """Scanned layers: an ancestor under which every tensor has the same leading size L,
    where L is a block count of the other side, becomes one block of L stacked layers.
    Numbered groups inside it (LayerNorm_0, LayerNorm_1 of the scanned layer) dissolve."""
    specs: dict[str, TensorSpec] = dict(units.singles)
    owner: dict[str, Block] = {}
    for block in units.blocks:
        for key, spec in block.instance_keys().items():
            specs[key] = spec
            owner[key] = block
    by_ancestor: dict[str, list[str]] = defaultdict(list)
    for key in specs:
        for anc in ancestors(key):
            by_ancestor[anc].append(key)
    chosen: dict[str, int] = {}
    for anc in sorted(by_ancestor, key=len):  # shallowest first
        keys = by_ancestor[anc]
        if any(anc.startswith(c) for c in chosen) or len(keys) < 2:
            continue
        if any(k in owner and not owner[k].prefix.startswith(anc) for k in keys):
            continue  # inside one instance of a numbered block
        leading = {specs[k].shape[0] if specs[k].shape else None for k in keys}
        if len(leading) == 1 and next(iter(leading)) in counts:
            chosen[anc] = next(iter(leading))
    if not chosen:
        return units
    chosen = {_innermost(anc, by_ancestor[anc]): count for anc, count in chosen.items()}
    taken = {k for anc in chosen for k in by_ancestor[anc]}
    singles = {k: v for k, v in units.singles.items() if k not in taken}
    blocks = [b for b in units.blocks if not (b.keys & taken)]
    for anc, count in chosen.items():
        leaves = {key[len(anc):]: TensorSpec(key, specs[key].shape[1:], specs[key].dtype) for key in by_ancestor[anc]}
        blocks.append(Block(anc, list(range(count)), leaves, set(by_ancestor[anc]), stacked=True))
    return Units(blocks, singles)


def _innermost(prefix: str, keys: list[str]) -> str:
    """The deepest container holding exactly ``keys``: ``transformer/resblocks`` rather than
    ``transformer`` when the stack is all ``transformer`` holds, so that the stack's ancestors
    line up with the other side's (``encoder`` above ``layers.{i}``) as an unscanned block's do."""
    while True:
        rests = [key[len(prefix) :] for key in keys]
        separators = {rest[:1] for rest in rests}
        heads = {re.split(r"[/.]", rest[1:], maxsplit=1)[0] for rest in rests}
        if len(separators) != 1 or len(heads) != 1:
            return prefix
        child = prefix + separators.pop() + heads.pop()
        if any(len(key) == len(child) for key in keys):  # a tensor of that name: no deeper container
            return prefix
        prefix = child


def ancestors(path: str) -> list[str]:
    """Proper ancestors of a path, nearest first, without the root."""
    cut = [m.start() for m in re.finditer(r"[/.]", path)]
    return [path[:c] for c in reversed(cut)]
