"""The Python API, mirroring the CLI: ``match(source, target_class, config=None, mapping=None)``."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import MatcherError
from .mapping import Declared, Mapping
from .solve import Decision, MatchReport, Unresolved, match_trees
from .tree import ParamTree


def _source_tree(source: Any) -> ParamTree:
    if isinstance(source, ParamTree):
        return source
    from .sources import open_tree

    return open_tree(source)


def _mapping(mapping: Any) -> Mapping | None:
    if mapping is None or isinstance(mapping, Mapping):
        return mapping
    return Mapping.load(mapping)


def match(
    source: str | os.PathLike | ParamTree,
    target_class: str | type,
    config: Any = None,
    mapping: Mapping | str | os.PathLike | None = None,
    allow_drop: Sequence[str] = (),
    allow_init: Sequence[str] = (),
) -> MatchReport:
    """Infer the mapping from ``source`` to ``target_class``.

    ``config``: a config object, a config.json path or a directory; when None it is
    inferred from the source's shapes and ``report.config_fields`` says how.
    ``mapping``: rules to pin; the matcher infers the rest. Its ``dropped`` and
    ``initialised`` declarations are honoured.
    ``allow_drop`` / ``allow_init``: patterns (``*`` and ``{i}`` allowed) of source tensors
    that may go unused and target parameters that may keep their initialisation; anything
    else left over keeps the report incomplete.
    """
    from .targets import build_target, resolve_class

    tree = _source_tree(source)
    model_class = resolve_class(target_class) if isinstance(target_class, str) else target_class
    config_fields: list[Any] = []
    if config is None:
        from .config_infer import infer_config

        inferred = infer_config(model_class, tree)
        config, config_fields = inferred.config, inferred.fields
    target = build_target(model_class, config)
    pinned = _mapping(mapping)
    report = _match_with_pins(tree, target.tree, pinned) if pinned else match_trees(tree, target.tree)
    report.source, report.target, report.config_fields = tree, target, config_fields
    report = allow_leftovers(report, allow_drop, allow_init)
    if not config_fields and not report.complete:
        _check_config_against_checkpoint(model_class, target.config, tree, config, report, allow_drop, allow_init)
    return report


def _config_value(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _leftovers(report: MatchReport) -> int:
    return len(report.unmatched_targets) + len(report.unused_sources) + len(report.unresolved)


def _check_config_against_checkpoint(model_class: type, config: Any, tree: ParamTree, given: Any, report: MatchReport,
                                     allow_drop: Sequence[str] = (), allow_init: Sequence[str] = ()) -> None:
    """When a given config leaves tensors unmatched (beyond what the user allowed) and a config
    inferred from the checkpoint fits it better, say which fields of the given config the
    checkpoint contradicts."""
    from .config_infer import infer_config
    from .errors import TargetError
    from .targets import build_target

    try:
        inferred = infer_config(model_class, tree)
        alternative = allow_leftovers(match_trees(tree, build_target(model_class, inferred.config).tree), allow_drop, allow_init)
    except MatcherError:
        return  # no better explanation than the report itself
    if _leftovers(alternative) >= _leftovers(report):
        return
    contradictions = [
        (f.path, _config_value(config, f.path), f.value)
        for f in inferred.fields
        if f.how == "inferred" and f.shape_determining and _config_value(config, f.path) not in (None, f.value)
    ]
    if contradictions:
        where = str(given) if isinstance(given, (str, os.PathLike)) else "the config"
        text = "; ".join(f"{path} is {mine} in the config but the checkpoint says {theirs}" for path, mine, theirs in contradictions[:4])
        raise TargetError(f"config contradicts the checkpoint: {text}", path=where)


def allow_leftovers(report: MatchReport, allow_drop: Sequence[str] = (), allow_init: Sequence[str] = ()) -> MatchReport:
    """Declare the unused sources and unmatched targets that the given patterns name."""
    drop = [Declared(p, "allowed by --allow-drop") for p in allow_drop]
    init = [Declared(p, "allowed by --allow-init") for p in allow_init]
    dropped = [k for k in report.unused_sources if any(d.matches(k) for d in drop)]
    initialised = [k for k in report.unmatched_targets if any(d.matches(k) for d in init)]
    if not dropped and not initialised:
        return report
    used_drop = tuple(d for d in drop if any(d.matches(k) for k in dropped))
    used_init = tuple(d for d in init if any(d.matches(k) for k in initialised))
    mapping = replace(report.mapping, dropped=report.mapping.dropped + used_drop, initialised=report.mapping.initialised + used_init)
    return replace(
        report,
        mapping=mapping,
        unused_sources=[k for k in report.unused_sources if k not in set(dropped)],
        unmatched_targets=[k for k in report.unmatched_targets if k not in set(initialised)],
        dropped=report.dropped + dropped,
        initialised=report.initialised + initialised,
    )


def _subtree(tree: ParamTree, keep: set[str]) -> ParamTree:
    return ParamTree({k: s for k, s in tree.specs.items() if k in keep}, tree.loader, tree.origin, tree.format, tree.info)


def _match_with_pins(source: ParamTree, target: ParamTree, pinned: Mapping) -> MatchReport:
    """Pinned rules first; the matcher solves what they leave; declarations are honoured."""
    expansion = pinned.expand(source.keys(), target.keys())
    read = {s for rule in expansion.rules for s in rule.sources} | set(expansion.dropped)
    written = {rule.target for rule in expansion.rules} | set(expansion.initialised)
    rest_source = _subtree(source, set(source.keys()) - read)
    rest_target = _subtree(target, set(target.keys()) - written)
    inferred = match_trees(rest_source, rest_target)
    pinned_targets = {rule.target for rule in pinned.rules}
    decisions = [Decision(rule, 1.0, ["given in the mapping file"]) for rule in pinned.rules]
    decisions += [d for d in inferred.decisions if d.rule.target not in pinned_targets]
    unresolved = [Unresolved(p.split(":")[0], [], p.split(":", 1)[-1].strip()) for p in expansion.problems]
    mapping = Mapping(
        tuple(d.rule for d in decisions),
        dropped=pinned.dropped,
        initialised=pinned.initialised,
        meta=dict(pinned.meta, description=pinned.meta.get("description", "given rules completed by matcher")),
    )
    return replace(
        inferred,
        mapping=mapping,
        decisions=decisions,
        unresolved=unresolved + inferred.unresolved,
        dropped=list(expansion.dropped),
        initialised=list(expansion.initialised),
    )


def save(
    report: MatchReport,
    out: str | os.PathLike,
    *,
    force: bool = False,
    verify: bool = True,
    allow_partial: bool = False,
    progress: Callable | None = None,
    shard_size: int | str | None = None,
) -> Path:
    """Write ``report``'s mapping applied to its source as a from_pretrained-loadable directory
    (weights in shards of at most ``shard_size`` bytes, e.g. ``"5GB"``, the default, when they
    do not fit one file)."""
    from .convert import make_plan, save_plan

    if report.source is None or report.target is None:
        raise MatcherError("this report has no source or target attached; use matcher.match()")
    mapping = report.mapping
    if not report.complete:
        if not allow_partial:
            raise MatcherError("the mapping is incomplete (unresolved or unmatched tensors); nothing written")
        expansion = mapping.expand(report.source.keys(), report.target.tree.keys())
        mapping = replace(
            mapping,
            dropped=mapping.dropped + tuple(Declared(k, "not used (partial save)") for k in expansion.unused_sources),
            initialised=mapping.initialised + tuple(Declared(k, "not written (partial save)") for k in expansion.unmapped_targets),
        )
    plan = make_plan(report.source, report.target.tree, mapping)
    return save_plan(plan, report.source, report.target, mapping, out, force=force, verify=verify, progress=progress, shard_size=shard_size)

