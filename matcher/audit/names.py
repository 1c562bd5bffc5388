"""Converted checkpoint keys -> the target class' in-memory ``state_dict()`` names.

A ``save_pretrained`` directory may use transformers' legacy file names (ViT
``encoder.layer.0.attention.attention.query.weight``) where our target names are the
in-memory ones (``layers.0.attention.q_proj.weight``). The keys are renamed with the very
functions ``from_pretrained`` uses (``get_model_conversion_mapping`` for the model built on
the meta device, then ``rename_source_key`` with the base-model prefix added or stripped as
the model needs), so a key means here exactly what it means when the class loads the
directory; the tensors are read from the file untouched (their stored dtype included).
A key that transformers would not just rename but convert with ops on loading
(a ``WeightConverter``) is refused rather than guessed.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import MatcherError


def class_names(model_class: type, config: Any, keys: Iterable[str]) -> dict[str, str]:
    """``file key -> in-memory key`` for every key; keys the class does not have keep their name."""
    import torch

    keys = list(keys)
    with torch.device("meta"):
        model = model_class(config)
    meta = model.state_dict()
    if all(key in meta for key in keys):
        return {key: key for key in keys}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError as exc:  # an older or newer transformers without the v5 loading API
        raise MatcherError(f"cannot rename legacy checkpoint keys with this transformers ({exc})") from exc
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = model.base_model_prefix
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for key in sorted(keys, key=dot_natural_key):  # from_pretrained's order: some renamings keep state
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if pattern is not None:
            raise MatcherError(f"{key}: {model_class.__name__} converts this key with ops on loading (pattern {pattern!r}); the audit reads renamed keys only")
        if renamed in owner:
            raise MatcherError(f"{owner[renamed]} and {key} both load into {model_class.__name__}'s {renamed}")
        owner[renamed] = key
        names[key] = renamed
    return {key: names[key] for key in keys}
