"""Accuracy of the inferred pairs against the known mappings (issue 8, item 3).

Every family with a known mapping is matched with no hints (``matcher.solve.match_trees``, shapes
and names only) on:

- its tiny fixture checkpoint (``tests/fixtures/make_*.py``, written to a temporary directory);
- real-size shape-only trees (``tests/matching/harness.REAL_CASES``: SigLIP base/large/so400m,
  OpenAI CLIP B/16 and L/14, timm ViT-B/16);
- a Llama-style decoder (transformers' keys, and Meta's original keys) at a small size;
- mixture-of-experts decoders in the hub's per-expert layout (shape-only trees from a meta-device
  target, 4 layers x 8 experts): Mixtral (``block_sparse_moe.experts.{e}.w1/w2/w3``) into
  ``MixtralForCausalLM`` and Qwen/DeepSeek names (``mlp.experts.{e}.gate_proj/up_proj/down_proj``)
  into ``Qwen3MoeForCausalLM``, whose experts are fused (``experts.gate_up_proj`` (E, 2I, D),
  ``experts.down_proj`` (E, D, I)); judged against conversions written by hand here;

each plain and under generated variants:

| variant | what changes |
|---|---|
| plain | nothing |
| shuffled | key order shuffled |
| prefixed-module, prefixed-model | every key behind ``module.`` / ``model.`` |
| float16, bfloat16 | stored dtype |
| opaque-qkv | separate q/k/v renamed ``w0, w1, w2`` in a different order per block (where q/k/v are separate tensors) |
| dropped | every layer's instance of one tensor and one tensor outside the layers removed (chosen by seed) |
| extra | a LayerScale-like vector (``ls1.gamma``) added to every layer and an ``aux_head`` matrix at the top |
| square-mlp | intermediate size = hidden size, so both MLP matrices are square (a tree rebuilt from the known mapping) |
| scanned | every repeated block stored as one stack per tensor with the layers on a leading axis |
| opaque-experts | MoE only: the experts' gate and up matrices renamed ``wb``/``wa`` (names that say nothing, sorting the wrong way round): gate_up_proj must be flagged |

`-` in the tables: the variant does not apply. opaque-qkv needs q/k/v stored as separate tensors
named query/key/value (big_vision/scenic layouts; Llama and the MoE decoders call them
q_proj/k_proj/v_proj, which the matcher reads as names anyway); opaque-experts needs experts.
In the scanned MoE variants the layers are stacked but the experts stay one tensor each, so a fused
expert tensor would need a select of the layer and a stack of the experts in one rule, which the
mapping format does not have: those targets are flagged by construction. Meta's Llama keys are
judged against transformers' converter, which permutes the rows of wq and wk (interleaved rotary
pairs -> halves): a layout no shape or name shows, so the matcher must ask about q_proj/k_proj
(synonyms.yaml ``hidden_layouts``); those flags count as by construction too.

The known mapping is transformed with the variant (``harness.make_variant`` for the first seven;
here for the others), and every target tensor is judged (``harness.equivalent``: same sources in the
same order, op chains equal on distinct-valued probes):

- **correct**: the matcher decided it and it equals the known rule;
- **flagged**: the matcher left it unresolved or unmatched (fine: nothing is written for it);
- **wrong**: the matcher decided it and it differs from the known rule, or it wrote a target the
  known mapping leaves without a source (a dropped source, a declared ``initialised`` target).

precision = correct / (correct + wrong); recall = correct / targets that have a true (expressible) source.

    .venv/bin/python benchmarks/accuracy.py            # everything (about a minute)
    .venv/bin/python benchmarks/accuracy.py --fixtures-only
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from matcher.compat import install_torchvision_shim  # noqa: E402

install_torchvision_shim()

import numpy as np  # noqa: E402

from matcher.errors import MappingError  # noqa: E402
from matcher.mapping import Mapping, Rule  # noqa: E402
from matcher.ops import MergeAxes, Select, SplitAxis, Stack, Transpose  # noqa: E402
from matcher.patterns import template  # noqa: E402
from matcher.tree import ParamTree, TensorSpec  # noqa: E402
from tests.matching import harness as h  # noqa: E402
from llama_layouts import meta_name  # noqa: E402

SEED = 0
HARNESS_VARIANTS = ("plain", "shuffled", "prefixed-module", "prefixed-model", "float16", "bfloat16", "opaque-qkv")
VARIANTS = HARNESS_VARIANTS + ("dropped", "extra", "square-mlp", "scanned", "opaque-experts")


# ==================================================================================== cases


@dataclass
class Base:
    """One case before variants: a source tree, a target tree, the known mapping, and how to
    rebuild it with square MLPs."""

    name: str
    kind: str  # fixture / real / llama
    source: ParamTree
    target: ParamTree
    known: Mapping
    target_class: str
    config: Any
    square: Callable[[], "h.Case"] | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # source keys holding the same data as another
    opaque_experts: Callable[[], "Instance"] | None = None  # MoE: gate and up under names that say nothing
    hidden: tuple[str, ...] = ()  # target templates whose source layout shapes and names cannot show: a flag there is by construction


@dataclass(frozen=True)
class Family:
    name: str
    maker: str
    target_class: str
    mapping: str
    vit_variant: str | None = None
    aliases: bool = False


FAMILIES = [
    Family("siglip", "siglip", "SiglipModel", "siglip.yaml"),
    Family("chinese_clip", "chinese_clip", "ChineseCLIPModel", "chinese_clip.yaml"),
    Family("clip", "clip", "CLIPModel", "clip.yaml"),
    Family("clipseg", "clipseg", "CLIPSegForImageSegmentation", "clipseg.yaml", aliases=True),
    Family("owlvit", "owlvit", "OwlViTForObjectDetection", "owlvit.yaml"),
    Family("vit", "vit", "ViTForImageClassification", "vit.yaml", vit_variant="vit"),
    Family("deit", "vit", "ViTForImageClassification", "vit.yaml", vit_variant="deit"),
    Family("vit_headless", "vit", "ViTModel", "vit_base.yaml", vit_variant="vit_headless"),
]


def squared(config):
    """A copy of ``config`` whose towers have intermediate_size == hidden_size."""
    config = copy.deepcopy(config)
    for sub in [config] + [getattr(config, a) for a in ("text_config", "vision_config") if getattr(config, a, None) is not None]:
        if hasattr(sub, "intermediate_size") and hasattr(sub, "hidden_size"):
            sub.intermediate_size = sub.hidden_size
    return config


def _shape_fn(family: str, config):
    """Source shapes the target cannot show (attention kernels merged by the known mapping)."""
    if family.startswith("siglip"):
        return h.siglip_source_shapes(config)
    if family == "owlvit":
        from tests.fixtures import make_owlvit

        return {k: v for k, v in make_owlvit.scenic_param_shapes(config).items() if "/attn/" in k}
    return None


def fixture_bases(work: Path) -> list[Base]:
    from matcher.sources import open_tree
    from matcher.targets import build_target, load_config, resolve_class

    made: dict[str, dict] = {}
    bases = []
    for family in FAMILIES:
        if family.maker not in made:
            made[family.maker] = importlib.import_module(f"tests.fixtures.make_{family.maker}").make(work / family.maker)
        info = made[family.maker]["variants"][family.vit_variant] if family.vit_variant else made[family.maker]
        source = open_tree(info["source"])
        target = build_target(family.target_class, info["config"])
        known = Mapping.load(h.KNOWN / family.mapping)
        config = load_config(resolve_class(family.target_class), info["config"])

        def square(family=family, config=config, known=known):
            sq = squared(config)
            return h.case_from_known(family.target_class, sq, known, _shape_fn(family.name, sq))

        bases.append(Base(family.name, "fixture", source, target.tree, known, family.target_class, config, square,
                          h.data_aliases(source) if family.aliases else {}))
    return bases


def real_bases() -> list[Base]:
    from tests.fixtures import make_clip

    configs = {
        **{f"siglip-{n}": functools.partial(h.siglip_config, n) for n in h.SIGLIP_SIZES},
        **{f"clip-{n}": functools.partial(make_clip.target_config, h.CLIP_HPARAMS[n]) for n in h.CLIP_HPARAMS},
        "timm-vit_base_patch16_224": h.vit_b16_config,
    }
    bases = []
    for name, (target_class, builder) in h.REAL_CASES.items():
        source, target, known = builder()
        config = configs[name]()

        def square(name=name, config=config, target_class=target_class, known=known):
            sq = squared(config)
            return h.case_from_known(target_class, sq, known, _shape_fn(name, sq), origin=f"{name} square MLP (shapes)")

        bases.append(Base(name, "real", source, target, known, target_class, config, square))
    return bases


# -- Llama: transformers' key names, and Meta's original ones

LLAMA_SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=688,
                   vocab_size=1000, tie_word_embeddings=False)


def llama_known(config, layout: str, rotary: bool = False) -> Mapping:
    """The conversion into LlamaForCausalLM: renames; with ``rotary``, transformers' converter's
    permutation of Meta's wq/wk rows (interleaved rotary pairs -> rotate_half halves)."""
    rename = (lambda k: k) if layout == "hf" else meta_name
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{{i}}.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    head_dim = config.hidden_size // config.num_attention_heads
    rules = []
    for key in keys:
        ops: tuple = ()
        if rotary and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
            ops = (SplitAxis(0, (heads, head_dim // 2, 2)), Transpose((0, 2, 1, 3)), MergeAxes(0, 2))
        rules.append(Rule(key, (rename(key),), ops))
    return Mapping(tuple(rules), meta={"family": f"llama-{layout}"})


def llama_bases() -> list[Base]:
    """Llama with transformers' keys, and with Meta's keys judged against transformers' converter,
    which permutes the rows of wq and wk (Meta's interleaved rotary pairs -> rotate_half halves):
    that layout is invisible to shapes and names, so the matcher must ask (a flag by construction)."""
    from transformers import LlamaConfig

    from matcher.targets import build_target

    config = LlamaConfig(**LLAMA_SMALL)
    target = build_target("LlamaForCausalLM", config).tree
    out = []
    for layout in ("hf", "meta"):
        rename = (lambda k: k) if layout == "hf" else meta_name
        tree = ParamTree({rename(k): TensorSpec(rename(k), s.shape, "bfloat16") for k, s in target.specs.items()},
                         origin=f"llama ({layout} keys, shapes)", format="shapes")

        meta = layout == "meta"

        def square(layout=layout, meta=meta):
            sq = squared(config)
            sq_target = build_target("LlamaForCausalLM", sq).tree
            rn = (lambda k: k) if layout == "hf" else meta_name
            sq_tree = ParamTree({rn(k): TensorSpec(rn(k), s.shape, "bfloat16") for k, s in sq_target.specs.items()}, format="shapes")
            return h.Case(sq_tree, sq_target, llama_known(sq, layout, rotary=meta))

        hidden = ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight") if meta else ()
        out.append(Base(f"llama-{layout}", "llama", tree, target, llama_known(config, layout, rotary=meta), "LlamaForCausalLM", config,
                        square, hidden=hidden))
    return out


# -- mixture of experts: per-expert hub tensors into transformers' fused experts

MOE_SMALL = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                 num_experts_per_tok=2, tie_word_embeddings=False)
MOE_CASES = {  # case: target class, hub spelling (block module, gate, up, down), expert widths
    "mixtral-hub": ("MixtralForCausalLM", ("block_sparse_moe", "w1", "w3", "w2"), dict(intermediate_size=352, num_local_experts=8)),
    "qwen3_moe-hub": ("Qwen3MoeForCausalLM", ("mlp", "gate_proj", "up_proj", "down_proj"),
                      dict(intermediate_size=512, moe_intermediate_size=96, num_experts=8)),
}
OPAQUE_EXPERTS = {"gate": "wb", "up": "wa"}  # sorted by name, up would come first
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def moe_config(target_class: str, widths: dict, square: bool = False):
    import transformers

    config = getattr(transformers, target_class).config_class(**MOE_SMALL, **widths)
    if square:  # every expert matrix (D, D), as are q_proj and o_proj here: only names tell them apart
        for field_name in ("intermediate_size", "moe_intermediate_size"):
            if hasattr(config, field_name):
                setattr(config, field_name, config.hidden_size)
    return config


def moe_hub_key(key: str, spelling: tuple[str, str, str, str], role: str | None = None, expert: int | None = None) -> str:
    """The hub's name for a target key (``role``/``expert``: one expert's gate, up or down matrix)."""
    module = spelling[0]
    if role is not None:
        name = {"gate": spelling[1], "up": spelling[2], "down": spelling[3]}[role]
        return re.sub(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", f".{module}.experts.{expert}.{name}.weight", key)
    return key.replace(".mlp.gate.weight", f".{module}.gate.weight")


def moe_source(target: ParamTree, spelling, origin: str) -> ParamTree:
    """A hub checkpoint's shapes for ``target``: one (I, D) gate, (I, D) up and (D, I) down per expert."""
    specs = {}
    for key, spec in target.specs.items():
        if key.endswith(".mlp.experts.down_proj"):
            continue
        if key.endswith(".mlp.experts.gate_up_proj"):
            experts, double, hidden = spec.shape
            for e in range(experts):
                for role, shape in (("gate", (double // 2, hidden)), ("down", (hidden, double // 2)), ("up", (double // 2, hidden))):
                    name = moe_hub_key(key, spelling, role, e)
                    specs[name] = TensorSpec(name, shape, "bfloat16")
            continue
        name = moe_hub_key(key, spelling)
        specs[name] = TensorSpec(name, spec.shape, "bfloat16")
    return ParamTree(specs, origin=origin, format="shapes")


def moe_known(target: ParamTree, spelling) -> Mapping:
    """The conversion written by hand: renames, and per layer the experts stacked. Gate and up are
    joined per expert (expert e's rows: its gate, then its up), spelled here as one stack on a
    new axis 1 over [gate_0..gate_E-1, up_0..up_E-1]: (I, 2E, D) -> (I, 2, E, D) -> (E, 2, I, D) -> (E, 2I, D)."""
    rules = {}
    for key in target.keys():
        t = _LAYER.sub("model.layers.{i}.", key)
        if t in rules:
            continue
        if t.endswith(".mlp.experts.gate_up_proj"):
            sources = tuple(moe_hub_key(t, spelling, role, 0).replace(".experts.0.", ".experts.{e}.") for role in ("gate", "up"))
            rules[t] = Rule(t, sources, (Stack(1), SplitAxis(1, (2, -1)), Transpose((2, 1, 0, 3)), MergeAxes(1, 2)))
        elif t.endswith(".mlp.experts.down_proj"):
            rules[t] = Rule(t, (moe_hub_key(t, spelling, "down", 0).replace(".experts.0.", ".experts.{e}."),), (Stack(0),))
        else:
            rules[t] = Rule(t, (moe_hub_key(t, spelling),))
    return Mapping(tuple(rules.values()), meta={"family": "moe"})


def moe_bases() -> list[Base]:
    from matcher.targets import build_target

    bases = []
    for name, (target_class, spelling, widths) in MOE_CASES.items():
        config = moe_config(target_class, widths)
        target = build_target(target_class, config).tree

        def square(target_class=target_class, spelling=spelling, widths=widths, name=name):
            sq_target = build_target(target_class, moe_config(target_class, widths, square=True)).tree
            return h.Case(moe_source(sq_target, spelling, f"{name} square experts (shapes)"), sq_target, moe_known(sq_target, spelling))

        def opaque(target=target, spelling=spelling, name=name):
            renamed = (spelling[0], OPAQUE_EXPERTS["gate"], OPAQUE_EXPERTS["up"], spelling[3])
            gate_up = [k for k in target.keys() if k.endswith(".mlp.experts.gate_up_proj")]
            return Instance(moe_source(target, renamed, f"{name} opaque experts (shapes)"), target, moe_known(target, renamed), {},
                            expected_flags=len(gate_up))

        source = moe_source(target, spelling, f"{name} (shapes)")
        bases.append(Base(name, "moe", source, target, moe_known(target, spelling), target_class, config, square, opaque_experts=opaque))
    return bases


# ==================================================================================== variants


@dataclass
class Instance:
    tree: ParamTree
    target: ParamTree
    known: Mapping
    aliases: dict[str, str]
    unsourced: set[str] = field(default_factory=set)  # targets the family's mapping writes that have no (expressible) source here
    expected_flags: int = 0  # targets the variant makes undecidable on purpose


def _concrete(known: Mapping, tree: ParamTree, target: ParamTree) -> list[Rule]:
    return [Rule(r.target, r.sources, r.ops) for r in known.expand(tree.keys(), target.keys()).rules]


def _with_rules(known: Mapping, rules) -> Mapping:
    return Mapping(tuple(rules), known.dropped, known.initialised, dict(known.meta))


def _sep(key: str) -> str:
    return "/" if "/" in key else "."


def _layer_patterns(known: Mapping) -> list[str]:
    return sorted({s for r in known.rules for s in r.sources if "{i}" in s})


def dropped(base: Base) -> Instance:
    """Every instance of one per-layer source tensor and one tensor outside the layers removed."""
    rng = np.random.default_rng(SEED)
    concrete = _concrete(base.known, base.source, base.target)
    layer_patterns = [p for p in _layer_patterns(base.known) if any(template(p).match(k) for k in base.source.keys())]
    gone: set[str] = set()
    if layer_patterns:
        chosen = template(layer_patterns[rng.integers(len(layer_patterns))])
        gone |= {k for k in base.source.keys() if chosen.match(k) is not None}
    singles = sorted({s for r in base.known.rules for s in r.sources if "{i}" not in s and s in base.source})
    if singles:
        gone.add(singles[rng.integers(len(singles))])
    groups: dict[str, list[str]] = defaultdict(list)  # keys holding the same data (CLIPSeg saves a tower twice)
    for key in base.source.keys():
        groups[base.aliases.get(key, key)].append(key)
    survivor = {k: next((m for m in groups[base.aliases.get(k, k)] if m not in gone), None) for k in gone}
    tree = ParamTree({k: s for k, s in base.source.specs.items() if k not in gone}, base.source.loader, base.source.origin + " [dropped]", base.source.format)
    kept, unsourced = [], set()
    for rule in concrete:
        if not set(rule.sources) & gone:
            kept.append(rule)
        elif all(survivor.get(s, s) is not None for s in rule.sources):  # the same data is still there under another name
            kept.append(Rule(rule.target, tuple(survivor.get(s, s) for s in rule.sources), rule.ops))
        else:
            unsourced.add(rule.target)
    aliases = {}
    for members in groups.values():
        alive = [m for m in members if m not in gone]
        aliases.update({m: alive[0] for m in alive[1:]})
    return Instance(tree, base.target, _with_rules(base.known, kept), aliases, unsourced, len(unsourced))


def extra(base: Base) -> Instance:
    """A LayerScale-like vector in every layer instance and an auxiliary head at the top."""
    specs = dict(base.source.specs)
    vectors = [s.shape for s in base.source.specs.values() if len(s.shape) == 1]
    width = max(set(vectors), key=vectors.count)[0] if vectors else 8
    for pattern in _layer_patterns(base.known)[:1]:
        block = re.match(r"^(.*?\{i\}[^/.]*)", pattern).group(1)
        sep = _sep(pattern)
        for index in sorted({int(b["i"]) for k in base.source.keys() if (b := template(pattern).match(k)) is not None}):
            key = f"{block.replace('{i}', str(index))}{sep}ls1{sep}gamma"
            specs[key] = TensorSpec(key, (width,), "float32")
    first = next(iter(base.source.keys()))
    sep = _sep(first)
    prefix = first.split(sep)[0] + sep if first.startswith(("params/", "optimizer/", "module.", "model.")) and sep == "/" else ""
    head = f"{prefix}aux_head{sep}kernel" if sep == "/" else "aux_head.weight"
    specs[head] = TensorSpec(head, (width, 7) if sep == "/" else (7, width), "float32")
    tree = ParamTree(specs, None, base.source.origin + " [extra]", base.source.format)
    return Instance(tree, base.target, base.known, dict(base.aliases))


def scanned(base: Base) -> Instance | None:
    """Every repeated block stored as one stacked tensor per leaf, layers on axis 0.

    The layer containers are read off the known mapping (``encoderblock_{i}``, ``resblocks.{i}``)
    and every key under such a container is stacked, the ones the mapping drops included
    (CLIPSeg's second copy of the visual tower)."""
    containers = {(m.group(1), m.group(2)) for r in base.known.rules for s in r.sources for m in re.finditer(r"([^./]+?)([._/]?)\{i\}", s)}
    if not containers:
        return None
    numbered = re.compile("|".join(rf"(?:(?<=[./])|^)({re.escape(c)}){re.escape(sep)}(\d+)(?=[./])" for c, sep in sorted(containers)))

    def unnumbered(key: str) -> tuple[str, int] | None:
        match = numbered.search(key)
        if match is None:
            return None
        group = next(g for g in range(1, len(match.groups()) + 1, 2) if match.group(g) is not None)
        return key[: match.start()] + match.group(group) + key[match.end() :], int(match.group(group + 1))

    members: dict[str, dict[int, str]] = defaultdict(dict)
    owner: dict[str, str] = {}
    for key in base.source.keys():
        found = unnumbered(key)
        if found is not None:
            members[found[0]][found[1]] = key
            owner[key] = found[0]
    specs: dict[str, TensorSpec] = {}
    for key, spec in base.source.specs.items():
        if key not in owner:
            specs[key] = spec
            continue
        name = owner[key]
        if name in specs:
            continue
        instances = members[name]
        if sorted(instances) != list(range(len(instances))):
            return None  # layers not numbered 0..L-1
        first = base.source[instances[0]]
        specs[name] = TensorSpec(name, (len(instances),) + tuple(first.shape), first.dtype)
    rules, unsourced = [], set()
    for rule in base.known.rules:
        if any("{i}" in s for s in rule.sources):
            sources = tuple(unnumbered(s.replace("{i}", "0"))[0] for s in rule.sources)
            try:
                rules.append(Rule(rule.target, sources, (Select(0, "{i}"),) + tuple(rule.ops), rule.note))
            except MappingError:  # a chunk of a fused tensor in a stack: select + chunk in one rule is not in the format
                unsourced |= _targets_of(Mapping((rule,)), base.target)
        else:
            rules.append(rule)
    known = _with_rules(base.known, rules)
    aliases = {}
    for name, instances in members.items():
        partners = {owner.get(base.aliases.get(k, ""), None) for k in instances.values()}
        if len(partners) == 1 and None not in partners and all(k in base.aliases for k in instances.values()):
            aliases[name] = partners.pop()
    tree = ParamTree(specs, None, base.source.origin + " [scanned]", base.source.format)
    return Instance(tree, base.target, known, aliases, unsourced, len(unsourced))


def harness_variant(base: Base, kind: str) -> Instance | None:
    if kind == "opaque-qkv" and not _has_separate_qkv(base.source):
        return None
    v = h.make_variant(kind, base.source, base.known, seed=SEED)
    if kind.startswith("prefixed-"):
        prefix = kind.removeprefix("prefixed-") + "."
        aliases = {prefix + k: prefix + a for k, a in base.aliases.items()}
    elif kind == "opaque-qkv":
        new_of = {old: new for new, old in v.renamed.items()}
        aliases = {new_of.get(k, k): new_of.get(a, a) for k, a in base.aliases.items()}
    else:
        aliases = dict(base.aliases)
    expected = 0
    if kind == "opaque-qkv":
        expected = len(h.targets_reading(v.known, v.tree, base.target, v.renamed))
    return Instance(v.tree, base.target, v.known, aliases, set(), expected)


def _has_separate_qkv(tree: ParamTree) -> bool:
    """Separate tensors under path components named query, key and value (what opaque_qkv renames)."""
    return any({"query", "key", "value"} <= {p for k in tree.keys() for p in re.split(r"[/.]", k) if k.startswith(prefix)}
               for prefix in {k.rsplit("query", 1)[0] for k in tree.keys() if "query" in re.split(r"[/.]", k)})


def instance(base: Base, kind: str) -> Instance | None:
    if kind in HARNESS_VARIANTS:
        return harness_variant(base, kind)
    if kind == "dropped":
        return dropped(base)
    if kind == "extra":
        return extra(base)
    if kind == "scanned":
        return scanned(base)
    if kind == "square-mlp":
        if base.square is None:
            return None
        case = base.square()
        return Instance(case.source, case.target, case.known, {})
    if kind == "opaque-experts":
        return base.opaque_experts() if base.opaque_experts is not None else None
    raise KeyError(kind)


# ==================================================================================== judging


@dataclass
class Score:
    correct: int = 0
    flagged: int = 0
    wrong: int = 0
    with_source: int = 0  # targets that have a true source
    expected_flags: int = 0
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: "Score") -> None:
        self.correct += other.correct
        self.flagged += other.flagged
        self.wrong += other.wrong
        self.with_source += other.with_source
        self.expected_flags += other.expected_flags
        self.examples += other.examples
        self.seconds += other.seconds

    @property
    def precision(self) -> float:
        decided = self.correct + self.wrong
        return self.correct / decided if decided else 1.0

    @property
    def recall(self) -> float:
        return self.correct / self.with_source if self.with_source else 1.0

    def cell(self) -> str:
        return f"{self.correct}/{self.flagged}/{self.wrong}"


def judge(name: str, kind: str, inst: Instance, hidden: tuple[str, ...] = ()) -> Score:
    from matcher.solve import match_trees

    started = time.perf_counter()
    report = match_trees(inst.tree, inst.target)
    seconds = time.perf_counter() - started
    comparison = h.equivalent(report.mapping, inst.known, inst.tree, inst.target, inst.aliases)
    known_targets = {r.target for r in inst.known.expand(inst.tree.keys(), inst.target.keys()).rules}
    inferred_targets = {r.target for r in report.mapping.expand(inst.tree.keys(), inst.target.keys()).rules}
    wrong = [f"{name} [{kind}] {t}: inferred {i} / known {k}" for t, i, k in comparison.disagree]
    wrong += [f"{name} [{kind}] {t}: written, but it has no source in the known mapping" for t in comparison.only_inferred]
    wrong += [f"{name} [{kind}] inferred rule problem: {p}" for p in comparison.inferred_problems]
    flagged = len(known_targets - inferred_targets) + len(inst.unsourced - known_targets - inferred_targets)
    hidden_templates = [template(t) for t in hidden]
    hidden_flags = sum(1 for t in known_targets - inferred_targets if any(p.match(t) is not None for p in hidden_templates))
    return Score(len(comparison.agree), flagged, len(wrong), len(known_targets), inst.expected_flags + hidden_flags, wrong, seconds)


def _targets_of(mapping: Mapping, target: ParamTree) -> set[str]:
    found = set()
    for rule in mapping.rules:
        t = template(rule.target)
        found |= {k for k in target.keys() if t.match(k) is not None}
    return found


# ==================================================================================== main


def run(bases: list[Base]) -> dict[tuple[str, str], Score]:
    scores: dict[tuple[str, str], Score] = {}
    for base in bases:
        for kind in VARIANTS:
            inst = instance(base, kind)
            if inst is None:
                continue
            scores[(base.name, kind)] = judge(base.name, kind, inst, base.hidden)
        print(f"  {base.name}: " + ", ".join(f"{k} {scores[(base.name, k)].cell()}" for k in VARIANTS if (base.name, k) in scores), file=sys.stderr)
    return scores


def render(scores: dict[tuple[str, str], Score], bases: list[Base]) -> str:
    lines = ["Per variant, over every case it applies to (target tensors; \"flagged by construction\": targets the variant leaves "
             "without a decidable source: opaque q/k/v, a dropped source, a rule the mapping format cannot express):", "",
             "| variant | cases | targets | correct | flagged | of which by construction | wrong | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    total = Score()
    for kind in VARIANTS:
        s = Score()
        cases = [b.name for b in bases if (b.name, kind) in scores]
        for name in cases:
            s.add(scores[(name, kind)])
        total.add(s)
        lines.append(f"| {kind} | {len(cases)} | {s.correct + s.flagged + s.wrong} | {s.correct} | {s.flagged} | {s.expected_flags} "
                     f"| **{s.wrong}** | {100 * s.precision:.1f}% | {100 * s.recall:.1f}% |")
    lines.append(f"| **all** | {len(scores)} | {total.correct + total.flagged + total.wrong} | {total.correct} | {total.flagged} "
                 f"| {total.expected_flags} | **{total.wrong}** | {100 * total.precision:.1f}% | {100 * total.recall:.1f}% |")
    lines += ["", "Per case (correct / flagged / wrong; `-`: the variant does not apply):", "",
              "| case | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for base in bases:
        cells = [scores[(base.name, k)].cell() if (base.name, k) in scores else "-" for k in VARIANTS]
        lines.append(f"| {base.name} ({base.kind}) | " + " | ".join(cells) + " |")
    examples = [e for s in scores.values() for e in s.examples]
    if examples:
        lines += ["", f"Wrong ({len(examples)}):", "```"] + examples[:40] + ["```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures-only", action="store_true", help="only the tiny fixture checkpoints")
    parser.add_argument("--json-out", type=Path, help="also write the scores here")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="matcher-accuracy-") as work:
        print("building cases ...", file=sys.stderr)
        bases = fixture_bases(Path(work))
        if not args.fixtures_only:
            bases += real_bases()
            bases += llama_bases()
            bases += moe_bases()
        print("matching ...", file=sys.stderr)
        scores = run(bases)
    print(render(scores, bases))
    wrong = sum(s.wrong for s in scores.values())
    print(f"\n(matching {sum(s.seconds for s in scores.values()):.1f} s of {time.perf_counter() - started:.0f} s in total; "
          f"wrong on the known families: {wrong})")
    if args.json_out:
        args.json_out.write_text(json.dumps({f"{n} [{k}]": vars(s) for (n, k), s in scores.items()}, indent=2))
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
