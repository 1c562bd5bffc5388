"""Numeric checks against the original implementation (``--source-model``).

Both models run on the same synthetic input. Modules are paired through the mapping
(target ``a.b.c.weight`` <- source ``x.y.z.weight`` pairs module ``a.b.c`` with ``x.y.z``,
and an ancestor with the ancestor whose parameters it reads), and forward hooks record
each paired module's output. Two uses:

- settle what names and shapes could not (opaque q/k/v, square matrices with no layout
  convention): per layer, every consistent assignment of the candidates is loaded into the
  target and the nearest paired module around them is compared with the source model's;
  exactly one assignment must reproduce it.
- localise: with the final mapping, the first paired module (in execution order) whose
  output differs from the source model's. A divergence keeps the report incomplete: a
  conversion that computes something else is not written.

Findings go to ``report.numeric`` (a dict, JSON-ready).
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from .errors import MatcherError
from .grouping import groups_sharing
from .mapping import ExpandedRule, Mapping, Rule
from .ops import Chunk, Select, apply_chain, chain_output_shape
from .patterns import template
from .solve import Decision, MatchReport, Unresolved
from .source_models import SourceModel, build_source_model, load_checkpoint, to_torch
from .tree import natural_key

TOLERANCE = 1e-5  # max abs difference, relative to the reference's magnitude when that exceeds 1
MAX_OPTIONS = 720  # assignments tried per layer before giving up (6! = six interchangeable tensors)
PAIRING_OVERLAP = 0.5  # modules pair when they share more than this share of their parameters (by size)
BATCH = 2


# ====================================================================== entry point


def check_with_source_model(report: MatchReport, spec: str) -> MatchReport:
    """Settle ``report.unresolved`` numerically where possible, then localise divergences.
    Returns a new report with ``numeric`` (a dict) attached."""
    import torch

    if report.source is None or report.target is None:
        raise MatcherError("this report has no source or target attached; use matcher.match()")
    source = build_source_model(spec, report.source, report.target.config)
    load_checkpoint(source, report.source, set(report.dropped))
    target_model = _build_target_model(report)
    inputs = synthetic_inputs(target_model, report.target.config)
    numeric: dict[str, Any] = {
        "source_model": spec,
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        "tolerance": TOLERANCE,
    }
    with torch.no_grad():
        reference = _Reference(source, inputs)
        report = _settle(report, source, target_model, inputs, reference, numeric)
        _localise(report, source, target_model, inputs, reference, numeric)
    if numeric.get("first_divergence"):
        where = numeric["first_divergence"]
        report = replace(report, unresolved=report.unresolved + [Unresolved(where["target_module"], [], _divergence_reason(spec, where))])
    report.numeric = numeric
    return report


def _divergence_reason(spec: str, where: dict) -> str:
    text = (f"numeric check against {spec}: outputs first diverge in {where['target_module'] or '(whole model)'} "
            f"(source {where['source_module'] or '(whole model)'}), max abs difference {where['max_abs_diff']:.3g} > {TOLERANCE:g}")
    inner = where.get("first_diverging_output")
    if inner:
        text += (f"; its input matches, and inside it {inner['target_module']} is the first paired module whose output differs, "
                 f"with its input already differing (an unpaired step before it)")
    return text


def _build_target_model(report: MatchReport):
    import torch

    torch.manual_seed(0)
    try:
        model = report.target.model_class(report.target.config)
    except Exception as exc:  # the config was built on the meta device already; anything here is the config's
        raise MatcherError(f"cannot build {report.target.class_name} to run it: {str(exc).splitlines()[0]}") from exc
    return model.eval()


def _section(config: Any, name: str) -> Any:
    return getattr(config, name, None) or config


def synthetic_inputs(model: Any, config: Any) -> dict[str, Any]:
    """Deterministic inputs for the target's forward: images (BATCH, channels, size, size) and
    token rows as long as the position table, each ending in the highest id (OpenAI CLIP
    pools at the argmax id, transformers' CLIP at the end-of-text id, which is the highest)."""
    import torch

    accepted = inspect.signature(model.forward).parameters
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {}
    if "pixel_values" in accepted:
        vision = _section(config, "vision_config")
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        inputs["pixel_values"] = torch.randn(BATCH, getattr(vision, "num_channels", 3), height, width, generator=generator)
    if "input_ids" in accepted:
        text = _section(config, "text_config")
        vocab, length = text.vocab_size, getattr(text, "max_position_embeddings", 16)
        ids = torch.randint(1, vocab - 1, (BATCH, length), generator=generator)
        ids[:, -1] = vocab - 1
        inputs["input_ids"] = ids
    if not inputs:
        raise MatcherError(f"cannot make inputs for {type(model).__name__}: its forward takes neither pixel_values nor input_ids")
    return inputs


# ====================================================================== outputs and hooks


def first_tensor(value: Any) -> Any:
    """The main tensor of a module's output: itself, or the first tensor of a tuple, list,
    dict or ModelOutput (None entries are skipped)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


@dataclass
class Difference:
    max_abs_diff: float
    scale: float
    seq_first: bool  # the source's output had its first two axes the other way round

    @property
    def matches(self) -> bool:
        return self.max_abs_diff <= TOLERANCE * max(1.0, self.scale)


def compare(target_value: Any, source_value: Any) -> Difference | None:
    """How far the target's output is from the source's; None when they cannot be compared."""
    t, s = first_tensor(target_value), first_tensor(source_value)
    if t is None or s is None or not (t.is_floating_point() and s.is_floating_point()):
        return None
    seq_first = False
    if t.shape != s.shape:
        if s.ndim < 2 or s.transpose(0, 1).shape != t.shape:
            return None
        s, seq_first = s.transpose(0, 1), True
    scale = float(s.abs().max()) if s.numel() else 0.0
    return Difference(float((t.float() - s.float()).abs().max()) if t.numel() else 0.0, scale, seq_first)


def _as_layout(value: Any, shape) -> Any:
    """``value`` in the layout ``shape`` asks for (as is, or its first two axes swapped)."""
    if tuple(value.shape) == tuple(shape):
        return value
    if value.ndim >= 2 and tuple(value.transpose(0, 1).shape) == tuple(shape):
        return value.transpose(0, 1)
    return None


def _first_input(args: tuple, kwargs: dict) -> Any:
    found = first_tensor(list(args))
    return found if found is not None else first_tensor(kwargs)


def _replace_first_input(args: tuple, kwargs: dict, value: Any):
    """(args, kwargs) with the first tensor argument replaced by ``value``, or None if it does not fit."""
    import torch

    args = list(args)
    for n, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            fitted = _as_layout(value, arg.shape)
            return None if fitted is None else (tuple(args[:n] + [fitted] + args[n + 1 :]), kwargs)
    for key, arg in kwargs.items():
        if isinstance(arg, torch.Tensor):
            fitted = _as_layout(value, arg.shape)
            return None if fitted is None else (tuple(args), {**kwargs, key: fitted})
    return None


class _Recorder:
    """Forward hooks recording the first input and output of each named module (outputs in
    completion order). ``stop_at`` ends the run after that module; ``feed`` replaces the first
    input of a module by a given tensor (the source module's input, in the target's layout)."""

    def __init__(self, model: Any, names: Iterable[str], stop_at: str | None = None, feed: dict[str, Any] | None = None):
        modules = dict(model.named_modules())
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.order: list[str] = []
        self.fed: set[str] = set()
        self.stop_at = stop_at
        self.handles = []
        for name in names:
            if name in modules:
                self.handles.append(modules[name].register_forward_pre_hook(self._before(name, (feed or {}).get(name)), with_kwargs=True))
                self.handles.append(modules[name].register_forward_hook(self._after(name)))

    def _before(self, name: str, value: Any):
        def hook(module, args, kwargs):
            if name not in self.inputs:
                found = _first_input(args, kwargs)
                self.inputs[name] = None if found is None else found.detach().clone()
            if value is not None and name not in self.fed:
                replaced = _replace_first_input(args, kwargs, value)
                if replaced is not None:
                    self.fed.add(name)
                    return replaced
            return None

        return hook

    def _after(self, name: str):
        def hook(module, args, output):
            if name not in self.outputs:
                found = first_tensor(output)
                self.outputs[name] = None if found is None else found.detach().clone()
                self.order.append(name)
            if name == self.stop_at:
                raise _Stop

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return exc[0] is _Stop  # the run was cut short on purpose


class _Stop(Exception):
    """Raised by a hook once the module under test has produced its output."""


class _Reference:
    """The source model's run: the first input and output of the modules asked for (run again
    only when new ones are asked for, so a large model keeps only what is compared)."""

    def __init__(self, source: SourceModel, inputs: dict[str, Any]):
        self.source, self.model_inputs = source, inputs
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.record([""])

    def record(self, names: Iterable[str]) -> None:
        missing = [name for name in names if name not in self.outputs]
        if not missing:
            return
        with _Recorder(self.source.module, missing) as recorder:
            try:
                final = self.source(self.model_inputs)
            except Exception as exc:  # someone else's model on synthetic inputs
                raise MatcherError(f"--source-model {self.source.spec!r}: running it on {', '.join(self.model_inputs)} failed: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        self.inputs.update(recorder.inputs)
        self.outputs.update(recorder.outputs)
        self.outputs[""] = final
        for name in missing:  # modules the forward never called: nothing to compare
            self.outputs.setdefault(name, None)


# ====================================================================== module correspondence


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [""] + [".".join(parts[:n]) for n in range(1, len(parts))]


def _overlap(a: dict[str, int], b: dict[str, int]) -> float:
    """Size-weighted Jaccard overlap of two sets of tensors (tensor -> numel)."""
    union = sum({**a, **b}.values())
    return sum(a[k] for k in a.keys() & b.keys()) / union if union else 0.0


def module_pairs(rules: Sequence[ExpandedRule], source_numel: dict[str, int], target_numel: dict[str, int]) -> list[tuple[str, str]]:
    """(target module, source module) pairs: modules whose parameters mostly come from each
    other both ways (a fused qkv feeding three projections pairs with none of them).
    Nested modules with the same parameters (wrappers) pair outermost with outermost."""
    reads: dict[str, dict[str, int]] = defaultdict(dict)  # target module -> source tensors it reads
    owns_t: dict[str, dict[str, int]] = defaultdict(dict)  # target module -> its written tensors
    writes: dict[str, dict[str, int]] = defaultdict(dict)  # source module -> target tensors written from it
    owns_s: dict[str, dict[str, int]] = defaultdict(dict)  # source module -> its read tensors
    for rule in rules:
        for module in _prefixes(rule.target):
            owns_t[module][rule.target] = target_numel[rule.target]
            reads[module].update({s: source_numel[s] for s in rule.sources})
        for source in rule.sources:
            for module in _prefixes(source):
                owns_s[module][source] = source_numel[source]
                writes[module][rule.target] = target_numel[rule.target]
    t_groups = _group_by_contents(owns_t)
    s_groups = _group_by_contents(owns_s)
    s_group_of = {m: key for key, members in s_groups.items() for m in members}

    def score(t_key, s_key) -> float:
        t, s = t_groups[t_key][0], s_groups[s_key][0]
        return min(_overlap(reads[t], owns_s[s]), _overlap(owns_t[t], writes[s]))

    def best(scores: dict) -> Any:
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        if not ranked or ranked[0][1] <= PAIRING_OVERLAP or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
            return None
        return ranked[0][0]

    candidates_of_t = {t_key: {s_group_of[m] for s in reads[t_groups[t_key][0]] for m in _prefixes(s)} for t_key in t_groups}
    best_s = {t_key: best({s_key: score(t_key, s_key) for s_key in cands}) for t_key, cands in candidates_of_t.items()}
    candidates_of_s: dict[Any, set] = defaultdict(set)
    for t_key, cands in candidates_of_t.items():
        for s_key in cands:
            candidates_of_s[s_key].add(t_key)
    best_t = {s_key: best({t_key: score(t_key, s_key) for t_key in cands}) for s_key, cands in candidates_of_s.items()}
    pairs = []
    for t_key, s_key in best_s.items():
        if s_key is not None and best_t.get(s_key) == t_key:
            pairs.extend(zip(t_groups[t_key], s_groups[s_key]))
    return pairs


def _group_by_contents(owned: dict[str, dict[str, int]]) -> dict[frozenset, list[str]]:
    groups: dict[frozenset, list[str]] = defaultdict(list)
    for module in sorted(owned, key=lambda m: (m != "", m.count("."), m)):
        groups[frozenset(owned[module])].append(module)
    return groups


def _numels(report: MatchReport) -> tuple[dict[str, int], dict[str, int]]:
    return ({k: math.prod(s.shape) for k, s in report.source.specs.items()},
            {k: math.prod(s.shape) for k, s in report.target.tree.specs.items()})


# ====================================================================== loading tensors into the target


class _Loader:
    """Produces target tensors from the source checkpoint (reads cached) and copies them in."""

    def __init__(self, report: MatchReport, model: Any):
        self.tree = report.source
        self.target_specs = report.target.tree.specs
        self.state = model.state_dict()
        self.cache: dict[str, Any] = {}

    def tensor(self, rule: ExpandedRule | Rule) -> Any:
        arrays = []
        for source in rule.sources:
            if source not in self.cache:
                self.cache[source] = to_torch(self.tree.read(source))
            arrays.append(self.cache[source])
        value = apply_chain(rule.ops, arrays)
        return value if hasattr(value, "shape") and tuple(value.shape) == tuple(self.target_specs[rule.target].shape) else None

    def put(self, rules: Iterable[ExpandedRule | Rule]) -> str | None:
        """Copy the rules' tensors into the model, all or none; the first target that cannot be produced, or None."""
        produced = []
        for rule in rules:
            try:
                value = self.tensor(rule)
            except Exception:  # noqa: BLE001 - a candidate chain that does not apply is no candidate
                value = None
            if value is None or rule.target not in self.state:
                return rule.target
            produced.append((rule.target, value))
        for key, value in produced:
            self.state[key].copy_(value)
        return None


