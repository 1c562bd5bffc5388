"""``match audit``: recover, from the values alone, the mapping an existing converter applied.

- every seed converter of ../shared/seeds, reimplemented in tests/fixtures/seed_converters.py and run
  on fingerprint-filled arrays, is recovered as exactly its family's known mapping (harness.equivalent);
- each planted bug is named: which target, what it holds, what it should hold;
- a converted directory (ours, or transformers' save_pretrained with legacy names) audits clean, and a
  corrupted, swapped or fp16 tensor in it is reported with the right exit code;
- the tracer on small arrays: every op shape it explains, ambiguity instead of guesses, why not;
- the CLI: exit codes, --json, usage errors and bad input as one line.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from matcher.audit import audit, fingerprint_arrays
from matcher.audit import fingerprints
from matcher.audit.report import Reference, build_report
from matcher.audit.trace import Explanation, Tracer
from matcher.cli import main
from matcher.convert import convert
from matcher.mapping import Mapping, Rule
from matcher.ops import Chunk, Concat, Select, SplitAxis, Stack, Transpose, apply_chain
from matcher.sources import open_tree
from matcher.targets import build_target
from matcher.tree import ParamTree, TensorSpec
from tests.fixtures import make_chinese_clip, make_clip, make_clipseg, make_owlvit, make_siglip, make_vit
from tests.fixtures import seed_converters
from tests.matching.harness import equivalent

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ROOT / "known_mappings"
SEED_SCRIPT = ROOT / "tests" / "fixtures" / "seed_converters.py"

FAMILIES = {  # family -> (fixture generator, target class, known mapping)
    "siglip": (make_siglip.make, "SiglipModel", "siglip"),
    "chinese_clip": (make_chinese_clip.make, "ChineseCLIPModel", "chinese_clip"),
    "clip": (make_clip.make, "CLIPModel", "clip"),
    "clipseg": (make_clipseg.make, "CLIPSegForImageSegmentation", "clipseg"),
    "owlvit": (make_owlvit.make, "OwlViTForObjectDetection", "owlvit"),
    "vit": (make_vit.make, "ViTForImageClassification", "vit"),
    "vit_headless": (lambda out: make_vit.make(out)["variants"]["vit_headless"], "ViTModel", "vit_base"),  # the seed's base_model path
    "deit": (lambda out: make_vit.make(out)["variants"]["deit"], "ViTForImageClassification", "vit"),
}
SEED_OF = {**seed_converters.SEEDS, "vit_headless": seed_converters.vit, "deit": seed_converters.vit}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """family -> its generated checkpoint (made on first use)."""
    made: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in made:
            made[family] = FAMILIES[family][0](tmp_path_factory.mktemp(family))
        return made[family]

    return get


def audit_seed(fixtures, family: str, converter, mapping: str | None = "known"):
    make, target_class, known = FAMILIES[family]
    fixture = fixtures(family)
    return audit(fixture["source"], converter=converter, target_class=target_class, config=fixture["config"],
                 mapping=KNOWN / f"{known}.yaml" if mapping == "known" else mapping)


def by_target(items: list[dict]) -> dict[str, dict]:
    return {item["target"]: item for item in items}


# ====================================================================================== seed converters


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_seed_converter_is_recovered_as_its_known_mapping(fixtures, family):
    report = audit_seed(fixtures, family, SEED_OF[family])
    _, target_class, known = FAMILIES[family]
    fixture = fixtures(family)
    comparison = equivalent(report.mapping, Mapping.load(KNOWN / f"{known}.yaml"), open_tree(fixture["source"]),
                            build_target(target_class, fixture["config"]).tree)
    assert comparison.exact, str(comparison)
    assert report.exit_code == 0, "\n".join(report.lines())
    # recovered from the values alone: every target found by the search, none ambiguous
    assert {t["found_by"] for t in report.traced} == {"values"}
    assert not [t["target"] for t in report.traced if t.get("ambiguous_with")]


def test_a_seed_converter_agrees_with_the_mapping_match_infers(fixtures):
    report = audit_seed(fixtures, "siglip", seed_converters.siglip, mapping=None)
    assert report.reference == "the mapping match infers"
    assert report.exit_code == 0, "\n".join(report.lines())


def test_the_seeds_drop_exactly_what_the_known_mappings_declare_dropped(fixtures):
    report = audit_seed(fixtures, "clipseg", seed_converters.clipseg)
    unused = {u["source"] for u in report.unused_sources}
    assert unused == {k for k in open_tree(fixtures("clipseg")["source"]).keys() if k.startswith("model.") or k.startswith("reduce.")}
    assert all(u["expected"] for u in report.unused_sources)
    # the seed writes reduce.* under a name the class does not have: listed, and the source counts as dropped
    assert {n["key"] for n in report.not_in_class} == {"decoder.reduce.weight", "decoder.reduce.bias"}
    assert "written only as decoder.reduce.weight" in by_source(report.unused_sources)["reduce.weight"]["unused"]


def by_source(items: list[dict]) -> dict[str, dict]:
    return {item["source"]: item for item in items}


# ====================================================================================== planted bugs


ATTENTION_KERNEL = re.compile(r"(vision|text)_model\.encoder\.layers\.\d+\.self_attn\.[qkv]_proj\.weight$")


def test_heads_reshaped_in_the_wrong_order_are_named_per_kernel(fixtures):
    report = audit_seed(fixtures, "siglip", seed_converters.siglip_heads_in_wrong_order)
    assert report.exit_code == 4
    kernels = {k for k in build_target("SiglipModel", fixtures("siglip")["config"]).tree.keys() if ATTENTION_KERNEL.match(k)}
    disagreements = by_target(report.disagreements)
    assert set(disagreements) == kernels
    for d in disagreements.values():  # each holds its own kernel, read (Dh, H, D) instead of (D, H*Dh)
        assert d["holds_rules"][0]["sources"] == d["expected_rule"]["sources"]
    query = "params/img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    assert disagreements["vision_model.encoder.layers.0.self_attn.q_proj.weight"]["holds"] == f"transpose([2, 1, 0]) | merge_axes(start=0, end=1) <- {query}"
    assert disagreements["vision_model.encoder.layers.0.self_attn.q_proj.weight"]["expected"] == f"merge_axes(start=1, end=2) | transpose([1, 0]) <- {query}"


def test_a_missing_transpose_is_named(fixtures):
    report = audit_seed(fixtures, "siglip", seed_converters.siglip_transpose_missing)
    assert report.exit_code == 4
    assert [(d["target"], d["holds"], d["expected"]) for d in report.disagreements] == [
        ("text_model.head.weight", "rename <- params/txt/head/kernel", "transpose([1, 0]) <- params/txt/head/kernel")
    ]


def test_q_and_k_swapped_are_named_with_the_part_each_holds(fixtures):
    report = audit_seed(fixtures, "chinese_clip", seed_converters.chinese_clip_q_k_swapped)
    assert report.exit_code == 4
    disagreements = by_target(report.disagreements)
    assert set(disagreements) == {f"vision_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for i in (0, 1) for p in "qk" for kind in ("weight", "bias")}
    q = disagreements["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    fused = "visual.transformer.resblocks.1.attn.in_proj_weight"
    assert (q["holds"], q["expected"]) == (f"chunk(axis=0, index=1, parts=3) <- {fused}", f"chunk(axis=0, index=0, parts=3) <- {fused}")
    assert not report.untraced and not report.unused_sources  # nothing lost, only exchanged


def test_a_skipped_tensor_is_untraced_and_its_source_unused(fixtures):
    report = audit_seed(fixtures, "owlvit", seed_converters.owlvit_tensor_skipped)
    assert report.exit_code == 3
    assert report.untraced == [{"target": "layer_norm.bias", "reason": "not in the converted checkpoint",
                                "expected": "rename <- optimizer/target/backbone/merged_class_token/bias"}]
    assert [u["source"] for u in report.unexpected_drops] == ["optimizer/target/backbone/merged_class_token/bias"]


def test_a_bias_from_the_wrong_layer_is_named_with_both_layers(fixtures):
    report = audit_seed(fixtures, "vit", seed_converters.vit_bias_from_wrong_layer)
    assert report.exit_code == 3  # layer 1's fused bias is dropped
    disagreements = by_target(report.disagreements)
    assert set(disagreements) == {f"vit.layers.1.attention.{p}_proj.bias" for p in "qkv"}
    for d in disagreements.values():
        assert d["holds_rules"][0]["sources"] == ["blocks.0.attn.qkv.bias"]
        assert d["expected_rule"]["sources"] == ["blocks.1.attn.qkv.bias"]
        assert d["holds_rules"][0]["ops"] == d["expected_rule"]["ops"]  # the right part, of the wrong layer
    assert [u["source"] for u in report.unexpected_drops] == ["blocks.1.attn.qkv.bias"]
    assert report.used_twice == [{"source": "blocks.0.attn.qkv.bias", "targets": [f"vit.layers.{i}.attention.{p}_proj.bias" for i in (0, 1) for p in "qkv"]}]


# ====================================================================================== converted checkpoints


@pytest.fixture(scope="module")
def siglip_converted(fixtures, tmp_path_factory):
    fixture = fixtures("siglip")
    out = convert(fixture["source"], "SiglipModel", fixture["config"], KNOWN / "siglip.yaml", tmp_path_factory.mktemp("siglip_out") / "hf")
    return fixture, out


def changed_copy(converted: Path, tmp_path: Path, change) -> Path:
    """A copy of a converted directory whose weights went through ``change(weights)``."""
    copy = tmp_path / "changed"
    shutil.copytree(converted, copy)
    weights = load_file(converted / "model.safetensors")
    change(weights)
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def run_audit(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["audit", *map(str, args)])
    return result.exit_code, result.output


def test_a_converted_directory_audits_clean(siglip_converted):
    fixture, out = siglip_converted
    code, output = run_audit(fixture["source"], out, "--target", "SiglipModel")
    assert code == 0, output
    assert "traced 88 of 88 target tensors; 0 disagree; 0 untraced" in output


def test_a_corrupted_tensor_is_untraced_and_its_source_unused(siglip_converted, tmp_path):
    fixture, out = siglip_converted
    bias = "vision_model.encoder.layers.0.mlp.fc1.bias"
    changed = changed_copy(out, tmp_path, lambda w: w.__setitem__(bias, w[bias] + 1))
    report = audit(fixture["source"], changed, target_class="SiglipModel")
    assert report.exit_code == 3
    assert [u["target"] for u in report.untraced] == [bias]
    assert "in no source tensor" in report.untraced[0]["reason"]
    assert [u["source"] for u in report.unexpected_drops] == ["params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias"]


def test_two_swapped_tensors_each_hold_the_other_source(siglip_converted, tmp_path):
    fixture, out = siglip_converted
    q, k = (f"text_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qk")
    changed = changed_copy(out, tmp_path, lambda w: w.update({q: w[k], k: w[q]}))
    code, output = run_audit(fixture["source"], changed, "--target", "SiglipModel", "--json")
    assert code == 4
    kernel = "params/txt/Encoder_0/encoderblock_0/MultiHeadDotProductAttention_0/{}/kernel"
    assert {d["target"]: (d["holds_rules"][0]["sources"], d["expected_rule"]["sources"]) for d in json.loads(output)["disagreements"]} == {
        q: ([kernel.format("key")], [kernel.format("query")]),
        k: ([kernel.format("query")], [kernel.format("key")]),
    }


def test_one_tensor_saved_in_fp16_is_a_precision_loss_that_disagrees(siglip_converted, tmp_path):
    fixture, out = siglip_converted
    head = "text_model.head.weight"
    changed = changed_copy(out, tmp_path, lambda w: w.__setitem__(head, w[head].astype(np.float16)))
    report = audit(fixture["source"], changed, target_class="SiglipModel")
    assert report.exit_code == 4
    assert report.precision_loss == [{"target": head, "from": "float32", "to": "float16"}]
    assert [d["target"] for d in report.disagreements] == [head]
    assert by_target(report.traced)[head]["cast"] == {"from": "float32", "to": "float16", "precision_lost": True}


def test_a_checkpoint_saved_in_fp16_is_listed_not_failed_even_with_its_norms_kept_in_fp32(siglip_converted, tmp_path):
    fixture, out = siglip_converted
    halved = lambda w: w.update({k: v.astype(np.float16) for k, v in w.items() if "norm" not in k})  # noqa: E731
    report = audit(fixture["source"], changed_copy(out, tmp_path, halved), target_class="SiglipModel")
    assert report.exit_code == 0, "\n".join(report.lines())
    assert {p["target"] for p in report.precision_loss} == {t for t in load_file(out / "model.safetensors") if "norm" not in t}
    assert not report.disagreements


def test_identical_copies_in_a_checkpoint_are_ambiguous_and_the_reference_settles_them(fixtures, tmp_path):
    fixture = fixtures("clipseg")  # CLIPSeg saves its visual tower twice: clip_model.visual.* and model.*
    out = convert(fixture["source"], "CLIPSegForImageSegmentation", fixture["config"], KNOWN / "clipseg.yaml", tmp_path / "hf")
    report = audit(fixture["source"], out, target_class="CLIPSegForImageSegmentation", mapping=KNOWN / "clipseg.yaml")
    assert report.exit_code == 0, "\n".join(report.lines())
    q = by_target(report.traced)["clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert q["sources"] == ["clip_model.visual.transformer.resblocks.0.attn.in_proj_weight"] and q["settled_by"] == "the reference"
    assert q["ambiguous_with"] == ["chunk(axis=0, index=0, parts=3) <- model.transformer.resblocks.0.attn.in_proj_weight"]
    assert all(u["expected"] for u in report.unused_sources)  # model.* is declared dropped by clipseg.yaml


def test_legacy_file_names_are_read_as_the_class_loads_them(fixtures, tmp_path):
    import transformers
    from safetensors.torch import load_file as load_torch

    headless = fixtures("vit")["variants"]["vit_headless"]
    ours = convert(headless["source"], "ViTModel", headless["config"], KNOWN / "vit_base.yaml", tmp_path / "ours")
    model = transformers.ViTModel(transformers.ViTConfig.from_pretrained(ours))  # a fresh model saves legacy names
    model.load_state_dict(load_torch(ours / "model.safetensors"), strict=False)  # its pooler stays random
    model.save_pretrained(tmp_path / "legacy")
    stored = set(load_file(tmp_path / "legacy" / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.query.weight" in stored  # transformers' legacy file names
    report = audit(headless["source"], tmp_path / "legacy", target_class="ViTModel", mapping=KNOWN / "vit_base.yaml")
    assert report.exit_code == 0, "\n".join(report.lines())
    assert report.renamed["encoder.layer.0.attention.attention.query.weight"] == "layers.0.attention.q_proj.weight"
    assert by_target(report.traced)["layers.0.attention.q_proj.weight"]["ops"] == [{"chunk": {"axis": 0, "index": 0, "parts": 3}}]
    # the pooler save_pretrained wrote is the random one from_pretrained made: initialised, as vit_base.yaml declares
    assert report.initialised == ["pooler.dense.weight", "pooler.dense.bias"]


# ====================================================================================== the tracer


def rng_arrays(**shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def only_explanation(tracer: Tracer, target: np.ndarray) -> Explanation:
    trace = tracer.trace("t", target)
    assert len(trace.explanations) == 1, trace.describe()
    return trace.explanations[0]


def test_the_tracer_explains_each_kind_of_op_by_running_it():
    sources = rng_arrays(kernel=(8, 2, 4), conv=(3, 3, 2, 4), qkv=(12, 4), stack=(3, 4, 5), a=(2, 4), b=(3, 4), c=(2, 4), pos=(1, 6, 4))
    tracer = Tracer(sources)
    s = sources
    cases = {  # target array -> what must explain it
        "attention kernel (D, H, Dh) -> torch (out, in)": (s["kernel"].reshape(8, 8).T, ("kernel",)),
        "conv HWIO -> OIHW": (s["conv"].transpose(3, 2, 0, 1), ("conv",)),
        "split head axis": (s["qkv"].reshape(12, 2, 2), ("qkv",)),
        "squeezed position embedding": (s["pos"][0], ("pos",)),
        "middle part of fused qkv": (s["qkv"][4:8], ("qkv",)),
        "unequal part": (s["b"][1:], ("b",)),
        "one layer of a scanned stack, transposed": (s["stack"][1].T, ("stack",)),
        "concat of two": (np.concatenate([s["a"], s["b"]]), ("a", "b")),
        "stack of two": (np.stack([s["a"], s["c"]]), ("a", "c")),
    }
    for what, (target, want_sources) in cases.items():
        explanation = only_explanation(tracer, target)
        assert explanation.sources == want_sources, what
        assert np.array_equal(apply_chain(explanation.ops, [s[n] for n in want_sources]), target), what
    assert isinstance(only_explanation(tracer, s["qkv"][4:8]).ops[0], Chunk)
    assert isinstance(only_explanation(tracer, s["stack"][1].T).ops[0], Select)
    assert isinstance(only_explanation(tracer, np.concatenate([s["a"], s["b"]])).ops[-1], Concat)
    assert isinstance(only_explanation(tracer, np.stack([s["a"], s["c"]])).ops[-1], Stack)
    assert any(isinstance(op, SplitAxis) for op in only_explanation(tracer, s["qkv"].reshape(12, 2, 2)).ops)
    assert isinstance(only_explanation(tracer, s["conv"].transpose(3, 2, 0, 1)).ops[0], Transpose)


def test_a_dtype_cast_is_an_explained_step_with_its_precision():
    sources = rng_arrays(w=(4, 6))
    tracer = Tracer(sources)
    narrowed = only_explanation(tracer, sources["w"].T.astype(ml_dtypes.bfloat16))
    assert narrowed.cast == ("float32", "bfloat16", True)
    widened = only_explanation(Tracer({"h": sources["w"].astype(np.float16)}), sources["w"].astype(np.float16).astype(np.float32))
    assert widened.cast == ("float16", "float32", False)


def test_the_tracer_says_why_it_cannot_explain_a_tensor():
    sources = rng_arrays(w=(4, 6), v=(6,))
    tracer = Tracer(sources)
    shuffled = sources["w"].reshape(-1)[np.random.default_rng(1).permutation(24)].reshape(4, 6)
    assert tracer.trace("t", shuffled).reason == "holds the values of w in an order no transpose or reshape reproduces"
    assert "in no source tensor" in tracer.trace("t", sources["w"] + 1).reason
    assert "where it came from cannot be told" in tracer.trace("t", np.zeros((5,), np.float32)).reason


def test_identical_sources_are_ambiguous_and_settled_only_by_the_reference():
    ones = np.ones(4, np.float32)  # a fresh model's LayerNorm weights: equal by coincidence
    sources = {"a.ln.weight": ones, "b.ln.weight": ones.copy(), "w": rng_arrays(w=(3,))["w"]}
    converted = {"x.norm.weight": ones.copy(), "y.norm.weight": ones.copy(), "z": sources["w"].copy()}
    tracer = Tracer(sources)
    trace = tracer.trace("x.norm.weight", converted["x.norm.weight"])
    assert trace.describe() == "rename <- any of 2 identical sources: a.ln.weight, b.ln.weight"

    unsettled = build_report(Tracer(sources), converted, source_name="src", converted_name="out", class_keys=None, target_class=None, reference=None)
    assert unsettled.exit_code == 0 and not unsettled.unused_sources  # possibly used, not reported as dropped
    assert {r.target for r in unsettled.mapping.rules} == {"z"}  # nothing guessed into the recovered mapping

    rules = Mapping((Rule("x.norm.weight", ("a.ln.weight",)), Rule("y.norm.weight", ("b.ln.weight",)), Rule("z", ("w",))))
    expansion = rules.expand(sources, converted)
    reference = Reference("the given mapping", {r.target: r for r in expansion.rules})
    settled = build_report(Tracer(sources, search_always=False), converted, source_name="src", converted_name="out",
                           class_keys=list(converted), target_class=None, reference=reference)
    assert settled.exit_code == 0 and not settled.disagreements and not settled.unused_sources
    x = by_target(settled.traced)["x.norm.weight"]
    assert (x["sources"], x["settled_by"], x["ambiguous_with"]) == (["a.ln.weight"], "the reference", ["rename <- b.ln.weight"])


def test_fingerprints_give_every_element_of_the_tree_its_own_value(monkeypatch):
    tree = ParamTree({"a": TensorSpec("a", (3, 4), "float32"), "b": TensorSpec("b", (5,), "bfloat16"), "n": TensorSpec("n", (2,), "int64")})
    arrays = fingerprint_arrays(tree)
    assert {k: (a.shape, a.dtype.name) for k, a in arrays.items()} == {"a": ((3, 4), "float32"), "b": ((5,), "float32"), "n": ((2,), "int64")}
    floats = np.concatenate([arrays["a"].ravel(), arrays["b"].ravel()])
    assert np.array_equal(floats, np.arange(1, 18))  # small trees: the integers, exact in float32
    monkeypatch.setattr(fingerprints, "_EXACT_FLOAT32_INTEGERS", 8)  # as if the tree were past 2**24 elements
    big = fingerprint_arrays(tree)
    values = np.concatenate([big["a"].ravel(), big["b"].ravel()])
    assert len(np.unique(values)) == values.size and np.isfinite(values).all() and values.dtype == np.float32


# ====================================================================================== the CLI


def test_json_report_has_the_documented_lists(fixtures):
    fixture = fixtures("vit")
    code, output = run_audit(fixture["source"], "--converter", f"{SEED_SCRIPT}:vit_bias_from_wrong_layer",
                             "--target", "ViTForImageClassification", "--config", fixture["config"], "--json")
    assert code == 3
    data = json.loads(output)
    assert {"traced", "disagreements", "untraced", "unused_sources"} <= set(data) and data["exit_code"] == 3
    assert all({"target", "holds", "expected"} <= set(d) for d in data["disagreements"]) and len(data["disagreements"]) == 3
    assert [u["source"] for u in data["unused_sources"]] == ["blocks.1.attn.qkv.bias"]
    assert all({"target", "sources", "ops", "transform"} <= set(t) for t in data["traced"])


def test_the_recovered_mapping_is_written_and_loads(fixtures, tmp_path):
    fixture = fixtures("chinese_clip")
    code, output = run_audit(fixture["source"], "--converter", f"{SEED_SCRIPT}:chinese_clip", "--target", "ChineseCLIPModel",
                             "--config", fixture["config"], "--mapping", "chinese_clip", "--mapping-out", tmp_path / "recovered.yaml")
    assert code == 0, output
    recovered = Mapping.load(tmp_path / "recovered.yaml")
    assert equivalent(recovered, Mapping.load(KNOWN / "chinese_clip.yaml"), open_tree(fixture["source"]),
                      build_target("ChineseCLIPModel", fixture["config"]).tree).exact


def test_a_converter_can_be_given_torch_tensors(fixtures, tmp_path):
    script = tmp_path / "torch_convert.py"
    script.write_text(textwrap.dedent("""
        def convert(sd):
            out = {}
            for i in range(2):
                q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)
                out[f"vit.layers.{i}.attention.q_proj.weight"] = q.clone()
                out[f"vit.layers.{i}.attention.k_proj.weight"] = k.T.contiguous()  # a transpose too many
            return out
    """))
    code, output = run_audit(fixtures("vit")["source"], "--converter", f"{script}:convert", "--converter-arrays", "torch", "--json")
    data = json.loads(output)
    assert code == 3  # no --target: no reference, but most sources are never used
    assert by_target(data["traced"])["vit.layers.1.attention.k_proj.weight"]["transform"] == "chunk(axis=0, index=1, parts=3) | transpose([1, 0])"
    assert data["reference"] is None and not data["disagreements"]


@pytest.mark.parametrize("args, message", [
    ([], "give CONVERTED or --converter"),
    (["out_dir"], "needs --target"),
    (["out_dir", "--converter", "x.py:f", "--target", "ViTModel"], "give CONVERTED or --converter"),
])
def test_usage_errors_exit_2(args, message):
    code, output = run_audit("src.pth", *args)
    assert code == 2 and message in output


def test_bad_input_is_one_line_and_exit_1(fixtures, tmp_path):
    source = fixtures("vit")["source"]
    broken = tmp_path / "broken.py"
    broken.write_text("def convert(sd):\n    raise KeyError('blocks.9.attn.qkv.weight')\n\ndef nothing(sd):\n    return 42\n")
    for args, message in [
        ((tmp_path / "missing.pth", tmp_path, "--target", "ViTModel"), "no such file or directory"),
        ((source, "--converter", "no_colon"), "expected path/to/script.py:function"),
        ((source, "--converter", f"{tmp_path / 'nope.py'}:f"), "no such converter script"),
        ((source, "--converter", f"{broken}:absent"), "defines no function 'absent'"),
        ((source, "--converter", f"{broken}:convert"), "the converter convert raised KeyError"),
        ((source, "--converter", f"{broken}:nothing"), "returned a int, not a dict of arrays"),
    ]:
        code, output = run_audit(*args)
        assert code == 1, (args, output)
        assert output.startswith("error: ") and message in output and output.count("\n") == 1, output
