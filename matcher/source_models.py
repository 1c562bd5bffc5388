"""The original implementation of a checkpoint, built locally for numeric checks (``--source-model``).

A spec names how to build it, with optional keyword arguments after ``?``:

- ``timm:MODEL_NAME[?k=v&...]``: ``timm.create_model(MODEL_NAME, pretrained=False, **kwargs)``;
  the architecture kwargs a ViT checkpoint shows (embed_dim, depth, patch_size, img_size,
  num_classes, mlp_ratio, in_chans) are read off the checkpoint, num_heads off the target
  config, unless given.
- ``open_clip:MODEL_CONFIG[?k=v&...]``: ``open_clip.create_model(MODEL_CONFIG, pretrained=None, **kwargs)``.
- ``path/to/file.py:factory[?k=v&...]`` or ``package.module:factory[?...]``: ``factory(**kwargs)``
  returning an ``nn.Module`` whose state_dict keys are the checkpoint's keys.

Models are built with random weights and never downloaded; ``load_checkpoint`` then fills
them from the checkpoint, strictly.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MatcherError
from .tree import ParamTree

Inputs = dict[str, Any]  # the target's forward kwargs: pixel_values, input_ids


@dataclass
class FinalOutput:
    """A whole-model output both sides can produce: how to get it from each."""

    name: str
    source: Callable[[Any, Inputs], Any]  # (source module, inputs) -> tensor
    target: Callable[[Any, Inputs, Any], Any]  # (target model, inputs, target output) -> tensor or None


@dataclass
class SourceModel:
    spec: str
    module: Any
    finals: list[FinalOutput] = field(default_factory=list)

    def __call__(self, inputs: Inputs) -> Any:
        """Run the source model: images first, then token ids, positionally (the order of
        timm, OpenAI CLIP, open_clip and Chinese-CLIP forwards)."""
        args = [inputs[name] for name in ("pixel_values", "input_ids") if name in inputs]
        return self.module(*args)


@dataclass(frozen=True)
class Spec:
    text: str
    kind: str  # timm, open_clip, file, module
    name: str  # model name, config name, or the factory's location
    factory: str | None
    kwargs: dict[str, Any]


def _value(text: str) -> Any:
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(text: str) -> Spec:
    body, _, query = text.partition("?")
    kwargs: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise MatcherError(f"--source-model {text!r}: expected key=value after '?', got {item!r}")
        kwargs[key] = _value(value)
    kind, colon, rest = body.partition(":")
    if kind in BUILDERS and rest:
        return Spec(text, kind, rest, None, kwargs)
    location, colon, rest = body.rpartition(":")  # a file path may hold colons, a factory name cannot
    if not colon or not location or not rest:
        raise MatcherError(f"--source-model {text!r}: expected timm:MODEL, open_clip:CONFIG, path/to/file.py:factory or package.module:factory")
    kind = "file" if location.endswith(".py") or "/" in location else "module"
    return Spec(text, kind, location, rest, kwargs)


# ---------------------------------------------------------------------- timm


def _count(tree: ParamTree, pattern: str) -> int | None:
    found = {m.group(1) for k in tree.keys() if (m := re.match(pattern, k))}
    return len(found) or None


def _vit_img_size(tree: ParamTree) -> int | None:
    if "pos_embed" not in tree or "patch_embed.proj.weight" not in tree:
        return None
    tokens = tree["pos_embed"].shape[1] - (1 if "cls_token" in tree else 0)
    side = math.isqrt(tokens)
    return side * tree["patch_embed.proj.weight"].shape[-1] if side * side == tokens else None


def _target_heads(config: Any) -> int | None:
    for candidate in (config, getattr(config, "vision_config", None)):
        heads = getattr(candidate, "num_attention_heads", None)
        if heads:
            return int(heads)
    return None


def _shape(tree: ParamTree, key: str, axis: int) -> int | None:
    return tree[key].shape[axis] if key in tree else None


# What a timm ViT checkpoint shows about the kwargs it was built with (None: it does not say).
TIMM_VIT_KWARGS: dict[str, Callable[[ParamTree, Any], Any]] = {
    "embed_dim": lambda tree, config: _shape(tree, "patch_embed.proj.weight", 0),
    "in_chans": lambda tree, config: _shape(tree, "patch_embed.proj.weight", 1),
    "patch_size": lambda tree, config: _shape(tree, "patch_embed.proj.weight", -1),
    "img_size": lambda tree, config: _vit_img_size(tree),
    "depth": lambda tree, config: _count(tree, r"blocks\.(\d+)\."),
    "num_classes": lambda tree, config: _shape(tree, "head.weight", 0) or (0 if "patch_embed.proj.weight" in tree else None),
    "mlp_ratio": lambda tree, config: (
        tree["blocks.0.mlp.fc1.weight"].shape[0] / tree["blocks.0.mlp.fc1.weight"].shape[1] if "blocks.0.mlp.fc1.weight" in tree else None
    ),
    "num_heads": lambda tree, config: _target_heads(config) if "blocks.0.attn.qkv.weight" in tree else None,
}


def _timm_finals(module: Any) -> list[FinalOutput]:
    finals = [
        FinalOutput(
            "features (timm forward_features vs last_hidden_state)",
            lambda m, inputs: m.forward_features(inputs["pixel_values"]),
            lambda model, inputs, out: getattr(model.base_model(**inputs), "last_hidden_state", None),
        )
    ]
    if getattr(module, "num_classes", 0):
        finals.append(FinalOutput("logits", lambda m, inputs: m(inputs["pixel_values"]), lambda model, inputs, out: getattr(out, "logits", None)))
    return finals


def _build_timm(spec: Spec, tree: ParamTree, target_config: Any) -> SourceModel:
    from .compat import install_torchvision_shim

    install_torchvision_shim()
    import timm

    if not timm.is_model(spec.name):
        raise MatcherError(f"--source-model {spec.text!r}: timm has no model {spec.name!r}")
    inferred = {k: f(tree, target_config) for k, f in TIMM_VIT_KWARGS.items() if k not in spec.kwargs}
    kwargs = {**{k: v for k, v in inferred.items() if v is not None}, **spec.kwargs}
    module = _construct(spec, lambda: timm.create_model(spec.name, pretrained=False, **kwargs))
    return SourceModel(spec.text, module, _timm_finals(module))


# ---------------------------------------------------------------------- open_clip


def _build_open_clip(spec: Spec, tree: ParamTree, target_config: Any) -> SourceModel:
    from .compat import install_torchvision_shim

    install_torchvision_shim()
    import open_clip

    if spec.name not in open_clip.list_models():
        raise MatcherError(f"--source-model {spec.text!r}: open_clip has no model config {spec.name!r}")
    module = _construct(spec, lambda: open_clip.create_model(spec.name, pretrained=None, **spec.kwargs))
    return SourceModel(spec.text, module)


# ---------------------------------------------------------------------- factories


def _load_factory(spec: Spec) -> Callable[..., Any]:
    if spec.kind == "file":
        path = Path(spec.name)
        if not path.is_file():
            raise MatcherError("no such file", path=spec.name, hint=f"--source-model {spec.text}")
        module_name = f"_matcher_source_model_{re.sub(r'[^0-9a-zA-Z_]', '_', str(path.resolve()))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # the user's file: whatever it raises is a bad --source-model
            raise MatcherError(f"cannot import: {type(exc).__name__}: {exc}", path=spec.name) from exc
    else:
        try:
            module = importlib.import_module(spec.name)
        except Exception as exc:  # noqa: BLE001 - as above
            raise MatcherError(f"--source-model {spec.text!r}: cannot import {spec.name}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        raise MatcherError(f"--source-model {spec.text!r}: {spec.name} has no callable {spec.factory!r}")
    return factory


def _build_factory(spec: Spec, tree: ParamTree, target_config: Any) -> SourceModel:
    factory = _load_factory(spec)
    return SourceModel(spec.text, _construct(spec, lambda: factory(**spec.kwargs)))


def _construct(spec: Spec, build: Callable[[], Any]) -> Any:
    import torch

    torch.manual_seed(0)
    try:
        module = build()
    except Exception as exc:  # building someone else's model: any failure is a bad spec
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MatcherError(f"--source-model {spec.text!r}: cannot build the model: {first}") from exc
    if not isinstance(module, torch.nn.Module):
        raise MatcherError(f"--source-model {spec.text!r}: returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


BUILDERS: dict[str, Callable[[Spec, ParamTree, Any], SourceModel]] = {
    "timm": _build_timm,
    "open_clip": _build_open_clip,
}


def build_source_model(text: str, tree: ParamTree, target_config: Any = None) -> SourceModel:
    spec = parse_spec(text)
    return BUILDERS.get(spec.kind, _build_factory)(spec, tree, target_config)


# ---------------------------------------------------------------------- weights


def to_torch(array: Any) -> Any:
    """A tensor from whatever a reader returns; floats as float32 (bf16 numpy arrays too)."""
    import numpy as np
    import torch

    if isinstance(array, torch.Tensor):
        return array.float() if array.is_floating_point() else array
    array = np.asarray(array)
    if array.dtype.kind in "fV" or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return torch.from_numpy(np.array(array))  # a copy; np.ascontiguousarray would turn a scalar into shape (1,)


def load_checkpoint(source: SourceModel, tree: ParamTree, ignore: set[str] = frozenset()) -> None:
    """Load every checkpoint tensor into the source model; the key sets must be equal, except
    for ``ignore`` (checkpoint keys declared dropped, such as optimizer state: the model may lack them)."""
    expected = set(source.module.state_dict())
    given = set(tree.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected - set(ignore))
    if missing or unexpected:
        parts = [f"{title}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''} ({len(keys)})"
                 for title, keys in (("not in the checkpoint", missing), ("not in the model", unexpected)) if keys]
        raise MatcherError(f"--source-model {source.spec!r}: the checkpoint's keys are not the model's ({'; '.join(parts)})",
                           hint="the spec must build the model the checkpoint was saved from")
    state = {key: to_torch(tree.read(key)) for key in sorted(expected)}
    try:
        source.module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split("\n\t")[1:2]) or str(exc).splitlines()[0]
        raise MatcherError(f"--source-model {source.spec!r}: the checkpoint does not fit the model: {detail.strip()}") from exc
