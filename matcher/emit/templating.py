"""Concrete rules that differ only in a layer number become one rule templated over ``{i}``.

An audited mapping names every layer (``layers.0.fc1.weight <- blocks.0.mlp.fc1.weight``,
``layers.1...``); emitted files should read like the known mappings, one rule per block member.
Rules are grouped by their text with every number blanked out. Inside a group, the numbers that
vary together form a placeholder when one of them is a whole segment of the target name (a
torch ModuleList index, ``layers.3.``) and a source (or a ``select`` index) carries it too;
numbers that vary otherwise (``norm1``/``norm2``) split the group instead. A templated rule is
kept only if it expands back to exactly the rules it replaces.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from ..mapping import Mapping, Rule
from ..ops import Select, op_from_dict
from ..patterns import template

_NUMBER = re.compile(r"\d+")
_SEPARATORS = "./"
_NAMES = "ijklmnpqrstuvw"


@dataclass(frozen=True)
class _Hole:
    where: int  # 0 the target, 1.. the sources, -1-k op k (a select index)
    start: int
    end: int
    whole_segment: bool


@dataclass(frozen=True)
class _Member:
    position: int  # index of the rule in the mapping
    rule: Rule
    values: tuple[int, ...]


def templated(mapping: Mapping, source_keys: Iterable[str] | None = None) -> Mapping:
    """``mapping`` with groups of concrete per-layer rules replaced by templated rules.

    With ``source_keys`` a template must expand over them to exactly the rules it replaces;
    without, its layer numbers must run 0..n-1.
    """
    keys = list(source_keys) if source_keys is not None else None
    groups: dict[tuple, list[_Member]] = defaultdict(list)
    holes_of: dict[tuple, list[_Hole]] = {}
    for position, rule in enumerate(mapping.rules):
        if _has_placeholders(rule):
            continue
        skeleton, holes, values = _blanked(rule)
        groups[skeleton].append(_Member(position, rule, values))
        holes_of[skeleton] = holes
    replaced: dict[int, Rule | None] = {}
    for skeleton, members in groups.items():
        for group, rule in _collapse(members, holes_of[skeleton], keys):
            replaced[group[0].position] = rule
            replaced.update({m.position: None for m in group[1:]})
    if not replaced:
        return mapping
    rules = [replaced.get(n, rule) for n, rule in enumerate(mapping.rules)]
    return Mapping(tuple(r for r in rules if r is not None), mapping.dropped, mapping.initialised, mapping.meta)


def _has_placeholders(rule: Rule) -> bool:
    texts = (rule.target, *rule.sources)
    return any(template(t).variables for t in texts) or any(isinstance(getattr(op, "index", 0), str) for op in rule.ops)


def _blanked(rule: Rule) -> tuple[tuple, list[_Hole], tuple[int, ...]]:
    """The rule's text with every number blanked (the grouping key), where the numbers were, and their values."""
    holes: list[_Hole] = []
    values: list[int] = []
    blanked_texts = []
    for where, text in enumerate((rule.target, *rule.sources)):
        for match in _NUMBER.finditer(text):
            before = text[match.start() - 1] if match.start() else "."
            after = text[match.end()] if match.end() < len(text) else "."
            holes.append(_Hole(where, match.start(), match.end(), before in _SEPARATORS and after in _SEPARATORS))
            values.append(int(match.group()))
        blanked_texts.append(_NUMBER.sub("#", text))
    blanked_ops = []
    for k, op in enumerate(rule.ops):
        data = op.to_dict()
        if isinstance(op, Select):
            holes.append(_Hole(-1 - k, 0, 0, False))
            values.append(op.index)
            data = {"select": {"axis": op.axis, "index": "#"}}
        blanked_ops.append(json.dumps(data, sort_keys=True))
    return (tuple(blanked_texts), tuple(blanked_ops)), holes, tuple(values)


def _collapse(members: list[_Member], holes: list[_Hole], keys: list[str] | None) -> list[tuple[list[_Member], Rule]]:
    if len(members) < 2:
        return []
    columns = {p: tuple(m.values[p] for m in members) for p in range(len(holes))}
    varying = [p for p, column in columns.items() if len(set(column)) > 1]
    classes: dict[tuple, list[int]] = defaultdict(list)
    for p in varying:
        classes[columns[p]].append(p)
    layer_classes = [ps for ps in classes.values() if _is_layer_index(ps, holes)]
    other = [p for p in varying if not any(p in ps for ps in layer_classes)]
    if other:  # numbers that vary but are no layer index: each of their combinations is its own group
        split: dict[tuple, list[_Member]] = defaultdict(list)
        for member in members:
            split[tuple(member.values[p] for p in other)].append(member)
        return [found for part in split.values() for found in _collapse(part, holes, keys)]
    if not layer_classes:
        return []
    ordered = sorted(layer_classes, key=lambda ps: min((holes[p].where, holes[p].start) for p in ps))
    names = {p: _NAMES[n] for n, ps in enumerate(ordered) for p in ps}
    rule = _template_rule(members[0].rule, holes, names)
    return [(members, rule)] if _reproduces(rule, members, keys, names) else []


def _is_layer_index(positions: list[int], holes: list[_Hole]) -> bool:
    in_target = any(holes[p].where == 0 and holes[p].whole_segment for p in positions)
    carried = any(holes[p].where != 0 for p in positions)
    return in_target and carried


def _template_rule(rule: Rule, holes: list[_Hole], names: dict[int, str]) -> Rule:
    texts = [rule.target, *rule.sources]
    ops = [op.to_dict() for op in rule.ops]
    # right to left, so that earlier spans keep their offsets
    for p in sorted(names, key=lambda p: (holes[p].where, -holes[p].start)):
        hole = holes[p]
        if hole.where >= 0:
            text = texts[hole.where]
            texts[hole.where] = text[: hole.start] + "{" + names[p] + "}" + text[hole.end :]
        else:
            ops[-1 - hole.where]["select"]["index"] = "{" + names[p] + "}"
    return Rule(texts[0], tuple(texts[1:]), tuple(op_from_dict(op) for op in ops), rule.note)


def _reproduces(rule: Rule, members: list[_Member], keys: list[str] | None, names: dict[int, str]) -> bool:
    if keys is None:
        for name in set(names.values()):
            values = {m.values[p] for m in members for p, n in names.items() if n == name}
            if values != set(range(len(values))):
                return False
        keys = [s for m in members for s in m.rule.sources]
    expansion = Mapping((rule,)).expand(keys, [m.rule.target for m in members])
    if expansion.problems:
        return False
    made = {(r.target, r.sources, _ops_text(r.ops)) for r in expansion.rules}
    return made == {(m.rule.target, m.rule.sources, _ops_text(m.rule.ops)) for m in members}


def _ops_text(ops) -> str:
    return json.dumps([op.to_dict() for op in ops], sort_keys=True)
