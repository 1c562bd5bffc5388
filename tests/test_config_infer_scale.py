"""Config inference at scale: mixture-of-experts hub layouts, GQA decoders, the time budget.

Shape-only trees (no data) are made from a true config through ``build_target``; the MoE ones
are renamed to the hub layout (one tensor per expert) exactly as ``benchmarks/scale.py``
``build_moe`` does. The CLI runs write the tiny trees as real safetensors files of zeros.
Nothing here is timed: the wall times at 66 layers x 256 experts are in the benchmark report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import matcher
import matcher.config_infer as config_infer
from matcher.cli import main
from matcher.config_infer import DEFAULT, INFERRED, infer_config
from matcher.errors import MatcherError, TargetError
from matcher.targets import build_target, resolve_class
from matcher.tree import ParamTree, TensorSpec

SIZES = ["hidden_size", "intermediate_size", "num_local_experts", "num_hidden_layers", "vocab_size"]


def _tree(shapes: dict) -> ParamTree:
    return ParamTree({k: TensorSpec(k, tuple(s), "float32") for k, s in shapes.items()}, loader=None, origin="<shapes>", format="shapes")


def _mixtral_hub(**kwargs):
    """Mixtral's hub layout: ``block_sparse_moe.experts.{e}.w1/w2/w3`` and ``block_sparse_moe.gate``."""
    from transformers import MixtralConfig

    config = MixtralConfig(**kwargs)
    target = build_target("MixtralForCausalLM", config).tree
    d, f = config.hidden_size, config.intermediate_size
    shapes = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): s.shape for k, s in target.specs.items() if ".mlp.experts." not in k}
    for layer in range(config.num_hidden_layers):
        for expert in range(config.num_local_experts):
            for name, shape in {"w1": (f, d), "w2": (d, f), "w3": (f, d)}.items():
                shapes[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight"] = shape
    return config, shapes


def _qwen3_moe_hub(**kwargs):
    """Qwen3-MoE's hub layout: ``mlp.experts.{e}.gate_proj/up_proj/down_proj``."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**kwargs)
    target = build_target("Qwen3MoeForCausalLM", config).tree
    d, f = config.hidden_size, config.moe_intermediate_size
    shapes = {k: s.shape for k, s in target.specs.items() if ".mlp.experts." not in k}
    for layer in range(config.num_hidden_layers):
        for expert in range(config.num_local_experts):
            for name, shape in {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}.items():
                shapes[f"model.layers.{layer}.mlp.experts.{expert}.{name}.weight"] = shape
    return config, shapes


MIXTRAL = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_local_experts=4, vocab_size=64, tie_word_embeddings=False)
QWEN3_MOE = dict(hidden_size=16, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=64, tie_word_embeddings=False)

CASES = {
    "mixtral": ("MixtralForCausalLM", _mixtral_hub, MIXTRAL, SIZES),
    "qwen3_moe": ("Qwen3MoeForCausalLM", _qwen3_moe_hub, QWEN3_MOE, SIZES + ["moe_intermediate_size", "num_attention_heads", "num_key_value_heads"]),
}


def _shapes(class_name: str, config) -> dict:
    return build_target(class_name, config).tree.shapes()


@pytest.mark.parametrize("name", list(CASES))
def test_moe_hub_layout_sizes_are_inferred(name):
    class_name, make, kwargs, required = CASES[name]
    config, shapes = make(**kwargs)
    result = infer_config(resolve_class(class_name), _tree(shapes))
    for path in required:
        if path == "intermediate_size" and name == "qwen3_moe":
            continue  # no dense MLP in this Qwen3-MoE: the field sizes nothing
        field = result[path]
        assert field.how == INFERRED and field.value == getattr(config, path), (path, field)
    assert "inner instances gathered" in result["num_hidden_layers"].evidence
    assert result.unexplained == []
    assert _shapes(class_name, result.config) == _shapes(class_name, config)


@pytest.mark.parametrize("name", list(CASES))
def test_moe_hub_checkpoint_matches_completely_without_a_config(name, tmp_path):
    class_name, make, kwargs, _ = CASES[name]
    config, shapes = make(**kwargs)
    source = tmp_path / "model.safetensors"
    save_file({k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}, str(source))

    report = matcher.match(source, class_name)
    assert report.complete, (report.unresolved, report.unmatched_targets, report.unused_sources)
    fields = {f.path: f for f in report.config_fields}
    assert fields["num_local_experts"].value == config.num_local_experts

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(source), "--target", class_name, "--save", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    inferred = {f["field"]: f["value"] for f in json.loads(result.stdout)["config"] if f["how"] == "inferred"}
    assert inferred["hidden_size"] == config.hidden_size and inferred["num_local_experts"] == config.num_local_experts
    assert (out / "model.safetensors").exists()


def test_many_experts_are_gathered_before_matching():
    """64 experts make a layer 200 tensors: only the gathered block (one item per expert leaf)
    is comparable with the target's layer of a dozen tensors."""
    config, shapes = _mixtral_hub(**dict(MIXTRAL, num_hidden_layers=3, num_local_experts=64))
    result = infer_config(resolve_class("MixtralForCausalLM"), _tree(shapes))
    for path in SIZES:
        assert result[path].how == INFERRED and result[path].value == getattr(config, path), path
    assert "64 inner instances gathered" in result["num_hidden_layers"].evidence
    assert "experts.{e}" in result["intermediate_size"].evidence


def test_optimizer_moments_of_an_moe_are_shadows():
    config, shapes = _mixtral_hub(**MIXTRAL)
    with_moments = dict(shapes, **{f"opt/{k}/mu": s for k, s in shapes.items()})
    solver = config_infer._Solver(config_infer.probe(resolve_class("MixtralForCausalLM")), _tree(with_moments))
    assert solver.shadows == {k for k in with_moments if k.startswith("opt/")}
    result = infer_config(resolve_class("MixtralForCausalLM"), _tree(with_moments))
    assert all(result[path].value == getattr(config, path) for path in SIZES)


def test_heads_a_gqa_decoder_does_not_fix_are_assumptions():
    """k_proj rows = kv heads x hidden / heads: only the ratio is visible. Both head counts are
    listed as defaults (kept nearest the class defaults), with the alternatives, and the built
    shapes are the true ones."""
    config, shapes = _mixtral_hub(**dict(MIXTRAL, hidden_size=64, num_attention_heads=8, num_key_value_heads=2))
    result = infer_config(resolve_class("MixtralForCausalLM"), _tree(shapes))
    for path in ("num_attention_heads", "num_key_value_heads"):
        field = result[path]
        assert field.how == DEFAULT and field.shape_determining, field
        assert "only together" in field.evidence and "num_attention_heads=8, num_key_value_heads=2" in field.evidence
    assert result["num_attention_heads"].value == 4 * result["num_key_value_heads"].value
    assert _shapes("MixtralForCausalLM", result.config) == _shapes("MixtralForCausalLM", config)


def test_llama_head_dim_heads_and_kv_heads_are_assumptions():
    """Llama's head_dim is derived from the head count unless given: heads x head_dim and
    kv x head_dim are all the shapes show. The head count stays at the class default (32),
    head_dim is what the config derives from it, kv heads follow; the 70B-like truth (16 heads
    of 128 here) is named as an alternative."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=64, tie_word_embeddings=False)
    result = infer_config(resolve_class("LlamaForCausalLM"), _tree(_shapes("LlamaForCausalLM", config)))
    for path in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        assert result[path].how == INFERRED and result[path].value == getattr(config, path), path
    tied = {path: result[path] for path in ("num_attention_heads", "num_key_value_heads", "head_dim")}
    assert all(f.how == DEFAULT and "only together" in f.evidence for f in tied.values()), tied
    assert (tied["num_attention_heads"].value, tied["head_dim"].value, tied["num_key_value_heads"].value) == (32, 64, 4)
    assert "head_dim=128, num_attention_heads=16, num_key_value_heads=2" in tied["head_dim"].evidence
    assert _shapes("LlamaForCausalLM", result.config) == _shapes("LlamaForCausalLM", config)


def test_the_time_budget_gives_up_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(config_infer, "TIME_BUDGET", 0)
    _, shapes = _mixtral_hub(**MIXTRAL)
    message = "cannot infer a config for MixtralForCausalLM from this checkpoint in 0 s; give --config"
    with pytest.raises(TargetError, match=message):
        infer_config(resolve_class("MixtralForCausalLM"), _tree(shapes))
    with pytest.raises(MatcherError, match=message):
        matcher.match(_tree(shapes), "MixtralForCausalLM")

    source = tmp_path / "model.safetensors"
    save_file({k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}, str(source))
    result = CliRunner().invoke(main, [str(source), "--target", "MixtralForCausalLM"])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    monkeypatch.undo()
    assert infer_config(resolve_class("MixtralForCausalLM"), _tree(shapes)).complete is False  # heads: assumptions


def test_a_config_class_refusing_the_inferred_values_is_one_line_not_a_traceback(monkeypatch, tmp_path):
    """Config classes validate their fields (DeepSeek-V3's refuses some head sizes): whatever they
    raise, inference gives up with one line asking for --config."""

    def refuse(probe, source):
        raise ValueError("head_dim 465 is not allowed\nmore detail")

    monkeypatch.setattr(config_infer, "_infer", refuse)
    _, shapes = _mixtral_hub(**MIXTRAL)
    with pytest.raises(TargetError, match=r"cannot infer a config for MixtralForCausalLM from this checkpoint \(ValueError: head_dim 465 is not allowed\); give --config"):
        infer_config(resolve_class("MixtralForCausalLM"), _tree(shapes))
    source = tmp_path / "model.safetensors"
    save_file({k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}, str(source))
    result = CliRunner().invoke(main, [str(source), "--target", "MixtralForCausalLM"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "give --config" in result.output


def test_leftovers_the_user_allowed_do_not_send_a_given_config_to_the_contradiction_check(monkeypatch, tmp_path):
    """A hub checkpoint with an extra layer the model does not have, converted with --config and
    --allow-drop for that layer: complete, and the given config is not second-guessed."""
    from transformers import MixtralConfig

    config, shapes = _mixtral_hub(**MIXTRAL)
    extra = {k.replace("model.layers.0.", f"model.layers.{config.num_hidden_layers}.", 1): s for k, s in shapes.items() if k.startswith("model.layers.0.")}
    extra[f"model.layers.{config.num_hidden_layers}.eh_proj.weight"] = (config.hidden_size, 2 * config.hidden_size)  # like DeepSeek's prediction layer
    tree = _tree({**shapes, **extra})
    monkeypatch.setattr(config_infer, "infer_config", lambda *a, **k: pytest.fail("the config check ran"))
    report = matcher.match(tree, "MixtralForCausalLM", config=config, allow_drop=[f"model.layers.{config.num_hidden_layers}.*"])
    assert report.complete and len(report.dropped) == len(extra)
    assert isinstance(config, MixtralConfig)
