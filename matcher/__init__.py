"""matcher: convert checkpoints between frameworks by inferring the mapping from shapes and names.

Public API (imported lazily so ``match --help`` stays fast):
    match(source, target_class, config=None, mapping=None) -> MatchReport
    report.mapping, report.complete, report.save(out)
    open_tree(path) -> ParamTree
    Mapping.load(path), convert(source, target_class, config, mapping, out)
"""

from typing import Any

__all__ = ["match", "open_tree", "Mapping", "convert", "MatchReport"]

_LAZY = {
    "match": ("matcher.api", "match"),
    "open_tree": ("matcher.sources", "open_tree"),
    "Mapping": ("matcher.mapping", "Mapping"),
    "convert": ("matcher.convert", "convert"),
    "MatchReport": ("matcher.solve", "MatchReport"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'matcher' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)
