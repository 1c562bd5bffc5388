"""PyTorch checkpoints (.pt/.pth/.bin), loaded with ``weights_only=True``: a pickle that
would run code is refused, never executed.

Released checkpoints nest their weights (``{"state_dict": {"module.x": ...}, "epoch": 3}``):
the reader descends through the usual containers, strips a DDP ``module.`` prefix shared
by every key, and records what it unwrapped and which non-tensor entries it ignored.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..tree import ParamTree, TensorSpec, dtype_name
from . import register

CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "params", "weights")
_PICKLE_PROTOCOL_2_PLUS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _is_torch(head: bytes, path: Path) -> bool:
    if head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        return True
    if not head.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return path.suffix in (".pt", ".pth", ".bin", ".ckpt")


def _load(path: Path) -> Any:
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n")[0]
        if "Weights only load failed" in str(exc):
            culprit = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), reason)
            raise SourceError(f"refused: the pickle wants to run code or build objects beyond tensors ({culprit})", path=str(path)) from exc
        raise SourceError(f"corrupt pickle ({reason})", path=str(path)) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        first = str(exc).strip().split("\n")[0] or type(exc).__name__
        raise SourceError(f"cannot load the PyTorch checkpoint ({first})", path=str(path)) from exc


def _flatten(obj: Any, prefix: str, tensors: dict[str, Any], ignored: list[str]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), tensors, ignored)
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, (torch.Tensor, dict)) for v in obj):
        for index, value in enumerate(obj):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), tensors, ignored)
    else:
        ignored.append(prefix or "<root>")


def _unwrap(obj: Any) -> tuple[Any, list[str]]:
    path: list[str] = []
    while isinstance(obj, dict):
        container = next((c for c in CONTAINERS if isinstance(obj.get(c), dict) and obj[c]), None)
        if container is None:
            break
        path.append(container)
        obj = obj[container]
    return obj, path


def to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


@register("torch", _is_torch)
def open_torch(path: Path) -> ParamTree:
    obj, unwrapped = _unwrap(_load(path))
    tensors: dict[str, Any] = {}
    ignored: list[str] = []
    _flatten(obj, "", tensors, ignored)
    stripped = None
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
        stripped = "module."
    specs = {k: TensorSpec(k, tuple(int(d) for d in t.shape), dtype_name(t)) for k, t in tensors.items()}
    info = {"unwrapped": unwrapped, "stripped_prefix": stripped, "ignored_entries": ignored}
    return ParamTree(specs, loader=lambda key: to_numpy(tensors[key]), origin=str(path), format="torch", info=info)
