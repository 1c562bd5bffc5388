"""The matcher: infer a Mapping from a source tree and a target tree, shapes and names only.

1. Repeated blocks on both sides (``blocks``); block templates are paired by solving one
   instance of each candidate pair (``assign.solve_scope``) and an optimal assignment
   over the pairs' costs. Inside a scope, inner groups (the experts of a MoE layer) become
   gathered items, stacked over their instances (``groups``).
2. Leaves outside blocks are assigned globally, helped by the tower correspondence the
   block pairs establish (``params/img`` ~ ``vision_model``).
3. Orientation: pass one decides what shapes force and learns, per source name
   (``kernel``, ``weight``...), whether matrices are stored transposed; pass two applies
   that to square matrices. A square matrix with no convention stays unresolved.
4. Every target and source tensor ends matched, unresolved (with ranked candidates), or
   unmatched. Nothing is guessed: near-ties are unresolved.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MappingError
from ..mapping import Mapping, Rule
from ..ops import Chunk, Concat, MergeAxes, Select, SplitAxis, Stack, Transpose
from ..tree import ParamTree, natural_key
from .assign import INFEASIBLE, Item, Pair, ScopeResult, item_chains, orientation_key, solve_scope
from .blocks import Block, Units, ancestors, find_blocks, find_stacked, split_like
from .names import describe_names, hidden_layout_note, is_training_state, similarity

CONVENTION_AGREEMENT = 0.8
TOWER_BONUS = -0.3
TOWER_CONFLICT = 0.5


@dataclass
class Decision:
    """One inferred rule with its evidence."""

    rule: Rule
    confidence: float
    reasons: list[str]


@dataclass(frozen=True)
class Option:
    """One way to fill an unresolved target: its source(s) and op chain, ready to pin as a rule."""

    sources: tuple[str, ...]
    ops: tuple
    cost: float
    label: str  # how to show it: the source (and its part), "as is" / "transposed"

    def rule(self, target: str) -> Rule:
        return Rule(target, self.sources, self.ops)


@dataclass
class Unresolved:
    target: str
    candidates: list[str]
    reason: str
    options: list[Option] = field(default_factory=list)  # structured candidates, ranked best first
    part: str | None = None  # for a fused target (in_proj), which part is in question


@dataclass
class MatchReport:
    mapping: Mapping
    decisions: list[Decision]
    unresolved: list[Unresolved]
    unmatched_targets: list[str]
    unused_sources: list[str]
    conventions: dict[str, bool]
    config_fields: list[Any] = field(default_factory=list)
    source: ParamTree | None = None
    target: Any = None
    towers: list[dict] = field(default_factory=list)  # which source subtree became which target subtree
    numeric: dict | None = None  # findings of the check against a source model (matcher.verify)
    dropped: list[str] = field(default_factory=list)  # unused on purpose (declared or allowed)
    initialised: list[str] = field(default_factory=list)  # left to the model's initialisation on purpose

    @property
    def complete(self) -> bool:
        return not (self.unresolved or self.unmatched_targets or self.unused_sources)

    def save(self, out, **options):
        """Write the converted model to ``out`` (see ``matcher.api.save``)."""
        from ..api import save

        return save(self, out, **options)

    def to_dict(self) -> dict:
        return {
            "complete": self.complete,
            "rules": [
                {**d.rule.to_dict(), "confidence": round(d.confidence, 3), "reasons": d.reasons} for d in self.decisions
            ],
            "unresolved": [{"target": u.target, "candidates": u.candidates, "reason": u.reason} for u in self.unresolved],
            "unmatched_targets": self.unmatched_targets,
            "unused_sources": self.unused_sources,
            "dropped": self.dropped,
            "initialised": self.initialised,
            "structure": self.towers,
            "numeric": self.numeric,
            "conventions": {k: ("transpose" if v else "as is") for k, v in sorted(self.conventions.items())},
        }


# ---------------------------------------------------------------------- items


def _block_items(block: Block) -> list[Item]:
    return [Item(block.template(suffix), suffix.lstrip("/."), spec.shape, stacked=block.stacked) for suffix, spec in block.leaves.items()]


def _single_items(specs: dict) -> list[Item]:
    return [Item(key, key, spec.shape) for key, spec in specs.items()]


# ---------------------------------------------------------------------- blocks


@dataclass
class BlockMatch:
    source: Block
    target: Block
    result: ScopeResult


def _comparable(source: Block, target: Block) -> bool:
    """Blocks that may pair: the same layer numbers (a structure class pairs only with the class
    of the same layers); a scanned stack, whose layers are selected by ``{i}``, only with layers
    numbered 0..L-1."""
    if source.stacked:
        return target.indices == list(range(target.count))
    return source.indices == target.indices


def _block_cost(source: Block, target: Block, result: ScopeResult, prefix_similarity: float) -> float:
    if not _comparable(source, target):
        return INFEASIBLE
    covered = len(result.pairs) + len(result.ambiguous)
    total = covered + len(result.unmatched_targets)
    if total == 0 or covered < 0.5 * total:
        return INFEASIBLE
    per_leaf = (result.cost + len(result.ambiguous)) / max(1, len(result.pairs) + len(result.ambiguous))
    misses = len(result.unmatched_targets) + 0.5 * len(result.unused_sources)
    return per_leaf + misses + (1.0 - prefix_similarity)


def _match_blocks(source: Units, target: Units, conventions: dict[str, bool]) -> list[BlockMatch]:
    from scipy.optimize import linear_sum_assignment

    if not source.blocks or not target.blocks:
        return []
    prefixes = describe_names([b.prefix for b in source.blocks] + [b.prefix for b in target.blocks])
    cost = np.full((len(source.blocks), len(target.blocks)), INFEASIBLE)
    results: dict[tuple[int, int], ScopeResult] = {}
    for r, sb in enumerate(source.blocks):
        for c, tb in enumerate(target.blocks):
            if sb.count != tb.count or not _comparable(sb, tb):
                continue
            result = solve_scope(_block_items(sb), _block_items(tb), conventions)
            results[(r, c)] = result
            cost[r, c] = _block_cost(sb, tb, result, similarity(prefixes[sb.prefix], prefixes[tb.prefix]))
    rows, cols = linear_sum_assignment(cost)
    return [BlockMatch(source.blocks[r], target.blocks[c], results[(r, c)]) for r, c in zip(rows, cols) if cost[r, c] < INFEASIBLE]


def _block_ancestors(block: Block) -> list[str]:
    """Ancestors of a block, nearest first; a pure list container (``layers`` in
    ``layers.{i}``) is skipped so that ``encoderblock_{i}`` and ``layers.{i}`` align."""
    found = ancestors(block.prefix)
    if not block.stacked and block.prefix.endswith("{i}") and block.prefix[-4] in "./":
        found = found[1:]
    return found


def tower_pairs(matches: list[BlockMatch]) -> dict[str, str]:
    """Source subtree -> target subtree, read bottom-up off the paired blocks' ancestors.
    A subtree claimed by two different partners (a root holding both towers) is no tower."""
    claims: dict[str, set[str]] = defaultdict(set)
    claimed_by: dict[str, set[str]] = defaultdict(set)
    for match in matches:
        for source_anc, target_anc in zip(_block_ancestors(match.source), _block_ancestors(match.target)):
            claims[source_anc].add(target_anc)
            claimed_by[target_anc].add(source_anc)
    return {s: next(iter(t)) for s, t in claims.items() if len(t) == 1 and len(claimed_by[next(iter(t))]) == 1}


def _tower_affinity(matches: list[BlockMatch]):
    """A bonus for pairs inside corresponding subtrees, a penalty across towers."""
    partner = tower_pairs(matches)
    partners = set(partner.values())

    def affinity(source: Item, target: Item) -> float:
        for anc in ancestors(source.template):
            if anc in partner:
                mapped = partner[anc]
                if target.template.startswith(mapped + ".") or target.template.startswith(mapped + "/"):
                    return TOWER_BONUS
                conflicting = [p for p in partners if not mapped.startswith(p) and target.template.startswith(p + ".")]
                return TOWER_CONFLICT if conflicting else 0.0
        return 0.0

    return affinity


# ---------------------------------------------------------------------- conventions


def _learn_conventions(pairs: list[Pair]) -> dict[str, bool]:
    votes: dict[str, Counter] = defaultdict(Counter)
    for pair in pairs:
        if len(pair.target.shape) < 2:
            continue
        flags = {c.transposed for c in item_chains(pair.source, pair.target)}
        if len(flags) == 1:
            votes[orientation_key(pair.source)][flags.pop()] += 1
    conventions = {}
    for key, counter in votes.items():
        total = sum(counter.values())
        for flag in (True, False):
            if counter[flag] >= CONVENTION_AGREEMENT * total:
                conventions[key] = flag
    return conventions


# ---------------------------------------------------------------------- assembly


def _solve(source: Units, target: Units, conventions: dict[str, bool]):
    matches = _match_blocks(source, target, conventions)
    used_source = {id(m.source) for m in matches}
    used_target = {id(m.target) for m in matches}
    source_singles = dict(source.singles)
    target_singles = dict(target.singles)
    for block in source.blocks:
        if id(block) not in used_source:
            source_singles.update(block.instance_keys())
    for block in target.blocks:
        if id(block) not in used_target:
            target_singles.update(block.instance_keys())
    singles = solve_scope(_single_items(source_singles), _single_items(target_singles), conventions, _tower_affinity(matches))
    return matches, singles


def _all_pairs(matches: list[BlockMatch], singles: ScopeResult) -> list[Pair]:
    return [p for m in matches for p in m.result.pairs] + list(singles.pairs)


def _confidence(pair: Pair) -> float:
    return float(min(1.0, pair.margin / 0.5)) if np.isfinite(pair.margin) else 1.0


def match_trees(source: ParamTree, target: ParamTree) -> MatchReport:
    """Infer the mapping from ``source`` to ``target`` (trees of shapes; no data is read)."""
    parameters = {k: s for k, s in source.specs.items() if not is_training_state(k)}
    source_units = find_blocks(ParamTree(parameters, source.loader, source.origin, source.format))
    target_units = find_blocks(target)
    source_units = find_stacked(source_units, {b.count for b in target_units.blocks if b.indices == list(range(b.count))})
    source_units, target_units = split_like(source_units, target_units), split_like(target_units, source_units)
    matches, singles = _solve(source_units, target_units, {})
    conventions = _learn_conventions(_all_pairs(matches, singles))
    matches, singles = _solve(source_units, target_units, conventions)
    report = _report(source, target, matches, singles, conventions)
    report.towers = _towers(source, target, source_units, target_units, matches)
    return report


def _subtree_params(tree: ParamTree, prefix: str) -> int:
    """Elements below ``prefix`` (what ``graph.subtree_params`` reads off the containment graph,
    without building it: the graph costs more than the whole match on a large tree)."""
    return sum(spec.numel for key, spec in tree.specs.items() if key.startswith(prefix) and key[len(prefix) : len(prefix) + 1] in ("/", "."))


def _towers(source: ParamTree, target: ParamTree, source_units: Units, target_units: Units, matches) -> list[dict]:
    """The subtree correspondence, with sizes, for the report."""
    return [
        {"source": s, "target": t, "source_params": _subtree_params(source, s), "target_params": _subtree_params(target, t)}
        for s, t in tower_pairs(matches).items()
    ] + [
        {"source": m.source.prefix, "target": m.target.prefix, "layers": m.target.count, "stacked": m.source.stacked,
         **({"indices": list(m.target.indices)} if m.source.classed or m.target.classed else {})}
        for m in matches
    ]


def _rule_ops(source: Item, chain, target: Item | None = None) -> tuple:
    """The op chain of a rule reading ``source``: its layer of a scanned stack, its part of a
    fused tensor, then the chain that reshapes it into the target; the instances of a gathered
    source (experts) go through that chain one by one and are stacked on a new axis 0, unless
    the target is gathered too (instance e -> instance e)."""
    ops = tuple(chain.ops)
    if source.part is not None:
        ops = (Chunk(axis=source.part_axis - (1 if source.gathered else 0), index=source.part, parts=source.parts),) + ops
    if source.stacked:
        ops = (Select(axis=0, index="{i}"),) + ops
    if source.gathered and not (target is not None and target.gathered):
        ops = ops + (Stack(0),)
    return ops


def _fused_ops(parts: list[Pair]) -> tuple | None:
    """The ops of a fused target made of ``parts`` (each read by the same chain), or None when
    the parts are not read alike (some gathered, some not; different instance counts)."""
    first = parts[0]
    gathered = {p.source.gathered for p in parts}
    if len(gathered) != 1 or len({p.target.part_axis for p in parts}) != 1:
        return None
    chain = tuple(first.chain.ops)
    if not first.source.gathered or first.target.gathered:  # one array per source (per instance when both gathered)
        select = (Select(axis=0, index="{i}"),) if first.source.stacked else ()
        return select + chain + (Concat(first.target.part_axis - (1 if first.target.gathered else 0)),)
    if first.target.part_axis != 1 or any(p.source.part is not None for p in parts):
        return None
    return _stacked_concat_ops(chain, len(parts), len(first.target.shape))


def _stacked_concat_ops(chain: tuple, parts: int, ndim: int) -> tuple:
    """Instances of ``parts`` gathered sources stacked in order (n*E, ...) -> (n, E, ...) -> (E, n, ...)
    -> (E, n*part, ...): per expert, the parts concatenated on the axis after the expert axis
    (``ndim``: rank of one part, expert axis included)."""
    return chain + (Stack(0), SplitAxis(0, (parts, -1)), Transpose((1, 0) + tuple(range(2, ndim + 1))), MergeAxes(1, 2))


def _stacked_parts(target: Item) -> bool:
    """A part of a fused target made of gathered sources (``experts.gate_up_proj``'s gate part):
    its rule is not a concat of per-part rules, so options name every part at once."""
    return target.part is not None and target.part_axis == 1 and not target.gathered


MAX_WHOLE_OPTIONS = 4


def _whole_options(target: Item, candidates: dict[int, list]) -> list[Option]:
    """Complete assignments of sources to the parts of a stacked fused target, cheapest first:
    each part takes one of its candidates, no source twice, every part read by the same chain."""
    import itertools

    from .names import fused_parts

    roles = fused_parts(target.name) or ()
    per_part = [candidates.get(index, []) for index in range(target.parts or 0)]
    options = []
    for combo in itertools.product(*per_part):
        items = [item for item, _, _ in combo]
        chains = {tuple(repr(op.to_dict()) for op in chain.ops) for _, chain, _ in combo}
        if not items or len({i.template for i in items}) != len(items) or len(chains) != 1:
            continue
        if len({i.gathered for i in items}) != 1 or not items[0].gathered or any(i.part is not None for i in items):
            continue
        ops = _stacked_concat_ops(tuple(combo[0][1].ops), len(combo), len(target.shape))
        label = ", ".join(f"{roles[k] if k < len(roles) else k} <- {item.label}" for k, item in enumerate(items))
        options.append(Option(tuple(i.template for i in items), ops, float(sum(cost for _, _, cost in combo)), label))
    return sorted(options, key=lambda o: o.cost)[:MAX_WHOLE_OPTIONS]


def _inexpressible(exc: MappingError) -> str:
    return f"the pair is found but the mapping format cannot express it ({exc.message}); give this rule by hand"


def _hold_hidden_layouts(decisions: list[Decision], unresolved: list[Unresolved]) -> list[Decision]:
    """Decisions whose source has a layout shapes and names cannot show (synonyms.yaml
    ``hidden_layouts``) become questions, the pair found kept as the option."""
    kept = []
    for decision in decisions:
        note = next((n for n in map(hidden_layout_note, decision.rule.sources) if n), None)
        if note is None:
            kept.append(decision)
            continue
        rule = decision.rule
        label = f"{', '.join(rule.sources)} as found ({'; '.join(decision.reasons[:2])})"
        unresolved.append(Unresolved(rule.target, [label], note, [Option(rule.sources, rule.ops, 0.0, label)]))
    return kept


def _report(source: ParamTree, target: ParamTree, matches, singles, conventions) -> MatchReport:
    # Every decision and question is tagged with the block pair it comes from (None: the leaves
    # outside blocks), so that the rules of structure classes can be settled afterwards.
    decisions: list[tuple[Decision, BlockMatch | None]] = []
    unresolved: list[tuple[Unresolved, BlockMatch | None]] = []
    fused_targets: dict[tuple[int, str], list[Pair]] = defaultdict(list)
    stacked_parts: dict[tuple[int, str], dict[int, list]] = defaultdict(dict)  # fused target of gathered parts -> part -> candidates
    stacked_items: dict[tuple[int, str], Item] = {}
    stacked_reasons: dict[tuple[int, str], list[str]] = defaultdict(list)

    def hold_stacked_part(scope: int, target_item: Item, candidates: list, reason: str | None) -> None:
        key = (scope, target_item.template)
        stacked_parts[key][target_item.part] = candidates
        stacked_items[key] = target_item
        if reason:
            stacked_reasons[key].append(reason)

    scopes = [(m.result, m) for m in matches] + [(singles, None)]
    for number, (scope, match) in enumerate(scopes):
        for ambiguity in scope.ambiguous:
            part = f" (its {ambiguity.target.role} part)" if ambiguity.target.role else ""
            if _stacked_parts(ambiguity.target):
                hold_stacked_part(number, ambiguity.target, list(ambiguity.candidates), ambiguity.reason + part)
                continue
            options = [Option((item.template,), _rule_ops(item, chain, ambiguity.target), cost, item.label) for item, chain, cost in ambiguity.candidates]
            unresolved.append((Unresolved(ambiguity.target.template, [f"{o.label} (cost {o.cost:.2f})" for o in options],
                                          ambiguity.reason + part, options, ambiguity.target.role), match))
        for pair in scope.pairs:
            if pair.orientation_open and _stacked_parts(pair.target):
                hold_stacked_part(number, pair.target, [(pair.source, chain, pair.cost) for chain in item_chains(pair.source, pair.target)],
                                  f"square matrix and no layout convention for '{orientation_key(pair.source)}' tensors (its {pair.target.role} part)")
                continue
            if pair.orientation_open:
                options = [
                    Option((pair.source.template,), _rule_ops(pair.source, chain, pair.target), pair.cost, f"{pair.source.label} {'transposed' if chain.transposed else 'as is'}")
                    for chain in item_chains(pair.source, pair.target)
                ]
                unresolved.append((Unresolved(pair.target.template, [o.label for o in options],
                                              f"square matrix and no layout convention for '{orientation_key(pair.source)}' tensors",
                                              options, pair.target.role), match))
                continue
            if pair.target.part is not None:
                fused_targets[(number, pair.target.template)].append(pair)
                continue
            try:
                rule = Rule(pair.target.template, (pair.source.template,), _rule_ops(pair.source, pair.chain, pair.target))
            except MappingError as exc:  # e.g. one chunk of a fused tensor in a scanned stack: select + chunk
                unresolved.append((Unresolved(pair.target.template, [pair.source.label], _inexpressible(exc)), match))
                continue
            decisions.append((Decision(rule, _confidence(pair), pair.reasons + [f"margin {pair.margin:.2f}"]), match))
    for (number, template), parts in fused_targets.items():
        match = scopes[number][1]
        parts.sort(key=lambda p: p.target.part)
        chains = {tuple(op.to_dict().__repr__() for op in p.chain.ops) for p in parts}
        ops = _fused_ops(parts)
        alike = len(parts) == parts[0].target.parts and len(chains) == 1 and ops is not None
        if (number, template) in stacked_parts or (not alike and _stacked_parts(parts[0].target)):
            for p in parts:
                hold_stacked_part(number, p.target, [(p.source, p.chain, p.cost)], None)
            if not alike and (number, template) not in stacked_reasons:
                stacked_reasons[(number, template)].append("the parts of this fused tensor were not all matched alike")
            continue
        if not alike:
            options = [Option((p.source.template,), _rule_ops(p.source, p.chain, p.target), p.cost, f"{p.source.label} as its {p.target.role} part") for p in parts]
            unresolved.append((Unresolved(template, [o.label for o in options], "the parts of this fused tensor were not all matched alike", options), match))
            continue
        try:
            rule = Rule(template, tuple(p.source.template for p in parts), ops)
        except MappingError as exc:  # parts from a scanned stack: select + concat
            unresolved.append((Unresolved(template, [p.source.label for p in parts], _inexpressible(exc)), match))
            continue
        decisions.append((Decision(rule, min(_confidence(p) for p in parts), ["concatenation of " + ", ".join(p.source.label for p in parts)]), match))
    for (number, template), candidates in stacked_parts.items():
        options = _whole_options(stacked_items[(number, template)], candidates)
        unresolved.append((Unresolved(template, [f"{o.label} (cost {o.cost:.2f})" for o in options], "; ".join(stacked_reasons[(number, template)]), options),
                           scopes[number][1]))
    source_keys, target_keys = _KeyIndex(source.keys()), _KeyIndex(target.keys())
    settled_decisions, settled_unresolved = _settle_classes(decisions, unresolved, source_keys, target_keys)
    settled_decisions = _hold_hidden_layouts(settled_decisions, settled_unresolved)
    settled_decisions.sort(key=lambda d: natural_key(d.rule.target))
    mapping = Mapping(tuple(d.rule for d in settled_decisions), meta={"description": "inferred by matcher from shapes and names"})
    unmatched_targets, unused_sources = _leftovers(mapping, settled_unresolved, source_keys, target_keys)
    return MatchReport(mapping, settled_decisions, settled_unresolved, unmatched_targets, unused_sources, conventions, source=source, target=target)


def _leftovers(mapping: Mapping, unresolved: list[Unresolved], source_keys: "_KeyIndex", target_keys: "_KeyIndex") -> tuple[list[str], list[str]]:
    """Target keys no rule writes and no question covers; source keys no rule or option reads.
    What a rule writes and reads is what its expansion binds (placeholders bound from the keys,
    as ``Mapping.expand`` binds them), so a template that also names keys of layers it does not
    bind claims none of them."""
    from ..patterns import template as tmpl

    written: set[str] = set()
    used: set[str] = set()
    for rule in mapping.rules:
        _expanded_keys(rule, source_keys, target_keys, written, used)
    questioned: set[str] = set()
    for item in unresolved:
        questioned.update(key for _, key in target_keys.matches(tmpl(item.target)))
        for option in item.options:
            for src in option.sources:
                used.update(key for _, key in source_keys.matches(tmpl(src)))
    unmatched = [k for k in target_keys.keys if k not in written and k not in questioned]
    unused = [k for k in source_keys.keys if k not in used]
    return unmatched, unused


class _KeyIndex:
    """A tree's keys, indexed for laying templates over them without a pass over every key per
    template: a template ``head{i}tail`` (``model.layers.{i}`` + ``.mlp.gate.weight``) is looked
    up among the keys starting with ``head`` (found by bisection, grouped once by what follows the
    number); only placeholders in the tail (``experts.{e}``) are matched, once per distinct tail."""

    def __init__(self, keys):
        self.keys = list(keys)
        self.set = set(self.keys)
        self._sorted: list[str] | None = None
        self._heads: dict[str, dict[str, list[tuple[int, str]]]] = {}
        self._matches: dict[str, list[tuple[dict, str]]] = {}

    def _under(self, head: str) -> dict[str, list[tuple[int, str]]]:
        """Keys ``head`` + number + rest, grouped by rest."""
        import bisect

        grouped = self._heads.get(head)
        if grouped is None:
            if self._sorted is None:
                self._sorted = sorted(self.keys)
            grouped = self._heads[head] = defaultdict(list)
            for key in self._sorted[bisect.bisect_left(self._sorted, head) :]:
                if not key.startswith(head):
                    break
                rest = key[len(head) :]
                digits = len(rest) - len(rest.lstrip("0123456789"))
                if digits:
                    grouped[rest[digits:]].append((int(rest[:digits]), key))
        return grouped

    def matches(self, pattern) -> list[tuple[dict, str]]:
        """(bindings, key) for every key the template matches, as ``Template.match`` finds them."""
        from ..patterns import template as tmpl

        found = self._matches.get(pattern.text)
        if found is not None:
            return found
        head, name, tail = _split_template(pattern.text)
        if name is None:
            found = [(m, key) for key in self.keys if (m := pattern.match(key)) is not None]
        else:
            grouped = self._under(head)
            tail_t = tmpl(tail)
            if tail_t.is_concrete:
                found = [({name: n}, key) for n, key in grouped.get(tail, ())]
            else:
                found = [({name: n, **m}, key) for rest, items in grouped.items() if (m := tail_t.match(rest)) is not None for n, key in items]
        self._matches[pattern.text] = found
        return found

    def numbers(self, text: str) -> set[int]:
        """The layer numbers ``{i}`` takes over these keys."""
        from ..patterns import template as tmpl

        return {m[LAYER] for m, _ in self.matches(tmpl(text)) if LAYER in m}


def _split_template(text: str) -> tuple[str, str | None, str]:
    """``head``, the first placeholder's name and ``tail``, when the index can serve the template:
    a named placeholder first, not repeated, followed by neither a digit nor another token."""
    import re

    first = re.search(r"\{(\w+)\}|\*", text)
    if first is None or first.group(1) is None:
        return text, None, ""
    head, name, tail = text[: first.start()], first.group(1), text[first.end() :]
    if tail[:1].isdigit() or tail[:1] in ("{", "*") or "{" + name + "}" in tail:
        return text, None, ""
    return head, name, tail


def _expanded_keys(rule: Rule, source_keys: _KeyIndex, target_keys: _KeyIndex, written: set[str], used: set[str]) -> None:
    """Add the target keys ``rule`` writes and the source keys it reads once expanded."""
    from ..patterns import template as tmpl

    target_t = tmpl(rule.target)
    wanted = tuple(target_t.variables)
    carrier = next((s for s in rule.sources if set(wanted) <= set(tmpl(s).variables)), None)
    if not wanted:
        bindings = {()}
    elif carrier is not None:
        bindings = {tuple(m[v] for v in wanted) for m, _ in source_keys.matches(tmpl(carrier))}
    else:
        bindings = {tuple(m[v] for v in wanted) for m, _ in target_keys.matches(target_t)}
    for values in bindings:
        key = target_t.fill(dict(zip(wanted, values)))
        if key in target_keys.set:
            written.add(key)
    for source in rule.sources:
        source_t = tmpl(source)
        if set(source_t.variables) <= set(wanted):
            used.update(source_t.fill(dict(zip(wanted, values))) for values in bindings)
            continue
        own = [k for k, v in enumerate(wanted) if v in source_t.variables]
        allowed = {tuple(values[k] for k in own) for values in bindings}
        used.update(key for m, key in source_keys.matches(source_t) if tuple(m[wanted[k]] for k in own) in allowed)


# ---------------------------------------------------------------------- structure classes

LAYER = "i"  # the block placeholder


def _rule_numbers(rule: Rule, source_keys: _KeyIndex, target_keys: _KeyIndex) -> set[int]:
    """The layers a rule writes once expanded: ``{i}`` is bound from the first source that carries
    every placeholder of the target, else (a scanned stack selected by ``{i}``) from the target keys."""
    from ..patterns import template as tmpl

    wanted = set(tmpl(rule.target).variables)
    carrier = next((s for s in rule.sources if wanted <= set(tmpl(s).variables)), None)
    return source_keys.numbers(carrier) if carrier is not None else target_keys.numbers(rule.target)


def _at_layer(rule: Rule, layer: int) -> Rule:
    from ..patterns import template as tmpl

    bound = {LAYER: layer}
    return Rule(tmpl(rule.target).fill(bound), tuple(tmpl(s).fill(bound) for s in rule.sources), tuple(op.bind(bound) for op in rule.ops), rule.note)


def _layers_text(layers) -> str:
    layers = sorted(layers)
    return ", ".join(map(str, layers)) if len(layers) <= 6 else f"{', '.join(map(str, layers[:3]))}, ..., {layers[-1]} ({len(layers)})"


def _rule_key(rule: Rule) -> tuple:
    return (rule.sources, tuple(repr(op.to_dict()) for op in rule.ops))


def _question_key(item: Unresolved) -> tuple:
    return (item.reason, item.part, tuple((o.sources, tuple(repr(op.to_dict()) for op in o.ops)) for o in item.options))


def _classed(match: BlockMatch | None) -> bool:
    return match is not None and (match.source.classed or match.target.classed)


def _settle_classes(decisions: list[tuple[Decision, BlockMatch | None]], unresolved: list[tuple[Unresolved, BlockMatch | None]],
                    source_keys: _KeyIndex, target_keys: _KeyIndex) -> tuple[list[Decision], list[Unresolved]]:
    """The rules of structure classes (dense and MoE layers under one ``layers.{i}``), made safe to expand.

    Each class pair was solved on its own, over its own layers, with the shared ``{i}`` template.
    Rules equal in every class that has them become one rule; a templated rule is kept only if its
    expansion writes nothing but the layers of the classes it was found for (``{i}`` binds from the
    keys, so ``mlp.gate_proj`` of dense layers binds only where it exists; ``self_attn.q_proj``
    exists in every layer). Otherwise, and for every other class whose rule for the same target
    differs, the rule is written once per layer: two rules never write the same key and a rule
    found for one class never reaches the layers of another (or an odd layer matched on its own).
    Questions are settled the same way."""
    if not any(_classed(match) for _, match in decisions + unresolved):
        return [d for d, _ in decisions], [u for u, _ in unresolved]
    settled: list[Decision] = []
    by_target: dict[str, dict[tuple, list[tuple[Decision, BlockMatch]]]] = defaultdict(dict)
    for decision, match in decisions:
        if not _classed(match):
            settled.append(decision)
            continue
        by_target[decision.rule.target].setdefault(_rule_key(decision.rule), []).append((decision, match))
    for variants in by_target.values():
        ranked = sorted(variants.values(), key=lambda found: -sum(m.target.count for _, m in found))
        templated = False
        for found in ranked:
            rule = found[0][0].rule
            layers = {n for _, m in found for n in m.target.indices}
            confidence = min(d.confidence for d, _ in found)
            reasons = list(found[0][0].reasons)
            if len(found) > 1:
                reasons.append(f"the same in {len(found)} layer classes")
            if not templated and _rule_numbers(rule, source_keys, target_keys) <= layers:
                templated = True
                settled.append(Decision(rule, confidence, reasons))
                continue
            note = f"layer by layer: {{i}} would also bind layers this rule was not found for (found for layers {_layers_text(layers)})"
            settled.extend(Decision(_at_layer(rule, n), confidence, reasons + [note]) for n in sorted(layers))
    questions: list[Unresolved] = []
    by_question: dict[str, dict[tuple, list[tuple[Unresolved, BlockMatch]]]] = defaultdict(dict)
    for item, match in unresolved:
        if not _classed(match):
            questions.append(item)
            continue
        by_question[item.target].setdefault(_question_key(item), []).append((item, match))
    for target_template, variants in by_question.items():
        written = target_keys.numbers(target_template)
        for found in variants.values():
            item = found[0][0]
            layers = {n for _, m in found for n in m.target.indices}
            if len(variants) == 1 and target_template not in by_target and written <= layers:
                questions.append(item)
                continue
            questions.extend(_question_at_layer(item, n) for n in sorted(layers))
    return settled, questions


def _question_at_layer(item: Unresolved, layer: int) -> Unresolved:
    from ..patterns import template as tmpl

    bound = {LAYER: layer}
    options = [Option(tuple(tmpl(s).fill(bound) for s in o.sources), tuple(op.bind(bound) for op in o.ops), o.cost, o.label.replace("{i}", str(layer)))
               for o in item.options]
    return Unresolved(tmpl(item.target).fill(bound), [c.replace("{i}", str(layer)) for c in item.candidates], item.reason, options, item.part)
