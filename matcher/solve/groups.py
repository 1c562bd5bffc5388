"""Inner groups: a repeated structure inside one scope (the experts of a mixture-of-experts layer).

Inside a layer, ``block_sparse_moe.experts.{e}.w1.weight`` ... ``experts.{E-1}.w3.weight`` are
E instances of one sub-structure (same relative names, same shapes). When the other side holds
such instances as one tensor leading with E (transformers' ``experts.down_proj`` (E, D, I)), each
leaf of the group becomes one *gathered* item: template ``experts.{e}.w2.weight``, shape
(E,) + leaf shape, read by stacking the instances in natural order (a placeholder only in the
sources gathers, see ``matcher.mapping``). Gathered items are then paired like any other leaf.

Found on the scope's items, i.e. once per block template, never per layer instance.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Sequence

from .assign import Item
from .blocks import _candidates
from .chains import chains_between
from .names import describe_names, fused_parts, similarity

VARIABLE = "e"  # the gathered placeholder; layers use {i}
_PLACEHOLDER = "{" + VARIABLE + "}"


@dataclass
class InnerGroup:
    prefix: str  # name template through the numbered segment, with {e}: "block_sparse_moe.experts.{e}"
    indices: list[int]
    leaves: dict[str, tuple[int, ...]]  # relative suffix -> shape (the same in every instance)
    members: list[Item]  # every item of every instance

    @property
    def count(self) -> int:
        return len(self.indices)


def inner_groups(items: Sequence[Item]) -> list[InnerGroup]:
    """Numbered sub-structures among the items' names: the outermost number whose instances hold
    the same relative names with the same shapes (as ``blocks.find_blocks`` does for layers)."""
    eligible = [i for i in items if i.part is None and not i.stacked and not i.gathered and "{" not in i.name]
    by_prefix: dict[str, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    candidates = {}
    for item in eligible:
        found = candidates[id(item)] = _candidates(item.name)
        for prefix, index, suffix in found:
            by_prefix[prefix][index][suffix] = item.shape
    valid: dict[str, list[int]] = {}
    for prefix, instances in by_prefix.items():
        if len(instances) < 2:
            continue
        first = next(iter(instances.values()))
        if all(content == first for content in instances.values()):
            valid[prefix] = sorted(instances)
    groups: dict[str, InnerGroup] = {}
    for item in eligible:
        chosen = next(((p, i, s) for p, i, s in candidates[id(item)] if p in valid), None)
        if chosen is None:
            continue
        prefix, index, suffix = chosen
        group = groups.get(prefix)
        if group is None:
            group = groups[prefix] = InnerGroup(prefix.replace("{i}", _PLACEHOLDER), valid[prefix], {}, [])
        group.members.append(item)
        if index == valid[prefix][0]:
            group.leaves[suffix] = item.shape
    return list(groups.values())


def _feeds(leaf: tuple[int, ...], count: int, target: Item) -> bool:
    """Could instances of ``leaf``, stacked, make ``target`` (whole, or one part of a fused target
    cut on the axis after the instance axis)?"""
    shape = tuple(target.shape)
    if len(shape) < 2 or shape[0] != count:
        return False
    if chains_between(leaf, shape[1:]):
        return True
    roles = fused_parts(target.name)
    return bool(roles) and shape[1] % len(roles) == 0 and bool(chains_between(leaf, (shape[1] // len(roles),) + shape[2:]))


def _whole_segment(group: InnerGroup) -> bool:
    """The number is a path segment of its own (``experts.{e}``): unlike ``ln_1``/``layer_norm1``,
    whose numbers are sibling order tokens, such instances differ in nothing names can score."""
    return group.prefix == _PLACEHOLDER or group.prefix[-len(_PLACEHOLDER) - 1] in "./"


def _gathered_items(group: InnerGroup) -> list[Item]:
    first = group.members[0]
    base = first.template[: len(first.template) - len(first.name)]
    return [
        replace(first, template=base + group.prefix + suffix, name=_score_name(group.prefix + suffix),
                shape=(group.count,) + tuple(shape), gathered=group.count)
        for suffix, shape in group.leaves.items()
    ]


def _replace_groups(items: Sequence[Item], groups: list[InnerGroup]) -> list[Item]:
    replaced: dict[int, list[Item]] = {}
    for group in groups:
        replaced[id(group.members[0])] = _gathered_items(group)
        for member in group.members[1:]:
            replaced[id(member)] = []
    result: list[Item] = []
    for item in items:
        result.extend(replaced.get(id(item), [item]))
    return result


def gather_groups(sources: Sequence[Item], targets: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """``sources`` and ``targets`` with inner groups replaced by their gathered items.

    - A source group is gathered when some target leads with the group's count and could be
      made from one of its leaves (stacked), and the targets hold no instances of their own with
      that count.
    - Groups on both sides with the same indices, numbered by a whole path segment
      (``experts.{e}`` ~ ``experts.{e}``), are both gathered: instance e pairs with instance e,
      solved once for all instances (their names differ only by the index, which scores nothing).
    Other groups stay instance by instance (``LayerNorm_0/1`` ~ ``layer_norm1/2`` pair by sibling order).
    """
    source_groups = inner_groups(sources)
    if not source_groups:
        return list(sources), list(targets)
    target_groups = inner_groups(targets)
    target_counts = {g.count for g in target_groups}
    chosen_sources: list[InnerGroup] = []
    chosen_targets: list[InnerGroup] = []
    for group in source_groups:
        twins = [t for t in target_groups if t.indices == group.indices and _whole_segment(t) and all(t is not c for c in chosen_targets)]
        if twins and _whole_segment(group):
            chosen_sources.append(group)
            chosen_targets.append(max(twins, key=lambda t: _prefix_similarity(group, t)))
            continue
        if group.count in target_counts:
            continue
        if any(_feeds(leaf, group.count, t) for leaf in set(group.leaves.values()) for t in targets):
            chosen_sources.append(group)
    return _replace_groups(sources, chosen_sources), _replace_groups(targets, chosen_targets)


def _prefix_similarity(a: InnerGroup, b: InnerGroup) -> float:
    """How alike two groups' names are (``block_sparse_moe.experts`` ~ ``mlp.experts``)."""
    names = [_score_name(a.prefix) or "_", _score_name(b.prefix) or "_"]
    described = describe_names(names)
    return similarity(described[names[0]], described[names[1]])


def _score_name(name: str) -> str:
    """What a gathered item's name is scored on: the name without the placeholder segment
    (``block_sparse_moe.experts.w1.weight``), so that no index reads as an order token."""
    parts = [p for p in re.split(r"([/.])", name)]
    out: list[str] = []
    for piece in parts:
        if piece == _PLACEHOLDER:
            if out and out[-1] in "./":
                out.pop()
            continue
        out.append(piece.replace("_" + _PLACEHOLDER, "").replace(_PLACEHOLDER, ""))
    text = "".join(out).lstrip("./")
    return re.sub(r"([/.])[/.]+", r"\1", text)
