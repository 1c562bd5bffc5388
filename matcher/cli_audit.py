"""``match audit``: recover the mapping an existing converter applied, from the values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli import EXIT_BAD_INPUT, _resolve_mapping, main

AUDIT_EPILOG = """\b
Exit codes:
  0  every target tensor traced and in agreement with the reference mapping
  4  every target tensor traced, but at least one holds something else than the reference says
  3  something untraceable (a target no source reproduces, or one the converter did not write),
     or a source tensor dropped that the reference does not declare dropped
  1  bad input: unreadable checkpoint, unknown class, bad config, mapping or converter (one line on stderr)
  2  usage error

\b
The reference is the mapping `match SRC --target CLASS` infers (config from --config, else
CONVERTED/config.json, else inferred from SRC), with the rules of --mapping pinned. A lossy
dtype cast (fp32 stored as fp16) is listed as precision loss; it disagrees only when it casts
to another dtype than most of the converted checkpoint is stored in.

\b
Examples:
  match audit siglip.npz hf_out/ --target SiglipModel             # audit a save_pretrained directory
  match audit vit.pth hf_out/ --target ViTModel --mapping vit_base # ... against a known mapping
  match audit siglip.npz --converter convert.py:convert_state_dict --target SiglipModel --json
"""


@main.command("audit", context_settings={"help_option_names": ["-h", "--help"]}, epilog=AUDIT_EPILOG,
              short_help="Recover the mapping an existing converter applied, from the values.")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("converted", required=False, type=click.Path(path_type=Path))
@click.option("--target", "target_class", metavar="CLASS",
              help="transformers class the conversion is for (needed with CONVERTED): its keys name the targets, legacy file names are renamed as from_pretrained does, and the mapping match infers for it is the reference.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="PATH", help="Target config (config.json or a directory holding one). Default: CONVERTED/config.json if there is one, else inferred from SRC.")
@click.option("--mapping", "mapping_name", metavar="FILE|NAME", help="Rules to hold the converter against (a mapping file or a known mapping name); match infers the rest.")
@click.option("--converter", metavar="SCRIPT.py:FUNCTION",
              help="Audit a converter function instead of a converted checkpoint: it is called with a flat dict of arrays shaped like SRC's tensors, every element holding a different value, and must return a flat dict of arrays.")
@click.option("--converter-arrays", type=click.Choice(["numpy", "torch"]), default="numpy", show_default=True, help="What the converter is given: numpy arrays or torch tensors.")
@click.option("--allow-drop", multiple=True, metavar="PATTERN", help="Source tensors matching PATTERN may go unused (repeatable; '*' and '{i}' allowed).")
@click.option("--allow-init", multiple=True, metavar="PATTERN", help="Target parameters matching PATTERN may be left at initialisation (repeatable).")
@click.option("--mapping-out", type=click.Path(path_type=Path), metavar="FILE", help="Write the recovered mapping (one rule per traced target) to FILE (.yaml or .json).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object (lists traced, disagreements, untraced, unused_sources, ...).")
def audit_command(src, converted, target_class, config_path, mapping_name, converter, converter_arrays, allow_drop, allow_init, mapping_out, as_json):
    """Trace every tensor of CONVERTED (or of what --converter writes) back to SRC.

    Each converted tensor is traced, bit for bit, to the source tensor(s) and op chain that
    reproduce it: rename, transpose, conv permutation, merged or split head axes, squeeze,
    a chunk of a fused tensor, a layer of a scanned stack, a concat or stack of several, and a
    dtype cast. Candidates come from value fingerprints (sorted-value digests, the sources
    holding a value) and are confirmed by running the ops, never guessed: tensors the values
    cannot tell apart are reported as ambiguous. The report lists every disagreement with the
    reference mapping (which target, what it holds, what it should hold), targets nothing
    reproduces, source tensors never used, and elements two targets both read.
    """
    from .errors import MatcherError

    if (converted is None) == (converter is None):
        raise click.UsageError("give CONVERTED or --converter (one of them)")
    if converted is not None and not target_class:
        raise click.UsageError("auditing CONVERTED needs --target CLASS")
    mapping_path = _resolve_mapping(mapping_name) if mapping_name else None
    try:
        from .audit import audit

        report = audit(src, converted, target_class=target_class, config=config_path, mapping=mapping_path,
                       converter=converter, converter_arrays=converter_arrays, allow_drop=allow_drop, allow_init=allow_init)
        if mapping_out and report.mapping is not None:
            try:
                report.mapping.save(mapping_out)
            except OSError as exc:
                raise MatcherError(f"cannot write the mapping: {exc.strerror or exc}", path=str(mapping_out)) from exc
    except MatcherError as exc:
        click.echo(f"error: {exc.line()}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(report.lines()))
    sys.exit(report.exit_code)
