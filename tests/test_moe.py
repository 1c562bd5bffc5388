"""Mixture-of-experts: per-expert hub tensors (``experts.{e}.w1/w2/w3``) are found to stack into
transformers' fused expert tensors (``experts.gate_up_proj`` (E, 2I, D), ``experts.down_proj``).

The expected mappings here are written by hand, independently of the matcher (and with other
spellings of the same ops, so that agreement is judged on what the ops compute); the end-to-end
test checks each converted MoE block against a per-expert forward written from the routing rules
of ``modeling_mixtral`` (softmax, top-k, renormalised weights), never against the converter itself.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from matcher.cli import main
from matcher.convert import convert_arrays
from matcher.mapping import Mapping, Rule
from matcher.ops import MergeAxes, SplitAxis, Stack, Transpose
from matcher.solve import match_trees
from matcher.solve.assign import Item
from matcher.solve.groups import gather_groups, inner_groups
from matcher.targets import build_target
from matcher.tree import ParamTree, TensorSpec
from tests.matching.harness import equivalent

ROLES = {  # hub spellings of the three expert matrices
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
    "qwen": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def specs(shapes: dict) -> ParamTree:
    return ParamTree({k: TensorSpec(k, tuple(v), "float32") for k, v in shapes.items()})


# ---------------------------------------------------------------------- the format


def test_the_format_stacks_experts_and_concatenates_gate_and_up_per_expert():
    """A placeholder only in the sources gathers: ``stack`` over 11 experts (10 after 9), and
    gate|up of each expert concatenated on the axis after the expert axis; reverse gives the
    per-expert tensors back bit for bit, and reversing twice converts as the original."""
    rng = np.random.default_rng(0)
    layers, experts, d, inner = 2, 11, 3, 5
    arrays = {}
    for i in range(layers):
        for e in range(experts):
            arrays[f"layers.{i}.experts.{e}.w1"] = rng.normal(size=(inner, d)).astype(np.float32)
            arrays[f"layers.{i}.experts.{e}.w3"] = rng.normal(size=(inner, d)).astype(np.float32)
            arrays[f"layers.{i}.experts.{e}.w2"] = rng.normal(size=(d, inner)).astype(np.float32)
    target = specs({k: s for i in range(layers) for k, s in {
        f"layers.{i}.experts.gate_up_proj": (experts, 2 * inner, d), f"layers.{i}.experts.down_proj": (experts, d, inner)}.items()})
    mapping = Mapping((
        Rule("layers.{i}.experts.gate_up_proj", ("layers.{i}.experts.{e}.w1", "layers.{i}.experts.{e}.w3"),
             (Stack(0), SplitAxis(0, (2, -1)), Transpose((1, 0, 2, 3)), MergeAxes(1, 2))),
        Rule("layers.{i}.experts.down_proj", ("layers.{i}.experts.{e}.w2",), (Stack(0),)),
    ))
    source = ParamTree.from_arrays(arrays)
    out = convert_arrays(source, target, mapping)
    for i in range(layers):
        want_gate_up = np.stack([np.concatenate([arrays[f"layers.{i}.experts.{e}.w1"], arrays[f"layers.{i}.experts.{e}.w3"]]) for e in range(experts)])
        np.testing.assert_array_equal(out[f"layers.{i}.experts.gate_up_proj"], want_gate_up)
        np.testing.assert_array_equal(out[f"layers.{i}.experts.down_proj"], np.stack([arrays[f"layers.{i}.experts.{e}.w2"] for e in range(experts)]))

    backward = mapping.reverse(source.shapes())
    back = convert_arrays(ParamTree.from_arrays(out), specs(source.shapes()), backward)
    assert set(back) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    again = convert_arrays(source, target, backward.reverse(target.shapes()))
    for key, value in out.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_one_rule_may_select_an_instance_and_a_part_but_nothing_else_new():
    """Reversing a stack of several gathered sources selects expert {e} and part j: the format
    allows exactly that pair of selects; select + chunk (a fused tensor in a scanned stack) stays out."""
    from matcher.errors import MappingError
    from matcher.ops import Chunk, Select

    Rule("experts.{e}.w1", ("gate_up",), (SplitAxis(1, (2, -1)), Select(0, "{e}"), Select(0, 0)))
    for ops in ((Select(0, "{e}"), Select(0, "{e}")), (Select(0, "{i}"), Chunk(0, 0, parts=2)), (Select(0, 0), Select(0, 1))):
        with pytest.raises(MappingError, match="at most one chunk/select"):
            Rule("layers.{i}.experts.{e}.w1", ("gate_up",), ops)


# ---------------------------------------------------------------------- shape-only inference


def _mixtral_config(intermediate=24, layers=2, experts=4):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=4, num_local_experts=experts, num_experts_per_tok=2, tie_word_embeddings=False)


def _qwen3_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=4, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)


def _qwen2_config():
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)


_EXPERTS = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")


def _hub_layout(target: ParamTree, style: str, rename: dict[str, str] | None = None) -> ParamTree:
    """A hub checkpoint for ``target``: one tensor per expert, Mixtral (``block_sparse_moe``,
    w1/w2/w3) or Qwen/DeepSeek (``mlp``, gate_proj/up_proj/down_proj) spelling; the rest as is."""
    names = dict(ROLES[style], **(rename or {}))
    shapes = {}
    for key, spec in target.specs.items():
        found = _EXPERTS.match(key)
        if found:
            if found.group(2) == "gate_up_proj":
                experts, double, hidden = spec.shape
                module = found.group(1) + ("block_sparse_moe" if style == "mixtral" else "mlp")
                for e in range(experts):
                    for role, shape in (("gate", (double // 2, hidden)), ("up", (double // 2, hidden)), ("down", (hidden, double // 2))):
                        shapes[f"{module}.experts.{e}.{names[role]}.weight"] = shape
            continue
        if style == "mixtral" and key.endswith(".mlp.gate.weight"):
            key = key.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        shapes[key] = spec.shape
    return specs(shapes)


def _as_kernels(tree: ParamTree) -> ParamTree:
    """The same checkpoint with every linear matrix stored (in, out) and named ``kernel`` (flax style)."""
    return specs({(k[: -len("weight")] + "kernel" if _is_linear(k, s.shape) else k): (s.shape[::-1] if _is_linear(k, s.shape) else s.shape)
                  for k, s in tree.specs.items()})


def _is_linear(key: str, shape) -> bool:
    return len(shape) == 2 and "embed_tokens" not in key and key.endswith(".weight")


def _expected(target: ParamTree, style: str, kernels: bool = False, rename: dict[str, str] | None = None) -> Mapping:
    """The conversion written by hand: renames, plus per layer the experts stacked. gate_up is
    spelled differently from what the matcher emits (stack on axis 1), to be judged by value.
    ``kernels``: the source stores linear matrices (in, out) as ``kernel``."""
    names = dict(ROLES[style], **(rename or {}))
    module = "block_sparse_moe" if style == "mixtral" else "mlp"
    leaf = "kernel" if kernels else "weight"
    turn = (Transpose((1, 0)),) if kernels else ()
    rules = {}
    for key, spec in target.specs.items():
        t = re.sub(r"^model\.layers\.\d+\.", "model.layers.{i}.", key)
        if t == "model.layers.{i}.mlp.experts.gate_up_proj":
            sources = tuple(f"model.layers.{{i}}.{module}.experts.{{e}}.{names[r]}.{leaf}" for r in ("gate", "up"))
            # [gate_0..gate_E-1, up_0..up_E-1] (I, D) each -> (I, 2E, D) -> (I, 2, E, D) -> (E, 2, I, D) -> (E, 2I, D)
            rules[t] = Rule(t, sources, turn + (Stack(1), SplitAxis(1, (2, -1)), Transpose((2, 1, 0, 3)), MergeAxes(1, 2)))
        elif t == "model.layers.{i}.mlp.experts.down_proj":
            rules[t] = Rule(t, (f"model.layers.{{i}}.{module}.experts.{{e}}.{names['down']}.{leaf}",), turn + (Stack(0),))
        elif t == "model.layers.{i}.mlp.gate.weight":
            rules[t] = Rule(t, (f"model.layers.{{i}}.{module}.gate.{leaf}",), turn)
        elif kernels and _is_linear(key, spec.shape):
            rules[t] = Rule(t, (t[: -len("weight")] + "kernel",), turn)
        else:
            rules[t] = Rule(t, (t,))
    return Mapping(tuple(rules.values()))


CASES = {
    "mixtral": ("MixtralForCausalLM", _mixtral_config),
    "mixtral-square-experts": ("MixtralForCausalLM", lambda: _mixtral_config(intermediate=16)),  # w1, w2, w3 all (16, 16): names decide
    "qwen3_moe": ("Qwen3MoeForCausalLM", _qwen3_config),
    "qwen2_moe-shared-expert": ("Qwen2MoeForCausalLM", _qwen2_config),
}


@pytest.mark.parametrize("style", ["mixtral", "qwen"])
@pytest.mark.parametrize("case", list(CASES))
def test_per_expert_tensors_are_found_to_stack_into_the_fused_experts(case, style):
    class_name, config = CASES[case]
    target = build_target(class_name, config()).tree
    source = _hub_layout(target, style)
    report = match_trees(source, target)
    assert report.complete, (report.unresolved, report.unmatched_targets, report.unused_sources[:5])
    comparison = equivalent(report.mapping, _expected(target, style), source, target)
    assert comparison.exact, str(comparison)
    # one rule per expert tensor template, not one per expert or per layer
    assert sum("{e}" in s for d in report.decisions for s in d.rule.sources) == 3


def test_a_single_layer_model_gathers_its_experts_outside_any_block():
    """With one layer there are no layer blocks; the experts are still gathered (here the scope
    is the leaves outside blocks)."""
    target = build_target("MixtralForCausalLM", _mixtral_config(layers=1)).tree
    source = _hub_layout(target, "qwen")
    report = match_trees(source, target)
    assert report.complete, (report.unresolved, report.unmatched_targets, report.unused_sources[:5])
    assert equivalent(report.mapping, _expected(target, "qwen"), source, target).exact


def test_experts_stored_in_out_are_transposed_one_by_one_before_the_stack():
    target = build_target("MixtralForCausalLM", _mixtral_config()).tree
    source = _as_kernels(_hub_layout(target, "mixtral"))
    report = match_trees(source, target)
    assert report.complete, (report.unresolved, report.unmatched_targets, report.unused_sources[:5])
    comparison = equivalent(report.mapping, _expected(target, "mixtral", kernels=True), source, target)
    assert comparison.exact, str(comparison)


def test_a_swapped_gate_and_up_is_told_apart_from_the_right_one():
    """The equivalence check behind the test above can fail: gate and up exchanged disagree."""
    target = build_target("MixtralForCausalLM", _mixtral_config()).tree
    source = _hub_layout(target, "mixtral")
    right = _expected(target, "mixtral")
    swapped = Mapping(tuple(Rule(r.target, r.sources[::-1], r.ops) if r.target.endswith("gate_up_proj") else r for r in right.rules))
    comparison = equivalent(swapped, right, source, target)
    assert {t for t, _, _ in comparison.disagree} == {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)}


OPAQUE = {"gate": "wa", "up": "wb"}


def test_opaque_expert_names_leave_gate_up_unresolved_not_guessed():
    """wa and wb are both (I, D) and their names say nothing: gate_up_proj is one unresolved item
    whose options are the two complete assignments (its rule is not a concat of per-part rules)."""
    target = build_target("MixtralForCausalLM", _mixtral_config()).tree
    source = _hub_layout(target, "mixtral", rename=OPAQUE)
    report = match_trees(source, target)
    assert not report.complete
    (item,) = report.unresolved
    assert item.target == "model.layers.{i}.mlp.experts.gate_up_proj" and item.part is None
    decided = {d.rule.target: d.rule.sources for d in report.decisions}
    assert decided["model.layers.{i}.mlp.experts.down_proj"] == ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",)
    assert decided["model.layers.{i}.mlp.gate.weight"] == ("model.layers.{i}.block_sparse_moe.gate.weight",)
    wa, wb = (f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{n}.weight" for n in ("wa", "wb"))
    by_sources = {o.sources: o.rule(item.target) for o in item.options}
    assert set(by_sources) == {(wa, wb), (wb, wa)}
    # each option is a whole rule: pinned, the right one is the hand-written conversion, the other is not
    expected = _expected(target, "mixtral", rename=OPAQUE)
    right = Mapping(report.mapping.rules + (by_sources[(wa, wb)],))
    wrong = Mapping(report.mapping.rules + (by_sources[(wb, wa)],))
    assert equivalent(right, expected, source, target).exact
    assert not equivalent(wrong, expected, source, target).exact


def test_opaque_gate_and_up_are_answered_in_one_question(tmp_path):
    from matcher.interactive import resolve_interactively

    target = build_target("MixtralForCausalLM", _mixtral_config())
    source = _hub_layout(target.tree, "mixtral", rename=OPAQUE)
    report = match_trees(source, target.tree)
    report.target = target
    (item,) = report.unresolved
    wa, wb = (f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{n}.weight" for n in ("wa", "wb"))
    choice = 1 + [o.sources for o in item.options].index((wa, wb))
    with CliRunner().isolation(input=f"y\n{choice}\n"):
        resolved = resolve_interactively(report, tmp_path / "m.yaml")
    assert resolved.complete
    assert equivalent(resolved.mapping, _expected(target.tree, "mixtral", rename=OPAQUE), source, target.tree).exact


def test_experts_held_one_by_one_on_both_sides_pair_expert_by_expert():
    """Nothing to stack when the target also holds one tensor per expert: expert e's w1 -> expert
    e's gate_proj, for every e (expert indices are not name evidence: without gathering both
    sides, every expert of a role fits every other as well)."""
    target_full = build_target("MixtralForCausalLM", _mixtral_config()).tree
    source = _hub_layout(target_full, "mixtral")
    target = _hub_layout(target_full, "qwen")
    report = match_trees(source, target)
    assert report.complete, (report.unresolved, report.unmatched_targets, report.unused_sources[:5])
    expansion = report.mapping.expand(source.keys(), target.keys())
    got = {r.target: r.sources for r in expansion.rules}
    spelled = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for key in target.keys():
        found = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", key)
        if found:
            layer, expert, role = found.groups()
            assert got[key] == (f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{spelled[role]}.weight",), key
    assert not any(op.combines for r in report.mapping.rules for op in r.ops)
    assert sum("{e}" in r.target for r in report.mapping.rules) == 3  # solved once, for every expert


def test_inner_groups_are_found_once_on_the_template_and_gathered_only_for_a_stacked_target():
    experts = 5
    leaves = [Item(f"layers.{{i}}.moe.experts.{e}.{n}.weight", f"moe.experts.{e}.{n}.weight", s)
              for e in range(experts) for n, s in (("w1", (6, 4)), ("w2", (4, 6)), ("w3", (6, 4)))]
    norms = [Item(f"layers.{{i}}.LayerNorm_{k}.scale", f"LayerNorm_{k}.scale", (4,)) for k in range(2)]
    groups = {g.prefix: g for g in inner_groups(leaves + norms)}
    assert set(groups) == {"moe.experts.{e}", "LayerNorm_{e}"}
    assert groups["moe.experts.{e}"].count == experts and set(groups["moe.experts.{e}"].leaves) == {".w1.weight", ".w2.weight", ".w3.weight"}

    stacked = [Item("layers.{i}.experts.down_proj", "experts.down_proj", (experts, 4, 6)), Item("layers.{i}.norm1.weight", "norm1.weight", (4,))]
    sources, targets = gather_groups(leaves + norms, stacked)
    assert targets == stacked
    assert sorted(i.template for i in sources if i.gathered) == [f"layers.{{i}}.moe.experts.{{e}}.{n}.weight" for n in ("w1", "w2", "w3")]
    assert {i.shape for i in sources if i.gathered} == {(experts, 6, 4), (experts, 4, 6)}
    assert [i for i in sources if not i.gathered] == norms  # LayerNorm_0/1: no target leads with 2

    # experts one by one on both sides: both gathered, instance e to instance e
    per_expert = [Item(f"layers.{{i}}.experts.{e}.down.weight", f"experts.{e}.down.weight", (4, 6)) for e in range(experts)]
    sources, targets = gather_groups(leaves, per_expert)
    assert [t.template for t in targets] == ["layers.{i}.experts.{e}.down.weight"] and targets[0].gathered == experts
    assert len(sources) == 3 and all(i.gathered == experts for i in sources)
    # numbers that are sibling order tokens (LayerNorm_0/1 ~ layer_norm1/2) stay instance by instance
    numbered = [Item(f"layers.{{i}}.layer_norm{k}.weight", f"layer_norm{k}.weight", (4,)) for k in (1, 2)]
    assert gather_groups(norms, numbered) == (norms, numbered)


# ---------------------------------------------------------------------- real values, through the CLI

D, I, E, LAYERS, V, HEADS, KV, HEAD_DIM, TOP_K = 16, 24, 4, 2, 64, 4, 2, 4, 2


def _hub_checkpoint(seed: int, names=None) -> dict[str, np.ndarray]:
    """A hub-style Mixtral checkpoint of random values, one tensor per expert, written from the
    sizes above (not from transformers)."""
    names = names or ROLES["mixtral"]
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    arrays = {"model.embed_tokens.weight": normal(V, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        arrays[p + "self_attn.q_proj.weight"] = normal(HEADS * HEAD_DIM, D)
        arrays[p + "self_attn.k_proj.weight"] = normal(KV * HEAD_DIM, D)
        arrays[p + "self_attn.v_proj.weight"] = normal(KV * HEAD_DIM, D)
        arrays[p + "self_attn.o_proj.weight"] = normal(D, HEADS * HEAD_DIM)
        arrays[p + "block_sparse_moe.gate.weight"] = normal(E, D)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            arrays[q + names["gate"] + ".weight"] = normal(I, D)
            arrays[q + names["down"] + ".weight"] = normal(D, I)
            arrays[q + names["up"] + ".weight"] = normal(I, D)
        arrays[p + "input_layernorm.weight"] = 1 + normal(D)
        arrays[p + "post_attention_layernorm.weight"] = 1 + normal(D)
    arrays["model.norm.weight"] = 1 + normal(D)
    arrays["lm_head.weight"] = normal(V, D)
    return arrays


def _silu(x):
    return x / (1 + np.exp(-x))


def reference_moe(arrays: dict, layer: int, hidden: np.ndarray) -> np.ndarray:
    """Mixtral's sparse MoE block from the per-expert tensors: router logits, softmax over experts,
    the top-k probabilities renormalised to sum 1, and sum_k p_k * w2_e(silu(w1_e x) * w3_e x)."""
    p = f"model.layers.{layer}.block_sparse_moe."
    x = hidden.reshape(-1, D).astype(np.float64)
    logits = x @ arrays[p + "gate.weight"].T.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for row in range(x.shape[0]):
        top = np.argsort(-probs[row])[:TOP_K]
        weights = probs[row, top] / probs[row, top].sum()
        for e, w in zip(top, weights):
            w1, w2, w3 = (arrays[f"{p}experts.{e}.{n}.weight"].astype(np.float64) for n in ("w1", "w2", "w3"))
            out[row] += w * ((_silu(x[row] @ w1.T) * (x[row] @ w3.T)) @ w2.T)
    return out.reshape(hidden.shape)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from safetensors.numpy import save_file
    from transformers import MixtralForCausalLM

    root = tmp_path_factory.mktemp("mixtral")
    arrays = _hub_checkpoint(seed=7)
    save_file(arrays, str(root / "hub.safetensors"))
    _mixtral_config().save_pretrained(root / "config")
    out = root / "out"
    result = invoke(root / "hub.safetensors", "--target", "MixtralForCausalLM", "--config", root / "config" / "config.json", "--save", out, "--yes")
    assert result.exit_code == 0, result.output
    model = MixtralForCausalLM.from_pretrained(out).float().eval()
    return root, arrays, model


def _moe_outputs(model, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for layer in range(LAYERS):
        hidden = torch.randn(2, 5, D, generator=generator)
        with torch.no_grad():
            got = model.model.layers[layer].mlp(hidden)
        got = got[0] if isinstance(got, tuple) else got
        outputs.append((hidden.numpy(), got.numpy()))
    return outputs


def test_converted_moe_blocks_compute_the_per_expert_forward(converted):
    root, arrays, model = converted
    for layer, (hidden, got) in enumerate(_moe_outputs(model)):
        want = reference_moe(arrays, layer, hidden)
        assert np.abs(got - want).max() < 1e-5, (layer, float(np.abs(got - want).max()))


def test_converted_logits_equal_a_hand_built_conversion(converted):
    """The whole model: logits equal those of the same weights stacked by hand with torch."""
    from transformers import MixtralForCausalLM

    root, arrays, model = converted
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    state = {}
    for key, value in t.items():
        if ".experts." in key:
            continue
        state[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = value
    for i in range(LAYERS):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([t[f"{p}{e}.w1.weight"], t[f"{p}{e}.w3.weight"]], dim=0) for e in range(E)])
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([t[f"{p}{e}.w2.weight"] for e in range(E)])
    reference = MixtralForCausalLM(_mixtral_config()).float().eval()
    missing, unexpected = reference.load_state_dict(state, strict=True)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())


def test_gate_and_up_swapped_gives_another_forward(converted):
    """The check above can fail: the inferred mapping with gate and up exchanged (built by hand)
    converts to a model whose MoE blocks no longer match the per-expert forward."""
    from transformers import MixtralForCausalLM

    from matcher.sources import open_tree

    root, arrays, model = converted
    inferred = Mapping.load(root / "out" / "mapping.yaml")
    swapped = Mapping(tuple(Rule(r.target, r.sources[::-1], r.ops) if r.target.endswith("gate_up_proj") else r for r in inferred.rules))
    target = build_target("MixtralForCausalLM", _mixtral_config())
    tensors = convert_arrays(open_tree(root / "hub.safetensors"), target.tree, swapped)
    mutant = MixtralForCausalLM(_mixtral_config()).float().eval()
    mutant.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, strict=True)
    for layer, (hidden, got) in enumerate(_moe_outputs(mutant)):
        assert np.abs(got - reference_moe(arrays, layer, hidden)).max() > 1e-3, layer


def test_the_inferred_mapping_reverses_to_the_per_expert_checkpoint(converted):
    from safetensors.numpy import load_file

    root, arrays, model = converted
    inferred = Mapping.load(root / "out" / "mapping.yaml")
    assert any(len(r.sources) == 2 and "{e}" in r.sources[0] for r in inferred.rules)
    saved = load_file(str(root / "out" / "model.safetensors"))
    back = convert_arrays(ParamTree.from_arrays(saved), specs({k: v.shape for k, v in arrays.items()}), inferred.reverse({k: v.shape for k, v in arrays.items()}))
    assert set(back) == set(arrays)
    for key, value in arrays.items():
        assert np.array_equal(back[key], value), key


def test_opaque_gate_and_up_names_exit_3_through_the_cli(tmp_path):
    from safetensors.numpy import save_file

    arrays = _hub_checkpoint(seed=8, names={"gate": "wa", "up": "wb", "down": "w2"})
    save_file(arrays, str(tmp_path / "hub.safetensors"))
    _mixtral_config().save_pretrained(tmp_path / "config")
    out = tmp_path / "out"
    result = invoke(tmp_path / "hub.safetensors", "--target", "MixtralForCausalLM", "--config", tmp_path / "config", "--save", out, "--json", "--yes")
    assert result.exit_code == 3, result.output
    report = json.loads(result.output)
    assert not report["complete"]
    assert [u["target"] for u in report["unresolved"]] == ["model.layers.{i}.mlp.experts.gate_up_proj"]
    assert len(report["unresolved"][0]["candidates"]) == 2
    assert any(r["target"] == "model.layers.{i}.mlp.experts.down_proj" for r in report["rules"])
    assert not out.exists()
