"""Interactive resolution: in a terminal, `match` asks about what it could not decide.

The checkpoint is a tiny ViTModel whose q/k/v projections are renamed w_a/w_b/w_c in a
different order per layer, so names and shapes cannot tell them apart and the right answer
differs per layer. The person at the terminal knows the truth (the tests take it from how
the checkpoint was made); the matcher only offers options and evidence.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from matcher.api import match
from matcher.cli import main
from matcher.mapping import Mapping
from matcher.patterns import template
from matcher.tree import natural_key

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
ORDERS = ["kqv", "vkq"]  # layer -> which projection w_a, w_b, w_c hold
ROOT = Path(__file__).resolve().parent.parent


def _opaque(key: str) -> str:
    """The source key holding original target ``key`` in the opaque checkpoint."""
    found = re.fullmatch(r"layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", key)
    if not found:
        return key
    layer, role, kind = int(found[1]), found[2], found[3]
    return f"layers.{layer}.attention.w_{'abc'[ORDERS[layer].index(role)]}.{kind}"


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """The original ViTModel state dict, and a directory with its opaque copy and config."""
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("opaque")
    torch.manual_seed(0)
    config = ViTConfig(**VIT)
    state = ViTModel(config).eval().state_dict()
    config.save_pretrained(root)
    torch.save({_opaque(k): v for k, v in state.items()}, root / "opaque.pt")
    return state, root


@pytest.fixture
def checkpoint(vit, tmp_path):
    """A private copy, so a mapping saved beside it stays in this test."""
    _, root = vit
    for name in ("opaque.pt", "config.json"):
        shutil.copy(root / name, tmp_path / name)
    return tmp_path / "opaque.pt"


@pytest.fixture
def terminal(monkeypatch):
    """`match` asks only when stdin is a terminal; CliRunner's stdin is not one."""
    import matcher.cli as cli

    class TerminalSys(types.ModuleType):
        stdin = types.SimpleNamespace(isatty=lambda: True)

        def __getattr__(self, name):
            return getattr(sys, name)

    monkeypatch.setattr(cli, "sys", TerminalSys("sys"))


def run(src: Path, *args, answers: list[str] = ()):
    argv = [str(src), "--target", "ViTModel", "--config", str(src.parent), *map(str, args)]
    text = "".join(a + "\n" for a in answers)
    return CliRunner().invoke(main, argv, input=text, env={"COLUMNS": "200"}, catch_exceptions=False)


def targets_asked(src: Path) -> list[list[str]]:
    """The concrete targets of each unresolved item, in the order they are asked."""
    report = match(src, "ViTModel", config=src.parent)
    keys = list(report.target.tree.keys())
    return [sorted((k for k in keys if template(u.target).match(k) is not None), key=natural_key) for u in report.unresolved]


def truthful_answers(src: Path) -> list[str]:
    """Accept the confident pairs, then for each item: per layer, the true source."""
    answers = ["y"]
    for targets in targets_asked(src):
        answers += ["p"] + [_opaque(t) for t in targets]
    return answers


