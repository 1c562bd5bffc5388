"""Apply a mapping: plan from shapes, then stream one rule at a time into the output."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MappingError, MatcherError
from .grouping import groups_sharing
from .mapping import ExpandedRule, Expansion, Mapping
from .ops import apply_chain, chain_output_shape
from .tree import ParamTree
from .writer import OutputTensor, atomic_directory, parse_size, write_model


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


def produce(plan: Plan, source: ParamTree | "Producer", output: OutputTensor) -> Any:
    rule = plan.by_target[output.name]
    return apply_chain(rule.ops, [source.read(s) for s in rule.sources])


def production_order(plan: Plan) -> list[OutputTensor]:
    """The plan's outputs with those that share a source next to each other (q, k and v cut from
    one fused tensor; the layers of a scanned stack), so that each source is read once and held
    only while its outputs are produced. Otherwise the plan's order."""
    groups = groups_sharing(plan.outputs, lambda output: plan.by_target[output.name].sources)
    return [output for group in groups for output in group]


PREFETCH_BYTES = 64 * 2**20  # source bytes read ahead of the output being produced


class Producer:
    """Produces the plan's outputs in ``order``, reading each source once: a source read for one
    output is kept until the last output (in that order) that uses it.

    With ``prefetch``, sources are read by one background thread in the order they will be
    needed, up to ``PREFETCH_BYTES`` ahead, so that reading (and checking) the next sources
    overlaps transposing and writing the current output. Every read happens on that thread;
    ``close`` stops it."""

    def __init__(self, plan: Plan, source: ParamTree, order: list[OutputTensor], prefetch: bool = False):
        self.plan, self.source = plan, source
        self.remaining = Counter(s for output in order for s in plan.by_target[output.name].sources)
        self.cache: dict[str, Any] = {}
        self.sequence = list(dict.fromkeys(s for output in order for s in plan.by_target[output.name].sources))
        self.next = 0
        self.ahead: dict[str, Any] = {}  # source -> Future
        self.ahead_bytes = 0
        self.executor = None
        if prefetch:
            from concurrent.futures import ThreadPoolExecutor

            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matcher-reader")

    def _read_ahead(self) -> None:
        while self.executor is not None and self.next < len(self.sequence) and (not self.ahead or self.ahead_bytes < PREFETCH_BYTES):
            name = self.sequence[self.next]
            self.next += 1
            if name not in self.cache:
                self.ahead[name] = self.executor.submit(self.source.read, name)
                self.ahead_bytes += self.source[name].nbytes

    def _fetch(self, name: str) -> Any:
        if name in self.cache:
            return self.cache[name]
        self._read_ahead()
        future = self.ahead.pop(name, None)
        if future is None:
            if self.executor is not None:  # only if asked out of the planned order: read on the reader thread all the same
                return self.executor.submit(self.source.read, name).result()
            return self.source.read(name)
        self.ahead_bytes -= self.source[name].nbytes
        return future.result()

    def read(self, name: str) -> Any:
        """One source's data (the tree's ``read``), kept while later outputs still need it."""
        array = self._fetch(name)
        self.remaining[name] -= 1
        if self.remaining[name] > 0:
            self.cache[name] = array
        else:
            self.cache.pop(name, None)
        return array

    def __call__(self, output: OutputTensor) -> Any:
        result = produce(self.plan, self, output)  # self stands in for the tree: its reads go through the cache
        self._read_ahead()
        return result

    def close(self) -> None:
        """Stop reading ahead: reads not started are cancelled, a running one is waited for."""
        if self.executor is not None:
            for future in self.ahead.values():
                future.cancel()
            self.ahead.clear()
            self.executor.shutdown(wait=True)
            self.executor = None


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
    shard_size: int | str | None = None,
) -> Path:
    """Convert ``source`` with ``mapping`` into a ``from_pretrained``-loadable directory ``out``
    (weights in shards of at most ``shard_size`` bytes, default 5 GB, when they do not fit one)."""
    from .targets import build_target

    source_tree = _as_tree(source)
    mapping_obj = _as_mapping(mapping)
    target = build_target(target_class, config)
    plan = make_plan(source_tree, target.tree, mapping_obj)
    require_complete(plan)
    return save_plan(plan, source_tree, target, mapping_obj, out, force=force, verify=verify, progress=progress, shard_size=shard_size)


def save_plan(plan: Plan, source: ParamTree, target: Any, mapping: Mapping, out: str | os.PathLike, *,
              force: bool = False, verify: bool = True, progress: Callable[[OutputTensor], None] | None = None,
              shard_size: int | str | None = None) -> Path:
    """Write a complete plan into ``out`` atomically: config.json, model.safetensors (or shards of
    at most ``shard_size`` bytes and model.safetensors.index.json), mapping.yaml."""
    require_complete(plan)
    out = Path(out)
    max_shard_size = parse_size(shard_size) if shard_size is not None else None
    try:
        return _write_directory(plan, source, target, mapping, out, force, verify, progress, max_shard_size)
    except OSError as exc:  # full disk, permissions, a vanished directory: the temporary output is already gone
        raise MatcherError(f"cannot write the output: {exc.strerror or exc}", path=str(out)) from exc


def _write_directory(plan, source, target, mapping, out: Path, force, verify, progress, max_shard_size) -> Path:
    with atomic_directory(out, force=force) as tmp:
        target.config.to_json_file(str(tmp / "config.json"))
        order = production_order(plan)
        producer = Producer(plan, source, order, prefetch=True)
        try:
            write_model(
                tmp,
                plan.outputs,
                producer,
                max_shard_size=max_shard_size,
                metadata={"format": "pt", "converted_by": "matcher"},
                progress=progress,
                order=order,
            )
        finally:
            producer.close()
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
