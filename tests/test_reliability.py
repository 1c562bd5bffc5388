"""Every bad input we tried, and what `match` does with it.

Each case is run through the CLI as a user would; the README's reliability table is
rendered from this list (``python -m tests.test_reliability`` prints it) and a test
checks the README still says exactly that.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


@dataclass
class Case:
    name: str  # the bad input, as a user would describe it
    observed: str  # what match does, as the README says it
    exit_code: int
    message: str  # a fragment the output must contain
    make: Callable[["Base", Path], list[str]]  # builds the input, returns the CLI arguments
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    writes: bool = False  # whether OUT is expected afterwards
    tags: list[str] = field(default_factory=list)


@dataclass
class Base:
    """A tiny timm ViT checkpoint with its ViTForImageClassification config."""

    source: Path
    config: Path
    root: Path
    headless: Path  # the same ViT saved without a classifier head


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _args(base: Base, source, *extra, target="ViTForImageClassification", config=True) -> list[str]:
    args = [str(source), "--target", target]
    if config:
        args += ["--config", str(base.config)]
    return args + [str(e) for e in extra]


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(base: Base, tmp: Path) -> list[str]:
    path = tmp / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": _Payload(str(tmp / "pwned"))}, handle, protocol=2)
    return _args(base, path)


def _truncated(suffix: str, writer) -> Callable[[Base, Path], list[str]]:
    def make(base: Base, tmp: Path) -> list[str]:
        path = tmp / f"model{suffix}"
        writer(path)
        data = path.read_bytes()
        return _args(base, _write(path, data[: len(data) // 2]))

    return make


def _npz(path: Path) -> None:
    np.savez(path, a=np.ones((64, 64), np.float32), b=np.zeros(128, np.float32))


def _safetensors(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"a": np.ones((64, 64), np.float32)}, str(path))


def _torch(path: Path) -> None:
    torch.save({"a": torch.ones(64, 64)}, path)


def _huge_header(base: Base, tmp: Path) -> list[str]:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, 1 << 40]}}).encode()
    return _args(base, _write(tmp / "huge.safetensors", len(header).to_bytes(8, "little") + header + b"\0" * 1024))


def _config_edit(**changes) -> Callable[[Base, Path], list[str]]:
    def make(base: Base, tmp: Path) -> list[str]:
        data = json.loads(base.config.read_text())
        data.update(changes)
        path = _write(tmp / "config.json", json.dumps(data).encode())
        return [str(base.source), "--target", "ViTForImageClassification", "--config", str(path)]

    return make


def _extra_source_tensor(base: Base, tmp: Path, allow: bool = False) -> list[str]:
    state = torch.load(base.source, weights_only=True)
    state["fc_norm.weight"] = torch.ones(state["norm.weight"].shape)
    torch.save(state, tmp / "with_fc_norm.pt")
    extra = ["--allow-drop", "fc_norm.*"] if allow else []
    return _args(base, tmp / "with_fc_norm.pt", "--save", tmp / "out", *extra)


def _fail_on_third_tensor(exc: BaseException) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        import matcher.convert as convert_module

        original = convert_module.produce
        calls = {"n": 0}

        def produce(plan, source, output):
            calls["n"] += 1
            if calls["n"] == 3:
                if isinstance(exc, type(signal.SIGTERM)):
                    os.kill(os.getpid(), exc)
                else:
                    raise exc
            return original(plan, source, output)

        monkeypatch.setattr(convert_module, "produce", produce)

    return patch


def _save(base: Base, tmp: Path) -> list[str]:
    return _args(base, base.source, "--save", tmp / "out")


CASES = [
    Case("empty file", "exit 1: `<file>: empty file`", 1, "empty file", lambda b, t: _args(b, _write(t / "empty.pt", b""))),
    Case("wrong magic (text file)", "exit 1: unrecognised format, lists the known ones", 1, "unrecognised checkpoint format",
         lambda b, t: _args(b, _write(t / "notes.pt", b"these are not weights\n"))),
    Case("truncated npz", "exit 1: names the file, not a readable npz", 1, "npz", _truncated(".npz", _npz)),
    Case("truncated safetensors", "exit 1: data section shorter than the header says", 1, "safetensors", _truncated(".safetensors", _safetensors)),
    Case("truncated .pt", "exit 1: cannot load the PyTorch checkpoint", 1, "PyTorch checkpoint", _truncated(".pt", _torch)),
    Case("pickle whose `__reduce__` would create a file", "exit 1: refused by `weights_only`; the file is never created", 1, "refused", _evil_pickle),
    Case("npz holding a pickled object array", "exit 1: pickled objects are not loaded", 1, "pickled objects",
         lambda b, t: _args(b, t / "objects.npz") if np.savez(t / "objects.npz", w=np.array([{"a": 1}], dtype=object)) is None else []),
    Case("safetensors header claiming a 1 TB tensor in a 1 KB file", "exit 1 before any allocation", 1, "do not fit the file", _huge_header),
    Case("directory without weights", "exit 1: directory holds no weights", 1, "holds no weights", lambda b, t: _args(b, t)),
    Case("missing file", "exit 1: no such file or directory", 1, "no such file", lambda b, t: _args(b, t / "nope.npz")),
    Case("unknown target class `ViTForImageClasification`", "exit 1: suggests the closest class names", 1, "did you mean ViTForImageClassification",
         lambda b, t: _args(b, b.source, target="ViTForImageClasification")),
    Case("config that is not JSON", "exit 1: config is not valid JSON", 1, "not valid JSON",
         lambda b, t: [str(b.source), "--target", "ViTForImageClassification", "--config", str(_write(t / "c.json", b"{oops"))]),
    Case("config for another model type", "exit 1: names both model types", 1, "model_type 'bert'", _config_edit(model_type="bert")),
    Case("config contradicting the checkpoint (hidden size, layers)", "exit 1: names each field with both values", 1,
         "hidden_size is 48 in the config but the checkpoint says 32", _config_edit(hidden_size=48, num_hidden_layers=3)),
    Case("config contradicting the checkpoint (patch size)", "exit 1: names the field with both values", 1,
         "patch_size is 4 in the config but the checkpoint says 8", _config_edit(patch_size=4)),
    Case("mapping file that is not YAML", "exit 1: not valid YAML", 1, "not valid YAML",
         lambda b, t: _args(b, b.source, "--mapping", _write(t / "m.yaml", b"rules: [unclosed"))),
    Case("source tensor with no target (timm `fc_norm`)", "exit 3: listed as a source tensor with no target; nothing written", 3, "fc_norm.weight",
         _extra_source_tensor),
    Case("... the same with `--allow-drop 'fc_norm.*'`", "exit 0: written, the drop recorded in the mapping", 0, "saved to",
         lambda b, t: _extra_source_tensor(b, t, allow=True), writes=True),
    Case("target parameter with no source (ViTModel's pooler from a headless timm ViT)", "exit 3: listed as a target tensor with no source; nothing written", 3,
         "pooler.dense.weight", lambda b, t: _args(b, b.headless, "--save", t / "out", target="ViTModel", config=False)),
    Case("... the same with `--allow-init 'pooler.*'`", "exit 0: written; the pooler keeps its initialisation", 0, "saved to",
         lambda b, t: _args(b, b.headless, "--save", t / "out", "--allow-init", "pooler.*", target="ViTModel", config=False), writes=True),
    Case("classifier checkpoint into a model without a head (timm ViT -> ViTModel)", "exit 3: `head.*` listed as unused, pooler as unmatched; never paired with each other", 3,
         "head.weight", lambda b, t: _args(b, b.source, "--save", t / "out", target="ViTModel", config=False)),
    Case("existing OUT without `--force`", "exit 1: output already exists; OUT untouched", 1, "already exists",
         lambda b, t: (t / "out").mkdir() or _save(b, t), writes=True),
    Case("disk full while writing OUT", "exit 1: cannot write the output; no OUT, no temporary files", 1, "No space left on device",
         _save, patch=_fail_on_third_tensor(OSError(errno.ENOSPC, "No space left on device"))),
    Case("Ctrl-C (SIGINT) while writing OUT", "exit 130: nothing written, no temporary files", 130, "nothing was written",
         _save, patch=_fail_on_third_tensor(KeyboardInterrupt())),
    Case("SIGTERM while writing OUT", "exit 130: nothing written, no temporary files", 130, "nothing was written",
         _save, patch=_fail_on_third_tensor(signal.SIGTERM)),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    from tests.fixtures import make_vit

    root = tmp_path_factory.mktemp("reliability")
    info = make_vit.make(root / "fixture")
    return Base(Path(info["source"]), Path(info["config"]), root, Path(info["variants"]["vit_headless"]["source"]))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from click.testing import CliRunner

    from matcher.cli import main

    args = case.make(base, tmp_path)
    if case.patch:
        case.patch(monkeypatch)
    before = set(os.listdir(tmp_path))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == case.exit_code, result.output
    assert case.message in result.output, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError, AttributeError, KeyError))
    if case.exit_code in (1, 130):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, no traceback
    leftovers = [name for name in set(os.listdir(tmp_path)) - before if name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    out = tmp_path / "out"
    if not case.writes:
        assert not out.exists()
    assert not (tmp_path / "pwned").exists()


def table() -> str:
    rows = ["| bad input | what `match` does |", "|---|---|"]
    rows += [f"| {case.name} | {case.observed} |" for case in CASES]
    return "\n".join(rows)


def test_readme_table_is_this_list():
    text = README.read_text()
    assert START in text and END in text, "README lacks the reliability table markers"
    between = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert between == table(), "README reliability table is stale: run `python -m tests.test_reliability` and paste"


if __name__ == "__main__":
    print(table())