# ====================================================================== settling unresolved items


@dataclass
class _Component:
    """Unresolved targets whose candidates overlap: settled together."""

    items: list[Unresolved]
    choices: list[tuple[Rule, ...]] = field(default_factory=list)  # each: a templated rule per target
    why_not: str | None = None

    @property
    def targets(self) -> list[str]:
        return [u.target for u in self.items]


def _reads(option) -> tuple:
    """Which data an option reads: its sources, and the part or layer it cuts out of them."""
    return option.sources, tuple(str(op) for op in option.ops if isinstance(op, (Chunk, Select)))


def _fits(report: MatchReport, rule: Rule) -> bool:
    """The rule's first instance produces the target's shape (a part of a fused target does not)."""
    instance = next(iter(Mapping((rule,)).expand(report.source.keys(), report.target.tree.keys()).rules), None)
    if instance is None:
        return False
    try:
        shape = chain_output_shape(instance.ops, [tuple(report.source[s].shape) for s in instance.sources])
    except MatcherError:
        return False
    return tuple(shape) == tuple(report.target.tree[instance.target].shape)


def _components(report: MatchReport) -> list[_Component]:
    """Unresolved items grouped by shared candidates, each with its consistent choices: every
    target one candidate, no candidate read twice."""
    items = [u for u in report.unresolved if u.options]
    options = {id(u): [(_reads(o), o.rule(u.target)) for o in u.options if u.part is None and _fits(report, o.rule(u.target))] for u in items}
    components = []
    for members in groups_sharing(items, lambda item: [reads for reads, _ in options[id(item)]]):
        component = _Component(members)
        if any(not options[id(u)] for u in members):
            component.why_not = "no candidate is a whole rule for its target (one part of a fused tensor, or a chain that does not fit)"
        else:
            component.choices = _assignments([options[id(u)] for u in members])
            if not component.choices:
                component.why_not = f"more than {MAX_OPTIONS} assignments, or none without a candidate read twice"
        components.append(component)
    return components


