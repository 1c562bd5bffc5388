"""Acceptance harness for the automatic matcher (issue 4).

Three parts, all usable without the matcher:

- ``equivalent(inferred, known, source, target)``: lay two mappings over the same trees and say,
  per target tensor, whether they read the same sources (in the same order) and transform them
  the same way. Op chains are compared by *running* them on distinct-valued integer probes of the
  source shapes (``np.arange``; no checkpoint data is read), so two spellings of one transform
  (``merge_axes`` then ``transpose`` vs ``transpose`` then ``merge_axes``; ``chunk`` by parts vs by
  sizes; ``squeeze 0`` vs ``merge_axes 0..1`` on a leading 1) agree, and a swapped q/k, a missing
  transpose or a wrong chunk index disagree.
- Shape-only source trees at real sizes, made by running the known mapping backwards over a target
  built on the meta device (``shape_tree_from_known``), with ready-made cases for SigLIP
  base/large/so400m (big_vision npz layout), OpenAI CLIP ViT-B/16 and ViT-L/14 and timm ViT-B/16.
- Variants of a source tree (shuffled key order, a ``module.``/``model.`` prefix, fp16/bf16,
  opaque q/k/v names) together with the known mapping transformed to match, so ``equivalent``
  can still judge the matcher on them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping as MappingABC, NamedTuple, Sequence

import numpy as np

from matcher.convert import make_plan
from matcher.errors import MatcherError
from matcher.mapping import Declared, ExpandedRule, Mapping, Rule, _expand_rule
from matcher.ops import Chunk, Concat, Op, SplitAxis, Squeeze, Stack, Transpose, Unsqueeze, apply_chain, chain_output_shape
from matcher.patterns import template
from matcher.tree import ParamTree, TensorSpec, numpy_dtype

Shape = tuple[int, ...]
ROOT = Path(__file__).resolve().parents[2]
KNOWN = ROOT / "known_mappings"

# ====================================================================================== equivalence


def describe(rule: ExpandedRule | None) -> str:
    """``ops | ops <- source, source`` for one concrete rule ("rename" when there are no ops)."""
    if rule is None:
        return "(not written)"
    chain = " | ".join(str(op) for op in rule.ops) or "rename"
    return f"{chain} <- {', '.join(rule.sources)}"


@dataclass
class Comparison:
    """Per target tensor: do the inferred and the known mapping produce the same thing?"""

    agree: list[str] = field(default_factory=list)
    disagree: list[tuple[str, str, str]] = field(default_factory=list)  # (target, inferred, known)
    only_known: list[str] = field(default_factory=list)  # the known mapping writes it, the inferred does not
    only_inferred: list[str] = field(default_factory=list)  # the inferred mapping writes it, the known does not
    inferred_problems: list[str] = field(default_factory=list)  # rules of the inferred mapping that do not fit the trees
    known_problems: list[str] = field(default_factory=list)  # should stay empty: the known mapping fits its trees
    through_aliases: list[str] = field(default_factory=list)  # agreeing only because two source keys hold the same data

    @property
    def known_total(self) -> int:
        return len(self.agree) + len(self.disagree) + len(self.only_known)

    @property
    def fraction(self) -> float:
        """Agreeing targets / every target the known mapping writes."""
        return len(self.agree) / self.known_total if self.known_total else 1.0

    @property
    def exact(self) -> bool:
        """The inferred mapping writes exactly what the known one writes, and nothing else."""
        return not (self.disagree or self.only_known or self.only_inferred or self.inferred_problems or self.known_problems)

    def __str__(self) -> str:
        lines = [f"{len(self.agree)}/{self.known_total} target tensors agree ({100 * self.fraction:.1f}%)"]

        def block(title: str, items: Sequence[str], limit: int = 12) -> None:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in items[:limit])
                if len(items) > limit:
                    lines.append(f"  ... {len(items) - limit} more")

        block("disagree", [f"{t}\n      inferred: {i}\n      known:    {k}" for t, i, k in self.disagree])
        block("only the known mapping writes", self.only_known)
        block("only the inferred mapping writes", self.only_inferred)
        block("inferred mapping problems", self.inferred_problems)
        block("known mapping problems", self.known_problems)
        block("agree through data aliases", self.through_aliases, limit=4)
        return "\n".join(lines)


def _probes(shapes: Sequence[Shape]) -> list[np.ndarray]:
    """One integer array per source, every element of every array a different value."""
    total = sum(math.prod(s) for s in shapes)
    dtype = np.int32 if total < 2**31 else np.int64
    arrays, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        arrays.append(np.arange(offset, offset + size, dtype=dtype).reshape(shape))
        offset += size
    return arrays


def _ops_key(ops: Sequence[Op]) -> str:
    return json.dumps([op.to_dict() for op in ops], sort_keys=True, default=str)


def _run(ops: Sequence[Op], shapes: Sequence[Shape]) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.asarray(apply_chain(ops, _probes(shapes))), None
    except Exception as exc:  # an inferred chain that does not even run on these shapes
        return None, f"{type(exc).__name__}: {exc}"


def equivalent(
    inferred: Mapping,
    known: Mapping,
    source: ParamTree,
    target: ParamTree,
    aliases: MappingABC[str, str] | None = None,
) -> Comparison:
    """Compare two mappings per target key over the same trees.

    Equal means: the same source keys in the same order (after ``aliases``, which maps a source
    key to a canonical key holding bit-identical data, see ``data_aliases``), and op chains that
    give bit-identical arrays on distinct-valued probes of the source shapes.
    """
    aliases = aliases or {}
    canon = lambda keys: tuple(aliases.get(k, k) for k in keys)  # noqa: E731
    known_x = known.expand(source.keys(), target.keys())
    inferred_x = inferred.expand(source.keys(), target.keys())
    known_by = {r.target: r for r in known_x.rules}
    inferred_by = {r.target: r for r in inferred_x.rules}
    result = Comparison(inferred_problems=list(inferred_x.problems), known_problems=list(known_x.problems))
    cache: dict[tuple, str | None] = {}
    for key in target.keys():
        k = known_by.get(key)
        i = inferred_by.get(key)
        if k is None:
            if i is not None:
                result.only_inferred.append(key)
            continue
        if i is None:
            result.only_known.append(key)
            continue
        if canon(i.sources) != canon(k.sources):
            result.disagree.append((key, describe(i), describe(k)))
            continue
        why = None
        if _ops_key(i.ops) != _ops_key(k.ops):
            shapes = tuple(tuple(source[s].shape) for s in k.sources)
            signature = (shapes, _ops_key(i.ops), _ops_key(k.ops))
            if signature not in cache:
                cache[signature] = _compare_chains(i.ops, k.ops, shapes)
            why = cache[signature]
        if why is None:
            result.agree.append(key)
            if i.sources != k.sources:
                result.through_aliases.append(f"{key}: {', '.join(i.sources)} ~ {', '.join(k.sources)}")
        else:
            result.disagree.append((key, f"{describe(i)}  [{why}]", describe(k)))
    return result


def _compare_chains(inferred_ops, known_ops, shapes) -> str | None:
    """None when both chains give the same array on the probes, else why not."""
    want, error = _run(known_ops, shapes)
    if error:
        return f"the known chain fails: {error}"
    got, error = _run(inferred_ops, shapes)
    if error:
        return error
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, want {tuple(want.shape)}"
    if not np.array_equal(got, want):
        return "same shape, different elements"
    return None


def data_aliases(tree: ParamTree) -> dict[str, str]:
    """Source keys whose data is bit-identical to an earlier key's (a module saved twice, as
    CLIPSeg's ``model.*`` = ``clip_model.visual.*``): key -> the first such key in tree order."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key in tree.keys():
        array = np.ascontiguousarray(np.asarray(tree.read(key)))
        digest = (str(array.dtype), array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if digest in first:
            aliases[key] = first[digest]
        else:
            first[digest] = key
    return aliases


def same_arrays(got: MappingABC[str, Any], want: MappingABC[str, Any]) -> list[str]:
    """Bit-exact comparison of two ``name -> array`` dicts (numpy or torch): what differs."""
    differences = []
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            differences.append(f"{name}: only in {'the first' if name in got else 'the second'}")
            continue
        a, b = _raw(got[name]), _raw(want[name])
        if a[0] != b[0] or a[1] != b[1]:
            differences.append(f"{name}: {a[0]} {a[1]} vs {b[0]} {b[1]}")
        elif a[2] != b[2]:
            differences.append(f"{name}: different bytes")
    return differences


def _raw(x: Any) -> tuple[str, tuple, bytes]:
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu().contiguous()
        dtype = str(x.dtype).removeprefix("torch.")
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return dtype, tuple(x.shape), x.view(as_int).numpy().tobytes()
    x = np.ascontiguousarray(np.asarray(x))
    return x.dtype.name, tuple(x.shape), x.tobytes()


# ====================================================================================== shape-only trees


class NeedShape(Exception):
    """An op whose inverse needs a size the target shape does not show (merge_axes)."""


def _backward_op(op: Op, out: Shape) -> Shape:
    out = tuple(out)
    if isinstance(op, Transpose):
        shape = [0] * len(out)
        for k, p in enumerate(op.perm):
            shape[p] = out[k]
        return tuple(shape)
    if isinstance(op, Squeeze):
        axis = op.axis % (len(out) + 1)
        return out[:axis] + (1,) + out[axis:]
    if isinstance(op, Unsqueeze):
        axis = op.axis % len(out)
        return out[:axis] + out[axis + 1 :]
    if isinstance(op, SplitAxis):
        ndim = len(out) - len(op.sizes) + 1
        axis = op.axis % ndim
        return out[:axis] + (math.prod(out[axis : axis + len(op.sizes)]),) + out[axis + len(op.sizes) :]
    raise NeedShape(op.name)


def _backward(ops: Sequence[Op], shape: Shape) -> Shape:
    for op in reversed(ops):
        shape = _backward_op(op, shape)
    return tuple(shape)


def _rule_source_shapes(rule: Rule, out: Shape) -> list[tuple[str, Shape]]:
    combine = next((k for k, op in enumerate(rule.ops) if op.combines), None)
    select = next((k for k, op in enumerate(rule.ops) if op.selects), None)
    if combine is not None:
        if rule.gathered:
            raise NeedShape("gathered stack")
        pre, op, post = rule.ops[:combine], rule.ops[combine], rule.ops[combine + 1 :]
        whole = _backward(post, out)
        if isinstance(op, Concat):  # parts assumed equal (q, k, v); give the shapes otherwise
            axis = op.axis % len(whole)
            if whole[axis] % len(rule.sources):
                raise NeedShape("unequal concat")
            part = whole[:axis] + (whole[axis] // len(rule.sources),) + whole[axis + 1 :]
        elif isinstance(op, Stack):
            axis = op.axis % len(whole)
            part = whole[:axis] + whole[axis + 1 :]
        else:
            raise NeedShape(op.name)
        return [(s, _backward(pre, part)) for s in rule.sources]
    if select is not None:
        pre, op, post = rule.ops[:select], rule.ops[select], rule.ops[select + 1 :]
        part = _backward(post, out)
        if not isinstance(op, Chunk):
            raise NeedShape(op.name)
        axis = op.axis % len(part)
        size = part[axis] * op.parts if op.parts is not None else sum(op.sizes)
        return [(rule.sources[0], _backward(pre, part[:axis] + (size,) + part[axis + 1 :]))]
    return [(rule.sources[0], _backward(rule.ops, out))]


def derive_source_shapes(known: Mapping, target_tree: ParamTree) -> dict[str, Shape]:
    """Source pattern -> shape, by running each rule backwards from its target's shape.

    Patterns behind a ``merge_axes`` (the factors are lost) or an unequal concat are left out;
    ``shape_tree_from_known`` takes them from its ``source_shapes_fn``.
    """
    shapes: dict[str, Shape] = {}
    for rule in known.rules:
        pattern = template(rule.target)
        key = next((k for k in target_tree.keys() if pattern.match(k) is not None), None)
        if key is None:
            continue
        try:
            for source, shape in _rule_source_shapes(rule, target_tree[key].shape):
                shapes.setdefault(source, shape)
        except NeedShape:
            continue
    return shapes


def _shape_lookup(fn) -> Callable[[str], Shape | None]:
    if fn is None:
        return lambda pattern: None
    if callable(fn):
        return fn

    def lookup(pattern: str) -> Shape | None:
        if pattern in fn:
            return tuple(fn[pattern])
        t = template(pattern)
        return next((tuple(s) for k, s in fn.items() if t.match(k) is not None), None)

    return lookup


def shape_tree_from_known(
    known: Mapping,
    target_tree: ParamTree,
    source_shapes_fn: Callable[[str], Shape | None] | MappingABC[str, Shape] | None = None,
    *,
    origin: str = "",
) -> ParamTree:
    """The source ParamTree (specs only, loader None) that ``known`` maps onto ``target_tree``.

    Built by reversing ``known`` over the target's keys and shapes. ``source_shapes_fn`` gives the
    shape of a source pattern where the target cannot show it (the (D, H, Dh) of an attention
    kernel merged to (D, H*Dh)): a function returning a shape or None, or a dict of keys/patterns.
    Everything else is derived. Keys come in target order (layer-major, as real checkpoints).
    Sources the known mapping drops are not in the tree. Raises unless ``known`` then fits exactly.
    """
    derived = derive_source_shapes(known, target_tree)
    given = _shape_lookup(source_shapes_fn)

    def shape_of(pattern: str) -> Shape | None:
        shape = given(pattern)
        return tuple(shape) if shape is not None else derived.get(pattern)

    backward = known.reverse(shape_of)
    target_keys = list(target_tree.keys())
    position = {k: n for n, k in enumerate(target_keys)}
    problems: list[str] = []
    entries: list[tuple[int, str, Shape, str]] = []
    for rule in backward.rules:
        for instance in _expand_rule(rule, target_keys, [], problems):
            if not all(s in target_tree for s in instance.sources):
                continue
            shape = chain_output_shape(instance.ops, [target_tree[s].shape for s in instance.sources])
            dtype = target_tree[instance.sources[0]].dtype
            entries.append((min(position[s] for s in instance.sources), instance.target, shape, dtype))
    entries.sort(key=lambda e: e[0])
    specs: dict[str, TensorSpec] = {}
    for _, name, shape, dtype in entries:
        if name in specs:
            problems.append(f"{name}: made twice")
        specs[name] = TensorSpec(name, tuple(shape), dtype)
    if problems:
        raise MatcherError(f"cannot build a source tree from the known mapping: {'; '.join(problems[:5])}")
    tree = ParamTree(specs, loader=None, origin=origin or f"shapes of {known.meta.get('family', 'a mapping')}", format="shapes")
    plan = make_plan(tree, target_tree, known)
    if not plan.expansion.complete:
        raise MatcherError(f"the known mapping does not fit the tree built from it: {plan.expansion.summary()}")
    return tree


class Case(NamedTuple):
    """What every acceptance case is: a source tree, a target tree and the mapping between them."""

    source: ParamTree
    target: ParamTree
    known: Mapping


def _shim() -> None:
    from matcher.compat import install_torchvision_shim

    install_torchvision_shim()


# -- SigLIP (seed 000: get_siglip_config) --------------------------------------------------------

SIGLIP_SIZES = {
    # width, MLP, layers, heads (both towers), image side, patch side
    "base-patch16-224": (768, 3072, 12, 12, 224, 16),
    "large-patch16-256": (1024, 4096, 24, 16, 256, 16),
    "so400m-patch14-384": (1152, 4304, 27, 16, 384, 14),
}


def siglip_config(name: str):
    """The SiglipConfig seed 000 builds for ``siglip-<name>`` (vocabulary 32000, not i18n)."""
    _shim()
    from transformers import SiglipConfig

    width, mlp, layers, heads, image, patch = SIGLIP_SIZES[name]
    tower = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)
    # token ids inside the vocabulary only to keep transformers' config validation quiet
    text = dict(tower, vocab_size=32000, pad_token_id=1, bos_token_id=31998, eos_token_id=31999)
    return SiglipConfig(text_config=text, vision_config=dict(tower, image_size=image, patch_size=patch))


def siglip_source_shapes(config) -> Callable[[str], Shape | None]:
    """big_vision attention shapes from the config: q/k/v kernels (D, H, Dh), biases (H, Dh), out (H, Dh, D)."""

    def shape(pattern: str) -> Shape | None:
        if pattern.startswith("params/img/"):
            tower = config.vision_config
        elif pattern.startswith("params/txt/"):
            tower = config.text_config
        else:
            return None
        d, h = tower.hidden_size, tower.num_attention_heads
        if re.search(r"/(query|key|value)/kernel$", pattern):
            return (d, h, d // h)
        if re.search(r"/(query|key|value)/bias$", pattern):
            return (h, d // h)
        if pattern.endswith("/out/kernel"):
            return (h, d // h, d)
        return None

    return shape


def case_from_known(target_class: str, config: Any, mapping: str | Path | Mapping, source_shapes_fn=None, origin: str = "") -> Case:
    """Target built on the meta device from ``config``, the source tree reversed from the known mapping."""
    from matcher.targets import build_target

    target = build_target(target_class, config).tree
    known = mapping if isinstance(mapping, Mapping) else Mapping.load(KNOWN / mapping)
    return Case(shape_tree_from_known(known, target, source_shapes_fn, origin=origin), target, known)


@functools.lru_cache(maxsize=None)
def siglip_case(name: str) -> Case:
    config = siglip_config(name)
    return case_from_known("SiglipModel", config, "siglip.yaml", siglip_source_shapes(config), f"big_vision siglip-{name} (shapes)")


# -- OpenAI CLIP -----------------------------------------------------------------------------

CLIP_HPARAMS = {
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12),
}


@functools.lru_cache(maxsize=None)
def clip_case(name: str) -> Case:
    from tests.fixtures import make_clip

    return case_from_known("CLIPModel", make_clip.target_config(CLIP_HPARAMS[name]), "clip.yaml", origin=f"OpenAI CLIP {name} (shapes)")


# -- timm ViT ----------------------------------------------------------------------------------


def vit_b16_config():
    """timm vit_base_patch16_224 as seed 004 describes it to ViTForImageClassification (1000 classes)."""
    _shim()
    from transformers import ViTConfig

    return ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
                     patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, num_labels=1000)


@functools.lru_cache(maxsize=None)
def vit_case() -> Case:
    return case_from_known("ViTForImageClassification", vit_b16_config(), "vit.yaml", origin="timm vit_base_patch16_224 (shapes)")


# name -> (target class, builder). Each builder returns Case(source_tree, target_tree, known_mapping).
REAL_CASES: dict[str, tuple[str, Callable[[], Case]]] = {  # ~1 s for all six after the imports
    **{f"siglip-{n}": ("SiglipModel", functools.partial(siglip_case, n)) for n in SIGLIP_SIZES},
    **{f"clip-{n}": ("CLIPModel", functools.partial(clip_case, n)) for n in CLIP_HPARAMS},
    "timm-vit_base_patch16_224": ("ViTForImageClassification", vit_case),
}


def clear_caches() -> None:
    """Forget the built real-size cases (to time a fresh build)."""
    for builder in (siglip_case, clip_case, vit_case):
        builder.cache_clear()


def reference_layout(name: str) -> dict[str, Shape]:
    """The source layout of a real case written by code that does not use our mapping: the fixture
    generator's big_vision table for SigLIP, and the original model built on the meta device for
    OpenAI CLIP (``clip.model.CLIP``) and timm. Used to check ``shape_tree_from_known``."""
    _shim()
    import torch

    if name.startswith("siglip-"):
        from tests.fixtures import make_siglip

        return make_siglip.big_vision_shapes(siglip_config(name.removeprefix("siglip-")))
    if name.startswith("clip-"):
        from clip.model import CLIP

        with torch.device("meta"):
            model = CLIP(**CLIP_HPARAMS[name.removeprefix("clip-")])
    elif name == "timm-vit_base_patch16_224":
        import timm

        with torch.device("meta"):
            model = timm.create_model("vit_base_patch16_224", pretrained=False)
    else:
        raise KeyError(name)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ====================================================================================== variants


def _retree(tree: ParamTree, specs: dict[str, TensorSpec], loader, what: str) -> ParamTree:
    return ParamTree(specs, loader=loader, origin=f"{tree.origin} [{what}]", format=tree.format, info=dict(tree.info))


def shuffled(tree: ParamTree, seed: int = 0) -> ParamTree:
    """The same tensors in a random key order (never the original one)."""
    keys = list(tree.keys())
    order = list(np.random.default_rng(seed).permutation(len(keys)))
    if len(keys) > 1 and order == sorted(order):
        order = order[1:] + order[:1]
    return _retree(tree, {keys[n]: tree[keys[n]] for n in order}, tree.loader, f"shuffled {seed}")


def prefixed(tree: ParamTree, prefix: str) -> ParamTree:
    """Every key behind ``prefix`` (a DDP ``module.`` or a Lightning ``model.``)."""
    specs = {prefix + k: replace(s, path=prefix + k) for k, s in tree.specs.items()}
    loader = None if tree.loader is None else (lambda key, inner=tree.loader: inner(key[len(prefix):]))
    return _retree(tree, specs, loader, f"prefixed {prefix!r}")


def prefix_mapping(known: Mapping, prefix: str) -> Mapping:
    """``known`` for a source tree whose keys got ``prefix``."""
    rules = tuple(replace(r, sources=tuple(prefix + s for s in r.sources)) for r in known.rules)
    dropped = tuple(Declared(prefix + d.pattern, d.why) for d in known.dropped)
    return Mapping(rules, dropped, known.initialised, dict(known.meta))


_FLOATS = {"float16", "bfloat16", "float32", "float64"}


def cast(tree: ParamTree, dtype: str) -> ParamTree:
    """Floating tensors stored as ``dtype`` (``float16``/``bfloat16``); data cast on read with ml_dtypes."""
    target = numpy_dtype(dtype)
    specs = {k: replace(s, dtype=dtype) if s.dtype in _FLOATS else s for k, s in tree.specs.items()}

    def load(key: str, inner=tree.loader) -> np.ndarray:
        array = inner(key)
        if type(array).__module__.startswith("torch"):
            from matcher.sources.torch_pickle import to_numpy

            array = to_numpy(array)
        array = np.asarray(array)
        return array.astype(target) if specs[key].dtype == dtype and array.dtype != target else array

    return _retree(tree, specs, None if tree.loader is None else load, dtype)


def concrete_rules(mapping: Mapping, rules: Iterable[Rule], source_keys: Sequence[str]) -> list[Rule]:
    """One placeholder-free rule per instance of each rule, bound from the source keys."""
    out: list[Rule] = []
    problems: list[str] = []
    for rule in rules:
        for instance in _expand_rule(rule, list(source_keys), [], problems):
            out.append(Rule(instance.target, instance.sources, instance.ops, rule.note))
    return out


class Variant(NamedTuple):
    tree: ParamTree
    known: Mapping  # the known mapping, transformed to fit ``tree``
    renamed: dict[str, str]  # new source key -> original key (opaque q/k/v only)


def opaque_qkv(tree: ParamTree, known: Mapping, seed: int = 0, names: Sequence[str] = ("query", "key", "value")) -> Variant:
    """Rename the q/k/v tensors of every attention block to ``w0, w1, w2`` in a different order per block.

    A block is a key prefix holding one path component named each of ``names`` (big_vision and
    scenic: ``.../MultiHeadDotProductAttention_0/{query,key,value}/{kernel,bias}``; the kernel and
    the bias of one projection keep one opaque name). The blocks cycle through all six orders
    (shuffled by ``seed``), and renamed keys are listed by their new name, so neither the names,
    the shapes nor the key order tell q, k and v apart. The known mapping's rules that read them
    become one concrete rule per block.
    """
    parts = {k: re.split(r"([/.])", k) for k in tree.keys()}
    blocks: dict[str, set[str]] = {}
    for key, tokens in parts.items():
        for n, token in enumerate(tokens):
            if token in names:
                blocks.setdefault("".join(tokens[:n]), set()).add(token)
                break
    full = sorted(b for b, found in blocks.items() if found == set(names))
    orders = list(itertools.permutations(range(len(names))))
    np.random.default_rng(seed).shuffle(orders)
    opaque = {b: orders[n % len(orders)] for n, b in enumerate(full)}
    renamed: dict[str, str] = {}  # old -> new
    groups: dict[str, list[str]] = {}  # the key with its q/k/v component starred -> old keys
    for key, tokens in parts.items():
        for n, token in enumerate(tokens):
            block = "".join(tokens[:n])
            if token in names and block in opaque:
                rest = tokens[n + 1 :]
                renamed[key] = "".join(tokens[:n] + [f"w{opaque[block][names.index(token)]}"] + rest)
                groups.setdefault("".join(tokens[:n] + ["*"] + rest), []).append(key)
                break
    # The renamed keys of a group take the places of the originals in the order of their new names.
    order = list(tree.keys())
    position = {k: n for n, k in enumerate(order)}
    placed: dict[str, str] = {}
    for members in groups.values():
        slots = sorted(members, key=position.__getitem__)
        for slot, old in zip(slots, sorted(members, key=lambda o: renamed[o])):
            placed[slot] = old
    specs: dict[str, TensorSpec] = {}
    back: dict[str, str] = {}
    for key in order:
        old = placed.get(key, key)
        new = renamed.get(old, old)
        specs[new] = replace(tree[old], path=new)
        back[new] = old
    loader = None if tree.loader is None else (lambda key, inner=tree.loader: inner(back[key]))
    new_tree = _retree(tree, specs, loader, "opaque q/k/v")
    affected = [r for r in known.rules if any(_reads_any(s, renamed) for s in r.sources)]
    kept = [r for r in known.rules if r not in affected]
    bound = [replace(r, sources=tuple(renamed.get(s, s) for s in r.sources)) for r in concrete_rules(known, affected, list(tree.keys()))]
    new_known = Mapping(tuple(kept + bound), known.dropped, known.initialised, dict(known.meta))
    return Variant(new_tree, new_known, {new: old for old, new in renamed.items()})


def _reads_any(pattern: str, keys: Iterable[str]) -> bool:
    t = template(pattern)
    return any(t.match(k) is not None for k in keys)


def targets_reading(mapping: Mapping, source: ParamTree, target: ParamTree, keys: Iterable[str]) -> list[str]:
    """Target keys whose rule (in ``mapping`` over these trees) reads any of ``keys``."""
    keys = set(keys)
    return [r.target for r in mapping.expand(source.keys(), target.keys()).rules if keys & set(r.sources)]


# Variants on which the matcher must find the whole known mapping.
COMPLETE_VARIANTS = ("plain", "shuffled", "prefixed-module", "prefixed-model", "float16", "bfloat16")


def make_variant(kind: str, tree: ParamTree, known: Mapping, seed: int = 0) -> Variant:
    """One of ``COMPLETE_VARIANTS`` or ``opaque-qkv``, with the known mapping to judge it by."""
    if kind == "plain":
        return Variant(tree, known, {})
    if kind == "shuffled":
        return Variant(shuffled(tree, seed), known, {})
    if kind.startswith("prefixed-"):
        prefix = kind.removeprefix("prefixed-") + "."
        return Variant(prefixed(tree, prefix), prefix_mapping(known, prefix), {})
    if kind in ("float16", "bfloat16"):
        return Variant(cast(tree, kind), known, {})
    if kind == "opaque-qkv":
        return opaque_qkv(tree, known, seed)
    raise KeyError(f"unknown variant {kind!r}")
