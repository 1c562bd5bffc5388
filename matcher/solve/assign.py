"""Optimal assignment of source items to target items inside one scope (a block pair, or
the leaves outside blocks), with costs from shape compatibility, names and conventions,
and an ambiguity check: a pair whose best alternative is within a margin is not decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from .chains import Chain, chains_between
from .names import NameInfo, describe_names, fused_parts, segments, similarity

INFEASIBLE = 1e6
AMBIGUITY_MARGIN = 0.03
CONTRADICTS_CONVENTION = 0.6
MIN_NAME_SIMILARITY = 0.25  # below this, names share nothing: a fitting shape alone is no evidence
# Roles every path has somewhere; sharing only these is no evidence that two tensors correspond.
GENERIC_ROLES = frozenset({"weight", "bias", "model", "layers", "encoder"})


def _related(a: NameInfo, b: NameInfo) -> bool:
    """Names are evidence only if they share a specific role or a sibling position, or
    neither says anything beyond its leaf kind (top-level ``t`` ~ ``logit_scale``)."""
    specific_a, specific_b = a.tokens - GENERIC_ROLES, b.tokens - GENERIC_ROLES
    if specific_a & specific_b:
        return True
    if a.orders and b.orders and a.orders[-1] == b.orders[-1]:
        return True
    return not specific_a or not specific_b


@dataclass(frozen=True)
class Item:
    """One side's matchable tensor: a leaf, or one part of a fused leaf."""

    template: str  # path template of the whole tensor ({i} inside blocks)
    name: str  # what names are scored on (suffix inside a block, else the full path)
    shape: tuple[int, ...]
    part: int | None = None
    parts: int | None = None
    role: str | None = None
    stacked: bool = False  # one layer of a scanned stack: select index {i} on axis 0 first
    gathered: int = 0  # instances of an inner group (experts) stacked on a new leading axis; shape includes it
    part_axis: int = 0  # the axis a fused tensor's parts are cut along (1 when axis 0 counts experts)

    @property
    def label(self) -> str:
        return self.template if self.part is None else f"{self.template}[{self.role}]"


def item_chains(source: Item, target: Item) -> tuple[Chain, ...]:
    """Chains turning ``source`` into ``target``. A gathered source is one array per instance,
    stacked on a new leading axis: its chains act on one instance (before the stack) and the
    target must lead with the instance count (or be gathered too: instance e -> instance e)."""
    if source.gathered:
        if target.shape[:1] != (source.gathered,):
            return ()
        return chains_between(tuple(source.shape[1:]), tuple(target.shape[1:]))
    if target.gathered:  # instance e of a target group from a tensor that is not one: not expressed
        return ()
    return chains_between(source.shape, target.shape)


@dataclass
class Pair:
    source: Item
    target: Item
    chain: Chain
    cost: float
    margin: float
    reasons: list[str] = field(default_factory=list)
    orientation_open: bool = False  # a square matrix no convention decides


@dataclass
class Ambiguity:
    target: Item
    candidates: list[tuple[Item, Chain, float]]  # ranked, best first: source, its chain to the target, cost
    reason: str


@dataclass
class ScopeResult:
    pairs: list[Pair]
    ambiguous: list[Ambiguity]
    unused_sources: list[Item]
    unmatched_targets: list[Item]

    @property
    def cost(self) -> float:
        return sum(p.cost for p in self.pairs)


def orientation_key(item: Item) -> str:
    """What a layout convention is keyed on: the last word of the tensor's name (flax
    ``kernel``, torch ``weight``), or its role when that is more than weight/bias (CLIP's
    ``visual.proj`` and ``text_projection`` are both projections stored (in, out))."""
    from .names import synonyms

    last = segments(item.template)[-1].lower().rsplit("_", 1)[-1]
    role = synonyms().role_of.get(last)
    return role if role not in (None, "weight", "bias") else last


def split_fused(items: Sequence[Item], other_side: Sequence[Item]) -> list[Item]:
    """Replace fused tensors (qkv, in_proj) by their parts, unless the other side fuses alike.

    The parts are cut along axis 0, or along axis 1 when axis 0 counts instances: the item is
    gathered itself, or it leads with the count of the other side's gathered items (a fused
    ``experts.gate_up_proj`` (E, 2I, D) facing per-expert gate and up tensors)."""
    other_fused = {fused_parts(i.name) for i in other_side} - {None}
    other_counts = {i.gathered for i in other_side if i.gathered}
    result = []
    for item in items:
        roles = fused_parts(item.name)
        axis = 1 if item.gathered or (len(item.shape) >= 2 and item.shape[0] in other_counts) else 0
        if roles and roles not in other_fused and len(item.shape) > axis and item.shape[axis] % len(roles) == 0:
            shape = list(item.shape)
            shape[axis] //= len(roles)
            for index, role in enumerate(roles):
                result.append(replace(item, shape=tuple(shape), part=index, parts=len(roles), role=role, part_axis=axis))
        else:
            result.append(item)
    return result


