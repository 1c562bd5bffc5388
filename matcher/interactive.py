"""Settle what the matcher left open by asking the person at the terminal.

The confident pairs are accepted (or not) with one answer; then each unresolved item is
one question with the matcher's ranked options and their evidence (shape chain, cost).
Answers become rules, pinned, and the matcher runs again around them; the result can be
saved as a mapping file, so the next run with ``--mapping FILE`` asks nothing.

Answers are checked as they come: a source tensor (one part of it, one layer of a scanned
stack) feeds one target, so an option whose source is already taken, by an accepted pair
or an earlier answer, is refused and the question asked again. Nothing is guessed: a
default answer is offered only when evidence points at it (the same module as the answer
for a sibling, or the only option left).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import click

from .errors import MatcherError
from .mapping import Mapping, Rule
from .ops import Concat
from .patterns import template
from .solve import Decision, MatchReport, Option, Unresolved
from .tree import natural_key

NOTE = "chosen interactively"
_PART_LABEL = re.compile(r" as its (\w+) part$")
_ORIENTATION_WORDS = {"as is": False, "transposed": True}


@dataclass(frozen=True)
class Question:
    target: str  # a template, or one concrete key when asked per layer
    part: str | None  # which part of a fused target (in_proj: query, key, value)
    reason: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Answer:
    question: Question
    option: Option


class Refused(Exception):
    """An answer that cannot be taken; the message says why, and the question is asked again."""


def _parent(path: str) -> str:
    return re.sub(r"[./][^./]*$", "", path)


class Ledger:
    """Which concrete source tensors are spoken for, and by which target."""

    def __init__(self, report: MatchReport):
        self.report = report
        self.source_keys = list(report.source.keys())
        self.target_keys = list(report.target.tree.keys())
        self.holders: dict[tuple, str] = {}
        self.answered: dict[tuple[str, str | None], tuple[str, ...]] = {}  # (concrete target, part) -> sources
        for rule in Mapping(report.mapping.rules).expand(self.source_keys, self.target_keys).rules:
            self._claim(rule.target, rule.sources, rule.ops)

    @staticmethod
    def _keys(sources, ops) -> list[tuple]:
        # A part of a fused source or one layer of a stack is its own claim: q, k and v share a tensor.
        selection = tuple(str(op) for op in ops if op.selects)
        return [(source, selection) for source in sources]

    def _claim(self, target: str, sources, ops) -> None:
        for key in self._keys(sources, ops):
            self.holders[key] = target

    def instances(self, target: str, option: Option) -> dict[str, tuple[tuple[str, ...], tuple]]:
        """The option laid over the trees: concrete target -> (concrete sources, bound ops)."""
        try:
            rule = Rule(target, option.sources, option.ops)
        except MatcherError as exc:  # the answer names a source that cannot feed this target
            raise Refused(exc.message) from exc
        expansion = Mapping((rule,)).expand(self.source_keys, self.target_keys)
        if not expansion.rules:
            raise Refused(expansion.problems[0] if expansion.problems else f"{option.label} fits no tensor of {target}")
        return {r.target: (r.sources, r.ops) for r in expansion.rules}

    def conflict(self, target: str, option: Option) -> tuple[str, str] | None:
        """(a source the option reads, the target already holding it), if any."""
        for sources, ops in self.instances(target, option).values():
            for key in self._keys(sources, ops):
                if key in self.holders:
                    return key[0], self.holders[key]
        return None

    def take(self, answer: Answer) -> None:
        for concrete, (sources, ops) in self.instances(answer.question.target, answer.option).items():
            self._claim(concrete if answer.question.part is None else f"{concrete} ({answer.question.part} part)", sources, ops)
            self.answered[(concrete, answer.question.part)] = sources

    def _siblings(self, concrete: str, part: str | None) -> list[str]:
        return [t for (t, p) in self.answered if p == part and t != concrete and _parent(t) == _parent(concrete)]

    def sibling_evidence(self, question: Question, option: Option) -> str | None:
        """Why this option is the natural answer: every instance reads the module that an
        answered sibling target (``q_proj.bias`` for ``q_proj.weight``) reads."""
        found = None
        for concrete, (sources, _) in self.instances(question.target, option).items():
            agreeing = [t for t in self._siblings(concrete, question.part) if [_parent(s) for s in self.answered[(t, question.part)]] == [_parent(s) for s in sources]]
            if not agreeing:
                return None
            found = found or agreeing[0]
        return f"same module as your answer for {found}" if found else None


def questions(report: MatchReport) -> tuple[list[Question], list[Unresolved], list[Answer]]:
    """The askable items, the ones that cannot be asked (no options), and the parts of fused
    targets the matcher did decide (they come back as one item whose options name the part)."""
    asked, unanswerable, given = [], [], []
    for item in report.unresolved:
        parts = [_PART_LABEL.search(o.label) for o in item.options]
        if item.options and item.part is None and all(parts):
            for option, found in zip(item.options, parts):
                given.append(Answer(Question(item.target, found.group(1), item.reason, ()), option))
        elif item.options:
            asked.append(Question(item.target, item.part, item.reason, tuple(item.options)))
        else:
            unanswerable.append(item)
    return asked, unanswerable, given


# ---------------------------------------------------------------------- showing


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _console():
    from rich.console import Console

    return Console(highlight=False)


def show_confident_pairs(report: MatchReport) -> None:
    from rich.table import Table

    table = Table(title=f"{len(report.decisions)} confident pairs", title_justify="left")
    for column in ("#", "target", "source", "transform"):
        table.add_column(column, overflow="fold")
    table.add_column("confidence", justify="right")
    for n, decision in enumerate(report.decisions, 1):
        rule = decision.rule
        table.add_row(str(n), escape(rule.target), escape("\n".join(rule.sources)), " | ".join(map(str, rule.ops)) or "rename", f"{decision.confidence:.2f}")
    console = _console()
    console.print(table)
    if report.conventions:
        console.print("layout conventions: " + ", ".join(f"{k}: {'transpose' if v else 'as is'}" for k, v in sorted(report.conventions.items())), markup=False)


def _shape(report: MatchReport, target: str, part: str | None) -> str:
    keys = [k for k in report.target.tree.keys() if template(target).match(k) is not None]
    if not keys:
        return ""
    shape = report.target.tree.specs[keys[0]].shape
    where = f", {len(keys)} tensors" if len(keys) > 1 else ""
    return f"  {tuple(shape)}{where}" + (f", its {part} part" if part else "")


def show_question(report: MatchReport, question: Question, number: str, notes: list[str | None], default: str | None) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"\n[bold]{escape(number)}[/] [cyan]{escape(question.target)}[/]{_shape(report, question.target, question.part)}")
    console.print(f"  why asked: {question.reason}", markup=False)
    table = Table(box=None, padding=(0, 1), show_edge=False)
    for column in ("", "source", "transform", "cost", "evidence"):
        table.add_column(column, overflow="fold")
    for n, (option, note) in enumerate(zip(question.options, notes), 1):
        cost = f"{option.cost:.2f}" if math.isfinite(option.cost) else ""
        table.add_row(str(n), escape(option.label), " | ".join(map(str, option.ops)) or "rename", cost, escape(note or ""))
    console.print(table)
    if default == "p":
        console.print("  the evidence differs per layer: p asks about each layer, with its own default", markup=False)


# ---------------------------------------------------------------------- asking


def _ask(text: str, default: str | None) -> str:
    # click turns Ctrl-C and end of input into Abort; the CLI reports an interruption (exit 130).
    try:
        return click.prompt(text, default=default, show_default=default is not None).strip()
    except click.Abort:
        raise KeyboardInterrupt from None


def _confirm(text: str) -> bool:
    try:
        return click.confirm(text, default=True)
    except click.Abort:
        raise KeyboardInterrupt from None


def _typed(report: MatchReport, question: Question, text: str) -> Option:
    """An option named by its source path (``PATH``, ``PATH as is``, ``PATH transposed``)."""
    for option in question.options:
        if text in (option.label, *option.sources) or text == ", ".join(option.sources):
            return option
    from .solve.assign import Item, orientation_key
    from .solve.chains import chains_between

    path, orientation = text, None
    for word, flag in _ORIENTATION_WORDS.items():
        if text.endswith(" " + word):
            path, orientation = text[: -len(word) - 1].strip(), flag
    sources = [k for k in report.source.keys() if template(path).match(k) is not None]
    targets = [k for k in report.target.tree.keys() if template(question.target).match(k) is not None]
    if not sources:
        raise Refused(f"{path!r} is not an option number or a tensor of the checkpoint")
    if not targets or question.part is not None:
        raise Refused("pick one of the listed options for this item")
    source_shape, target_shape = report.source.specs[sources[0]].shape, report.target.tree.specs[targets[0]].shape
    chains = chains_between(tuple(source_shape), tuple(target_shape))
    convention = report.conventions.get(orientation_key(Item(path, path, tuple(source_shape))))
    wanted = orientation if orientation is not None else convention
    chains = [c for c in chains if wanted is None or c.transposed == wanted] or ([] if orientation is not None else list(chains))
    if not chains:
        raise Refused(f"{path} {tuple(source_shape)} cannot be read as {tuple(target_shape)}")
    if len({c.transposed for c in chains}) > 1:
        raise Refused(f"{path} is square and no convention says how it is stored: answer '{path} as is' or '{path} transposed'")
    return Option((path,), tuple(chains[0].ops), float("nan"), f"{path} (typed)")


class Session:
    def __init__(self, report: MatchReport, given: list[Answer]):
        self.report = report
        self.ledger = Ledger(report)
        self.answers: list[Answer] = []
        for answer in given:
            self.ledger.take(answer)
        self.given = given

    def _notes_and_default(self, question: Question, layers: list[tuple[Question, list[int]]] = ()) -> tuple[list[str | None], str | None]:
        """A note per option (taken by whom, or why it is the natural answer) and the default
        answer, when evidence gives one. For one tensor: the option reading the module that an
        answered sibling reads, else the only option not taken.
        For a template over layers: the option every layer defaults to, or 'p' when the
        layers default to different options."""
        notes, free, evident = [], [], []
        for n, option in enumerate(question.options):
            try:
                conflict = self.ledger.conflict(question.target, option)
                taken = f"taken by {conflict[1]}" if conflict else None
                sibling = None if taken or layers else self.ledger.sibling_evidence(question, option)
            except Refused as exc:
                taken, sibling = f"unusable: {exc}", None
            notes.append(taken or sibling)
            free += [n] if not taken else []
            evident += [n] if sibling else []
        if layers:
            picked, why = set(), ""
            for layer, origin in layers:
                layer_notes, default = self._notes_and_default(layer)
                if default is None:
                    return notes, None
                picked.add(origin[int(default) - 1])
                why = why or layer_notes[int(default) - 1]
            if len(picked) > 1:
                return notes, "p"
            n = picked.pop()
            notes[n] = f"in every layer: {why}"
            return notes, str(n + 1)
        if len(evident) == 1:
            return notes, str(evident[0] + 1)
        if len(free) == 1:
            notes[free[0]] = "the only option not taken"
            return notes, str(free[0] + 1)
        return notes, None

    def _layers(self, question: Question) -> list[tuple[Question, list[int]]]:
        """The question asked per concrete target, each with the index of the templated
        option every one of its options comes from."""
        per_target: dict[str, list[tuple[Option, int]]] = {}
        for n, option in enumerate(question.options):
            try:
                laid = self.ledger.instances(question.target, option)
            except Refused:
                continue
            for concrete, (sources, ops) in laid.items():
                per_target.setdefault(concrete, []).append((Option(sources, ops, option.cost, ", ".join(sources) + _orientation_suffix(option)), n))
        return [
            (Question(t, question.part, question.reason, tuple(o for o, _ in per_target[t])), [n for _, n in per_target[t]])
            for t in sorted(per_target, key=natural_key)
        ]

    def ask(self, question: Question, number: str, allow_per_layer: bool = True) -> None:
        """Ask until the answer is taken or skipped."""
        layers = self._layers(question) if allow_per_layer and template(question.target).variables else []
        if len(layers) < 2:
            layers = []
        while True:
            notes, default = self._notes_and_default(question, layers)
            show_question(self.report, question, number, notes, default)
            hint = "number" + (", p = differs per layer" if layers else "") + ", s = skip, or a source path"
            reply = _ask(f"answer ({hint})", default)
            try:
                if reply.lower() in ("s", "skip"):
                    return
                if reply.lower() == "p" and layers:
                    for k, (layer, _) in enumerate(layers, 1):
                        self.ask(layer, f"{number}.{k}", allow_per_layer=False)
                    return
                option = question.options[int(reply) - 1] if reply.isdigit() and 1 <= int(reply) <= len(question.options) else None
                if option is None and reply.isdigit():
                    raise Refused(f"{reply} is not one of the options 1-{len(question.options)}")
                option = option or _typed(self.report, question, reply)
                conflict = self.ledger.conflict(question.target, option)
                if conflict:
                    raise Refused("{} is already the source of {}".format(*conflict))
            except Refused as exc:
                click.echo(f"refused: {exc}")
                continue
            answer = Answer(question, option)
            self.ledger.take(answer)
            self.answers.append(answer)
            return

    # ------------------------------------------------------------------ answers -> rules

    def rules(self) -> tuple[list[Rule], list[str]]:
        """Rules for the answers, and the fused targets whose parts are not all answered."""
        rules = [Rule(a.question.target, a.option.sources, a.option.ops, NOTE) for a in self.answers if a.question.part is None]
        fused: dict[str, list[Answer]] = {}
        for answer in self.given + [a for a in self.answers if a.question.part is not None]:
            fused.setdefault(_fused_template(answer.question.target, self.report), []).append(answer)
        incomplete = []
        for fused_template, answers in fused.items():
            made, missing = _concat_rules(fused_template, answers, self.ledger)
            rules += made
            incomplete += missing
        return rules, incomplete


def _orientation_suffix(option: Option) -> str:
    return next((f" {word}" for word in _ORIENTATION_WORDS if option.label.endswith(" " + word)), "")


def _fused_template(target: str, report: MatchReport) -> str:
    """The templated fused target a (possibly per-layer) part answer belongs to."""
    for item in report.unresolved:
        if item.target == target or template(item.target).match(target) is not None:
            return item.target
    return target


def _concat_rules(fused_template: str, answers: list[Answer], ledger: Ledger) -> tuple[list[Rule], list[str]]:
    """One concat rule per fused target whose parts are all answered alike, in the target's part order."""
    from .solve.names import fused_parts

    roles = fused_parts(fused_template) or ()
    by_target: dict[str, dict[str, tuple]] = {}
    templated = all(a.question.target == fused_template for a in answers)
    for answer in answers:
        if templated:
            by_target.setdefault(fused_template, {})[answer.question.part] = (answer.option.sources, answer.option.ops)
            continue
        for concrete, laid in ledger.instances(answer.question.target, answer.option).items():
            by_target.setdefault(concrete, {})[answer.question.part] = laid
    rules, incomplete = [], []
    for target, parts in sorted(by_target.items(), key=lambda kv: natural_key(kv[0])):
        chains = {parts[r][1] for r in roles if r in parts}
        if set(parts) != set(roles) or len(chains) != 1:
            incomplete.append(target)
            continue
        sources = tuple(s for r in roles for s in parts[r][0])
        rules.append(Rule(target, sources, chains.pop() + (Concat(0),), NOTE))
    return rules, incomplete


