"""Matching at scale, shapes only (issue 8, item 1).

Real-size checkpoints whose tensor data is a hole (``sparse_checkpoints``): the files have their
full size (141 GB for a bf16 Llama-70B) but occupy a few KB of disk, and reading their data would
only give zeros. Each is matched against a transformers class built on the meta device, as users
run it, every run in a fresh process:

- ``CLI``: ``match SRC --target CLASS --config CFG --json [--allow-init ...]``;
- ``API``: ``matcher.match(SRC, CLASS, config=CFG)`` in a script, timed around the call (the
  process has imported matcher, torch, transformers and the target class before the clock starts).

Start-up is measured in the same run: a process that only imports ``matcher.cli``,
``matcher.api`` and the target class (``matcher.targets.resolve_class``, which imports torch
and transformers). "wall - start-up" is the CLI's wall time minus that process's.

Cases: SigLIP so400m/14-384 (big_vision npz, fp32), ViT-g/14 (timm ``vit_giant_patch14_224``
state dict built on the meta device, safetensors fp32 -> ViTModel), a 70B Llama-style decoder
(80 layers, hidden 8192, 64 heads, 8 kv heads, intermediate 28672, vocab 128256; bf16
safetensors) with transformers' key names and with Meta's original key names
(``layers.{i}.attention.wq``, ``feed_forward.w1/w2/w3``, ``tok_embeddings``, ``output``; wq/wk
rows are in rotary-pair order, which the matcher asks about, answered here with ``--mapping``
pinning the two permutation rules), a mixture-of-experts decoder in Mixtral's hub layout (66
layers x 256 experts, one tensor per expert: 51 153 tensors, a 294 GB sparse file) ->
MixtralForCausalLM with fused 3-D experts, and a depth curve (a ViT-B-wide timm ViT with 12, 24, 48 and 96 layers -> ViTModel).

Every inferred mapping is compared with the known one (``tests/matching/harness.equivalent``).
Zero data bytes: each CLI and API run is repeated once under ``strace -f -P SRC``, which lists
every byte range of SRC any read syscall in the process delivered; those ranges are intersected
with the file's tensor-data regions. The sparse-file argument is printed beside it (file size
vs. RAM, peak RSS of the process).

    .venv/bin/python benchmarks/scale.py              # everything (about 4 minutes)
    .venv/bin/python benchmarks/scale.py --repeat 1   # quicker, noisier
    .venv/bin/python benchmarks/scale.py --only so400m,llama-meta --no-depth
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import processes  # noqa: E402
import sparse_checkpoints as sparse  # noqa: E402
from llama_layouts import meta_name  # noqa: E402

PYTHON = sys.executable
MATCH = str(Path(PYTHON).with_name("match"))
GB = 1e9
LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False)
DEPTHS = (12, 24, 48, 96)
GOAL_SO400M = 1.0  # seconds, wall - start-up
GOAL_MOE_SECONDS, GOAL_MOE_RSS = 10.0, 1.0  # the 50 000-tensor case: seconds (whole CLI run), GB peak RSS


@dataclass
class Case:
    name: str
    title: str
    target_class: str
    source: Path
    config: Path | None  # None: the config is inferred from the checkpoint (no --config)
    known: Path
    extra: list[str] = field(default_factory=list)  # CLI options (--allow-init ...)
    allow_init: list[str] = field(default_factory=list)
    pinned: Path | None = None  # a mapping file with the rules a person gave (--mapping)
    tensors: int = 0
    params: int = 0
    files: dict = field(default_factory=dict)


# ==================================================================================== building


def _shim():
    from matcher.compat import install_torchvision_shim

    install_torchvision_shim()
    import transformers

    transformers.logging.set_verbosity_error()


def _meta_state_shapes(model) -> list[tuple[str, tuple, str]]:
    return [(k, tuple(v.shape), "float32") for k, v in model.state_dict().items()]


def build_so400m(work: Path) -> Case:
    _shim()
    from tests.matching import harness as h

    name = "so400m-patch14-384"
    source, _, known = h.siglip_case(name)
    directory = work / "so400m"
    directory.mkdir(exist_ok=True)
    path = directory / "siglip_so400m_patch14_384.npz"
    specs = [(k, s.shape, s.dtype) for k, s in source.specs.items()]
    if not path.exists():
        sparse.write_sparse_npz(path, specs)
    h.siglip_config(name).to_json_file(directory / "config.json")
    known.save(directory / "known.yaml")
    return Case("so400m", "SigLIP so400m/14-384 (big_vision npz, fp32)", "SiglipModel", path, directory / "config.json", directory / "known.yaml",
                tensors=len(specs), params=sum(s.numel for s in source.specs.values()))


def _timm_vit(num_classes: int = 0, **kwargs):
    _shim()
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(pretrained=False, num_classes=num_classes, **kwargs)


def _vit_case(work: Path, name: str, title: str, model, config: dict, head: bool = False) -> Case:
    """timm ViT -> ViTModel (headless; the pooler keeps its initialisation: ``--allow-init pooler.*``),
    or -> ViTForImageClassification when the timm model has its 1000-class head."""
    import math

    from transformers import ViTConfig

    directory = work / name
    directory.mkdir(exist_ok=True)
    path = directory / "model.safetensors"
    specs = _meta_state_shapes(model)
    if not path.exists():
        sparse.write_sparse_safetensors(path, specs)
    ViTConfig(layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, **({"num_labels": 1000} if head else {}), **config).to_json_file(directory / "config.json")
    shutil.copy(ROOT / "known_mappings" / ("vit.yaml" if head else "vit_base.yaml"), directory / "known.yaml")
    extra = {} if head else {"extra": ["--allow-init", "pooler.*"], "allow_init": ["pooler.*"]}
    return Case(name, title, "ViTForImageClassification" if head else "ViTModel", path, directory / "config.json", directory / "known.yaml",
                tensors=len(specs), params=sum(math.prod(s) for _, s, _ in specs), **extra)


def build_vit_g(work: Path) -> Case:
    model = _timm_vit(model_name="vit_giant_patch14_224")
    config = dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144, image_size=224, patch_size=14)
    return _vit_case(work, "vit-g", "ViT-g/14 (timm vit_giant_patch14_224, safetensors fp32)", model, config)


def build_vit_depth(work: Path, depth: int) -> Case:
    model = _timm_vit(model_name="vit_base_patch16_224", depth=depth, num_classes=1000)
    config = dict(hidden_size=768, num_hidden_layers=depth, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16)
    return _vit_case(work, f"vit-depth-{depth}", f"ViT-B/16 width, {depth} layers", model, config, head=True)


def rotary_rules(rename) -> tuple:
    """What transformers' convert_llama_weights_to_hf.py does to Meta's wq/wk: within each head,
    rows from interleaved rotary pairs to halves (view(heads, head_dim/2, 2, dim).transpose(1, 2))."""
    from matcher.mapping import Rule
    from matcher.ops import MergeAxes, SplitAxis, Transpose

    heads = {"q": LLAMA_70B["num_attention_heads"], "k": LLAMA_70B["num_key_value_heads"]}
    return tuple(
        Rule(f"model.layers.{{i}}.self_attn.{p}_proj.weight", (rename(f"model.layers.{{i}}.self_attn.{p}_proj.weight"),),
             (SplitAxis(0, (count, -1, 2)), Transpose((0, 2, 1, 3)), MergeAxes(0, 2)))
        for p, count in heads.items()
    )


def build_llama(work: Path, layout: str) -> Case:
    """A Llama-3-70B-shaped checkpoint in bf16, keys as transformers names them ("hf") or as Meta's
    original checkpoints do ("meta"). Meta's wq/wk rows are in rotary-pair order, which shapes and
    names cannot show: the matcher asks (synonyms.yaml ``hidden_layouts``), and the Meta case is
    run as a user answers it: ``--mapping rotary.yaml`` pinning the two permutation rules, the
    rest inferred. The known mapping holds those rules too (the true conversion)."""
    _shim()
    from transformers import LlamaConfig

    from matcher.mapping import Mapping, Rule
    from matcher.targets import build_target

    directory = work / f"llama-70b-{layout}"
    directory.mkdir(exist_ok=True)
    config = LlamaConfig(**LLAMA_70B)
    config.to_json_file(directory / "config.json")
    target = build_target("LlamaForCausalLM", config).tree
    rename = (lambda k: k) if layout == "hf" else meta_name
    specs = [(rename(k), s.shape, "bfloat16") for k, s in target.specs.items()]
    path = directory / "model.safetensors"
    if not path.exists():
        sparse.write_sparse_safetensors(path, specs)
    rotary = rotary_rules(meta_name) if layout == "meta" else ()
    rotated = {rule.target for rule in rotary}
    renames = tuple(Rule(k, (rename(k),), ()) for k in target.keys() if re.sub(r"\.\d+\.", ".{i}.", k, count=1) not in rotated)
    Mapping(renames + rotary).save(directory / "known.yaml")
    pinned = None
    if rotary:
        pinned = directory / "rotary.yaml"
        Mapping(rotary, meta={"description": "Meta's wq/wk: rotary pairs to halves, as a person answers the matcher's question"}).save(pinned)
    title = "Llama-70B, transformers keys (bf16 safetensors)" if layout == "hf" else "Llama-70B, Meta keys (bf16 safetensors), wq/wk answered with --mapping"
    return Case(f"llama-{layout}", title, "LlamaForCausalLM", path, directory / "config.json", directory / "known.yaml",
                tensors=len(specs), params=sum(s.numel for s in target.specs.values()), pinned=pinned)


MOE = dict(hidden_size=2048, intermediate_size=1408, num_hidden_layers=66, num_attention_heads=16, num_key_value_heads=4,
           num_local_experts=256, num_experts_per_tok=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def build_moe(work: Path) -> Case:
    """A mixture-of-experts decoder as hub checkpoints store it (Mixtral's layout: one tensor per
    expert, ``block_sparse_moe.experts.{e}.w1/w2/w3``) -> transformers' MixtralForCausalLM, which
    holds each layer's experts in two fused 3-D parameters: 66 layers x 256 experts, 51 153
    tensors, 147 B bf16 parameters: a 294 GB sparse file. The known mapping is written out here by hand
    (transformers' own conversion_mapping.py does the same with MergeModulelist + Concatenate)."""
    _shim()
    from transformers import MixtralConfig

    from matcher.mapping import Mapping, Rule
    from matcher.ops import MergeAxes, SplitAxis, Stack, Transpose
    from matcher.targets import build_target

    directory = work / "moe"
    directory.mkdir(exist_ok=True)
    config = MixtralConfig(**MOE)
    config.to_json_file(directory / "config.json")
    target = build_target("MixtralForCausalLM", config).tree
    d, f, experts = MOE["hidden_size"], MOE["intermediate_size"], MOE["num_local_experts"]
    hub = "model.layers.{i}.block_sparse_moe"
    expert_shapes = {"w1": (f, d), "w2": (d, f), "w3": (f, d)}
    specs = []
    for key, spec in target.specs.items():
        if ".mlp.experts." in key:
            continue
        specs.append((key.replace(".mlp.gate.", ".block_sparse_moe.gate."), spec.shape, "bfloat16"))
    for layer in range(MOE["num_hidden_layers"]):
        for expert in range(experts):
            for name, shape in expert_shapes.items():
                specs.append((f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight", shape, "bfloat16"))
    path = directory / "model.safetensors"
    if not path.exists():
        sparse.write_sparse_safetensors(path, specs)
    rules = [Rule(k, (k.replace(".mlp.gate.", ".block_sparse_moe.gate."),), ()) for k in target.keys() if ".mlp.experts." not in k]
    rules += [
        Rule("model.layers.{i}.mlp.experts.gate_up_proj", (f"{hub}.experts.{{e}}.w1.weight", f"{hub}.experts.{{e}}.w3.weight"),
             (Stack(0), SplitAxis(0, (2, -1)), Transpose((1, 0, 2, 3)), MergeAxes(1, 2))),
        Rule("model.layers.{i}.mlp.experts.down_proj", (f"{hub}.experts.{{e}}.w2.weight",), (Stack(0),)),
    ]
    Mapping(tuple(rules)).save(directory / "known.yaml")
    return Case("moe", f"MoE decoder, {MOE['num_hidden_layers']} layers x {experts} experts (Mixtral hub layout, bf16 safetensors)",
                "MixtralForCausalLM", path, directory / "config.json", directory / "known.yaml",
                tensors=len(specs), params=sum(math.prod(shape) for _, shape, _ in specs))


def build_so400m_inferred(work: Path) -> Case:
    case = build_so400m(work)
    return Case("so400m-inferred", "SigLIP so400m/14-384, no --config (config inferred)", case.target_class, case.source, None, case.known,
                tensors=case.tensors, params=case.params)


def build_moe_inferred(work: Path) -> Case:
    case = build_moe(work)
    return Case("moe-inferred", "MoE decoder, 66 layers x 256 experts, no --config (config inferred)", case.target_class, case.source, None,
                case.known, tensors=case.tensors, params=case.params)


BUILDERS = {
    "so400m": build_so400m,
    "so400m-inferred": build_so400m_inferred,
    "vit-g": build_vit_g,
    "llama-hf": lambda work: build_llama(work, "hf"),
    "llama-meta": lambda work: build_llama(work, "meta"),
    "moe": build_moe,
    "moe-inferred": build_moe_inferred,
}


# ==================================================================================== children


def child_startup(target_class: str) -> None:
    """What every run imports before it touches the checkpoint."""
    import matcher.api  # noqa: F401
    import matcher.cli  # noqa: F401
    from matcher.targets import resolve_class

    resolve_class(target_class)


def _time_phases(matcher, phases: dict[str, float]) -> None:
    """Time the phases of matcher.match() by wrapping the functions it calls."""
    import matcher.api
    import matcher.targets

    def timed(module, name, label):
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if not inside[0]:  # the config check's own builds and matches count as the check
                    phases[label] = phases.get(label, 0.0) + time.perf_counter() - t

        setattr(module, name, wrapper)

    inside = [False]

    def checking(inner):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            inside[0] = True
            try:
                return inner(*args, **kwargs)
            finally:
                inside[0] = False
                phases["config check"] = phases.get("config check", 0.0) + time.perf_counter() - t

        return wrapper

    timed(matcher.api, "_source_tree", "read source")
    timed(matcher.targets, "build_target", "build target")
    timed(matcher.api, "match_trees", "match_trees")
    import matcher.config_infer

    timed(matcher.config_infer, "infer_config", "infer config")
    matcher.api._check_config_against_checkpoint = checking(matcher.api._check_config_against_checkpoint)


def _count_loads() -> list[int]:
    """How many tensors the matcher asks a source for (ParamTree.read): must stay 0."""
    from matcher.tree import ParamTree

    count = [0]
    inner = ParamTree.read

    def read(self, path):
        count[0] += 1
        return inner(self, path)

    ParamTree.read = read
    return count


def child_api(spec: dict) -> None:
    """One matcher.match() call, timed in-process, with its phases; then (untimed) the check
    against the known mapping. Prints one JSON line."""
    started = time.perf_counter()
    import matcher
    import matcher.api
    import matcher.targets
    from matcher.targets import resolve_class

    resolve_class(spec["target_class"])
    imported = time.perf_counter()
    phases: dict[str, float] = {}
    _time_phases(matcher, phases)
    loaded = _count_loads()
    t = time.perf_counter()
    report = matcher.match(spec["source"], spec["target_class"], config=spec["config"], mapping=spec.get("mapping"),
                           allow_init=spec.get("allow_init", []))
    seconds = time.perf_counter() - t
    result = {"import_s": imported - started, "match_s": seconds, "phases": phases, "complete": report.complete, "tensors_loaded": loaded[0],
              "rules": len(report.decisions), "unresolved": len(report.unresolved),
              "mapping_rules": report.mapping.to_dict()["rules"]}
    if spec.get("check"):
        from matcher.mapping import Mapping
        from tests.matching import harness as h

        known = Mapping.load(spec["known"])
        comparison = h.equivalent(report.mapping, known, report.source, report.target.tree)
        result["equivalent"] = comparison.exact
        result["agree"] = f"{len(comparison.agree)}/{comparison.known_total}"
        if not comparison.exact:
            result["comparison"] = str(comparison)[:2000]
    print(json.dumps(result))


def child_depth(spec: dict) -> None:
    """The depth curve in one process: a warm-up match, then each depth ``repeat`` times."""
    import matcher
    from matcher.targets import resolve_class

    cases = spec["cases"]
    resolve_class(cases[0]["target_class"])
    phases: dict[str, float] = {}
    _time_phases(matcher, phases)

    def run(case):
        return matcher.match(case["source"], case["target_class"], config=case["config"], allow_init=case["allow_init"])

    run(cases[0])  # warm-up: lazy imports, caches
    timings: dict[str, dict[str, list]] = {}
    for _ in range(spec["repeat"]):
        for case in cases:
            phases.clear()
            t = time.perf_counter()
            report = run(case)
            seconds = time.perf_counter() - t
            entry = timings.setdefault(case["name"], {"complete": []})
            entry.setdefault("match()", []).append(seconds)
            for label, value in phases.items():
                entry.setdefault(label, []).append(value)
            entry["complete"].append(report.complete)
    print(json.dumps(timings))


# ==================================================================================== measuring


def run_process(argv: list[str], env: dict | None = None) -> dict:
    return processes.run_process(argv, env, cwd=ROOT)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def self_argv(*args: str) -> list[str]:
    return [PYTHON, str(Path(__file__).resolve()), *args]


def startup_run(target_class: str) -> float:
    result = run_process(self_argv("--child-startup", target_class), _env())
    if result["code"] != 0:
        raise SystemExit(f"start-up process failed:\n{result['stderr'][-2000:]}")
    return result["wall"]


def cli_argv(case: Case) -> list[str]:
    config = ["--config", str(case.config)] if case.config else []
    pinned = ["--mapping", str(case.pinned)] if case.pinned else []
    return [MATCH, str(case.source), "--target", case.target_class, *config, *pinned, "--json", *case.extra]


def api_spec(case: Case, check: bool) -> str:
    return json.dumps({"source": str(case.source), "target_class": case.target_class, "config": str(case.config) if case.config else None,
                       "known": str(case.known), "allow_init": case.allow_init, "check": check,
                       "mapping": str(case.pinned) if case.pinned else None})


def _cli_once(case: Case, env: dict) -> dict:
    result = run_process(cli_argv(case), env)
    if result["code"] not in (0, 3):
        raise SystemExit(f"{case.name}: match exited {result['code']}:\n{result['stderr'][-2000:]}")
    return result


def _api_once(case: Case, env: dict, check: bool) -> dict:
    result = run_process(self_argv("--child-api", api_spec(case, check=check)), env)
    if result["code"] != 0:
        raise SystemExit(f"{case.name}: API child failed:\n{result['stderr'][-3000:]}")
    data = json.loads(result["stdout"].strip().splitlines()[-1])
    data["wall"] = result["wall"]
    return data


def measure(cases: list[Case], repeat: int, trace: bool) -> list[dict]:
    """``repeat`` rounds; each round runs one start-up process per target class, then every case's
    CLI process and API process, so that start-up and the runs it is subtracted from see the same
    machine. Then one traced CLI run and one traced API run per checkpoint."""
    env = _env()
    startup: dict[str, list[float]] = defaultdict(list)
    cli: dict[str, list[dict]] = defaultdict(list)
    api: dict[str, list[dict]] = defaultdict(list)
    paired: dict[str, list[float]] = defaultdict(list)
    for n in range(repeat):
        print(f"round {n + 1}/{repeat} ...", file=sys.stderr)
        measured: set[str] = set()
        for case in cases:
            if case.target_class not in measured:  # right before the first case of its class
                startup[case.target_class].append(startup_run(case.target_class))
                measured.add(case.target_class)
            cli[case.name].append(_cli_once(case, env))
            paired[case.name].append(cli[case.name][-1]["wall"] - startup[case.target_class][-1])
            api[case.name].append(_api_once(case, env, check=n == 0))
    rows = []
    traced_files: dict[Path, dict] = {}
    traced_formats: set[str] = set()
    for case in cases:
        runs, calls = cli[case.name], api[case.name]
        report = json.loads(runs[0]["stdout"])
        cli_rules = [{k: v for k, v in r.items() if k not in ("confidence", "reasons")} for r in report["rules"]]
        row = {
            "case": case.name, "title": case.title, "tensors": case.tensors, "params": case.params,
            "startup": statistics.median(startup[case.target_class]), "startups": startup[case.target_class],
            "cli_wall": statistics.median(r["wall"] for r in runs), "cli_walls": [r["wall"] for r in runs],
            "api_match": statistics.median(a["match_s"] for a in calls), "api_matches": [a["match_s"] for a in calls],
            "phases": {k: statistics.median(a["phases"].get(k, 0.0) for a in calls) for k in calls[0]["phases"]},
            "tensors_loaded": max(a["tensors_loaded"] for a in calls),
            "complete": report["complete"], "cli_code": runs[0]["code"], "rules": len(report["rules"]),
            "cli_equals_api": cli_rules == calls[0]["mapping_rules"],
            "equivalent": calls[0].get("equivalent"), "agree": calls[0].get("agree"), "comparison": calls[0].get("comparison"),
            "rss_cli": max(r["rss"] for r in runs), **sparse.disk_usage(case.source),
        }
        row["cli_net"] = statistics.median(paired[case.name])
        row["cli_nets"] = paired[case.name]
        if trace and case.source not in traced_files:  # a second case on the same file reads it the same way
            print(f"tracing reads of {case.source.name} ({case.name}) ...", file=sys.stderr)
            regions = sparse.data_regions(case.source)
            counts = {"data_region_bytes": sum(b - a for a, b in regions)}
            counts["header_bytes"] = case.source.stat().st_size - counts["data_region_bytes"]
            runs_to_trace = [("cli", cli_argv(case))]
            if case.source.suffix not in traced_formats:  # the API reads through the same reader: once per format
                runs_to_trace.append(("api", self_argv("--child-api", api_spec(case, check=False))))
                traced_formats.add(case.source.suffix)
            for label, argv in runs_to_trace:
                sparse.evict(case.source)
                before = sparse.pages_inside(sparse.resident_pages(case.source), regions)
                traced = sparse.traced_reads(argv, case.source, env=env, log=case.source.parent / f"{label}.strace")
                if traced["returncode"] not in (0, 3):
                    raise SystemExit(f"{case.name}: traced {label} run failed:\n{traced['stderr'][-2000:]}")
                after = sparse.pages_inside(sparse.resident_pages(case.source), regions)
                counts[f"read_{label}"] = traced["bytes_read"]
                counts[f"data_read_{label}"] = sparse.overlap(traced["ranges"], regions)
                counts[f"mmaps_{label}"] = len(traced["mmaps"])
                counts[f"data_pages_{label}"] = max(0, after - before)
            counts["traced_as"] = case.name
            traced_files[case.source] = counts
        if trace:
            row.update(traced_files[case.source])
        rows.append(row)
    return rows


def measure_depth(work: Path, repeat: int) -> list[dict]:
    """Every depth ``repeat`` times (at least 5) in one API process, after a warm-up match, with
    the phases of match()."""
    cases = [build_vit_depth(work, depth) for depth in DEPTHS]
    spec = json.dumps({"repeat": max(5, repeat), "cases": [{"name": c.name, "source": str(c.source), "config": str(c.config),
                                                             "target_class": c.target_class, "allow_init": c.allow_init} for c in cases]})
    result = run_process(self_argv("--child-depth", spec), _env())
    if result["code"] != 0:
        raise SystemExit(f"depth child failed:\n{result['stderr'][-3000:]}")
    timings = json.loads(result["stdout"].strip().splitlines()[-1])
    rows = []
    for case in cases:
        entry = timings[case.name]
        row = {"case": case.name, "depth": int(case.name.rsplit("-", 1)[1]), "tensors": case.tensors, "params": case.params,
               "file_bytes": case.source.stat().st_size, "complete": all(entry.pop("complete"))}
        row.update({label: statistics.median(values) for label, values in entry.items()})
        rows.append(row)
    return rows


# ==================================================================================== output


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _bytes(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 10 * 1024 else f"{n} B"


def render(baseline: dict, rows: list[dict], depth: list[dict], trace: bool, repeat: int) -> str:
    lines = [f"{repeat} rounds, every run a fresh process; {os.cpu_count()} cores, {_ram() / GB:.0f} GB RAM. "
             f"`python -c pass`: {baseline['python']:.2f} s; `match --help`: {baseline['help']:.2f} s.", ""]
    lines += ["| case | tensors | params | file size (on disk) | CLI wall | start-up | **CLI wall - start-up** | API `match()` | complete | = known mapping |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['title']} | {r['tensors']} | {r['params'] / 1e9:.2f} B | {_gb(r['apparent_bytes'])} ({_bytes(r['allocated_bytes'])}) "
            f"| {r['cli_wall']:.2f} s | {r['startup']:.2f} s | **{r['cli_net']:.2f} s** | {r['api_match']:.2f} s "
            f"| {'yes' if r['complete'] else 'no (exit %d)' % r['cli_code']} | {'yes' if r['equivalent'] else 'NO'} ({r['agree']}) |"
        )
    lines += ["", "Medians over the rounds. CLI wall: `match SRC --target CLASS --config CFG --json`. Start-up: a process that "
              "imports matcher, torch, transformers and the target class and stops, run in each round just before the first "
              "case of that class. CLI wall - start-up: the median of the per-round differences; both are ~4 s process "
              "launches whose run-to-run spread on this shared machine is about +-0.3 s, so this column is good to about "
              "+-0.2 s (it can even come out negative). API `match()`: `matcher.match(SRC, CLASS, config=CFG)` timed "
              "in-process after those imports, in a fresh process per round: the precise number. Its phases (medians; "
              "`config check`: the comparison with an inferred config that `match()` runs when the report is incomplete "
              "before `--allow-init` is applied):", ""]
    lines += [f"- {r['case']}: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["phases"].items())
              + f"; tensors read through the source tree: {r['tensors_loaded']}" for r in rows]
    so400m = next((r for r in rows if r["case"] == "so400m"), None)
    if so400m:
        ok = so400m["cli_net"] <= GOAL_SO400M and so400m["api_match"] <= GOAL_SO400M
        lines += ["", f"Goal so400m <= {GOAL_SO400M:.0f} s: CLI wall - start-up {so400m['cli_net']:.2f} s, API match() "
                  f"{so400m['api_match']:.2f} s -> {'met' if ok else 'NOT met'}."]
    moe = next((r for r in rows if r["case"] == "moe"), None)
    if moe:
        ok = moe["cli_wall"] <= GOAL_MOE_SECONDS and moe["rss_cli"] / GB <= GOAL_MOE_RSS
        lines += [f"Goal {moe['tensors']}-tensor MoE <= {GOAL_MOE_SECONDS:.0f} s and <= {GOAL_MOE_RSS:.0f} GB: whole CLI run "
                  f"{moe['cli_wall']:.2f} s (start-up included), API match() {moe['api_match']:.2f} s, peak RSS of the CLI process "
                  f"{moe['rss_cli'] / GB:.2f} GB -> {'met' if ok else 'NOT met'}."]
    if trace:
        import mmap

        lines += ["", "What each run read of the checkpoint (one CLI and one API run per file). `read`: bytes delivered by read "
                  "syscalls (`strace -f -P SRC`: every thread, any library), and of those the bytes inside the ranges that hold "
                  "tensor data. `pages`: tensor-data pages that entered the page cache during the run (`mincore` after "
                  "`posix_fadvise(DONTNEED)`): any access path, memory maps included, kernel read-ahead included. `mmaps`: "
                  "maps of SRC (a map reads nothing until touched; the pages column shows what was). The API run is traced once per "
                  "reader (npz, safetensors).", "",
                  "| file | size / RAM | headers | tensor data | CLI: read | of it tensor data | tensor-data pages | API: read | of it tensor data | tensor-data pages | mmaps | peak RSS (CLI) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("traced_as") != r["case"]:
                continue
            api = (f"| {_bytes(r['read_api'])} | **{_bytes(r['data_read_api'])}** | {_bytes(r['data_pages_api'] * mmap.PAGESIZE)} "
                   if "read_api" in r else "| (same reader as above) | | ")
            lines.append(
                f"| {r['case']} | {r['apparent_bytes'] / _ram():.2f} x | {_bytes(r['header_bytes'])} | {_gb(r['data_region_bytes'])} "
                f"| {_bytes(r['read_cli'])} | **{_bytes(r['data_read_cli'])}** | {_bytes(r['data_pages_cli'] * mmap.PAGESIZE)} "
                + api + f"| {r['mmaps_cli'] + r.get('mmaps_api', 0)} | {r['rss_cli'] / GB:.2f} GB |"
            )
    if depth:
        base = depth[0]
        labels = [k for k in ("read source", "build target", "match_trees", "config check") if k in base]
        lines += ["", "Cost against depth (ViT-B/16 width, timm layout with its 1000-class head -> ViTForImageClassification; medians of "
                  f"{max(5, repeat)} `match()` calls in one process after a warm-up):", "",
                  "| layers | tensors | `match()` | ratio | " + " | ".join(labels) + " | `match_trees` ratio | complete |",
                  "|---|---|---|---|" + "---|" * len(labels) + "---|---|"]
        for r in depth:
            lines.append(
                f"| {r['depth']} | {r['tensors']} | {r['match()']:.3f} s | {r['match()'] / base['match()']:.2f} | "
                + " | ".join(f"{r[k]:.3f} s" for k in labels)
                + f" | {r['match_trees'] / base['match_trees']:.2f} | {'yes' if r['complete'] else 'no'} |"
            )
    problems = [r for r in rows if not r["cli_equals_api"]]
    if problems:
        lines.append("\nCLI and API mappings differ on: " + ", ".join(r["case"] for r in problems))
    for r in rows:
        if r.get("comparison"):
            lines += ["", f"{r['case']} against the known mapping:", "```", r["comparison"], "```"]
    return "\n".join(lines)


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ==================================================================================== main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (medians reported)")
    parser.add_argument("--only", help=f"comma-separated cases ({', '.join(BUILDERS)})")
    parser.add_argument("--no-depth", action="store_true", help="skip the depth curve")
    parser.add_argument("--no-trace", action="store_true", help="skip the strace byte counts")
    parser.add_argument("--work", type=Path, help="where the sparse checkpoints go (default: a temporary directory, removed)")
    parser.add_argument("--json-out", type=Path, help="also write the raw measurements here")
    parser.add_argument("--child-startup", help=argparse.SUPPRESS)
    parser.add_argument("--child-api", help=argparse.SUPPRESS)
    parser.add_argument("--child-depth", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_startup:
        child_startup(args.child_startup)
        return 0
    if args.child_api:
        child_api(json.loads(args.child_api))
        return 0
    if args.child_depth:
        child_depth(json.loads(args.child_depth))
        return 0

    trace = not args.no_trace and sparse.strace_available()
    if not args.no_trace and not trace:
        print("strace not found: byte counts skipped (the sparse-file argument remains)", file=sys.stderr)
    names = args.only.split(",") if args.only else list(BUILDERS)
    work = args.work or Path(tempfile.mkdtemp(prefix="matcher-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        t = time.perf_counter()
        cases = [BUILDERS[name](work) for name in names]
        print(f"checkpoints written in {time.perf_counter() - t:.1f} s under {work}: "
              + ", ".join(f"{c.name} {_gb(c.source.stat().st_size)}" for c in cases), file=sys.stderr)
        env = _env()
        baseline = {
            "python": statistics.median(run_process([PYTHON, "-c", "pass"], env)["wall"] for _ in range(args.repeat)),
            "help": statistics.median(run_process([MATCH, "--help"], env)["wall"] for _ in range(args.repeat)),
        }
        rows = measure(cases, args.repeat, trace)
        print("measuring the depth curve ...", file=sys.stderr)
        depth = [] if args.no_depth else measure_depth(work, args.repeat)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = render(baseline, rows, depth, trace, args.repeat)
    print(text)
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"baseline": baseline, "cases": rows, "depth": depth}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
