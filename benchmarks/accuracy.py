"""Accuracy of the inferred pairs against the known mappings (issue 8, item 3).

Every family with a known mapping is matched with no hints (``matcher.solve.match_trees``, shapes
and names only) on:

- its tiny fixture checkpoint (``tests/fixtures/make_*.py``, written to a temporary directory);
- real-size shape-only trees (``tests/matching/harness.REAL_CASES``: SigLIP base/large/so400m,
  OpenAI CLIP B/16 and L/14, timm ViT-B/16);
- a Llama-style decoder (transformers' keys, and Meta's original keys) at a small size;

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from matcher.compat import install_torchvision_shim  # noqa: E402

install_torchvision_shim()

import numpy as np  # noqa: E402

from matcher.errors import MappingError  # noqa: E402
from matcher.mapping import Mapping, Rule  # noqa: E402
from matcher.ops import MergeAxes, Select, SplitAxis, Transpose  # noqa: E402
from matcher.patterns import template  # noqa: E402
from matcher.tree import ParamTree, TensorSpec  # noqa: E402
from tests.matching import harness as h  # noqa: E402

SEED = 0
HARNESS_VARIANTS = ("plain", "shuffled", "prefixed-module", "prefixed-model", "float16", "bfloat16", "opaque-qkv")
VARIANTS = HARNESS_VARIANTS + ("dropped", "extra", "square-mlp", "scanned")


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
META_NAMES = [  # transformers key -> Meta's original key (consolidated.*.pth)
    (r"^model\.embed_tokens\.", "tok_embeddings."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+|\{i\})\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
    (r"^model\.layers\.(\d+|\{i\})\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
    (r"^model\.layers\.(\d+|\{i\})\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
    (r"^model\.layers\.(\d+|\{i\})\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
    (r"^model\.layers\.(\d+|\{i\})\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"^model\.layers\.(\d+|\{i\})\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"^model\.layers\.(\d+|\{i\})\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"^model\.layers\.(\d+|\{i\})\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+|\{i\})\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
]


def meta_name(key: str) -> str:
    for pattern, replacement in META_NAMES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise KeyError(key)


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


def llama_bases() -> tuple[list[Base], Base]:
    """Llama with transformers' keys and with Meta's keys (judged by renaming), and Meta's keys
    judged against transformers' converter (the rotary permutation)."""
    from transformers import LlamaConfig

    from matcher.targets import build_target

    config = LlamaConfig(**LLAMA_SMALL)
    target = build_target("LlamaForCausalLM", config).tree
    out = []
    for layout in ("hf", "meta"):
        rename = (lambda k: k) if layout == "hf" else meta_name
        tree = ParamTree({rename(k): TensorSpec(rename(k), s.shape, "bfloat16") for k, s in target.specs.items()},
                         origin=f"llama ({layout} keys, shapes)", format="shapes")

        def square(layout=layout):
            sq = squared(config)
            sq_target = build_target("LlamaForCausalLM", sq).tree
            rn = (lambda k: k) if layout == "hf" else meta_name
            sq_tree = ParamTree({rn(k): TensorSpec(rn(k), s.shape, "bfloat16") for k, s in sq_target.specs.items()}, format="shapes")
            return h.Case(sq_tree, sq_target, llama_known(sq, layout))

        out.append(Base(f"llama-{layout}", "llama", tree, target, llama_known(config, layout), "LlamaForCausalLM", config, square))
    meta = out[1]
    truth = replace(meta, name="llama-meta vs converter", known=llama_known(config, "meta", rotary=True),
                    square=lambda: meta.square()._replace(known=llama_known(squared(config), "meta", rotary=True)))
    return out, truth


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


def judge(name: str, kind: str, inst: Instance) -> Score:
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
    return Score(len(comparison.agree), flagged, len(wrong), len(known_targets), inst.expected_flags, wrong, seconds)


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
            scores[(base.name, kind)] = judge(base.name, kind, inst)
        print(f"  {base.name}: " + ", ".join(f"{k} {scores[(base.name, k)].cell()}" for k in VARIANTS if (base.name, k) in scores), file=sys.stderr)
    return scores


def render(scores: dict[tuple[str, str], Score], bases: list[Base], truth: dict[tuple[str, str], Score]) -> str:
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
    if truth:
        t = Score()
        for s in truth.values():
            t.add(s)
        lines += ["", "Meta's original Llama keys judged against transformers' converter, which permutes the rows of wq and wk "
                  "(Meta's interleaved rotary pairs -> rotate_half halves; invisible to shapes and names):", "",
                  "| case | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS),
                  "| llama-meta vs converter | " + " | ".join(truth[k].cell() if k in truth else "-" for k in [(next(iter(truth))[0], v) for v in VARIANTS]) + " |"]
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
        truth_base = None
        if not args.fixtures_only:
            bases += real_bases()
            llamas, truth_base = llama_bases()
            bases += llamas
        print("matching ...", file=sys.stderr)
        scores = run(bases)
        truth = {}
        if truth_base is not None:
            truth = {(truth_base.name, k): judge(truth_base.name, k, inst) for k in VARIANTS if (inst := instance(truth_base, k)) is not None}
    print(render(scores, bases, truth))
    wrong = sum(s.wrong for s in scores.values())
    print(f"\n(matching {sum(s.seconds for s in scores.values()):.1f} s of {time.perf_counter() - started:.0f} s in total; "
          f"wrong on the known families: {wrong})")
    if args.json_out:
        args.json_out.write_text(json.dumps({f"{n} [{k}]": vars(s) for (n, k), s in {**scores, **truth}.items()}, indent=2))
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