# ---------------------------------------------------------------------- the session


def default_mapping_path(report: MatchReport) -> Path:
    """``<SRC stem>.mapping.yaml`` beside the checkpoint (beside the directory for a
    save_pretrained directory)."""
    origin = Path(report.source.origin)
    return origin.parent / f"{origin.stem}.mapping.yaml"


def _save_where_asked(report: MatchReport, mapping: Mapping) -> Path | None:
    """Offer the default path, take another, or none; ask again if the file cannot be written."""
    default = default_mapping_path(report)
    while True:
        reply = _ask("save these decisions to a mapping file (so the next run asks nothing; '-' = do not save)", str(default))
        if reply == "-":
            return None
        path = Path(reply).expanduser()
        if path.exists() and not _confirm(f"{path} exists; replace it?"):
            continue
        try:
            mapping.save(path)
        except OSError as exc:
            click.echo(f"cannot write {path}: {exc.strerror or exc}")
            continue
        return path


def _rematch(report: MatchReport, rules: list[Rule], answered: int) -> MatchReport:
    from .api import match

    meta = dict(report.mapping.meta, target_class=report.target.class_name, source_format=report.source.format,
                description=f"inferred by matcher from shapes and names; {answered} answer(s) given interactively (rules noted '{NOTE}')")
    pinned = Mapping(report.mapping.rules + tuple(rules), report.mapping.dropped, report.mapping.initialised, meta)
    result = match(report.source, report.target.model_class, config=report.target.config, mapping=pinned)
    earlier = {d.rule: d for d in report.decisions}
    decisions = [earlier.get(d.rule) or (Decision(d.rule, 1.0, ["answered interactively"]) if d.rule.note == NOTE else d) for d in result.decisions]
    return replace(result, decisions=decisions, config_fields=report.config_fields)


