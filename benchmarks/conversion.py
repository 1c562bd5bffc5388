"""Conversion throughput and memory: matcher against a plain copy and against the seed-style path.

Two real-size fp32 checkpoints are generated (deterministic random values):

- ``siglip.npz``: a big_vision SigLIP base-patch16-224 checkpoint (about 813 MB; the layout of
  ``tests/fixtures/make_siglip.big_vision_shapes``, i.e. the reverse of known_mappings/siglip.yaml);
- ``clip.pt``: ``torch.save`` of an OpenAI CLIP ViT-B/16 state dict (about 599 MB; the shapes
  of ``clip.model.CLIP`` with OpenAI's ViT-B/16 arguments).

Each is then converted, every measurement in a fresh subprocess that first imports everything
the measured paths import (numpy, torch, safetensors, transformers and the target class,
matcher), then resets its peak RSS (``/proc/self/clear_refs``) and starts the clock; the memory
figure is the peak RSS the work added over the RSS after the imports:

- ``matcher``: ``matcher.convert.convert(SRC, CLASS, CONFIG, MAPPING, OUT, verify=False)``;
- ``match CLI``: ``match SRC --target CLASS --config CONFIG --mapping NAME --save OUT --no-verify --yes --json``
  run in the child after the imports (so it also runs the matcher over the pinned mapping and
  renders the report);
- ``copy``: ``safetensors.torch.load_file`` + ``save_file`` of matcher's output: the bytes
  moved by any converter, with no renaming or transposing;
- ``seed-style``: what the reference converters do: load every array (``np.load`` /
  ``torch.load``), rename and transpose in memory (``tests/fixtures/seed_converters.py``), build
  the model, ``load_state_dict``, ``save_pretrained``.

Goals (issue 8): matcher's time <= 1.25 x the copy's (>= 0.8 x its speed), and the peak RSS
the conversion adds <= the largest tensor + 300 MB. The outputs of matcher and of the
seed-style path are compared tensor by tensor (they must be equal).

Times are medians over ``--repeat`` runs of each measurement, interleaved; the machine's page
cache state matters (the first run after generating the files is often slower for every
path), and so does anything else running on the same cores.

    .venv/bin/python benchmarks/conversion.py            # real size (about 3.5 GB under /tmp, removed afterwards)
    .venv/bin/python benchmarks/conversion.py --small    # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import processes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MB = 1 << 20
MARK = "@@conversion-bench "

# SigLIP base-patch16-224 (google/siglip-base-patch16-224): both towers 768 wide, 12 layers, 12 heads.
SIGLIP_SIZES = {
    "full": dict(hidden=768, intermediate=3072, heads=12, layers=12, image=224, patch=16, vocab=32000, text_len=64),
    "small": dict(hidden=256, intermediate=1024, heads=4, layers=4, image=224, patch=16, vocab=8000, text_len=64),
}
# OpenAI CLIP ViT-B/16 (clip.model.CLIP arguments, as clip.model.build_model reads them off the released file).
CLIP_SIZES = {
    "full": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12),
    "small": dict(embed_dim=256, image_resolution=224, vision_layers=4, vision_width=256, vision_patch_size=16,
                  context_length=77, vocab_size=8000, transformer_width=256, transformer_heads=4, transformer_layers=4),
}
SOURCES = {
    "siglip": dict(file="siglip.npz", target="SiglipModel", mapping="siglip", label="SigLIP-B/16 big_vision .npz"),
    "clip": dict(file="clip.pt", target="CLIPModel", mapping="clip", label="OpenAI CLIP-B/16 .pt"),
}


# ----------------------------------------------------------------------------- checkpoints


def _shim() -> None:
    sys.path.insert(0, str(ROOT))
    from matcher.compat import install_torchvision_shim

    install_torchvision_shim()


def make_siglip(directory: Path, size: str) -> None:
    import numpy as np

    from tests.fixtures import make_siglip as fixture

    s = SIGLIP_SIZES[size]
    tower = dict(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                 num_attention_heads=s["heads"], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    from transformers import SiglipConfig

    config = SiglipConfig(
        text_config=dict(tower, vocab_size=s["vocab"], max_position_embeddings=s["text_len"], pad_token_id=1,
                         bos_token_id=s["vocab"] - 2, eos_token_id=s["vocab"] - 1),
        vision_config=dict(tower, image_size=s["image"], patch_size=s["patch"], num_channels=3),
    )
    config.architectures = ["SiglipModel"]
    config.save_pretrained(directory / "siglip_config")
    rng = np.random.default_rng(8)
    shapes = fixture.big_vision_shapes(config)

    def arrays():
        for key, shape in shapes.items():
            yield key, (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    fixture.write_npz(directory / "siglip.npz", _LazyDict(shapes, arrays))


class _LazyDict:
    """``items()`` producing one array at a time (write_npz only iterates)."""

    def __init__(self, shapes, items):
        self.shapes, self._items = shapes, items

    def items(self):
        return self._items()


def make_clip(directory: Path, size: str) -> None:
    import numpy as np
    import torch
    from clip.model import CLIP

    from tests.fixtures import make_clip as fixture

    hparams = CLIP_SIZES[size]
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in CLIP(**hparams).state_dict().items()}
    rng = np.random.default_rng(9)
    state = {key: torch.from_numpy(np.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))) for key, shape in shapes.items()}
    torch.save(state, directory / "clip.pt")
    fixture.target_config(hparams).save_pretrained(directory / "clip_config")


def ensure_checkpoints(work: Path, size: str) -> None:
    stamp = work / f"generated-{size}.json"
    if stamp.exists():
        return
    _shim()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    make_siglip(work, size)
    make_clip(work, size)
    stamp.write_text(json.dumps({"size": size}))
    print(f"generated {size} checkpoints in {time.perf_counter() - started:.1f} s under {work}", file=sys.stderr)


# ----------------------------------------------------------------------------- child processes


def _import_all(target: str):
    """Every module any measured path imports, before the clock starts."""
    _shim()
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import matcher.convert  # noqa: F401
    import matcher.sources  # noqa: F401
    import tests.fixtures.seed_converters  # noqa: F401
    from matcher.targets import resolve_class

    return resolve_class(target)


def _import_cli(target: str):
    """What ``match`` has imported by the time it starts converting."""
    _shim()
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import matcher.api  # noqa: F401
    import matcher.cli  # noqa: F401
    import matcher.convert  # noqa: F401
    import matcher.report  # noqa: F401
    import matcher.solve  # noqa: F401
    import matcher.sources  # noqa: F401
    from matcher.targets import resolve_class

    return resolve_class(target)


def _largest_tensor(path: Path) -> int:
    from matcher.sources import open_tree

    return max(spec.nbytes for spec in open_tree(path).specs.values())


def _seed_style(name: str, source: Path, config_dir: Path, out: Path, model_class) -> None:
    import numpy as np
    import torch

    from tests.fixtures import seed_converters

    if name == "siglip":
        flat = dict(np.load(source))  # seed 000: every array in memory
        state = seed_converters.siglip(flat)
    else:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
        state = seed_converters.clip({key: value.numpy() for key, value in loaded.items()})
    config = model_class.config_class.from_pretrained(config_dir)
    model = model_class(config).eval()
    model.load_state_dict({key: torch.from_numpy(np.asarray(value)) for key, value in state.items()}, strict=True)
    model.save_pretrained(out)


def child(spec: dict) -> None:
    model_class = (_import_cli if spec["kind"] == "cli" else _import_all)(spec["target"])
    kind, out = spec["kind"], Path(spec.get("out", "")) if spec.get("out") else None
    import gc

    gc.collect()
    resident_before = _reset_peak_rss()
    started = time.perf_counter()
    if kind == "matcher":
        from matcher.convert import convert

        convert(spec["source"], model_class, spec["config"], ROOT / "known_mappings" / f"{spec['mapping']}.yaml", out, force=True, verify=False)
    elif kind == "copy":
        from safetensors.torch import load_file, save_file

        out.mkdir(parents=True, exist_ok=True)
        tensors = load_file(spec["source"])
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    elif kind == "cli":  # the command in this process, timed from here (interpreter start-up and imports excluded)
        from matcher.cli import main

        args = [spec["source"], "--target", spec["target"], "--config", spec["config"], "--mapping", spec["mapping"],
                "--save", str(out), "--no-verify", "--yes", "--json", "--force"]
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            try:
                main.main(args=args, prog_name="match", standalone_mode=False)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise
    elif kind == "seed":
        _seed_style(spec["name"], Path(spec["source"]), Path(spec["config"]), out, model_class)
    else:
        raise SystemExit(f"unknown kind {kind}")
    seconds = time.perf_counter() - started
    growth = _status_kb("VmHWM") * 1024 - resident_before if resident_before is not None else None
    print(MARK + json.dumps({"seconds": seconds, "growth": growth}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak_rss() -> int | None:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes; None
    where Linux's ``clear_refs`` is not available. The peak after the work, minus this, is what
    the work itself added (ru_maxrss alone would also hold the imports' transient peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def run_process(argv: list[str]) -> dict:
    """Run ``argv``; its wall time, ru_maxrss (bytes) and the JSON its last stdout line holds (if any)."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    run = processes.run_process(argv, env, cwd=ROOT)
    if run["code"] != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({run['code']}):\n{run['stderr'][-3000:]}")
    text = run["stdout"]
    result = {"wall": run["wall"], "rss": run["rss"]}
    lines = [line[len(MARK):] for line in text.splitlines() if line.startswith(MARK)]
    if lines:
        result.update(json.loads(lines[-1]))
    return result


