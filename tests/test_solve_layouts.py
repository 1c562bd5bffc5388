"""Layouts found by the accuracy and scale benchmarks (benchmarks/accuracy.py, benchmarks/scale.py):
Meta's original Llama names, a scanned stack that fills its container, a fused tensor in a
scanned stack."""

from matcher.solve import match_trees
from matcher.solve.blocks import find_blocks, find_stacked
from matcher.tree import ParamTree, TensorSpec


def specs(shapes: dict) -> ParamTree:
    return ParamTree({k: TensorSpec(k, tuple(v), "float32") for k, v in shapes.items()})


def llama(names: dict[str, str], layers: int = 3, d: int = 16, kv: int = 8, f: int = 40, vocab: int = 50) -> dict:
    shapes = {"embed": (vocab, d), "norm": (d,), "head": (vocab, d)}
    layer = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f), "norm1": (d,), "norm2": (d,)}
    out = {names[k]: v for k, v in shapes.items()}
    for i in range(layers):
        out.update({names[k].format(i=i): v for k, v in layer.items()})
    return out


HF = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight",
      "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
      "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
      "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
      "down": "model.layers.{i}.mlp.down_proj.weight", "norm1": "model.layers.{i}.input_layernorm.weight",
      "norm2": "model.layers.{i}.post_attention_layernorm.weight"}
META = {"embed": "tok_embeddings.weight", "norm": "norm.weight", "head": "output.weight",
        "q": "layers.{i}.attention.wq.weight", "k": "layers.{i}.attention.wk.weight", "v": "layers.{i}.attention.wv.weight",
        "o": "layers.{i}.attention.wo.weight", "gate": "layers.{i}.feed_forward.w1.weight", "up": "layers.{i}.feed_forward.w3.weight",
        "down": "layers.{i}.feed_forward.w2.weight", "norm1": "layers.{i}.attention_norm.weight", "norm2": "layers.{i}.ffn_norm.weight"}


def test_meta_llama_names_pair_with_transformers_names_by_the_synonym_table():
    """w1/w3 (equal shapes) are gate/up, attention_norm/ffn_norm (equal shapes) are the norms before
    attention and before the MLP, output is the LM head: data in synonyms.yaml, not code."""
    report = match_trees(specs(llama(META)), specs(llama(HF)))
    got = {d.rule.target: d.rule.sources for d in report.decisions}
    assert got == {HF[k]: (META[k],) for k in HF if k not in ("q", "k")}
    assert all(not d.rule.ops for d in report.decisions)


def test_meta_llama_wq_and_wk_are_asked_not_renamed():
    """Meta's rotary row order is invisible to shapes and names: a rename would load and run but
    attend wrongly, so q/k are left to a person with the note and the rename as the option."""
    report = match_trees(specs(llama(META)), specs(llama(HF)))
    assert not report.complete and not report.unmatched_targets and not report.unused_sources
    questions = {u.target: u for u in report.unresolved}
    assert set(questions) == {HF["q"], HF["k"]}
    for key in ("q", "k"):
        question = questions[HF[key]]
        assert "rotary" in question.reason and "permut" in question.reason
        assert [o.sources for o in question.options] == [(META[key],)]


def test_transformers_named_q_and_k_are_renamed_without_a_question():
    report = match_trees(specs(llama(HF)), specs(llama(HF)))
    assert report.complete and not report.unresolved


def test_a_stack_that_fills_its_container_is_the_innermost_container():
    """``visual/transformer`` holds nothing but the stack: the block is ``visual/transformer/resblocks``,
    so its ancestors (``visual/transformer`` ~ ``encoder``) line up with the other side's."""
    source = specs({
        **{f"visual/transformer/resblocks/{m}/{p}": (4, 8) for m in ("ln_1", "ln_2") for p in ("scale", "bias")},
        "visual/transformer/resblocks/mlp/c_fc/kernel": (4, 8, 32),
        "visual/ln_post/scale": (8,),
    })
    units = find_stacked(find_blocks(source), {4})
    assert [(b.prefix, b.stacked, b.count) for b in units.blocks] == [("visual/transformer/resblocks", True, 4)]
    assert set(units.singles) == {"visual/ln_post/scale"}


def test_a_chunk_of_a_fused_tensor_in_a_scanned_stack_is_flagged_not_a_crash():
    """select + chunk in one rule is beyond the mapping format: the targets are listed as unresolved
    with the reason, and everything else is still matched."""
    d, layers = 8, 3
    source = specs({"blocks/attn/qkv/weight": (layers, 3 * d, d), "blocks/attn/proj/weight": (layers, d, d),
                    "blocks/attn/proj/bias": (layers, d), "blocks/mlp/fc1/weight": (layers, 4 * d, d)})
    target = specs({k: v for i in range(layers) for k, v in {
        f"layers.{i}.attention.q_proj.weight": (d, d), f"layers.{i}.attention.k_proj.weight": (d, d),
        f"layers.{i}.attention.v_proj.weight": (d, d), f"layers.{i}.attention.o_proj.weight": (d, d),
        f"layers.{i}.attention.o_proj.bias": (d,), f"layers.{i}.mlp.fc1.weight": (4 * d, d)}.items()})
    report = match_trees(source, target)
    assert not report.complete
    unresolved = {u.target: u.reason for u in report.unresolved}
    assert set(unresolved) == {f"layers.{{i}}.attention.{p}_proj.weight" for p in "qkv"}
    assert all("cannot express" in reason for reason in unresolved.values())
    decided = {d.rule.target for d in report.decisions}
    assert {"layers.{i}.attention.o_proj.bias", "layers.{i}.mlp.fc1.weight"} <= decided
