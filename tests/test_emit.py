"""Starter files emitted from a mapping (`match --emit yaml|python|transformers`).

The python converter is run, on every family's fixture, in a separate interpreter that cannot
import matcher, and must write the tensors `matcher.convert` writes, bit for bit. The transformers
snippet is registered with transformers and must make `from_pretrained` load the original tensors
into the model `match --save` produces. The yaml file must load back as the same mapping.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import matcher
from matcher.cli import main
from matcher.convert import convert
from matcher.emit import emit
from matcher.emit.numpy_ops import COMBINE, RENDER
from matcher.emit.templating import templated
from matcher.mapping import Mapping, Rule
from matcher.ops import OPS, apply_chain
from matcher.solve import MatchReport
from matcher.sources import open_tree
from matcher.tree import ParamTree
from tests.fixtures import make_chinese_clip, make_clip, make_clipseg, make_owlvit, make_siglip, make_vit

KNOWN = Path(__file__).resolve().parents[1] / "known_mappings"
FAMILIES = {
    "siglip": (make_siglip, "SiglipModel"),
    "chinese_clip": (make_chinese_clip, "ChineseCLIPModel"),
    "clip": (make_clip, "CLIPModel"),
    "clipseg": (make_clipseg, "CLIPSegForImageSegmentation"),
    "owlvit": (make_owlvit, "OwlViTForObjectDetection"),
    "vit": (make_vit, "ViTForImageClassification"),
}

# Runs a script with every import of matcher refused (matcher is installed in the venv, so a
# clean PYTHONPATH alone would not keep it out).
NO_MATCHER = """
import runpy, sys
class RefuseMatcher:
    def find_spec(self, name, path=None, target=None):
        if name == "matcher" or name.startswith("matcher."):
            raise ImportError("an emitted converter must not import matcher")
