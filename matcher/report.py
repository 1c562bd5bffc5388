"""Showing a MatchReport: a rich table for people, a JSON object for programs, a progress bar."""

from __future__ import annotations

import sys
from typing import Any

from .solve import MatchReport


def to_json(report: MatchReport, saved: str | None = None) -> dict[str, Any]:
    data = report.to_dict()
    data = {
        "source": report.source.origin if report.source else None,
        "source_format": report.source.format if report.source else None,
        "target_class": report.target.class_name if report.target else None,
        **data,
        "config": [_field_dict(f) for f in report.config_fields],
        "saved": saved,
    }
    return data


def _field_dict(field: Any) -> dict:
    return {"field": field.path, "value": field.value, "how": field.how, "evidence": field.evidence}


class progress_bar:
    """A rich progress bar over bytes written, on stderr, only for terminals."""

    def __init__(self, total_bytes: int, enabled: bool = True):
        self.total = total_bytes
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


def render(report: MatchReport, saved: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"{report.source.origin if report.source else 'source'} -> {report.target.class_name if report.target else 'target'}"
    table = Table(title=title)
    for column in ("target", "source", "transform"):
        table.add_column(column, overflow="fold")
    table.add_column("confidence", justify="right")
    for decision in report.decisions:
        rule = decision.rule
        table.add_row(rule.target, "\n".join(rule.sources), " | ".join(map(str, rule.ops)) or "rename", f"{decision.confidence:.2f}")
    console.print(table)
    for tower in report.towers:
        if "layers" in tower:
            which = f": {layer_ranges(tower['indices'])}" if "indices" in tower else ""
            console.print(f"block {tower['source']} -> {tower['target']} ({tower['layers']} layers{which}{', scanned' if tower['stacked'] else ''})", markup=False)
    inferred = [f for f in report.config_fields if f.how == "inferred"]
    if report.config_fields:
        console.print(
            f"config: {len(inferred)} fields inferred from shapes ("
            + ", ".join(f"{f.path}={f.value}" for f in inferred)
            + f"); {len(report.config_fields) - len(inferred)} left at defaults",
            markup=False,
        )
        assumed = [f for f in report.config_fields if f.how != "inferred"]
        if assumed:
            console.print(
                "assumptions (not visible in the weights; pass --config to set them): "
                + ", ".join(f"{f.path}={f.value}" for f in assumed[:12])
                + (f", ... ({len(assumed) - 12} more)" if len(assumed) > 12 else ""),
                markup=False,
            )
    console.print(f"{len(report.decisions)} rules; layout conventions: "
                  + (", ".join(f"{k}: {'transpose' if v else 'as is'}" for k, v in sorted(report.conventions.items())) or "none needed"),
                  markup=False)
    numeric = report.numeric
    if numeric:
        first = numeric.get("first_divergence")
        console.print(
            f"numeric check against {numeric['source_model']}: {numeric.get('status')}; {len(numeric['settled'])} item(s) settled, "
            f"{numeric['compared']} module pairs compared"
            + (f"; first divergence {first['target_module']} ~ {first['source_module']} ({first['max_abs_diff']:.3g})" if first else ""),
            markup=False,
        )
        for entry in numeric["settled"]:
            console.print(f"  settled {entry['targets'][0]} ...: {entry['evidence']}", markup=False)
    if report.dropped or report.initialised:
        console.print(f"{len(report.dropped)} source tensors dropped and {len(report.initialised)} target parameters left to initialisation, as declared")
    if report.unresolved:
        console.print(f"[bold red]{len(report.unresolved)} unresolved:[/]")
        for item in report.unresolved:
            console.print(f"  {item.target}: {item.reason}", markup=False)
            for candidate in item.candidates:
                console.print(f"      candidate: {candidate}", markup=False)
    for title, items in (("target tensors with no source", report.unmatched_targets), ("source tensors with no target", report.unused_sources)):
        if items:
            console.print(f"[bold red]{len(items)} {title}:[/]")
            for item in items[:50]:
                console.print(f"  {item}", markup=False)
            if len(items) > 50:
                console.print(f"  ... and {len(items) - 50} more")
    if saved:
        console.print(f"saved to {saved} (loads with {report.target.class_name}.from_pretrained)", markup=False)
    elif not report.complete:
        console.print("[bold red]not complete:[/] nothing written (see above; --allow-partial writes what is decided)")
    else:
        console.print("complete: every source and target tensor is accounted for")


def layer_ranges(indices) -> str:
    """``[0, 1, 4, 6, 7, 8]`` as ``0-1, 4, 6-8``: which layers a block of a kind holds."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
