"""Layer categories from tensor names, as the paper buckets them."""

import pytest

from tg_verify.artifact.categories import categorize


@pytest.mark.parametrize(("name", "category"), [
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("transformer.h.0.attn.c_attn.weight", "attention"),
    ("model.layers.3.mlp.gate_up_proj.weight", "ffn"),
    ("encoder.layer.0.ffn.dense.weight", "ffn"),
    ("model.embed_tokens.weight", "embedding"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.layers.0.self_attn.q_norm.weight", "norm"),
    ("transformer.ln_f.weight", "norm"),
    ("model.norm.weight", "norm"),
    ("lm_head.weight", "unknown"),
])
def test_categorize(name: str, category: str) -> None:
    assert categorize(name) == category
