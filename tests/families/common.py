"""What every family test shares: the module fixtures it starts from (the generated checkpoint, the
known mapping, the checkpoint's tree, the meta-device target, the converted directory) and the
checks its proof is made of (clean loading, output comparison, the bit-exact round trip, mutants)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping as MappingType

import numpy as np
import pytest
import torch

from matcher.convert import convert, convert_arrays
from matcher.errors import MatcherError
from matcher.mapping import Mapping
from matcher.ops import apply_chain
from matcher.sources import open_tree
from matcher.targets import build_target
from matcher.tree import ParamTree

KNOWN = Path(__file__).resolve().parents[2] / "known_mappings"
TOLERANCE = 1e-5

Outputs = dict[str, torch.Tensor]
Check = Callable[[dict[str, torch.Tensor]], str | None]  # why a converted state dict is wrong, or None


# ---------------------------------------------------------------------------- module fixtures


def family_fixtures(make: Callable[[Path], dict], mapping_path: Path, target_class: str):
    """(fixture, mapping, source_tree, target, converted_dir) pytest fixtures; assign them to those
    names in the test module. converted_dir is the fixture converted to disk with the mapping."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        return make(tmp_path_factory.mktemp(mapping_path.stem))

    @pytest.fixture(scope="module")
    def mapping():
        return Mapping.load(mapping_path)

    @pytest.fixture(scope="module")
    def source_tree(fixture):
        return open_tree(fixture["source"])

    @pytest.fixture(scope="module")
    def target(fixture):
        return build_target(target_class, fixture["config"])

    @pytest.fixture(scope="module")
    def converted_dir(fixture, mapping, tmp_path_factory):
        out = tmp_path_factory.mktemp(f"{mapping_path.stem}_converted") / "hf"
        return convert(fixture["source"], target_class, fixture["config"], mapping, out)

    return fixture, mapping, source_tree, target, converted_dir