def _assignments(per_target: list[list[tuple[tuple, Rule]]]) -> list[tuple[Rule, ...]]:
    """Every way to give each target one of its candidates, none read twice (empty beyond MAX_OPTIONS)."""
    choices: list[tuple[Rule, ...]] = []

    def extend(n: int, used: frozenset, picked: tuple) -> None:
        if len(choices) > MAX_OPTIONS:
            return
        if n == len(per_target):
            choices.append(picked)
            return
        for reads, rule in per_target[n]:
            if reads not in used:
                extend(n + 1, used | {reads}, picked + (rule,))

    extend(0, frozenset(), ())
    return [] if len(choices) > MAX_OPTIONS else choices


def _bindings(component: _Component, target_keys: Sequence[str]) -> list[dict[str, int]]:
    first = template(component.targets[0])
    if not first.variables:
        return [{}]
    found = {tuple(sorted(m.items())) for k in target_keys if (m := first.match(k)) is not None}
    return [dict(b) for b in sorted(found)]


def _concrete(rule: Rule, binding: dict[str, int]) -> Rule:
    return Rule(template(rule.target).fill(binding), tuple(template(s).fill(binding) for s in rule.sources), tuple(op.bind(binding) for op in rule.ops))


def _parent(key: str) -> str:
    return re.sub(r"[./][^./]*$", "", key) if re.search(r"[./]", key) else ""


