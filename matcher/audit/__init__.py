"""Audit an existing conversion: recover, from the values alone, the mapping a converter applied.

``audit(SRC, CONVERTED, target_class=...)`` traces every tensor of an already converted
checkpoint back to the source tensor(s) and op chain that reproduce it bit-exactly
(``trace``), and holds the result against the mapping ``match`` infers for SRC -> CLASS, or a
given mapping (``report``). ``audit(SRC, converter=fn)`` does the same for a converter function
run on fingerprint-filled arrays (``converter``, ``fingerprints``): every element of the tree
holds a different value, so every element of its output says where it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import MatcherError
from ..mapping import Mapping
from ..tree import ParamTree
from .converter import load_converter, run_converter
from .fingerprints import fingerprint_arrays
from .names import class_names
from .report import AuditReport, Reference, build_report
from .trace import Explanation, Trace, Tracer

__all__ = ["AuditReport", "Explanation", "Trace", "Tracer", "audit", "fingerprint_arrays"]


def _tree(value: Any) -> ParamTree:
    if isinstance(value, ParamTree):
        return value
    from ..sources import open_tree

    return open_tree(value)


def _reference_name(mapping: Any) -> str:
    if mapping is None:
        return "the mapping match infers"
    return "the given mapping" if isinstance(mapping, Mapping) else f"mapping {mapping}"


def audit(
    source: str | os.PathLike | ParamTree,
    converted: str | os.PathLike | ParamTree | None = None,
    *,
    target_class: str | type | None = None,
    config: Any = None,
    mapping: Mapping | str | os.PathLike | None = None,
    converter: str | Callable | None = None,
    converter_arrays: str = "numpy",
    allow_drop: Sequence[str] = (),
    allow_init: Sequence[str] = (),
) -> AuditReport:
    """Trace ``converted`` (a checkpoint, or the output of ``converter`` on fingerprints of
    ``source``) back to ``source``.

    With ``target_class``, converted keys are renamed to the class' in-memory names as
    ``from_pretrained`` would, and every target is held against the reference: the mapping
    ``match`` infers (config from ``config``, else CONVERTED/config.json, else inferred), with
    the rules of ``mapping`` pinned; ``allow_drop``/``allow_init`` as for ``match``.
    """
    if (converted is None) == (converter is None):
        raise MatcherError("audit needs exactly one of a converted checkpoint and a converter")
    tree = _tree(source)
    if converter is not None:
        function = load_converter(converter) if isinstance(converter, str) else converter
        source_arrays = fingerprint_arrays(tree)
        outputs = run_converter(function, source_arrays, converter_arrays)
        converted_name = f"converter {converter if isinstance(converter, str) else getattr(converter, '__name__', 'function')}"
    else:
        converted_tree = _tree(converted)
        source_arrays = {key: tree.read(key) for key in tree.keys()}
        outputs = {key: converted_tree.read(key) for key in converted_tree.keys()}
        converted_name = converted_tree.origin or str(converted)
        if config is None and not isinstance(converted, ParamTree) and (Path(converted) / "config.json").is_file():
            config = Path(converted) / "config.json"
    reference = class_keys = renamed = None
    class_name = None
    if target_class is not None:
        from ..api import match

        inferred = match(tree, target_class, config=config, mapping=mapping, allow_drop=allow_drop, allow_init=allow_init)
        target = inferred.target
        class_name = target.class_name
        names = class_names(target.model_class, target.config, outputs)
        renamed = {key: name for key, name in names.items() if key != name}
        outputs = {names[key]: value for key, value in outputs.items()}
        class_keys = list(target.tree.keys())
        expansion = inferred.mapping.expand(tree.keys(), class_keys)
        reference = Reference(
            name=_reference_name(mapping),
            rules={rule.target: rule for rule in expansion.rules},
            initialised=set(expansion.initialised) | set(inferred.initialised),
            dropped=set(expansion.dropped) | set(inferred.dropped),
        )
    return build_report(
        # a converter's output on fingerprints is searched for in full, so the recovered mapping
        # comes from the values alone; a checkpoint's targets are first held against the reference
        Tracer(source_arrays, search_always=converter is not None),
        outputs,
        source_name=tree.origin or str(source),
        converted_name=converted_name,
        class_keys=class_keys,
        target_class=class_name,
        reference=reference,
        renamed=renamed,
    )
