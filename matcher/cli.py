"""The ``match`` command: parse options, call the library, turn its errors into exit codes."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_UNRESOLVED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

KNOWN_MAPPINGS = Path(__file__).resolve().parent.parent / "known_mappings"

EPILOG = f"""\b
Exit codes:
  0  converted (or checked) completely
  1  bad input: unreadable checkpoint, unknown class, bad config or mapping file
  2  usage error
  3  the mapping leaves target or source tensors unaccounted for (nothing written)
  130 interrupted (nothing written)

\b
Examples:
  match siglip.npz --target SiglipModel --config cfg.json --mapping siglip --save out/
  match vit.pth --target ViTModel --config cfg.json --mapping my.yaml --json
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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--target", "target_class", required=True, metavar="CLASS", help="transformers model class to convert into, e.g. SiglipModel.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="PATH", help="Target config: a config.json file or a directory holding one.")
@click.option("--mapping", "mapping_name", metavar="FILE|NAME", help="Mapping to apply: a YAML/JSON file, or the name of a known mapping (e.g. siglip, clip, vit).")
@click.option("--save", "out", type=click.Path(path_type=Path), metavar="OUT", help="Write OUT/ (config.json, model.safetensors, mapping.yaml), loadable with CLASS.from_pretrained(OUT).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (otherwise an existing OUT is an error).")
@click.option("--no-verify", is_flag=True, help="Skip loading the written model back with from_pretrained.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report instead of the table.")
@click.option("--mapping-out", type=click.Path(path_type=Path), metavar="FILE", help="Also write the mapping used to FILE (.yaml or .json).")
def main(src, target_class, config_path, mapping_name, out, force, no_verify, as_json, mapping_out):
    """Convert the checkpoint SRC into the transformers class CLASS.

    SRC may be an .npz (big_vision), a PyTorch .pt/.pth/.bin, a flax msgpack checkpoint,
    a .safetensors file or a save_pretrained directory; the format is detected from the
    file's content. The mapping says which target tensor comes from which source
    tensor(s) and through which ops; every source and target tensor must be accounted
    for, or nothing is written.
    """
    from . import report
    from .errors import MatcherError

    if mapping_name is None:
        raise click.UsageError("--mapping is required: automatic matching is not available yet (known mappings: "
                               + ", ".join(sorted(p.stem for p in KNOWN_MAPPINGS.glob("*.yaml"))) + ")")
    if config_path is None:
        raise click.UsageError("--config is required: inferring the target config from the checkpoint is not available yet")
    mapping_path = _resolve_mapping(mapping_name)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = report.run(src, target_class, config_path, mapping_path, out, force=force, verify=not no_verify, show_progress=not as_json)
        if mapping_out:
            result.mapping.save(mapping_out)
    except MatcherError as exc:
        click.echo(f"error: {exc.line()}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        report.render(result)
    sys.exit(EXIT_OK if result.complete else EXIT_UNRESOLVED)


if __name__ == "__main__":  # pragma: no cover
    main()