def _module_consistent(rules: Sequence[Rule]) -> bool:
    """Tensors of one target module (q_proj weight and bias) read from one source module."""
    by_target: dict[str, set[str]] = defaultdict(set)
    for rule in rules:
        by_target[_parent(rule.target)].update(_parent(s) for s in rule.sources)
    return all(len(sources) == 1 for sources in by_target.values())


@dataclass
class _Unit:
    """The components of one layer that one module's output judges."""

    module: str  # target module compared
    source_module: str
    binding: dict[str, int]
    components: list[_Component]

    def combinations(self) -> tuple[list[tuple[int, ...]], bool]:
        """Index tuples (one choice per component); module-consistent ones only, when any are."""
        every = list(itertools.product(*(range(len(c.choices)) for c in self.components)))
        if len(every) > MAX_OPTIONS:
            return [], False
        consistent = [combo for combo in every if _module_consistent(self.rules(combo))]
        return (consistent, True) if consistent and len(consistent) < len(every) else (every, False)

    def rules(self, combo: tuple[int, ...]) -> list[Rule]:
        return [_concrete(rule, self.binding) for component, index in zip(self.components, combo) for rule in component.choices[index]]


def _enclosing(keys: Sequence[str], pairs: dict[str, str]) -> str | None:
    """The deepest paired target module holding all of ``keys``."""
    common = set.intersection(*(set(_prefixes(k)) for k in keys))
    found = [m for m in common if m in pairs]
    return max(found, key=lambda m: (m != "", m.count("."))) if found else None


