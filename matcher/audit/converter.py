"""Run a user's converter (a function from a flat dict of arrays to a flat dict of arrays)
on fingerprint-filled arrays, so that every element of its output says where it came from."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import MatcherError
from .fingerprints import to_numpy

Converter = Callable[[dict], Mapping[str, Any]]
ARRAY_KINDS = ("numpy", "torch")


def load_converter(spec: str) -> Converter:
    """``path/to/script.py:function`` -> the function (the script is imported as a module)."""
    path_text, sep, function = spec.rpartition(":")
    if not sep or not path_text or not function.isidentifier():
        raise MatcherError(f"--converter {spec!r}: expected path/to/script.py:function")
    path = Path(path_text)
    if not path.is_file():
        raise MatcherError("no such converter script", path=str(path))
    name = f"_matcher_audited_converter_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise MatcherError("cannot import this file as a Python module", path=str(path))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the script's own error, whatever it is, is the user's input
        sys.modules.pop(name, None)
        raise MatcherError(f"importing the converter failed: {type(exc).__name__}: {exc}", path=str(path)) from exc
    fn = getattr(module, function, None)
    if not callable(fn):
        raise MatcherError(f"defines no function {function!r}", path=str(path))
    return fn


def run_converter(fn: Converter, arrays: Mapping[str, np.ndarray], array_kind: str = "numpy") -> dict[str, np.ndarray]:
    """Call ``fn`` on a copy of ``arrays`` (numpy, or torch tensors) and return its output as numpy."""
    if array_kind not in ARRAY_KINDS:
        raise MatcherError(f"array kind {array_kind!r}: choose one of {', '.join(ARRAY_KINDS)}")
    if array_kind == "torch":
        import torch

        given: dict[str, Any] = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    else:
        given = {k: np.array(v) for k, v in arrays.items()}  # converters pop and overwrite; keep ours intact
    name = getattr(fn, "__name__", "converter")
    try:
        out = fn(given)
    except Exception as exc:  # the converter's own failure is reported, not re-raised
        raise MatcherError(f"the converter {name} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, Mapping):
        raise MatcherError(f"the converter {name} returned a {type(out).__name__}, not a dict of arrays")
    result = {}
    for key, value in out.items():
        if not isinstance(key, str):
            raise MatcherError(f"the converter {name} returned a non-string key {key!r}")
        try:
            result[key] = to_numpy(value.detach() if hasattr(value, "detach") else value)
        except Exception as exc:  # noqa: BLE001 - anything that is not an array
            raise MatcherError(f"the converter {name} returned {type(value).__name__} for {key}, not an array") from exc
        if result[key].dtype == object:
            raise MatcherError(f"the converter {name} returned {type(value).__name__} for {key}, not an array")
    return result
