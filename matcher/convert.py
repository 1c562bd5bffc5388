"""Apply a mapping: plan from shapes, then stream one rule at a time into the output."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MappingError, MatcherError
from .mapping import ExpandedRule, Expansion, Mapping
from .ops import apply_chain, chain_output_shape
from .tree import ParamTree
from .writer import OutputTensor, atomic_directory, write_safetensors


@dataclass
class Plan:
    """A mapping bound to a source and a target tree, with every output's shape and dtype."""

    expansion: Expansion
    outputs: list[OutputTensor] = field(default_factory=list)
    by_target: dict[str, ExpandedRule] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return self.expansion.problems


def make_plan(source: ParamTree, target: ParamTree, mapping: Mapping) -> Plan:
    """Lay the mapping over both trees and check every output shape against the target."""
    expansion = mapping.expand(source.keys(), target.keys())
    plan = Plan(expansion)
    for rule in expansion.rules:
        shapes = [source[s].shape for s in rule.sources]
        try:
            shape = chain_output_shape(rule.ops, shapes)
        except MappingError as exc:
            expansion.problems.append(f"{rule.target}: {exc.message} (sources {', '.join(rule.sources)})")
            continue
        expected = target[rule.target].shape
        if shape != expected:
            expansion.problems.append(f"{rule.target}: the rule gives shape {shape}, the target needs {expected}")
            continue
        dtypes = {source[s].dtype for s in rule.sources}
        if len(dtypes) != 1:
            expansion.problems.append(f"{rule.target}: sources mix dtypes {sorted(dtypes)}")
            continue
        plan.outputs.append(OutputTensor(rule.target, shape, dtypes.pop()))
        plan.by_target[rule.target] = rule
    return plan


def require_complete(plan: Plan, mapping_name: str = "the mapping") -> None:
    if not plan.expansion.complete:
        raise MatcherError(f"{mapping_name} does not fit: {plan.expansion.summary()}")


def produce(plan: Plan, source: ParamTree, output: OutputTensor) -> Any:
    rule = plan.by_target[output.name]
    return apply_chain(rule.ops, [source.read(s) for s in rule.sources])


def convert_arrays(source: ParamTree, target: ParamTree, mapping: Mapping) -> dict[str, Any]:
    """Apply ``mapping`` in memory; raises MatcherError unless it fits both trees exactly."""
    plan = make_plan(source, target, mapping)
    require_complete(plan)
    return {output.name: produce(plan, source, output) for output in plan.outputs}


def _as_tree(source: Any) -> ParamTree:
    if isinstance(source, ParamTree):
        return source
    from .sources import open_tree

    return open_tree(source)


def _as_mapping(mapping: Any) -> Mapping:
    return mapping if isinstance(mapping, Mapping) else Mapping.load(mapping)


def convert(
    source: str | os.PathLike | ParamTree,
    target_class: str | type,
    config: Any,
    mapping: Mapping | str | os.PathLike,
    out: str | os.PathLike,
    force: bool = False,
    verify: bool = True,
    progress: Callable[[OutputTensor], None] | None = None,
) -> Path:
    """Convert ``source`` with ``mapping`` into a ``from_pretrained``-loadable directory ``out``."""
    from .targets import build_target

    source_tree = _as_tree(source)
    mapping_obj = _as_mapping(mapping)
    target = build_target(target_class, config)
    plan = make_plan(source_tree, target.tree, mapping_obj)
    require_complete(plan)
    return save_plan(plan, source_tree, target, mapping_obj, out, force=force, verify=verify, progress=progress)


def save_plan(plan: Plan, source: ParamTree, target: Any, mapping: Mapping, out: str | os.PathLike, *,
              force: bool = False, verify: bool = True, progress: Callable[[OutputTensor], None] | None = None) -> Path:
    """Write a complete plan into ``out`` atomically: config.json, model.safetensors, mapping.yaml."""
    require_complete(plan)
    out = Path(out)
    try:
        return _write_directory(plan, source, target, mapping, out, force, verify, progress)
    except OSError as exc:  # full disk, permissions, a vanished directory: the temporary output is already gone
        raise MatcherError(f"cannot write the output: {exc.strerror or exc}", path=str(out)) from exc


def _write_directory(plan, source, target, mapping, out: Path, force, verify, progress) -> Path:
    with atomic_directory(out, force=force) as tmp:
        target.config.to_json_file(str(tmp / "config.json"))
        write_safetensors(
            tmp / "model.safetensors",
            plan.outputs,
            lambda output: produce(plan, source, output),
            metadata={"format": "pt", "converted_by": "matcher"},
            progress=progress,
        )
        mapping.save(tmp / "mapping.yaml")
        if verify:
            verify_loadable(target.model_class, tmp, allowed_missing=set(plan.expansion.initialised))
    return out


def verify_loadable(model_class: type, directory: Path, allowed_missing: set[str]) -> None:
    """Load the written directory with ``from_pretrained`` and fail on any key it did not take."""
    import logging

    from .targets import import_transformers

    transformers = import_transformers()
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        _, info = model_class.from_pretrained(str(directory), output_loading_info=True)
    except Exception as exc:  # whatever from_pretrained raises means the output is not loadable
        raise MatcherError(f"the written model does not load with {model_class.__name__}.from_pretrained: {str(exc).splitlines()[0]}") from exc
    finally:
        transformers.logging.set_verbosity(previous)
    missing = set(info.get("missing_keys", ())) - allowed_missing
    unexpected = set(info.get("unexpected_keys", ()))
    mismatched = info.get("mismatched_keys", ())
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{title}: {', '.join(sorted(map(str, keys))[:5])}"
            for title, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
            if keys
        )
        raise MatcherError(f"{model_class.__name__}.from_pretrained did not take the written weights cleanly ({detail})")