def resolve_interactively(report: MatchReport, mapping_out: Path | None) -> MatchReport:
    """Ask about ``report.unresolved``; return the report matched again with the answers pinned.

    Declining the confident pairs, or skipping every question, returns ``report`` unchanged.
    When ``mapping_out`` is None the user is offered ``<SRC stem>.mapping.yaml`` beside the
    checkpoint; otherwise the caller writes the returned report's mapping to ``mapping_out``.
    """
    console = _console()
    asked, unanswerable, given = questions(report)
    for item in unanswerable:
        console.print(f"cannot be answered here (fix the mapping file): {item.target}: {item.reason}", markup=False)
    if not asked:
        return report
    show_confident_pairs(report)
    console.print(f"{len(asked)} item(s) are not decided; accepting the pairs above pins them, then each open item is asked.", markup=False)
    if not _confirm(f"accept all {len(report.decisions)} confident pairs?"):
        console.print("nothing pinned. Review the inferred mapping (--mapping-out FILE), edit it, and rerun with --mapping FILE.", markup=False)
        return report
    console.print("each option: the source, the ops that turn it into the target, and its cost "
                  "(1 - name similarity, plus layout and tower penalties; lower fits better)", markup=False)
    session = Session(report, given)
    for n, question in enumerate(asked, 1):
        session.ask(question, f"[{n}/{len(asked)}]")
    rules, incomplete = session.rules()
    for target in incomplete:
        console.print(f"{target}: not every part of this fused tensor was answered alike; it stays unresolved", markup=False)
    if not rules:
        console.print("no answers: nothing changed", markup=False)
        return report
    result = _rematch(report, rules, len(session.answers))
    state = "complete" if result.complete else f"still open: {len(result.unresolved)} unresolved, {len(result.unmatched_targets)} unmatched, {len(result.unused_sources)} unused"
    console.print(f"\n{len(rules)} rule(s) from your answers; {state}", markup=False)
    path = mapping_out or _save_where_asked(report, result.mapping)
    if path is not None:
        console.print(f"decisions {'will be ' if mapping_out else ''}written to {path}; rerun with --mapping {path} to apply them without questions", markup=False)
    return result