def measure(kind: str, name: str, work: Path, out: Path | None = None, source: Path | None = None) -> dict:
    info = SOURCES[name]
    spec = {
        "kind": kind, "name": name, "target": info["target"], "mapping": info["mapping"],
        "source": str(source or work / info["file"]), "config": str(work / f"{name}_config"),
        "out": str(out) if out else "",
    }
    if out is not None and out.exists():
        shutil.rmtree(out)
    os.sync()  # the previous run's dirty pages are not this run's writeback
    return run_process([PYTHON, str(Path(__file__).resolve()), "--child", json.dumps(spec)])


# ----------------------------------------------------------------------------- report


def same_tensors(a: Path, b: Path) -> str:
    """'equal' when two save_pretrained directories hold the same tensors, else what differs."""
    from matcher.sources import open_tree

    left, right = open_tree(a), open_tree(b)
    if set(left.keys()) != set(right.keys()):
        only = sorted(set(left.keys()) ^ set(right.keys()))
        return f"different keys ({len(only)}: {', '.join(only[:3])}...)"
    import numpy as np

    differing = [key for key in left.keys() if not np.array_equal(left.read(key), right.read(key))]
    return "equal" if not differing else f"{len(differing)} tensors differ ({', '.join(differing[:3])}...)"


def run(work: Path, size: str, repeat: int) -> list[dict]:
    ensure_checkpoints(work, size)
    rows = []
    for name, info in SOURCES.items():
        source = work / info["file"]
        converted = work / f"{name}_matcher"
        runs: dict[str, list[dict]] = {k: [] for k in ("matcher", "cli", "copy", "seed")}
        for _ in range(repeat):
            runs["matcher"].append(measure("matcher", name, work, converted))
            runs["cli"].append(measure("cli", name, work, work / f"{name}_cli"))
            runs["copy"].append(measure("copy", name, work, work / f"{name}_copy", source=converted / "model.safetensors"))
            runs["seed"].append(measure("seed", name, work, work / f"{name}_seed"))
        _shim()
        largest = _largest_tensor(source)
        agreement = same_tensors(converted, work / f"{name}_seed")
        copy_seconds = statistics.median(r["seconds"] for r in runs["copy"])
        for kind, label in (("matcher", "matcher convert()"), ("cli", "match CLI --no-verify"), ("copy", "copy (load_file + save_file)"),
                            ("seed", "seed-style (load all, load_state_dict, save_pretrained)")):
            seconds = statistics.median(r["seconds"] for r in runs[kind])
            growths = [r["growth"] for r in runs[kind] if r.get("growth") is not None]
            rows.append({
                "source": info["label"], "source_mb": source.stat().st_size / MB, "path": label, "kind": kind,
                "seconds": seconds, "ratio": seconds / copy_seconds, "largest_mb": largest / MB,
                "rss_goal_mb": largest / MB + 300, "growth_mb": max(growths) / MB if growths else None,
                "runs": runs[kind], "matcher_equals_seed": agreement,
            })
    return rows