def saved_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_answering_per_layer_restores_the_weights_and_the_saved_mapping_makes_the_next_run_silent(vit, checkpoint, terminal, tmp_path):
    state, _ = vit
    answers = truthful_answers(checkpoint) + [""]  # "" takes the offered mapping file beside the checkpoint
    result = run(checkpoint, "--save", tmp_path / "out", answers=answers)
    assert result.exit_code == 0, result.output
    assert "accept all 18 confident pairs?" in result.output
    assert "layers.{i}.attention.q_proj.weight" in result.output and "p = differs per layer" in result.output
    saved = saved_state(tmp_path / "out")
    assert set(saved) == set(state) and all(torch.equal(saved[k], v) for k, v in state.items())

    mapping_file = tmp_path / "opaque.mapping.yaml"
    assert f"[{mapping_file}]" in result.output, "the default mapping file is offered in the prompt"
    rules = {r.target: r for r in Mapping.load(mapping_file).rules}
    assert rules["layers.1.attention.q_proj.weight"].sources == ("layers.1.attention.w_c.weight",)
    assert rules["layers.1.attention.q_proj.weight"].note == "chosen interactively"

    again = run(checkpoint, "--mapping", mapping_file, "--yes", "--save", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert "accept all" not in again.output
    assert all(torch.equal(saved_state(tmp_path / "again")[k], v) for k, v in state.items())
    still_in_a_terminal = run(checkpoint, "--mapping", mapping_file, answers=[])  # no input: any question would abort
    assert still_in_a_terminal.exit_code == 0 and "accept all" not in still_in_a_terminal.output


def test_defaults_follow_the_evidence_answers_for_the_weights_settle_the_biases(vit, checkpoint, terminal, tmp_path):
    state, _ = vit
    answers = ["y"]
    for targets in targets_asked(checkpoint):
        # Only the q and k weights are answered; each bias follows its weight's module, and
        # v is what is left in each layer: Enter takes the offered default everywhere else.
        answers += ["p"] + [_opaque(t) for t in targets] if targets[0].endswith(("q_proj.weight", "k_proj.weight")) else [""] + [""] * len(targets)
    result = run(checkpoint, "--save", tmp_path / "out", "--mapping-out", tmp_path / "m.yaml", answers=answers)
    assert result.exit_code == 0, result.output
    assert "same module as your answer for layers.1.attention.q_proj.weight" in result.output
    assert "the only option not taken" in result.output
    assert all(torch.equal(saved_state(tmp_path / "out")[k], v) for k, v in state.items())
    assert f"written to {tmp_path / 'm.yaml'}" in result.output and (tmp_path / "m.yaml").exists()
    assert not (tmp_path / "opaque.mapping.yaml").exists(), "with --mapping-out no other file is offered"


def test_an_answer_taking_a_source_already_used_or_naming_nothing_is_refused_and_asked_again(checkpoint, terminal, tmp_path):
    answers = [
        "y",
        "9",  # q_proj.weight: there are 4 options
        "layers.{i}.attention.nothing.weight",  # not a tensor of the checkpoint
        "1",  # o_proj.weight: already the source of an accepted pair
        "layers.{i}.attention.w_a.weight",  # taken (wrong for layer 1, but consistent so far)
        "s",  # q_proj.bias
        "layers.{i}.attention.w_a.weight",  # k_proj.weight: w_a is now q's
        "s", "s", "s", "s",  # k_proj.weight, k_proj.bias, v_proj.weight, v_proj.bias
        "-",  # do not save a mapping
    ]
    result = run(checkpoint, "--save", tmp_path / "out", answers=answers)
    assert result.exit_code == 3, result.output
    refusals = [line for line in result.output.splitlines() if line.startswith("refused:")]
    assert refusals == [
        "refused: 9 is not one of the options 1-4",
        "refused: 'layers.{i}.attention.nothing.weight' is not an option number or a tensor of the checkpoint",
        "refused: layers.0.attention.o_proj.weight is already the source of layers.0.attention.o_proj.weight",
        "refused: layers.0.attention.w_a.weight is already the source of layers.0.attention.q_proj.weight",
    ]
    assert result.output.count("[1/6] layers.{i}.attention.q_proj.weight") == 4  # asked again after each refusal
    assert "still open" in result.output and not (tmp_path / "out").exists()
    assert list(tmp_path.glob("*.yaml")) == []


def test_skipping_every_question_leaves_everything_unresolved(checkpoint, terminal, tmp_path):
    result = run(checkpoint, "--save", tmp_path / "out", answers=["y"] + ["s"] * 6)
    assert result.exit_code == 3, result.output
    assert "no answers: nothing changed" in result.output and "6 unresolved" in result.output
    assert not (tmp_path / "out").exists() and list(tmp_path.glob("*.yaml")) == []


def test_declining_the_confident_pairs_asks_nothing_more(checkpoint, terminal):
    result = run(checkpoint, answers=["n"])
    assert result.exit_code == 3
    assert "nothing pinned" in result.output and "[1/6]" not in result.output


def test_yes_and_json_never_ask(checkpoint, terminal):
    assert "accept all" not in run(checkpoint, "--yes").output
    assert run(checkpoint, "--json").exit_code == 3


def test_running_out_of_input_is_an_interruption_and_writes_nothing(checkpoint, terminal, tmp_path):
    result = run(checkpoint, "--save", tmp_path / "out", answers=["y", "p"])
    assert result.exit_code == 130 and not (tmp_path / "out").exists()


def test_an_orientation_answer_chooses_the_chain_with_or_without_the_transpose(tmp_path, terminal):
    """Square matrices named ``kernel`` with no non-square kernel to learn a layout from: the
    matcher asks 'as is' or 'transposed' for each. Answering 'transposed' for the pooler reads
    its kernel transposed; the rest as is restores the model."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(**dict(VIT, intermediate_size=VIT["hidden_size"]))
    state = ViTModel(config).eval().state_dict()
    config.save_pretrained(tmp_path)
    kernels = {(k.removesuffix("weight") + "kernel" if v.ndim == 2 else k): v for k, v in state.items()}
    torch.save(kernels, tmp_path / "kernels.pt")
    report = match(tmp_path / "kernels.pt", "ViTModel", config=tmp_path)
    assert {u.reason for u in report.unresolved} == {"square matrix and no layout convention for 'kernel' tensors"}
    answers = ["y"] + [u.options[0].sources[0] + (" transposed" if u.target.startswith("pooler") else " as is") for u in report.unresolved]
    result = run(tmp_path / "kernels.pt", "--save", tmp_path / "out", "--mapping-out", tmp_path / "m.yaml", answers=answers)
    assert result.exit_code == 0, result.output
    saved = saved_state(tmp_path / "out")
    assert torch.equal(saved["pooler.dense.weight"], state["pooler.dense.weight"].T)
    assert all(torch.equal(saved[k], v) for k, v in state.items() if k != "pooler.dense.weight")
    pooler = next(r for r in Mapping.load(tmp_path / "m.yaml").rules if r.target == "pooler.dense.weight")
    assert [op.to_dict() for op in pooler.ops] == [{"transpose": [1, 0]}]


def test_parts_of_a_fused_target_are_asked_one_by_one_and_concatenated(tmp_path):
    """SigLIP with opaque q/k/v everywhere, including the MAP head whose target fuses them
    (``in_proj_weight``): every part is its own question, the answers become one concat rule,
    and the result equals the known mapping laid over the renamed checkpoint."""
    from tests.fixtures import make_siglip
    from tests.matching import harness as h

    from matcher.interactive import resolve_interactively
    from matcher.sources import open_tree

    source = open_tree(make_siglip.DEMO_DIR / "siglip_tiny.npz")
    variant = h.opaque_qkv(source, Mapping.load(ROOT / "known_mappings" / "siglip.yaml"), seed=0)
    report = match(variant.tree, "SiglipModel", config=make_siglip.DEMO_DIR / "siglip_tiny_config.json")
    target_keys = list(report.target.tree.keys())
    truth = {r.target: r.sources for r in variant.known.expand(variant.tree.keys(), target_keys).rules}
    answers = ["y"]
    for item in report.unresolved:
        targets = sorted((k for k in target_keys if template(item.target).match(k) is not None), key=natural_key)
        if item.part:
            answers.append(truth[targets[0]][("query", "key", "value").index(item.part)])
        else:
            answers += ["p"] + [truth[t][0] for t in targets]
    assert any(item.part for item in report.unresolved)
    with CliRunner().isolation(input="".join(a + "\n" for a in answers)):
        resolved = resolve_interactively(report, tmp_path / "m.yaml")
    assert resolved.complete
    assert h.equivalent(resolved.mapping, variant.known, variant.tree, report.target.tree).exact
    in_proj = next(r for r in resolved.mapping.rules if r.target == "vision_model.head.attention.in_proj_weight")
    assert len(in_proj.sources) == 3 and in_proj.ops[-1].to_dict() == {"concat": 0}


# ---------------------------------------------------------------------- a real terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
QUESTION = re.compile(r"\[\d+/\d+\](?:\.\d+)? (\S+)")


def converse(argv: list[str], reply, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal; whenever it waits at a prompt (the screen ends with
    ': '), send ``reply(new screen text)``. Returns the exit code and everything shown."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    screen, seen = "", 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += ANSI.sub("", chunk.decode(errors="replace")).replace("\r", "")
            if screen.endswith(": ") and len(screen) > seen:
                os.write(master, (reply(screen[seen:]) + "\r").encode())
                seen = len(screen)
        else:
            process.kill()
        return process.wait(timeout=30), screen
    finally:
        os.close(master)


def test_in_a_real_terminal_the_questions_are_answered_from_what_the_screen_shows(vit, checkpoint, tmp_path):
    state, _ = vit

    def reply(new_text: str) -> str:
        if "accept all" in new_text:
            return "y"
        if "save these decisions" in new_text:
            return ""
        asked = QUESTION.findall(new_text)[-1]
        return "p" if "{i}" in asked else _opaque(asked)

    code, screen = converse([str(ROOT / ".venv" / "bin" / "match"), str(checkpoint), "--target", "ViTModel", "--config", str(checkpoint.parent), "--save", str(tmp_path / "out")], reply)
    assert code == 0, screen[-3000:]
    assert "[6/6].2 layers.1.attention.v_proj.bias" in screen
    assert all(torch.equal(saved_state(tmp_path / "out")[k], v) for k, v in state.items())
    assert (tmp_path / "opaque.mapping.yaml").exists()
