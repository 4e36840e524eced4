"""Tensor-name rules in one place: block indices, module leaves and the names of embeddings, heads,
norms and projections across the transformer families tg-verify reads.

The fingerprint extractor, the lineage sketch and the analyses read names only through this module,
so a rule changes here once. Which tensors a runtime loads at all is decided in artifact/loading.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

_V = TypeVar("_V")

# A decoder block index in a tensor name: model.layers.7., transformer.h.7., gpt_neox.layers.7., blocks.7., ...
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")

# A mixture-of-experts expert index: model.layers.3.block_sparse_moe.experts.5.w1, model.layers.3.mlp.experts.5.up_proj
EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")

# Module leaves (the component before `.weight`/`.bias`) of the global tensors.
EMBEDDINGS: tuple[str, ...] = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
HEADS: tuple[str, ...] = ("lm_head", "embed_out", "output")
ATTN_NORMS: tuple[str, ...] = ("input_layernorm", "attention_norm", "ln_1", "ln_attn", "self_attn_layer_norm",
                               "norm_1", "attention_layernorm", "operator_norm")  # last two: Apertus, LFM2
# Each tuple in precedence order: a block with several (Gemma 2/3 also store post_attention_layernorm, which there
# scales the attention's output) reads its input through the first one it has (input_norm).
# OPT names its MLP's norm final_layer_norm inside each block (outside the blocks the name is a final norm's).
MLP_NORMS: tuple[str, ...] = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm", "ln_2", "ln_mlp",
                              "final_layer_norm", "norm_2", "feedforward_layernorm", "pre_ff_layernorm")
# What an MLP reads its input through, in precedence order: its own norm, else (a parallel block: GPT-J, Phi,
# Cohere, Falcon) the one norm the attention reads through too.
MLP_INPUT_NORMS: tuple[str, ...] = MLP_NORMS + ATTN_NORMS
FINAL_NORMS: tuple[str, ...] = ("norm", "final_layernorm", "ln_f", "final_norm", "final_layer_norm", "norm_f")
NORMS: tuple[str, ...] = ATTN_NORMS + MLP_NORMS + FINAL_NORMS
# Norms no residual reader's input goes through (they scale a block's output, or queries and keys alone): the
# lineage evidence has no gain of theirs to absorb.
OUTPUT_NORMS: tuple[str, ...] = ("post_feedforward_layernorm", "q_norm", "k_norm", "q_layernorm", "k_layernorm",
                                 "post_self_attn_layernorm", "post_mlp_layernorm")  # the last two: GLM-4

# Projection leaf -> the part of a block it is. Fused ones (qkv, gate_up) are split by the config's head counts.
PROJECTIONS: dict[str, str] = {
    "q_proj": "q", "wq": "q", "query": "q",
    "k_proj": "k", "wk": "k", "key": "k",
    "v_proj": "v", "wv": "v", "value": "v",
    "qkv_proj": "qkv", "Wqkv": "qkv", "query_key_value": "qkv_heads",
    "wqkv": "qkv_heads",  # InternLM2: per key/value group, as Falcon's
    "o_proj": "o", "wo": "o", "out_proj": "o", "dense": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "fc1": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down", "w2": "down", "fc2": "down", "fc_in": "up", "fc_out": "down",  # fc_in/fc_out: GPT-J
    "dense_h_to_4h": "up", "dense_4h_to_h": "down",  # GPT-NeoX
}
# Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): the latent a block's keys and values are expanded from (its
# first kv_lora_rank rows; the rest are the shared rotary key), and the expansion (per head: [key; value] rows). Apart
# from PROJECTIONS: only the block evidence reads them.
LATENT_PROJECTIONS: dict[str, str] = {"kv_a_proj_with_mqa": "kv_latent", "kv_b_proj": "kv_up"}
LATENT_NORMS: tuple[str, ...] = ("kv_a_layernorm",)  # the latent's norm, between the two
# Leaves whose part depends on the module above them: GPT-2's and Starcoder2's `c_proj` is the attention's output
# under `attn` and the MLP's down projection under `mlp`.
CONTEXT_PROJECTIONS: dict[tuple[str, str], str] = {
    ("attn", "c_attn"): "qkv", ("attn", "c_proj"): "o", ("mlp", "c_fc"): "up", ("mlp", "c_proj"): "down",
}
# model_types whose projections store their weight as [in, out] (GPT-2's Conv1D), the transpose of nn.Linear's
TRANSPOSED_MODEL_TYPES: tuple[str, ...] = ("gpt2",)
FUSED: tuple[str, ...] = ("qkv", "qkv_heads", "gate_up")  # parts that hold several (split by sketch.split_fused)
ATTENTION_INPUTS: tuple[str, ...] = ("q", "k", "v", "qkv", "qkv_heads")  # read the residual through ATTN_NORMS


def leaf(name: str) -> str:
    """The module a parameter belongs to: `model.layers.0.mlp.up_proj.weight` -> `up_proj`."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def layer_of(name: str) -> int | None:
    """The decoder block index in `name`, or None for a tensor outside the blocks."""
    match = BLOCK.search(name)
    return int(match.group(1)) if match else None