def _settle(report: MatchReport, source: SourceModel, model: Any, inputs: dict, reference: _Reference, numeric: dict) -> MatchReport:
    components = _components(report)
    numeric["settled"], numeric["unsettled"] = [], []
    if not components:
        return report
    base = list(report.mapping.rules) + [r for c in components if c.choices for r in c.choices[0]]
    expansion = Mapping(tuple(base)).expand(report.source.keys(), report.target.tree.keys())
    loader = _Loader(report, model)
    failed = loader.put(expansion.rules)
    if failed is not None:
        numeric["unsettled"].append({"targets": [t for c in components for t in c.targets], "reason": f"the rule for {failed} does not produce its tensor"})
        return report
    pairs = dict(module_pairs(expansion.rules, *_numels(report)))
    with _Recorder(model, pairs) as recorder:
        model(**inputs)
    order = {name: n for n, name in enumerate(recorder.order)}
    reference.record(pairs.values())
    units: dict[tuple, _Unit] = {}
    winners: dict[int, dict[tuple, tuple]] = defaultdict(dict)  # component -> binding -> (choice index or None, why not)
    for component in components:
        if component.why_not:
            numeric["unsettled"].append({"targets": component.targets, "reason": component.why_not})
            continue
        for binding in _bindings(component, list(report.target.tree.keys())):
            keys = [template(t).fill(binding) for t in component.targets]
            module = _enclosing(keys, pairs)
            if module is None or module not in order or reference.outputs.get(pairs[module]) is None:
                why = "no paired module around these tensors to compare outputs at"
                winners[id(component)][tuple(binding.items())] = (None, why)
                numeric["unsettled"].append({"targets": keys, "reason": why})
                continue
            unit = units.setdefault((module, tuple(binding.items())), _Unit(module, pairs[module], binding, []))
            unit.components.append(component)
    failed_before = False
    for unit in sorted(units.values(), key=lambda u: order[u.module]):
        index, entry = _try_unit(unit, model, inputs, loader, reference, failed_before, _assumptions(report))
        failed_before |= index is None
        numeric["settled" if index is not None else "unsettled"].append(entry)
        for component, choice in zip(unit.components, index or [None] * len(unit.components)):
            winners[id(component)][tuple(unit.binding.items())] = (choice, entry.get("reason"))
    return _apply_winners(report, components, winners, source.spec)


