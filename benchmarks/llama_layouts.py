"""Meta's original Llama key names (consolidated.*.pth), from transformers' names: shared by the
scale and accuracy benchmarks."""

import re

META_NAMES = [  # transformers key -> Meta's original key; the layer is a number or the template's {i}
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
