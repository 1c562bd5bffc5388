"""What an audit found: every target traced (or not), held against the reference mapping.

Per target of the class: traced (its explanation, and whether the reference's rule gives
the same bits), untraced (nothing reproduces it, or the converter did not write it), or a
disagreement (the reference's rule gives other bits than the converter wrote). Per source:
used, partly or wholly unused (and whether the reference declares it dropped), used by two
targets for the same elements. A lossy dtype cast is listed; it disagrees only when it casts
to another dtype than most of the checkpoint is stored in (a checkpoint saved in fp16 is a choice).

Exit codes: 3 when a target is untraced or a source is dropped that the reference does not
declare; else 4 when a target disagrees; else 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping as MappingABC, Sequence

import numpy as np

from ..mapping import Declared, ExpandedRule, Mapping, Rule
from .fingerprints import to_numpy, value_kind
from .trace import Explanation, Trace, Tracer

EXIT_OK, EXIT_UNTRACED, EXIT_DISAGREES = 0, 3, 4


@dataclass
class Reference:
    """What the audit holds the converter against: rules per target and declared leftovers."""

    name: str  # "inferred by match" or the mapping file
    rules: dict[str, ExpandedRule]
    initialised: set[str] = field(default_factory=set)  # targets expected to keep their initialisation
    dropped: set[str] = field(default_factory=set)  # sources expected to stay unused


def describe_rule(rule: ExpandedRule | Rule) -> str:
    return f"{' | '.join(map(str, rule.ops)) or 'rename'} <- {', '.join(rule.sources)}"


@dataclass
class AuditReport:
    source: str
    converted: str
    target_class: str | None
    reference: str | None
    traced: list[dict] = field(default_factory=list)
    disagreements: list[dict] = field(default_factory=list)
    untraced: list[dict] = field(default_factory=list)
    unused_sources: list[dict] = field(default_factory=list)
    used_twice: list[dict] = field(default_factory=list)
    precision_loss: list[dict] = field(default_factory=list)
    not_in_class: list[dict] = field(default_factory=list)  # converted keys the class does not load
    initialised: list[str] = field(default_factory=list)  # untraced targets the reference expects initialised
    renamed: dict[str, str] = field(default_factory=dict)  # converted file key -> class key, where they differ
    mapping: Mapping | None = None  # the recovered mapping (one concrete rule per traced target)

    @property
    def unexpected_drops(self) -> list[dict]:
        return [u for u in self.unused_sources if not u["expected"]]

    @property
    def exit_code(self) -> int:
        if self.untraced or self.unexpected_drops:
            return EXIT_UNTRACED
        return EXIT_DISAGREES if self.disagreements else EXIT_OK

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "converted": self.converted,
            "target_class": self.target_class,
            "reference": self.reference,
            "exit_code": self.exit_code,
            "traced": self.traced,
            "disagreements": self.disagreements,
            "untraced": self.untraced,
            "unused_sources": self.unused_sources,
            "used_twice": self.used_twice,
            "precision_loss": self.precision_loss,
            "not_in_class": self.not_in_class,
            "initialised": self.initialised,
            "renamed": self.renamed,
            "mapping": self.mapping.to_dict() if self.mapping else None,
        }

    def lines(self) -> list[str]:
        """The report for people: a summary, then every problem with what was found and expected."""
        total = len(self.traced) + len(self.untraced)
        against = f" against {self.reference}" if self.reference else " (no reference mapping: give --target)"
        out = [f"audit {self.converted} <- {self.source}{f' as {self.target_class}' if self.target_class else ''}{against}"]
        out.append(f"traced {len(self.traced)} of {total} target tensors; {len(self.disagreements)} disagree; {len(self.untraced)} untraced; "
                   f"{len(self.unused_sources)} source tensors unused ({len(self.unexpected_drops)} not expected)")
        ambiguous = [t for t in self.traced if t.get("ambiguous_with")]
        # (title, items, shown in full): what the reference expects is abridged, problems never are
        sections: list[tuple[str, list[str], bool]] = [
            ("disagreements", [f"{d['target']}\n      holds:    {d['holds']}\n      expected: {d['expected']}" for d in self.disagreements], True),
            ("untraced", [f"{u['target']}: {u['reason']}" + (f"\n      expected: {u['expected']}" if u.get("expected") else "") for u in self.untraced], True),
            ("unused sources the reference does not expect to be dropped", [f"{u['source']}: {u['unused']}" for u in self.unexpected_drops], True),
            ("used twice", [f"{u['source']}: read by {', '.join(u['targets'])}" for u in self.used_twice], True),
            ("precision loss", [f"{p['target']}: {p['from']} -> {p['to']}" for p in self.precision_loss], True),
            ("not parameters of the class (ignored on loading)", [f"{n['key']}: holds {n['holds']}" for n in self.not_in_class], True),
            ("ambiguous: the values cannot tell, nothing settles it", [_ambiguity(t) for t in ambiguous if not t["settled_by"]], True),
            ("ambiguous, settled by the reference", [_ambiguity(t) for t in ambiguous if t["settled_by"]], False),
            ("unused sources, as the reference expects", [f"{u['source']}: {u['unused']}" for u in self.unused_sources if u["expected"]], False),
            ("left at initialisation, as the reference expects", self.initialised, False),
        ]
        for title, items, in_full in sections:
            if items:
                out.append(f"{title} ({len(items)}):")
                out += [f"  {item}" for item in (items if in_full else _abridged(items))]
        meaning = {EXIT_OK: "everything traced and in agreement", EXIT_DISAGREES: "everything traced; some targets disagree with the reference",
                   EXIT_UNTRACED: "something untraced, or a source dropped that the reference does not expect"}
        out.append(f"exit {self.exit_code}: {meaning[self.exit_code]}")
        return out


def _ambiguity(traced: dict) -> str:
    return f"{traced['target']}: {traced['transform']} <- {', '.join(traced['sources'])}; as well: {'; '.join(traced['ambiguous_with'])}"


def _abridged(items: list[str], shown: int = 3) -> list[str]:
    return items if len(items) <= shown + 1 else items[:shown] + [f"... {len(items) - shown} more (--json lists them all)"]


# ---------------------------------------------------------------------- building the report


def build_report(
    tracer: Tracer,
    converted: MappingABC[str, Any],
    *,
    source_name: str,
    converted_name: str,
    class_keys: Sequence[str] | None,
    target_class: str | None,
    reference: Reference | None,
    renamed: MappingABC[str, str] | None = None,
) -> AuditReport:
    """``converted``: class key (or, for keys the class lacks, file key) -> array."""
    report = AuditReport(source_name, converted_name, target_class, reference.name if reference else None, renamed=dict(renamed or {}))
    known = list(class_keys) if class_keys is not None else list(converted)
    arrays = {key: to_numpy(value) for key, value in converted.items()}
    chosen: dict[str, Explanation] = {}
    maybe_used: set[str] = set()
    for key in known:
        if key not in arrays:
            _missing(report, key, reference)
            continue
        explanation, trace = _judge(report, tracer, key, arrays[key], reference)
        if explanation is not None:
            chosen[key] = explanation
        elif trace.traced:
            maybe_used.update(trace.sources)
    outside = [key for key in arrays if key not in set(known)] if class_keys is not None else []
    for key in outside:
        trace = tracer.trace(key, arrays[key])
        report.not_in_class.append({"key": key, "holds": trace.describe(), "sources": trace.sources})
    _precision(report, chosen, arrays)
    _usage(report, tracer, chosen, maybe_used, reference)
    report.mapping = _recovered(report, chosen)
    return report


def _missing(report: AuditReport, key: str, reference: Reference | None) -> None:
    if reference and key in reference.initialised:
        report.initialised.append(key)
        return
    entry = {"target": key, "reason": "not in the converted checkpoint"}
    if reference and key in reference.rules:
        entry["expected"] = describe_rule(reference.rules[key])
    report.untraced.append(entry)


def _judge(report: AuditReport, tracer: Tracer, key: str, array: np.ndarray, reference: Reference | None) -> tuple[Explanation | None, Trace]:
    """Trace the target, file it under traced / disagreements / untraced, and return the
    explanation it is taken to hold (None when it is untraced, or ambiguous with nothing to settle it)."""
    rule = reference.rules.get(key) if reference else None
    expected = Explanation(tuple(rule.sources), tuple(rule.ops)) if rule else None
    trace = tracer.trace(key, array, expected)
    if trace.agreeing is not None:  # the reference's rule gives exactly these bits
        chosen = trace.explanations[trace.agreeing]
        report.traced.append(_traced_entry(tracer, key, trace, chosen, agrees=True))
        return chosen, trace
    if not trace.traced:
        if reference and key in reference.initialised:
            report.initialised.append(key)
            return None, trace
        entry = {"target": key, "reason": trace.reason}
        if rule:
            entry["expected"] = describe_rule(rule)
        report.untraced.append(entry)
        return None, trace
    entry = _traced_entry(tracer, key, trace, trace.explanations[0], agrees=False if rule else None)
    if reference and key in reference.initialised:
        entry["note"] = "the reference expects this target to keep its initialisation"
    report.traced.append(entry)
    if rule:
        report.disagreements.append({
            "target": key,
            "holds": trace.describe(),
            "expected": describe_rule(rule),
            "holds_rules": [e.to_dict() for e in trace.explanations],
            "expected_rule": {"sources": list(rule.sources), "ops": [op.to_dict() for op in rule.ops]},
        })
    return (trace.explanations[0] if not trace.ambiguous else None), trace


def _traced_entry(tracer: Tracer, key: str, trace: Trace, chosen: Explanation, agrees: bool | None) -> dict:
    entry = {"target": key, **chosen.to_dict(), "agrees": agrees, "found_by": trace.found_by}
    others = [e.describe() for e in trace.explanations if not tracer.same(e, chosen)]
    if others:
        entry["ambiguous_with"] = others
        entry["settled_by"] = "the reference" if agrees else None
    return entry


def _precision(report: AuditReport, chosen: dict[str, Explanation], arrays: dict[str, np.ndarray]) -> None:
    """List lossy casts. The dtype most of the checkpoint's elements are stored in is its chosen
    precision (a release in bf16, norms kept in fp32 or not); a lossy cast to another dtype disagrees."""
    elements: dict[str, int] = {}
    for key in chosen:
        if value_kind(arrays[key].dtype) == "float":
            elements[arrays[key].dtype.name] = elements.get(arrays[key].dtype.name, 0) + arrays[key].size
    checkpoint_dtype = max(elements, key=elements.get) if elements else None
    already = {d["target"] for d in report.disagreements}
    for key, explanation in chosen.items():
        if not (explanation.cast and explanation.cast[2]):
            continue
        source, target, _ = explanation.cast
        report.precision_loss.append({"target": key, "from": source, "to": target})
        if target != checkpoint_dtype and key not in already:
            report.disagreements.append({
                "target": key,
                "holds": explanation.describe(),
                "expected": f"{explanation.chain} <- {', '.join(explanation.sources)} stored as {checkpoint_dtype}, as most of the checkpoint is",
                "holds_rules": [explanation.to_dict()],
                "expected_rule": None,
            })


def _usage(report: AuditReport, tracer: Tracer, chosen: dict[str, Explanation], maybe_used: set[str], reference: Reference | None) -> None:
    """Which elements of each source some target holds, and which two targets hold the same."""
    counts = {name: np.zeros(a.shape, np.uint8) for name, a in tracer.arrays.items()}
    readers: dict[str, list[str]] = {}
    for target, explanation in chosen.items():
        for source, used in _used_elements(tracer, explanation):
            counts[source] += used
            readers.setdefault(source, []).append(target)
    written_elsewhere = {}
    for entry in report.not_in_class:
        for name in entry["sources"]:
            written_elsewhere.setdefault(name, []).append(entry["key"])
    dropped = reference.dropped if reference else set()
    for name, count in counts.items():
        if name in maybe_used:
            continue
        unused = int((count == 0).sum())
        if unused:
            what = "never used" if unused == count.size else f"{unused} of its {count.size} elements never used"
            if name in written_elsewhere:
                what += f" (written only as {', '.join(written_elsewhere[name])}, which the class does not load)"
            expected = name in dropped
            report.unused_sources.append({"source": name, "unused": what, "elements": unused, "of": int(count.size), "expected": expected,
                                          "why": "declared dropped by the reference" if expected else ""})
        if (count > 1).any():
            twice = [t for t in readers[name] if any((u & (count > 1)).any() for s, u in _used_elements(tracer, chosen[t]) if s == name)]
            report.used_twice.append({"source": name, "targets": twice})


def _used_elements(tracer: Tracer, explanation: Explanation) -> Iterable[tuple[str, np.ndarray]]:
    """(source, 0/1 mask of its elements the explanation reads) per source."""
    if not any(op.selects for op in explanation.ops):  # unary chains and joins read every element
        for source in explanation.sources:
            yield source, np.ones(tracer.arrays[source].shape, np.uint8)
        return
    read = tracer.positions(explanation).reshape(-1)
    start = 0
    for source in explanation.sources:
        shape = tracer.arrays[source].shape
        mask = np.zeros(math.prod(shape), np.uint8)
        mine = read[(read >= start) & (read < start + mask.size)] - start
        mask[mine] = 1
        start += mask.size
        yield source, mask.reshape(shape)


def _recovered(report: AuditReport, chosen: dict[str, Explanation]) -> Mapping:
    rules = []
    for key, e in chosen.items():
        note = f"stored as {e.cast[1]} (source {e.cast[0]}{', precision lost' if e.cast[2] else ''})" if e.cast else None
        rules.append(Rule(key, e.sources, e.ops, note))
    dropped = [Declared(u["source"], "not used by the audited converter") for u in report.unused_sources if u["elements"] == u["of"]]
    initialised = [Declared(u["target"], "not reproduced from the source by the audited converter") for u in report.untraced]
    initialised += [Declared(k, "left at initialisation, as the reference expects") for k in report.initialised]
    meta = {"description": f"recovered by match audit from the values of {report.converted}"}
    if report.target_class:
        meta["target_class"] = report.target_class
    return Mapping(tuple(rules), tuple(dropped), tuple(initialised), meta)