# Every expert of a block in one 3-D tensor [experts, out, in], as transformers >= 5 holds (and saves) them.
FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|up_proj|gate_proj|down_proj)$")
# model_types whose all-experts tensors are [experts, in, out] with gate and up interleaved along `out` (GPT-OSS:
# gate = [..., ::2], up = [..., 1::2]); every other model_type's are [experts, out, in], gate rows then up rows.
# The same name holds either layout, so config.json decides, never a shape (d == 2f would leave a shape's guess
# open, and a crafted one could steer it).
INTERLEAVED_EXPERTS_MODEL_TYPES: tuple[str, ...] = ("gpt_oss",)


def interleaved_experts(config: Mapping[str, object] | None) -> bool:
    """Whether this architecture stores its all-experts tensors as [experts, in, out], gate and up interleaved."""
    return (config or {}).get("model_type") in INTERLEAVED_EXPERTS_MODEL_TYPES


def fused_experts(name: str) -> str | None:
    """The part (gate_up, up, gate, down) a 3-D all-experts tensor holds, by its name, or None."""
    match = FUSED_EXPERTS.search(name)
    return PROJECTIONS[match.group(1)] if match else None


def expert_of(name: str) -> int | None:
    """The expert index in a mixture-of-experts projection's name, or None (a dense or shared-expert projection)."""
    match = EXPERT.search(name)
    return int(match.group(1)) if match else None


def block_of(name: str) -> tuple[str, int, str] | None:
    """(stack prefix up to and including the stack word and dot, block index, rest after the index), or None.

    `model.layers.3.mlp.down_proj.weight` -> (`model.layers.`, 3, `mlp.down_proj.weight`).
    """
    match = BLOCK.search(name)
    if match is None:
        return None
    return name[:match.start(1)], int(match.group(1)), name[match.end(1) + 1:]


def global_role(name: str) -> str | None:
    """"embed", "head" or "final_norm" for a tensor outside the blocks whose leaf says so, else None."""
    if layer_of(name) is not None:
        return None
    module = leaf(name)
    if module in EMBEDDINGS:
        return "embed"
    if module in HEADS:
        return "head"
    if module in FINAL_NORMS:
        return "final_norm"
    return None


def input_norm(norms: Mapping[str, _V], leaves: tuple[str, ...]) -> _V | None:
    """Of a block's norms (by leaf), the one its attention or MLP reads its input through: the first of `leaves`
    (ATTN_NORMS or MLP_NORMS, in precedence order) that it has; never decided by storage order."""
    return next((norms[leaf] for leaf in leaves if leaf in norms), None)


def projection(name: str) -> str | None:
    """The block part a projection weight is (q, k, v, qkv, qkv_heads, o, gate, up, gate_up, down), or None."""
    parts = name.split(".")
    module = leaf(name)
    part = PROJECTIONS.get(module)
    if part is None and len(parts) >= 3:
        part = CONTEXT_PROJECTIONS.get((parts[-3], module))
    return part


def latent_projection(name: str) -> str | None:
    """The latent attention part (kv_latent, kv_up) a weight is, or None."""
    return LATENT_PROJECTIONS.get(leaf(name))


def transposed(config: Mapping[str, object] | None) -> bool:
    """Whether this architecture stores its projections as [in, out] (GPT-2's Conv1D)."""
    return (config or {}).get("model_type") in TRANSPOSED_MODEL_TYPES