def openai_clip_inputs(hparams: dict, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three images and three token rows ending in end-of-text at different places, zero-padded after it,
    for the OpenAI CLIP ``clip.model.CLIP(**hparams)``."""
    size, length = hparams["image_resolution"], hparams["context_length"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, size, size, generator=generator)
    ids = torch.randint(1, eot, (3, length), generator=generator)
    for row, end in enumerate((5, length - 1, 9)):
        ids[row, end] = eot
        ids[row, end + 1 :] = 0
    return images, ids


# ---------------------------------------------------------------------------- the mapping and the converted model


def complete_expansion(mapping: Mapping, source_tree: ParamTree, target_tree: ParamTree):
    """The mapping expanded over the checkpoint and the model; it must cover both."""
    expansion = mapping.expand(source_tree.specs, target_tree.specs)
    assert expansion.complete, expansion.summary()
    return expansion


def assert_loaded_cleanly(info: dict, allowed_missing: Iterable[str] = ()) -> None:
    """from_pretrained(..., output_loading_info=True) found every key it needed and no other, every
    shape fitting: the only missing keys are exactly ``allowed_missing`` (weights the mapping declares
    ``initialised``)."""
    assert set(info["missing_keys"]) == set(allowed_missing), info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info.get("error_msgs"), info.get("error_msgs")


def written_weights(converted_dir: Path) -> dict[str, torch.Tensor]:
    """What the conversion wrote, read straight from the file (not through from_pretrained)."""
    from safetensors.torch import load_file

    return load_file(Path(converted_dir) / "model.safetensors")


def assert_same_tensors(got: MappingType[str, torch.Tensor], want: MappingType[str, torch.Tensor]) -> None:
    """The same names, and under each name the same tensor bit for bit (dtype and shape included)."""
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys()))
    # torch.equal compares values only (float32 zeros equal float64 zeros): the dtype is checked apart
    assert [key for key in want if got[key].dtype != want[key].dtype or not torch.equal(got[key], want[key])] == []


# ---------------------------------------------------------------------------- outputs


def max_differences(got: MappingType[str, torch.Tensor], want: MappingType[str, torch.Tensor]) -> dict[str, float]:
    """The largest absolute difference per output; both sides must name the same outputs."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    return {name: float((got[name] - want[name]).abs().max()) for name in want}


def assert_outputs_match(got: Outputs, want: Outputs, tolerance: float = TOLERANCE) -> None:
    differences = max_differences(got, want)
    assert all(d <= tolerance for d in differences.values()), differences  # a NaN fails too


def differing_outputs(got: Outputs, want: Outputs, tolerance: float = TOLERANCE) -> str | None:
    """Which outputs differ by more than ``tolerance`` (or are NaN), or None if none does."""
    differences = max_differences(got, want)
    beyond = {name: d for name, d in differences.items() if not d <= tolerance}
    return f"outputs differ: {beyond}" if beyond else None


# ---------------------------------------------------------------------------- b. round trip


def assert_reverse_gives_back(mapping: Mapping, source_tree: ParamTree, converted: MappingType[str, object]):
    """The reverse of ``mapping``, run over the ``converted`` arrays, gives back every checkpoint tensor
    it does not declare ``initialised`` (what the forward mapping drops), bit for bit, dtype and shape
    included. Returns the reverse expansion for the family's own checks on what cannot come back."""
    backward = mapping.reverse(source_tree.shapes())
    expansion = backward.expand(converted.keys(), source_tree.specs)
    assert expansion.complete, expansion.summary()
    assert set(expansion.initialised) <= set(source_tree.specs)
    restored = {rule.target: np.asarray(apply_chain(rule.ops, [converted[s] for s in rule.sources])) for rule in expansion.rules}
    assert restored.keys() == set(source_tree.specs) - set(expansion.initialised)
    for key, array in restored.items():
        original = np.asarray(source_tree.read(key))
        assert array.dtype == original.dtype and array.shape == original.shape, key
        assert np.array_equal(array, original), key
    return expansion


# ---------------------------------------------------------------------------- c. mutants


def in_memory(tree: ParamTree) -> ParamTree:
    """The tree read once: every mutant converts from memory."""
    return ParamTree.from_arrays({key: tree.read(key) for key in tree.keys()})


def model_check(
    model: torch.nn.Module, run: Callable[[torch.nn.Module], Outputs], expected: Outputs, tolerance: float = TOLERANCE,
    allowed_missing: Iterable[str] = (),
) -> Check:
    """The usual family check of a converted state dict: it loads into ``model`` with no unexpected
    key, no wrong shape and no missing key but ``allowed_missing``, and ``run(model)`` gives the
    ``expected`` outputs within ``tolerance``. Returns why not, or None."""
    allowed = set(allowed_missing)

    def check(state: dict[str, torch.Tensor]) -> str | None:
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a shape that does not fit
            return f"load refused: {str(exc).splitlines()[0]}"
        if set(result.missing_keys) - allowed or result.unexpected_keys:
            return f"load reports missing {result.missing_keys} unexpected {result.unexpected_keys}"
        return differing_outputs(run(model), expected, tolerance)

    return check


def rejection(candidate: Mapping, source: ParamTree, target: ParamTree, check: Check) -> str | None:
    """Why the proof fails for ``candidate`` (None if it would pass): the conversion refuses, or
    ``check`` tells the state dict it converts to from the right one."""
    try:
        state = convert_arrays(source, target, candidate)
    except MatcherError as exc:
        return f"conversion refused: {exc}"
    return check({key: torch.as_tensor(np.array(value)) for key, value in state.items()})


def mutant_survivors(
    mapping: Mapping, candidates: Iterable[tuple[str, Mapping]], source: ParamTree, target: ParamTree, check: Check
) -> list[str]:
    """The descriptions of the ``candidates`` (mappings one mistake away from ``mapping``) that the proof
    does not reject. The proof must first pass on ``mapping`` itself, else rejecting them means nothing."""
    reason = rejection(mapping, source, target, check)
    assert reason is None, f"the proof rejects the real mapping: {reason}"
    return [description for description, mutant in candidates if rejection(mutant, source, target, check) is None]
