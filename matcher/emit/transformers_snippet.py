"""``--emit transformers``: the mapping as a transformers v5 conversion mapping.

The snippet builds ``CONVERSIONS``, a list of ``WeightRenaming`` and ``WeightConverter``
(``transformers.core_model_loading``) in the style of ``conversion_mapping.py``, and registers
it for the target class, so that ``CLASS.from_pretrained(directory)`` loads the original
tensors (saved under the names ``match`` lists) and converts them on the fly.

How a mapping becomes transforms:
- a rule outside the repeated blocks matches its whole source key (``^...$``);
- a block is moved under its new name by one prefix renaming (``encoderblock_(\\d+)/`` ->
  ``layers.\\1.``); the rules inside it then match the rest of the key only, limited to that
  block with transformers' own ``scope_prefix`` (as it does for a sub-model's mapping), so one
  rule per block member, not per layer;
- ops: the parts of a fused tensor are one converter with ``Chunk`` (or ``Split`` for unequal
  parts), several sources one with ``Concatenate``, a gathered stack ``MergeModulelist``, a swap
  of two axes ``Transpose``; reshapes, squeezes and other permutations, which transformers has
  no op for, are small ``ConversionOps`` subclasses defined in the snippet;
- a stack over the instances of several gathered sources (gate and up of every expert:
  ``stack 0 | split_axis(0, [2, -1]) | transpose [1, 0, 2, 3] | merge_axes(1, 2)``) is written as
  transformers writes it, ``MergeModulelist(dim=d), Concatenate(dim=c)`` (each source's instances
  stacked, then the sources joined), then whatever ops remain. Which ``d`` and ``c``, and how many
  of the ops after the stack they stand for, is decided by running both on probe arrays of distinct
  values (the checkpoint's ranks and instance count when the report has its shapes), not by reading
  the ops' spelling; ``d = c =`` the stack's axis with no op replaced is always right.

The key renaming is simulated here with transformers' matching rules on one instance of every
rule; anything that would not land where the mapping says is listed in the snippet's header,
as is every rule transformers' machinery cannot express (a ``select`` from a scanned stack).
The simulation includes what from_pretrained adds after the registered list: the conversions
transformers has for the target's sub-models (looked up by their class name or model type, so
registering for ``MixtralForCausalLM`` still lets ``MixtralModel``'s ``mixtral`` conversions run
inside it, and their ``.block_sparse_moe. -> .mlp.`` renaming runs before any converter) and its
legacy renamings, as transformers' own objects. When the sub-models' conversions would take keys
from the snippet's, ``register()`` also registers an empty list for those sub-model classes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from math import prod

import numpy as np

from ..errors import MatcherError
from ..mapping import Rule
from ..ops import apply_chain
from ..patterns import template
from ..tree import ParamTree
from . import Subject, register
from .text import PLACEHOLDER, SEPARATORS, indented, python_string, raw_string, segment_end
from .transformers_ops import CUSTOM_NEEDS, CUSTOM_OPS, PER_TENSOR, SCOPED

INDENT = "    "


# ---------------------------------------------------------------------------- one transform per rule or split


@dataclass
class Item:
    """One transform to be: the rules it carries out, its patterns and ops."""

    rules: list[Rule]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    operations: list[str] = field(default_factory=list)
    custom: set[str] = field(default_factory=set)
    problem: str | None = None


def _split_key(rule: Rule) -> tuple | None:
    position = next((k for k, op in enumerate(rule.ops) if op.name == "chunk"), None)
    if position is None or len(rule.sources) != 1:
        return None
    chunk = rule.ops[position]
    return (rule.sources[0], json.dumps([op.to_dict() for op in rule.ops[:position]]), chunk.axis, chunk.parts, chunk.sizes)


def items_of(rules, source: ParamTree | None = None) -> list[Item]:
    """Rules as transforms: the chunk rules of one fused tensor together, ordered by part.
    ``source`` (the checkpoint's shapes, when known) sizes the probes of gathered stacks."""
    splits: dict[tuple, list[Rule]] = {}
    for rule in rules:
        key = _split_key(rule)
        if key is not None:
            splits.setdefault(key, []).append(rule)
    items, done = [], set()
    for rule in rules:
        key = _split_key(rule)
        if key is None:
            items.append(_single(rule, source))
        elif key not in done:
            done.add(key)
            items.append(_split(splits[key]))
    return items


def _unary(op, single: bool) -> tuple[str | None, str | None]:
    """(transformers op text, custom class it needs) for a unary op; None if it has none."""
    if op.name == "transpose":
        moved = [k for k, p in enumerate(op.perm) if p != k]
        if single and len(moved) == 2:
            return f"Transpose(dim0={moved[0]}, dim1={moved[1]})", None
        return f"Permute({', '.join(map(str, op.perm))})", "Permute"
    if op.name == "merge_axes":
        return f"MergeAxes({op.start}, {op.end})", "MergeAxes"
    if op.name == "split_axis":
        return f"SplitAxis({op.axis}, {list(op.sizes)})", "SplitAxis"
    if op.name in ("squeeze", "unsqueeze"):
        name = op.name.capitalize()
        return f"{name}({op.axis})", name
    return None, None


def _add_unary(item: Item, ops, single: bool) -> None:
    for op in ops:
        text, custom = _unary(op, single)
        if text is None:
            item.problem = item.problem or f"transformers has no loading op for {op} ({item.targets[0]})"
            continue
        item.operations.append(text)
        if custom:
            item.custom.add(custom)


def _single(rule: Rule, source: ParamTree | None = None) -> Item:
    item = Item([rule], rule.sources, (rule.target,))
    position = next((k for k, op in enumerate(rule.ops) if op.combines), None)
    if position is None:
        _add_unary(item, rule.ops, single=not rule.gathered)
        return item
    combine = rule.ops[position]
    _add_unary(item, rule.ops[:position], single=False)
    post = rule.ops[position + 1 :]
    if combine.name == "concat":
        item.operations.append(f"Concatenate(dim={combine.axis})")
    elif combine.name == "stack" and len(rule.sources) == 1 and rule.gathered:
        item.operations.append(f"MergeModulelist(dim={combine.axis})")
    elif combine.name == "stack" and len(rule.gathered) == 1 and all(rule.gathered[0] in template(s).variables for s in rule.sources):
        stack_axis, concat_axis, used = _stacks_then_concatenation(rule, position, source)
        item.operations += [f"MergeModulelist(dim={stack_axis})", f"Concatenate(dim={concat_axis})"]
        post = post[used:]
    else:
        item.problem = f"transformers stacks only the instances of gathered sources ({rule.target})"
    _add_unary(item, post, single=True)
    return item


def _split(members: list[Rule]) -> Item:
    position = next(k for k, op in enumerate(members[0].ops) if op.name == "chunk")
    chunk = members[0].ops[position]
    by_part = {rule.ops[position].index: rule for rule in members}
    ordered = [by_part[k] for k in sorted(by_part)]
    item = Item(ordered, members[0].sources, tuple(rule.target for rule in ordered))
    _add_unary(item, members[0].ops[:position], single=True)
    posts = {json.dumps([op.to_dict() for op in rule.ops[position + 1 :]]) for rule in members}
    if sorted(by_part) != list(range(chunk.count)):
        item.problem = f"{members[0].sources[0]} is cut into {chunk.count} parts but the rules use only parts {sorted(by_part)}"
        return item
    if len(posts) != 1:
        item.problem = f"the parts of {members[0].sources[0]} are treated differently after the cut (a converter applies the same ops to all)"
        return item
    if chunk.parts is not None:
        item.operations.append(f"Chunk(dim={chunk.axis})")
    elif members[0].ops[position + 1 :]:
        item.problem = f"Split sizes {members[0].sources[0]} by the target parameters, which later ops change"
    else:
        item.operations.append(f"Split(dim={chunk.axis})")
    _add_unary(item, members[0].ops[position + 1 :], single=len(members) == 1)
    return item


# ---------------------------------------------------------------------------- gathered stacks of several sources

PROBE_SIZES = (3, 5, 2, 7, 4, 6)  # instance axes of a probe, when the checkpoint's are too large or unknown
PROBE_COUNTS = (3, 4)  # instances per source, when the checkpoint's count is unknown
PROBE_LIMIT = 1 << 18  # elements of all probe instances together, above which the real sizes are not used


def _probe_layouts(rule: Rule, source: ParamTree | None) -> list[tuple[tuple[int, ...], int]]:
    """(instance shape, instances per source) to run a gathered rule on: the checkpoint's own (sizes
    replaced by small ones when the tensors are large), else every rank up to 4 and two counts."""
    (variable,) = rule.gathered
    if source is not None:
        shapes, counts = set(), set()
        for text in rule.sources:
            pattern = template(text)
            groups: dict[tuple, list[str]] = {}
            for key in source.keys():
                found = pattern.match(key)
                if found is not None:
                    groups.setdefault(tuple(v for k, v in sorted(found.items()) if k != variable), []).append(key)
            if groups:
                first = groups[min(groups)]
                counts.add(len(first))
                shapes.add(tuple(source[first[0]].shape))
        if len(shapes) == 1 and len(counts) == 1:
            (shape,), (count,) = shapes, counts
            if prod(shape) * count * len(rule.sources) > PROBE_LIMIT:
                shape = tuple(PROBE_SIZES[k % len(PROBE_SIZES)] for k in range(len(shape)))
            return [(tuple(shape), count)]
    return [(PROBE_SIZES[:rank], count) for rank in range(1, 5) for count in PROBE_COUNTS]


def _equivalent_splits(rule: Rule, position: int, shape: tuple[int, ...], count: int) -> set[tuple[int, int, int]] | None:
    """Every (ops after the stack used, stack axis, concat axis) for which stacking each source's
    instances on the stack axis, concatenating the sources on the concat axis and running the
    remaining ops gives what the rule gives, on one probe; both spellings of each axis (k and
    k - ndim). None if the rule does not run on this probe."""
    n = len(rule.sources)
    size = prod(shape)
    instances = [np.arange(k * size, (k + 1) * size, dtype=np.int64).reshape(shape) for k in range(n * count)]
    try:
        want = np.asarray(apply_chain(rule.ops, instances))
        pre = [np.asarray(apply_chain(rule.ops[:position], [x])) for x in instances]
    except (MatcherError, ValueError, IndexError, TypeError):
        return None
    ndim = pre[0].ndim + 1  # after the stack
    post = rule.ops[position + 1 :]
    found = set()
    for stack_axis in range(ndim):
        stacked = [np.stack(pre[j * count : (j + 1) * count], axis=stack_axis) for j in range(n)]
        for concat_axis in range(ndim):
            joined = np.concatenate(stacked, axis=concat_axis)
            for used in range(len(post) + 1):
                try:
                    got = np.asarray(apply_chain(post[used:], [joined]))
                except (MatcherError, ValueError, IndexError, TypeError):
                    continue
                if got.shape == want.shape and np.array_equal(got, want):
                    found |= {(used, s, c) for s in (stack_axis, stack_axis - ndim) for c in (concat_axis, concat_axis - ndim)}
    return found


def _stacks_then_concatenation(rule: Rule, position: int, source: ParamTree | None) -> tuple[int, int, int]:
    """(stack axis, concat axis, ops after the stack they stand for) such that transformers'
    ``MergeModulelist(dim=stack axis), Concatenate(dim=concat axis)`` followed by the rest of the
    rule's ops computes the rule on every probe the rule runs on: the most ops replaced, then axes
    counted from the front. Stacking each source's instances and joining the stacks on the same axis
    is the rule's own stack (its instances come source by source), so (axis, axis, 0) always holds."""
    axis = rule.ops[position].axis
    agreed = None
    for shape, count in _probe_layouts(rule, source):
        found = _equivalent_splits(rule, position, shape, count)
        if found is not None:
            agreed = found if agreed is None else agreed & found
    if not agreed:  # no probe ran (a size the probes do not have): the identity
        return axis, axis, 0
    used, stack_axis, concat_axis = min(agreed, key=lambda c: (-c[0], c[1] < 0, c[2] < 0, abs(c[1]), abs(c[2])))
    return stack_axis, concat_axis, used


# ---------------------------------------------------------------------------- names: blocks and leaves


def _regex(text: str, captured: str | None = None) -> str:
    """A regex matching instances of the template ``text``; ``captured`` becomes group 1."""
    out, position = [], 0
    for match in PLACEHOLDER.finditer(text):
        out.append(re.escape(text[position : match.start()]))
        out.append(r"(\d+)" if match.group(1) == captured else r"\d+")
        position = match.end()
    return "".join(out) + re.escape(text[position:])


def _replacement(text: str, captured: str) -> str:
    return text.replace("{" + captured + "}", "\\1")


@dataclass(frozen=True)
class Block:
    """A repeated block: its source prefix, its target prefix, and the scope of its leaves."""

    source: str
    target: str

    @property
    def scope(self) -> str:
        """The target prefix up to the segment holding the index: what scope_prefix can name."""
        head = self.target[: self.target.index("{")]
        return head[: max(head.rfind("."), 0)]


def _block_of(item: Item) -> tuple[Block, str] | None:
    """The block an item lives in (prefixes end with the segment holding the layer index) and its variable."""
    variables = template(item.targets[0]).variables
    if len(variables) != 1:
        return None
    (variable,) = variables
    carrier = next((s for s in item.sources if variable in template(s).variables), None)
    if carrier is None:
        return None
    source = carrier[: segment_end(carrier, variable)]
    target = item.targets[0][: segment_end(item.targets[0], variable)]
    fits = all(s.startswith(source) for s in item.sources) and all(t.startswith(target) for t in item.targets)
    # leaves are matched after the segment holding the index, so both prefixes must end with a separator
    ends = target.endswith(".") and source.endswith(tuple(SEPARATORS))
    return (Block(source, target), variable) if fits and ends else None


@dataclass
class Transform:
    """One WeightRenaming or WeightConverter as it will be written, and how transformers will match it."""

    item: Item | None
    sources: list[str]  # regexes
    targets: list[str]  # replacements
    scope: str | None = None
    implied: bool = False  # a leaf the block's prefix renaming already gets right: checked, not written

    @property
    def converts(self) -> bool:
        return self.item is not None and bool(self.item.operations)

    def text(self) -> str:
        sources = [raw_string(s) for s in self.sources]
        targets = [raw_string(t) if "\\" in t else python_string(t) for t in self.targets]
        source = sources[0] if len(sources) == 1 else "[" + ", ".join(sources) + "]"
        if len(source) > 100:
            source = "[\n" + "".join(f"{INDENT * 2}{s},\n" for s in sources) + INDENT + "]"
        target = targets[0] if len(targets) == 1 else "[" + ", ".join(targets) + "]"
        if not self.converts:
            line = f"WeightRenaming({source}, {target}),"
        else:
            line = f"WeightConverter({source}, {target}, operations=[{', '.join(self.item.operations)}]),"
        if len(line) > 116:
            if not self.converts:
                line = f"WeightRenaming(\n{INDENT}{source},\n{INDENT}{target},\n),"
            else:
                line = (f"WeightConverter(\n{INDENT}{source},\n{INDENT}{target},\n"
                        f"{INDENT}operations=[{', '.join(self.item.operations)}],\n),")
        return line


# ---------------------------------------------------------------------------- simulation of transformers' key matching


def _compiled(transform: Transform) -> re.Pattern:
    branches = []
    for n, pattern in sorted(enumerate(transform.sources), key=lambda item: -len(item[1])):
        if re.search(r"[a-zA-Z0-9]$", pattern):
            pattern += r"(?!\w)"
        branches.append(f"(?P<g{n}>{pattern})")
    return re.compile("|".join(branches))


def _apply(transform: Transform, key: str) -> str | None:
    """``key`` renamed by ``transform`` (WeightTransform.rename_source_key), or None if it does not match."""
    prefix = transform.scope + "." if transform.scope else ""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    compiled = _compiled(transform)
    match = compiled.search(rest)
    if match is None:
        return None
    group = next(name for name, value in match.groupdict().items() if value is not None)
    replacement = transform.targets[0]
    if "\\1" in replacement:
        replacement = replacement.replace("\\1", match.group(compiled.groupindex[group] + 1))
    return prefix + rest.replace(match.group(0), replacement, 1)


def _land(key: str, renamings: list[Transform], converters: list[Transform], builtin: "Builtin") -> tuple[str, object | None]:
    """Where transformers puts ``key`` (rename_source_key): every renaming in turn, the snippet's
    first, then the first converter that matches; transformers' own transforms are its real objects."""
    for renaming in renamings:
        key = _apply(renaming, key) or key
    for transform in builtin.renamings:
        key, _ = transform.rename_source_key(key)
    for converter in converters:
        renamed = _apply(converter, key)
        if renamed is not None:
            return renamed, converter
    for transform in builtin.converters:
        renamed, pattern = transform.rename_source_key(key)
        if pattern is not None:
            return renamed, transform
    return key, None


def _instance(text: str, layer_variables, gathered_index: int) -> str:
    """One concrete instance of a template: layer 1, and instance ``gathered_index`` of a gathered placeholder."""
    return PLACEHOLDER.sub(lambda m: "1" if m.group(1) in layer_variables else str(gathered_index), text)


def _checks(transforms: list[Transform], builtin: "Builtin") -> list[str]:
    """Where transformers would load one instance of each rule's sources, when that is not the rule's target
    (or a transform other than the rule's own, such as one of transformers' own conversions, would load it)."""
    renamings = [t for t in transforms if not t.converts and not t.implied]
    converters = [t for t in transforms if t.converts]
    problems = []
    for transform in transforms:
        item = transform.item
        if item is None:
            continue
        layer = set(template(item.targets[0]).variables)
        expected = _instance(item.targets[0], layer, 0)
        for source in item.sources:
            gathers = set(template(source).variables) - layer
            for index in (0, 1) if gathers else (0,):
                key = _instance(source, layer, index)
                landed, by = _land(key, renamings, converters, builtin)
                if landed != expected or by is not (transform if transform.converts else None):
                    problems.append(f"{key} would load as {landed}, not {expected}")
    seen: dict[str, Transform] = {}
    for converter in converters:  # transformers finds a converter by its source pattern text
        for pattern in converter.sources:
            other = seen.setdefault(pattern, converter)
            if other is not converter and (other.targets, other.item.operations) != (converter.targets, converter.item.operations):
                problems.append(f"two converters share the pattern {pattern} but differ")
    return problems


# ---------------------------------------------------------------------------- the snippet


def _transforms(items: list[Item]) -> tuple[list[Transform], list[tuple[Block, list[Transform]]]]:
    """Transforms outside the blocks (whole keys), and per block its prefix renaming and leaves."""
    outside: list[Transform] = []
    blocks: dict[Block, list[Transform]] = {}
    for item in items:
        if item.problem:
            continue
        found = _block_of(item)
        if found is None:
            # a gathered placeholder stays a plain \d+; a layer index only in whole keys is captured
            variables = template(item.targets[0]).variables
            captured = variables[0] if len(variables) == 1 else None
            if variables and (len(variables) > 1 or item.operations):
                item.problem = f"{item.targets[0]}: a templated converter needs a block its index sits in"
                continue
            sources = ["^" + _regex(s, captured) + "$" for s in item.sources]
            targets = [_replacement(t, captured) if captured else t for t in item.targets]
            outside.append(Transform(item, sources, targets))
            continue
        block, variable = found
        leaves = [r"(?<=\.)" + _regex(s[len(block.source) :]) + "$" for s in item.sources]
        targets = [t[len(block.target) :] for t in item.targets]
        implied = not item.operations and item.sources[0][len(block.source) :] == targets[0]
        blocks.setdefault(block, []).append(Transform(item, leaves, targets, block.scope, implied))
    return outside, list(blocks.items())


def _ordered(outside: list[Transform], blocks: list[tuple[Block, list[Transform]]], builtin: "Builtin") -> tuple[list[Transform], list[str]]:
    """All transforms in the mapping's order, unless that lets a short leaf take a longer leaf's key
    (a converter's key goes to the first that matches): then longer leaves first."""
    def flat(blocks):
        return outside + [t for block, members in blocks for t in [_prefix_renaming(block), *members]]

    transforms = flat(blocks)
    checks = _checks(transforms, builtin)
    if checks:
        longest_first = [(block, sorted(members, key=lambda t: -max(len(s) for s in t.sources))) for block, members in blocks]
        if len(_checks(flat(longest_first), builtin)) < len(checks):
            blocks[:] = longest_first
            transforms = flat(blocks)
            checks = _checks(transforms, builtin)
    return transforms, checks


# ---------------------------------------------------------------------------- transformers' own conversions


@dataclass
class Builtin:
    """transformers' own transforms that from_pretrained applies after the registered CONVERSIONS:
    those of the target's sub-models (found by their class name or model type, e.g. MixtralModel's
    ``.block_sparse_moe. -> .mlp.`` inside MixtralForCausalLM) and the legacy renamings."""

    inner: list = field(default_factory=list)  # the sub-models' transforms (real objects)
    legacy: list = field(default_factory=list)
    inner_models: list[str] = field(default_factory=list)  # the sub-models' class names

    @property
    def transforms(self) -> list:
        return self.inner + self.legacy

    @property
    def renamings(self) -> list:
        from transformers.core_model_loading import WeightConverter

        return [t for t in self.transforms if not isinstance(t, WeightConverter)]

    @property
    def converters(self) -> list:
        from transformers.core_model_loading import WeightConverter

        return [t for t in self.transforms if isinstance(t, WeightConverter)]

    def without_inner(self) -> "Builtin":
        return Builtin([], self.legacy, [])


def builtin_conversions(target_class: str | None, config) -> Builtin:
    """What transformers would add to CONVERSIONS registered for ``target_class``: the class is built
    on the meta device (from ``config``, else its default config) and transformers' own
    ``get_model_conversion_mapping`` is asked, with an empty list standing in for CONVERSIONS."""
    if not target_class:
        return Builtin()
    try:
        import torch

        from ..targets import import_transformers

        transformers = import_transformers()
        from transformers import PreTrainedModel, conversion_mapping

        model_class = getattr(transformers, target_class)
        with torch.device("meta"):
            model = model_class(config if config is not None else model_class.config_class())
    except Exception:  # no such class, or a config it cannot be built from: nothing known to add
        return Builtin()
    conversion_mapping.get_checkpoint_conversion_mapping(target_class)  # builds the registry
    registry = conversion_mapping._checkpoint_conversion_mapping_cache
    missing = object()
    before, registered = registry.get(target_class, missing), target_class in conversion_mapping.USER_REGISTERED_MAPPINGS
    registry[target_class] = []
    try:
        inner = conversion_mapping.get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # transformers' own lookup failing: nothing known to add
        inner = []
    finally:
        if before is missing:
            registry.pop(target_class, None)
        else:
            registry[target_class] = before
        if not registered:
            conversion_mapping.USER_REGISTERED_MAPPINGS.discard(target_class)
    legacy = conversion_mapping.get_checkpoint_conversion_mapping("legacy") or []
    names = []
    for name, module in model.named_modules():
        if name and isinstance(module, PreTrainedModel) and type(module).__name__ not in names:
            lookup = conversion_mapping.get_checkpoint_conversion_mapping
            if lookup(type(module).__name__) is not None or lookup(module.config.model_type) is not None:
                names.append(type(module).__name__)
    return Builtin(inner, legacy, names)


def _prefix_renaming(block: Block) -> Transform:
    (variable,) = template(block.target).variables
    return Transform(None, ["^" + _regex(block.source, variable)], [_replacement(block.target, variable)])


@register("transformers")
def emit_transformers(subject: Subject) -> str:
    items = items_of(subject.mapping.rules, subject.source)
    outside, blocks = _transforms(items)
    builtin = builtin_conversions(subject.target_class, subject.config)
    silenced: list[str] = []
    transforms, checks = _ordered(outside, blocks, builtin)
    if checks and builtin.inner:  # transformers' conversions for the sub-models get in the way: turn them off
        alone = builtin.without_inner()
        transforms_alone, checks_alone = _ordered(outside, blocks, alone)
        if len(checks_alone) < len(checks):
            transforms, checks, silenced = transforms_alone, checks_alone, builtin.inner_models
    problems = [item.problem for item in items if item.problem]
    custom = set().union(*(item.custom for item in items if not item.problem))
    for name in list(custom):
        custom.update(CUSTOM_NEEDS.get(name, ()))
    used = {"WeightRenaming"} | {"WeightConverter" for t in transforms if t.converts}
    for transform in transforms:
        for op in transform.item.operations if transform.converts else []:
            name = op.split("(")[0]
            if name not in CUSTOM_OPS:
                used.add(name)
    if custom:
        used.add("ConversionOps")
    target = subject.target_class or "TARGET_CLASS"
    lines = [
        f'"""Conversion mapping for {target}, made by `match --emit transformers` from {subject.made_from}.',
        "",
        f"Register it, then {target}.from_pretrained(directory) loads a directory holding the original",
        "tensors under the names `match` lists (saved as model.safetensors) and the target's config.json,",
        "converting them as it loads:",
        "",
        "    register()",
        f"    model = {target}.from_pretrained(directory)",
        '"""',
    ]
    notes = [f"NOT EXPRESSED: {p}" for p in problems] + [f"CHECK: {c}" for c in checks]
    notes += [f"MISSING: {m}" for m in subject.missing]
    if notes:
        lines += ["", *[f"# {note}" for note in notes]]
    lines += ["", "from transformers.conversion_mapping import register_checkpoint_conversion_mapping"]
    lines.append(f"from transformers.core_model_loading import {', '.join(sorted(used))}")
    if custom:
        lines += ["", "", PER_TENSOR.rstrip("\n")]
        lines += [part for name in CUSTOM_OPS if name in custom for part in ("", "", CUSTOM_OPS[name].rstrip("\n"))]
    if any(not t.implied for _, members in blocks for t in members):
        lines += ["", "", SCOPED.rstrip("\n")]
    lines += ["", "", "CONVERSIONS = ["]
    if outside:
        lines.append(f"{INDENT}# whole keys, outside the repeated blocks")
        lines += indented([t.text() for t in outside], INDENT)
    for block, members in blocks:
        written = [t for t in members if not t.implied]
        lines.append(f"{INDENT}# {block.source} -> {block.target}: move the block" + (", then rename inside it" if written else ""))
        lines += indented([_prefix_renaming(block).text()], INDENT)
        if written:
            lines.append(f"{INDENT}*scoped({python_string(block.scope)}, [")
            lines += indented([t.text() for t in written], INDENT * 2)
            lines.append(f"{INDENT}]),")
    lines.append("]")
    if silenced:
        lines += [
            "",
            f"# transformers would also apply its own conversions for {', '.join(silenced)} inside {target}, after",
            "# CONVERSIONS, and they would take some of these keys first; register() turns them off (also when",
            f"# {', '.join(silenced)} is loaded on its own, in this process).",
            f"INNER_MODELS = [{', '.join(python_string(n) for n in silenced)}]",
        ]
    lines += [
        "",
        "",
        "def register(overwrite=True):",
        f'{INDENT}"""Make {target}.from_pretrained apply CONVERSIONS' + (' and nothing else of its own."""' if silenced else '."""'),
        f"{INDENT}register_checkpoint_conversion_mapping({python_string(target)}, CONVERSIONS, overwrite=overwrite)",
    ]
    if silenced:
        lines += [
            f"{INDENT}for name in INNER_MODELS:",
            f"{INDENT * 2}register_checkpoint_conversion_mapping(name, [], overwrite=overwrite)",
        ]
    return "\n".join(lines) + "\n"
