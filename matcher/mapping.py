"""The mapping format shared by known mappings, the matcher, and every emitter.

A mapping is an ordered list of rules ``target <- ops(source, ...)`` templated over
integer placeholders (``{i}``), one target per rule, plus what it leaves out on purpose:
``dropped`` source patterns and ``initialised`` target patterns, each with a reason.

Placeholders in the target are bound per instance. A placeholder that appears only in
the sources gathers every instance in natural order (for ``stack``), and one that appears
only in the target is bound from the target tree (for ``select`` on scanned layers).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping as MappingABC, Sequence

from . import ops as opmod
from .errors import MappingError
from .ops import Op, Shape
from .patterns import template
from .tree import natural_key

FORMAT_VERSION = 1
_RULE_KEYS = {"target", "source", "sources", "ops", "note"}
_DECLARED_KEYS = {"pattern", "why"}
_TOP_KEYS = {"matcher_mapping", "family", "source_format", "target_class", "description", "rules", "dropped", "initialised"}


@dataclass(frozen=True)
class Rule:
    target: str
    sources: tuple[str, ...]
    ops: tuple[Op, ...] = ()
    note: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "ops", tuple(self.ops))
        if not self.target or not self.sources or not all(self.sources):
            raise MappingError(f"rule {self.target!r}: needs a target and at least one source")
        combining = [op for op in self.ops if op.combines]
        selecting = [op for op in self.ops if op.selects]
        many = len(self.sources) > 1 or bool(self.gathered)
        if many and len(combining) != 1:
            raise MappingError(f"rule {self.target}: {len(self.sources)} source pattern(s) need exactly one concat/stack op")
        if not many and combining:
            raise MappingError(f"rule {self.target}: {combining[0].name} needs several sources")
        if (selecting and combining) or not _selection_allowed(selecting):
            raise MappingError(
                f"rule {self.target}: at most one chunk/select (or a select by placeholder and one by number) "
                "and not together with concat/stack"
            )
        bound_by_ops = {op.index[1:-1] for op in selecting if isinstance(getattr(op, "index", None), str)}
        unbound = set(template(self.target).variables) - set(self.source_variables) - bound_by_ops
        if unbound:
            raise MappingError(f"rule {self.target}: placeholder(s) {sorted(unbound)} appear in no source or op")

    @property
    def source_variables(self) -> tuple[str, ...]:
        names: list[str] = []
        for source in self.sources:
            names += [v for v in template(source).variables if v not in names]
        return tuple(names)

    @property
    def gathered(self) -> tuple[str, ...]:
        """Placeholders only in the sources: every instance of them feeds one target."""
        target_vars = set(template(self.target).variables)
        return tuple(v for v in self.source_variables if v not in target_vars)

    def describe(self) -> str:
        chain = " | ".join(str(op) for op in self.ops) or "rename"
        return f"{self.target} <- {chain} <- {', '.join(self.sources)}"

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"target": self.target}
        if len(self.sources) == 1:
            data["source"] = self.sources[0]
        else:
            data["sources"] = list(self.sources)
        if self.ops:
            data["ops"] = [op.to_dict() for op in self.ops]
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "Rule":
        if not isinstance(data, dict):
            raise MappingError(f"{where}: a rule is a mapping with target/source/ops, got {data!r}")
        unknown = set(data) - _RULE_KEYS
        if unknown:
            raise MappingError(f"{where}: unknown key(s) {sorted(unknown)} in rule; known: {sorted(_RULE_KEYS)}")
        if ("source" in data) == ("sources" in data):
            raise MappingError(f"{where}: give exactly one of 'source' or 'sources'")
        sources = [data["source"]] if "source" in data else data["sources"]
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise MappingError(f"{where}: sources must be strings")
        if not isinstance(data.get("target"), str):
            raise MappingError(f"{where}: target must be a string")
        raw_ops = data.get("ops") or []
        if not isinstance(raw_ops, list):
            raise MappingError(f"{where}: ops must be a list")
        try:
            return cls(data["target"], tuple(sources), tuple(opmod.op_from_dict(op) for op in raw_ops), data.get("note"))
        except MappingError as exc:
            raise MappingError(f"{where}: {exc.message}") from exc


def _selection_allowed(selecting: Sequence[Op]) -> bool:
    """One chunk or select; or two selects, one by a placeholder and one by a number (one expert
    of one part: what reversing a stack of several gathered sources gives)."""
    if len(selecting) <= 1:
        return True
    if len(selecting) != 2 or not all(isinstance(op, opmod.Select) for op in selecting):
        return False
    return sorted(isinstance(op.index, str) for op in selecting) == [False, True]


@dataclass(frozen=True)
class Declared:
    """A pattern left out on purpose, with the reason a reader should know."""

    pattern: str
    why: str = ""

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "why": self.why} if self.why else {"pattern": self.pattern}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Declared":
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, dict) or "pattern" not in data or set(data) - _DECLARED_KEYS:
            raise MappingError(f"{where}: expected {{pattern: ..., why: ...}}, got {data!r}")
        return cls(str(data["pattern"]), str(data.get("why", "")))

    def matches(self, path: str) -> bool:
        return template(self.pattern).match(path) is not None


@dataclass(frozen=True)
class ExpandedRule:
    """One concrete instance of a rule: real paths, placeholders bound."""

    target: str
    sources: tuple[str, ...]
    ops: tuple[Op, ...]
    rule: Rule


@dataclass
class Expansion:
    """A mapping laid over concrete trees, with everything that did not fit."""

    rules: list[ExpandedRule]
    unmapped_targets: list[str]  # target keys no rule writes and not declared initialised
    unused_sources: list[str]  # source keys no rule reads and not declared dropped
    problems: list[str]  # rules whose sources or targets are missing, duplicates
    initialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.unmapped_targets or self.unused_sources or self.problems)

    def summary(self, limit: int = 8) -> str:
        lines = []
        for title, items in (("problems", self.problems), ("target keys no rule writes", self.unmapped_targets), ("source keys no rule reads", self.unused_sources)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                lines.append(f"{len(items)} {title}: {shown}")
        return "; ".join(lines)


@dataclass(frozen=True)
class Mapping:
    rules: tuple[Rule, ...]
    dropped: tuple[Declared, ...] = ()
    initialised: tuple[Declared, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "dropped", tuple(self.dropped))
        object.__setattr__(self, "initialised", tuple(self.initialised))
        seen: set[str] = set()
        for rule in self.rules:
            if rule.target in seen:
                raise MappingError(f"two rules write {rule.target}")
            seen.add(rule.target)

    # ------------------------------------------------------------------ laying over trees

    def expand(self, source_keys: Iterable[str], target_keys: Iterable[str]) -> Expansion:
        """Bind every rule to the concrete keys of a source and a target tree."""
        source_list = list(source_keys)
        target_list = list(target_keys)
        sources, targets = set(source_list), set(target_list)
        expanded: list[ExpandedRule] = []
        problems: list[str] = []
        written: dict[str, str] = {}
        read: set[str] = set()
        for rule in self.rules:
            for instance in _expand_rule(rule, source_list, target_list, problems):
                missing = [s for s in instance.sources if s not in sources]
                if missing:
                    problems.append(f"{instance.target}: source {missing[0]} not in the checkpoint")
                    continue
                if instance.target not in targets:
                    problems.append(f"{instance.target}: not a parameter of the target model")
                    continue
                if instance.target in written:
                    problems.append(f"{instance.target}: written by two rules")
                    continue
                written[instance.target] = rule.target
                read.update(instance.sources)
                expanded.append(instance)
        initialised = [k for k in target_list if k not in written and any(d.matches(k) for d in self.initialised)]
        dropped = [k for k in source_list if k not in read and any(d.matches(k) for d in self.dropped)]
        unmapped = [k for k in target_list if k not in written and k not in set(initialised)]
        unused = [k for k in source_list if k not in read and k not in set(dropped)]
        return Expansion(expanded, unmapped, unused, problems, initialised, dropped)

    # ------------------------------------------------------------------ inverse

    def reverse(self, source_shapes: MappingABC[str, Shape] | Callable[[str], Shape | None]) -> "Mapping":
        """The mapping from this mapping's targets back to its sources.

        ``source_shapes`` gives the shape of a source: either a dict of concrete keys (the
        first key matching a pattern is used; instances of a block share shapes) or patterns,
        or a function of the source pattern. Sizes that ops throw away come from there.
        """
        shape_of = _shape_lookup(source_shapes)
        reversed_rules: list[Rule] = []
        groups: dict[tuple, list[tuple[int, Rule]]] = defaultdict(list)
        order: list[tuple] = []
        for rule in self.rules:
            positions = [k for k, op in enumerate(rule.ops) if op.selects]
            if not positions:
                reversed_rules.extend(_reverse_plain_or_combined(rule, shape_of))
                continue
            key = _selection_group(rule, positions)
            if key not in groups:
                order.append(key)
                reversed_rules.append(key)  # placeholder, filled below to keep the order
            groups[key].append((positions[0], rule))
        result: list[Rule] = []
        for item in reversed_rules:
            if isinstance(item, Rule):
                result.append(item)
            else:
                result.append(_reverse_selection_group(groups[item], shape_of))
        meta = dict(self.meta)
        meta["description"] = f"reverse of: {self.meta.get('description', self.meta.get('family', 'a mapping'))}"
        return Mapping(
            tuple(result),
            dropped=tuple(Declared(d.pattern, d.why) for d in self.initialised),
            initialised=tuple(Declared(d.pattern, d.why) for d in self.dropped),
            meta=meta,
        )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"matcher_mapping": FORMAT_VERSION}
        for key in ("family", "source_format", "target_class", "description"):
            if self.meta.get(key):
                data[key] = self.meta[key]
        data["rules"] = [rule.to_dict() for rule in self.rules]
        if self.dropped:
            data["dropped"] = [d.to_dict() for d in self.dropped]
        if self.initialised:
            data["initialised"] = [d.to_dict() for d in self.initialised]
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "<mapping>") -> "Mapping":
        if not isinstance(data, dict):
            raise MappingError("a mapping file holds a mapping with 'rules'", path=where)
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise MappingError(f"unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}", path=where)
        version = data.get("matcher_mapping", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise MappingError(f"format version {version!r} is not supported (this is {FORMAT_VERSION})", path=where)
        if not isinstance(data.get("rules"), list):
            raise MappingError("'rules' must be a list", path=where)
        rules = [Rule.from_dict(r, f"{where}: rule {n + 1}") for n, r in enumerate(data["rules"])]
        dropped = [Declared.from_dict(d, f"{where}: dropped") for d in data.get("dropped") or []]
        initialised = [Declared.from_dict(d, f"{where}: initialised") for d in data.get("initialised") or []]
        meta = {k: data[k] for k in ("family", "source_format", "target_class", "description") if k in data}
        try:
            return cls(tuple(rules), tuple(dropped), tuple(initialised), meta)
        except MappingError as exc:
            raise MappingError(exc.message, path=where) from exc

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=120, default_flow_style=None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "Mapping":
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise MappingError(f"cannot read mapping: {exc}", path=str(path)) from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MappingError(f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}", path=str(path)) from exc
        return cls.from_dict(data, where=str(path))


# ---------------------------------------------------------------------- expansion helpers


def _expand_rule(rule: Rule, source_keys: Sequence[str], target_keys: Sequence[str], problems: list[str]):
    target_t = template(rule.target)
    target_vars = set(target_t.variables)
    # Bindings of the target's placeholders: from the sources that carry them all, else
    # (a scanned stack selected per layer) from the target tree.
    carrier = next((s for s in rule.sources if target_vars <= set(template(s).variables)), None)
    if carrier is not None:
        bindings = _bindings(template(carrier), source_keys, target_vars)
    else:
        bindings = _bindings(target_t, target_keys, target_vars)
    if not bindings:
        problems.append(f"{rule.target}: no key in the {'checkpoint' if carrier else 'target'} matches {carrier or rule.target}")
        return
    gathered = set(rule.gathered)
    # The instances of each gathered source, indexed once by the placeholders the binding fixes
    # (one pass over the keys per source, not one per layer).
    instances_of: dict[str, dict[tuple, list[tuple[tuple, str]]]] = {}  # -> [(gathered values, key)]
    for source in rule.sources:
        source_t = template(source)
        if source in instances_of or not set(source_t.variables) & gathered:
            continue
        fixed = [v for v in source_t.variables if v not in gathered]
        own = sorted(v for v in source_t.variables if v in gathered)
        index: dict[tuple, list[tuple[tuple, str]]] = defaultdict(list)
        for key in source_keys:
            match = source_t.match(key)
            if match is not None:
                index[tuple(match[v] for v in fixed)].append((tuple(match[v] for v in own), key))
        instances_of[source] = {k: sorted(v, key=lambda item: natural_key(item[1])) for k, v in index.items()}
    for binding in bindings:
        sources: list[str] = []
        gathered_values: dict[str, list[tuple]] = {}
        for source in rule.sources:
            filled = template(source).fill(binding)
            if source in instances_of:
                fixed = [v for v in template(source).variables if v not in gathered]
                instances = instances_of[source].get(tuple(binding[v] for v in fixed), [])
                if not instances:
                    problems.append(f"{target_t.fill(binding)}: no key matches {filled}")
                gathered_values[filled] = [values for values, _ in instances]
                sources.extend(key for _, key in instances)
            else:
                sources.append(filled)
        if len({tuple(v) for v in gathered_values.values()}) > 1:  # expert 3 of one with expert 4 of another
            (first, a), *others = gathered_values.items()
            second, b = next((name, values) for name, values in others if values != a)
            problems.append(f"{target_t.fill(binding)}: {first} and {second} gather different instances "
                            f"({_instance_list(a)} vs {_instance_list(b)})")
            continue
        if not sources:
            continue
        yield ExpandedRule(target_t.fill(binding), tuple(sources), tuple(op.bind(binding) for op in rule.ops), rule)


def _instance_list(values: list[tuple]) -> str:
    shown = ", ".join("/".join(str(v) for v in value) for value in values[:8])
    return shown + (f", ... ({len(values)})" if len(values) > 8 else "")


def _bindings(pattern, keys: Sequence[str], names: set[str]) -> list[dict[str, int]]:
    if not names:
        return [{}] if pattern.is_concrete or any(pattern.match(k) is not None for k in keys) else []
    found: dict[tuple, dict[str, int]] = {}
    for key in keys:
        match = pattern.match(key)
        if match is not None:
            binding = {n: match[n] for n in sorted(names)}
            found.setdefault(tuple(binding.items()), binding)
    return [found[k] for k in sorted(found)]


# ---------------------------------------------------------------------- reverse helpers


def _shape_lookup(source_shapes) -> Callable[[str], Shape]:
    if callable(source_shapes):
        lookup = source_shapes
    else:
        def lookup(pattern: str) -> Shape | None:
            if pattern in source_shapes:
                return source_shapes[pattern]
            t = template(pattern)
            return next((shape for key, shape in source_shapes.items() if t.match(key) is not None), None)

    def shape_of(pattern: str) -> Shape:
        shape = lookup(pattern)
        if shape is None:
            raise MappingError(f"reverse: no shape known for source {pattern}")
        return tuple(shape)

    return shape_of


def _reverse_plain_or_combined(rule: Rule, shape_of) -> list[Rule]:
    position = next((k for k, op in enumerate(rule.ops) if op.combines), None)
    if position is None:
        ops = opmod.reverse_unary_chain(rule.ops, shape_of(rule.sources[0]))
        return [Rule(rule.sources[0], (rule.target,), tuple(ops), rule.note)]
    pre, combine, post = rule.ops[:position], rule.ops[position], rule.ops[position + 1 :]
    source_shapes = [shape_of(s) for s in rule.sources]
    pre_shapes = [opmod.chain_output_shape(pre, [s]) for s in source_shapes]
    if rule.gathered:
        return _reverse_gathered(rule, pre, combine, post, source_shapes, pre_shapes)
    parts = [combine.part_inverse(j, pre_shapes) for j in range(len(rule.sources))]
    post_reverse = opmod.reverse_unary_chain(post, combine.output_shape(pre_shapes))
    rules = []
    for source, source_shape, part in zip(rule.sources, source_shapes, parts):
        ops = post_reverse + [part] + opmod.reverse_unary_chain(pre, source_shape)
        rules.append(Rule(source, (rule.target,), tuple(ops), rule.note))
    return rules


def _reverse_gathered(rule: Rule, pre, combine: Op, post, source_shapes, pre_shapes) -> list[Rule]:
    """Reverse a stack over the instances of n gathered sources (experts: one source, ``stack``;
    gate and up of every expert: two sources, ``stack | split_axis | transpose | merge_axes``).

    The stacked axis holds source j's instance e at j*E + e; the reverse of source j splits it
    into (n, E) and selects e, then j. The instance count E is not known here: the inverse of
    ``post`` is computed for two counts and must not depend on it (a size that does becomes -1)."""
    if len(rule.gathered) != 1 or combine.name != "stack":
        raise MappingError(f"reverse: {rule.target}: only a stack over one gathered placeholder can be reversed")
    (variable,) = rule.gathered
    missing = [s for s in rule.sources if variable not in template(s).variables]
    if missing:
        raise MappingError(f"reverse: {rule.target}: source {missing[0]} does not carry the gathered {{{variable}}}")
    if len(set(pre_shapes)) != 1:
        raise MappingError(f"reverse: {rule.target}: the stacked sources differ in shape")
    n = len(rule.sources)
    leaf = tuple(pre_shapes[0])
    axis = opmod._norm_axis(combine.axis, len(leaf) + 1, combine.name)
    post_reverse = _count_free_reverse(rule, post, [combine.output_shape([leaf] * (n * count)) for count in (2, 3)])
    if n == 1:
        take = [opmod.Select(axis=axis, index=f"{{{variable}}}")]
    rules = []
    for j, (source, source_shape) in enumerate(zip(rule.sources, source_shapes)):
        if n > 1:
            take = [opmod.SplitAxis(axis, (n, -1)), opmod.Select(axis=axis + 1, index=f"{{{variable}}}"), opmod.Select(axis=axis, index=j)]
        ops = post_reverse + take + opmod.reverse_unary_chain(pre, source_shape)
        rules.append(Rule(source, (rule.target,), tuple(ops), rule.note))
    return rules


def _count_free_reverse(rule: Rule, post, stacked_shapes: list[Shape]) -> list[Op]:
    """The inverse of ``post`` after a stack of unknown length, from two trial lengths: sizes that
    differ between them (a split of the stacked axis) become -1; anything else that differs is refused."""
    first, second = (opmod.reverse_unary_chain(post, shape) for shape in stacked_shapes)
    result = []
    for a, b in zip(first, second):
        if a == b:
            result.append(a)
            continue
        if isinstance(a, opmod.SplitAxis) and isinstance(b, opmod.SplitAxis) and a.axis == b.axis:
            differ = [k for k, (x, y) in enumerate(zip(a.sizes, b.sizes)) if x != y]
            if len(differ) == 1 and -1 not in a.sizes:
                result.append(opmod.SplitAxis(a.axis, tuple(-1 if k == differ[0] else x for k, x in enumerate(a.sizes))))
                continue
        raise MappingError(f"reverse: {rule.target}: the ops after the gathered stack depend on the number of instances")
    return result


def _varies(op: Op) -> bool:
    """The index that differs between the rules one reversed rule regroups: a chunk's part, or a
    select by number (a select by placeholder is one rule over every instance)."""
    return isinstance(op, opmod.Chunk) or (isinstance(op, opmod.Select) and not isinstance(op.index, str))


def _selection_group(rule: Rule, positions: list[int]) -> tuple:
    last = positions[-1]
    selecting = []
    for op in rule.ops[positions[0] : last + 1]:
        data = op.to_dict()[op.name]
        if op.selects and _varies(op):
            data = {k: v for k, v in data.items() if k != "index"}
        selecting.append({op.name: data})
    return (
        rule.sources[0],
        json.dumps([op.to_dict() for op in rule.ops[: positions[0]]]),
        json.dumps(selecting, sort_keys=True),
    )


def _reverse_selection_group(members: list[tuple[int, Rule]], shape_of) -> Rule:
    position, first = members[0]
    source = first.sources[0]
    select = first.ops[position]
    pre = first.ops[:position]
    source_shape = shape_of(source)
    selected_input = opmod.chain_output_shape(pre, [source_shape])
    if sum(op.selects for op in first.ops) == 2:
        return _reverse_two_selects(members, pre, selected_input, source_shape)
    post_dicts = {json.dumps([op.to_dict() for op in rule.ops[position + 1 :]]) for _, rule in members}
    if len(post_dicts) != 1:
        raise MappingError(f"reverse: the parts of {source} are transformed differently after the {select.name}")
    post = first.ops[position + 1 :]
    pre_reverse = opmod.reverse_unary_chain(pre, source_shape)
    if isinstance(select, opmod.Select):
        post_reverse = opmod.reverse_unary_chain(post, _select_shape(select, selected_input))
        if isinstance(select.index, str):
            if len(members) != 1:
                raise MappingError(f"reverse: select on {source} by {select.index} must be one rule")
            ops = post_reverse + [opmod.Stack(axis=select.axis)] + pre_reverse
            return Rule(source, (first.target,), tuple(ops), first.note)
        by_index = {rule.ops[position].index: rule for _, rule in members}
        if sorted(by_index) != list(range(selected_input[select.axis])) or len(by_index) != len(members):
            raise MappingError(
                f"reverse: {source} has {selected_input[select.axis]} entries on axis {select.axis} but rules select "
                f"{sorted(by_index)}; the others cannot be restored"
            )
        targets = tuple(by_index[k].target for k in sorted(by_index))
        ops = post_reverse + [opmod.Stack(axis=select.axis)] + pre_reverse
        return Rule(source, targets, tuple(ops), first.note)
    by_index = {rule.ops[position].index: rule for _, rule in members}
    if sorted(by_index) != list(range(select.count)) or len(by_index) != len(members):
        raise MappingError(
            f"reverse: {source} is cut into {select.count} parts but rules use parts {sorted(by_index)}; "
            "the unused parts cannot be restored"
        )
    part_shape = select.output_shape(selected_input)
    post_reverse = opmod.reverse_unary_chain(post, part_shape)
    targets = tuple(by_index[k].target for k in range(select.count))
    ops = post_reverse + [opmod.Concat(axis=select.axis)] + pre_reverse
    return Rule(source, targets, tuple(ops), first.note)


def _reverse_two_selects(members: list[tuple[int, Rule]], pre, selected_input: Shape, source_shape: Shape) -> Rule:
    """Rules taking instance ``{e}`` of part ``j`` (a select by placeholder and a select by number,
    in either order, nothing between them): one rule whose sources are the n parts, each gathered
    over ``{e}``, stacked in order (n*E, ...) -> (n, E, ...), the two axes moved where the selects
    took them from."""
    position, first = members[0]
    source = first.sources[0]
    second = position + 1
    if not (first.ops[second].selects):
        raise MappingError(f"reverse: the two selects on {source} must follow each other")
    ops_pair = (first.ops[position], first.ops[second])
    post_dicts = {json.dumps([op.to_dict() for op in rule.ops[second + 1 :]]) for _, rule in members}
    if len(post_dicts) != 1:
        raise MappingError(f"reverse: the parts of {source} are transformed differently after the selects")
    ndim = len(selected_input)
    first_axis = opmod._norm_axis(ops_pair[0].axis, ndim, "select")
    second_axis = opmod._norm_axis(ops_pair[1].axis, ndim - 1, "select")
    positions = (first_axis, second_axis if second_axis < first_axis else second_axis + 1)  # in the pre-output's axes
    numbered = 0 if _varies(ops_pair[0]) else 1
    part_axis, instance_axis = positions[numbered], positions[1 - numbered]
    by_index = {rule.ops[position + numbered].index: rule for _, rule in members}
    count = selected_input[part_axis]
    if sorted(by_index) != list(range(count)) or len(by_index) != len(members):
        raise MappingError(f"reverse: {source} has {count} parts on axis {part_axis} but rules select {sorted(by_index)}; the others cannot be restored")
    remaining = iter(range(2, ndim))
    perm = tuple(0 if k == part_axis else 1 if k == instance_axis else next(remaining) for k in range(ndim))
    post = first.ops[second + 1 :]
    leaf_shape = tuple(size for k, size in enumerate(selected_input) if k not in positions)
    post_reverse = opmod.reverse_unary_chain(post, leaf_shape)
    ops = post_reverse + [opmod.Stack(0), opmod.SplitAxis(0, (count, -1))]
    if perm != tuple(range(ndim)):
        ops.append(opmod.Transpose(perm))
    ops += opmod.reverse_unary_chain(pre, source_shape)
    targets = tuple(by_index[k].target for k in range(count))
    return Rule(source, targets, tuple(ops), first.note)


def _select_shape(select: Op, shape: Shape) -> Shape:
    axis = select.axis % len(shape)
    return tuple(shape[:axis]) + tuple(shape[axis + 1 :])