def render(rows: list[dict], repeat: int) -> str:
    lines = [
        f"median of {repeat} run(s), every run a fresh process, timed after its imports. Peak RSS added by the work: the "
        "process's peak RSS (VmHWM, reset through /proc/self/clear_refs once the imports are done) minus its RSS at that "
        "point, max over runs (a plain ru_maxrss would also hold the imports' own transient peak, which hides a few hundred MB).",
        "",
        "| source | path | time (s) | time / copy | peak RSS added by the work (MB) | largest tensor (MB) | RSS goal (MB) | goals |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        goals = ""
        if row["kind"] in ("matcher", "cli"):
            time_ok = row["ratio"] <= 1.25
            rss_ok = row["growth_mb"] is not None and row["growth_mb"] <= row["rss_goal_mb"]
            goals = f"time {'met' if time_ok else 'MISSED'}, RSS {'met' if rss_ok else 'MISSED'}"
        lines.append(
            f"| {row['source']} ({row['source_mb']:.0f} MB) | {row['path']} | {row['seconds']:.2f} | {row['ratio']:.2f}x | "
            f"{(row['growth_mb'] if row['growth_mb'] is not None else float('nan')):.0f} | {row['largest_mb']:.0f} | {row['rss_goal_mb']:.0f} | {goals} |"
        )
    lines += ["", "goal: matcher time <= 1.25 x copy time (>= 0.8 x the copy's speed); peak RSS added <= largest tensor + 300 MB"]
    for source in dict.fromkeys(row["source"] for row in rows):
        agreement = next(row["matcher_equals_seed"] for row in rows if row["source"] == source)
        lines.append(f"{source}: matcher's output and the seed-style output: {agreement}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small checkpoints (a few MB): a quick smoke run")
    parser.add_argument("--work", type=Path, help="where checkpoints and outputs go (default: a temporary directory under /tmp, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep --work (reused by the next run: the checkpoints are generated once)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement, the median is reported (default 3, 1 with --small)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.child:
        child(json.loads(args.child))
        return 0
    size = "small" if args.small else "full"
    repeat = args.repeat or (1 if args.small else 3)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"matcher-bench-conversion-{size}-", dir="/tmp"))
    try:
        rows = run(work, size, repeat)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(render(rows, repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
