"""Target models: a transformers class built on the meta device from a config.

The target tree's names are the keys of ``model.state_dict()`` as transformers builds the
model in memory; ``from_pretrained`` accepts them (transformers v5 renames some legacy
file names, e.g. ViT ``encoder.layer.N.attention.attention.query`` -> ``layers.N.attention.q_proj``).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TargetError
from .tree import ParamTree, TensorSpec, dtype_name


def import_transformers():
    from .compat import install_torchvision_shim

    install_torchvision_shim()
    import transformers

    return transformers


@dataclass
class Target:
    model_class: type
    config: Any
    tree: ParamTree

    @property
    def class_name(self) -> str:
        return self.model_class.__name__


def resolve_class(name: str) -> type:
    transformers = import_transformers()
    if not name.isidentifier() or name.startswith("_"):
        raise TargetError(f"{name!r} is not a class name")
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, ModuleNotFoundError, RuntimeError) as exc:
        if isinstance(exc, AttributeError):
            names = [n for n in dir(transformers) if n.endswith("Model") or "For" in n]
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "give a transformers model class such as SiglipModel"
            raise TargetError(f"unknown target class {name!r}", hint=hint) from exc
        raise TargetError(f"cannot import transformers.{name}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(cls, type) or not hasattr(cls, "config_class") or not hasattr(cls, "from_pretrained"):
        raise TargetError(f"{name} is not a transformers model class")
    return cls


def load_config(model_class: type, config: Any) -> Any:
    """A config object for ``model_class`` from a config object, a config.json path or a directory."""
    config_class = model_class.config_class
    if not isinstance(config, (str, os.PathLike)):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise TargetError("config not found", path=str(path))
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TargetError(f"config is not valid JSON ({exc})", path=str(path)) from exc
    if not isinstance(data, dict):
        raise TargetError("config must be a JSON object", path=str(path))
    expected = getattr(config_class, "model_type", None)
    found = data.get("model_type")
    if expected and found and found != expected:
        raise TargetError(f"config is for model_type {found!r}, but {model_class.__name__} needs {expected!r}", path=str(path))
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise TargetError(f"config does not fit {config_class.__name__} ({exc})", path=str(path)) from exc


def build_target(class_name: str | type, config: Any) -> Target:
    """Instantiate the class on the meta device (no memory for weights) and describe its tree."""
    import torch

    model_class = resolve_class(class_name) if isinstance(class_name, str) else class_name
    config_obj = load_config(model_class, config)
    try:
        with torch.device("meta"):
            model = model_class(config_obj)
    except Exception as exc:  # a config the class cannot be built from: any error is the user's input
        raise TargetError(f"cannot build {model_class.__name__} from this config: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return Target(model_class, config_obj, model_tree(model))


def model_tree(model: Any) -> ParamTree:
    """Shapes, dtypes and module kinds of a torch module's state_dict (data is not touched)."""
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            kinds[prefix + name] = f"{type(module).__name__}.{name}"
    specs = {
        key: TensorSpec(key, tuple(int(d) for d in tensor.shape), dtype_name(tensor), kinds.get(key))
        for key, tensor in model.state_dict().items()
    }
    return ParamTree(specs, loader=None, origin=type(model).__name__, format="transformers")