def _assumptions(report: MatchReport) -> str:
    """The config fields the weights did not show, most suspect first: when no choice
    reproduces the source model, these are the other explanation."""
    assumed = sorted((f for f in report.config_fields if f.how != "inferred"), key=lambda f: "allow" not in (f.evidence or ""))
    if not assumed:
        return ""
    shown = ", ".join(f"{f.path}={f.value}" for f in assumed[:4]) + (", ..." if len(assumed) > 4 else "")
    return f"; the config was partly assumed ({shown}): pass --config if that is wrong"


def _try_unit(unit: _Unit, model, inputs, loader: _Loader, reference: _Reference, failed_before: bool, hint: str = ""):
    """Try every assignment of one unit; the module is fed the source module's input when it
    fits, so what happened upstream does not matter, and run in place otherwise."""
    combos, consistent_only = unit.combinations()
    targets = [r.target for r in unit.rules(combos[0])] if combos else []
    where = f"{unit.module or '(whole model)'} ~ {unit.source_module or '(whole model)'}"
    if not combos:
        return None, {"targets": targets, "reason": f"more than {MAX_OPTIONS} assignments to try at {where}"}
    source_input = reference.inputs.get(unit.source_module)
    modes: list[str] = []
    results: list[tuple] = []
    matching: list[tuple] = []
    for fed in ([True] if source_input is not None and unit.module else []) + [False]:
        attempt = _run_combinations(unit, combos, model, inputs, loader, reference, source_input if fed else None)
        if attempt is None:
            continue  # the source module's input does not fit the target module
        results, matching = attempt, [r for r in attempt if r[1]]
        modes.append("fed the source module's input" if fed else "in place")
        if len(matching) == 1:
            break
    if not results:
        return None, {"targets": targets, "reason": f"no assignment could be run and compared at {where}"}
    tried = f"{len(results)} {'module-consistent ' if consistent_only else ''}assignment(s) compared at {where} ({', then '.join(modes)})"
    if len(matching) == 1:
        best = matching[0]
        runner_up = next((r[0] for r in results if r is not best), None)
        loader.put(unit.rules(best[2]))
        evidence = f"{tried}: this one differs by {best[0]:.2g}" + (f", the next best by {runner_up:.2g}" if runner_up is not None else "")
        entry = {"targets": targets, "chosen": [r.describe() for r in unit.rules(best[2])], "compared_at": where,
                 "max_abs_diff": best[0], "runner_up_diff": runner_up, "evidence": evidence}
        return best[2], entry
    if matching:
        reason = f"{len(matching)} of {tried} reproduce the source model: the input does not tell them apart"
    else:
        closest = f" (closest differs by {results[0][0]:.2g})"
        upstream = "; an earlier item was not settled either" if failed_before and modes[-1] == "in place" else ""
        reason = f"none of {tried} reproduces the source model{closest}{upstream}{hint}"
    loader.put(unit.rules(results[0][2]))
    return None, {"targets": targets, "reason": reason}


