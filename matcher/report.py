"""What a run found and did, as a rich table for people and a JSON object for programs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .convert import Plan, make_plan, save_plan
from .mapping import Mapping
from .sources import open_tree
from .targets import build_target
from .tree import ParamTree


@dataclass
class RunResult:
    source: ParamTree
    target_class: str
    mapping: Mapping
    plan: Plan
    saved: Path | None = None

    @property
    def complete(self) -> bool:
        return self.plan.expansion.complete

    def to_dict(self) -> dict[str, Any]:
        expansion = self.plan.expansion
        return {
            "source": self.source.origin,
            "source_format": self.source.format,
            "target_class": self.target_class,
            "complete": self.complete,
            "saved": str(self.saved) if self.saved else None,
            "tensors": [
                {"target": rule.target, "sources": list(rule.sources), "ops": [op.to_dict() for op in rule.ops]}
                for rule in expansion.rules
            ],
            "initialised": expansion.initialised,
            "dropped": expansion.dropped,
            "unmapped_targets": expansion.unmapped_targets,
            "unused_sources": expansion.unused_sources,
            "problems": expansion.problems,
        }


def run(src, target_class: str, config, mapping_path, out=None, *, force=False, verify=True, show_progress=True) -> RunResult:
    source = open_tree(src)
    target = build_target(target_class, config)
    mapping = Mapping.load(mapping_path)
    plan = make_plan(source, target.tree, mapping)
    result = RunResult(source, target.class_name, mapping, plan)
    if out is not None and result.complete:
        with _progress(plan, enabled=show_progress) as advance:
            result.saved = save_plan(plan, source, target, mapping, out, force=force, verify=verify, progress=advance)
    return result


class _progress:
    """A rich progress bar over bytes written, on stderr, only for terminals."""

    def __init__(self, plan: Plan, enabled: bool):
        import sys

        self.total = sum(o.nbytes for o in plan.outputs)
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda output: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self.bar = Progress("writing", BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("write", total=self.total)
        return lambda output: self.bar.advance(task, output.nbytes)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _ops_text(rule) -> str:
    return " | ".join(str(op) for op in rule.ops) or "rename"


def render(result: RunResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    expansion = result.plan.expansion
    table = Table(title=f"{result.source.origin} -> {result.target_class}", show_lines=False)
    table.add_column("target")
    table.add_column("source")
    table.add_column("transform")
    for rule in expansion.rules:
        table.add_row(rule.target, "\n".join(rule.sources), _ops_text(rule))
    console.print(table)
    console.print(
        f"{len(expansion.rules)} target tensors from {len(result.source)} source tensors; "
        f"{len(expansion.initialised)} left to the model's initialisation, {len(expansion.dropped)} source tensors dropped on purpose."
    )
    for title, items in (("problems", expansion.problems), ("target tensors with no rule", expansion.unmapped_targets), ("source tensors no rule reads", expansion.unused_sources)):
        if items:
            console.print(f"[bold red]{len(items)} {title}:[/]")
            for item in items:
                console.print(f"  {item}", markup=False)
    if result.saved:
        console.print(f"saved to {result.saved} (loads with {result.target_class}.from_pretrained)")
    elif not result.complete:
        console.print("[bold red]nothing written:[/] the mapping does not account for every tensor")