sys.meta_path.insert(0, RefuseMatcher())
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def start_script(script: Path, *args) -> subprocess.Popen:
    """The script running in the venv's python, away from the repository, unable to import matcher."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(script.parent), "PYTHONPATH": ""}
    return subprocess.Popen(
        [sys.executable, "-c", NO_MATCHER, str(script), *map(str, args)],
        cwd=script.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out + err


def assert_same_file_tensors(got: Path, want: Path) -> None:
    """The same tensor names, and under each the same dtype, shape and bytes (header order aside)."""
    got_arrays, want_arrays = load_file(str(got)), load_file(str(want))
    assert sorted(got_arrays) == sorted(want_arrays)
    differ = [
        key for key, array in want_arrays.items()
        if (got_arrays[key].dtype, got_arrays[key].shape, got_arrays[key].tobytes()) != (array.dtype, array.shape, array.tobytes())
    ]
    assert differ == []


def declarations(family: str) -> dict:
    known = Mapping.load(KNOWN / f"{family}.yaml")
    return {"allow_drop": [d.pattern for d in known.dropped], "allow_init": [d.pattern for d in known.initialised]}


# ---------------------------------------------------------------------------- every family


@dataclass
class Family:
    name: str
    target_class: str
    source: Path
    config: Path
    report: MatchReport  # the mapping inferred by matcher, with the known mapping's drops and inits allowed
    converted: Path  # matcher.convert's output directory


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    found = {}
    for name, (module, target_class) in FAMILIES.items():
        made = module.make(root / name)
        report = matcher.match(made["source"], target_class, made["config"], **declarations(name))
        assert report.complete, name
        converted = convert(made["source"], target_class, made["config"], report.mapping, root / f"{name}_converted")
        found[name] = Family(name, target_class, Path(made["source"]), Path(made["config"]), report, converted)
    return found


@pytest.fixture(scope="module")
def scripts_run(families, tmp_path_factory) -> dict[str, tuple[str, int, str, Path]]:
    """Each family's emitted python converter run on its fixture (all at once: most start torch)."""
    root = tmp_path_factory.mktemp("scripts")
    started = {}
    for name, family in families.items():
        script = root / f"convert_{name}.py"
        script.write_text(emit(family.report, "python"))
        started[name] = (script, start_script(script, family.source, root / f"{name}_out"))
    return {name: (script.read_text(), *finished(process), root / f"{name}_out") for name, (script, process) in started.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_emitted_python_converter_writes_what_matcher_writes_bit_for_bit(family, families, scripts_run):
    text, returncode, output, out = scripts_run[family]
    assert returncode == 0, output
    assert_same_file_tensors(out / "model.safetensors", families[family].converted / "model.safetensors")
    assert (out / "config.json").read_bytes() == (families[family].converted / "config.json").read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_emitted_python_converter_does_not_import_matcher(family, scripts_run):
    text, returncode, output, _ = scripts_run[family]
    assert "import matcher" not in text and "from matcher" not in text
    assert returncode == 0 and "must not import matcher" not in output  # it ran with matcher refused


def test_emitted_python_converter_loops_over_layers_and_splits_fused_tensors_once(scripts_run):
    clip = scripts_run["clip"][0]
    assert "for i in range(num_layers):" in clip
    assert "resblocks.0" not in clip and "layers.0" not in clip  # no layer is spelled out
    assert clip.count('parts = np.split(weights[src + "attn.in_proj_weight"], 3)') == 2  # one per tower
    siglip = scripts_run["siglip"][0]
    assert 'out[dst + "self_attn.q_proj.weight"] = x.reshape(x.shape[0], -1).T' in siglip


def test_the_layer_count_is_read_from_the_checkpoint_when_the_script_runs(families, tmp_path):
    """A script emitted from the 2-layer fixture converts a wider checkpoint with 3 and 4 layers."""
    config = make_siglip.siglip_config("demo")
    config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers = 3, 4
    arrays = make_siglip.reference_arrays(config, seed=7)
    source = make_siglip.write_npz(tmp_path / "deeper.npz", make_siglip.to_big_vision(arrays, config))
    config.save_pretrained(tmp_path / "config")
    script = tmp_path / "convert.py"
    script.write_text(emit(families["siglip"].report, "python"))
    returncode, output = finished(start_script(script, source, tmp_path / "out"))
    assert returncode == 0, output
    want = convert(source, "SiglipModel", tmp_path / "config", families["siglip"].report.mapping, tmp_path / "matcher")
    assert_same_file_tensors(tmp_path / "out" / "model.safetensors", want / "model.safetensors")


def test_the_script_writes_nothing_when_a_tensor_of_the_checkpoint_has_no_target(families, tmp_path):
    source = families["siglip"].source
    arrays = {key: value for key, value in np.load(source).items()}
    arrays["params/img/extra/kernel"] = np.zeros((2, 2), np.float32)
    np.savez(tmp_path / "extra.npz", **arrays)
    script = tmp_path / "convert.py"
    script.write_text(emit(families["siglip"].report, "python"))
    returncode, output = finished(start_script(script, tmp_path / "extra.npz", tmp_path / "out"))
    assert returncode == 1
    assert "1 tensor(s) of the checkpoint have no target, nothing written: params/img/extra/kernel" in output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- every op, from a plain mapping

EVERY_OP = """
rules:
- {target: t_transpose, source: a, ops: [{transpose: [2, 0, 1]}]}
- {target: t_squeeze, source: b, ops: [{squeeze: 0}]}
- {target: t_unsqueeze, source: c, ops: [{unsqueeze: -1}]}
- {target: t_merge, source: d, ops: [{merge_axes: {start: -2, end: -1}}]}
- {target: t_split, source: e, ops: [{split_axis: {axis: 0, sizes: [3, -1]}}]}
- {target: t_c0, source: f, ops: [{chunk: {axis: 0, index: 0, sizes: [2, 3, 4]}}]}
- {target: t_c1, source: f, ops: [{chunk: {axis: 0, index: 1, sizes: [2, 3, 4]}}]}
- {target: t_c2, source: f, ops: [{chunk: {axis: 0, index: 2, sizes: [2, 3, 4]}}]}
- {target: t_g0, source: g, ops: [{chunk: {axis: -1, index: 0, parts: 3}}]}
- {target: t_g1, source: g, ops: [{chunk: {axis: -1, index: 1, parts: 3}}, {transpose: [1, 0]}]}
- {target: t_g2, source: g, ops: [{chunk: {axis: -1, index: 2, parts: 3}}, {merge_axes: {start: 0, end: 1}}]}
- {target: "scanned.{i}.w", source: stack/w, ops: [{transpose: [0, 2, 1]}, {select: {axis: 0, index: "{i}"}}]}
- {target: moe.w, source: "experts.{j}.w", ops: [{stack: 0}]}
- {target: qk, sources: [q, k], ops: [{transpose: [1, 0]}, {concat: 0}]}
- {target: qk3, sources: [q3, k3], ops: [{transpose: [1, 0, 2]}, {merge_axes: {start: 1, end: 2}}, {concat: 0}, {unsqueeze: 0}]}
- {target: "layers.{i}.x", source: "blocks.{i}.x", ops: [{transpose: [1, 0]}]}
- {target: "layers.{i}.x_bias", source: "blocks.{i}.xb"}
- {target: "stages.{i}.blocks.{j}.y", source: "st/{i}/bl/{j}/y", ops: [{split_axis: {axis: -1, sizes: [2, 2]}}]}
- {target: "named.{x}.z", source: "blocks_{x}/z"}
- {target: t_bfloat16, source: h}
- {target: t_int, source: n}
dropped:
- {pattern: "opt/*", why: optimizer state}
"""


def every_op_checkpoint(path: Path) -> tuple[Path, list[str]]:
    """A checkpoint for EVERY_OP (stages of 2 and 3 blocks, a bfloat16 and an int array) and the target keys."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    arrays = {"a": f(2, 3, 4), "b": f(1, 5, 6), "c": f(5, 6), "d": f(4, 3, 2), "e": f(12), "f": f(9, 2), "g": f(2, 6),
              "stack/w": f(3, 4, 5), "q": f(2, 4), "k": f(2, 4), "q3": f(2, 3, 4), "k3": f(2, 3, 4),
              "h": f(3).astype(ml_dtypes.bfloat16), "n": np.arange(4, dtype=np.int32), "opt/m": f(2)}
    arrays |= {f"experts.{j}.w": f(2, 2) for j in range(4)}
    arrays |= {f"blocks.{i}.{leaf}": f(3, 4) if leaf == "x" else f(3) for i in range(3) for leaf in ("x", "xb")}
    arrays |= {f"st/{i}/bl/{j}/y": f(2, 4) for i, blocks in enumerate((2, 3)) for j in range(blocks)}
    arrays |= {f"blocks_{x}/z": f(1) for x in range(2)}
    np.savez(path, **arrays)
    targets = ["t_transpose", "t_squeeze", "t_unsqueeze", "t_merge", "t_split", "t_c0", "t_c1", "t_c2", "t_g0", "t_g1",
               "t_g2", "moe.w", "qk", "qk3", "t_bfloat16", "t_int"]
    targets += [f"{block}.{i}.{leaf}" for i in range(3) for block, leaf in (("scanned", "w"), ("layers", "x"), ("layers", "x_bias"))]
    targets += [f"stages.{i}.blocks.{j}.y" for i, blocks in enumerate((2, 3)) for j in range(blocks)]
    return path, targets + [f"named.{x}.z" for x in range(2)]


def test_every_op_has_a_numpy_rendering():
    assert set(OPS) == set(RENDER) | set(COMBINE)


@pytest.mark.parametrize("given", ["plain mapping", "report with the checkpoint's shapes"])
def test_every_op_of_a_plain_mapping_is_emitted_as_numpy_that_computes_what_matcher_computes(given, tmp_path):
    source, targets = every_op_checkpoint(tmp_path / "every_op.npz")
    tree = open_tree(source)
    mapping = Mapping.from_dict(yaml.safe_load(EVERY_OP))
    expansion = mapping.expand(tree.keys(), targets)
    assert expansion.complete, expansion.summary()
    want = {rule.target: np.asarray(apply_chain(rule.ops, [tree.read(s) for s in rule.sources])) for rule in expansion.rules}
    if given == "plain mapping":
        text = emit(mapping, "python", source_format="npz")
    else:
        text = emit(MatchReport(mapping, [], [], [], [], {}, source=tree), "python")
    script = tmp_path / "convert.py"
    script.write_text(text)
    returncode, output = finished(start_script(script, source, tmp_path / "out"))
    assert returncode == 0, output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert [k for k in want if (got[k].dtype, got[k].shape, got[k].tobytes()) != (want[k].dtype, want[k].shape, np.ascontiguousarray(want[k]).tobytes())] == []


def test_a_plain_mapping_without_a_known_format_gets_a_loader_that_tells_formats_apart(families, tmp_path):
    mapping = Mapping.load(KNOWN / "siglip.yaml")
    script = tmp_path / "convert.py"
    script.write_text(emit(Mapping(mapping.rules), "python"))  # no metadata: no source_format
    assert "def load_torch(" in script.read_text() and "def load_npz(" in script.read_text()
    returncode, output = finished(start_script(script, families["siglip"].source, tmp_path / "out"))
    assert returncode == 0, output
    assert_same_file_tensors(tmp_path / "out" / "model.safetensors", families["siglip"].converted / "model.safetensors")


# ---------------------------------------------------------------------------- yaml, templated per layer


def concrete(mapping: Mapping, report: MatchReport) -> Mapping:
    """``mapping`` spelled out layer by layer, as an audit of a converter finds it."""
    expansion = mapping.expand(report.source.keys(), report.target.tree.keys())
    rules = tuple(Rule(r.target, r.sources, r.ops) for r in expansion.rules)
    return Mapping(rules, mapping.dropped, mapping.initialised, mapping.meta)


def rule_set(mapping: Mapping) -> set[str]:
    return {json.dumps({k: v for k, v in rule.to_dict().items() if k != "note"}, sort_keys=True) for rule in mapping.rules}


@pytest.mark.parametrize("family", ["siglip", "clip", "owlvit"])
def test_a_mapping_spelled_out_per_layer_is_templated_back_to_one_rule_per_block_member(family, families):
    report = families[family].report
    spelled_out = concrete(report.mapping, report)
    assert len(spelled_out.rules) > len(report.mapping.rules)
    assert rule_set(templated(spelled_out, report.source.keys())) == rule_set(report.mapping)


def test_numbers_that_are_not_layer_indices_stay_as_they_are():
    mapping = Mapping((
        Rule("head.dense0.weight", ("obj_box_head/Dense_0/kernel",)),
        Rule("head.dense1.weight", ("obj_box_head/Dense_1/kernel",)),
        Rule("layers.0.norm1.weight", ("blocks.0.ln_1.weight",)),
        Rule("layers.1.norm1.weight", ("blocks.1.ln_1.weight",)),
        Rule("layers.0.norm2.weight", ("blocks.0.ln_2.weight",)),
        Rule("layers.1.norm2.weight", ("blocks.1.ln_2.weight",)),
    ))
    assert [rule.target for rule in templated(mapping).rules] == [
        "head.dense0.weight", "head.dense1.weight", "layers.{i}.norm1.weight", "layers.{i}.norm2.weight",
    ]


def test_emitted_yaml_loads_back_as_the_mapping_and_says_what_it_was_made_from(families, tmp_path):
    report = families["owlvit"].report
    text = emit(concrete(report.mapping, report), "yaml")
    assert text.startswith("# matcher mapping for the target") and "{i}" in text and "resblocks.0" not in text
    text = emit(report, "yaml")
    assert text.splitlines()[0].startswith(f"# matcher mapping for OwlViTForObjectDetection, made by `match --emit yaml` from {report.source.origin}")
    (tmp_path / "mapping.yaml").write_text(text)
    loaded = Mapping.load(tmp_path / "mapping.yaml")
    assert rule_set(loaded) == rule_set(report.mapping)
    assert loaded.dropped == report.mapping.dropped and loaded.initialised == report.mapping.initialised


def test_what_an_incomplete_report_leaves_open_is_listed_in_every_format(families):
    report = matcher.match(families["owlvit"].source, "OwlViTForObjectDetection", families["owlvit"].config)
    assert not report.complete
    first_unused = report.unused_sources[0]
    assert f"#   no target for source {first_unused}" in emit(report, "yaml")
    assert "more with no target for source (match --json lists them all)" in emit(report, "yaml")  # optimizer state, not all shown
    assert f"    no target for source {first_unused}" in emit(report, "python")
    assert f"# MISSING: no target for source {first_unused}" in emit(report, "transformers")


# ---------------------------------------------------------------------------- transformers


@contextlib.contextmanager
def registered(snippet: str, class_name: str):
    """The snippet's conversions registered for ``class_name`` while the block runs."""
    from transformers import conversion_mapping

    namespace: dict = {}
    exec(compile(snippet, f"<{class_name} conversions>", "exec"), namespace)
    namespace["register"]()
    try:
        yield namespace
    finally:  # transformers has no unregister: drop the entries from its registry
        for name in [class_name, *namespace.get("INNER_MODELS", ())]:
            conversion_mapping._checkpoint_conversion_mapping_cache.pop(name, None)
            conversion_mapping.USER_REGISTERED_MAPPINGS.discard(name)


def original_tensors_directory(family: Family, directory: Path) -> Path:
    """The checkpoint's tensors under matcher's names as model.safetensors, beside the target's config.json."""
    directory.mkdir()
    tree = family.report.source
    save_file({key: np.require(tree.read(key), requirements="C") for key in tree.keys()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    family.report.target.config.to_json_file(str(directory / "config.json"))
    return directory


@pytest.mark.parametrize("family", FAMILIES)
def test_the_transformers_snippet_makes_from_pretrained_load_the_original_tensors_as_match_save_does(family, families, tmp_path):
    """Every rule is carried out: each parameter equals the one loaded from `match --save`'s output,
    and the only keys transformers misses or leaves over are the declared initialised and dropped ones."""
    import torch
    import transformers
    from transformers.core_model_loading import WeightTransform

    family = families[family]
    snippet = emit(family.report, "transformers")
    assert "# NOT EXPRESSED" not in snippet and "# CHECK" not in snippet
    model_class = getattr(transformers, family.target_class)
    transformers.logging.set_verbosity_error()
    with registered(snippet, family.target_class) as namespace:
        assert all(isinstance(t, WeightTransform) for t in namespace["CONVERSIONS"])
        loaded, info = model_class.from_pretrained(original_tensors_directory(family, tmp_path / "original"), output_loading_info=True)
    saved = model_class.from_pretrained(family.converted).state_dict()
    state = loaded.state_dict()
    compared = [key for key in saved if key not in family.report.initialised]  # those keep their random init
    assert [key for key in compared if state[key].dtype != saved[key].dtype or not torch.equal(state[key], saved[key])] == []
    assert set(info["missing_keys"]) == set(family.report.initialised)
    assert set(info["unexpected_keys"]) == set(family.report.dropped)
    assert not info["mismatched_keys"]


def test_the_transformers_snippet_imports_real_transformers_classes(families):
    import transformers.core_model_loading as loading

    snippet = emit(families["siglip"].report, "transformers")
    imported = snippet.split("from transformers.core_model_loading import ")[1].splitlines()[0].split(", ")
    assert {"ConversionOps", "Concatenate", "Transpose", "WeightConverter", "WeightRenaming"} <= set(imported)
    assert all(isinstance(getattr(loading, name), type) for name in imported)
    assert "class MergeAxes(PerTensor):" in snippet  # what transformers has no op for is defined in the snippet


def test_what_transformers_cannot_express_is_named_in_the_snippet():
    mapping = Mapping.from_dict(yaml.safe_load(EVERY_OP))
    notes = [line for line in emit(mapping, "transformers").splitlines() if line.startswith("# NOT EXPRESSED")]
    assert notes == [
        "# NOT EXPRESSED: the parts of g are treated differently after the cut (a converter applies the same ops to all)",
        "# NOT EXPRESSED: transformers has no loading op for select(axis=0, index={i}) (scanned.{i}.w)",
        "# NOT EXPRESSED: stages.{i}.blocks.{j}.y: a templated converter needs a block its index sits in",
    ]


# ---------------------------------------------------------------------------- transformers: mixture of experts

MOE_CASES = {  # target class, hub spelling of the expert matrices, linear matrices stored (in, out) as `kernel`
    "mixtral": ("MixtralForCausalLM", "mixtral", False),
    "mixtral-kernels": ("MixtralForCausalLM", "mixtral", True),  # each expert transposed before the stacks
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen", False),
}


@dataclass
class MoeCase:
    target_class: str
    hub: Path  # the per-expert checkpoint, as the hub stores it
    original: Path  # its tensors as model.safetensors beside the target's config.json
    saved: Path  # `match --save`
    snippet: str  # `match --emit transformers`


@pytest.fixture(scope="module")
def moe_cases(tmp_path_factory) -> dict[str, MoeCase]:
    """For each case a tiny per-expert checkpoint of random values (2 layers x 4 experts), converted
    by the CLI with --save and --emit transformers in one run."""
    from tests.test_moe import _as_kernels, _hub_layout, _mixtral_config, _qwen3_config

    from matcher.targets import build_target

    configs = {"MixtralForCausalLM": _mixtral_config, "Qwen3MoeForCausalLM": _qwen3_config}
    found = {}
    for seed, (name, (target_class, style, kernels)) in enumerate(MOE_CASES.items()):
        root = tmp_path_factory.mktemp(name)
        config = configs[target_class]()
        shapes = _hub_layout(build_target(target_class, config).tree, style)
        if kernels:
            shapes = _as_kernels(shapes)
        rng = np.random.default_rng(seed)
        arrays = {key: (0.3 * rng.standard_normal(spec.shape)).astype(np.float32) for key, spec in shapes.specs.items()}
        (root / "original").mkdir()
        save_file(arrays, str(root / "original" / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(root / "original")
        emitted = root / "conversions.py"
        result = invoke(root / "original" / "model.safetensors", "--target", target_class, "--config", root / "original" / "config.json",
                        "--save", root / "saved", "--emit", "transformers", "--emit-out", emitted, "--yes")
        assert result.exit_code == 0, result.output
        found[name] = MoeCase(target_class, root / "original" / "model.safetensors", root / "original", root / "saved", emitted.read_text())
    return found


@pytest.mark.parametrize("case", MOE_CASES)
def test_the_transformers_snippet_stacks_per_expert_tensors_as_match_save_does(case, moe_cases):
    """gate and up of every expert become MergeModulelist(dim=0), Concatenate(dim=1), as in
    transformers' own conversion_mapping.py, down MergeModulelist(dim=0); loaded through
    from_pretrained, every parameter equals the one `match --save` wrote, bit for bit, and every
    converted key was taken by one of the snippet's own converters (not by transformers' built-in
    mixtral/qwen2_moe conversions, which would otherwise load the plain hub layout by themselves)."""
    import torch
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    case = moe_cases[case]
    snippet = case.snippet
    assert "# NOT EXPRESSED" not in snippet and "# CHECK" not in snippet and "# MISSING" not in snippet
    assert re.search(r'"mlp\.experts\.gate_up_proj",\n +operations=\[(Permute\(1, 0\), )?MergeModulelist\(dim=0\), Concatenate\(dim=1\)\]', snippet)
    assert snippet.count("MergeModulelist(dim=0)],") == 1  # down_proj
    model_class = getattr(transformers, case.target_class)
    transformers.logging.set_verbosity_error()
    with registered(snippet, case.target_class) as namespace:
        loaded, info = model_class.from_pretrained(case.original, output_loading_info=True)
        ours = {id(t): t for t in namespace["CONVERSIONS"] if isinstance(t, WeightConverter)}
        used = get_model_conversion_mapping(loaded)
        renamings = [t for t in used if not isinstance(t, WeightConverter)]
        converters = [t for t in used if isinstance(t, WeightConverter)]
        patterns = {p for t in ours.values() for p in t.source_patterns}
        taken = {key: rename_source_key(key, renamings, converters)[1] for key in load_file(str(case.hub))}
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    experts = [key for key in taken if ".experts." in key]
    assert experts and all(taken[key] in patterns for key in experts), [(k, taken[k]) for k in experts if taken[k] not in patterns][:3]
    saved = model_class.from_pretrained(case.saved).state_dict()
    state = loaded.state_dict()
    assert sorted(state) == sorted(saved)
    assert [key for key in saved if state[key].dtype != saved[key].dtype or not torch.equal(state[key], saved[key])] == []
    assert any(key.endswith("experts.gate_up_proj") for key in saved)


def test_the_mixtral_snippet_turns_off_the_builtin_conversions_that_would_take_its_keys(moe_cases):
    """transformers applies MixtralModel's own conversions (model type mixtral) inside
    MixtralForCausalLM after the registered ones; its `.block_sparse_moe. -> .mlp.` renaming runs
    before any converter, so the snippet's expert converters would never see their keys. Qwen3Moe's
    own converters come after the snippet's and never get a key: nothing is turned off there."""
    assert 'INNER_MODELS = ["MixtralModel"]' in moe_cases["mixtral"].snippet
    assert "INNER_MODELS" not in moe_cases["qwen3_moe"].snippet
    kernels = moe_cases["mixtral-kernels"].snippet
    assert 'INNER_MODELS = ["MixtralModel"]' in kernels and "operations=[Permute(1, 0), MergeModulelist(dim=0), Concatenate(dim=1)]" in kernels


SPELLINGS = {  # a stack over the instances of gate and up, [gate_0..gate_E-1, up_0..up_E-1], (I, D) each
    # (2E, I, D) -> (2, E, I, D) -> (E, 2, I, D) -> (E, 2I, D): what the matcher infers
    "matcher's": ("[Stack(0), SplitAxis(0, (2, -1)), Transpose((1, 0, 2, 3)), MergeAxes(1, 2)]", "MergeModulelist(dim=0), Concatenate(dim=1)"),
    # (I, 2E, D) -> (I, 2, E, D) -> (E, 2, I, D) -> (E, 2I, D): the same function
    "stack on axis 1": ("[Stack(1), SplitAxis(1, (2, -1)), Transpose((2, 1, 0, 3)), MergeAxes(1, 2)]", "MergeModulelist(dim=0), Concatenate(dim=1)"),
    # (D, I, 2E) -> (2E, I, D) -> ...: the instances transposed one by one first, as kernels (in, out) are
    "kernels": ("[Transpose((1, 0)), Stack(0), SplitAxis(0, (2, -1)), Transpose((1, 0, 2, 3)), MergeAxes(1, 2)]",
                "Permute(1, 0), MergeModulelist(dim=0), Concatenate(dim=1)"),
    # (E, 2, I, D) -> (E, 2I, D) -> (2I, E, D): an expert axis that is not first still concatenates
    "experts second": ("[Stack(0), SplitAxis(0, (2, -1)), Transpose((1, 0, 2, 3)), MergeAxes(1, 2), Transpose((1, 0, 2))]",
                       "MergeModulelist(dim=1), Concatenate(dim=0)"),
    # (2E, I, D) -> (2, E, I, D) -> (E, I, 2, D) -> (E, 2I, D): rows of gate and up alternate in each expert;
    # no stack-then-join is that, but the stack of both lists is the join of their stacks on the same axis
    "interleaved": ("[Stack(0), SplitAxis(0, (2, -1)), Transpose((1, 2, 0, 3)), MergeAxes(1, 2)]",
                    "MergeModulelist(dim=0), Concatenate(dim=0), SplitAxis(0, [2, -1]), Permute(1, 2, 0, 3), MergeAxes(1, 2)"),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("shapes", ["probes", "the checkpoint's"])
def test_a_stack_of_several_gathered_sources_is_judged_by_what_it_computes(spelling, shapes):
    """The converter's ops are chosen by what the rule computes, not by how it is spelled; run by
    transformers' own WeightConverter on torch tensors, they give what matcher's ops give, for the
    checkpoint's 5 experts (a report) and for the probes' counts (a plain mapping, no shapes)."""
    import torch
    from transformers.core_model_loading import WeightConverter

    from matcher.ops import MergeAxes, SplitAxis, Stack, Transpose  # noqa: F401 (the spellings name them)

    written, expected = SPELLINGS[spelling]
    sources = ("layers.{i}.experts.{e}.w1", "layers.{i}.experts.{e}.w3")
    mapping = Mapping((Rule("layers.{i}.experts.gate_up_proj", sources, tuple(eval(written))),))
    kernels = spelling == "kernels"
    rng = np.random.default_rng(0)
    arrays = {f"layers.{i}.experts.{e}.{w}": rng.standard_normal((4, 3) if kernels else (3, 4)).astype(np.float32)
              for i in range(2) for e in range(5) for w in ("w1", "w3")}
    if shapes == "probes":
        text = emit(mapping, "transformers")
    else:
        text = emit(MatchReport(mapping, [], [], [], [], {}, source=ParamTree.from_arrays(arrays)), "transformers")
    assert "# NOT EXPRESSED" not in text and "# CHECK" not in text
    assert f"operations=[{expected}]" in text
    namespace: dict = {}
    exec(compile(text, "<snippet>", "exec"), namespace)
    (converter,) = [t for t in namespace["CONVERSIONS"] if isinstance(t, WeightConverter)]
    collected = {pattern: [torch.from_numpy(arrays[f"layers.0.experts.{e}.{w}"]) for e in range(5)]
                 for pattern, w in zip(converter.source_patterns, ("w1", "w3"))}
    for op in converter.operations:
        collected = op.convert(collected, source_patterns=converter.source_patterns, target_patterns=converter.target_patterns)
    (got,) = collected.values()
    want = apply_chain(mapping.rules[0].ops, [arrays[f"layers.0.experts.{e}.{w}"] for w in ("w1", "w3") for e in range(5)])
    assert got.shape == want.shape and np.array_equal(got.numpy(), want)


# ---------------------------------------------------------------------------- the CLI


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("fmt", ["yaml", "python", "transformers"])
def test_match_emit_writes_the_starter_file(fmt, families, tmp_path):
    siglip = families["siglip"]
    emitted = tmp_path / f"starter.{'yaml' if fmt == 'yaml' else 'py'}"
    result = invoke(siglip.source, "--target", "SiglipModel", "--config", siglip.config, "--save", tmp_path / "out",
                    "--mapping-out", tmp_path / "used.yaml", "--emit", fmt, "--emit-out", emitted)
    assert result.exit_code == 0, result.output
    text = emitted.read_text()
    if fmt == "yaml":
        assert rule_set(Mapping.load(emitted)) == rule_set(Mapping.load(tmp_path / "used.yaml"))
    elif fmt == "python":  # the acceptance: its output equals --save's
        returncode, output = finished(start_script(emitted, siglip.source, tmp_path / "script_out"))
        assert returncode == 0, output
        assert_same_file_tensors(tmp_path / "script_out" / "model.safetensors", tmp_path / "out" / "model.safetensors")
    else:
        compile(text, str(emitted), "exec")
        assert 'register_checkpoint_conversion_mapping("SiglipModel", CONVERSIONS' in text


def test_emit_needs_emit_out(families):
    result = CliRunner().invoke(main, [str(families["siglip"].source), "--target", "SiglipModel", "--emit", "python"])
    assert result.exit_code == 2 and "--emit and --emit-out go together" in result.output