def _run_combinations(unit: _Unit, combos, model, inputs, loader: _Loader, reference: _Reference, source_input) -> list[tuple] | None:
    """(max abs difference, within tolerance, combination) per combination that could be run,
    best first; None when ``source_input`` does not fit the module's input."""
    results = []
    feed = {unit.module: source_input} if source_input is not None else None
    for combo in combos:
        if loader.put(unit.rules(combo)) is not None:
            continue
        with _Recorder(model, [unit.module], stop_at=unit.module, feed=feed) as recorder:
            model(**inputs)
        if feed and unit.module not in recorder.fed:
            return None
        difference = compare(recorder.outputs.get(unit.module), reference.outputs[unit.source_module])
        if difference is not None:
            results.append((difference.max_abs_diff, difference.matches, combo))
    return sorted(results, key=lambda r: r[0])


def _bind_item(item: Unresolved, binding: dict[str, int], why: str) -> Unresolved:
    """One layer's instance of a templated unresolved item."""
    fill = lambda text: template(text).fill(binding)  # noqa: E731
    options = [replace(o, sources=tuple(fill(s) for s in o.sources), ops=tuple(op.bind(binding) for op in o.ops), label=fill(o.label))
               for o in item.options]
    return replace(item, target=fill(item.target), candidates=[fill(c) for c in item.candidates], options=options,
                   reason=f"{item.reason}; numeric check: {why}")


def _apply_winners(report: MatchReport, components: list[_Component], winners: dict, spec: str) -> MatchReport:
    """Settled choices become rules: one templated rule per target when every layer chose
    alike, else one rule per layer; what stays open says why."""
    decisions = list(report.decisions)
    replaced: dict[int, list[Unresolved]] = {}  # unresolved item -> what takes its place
    for component in components:
        results = winners.get(id(component), {})
        if not results:
            why = component.why_not or "not tried"
            for u in component.items:
                replaced[id(u)] = [replace(u, reason=f"{u.reason}; numeric check: {why}")]
            continue
        chosen = {index for index, _ in results.values()}
        if None not in chosen and len(chosen) == 1:
            (index,) = chosen
            reason = f"settled numerically against {spec} (the same choice in every layer)"
            decisions += [Decision(rule, 1.0, [reason]) for rule in component.choices[index]]
            replaced.update({id(u): [] for u in component.items})
            continue
        if chosen == {None}:  # no layer settled: the templated items stay, with the reason
            why = next(iter(results.values()))[1]
            for u in component.items:
                replaced[id(u)] = [replace(u, reason=f"{u.reason}; numeric check: {why}")]
            continue
        for u in component.items:
            replaced[id(u)] = []
        for binding_items, (index, why) in results.items():
            binding = dict(binding_items)
            if index is None:
                for u in component.items:
                    replaced[id(u)].append(_bind_item(u, binding, why))
            else:
                decisions += [Decision(_concrete(rule, binding), 1.0, [f"settled numerically against {spec}"])
                              for rule in component.choices[index]]
    decisions.sort(key=lambda d: natural_key(d.rule.target))
    unresolved = [v for u in report.unresolved for v in replaced.get(id(u), [u])]
    mapping = replace(report.mapping, rules=tuple(d.rule for d in decisions))
    expansion = mapping.expand(report.source.keys(), report.target.tree.keys())
    held = {k for u in unresolved for o in u.options for s in o.sources for k in report.source.keys() if template(s).match(k)}
    unused = [k for k in expansion.unused_sources if k not in held and k not in report.dropped]
    return replace(report, mapping=mapping, decisions=decisions, unresolved=unresolved,
                   unused_sources=sorted(set(report.unused_sources) | set(unused), key=natural_key))


