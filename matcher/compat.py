"""Compatibility shim for a torchvision wheel whose compiled ops cannot load.

The registry here only has a CUDA build of torchvision. Its ``_C`` extension fails
to load against the CPU torch, and ``torchvision/_meta_registrations.py`` then
registers fake kernels for ``torchvision::nms``/``qnms`` that were never defined,
so ``import torchvision`` (and with it timm, open_clip and transformers' vision
models) dies with "operator torchvision::nms does not exist".

Defining the two schemas before torchvision is imported lets the import succeed.
The ops themselves are never needed to convert weights; calling them raises.
"""

from __future__ import annotations

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# The Library object must stay alive: dropping it unregisters the schemas.
_library = None


def _schema_exists(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _unavailable(*_args, **_kwargs):
    raise NotImplementedError(
        "torchvision's compiled ops are not available in this environment "
        "(matcher registered placeholder schemas only)"
    )


def install_torchvision_shim() -> bool:
    """Register missing torchvision op schemas. Returns True if anything was registered.

    Safe to call any number of times, and a no-op when torchvision is already
    imported or its compiled ops load normally.
    """
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    import torch

    missing = [name for name in _SCHEMAS if not _schema_exists(name)]
    if not missing:
        return False
    if _torchvision_ops_load():
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])
        _library.impl(name, _unavailable, "CompositeExplicitAutograd")
    return True


def _torchvision_ops_load() -> bool:
    """True if torchvision's compiled extension can be loaded as is."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: nothing to shim
    import glob
    import os

    import torch

    for location in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(location, "_C*.so")) + glob.glob(os.path.join(location, "_C*.pyd")):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):
                return False
    return False