def _infos(items: Sequence[Item]) -> list[NameInfo]:
    """Names as evidence. A part of a fused tensor reads as its own role only: the roles the
    fused name spells (``gate_up_proj`` says gate and up) are the same for every part."""
    from .names import synonyms

    role_of = synonyms().role_of
    described = describe_names([i.name for i in items])
    infos = []
    for item in items:
        info = described[item.name]
        if item.role is not None:
            spelled = {role_of.get(r, r) for r in fused_parts(item.name) or ()}
            info = NameInfo((info.tokens - spelled) | {role_of.get(item.role, item.role)}, info.orders, info.last, f"{info.text}.{item.role}")
        infos.append(info)
    return infos


def _allowed(chains: tuple[Chain, ...], convention: bool | None) -> tuple[list[Chain], float, bool]:
    """Chains a convention allows, the penalty if it forbids all, and whether orientation stays open."""
    flags = {c.transposed for c in chains}
    if len(flags) < 2:
        penalty = CONTRADICTS_CONVENTION if convention is not None and flags != {convention} else 0.0
        return list(chains), penalty, False
    if convention is None:
        return list(chains), 0.0, True
    return [c for c in chains if c.transposed == convention], 0.0, False


def solve_scope(
    sources: Sequence[Item],
    targets: Sequence[Item],
    conventions: dict[str, bool],
    affinity: Callable[[Item, Item], float] | None = None,
) -> ScopeResult:
    from .groups import gather_groups

    sources, targets = gather_groups(sources, targets)
    sources = split_fused(sources, targets)
    targets = split_fused(targets, sources)
    if not sources or not targets:
        return ScopeResult([], [], list(sources), list(targets))
    source_infos, target_infos = _infos(sources), _infos(targets)
    cost = np.full((len(sources), len(targets)), INFEASIBLE)
    options: dict[tuple[int, int], tuple[list[Chain], bool, float]] = {}
    shape_cache: dict[tuple, tuple[Chain, ...]] = {}
    for r, source in enumerate(sources):
        for c, target in enumerate(targets):
            key = (source.shape, target.shape, source.gathered, target.gathered)
            chains = shape_cache.get(key)
            if chains is None:
                chains = shape_cache[key] = item_chains(source, target)
            if not chains:
                continue
            allowed, penalty, open_orientation = _allowed(chains, conventions.get(orientation_key(source)))
            name_similarity = similarity(source_infos[r], target_infos[c])
            if name_similarity < MIN_NAME_SIMILARITY or not _related(source_infos[r], target_infos[c]):
                continue
            value = (1.0 - name_similarity) + penalty + (affinity(source, target) if affinity else 0.0)
            cost[r, c] = value
            options[(r, c)] = (allowed, open_orientation, name_similarity)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    assigned = {r: c for r, c in zip(rows, cols) if cost[r, c] < INFEASIBLE}
    owner = {c: r for r, c in assigned.items()}
    pairs, ambiguous, doubtful = [], [], set()
    for r, c in assigned.items():
        margin, rival = _margin(cost, r, c, assigned, owner)
        allowed, open_orientation, name_similarity = options[(r, c)]
        reasons = [f"shape {sources[r].shape} -> {targets[c].shape}", f"name similarity {name_similarity:.2f}"]
        pair = Pair(sources[r], targets[c], allowed[0], float(cost[r, c]), margin, reasons, open_orientation)
        if margin < AMBIGUITY_MARGIN:
            doubtful.add(c)
            ranked = sorted(((sources[k], options[(k, c)][0][0], float(cost[k, c])) for k in range(len(sources)) if cost[k, c] < INFEASIBLE), key=lambda x: x[2])
            ambiguous.append(Ambiguity(targets[c], ranked[:4], f"{sources[rival].label} fits as well (margin {margin:.3f})"))
            continue
        pairs.append(pair)
    unused = [sources[r] for r in range(len(sources)) if r not in assigned]
    unmatched = [targets[c] for c in range(len(targets)) if c not in owner]
    return ScopeResult(pairs, ambiguous, unused, unmatched)


def _margin(cost: np.ndarray, r: int, c: int, assigned: dict[int, int], owner: dict[int, int]) -> tuple[float, int]:
    """How much worse the best alternative for target ``c`` is: another source taking it,
    with the displaced sources swapping (or left unused)."""
    best, rival = float("inf"), r
    for other in range(cost.shape[0]):
        if other == r or cost[other, c] >= INFEASIBLE:
            continue
        other_target = assigned.get(other)
        if other_target is None:
            delta = cost[other, c] - cost[r, c]
        elif cost[r, other_target] < INFEASIBLE:
            delta = cost[other, c] + cost[r, other_target] - cost[r, c] - cost[other, other_target]
        else:
            continue
        if delta < best:
            best, rival = delta, other
    return best, rival
