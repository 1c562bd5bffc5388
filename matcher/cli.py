"""The ``match`` command: parse options, call the library, turn its errors into exit codes."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_UNRESOLVED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

KNOWN_MAPPINGS = Path(__file__).resolve().parent.parent / "known_mappings"

EPILOG = """\b
Exit codes:
  0  complete: every source and target tensor is accounted for (and OUT written with --save)
  1  bad input: unreadable checkpoint, unknown class, bad config or mapping file (one line on stderr)
  2  usage error
  3  unresolved or unmatched tensors remain (listed; nothing written unless --allow-partial)
  130 interrupted (nothing written)

\b
Examples:
  match siglip.npz --target SiglipModel                      # infer config and mapping, show the table
  match siglip.npz --target SiglipModel --save out/          # ... and write out/ for from_pretrained
  match vit.pth --target ViTModel --config cfg.json --json   # machine-readable report
  match ckpt.pt --target CLIPModel --mapping clip --save out # apply a known mapping (pins its rules)
"""


def _resolve_mapping(value: str) -> Path:
    path = Path(value)
    if path.exists():
        return path
    known = KNOWN_MAPPINGS / f"{value}.yaml"
    if known.exists():
        return known
    names = ", ".join(sorted(p.stem for p in KNOWN_MAPPINGS.glob("*.yaml"))) or "none found"
    raise click.BadParameter(f"{value!r} is neither a file nor a known mapping (known: {names})", param_hint="--mapping")


def _shard_size(value: str | None) -> int | None:
    if value is None:
        return None
    from .errors import MatcherError
    from .writer import parse_size

    try:
        return parse_size(value)
    except MatcherError as exc:
        raise click.BadParameter(exc.message, param_hint="--shard-size") from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class DefaultGroup(click.Group):
    """``match SRC ...`` runs the ``convert`` command; ``match audit ...`` and other
    subcommands are named first. ``match --help`` shows convert's help and the others."""

    default = "convert"

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = [self.default, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        command = self.commands[self.default]
        with click.Context(command, info_name=ctx.info_name, parent=None) as sub:
            command.format_help(sub, formatter)
        others = [(name, cmd.get_short_help_str(70)) for name, cmd in self.commands.items() if name != self.default]
        if others:
            with formatter.section("Other commands (match COMMAND --help)"):
                formatter.write_dl(others)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Convert checkpoints between frameworks by inferring the mapping."""


@main.command("convert", context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--target", "target_class", required=True, metavar="CLASS", help="transformers model class to convert into, e.g. SiglipModel.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="PATH",
              help="Target config (config.json or a directory holding one). Default: inferred from the checkpoint's shapes; the report says which fields were inferred and which defaulted.")
@click.option("--mapping", "mapping_name", metavar="FILE|NAME",
              help="Rules to pin: a YAML/JSON mapping file or a known mapping name (siglip, clip, vit, ...). The matcher infers whatever the file leaves open; its dropped/initialised declarations are honoured.")
@click.option("--save", "out", type=click.Path(path_type=Path), metavar="OUT",
              help="Write OUT/ (config.json, model.safetensors or shards, see --shard-size, mapping.yaml), loadable with CLASS.from_pretrained(OUT). Written to a temporary directory and renamed when complete.")
@click.option("--allow-drop", multiple=True, metavar="PATTERN",
              help="Source tensors matching PATTERN may stay unused (repeatable; '*' and '{i}' allowed), e.g. 'optimizer/*'.")
@click.option("--allow-init", multiple=True, metavar="PATTERN",
              help="Target parameters matching PATTERN may keep the model's initialisation (repeatable), e.g. 'pooler.*'.")
@click.option("--mapping-out", type=click.Path(path_type=Path), metavar="FILE", help="Write the mapping (inferred and pinned rules) to FILE (.yaml or .json), complete or not.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report instead of the table.")
@click.option("--yes", "-y", is_flag=True, help="Never ask questions (also the behaviour when stdin is not a terminal); unresolved items give exit 3.")
@click.option("--allow-partial", is_flag=True, help="With --save, write what is decided even if items remain unresolved (exit code is still 3).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (otherwise an existing OUT is an error).")
@click.option("--no-verify", is_flag=True, help="Skip loading the written model back with from_pretrained.")
@click.option("--shard-size", metavar="SIZE", callback=lambda ctx, param, value: _shard_size(value),
              help="With --save, split the weights into model-0000i-of-0000N.safetensors files of at most SIZE (e.g. 5GB, 500MB, 2GiB, or bytes) plus model.safetensors.index.json, as save_pretrained does. Default 5GB; a model that fits is one model.safetensors.")
@click.option("--source-model", metavar="SPEC",
              help="The original implementation, to settle ambiguities and check the result numerically: 'timm:MODEL', 'open_clip:CONFIG', 'path/to/file.py:factory' or 'package.module:factory', each optionally followed by '?key=value&...' keyword arguments (timm ViT kwargs are read off the checkpoint when not given). Built locally and loaded from SRC; nothing is downloaded. Both models run on the same synthetic input; the first diverging module is reported and keeps the run incomplete (exit 3).")
@click.option("--emit", "emit_format", type=click.Choice(["yaml", "python", "transformers"]),
              help="Write a starter file from the mapping: yaml (the mapping format, templated per layer), python (a standalone converter script), transformers (a conversion-mapping snippet). Needs --emit-out.")
@click.option("--emit-out", type=click.Path(path_type=Path), metavar="FILE", help="Where --emit writes.")
def convert_command(src, target_class, config_path, mapping_name, out, allow_drop, allow_init, mapping_out, as_json, yes, allow_partial, force, no_verify, shard_size, source_model, emit_format, emit_out):
    """Convert the checkpoint SRC into the transformers class CLASS, inferring the mapping.

    SRC may be a big_vision .npz, a PyTorch .pt/.pth/.bin, a flax msgpack checkpoint, a
    .safetensors file or a save_pretrained directory; the format is detected from the
    content. The matcher pairs every target parameter with its source tensor(s) and the
    ops between them (rename, transpose, conv layout, head reshapes, q/k/v split and
    concat) from shapes, names and structure, and prints each pair with its confidence.
    Anything it cannot decide is listed, never guessed; every source and target tensor is
    accounted for before anything is written.
    """
    from .errors import MatcherError

    if (emit_format is None) != (emit_out is None):
        raise click.UsageError("--emit and --emit-out go together")
    mapping_path = _resolve_mapping(mapping_name) if mapping_name else None
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        from . import report as reporting
        from .api import match, save

        result = match(src, target_class, config=config_path, mapping=mapping_path, allow_drop=allow_drop, allow_init=allow_init)
        if source_model:
            from .verify import check_with_source_model

            result = check_with_source_model(result, source_model)
        if result.unresolved and not (yes or as_json) and sys.stdin.isatty():
            from .interactive import resolve_interactively

            result = resolve_interactively(result, mapping_out)
        if mapping_out:
            result.mapping.save(mapping_out)
        if emit_format:
            from .emit import emit

            emit_out.write_text(emit(result, emit_format))
        saved = None
        if out is not None and (result.complete or allow_partial):
            from .convert import make_plan

            total = sum(o.nbytes for o in make_plan(result.source, result.target.tree, result.mapping).outputs)
            with reporting.progress_bar(total, enabled=not as_json) as advance:
                saved = save(result, out, force=force, verify=not no_verify, allow_partial=allow_partial, progress=advance, shard_size=shard_size)
    except MatcherError as exc:
        click.echo(f"error: {exc.line()}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(reporting.to_json(result, str(saved) if saved else None), indent=2))
    else:
        reporting.render(result, str(saved) if saved else None)
    sys.exit(EXIT_OK if result.complete else EXIT_UNRESOLVED)


from . import cli_audit  # noqa: E402,F401  (registers match audit)


if __name__ == "__main__":  # pragma: no cover
    main()
