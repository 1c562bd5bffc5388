"""Starter files from a mapping: ``emit(report_or_mapping, fmt) -> str``.

Each format is one module registered here by name:

- ``yaml``: the mapping format, templated per layer, with a header saying what it was made from;
- ``python``: a standalone converter script (numpy, safetensors and the source format's loader;
  no matcher) whose output equals ``match --save``'s model.safetensors bit for bit;
- ``transformers``: a transformers v5 conversion-mapping snippet (``WeightRenaming`` /
  ``WeightConverter`` with ``Chunk``, ``Concatenate``, ``Transpose`` and a few extra ops).

The input is a ``MatchReport`` (inferred or pinned: it carries the source tree, the target class
and its config) or a plain ``Mapping`` (known or audited: the emitters then use what the mapping's
own metadata says, and the python script reads any supported checkpoint format).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import MatcherError
from ..mapping import Mapping
from ..tree import ParamTree
from .templating import templated

# format name -> module that registers it (imported on first use: the transformers emitter is heavy)
_MODULES = {"yaml": "yaml_mapping", "python": "python_script", "transformers": "transformers_snippet"}
EMITTERS: dict[str, Callable[["Subject"], str]] = {}


def register(fmt: str):
    def decorate(function: Callable[["Subject"], str]) -> Callable[["Subject"], str]:
        if fmt in EMITTERS:
            raise ValueError(f"emitter {fmt!r} registered twice")
        EMITTERS[fmt] = function
        return function

    return decorate


@dataclass(frozen=True)
class Subject:
    """What an emitter works from: the mapping (templated per layer) and whatever is known around it."""

    mapping: Mapping
    target_class: str | None = None
    config: Any = None  # a transformers config object, when the report has one
    source: ParamTree | None = None  # shapes, dtypes, format and origin of the checkpoint
    missing: tuple[str, ...] = ()  # what the mapping does not decide yet, one line each
    made_from: str = ""  # one line for headers: where the mapping came from
    options: dict = field(default_factory=dict)

    @property
    def source_format(self) -> str | None:
        return self.options.get("source_format") or (self.source.format if self.source is not None else None)


def emit(report_or_mapping: Any, fmt: str, **options: Any) -> str:
    """The text of a starter file in format ``fmt`` for a MatchReport or a Mapping.

    ``options``: ``source_format`` (a reader name: npz, torch, flax_msgpack, safetensors,
    directory) for a plain mapping's python script; ``config`` (a transformers config) to
    make the script write config.json too.
    """
    if fmt not in _MODULES:
        raise MatcherError(f"unknown emit format {fmt!r}; known: {', '.join(_MODULES)}")
    if fmt not in EMITTERS:
        importlib.import_module(f"{__name__}.{_MODULES[fmt]}")
    return EMITTERS[fmt](subject(report_or_mapping, **options))


def subject(report_or_mapping: Any, **options: Any) -> Subject:
    if isinstance(report_or_mapping, Mapping):
        mapping = report_or_mapping
        return Subject(
            templated(mapping),
            target_class=mapping.meta.get("target_class"),
            config=options.pop("config", None),
            made_from=_describe_mapping(mapping),
            options=options,
        )
    if not hasattr(report_or_mapping, "mapping"):
        raise MatcherError(f"emit takes a MatchReport or a Mapping, not {type(report_or_mapping).__name__}")
    report = report_or_mapping
    source, target = report.source, report.target
    mapping = templated(report.mapping, source.keys() if source is not None else None)
    meta = dict(mapping.meta)
    if target is not None:
        meta.setdefault("target_class", target.class_name)
    if source is not None:
        meta.setdefault("source_format", source.format)
    return Subject(
        Mapping(mapping.rules, mapping.dropped, mapping.initialised, meta),
        target_class=target.class_name if target is not None else None,
        config=options.pop("config", None) or (target.config if target is not None else None),
        source=source,
        missing=_missing(report),
        made_from=_describe_report(report),
        options=options,
    )


def _describe_mapping(mapping: Mapping) -> str:
    what = mapping.meta.get("family") or mapping.meta.get("description", "a mapping").split("\n")[0]
    return f"the mapping {what!r} ({len(mapping.rules)} rules)"


def _describe_report(report: Any) -> str:
    source = report.source
    origin = f"{source.origin} ({source.format}, {len(source)} tensors)" if source is not None else "a checkpoint"
    state = "complete" if report.complete else "INCOMPLETE"
    return f"{origin}: {len(report.mapping.rules)} rules, {state}"


MISSING_SHOWN = 20  # per kind: a checkpoint full of optimizer state would bury the rest


def _missing(report: Any) -> tuple[str, ...]:
    lines = [f"unresolved {u.target}: {u.reason}" + (f" (candidates: {', '.join(u.candidates)})" if u.candidates else "") for u in report.unresolved]
    for what, keys in (("no source for target", report.unmatched_targets), ("no target for source", report.unused_sources)):
        lines += [f"{what} {key}" for key in keys[:MISSING_SHOWN]]
        if len(keys) > MISSING_SHOWN:
            lines.append(f"... {len(keys) - MISSING_SHOWN} more with {what} (match --json lists them all)")
    return tuple(lines)