# ====================================================================== localisation


def _localise(report: MatchReport, source: SourceModel, model: Any, inputs: dict, reference: _Reference, numeric: dict) -> None:
    numeric.update(compared=0, outputs=[], first_divergence=None, modules=[])
    expansion = report.mapping.expand(report.source.keys(), report.target.tree.keys())
    if expansion.problems or expansion.unmapped_targets or report.unresolved:
        numeric["status"] = "not localised: the mapping is incomplete"
        return
    failed = _Loader(report, model).put(expansion.rules)
    if failed is not None:
        numeric["status"] = f"not localised: the mapping's rule for {failed} does not produce its tensor"
        return
    pairs = dict(module_pairs(expansion.rules, *_numels(report)))
    reference.record(pairs.values())
    with _Recorder(model, pairs) as recorder:
        output = model(**inputs)
    verdicts: dict[str, Difference] = {}
    for name in recorder.order:
        difference = compare(recorder.outputs[name], reference.outputs.get(pairs[name]))
        if difference is None:
            continue
        verdicts[name] = difference
        numeric["modules"].append({"target_module": name, "source_module": pairs[name], "max_abs_diff": difference.max_abs_diff,
                                   "matches": difference.matches, **({"seq_first": True} if difference.seq_first else {})})
    numeric["compared"] = len(numeric["modules"])
    first = next((name for name in verdicts if not verdicts[name].matches), None)
    if first is not None:
        numeric["first_divergence"] = _origin(first, pairs, verdicts, recorder, reference)
    for final in source.finals:
        target_value = final.target(model, inputs, output)
        difference = None if target_value is None else compare(target_value, final.source(source.module, inputs))
        if difference is not None:
            numeric["outputs"].append({"name": final.name, "max_abs_diff": difference.max_abs_diff, "matches": difference.matches})
    diverging = next((o for o in numeric["outputs"] if not o["matches"]), None)
    if diverging and not numeric["first_divergence"]:
        numeric["first_divergence"] = {"target_module": f"(output: {diverging['name']})", "source_module": f"(output: {diverging['name']})",
                                       "max_abs_diff": diverging["max_abs_diff"]}
    numeric["status"] = "diverges" if numeric["first_divergence"] else ("matches" if numeric["compared"] or numeric["outputs"] else "nothing comparable")


def _origin(first: str, pairs: dict[str, str], verdicts: dict[str, Difference], recorder: _Recorder, reference: _Reference) -> dict:
    """Where the divergence arises: the first module whose output differs, or, when its input
    differs already (an unpaired step before it, such as an activation or the attention
    product), the innermost paired module around it whose input still matches."""

    def input_matches(name: str) -> bool:
        difference = compare(recorder.inputs.get(name), reference.inputs.get(pairs[name]))
        return difference is not None and difference.matches

    enclosing = sorted((m for m in verdicts if m == "" or first == m or first.startswith(m + ".")), key=lambda m: (m != "", m.count(".")), reverse=True)
    origin = next((m for m in enclosing if input_matches(m)), first)
    entry = {"target_module": origin, "source_module": pairs[origin], "max_abs_diff": verdicts[origin].max_abs_diff,
             "input_matches": input_matches(origin)}
    if origin != first:
        entry["first_diverging_output"] = {"target_module": first, "source_module": pairs[first], "max_abs_diff": verdicts[first].max_abs_diff}
    return entry
