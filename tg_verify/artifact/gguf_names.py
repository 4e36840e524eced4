"""GGUF architectures onto the families tg-verify knows: llama.cpp tensor names and metadata to Hugging Face.

A GGUF model is fingerprinted like its safetensors original: `blk.3.attn_q.weight` becomes
`model.layers.3.self_attn.q_proj.weight` with the HF shape ([out, in]), merged expert tensors
(`ffn_gate_exps`, [n_expert, n_ff, n_embd]) become one tensor per expert, and the metadata
(`llama.embedding_length`, head counts, rope, context) becomes an HF-style config. What llama.cpp's
converter changed is undone when the tensors are read (`transform_for`): the row permutation of Q and K
for llama-style rope, and the +1 it adds to Gemma's norm weights. The tables follow llama.cpp's
loaders (src/models/*.cpp) for each architecture; a tensor outside them is one llama.cpp would not
load, reported in `Artifact.unexpected` and never fingerprinted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import gguf.constants

from tg_verify.artifact.errors import (
    GGUFArchitectureError,
    GGUFMetadataError,
    GGUFSplitError,
    GGUFTensorsError,
    shown,
)
from tg_verify.artifact.gguf import GGUFHeader, GGUFTensor, GGUFValue
from tg_verify.artifact.model import TensorInfo, natural_key

_C: Any = gguf.constants

def _leaf(tensor: str) -> str:
    """llama.cpp's name of a tensor kind (gguf's MODEL_TENSOR), without the `blk.{bid}.` prefix."""
    return str(_C.TENSOR_NAMES[_C.MODEL_TENSOR[tensor]]).removeprefix("blk.{bid}.")


# llama.cpp leaf (after `blk.N.`, spelled by the gguf package) -> Hugging Face module path (after `model.layers.N.`)
_ATTENTION = {_leaf("ATTN_NORM"): "input_layernorm", _leaf("ATTN_Q"): "self_attn.q_proj",
              _leaf("ATTN_K"): "self_attn.k_proj", _leaf("ATTN_V"): "self_attn.v_proj",
              _leaf("ATTN_QKV"): "self_attn.qkv_proj", _leaf("ATTN_OUT"): "self_attn.o_proj"}
_DENSE = {_leaf("FFN_NORM"): "post_attention_layernorm", _leaf("FFN_GATE"): "mlp.gate_proj",
          _leaf("FFN_UP"): "mlp.up_proj", _leaf("FFN_DOWN"): "mlp.down_proj"}
_QK_NORM = {_leaf("ATTN_Q_NORM"): "self_attn.q_norm", _leaf("ATTN_K_NORM"): "self_attn.k_norm"}
# Gemma 2/3 put a norm before and after each sub-block: llama.cpp's ffn_norm is HF's pre_feedforward_layernorm.
_SANDWICH = {_leaf("FFN_NORM"): "pre_feedforward_layernorm", _leaf("ATTN_POST_NORM"): "post_attention_layernorm",
             _leaf("FFN_POST_NORM"): "post_feedforward_layernorm"}
_MIXTRAL = {_leaf("FFN_NORM"): "post_attention_layernorm", _leaf("FFN_GATE_INP"): "block_sparse_moe.gate",
            _leaf("FFN_GATE_EXP"): "block_sparse_moe.experts.{e}.w1",
            _leaf("FFN_DOWN_EXP"): "block_sparse_moe.experts.{e}.w2",
            _leaf("FFN_UP_EXP"): "block_sparse_moe.experts.{e}.w3"}
_QWEN_MOE = {_leaf("FFN_NORM"): "post_attention_layernorm", _leaf("FFN_GATE_INP"): "mlp.gate",
             _leaf("FFN_GATE_EXP"): "mlp.experts.{e}.gate_proj", _leaf("FFN_DOWN_EXP"): "mlp.experts.{e}.down_proj",
             _leaf("FFN_UP_EXP"): "mlp.experts.{e}.up_proj"}
_QWEN_SHARED = {_leaf("FFN_GATE_SHEXP"): "mlp.shared_expert.gate_proj",
                _leaf("FFN_UP_SHEXP"): "mlp.shared_expert.up_proj",
                _leaf("FFN_DOWN_SHEXP"): "mlp.shared_expert.down_proj",
                _leaf("FFN_GATE_INP_SHEXP"): "mlp.shared_expert_gate"}
_EMBEDDING, _OUTPUT_NORM, _OUTPUT = _leaf("TOKEN_EMBD"), _leaf("OUTPUT_NORM"), _leaf("OUTPUT")
_GLOBAL = {f"{_EMBEDDING}.weight": "model.embed_tokens.weight", f"{_OUTPUT_NORM}.weight": "model.norm.weight",
           f"{_OUTPUT}.weight": "lm_head.weight"}
# Matrices whose residual-stream side is their input (ne[0] == n_embd) or their output (ne[1] == n_embd).
_READS_RESIDUAL = frozenset(_leaf(t) for t in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_QKV", "FFN_GATE", "FFN_UP",
                                               "FFN_GATE_INP", "FFN_GATE_EXP", "FFN_UP_EXP", "FFN_GATE_SHEXP",
                                               "FFN_UP_SHEXP", "TOKEN_EMBD", "OUTPUT"))
_WRITES_RESIDUAL = frozenset(_leaf(t) for t in ("ATTN_OUT", "FFN_DOWN", "FFN_DOWN_EXP", "FFN_DOWN_SHEXP"))
_BIASED = frozenset(_leaf(t) for t in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_QKV", "ATTN_OUT"))
_FFN_BIASED = frozenset(_leaf(t) for t in ("FFN_GATE", "FFN_UP", "FFN_DOWN"))
_Q, _K, _V, _QKV = _leaf("ATTN_Q"), _leaf("ATTN_K"), _leaf("ATTN_V"), _leaf("ATTN_QKV")
_EXPERTS = (_leaf("FFN_GATE_INP"), _leaf("FFN_GATE_EXP"), _leaf("FFN_UP_EXP"), _leaf("FFN_DOWN_EXP"))
_SHARED_GATE = _leaf("FFN_GATE_INP_SHEXP")
_LAYER_NAME = re.compile(r"^blk\.(0|[1-9][0-9]{0,5})\.([a-z0-9_]+)\.(weight|bias)$")
_INTEGER_TYPES = frozenset({"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"})
_FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT64"})
MAX_LAYERS = 100_000
MAX_WIDTH = 1 << 24
METADATA_TEXT = 200  # characters of a metadata string shown by inspect


@dataclass(frozen=True)
class Family:
    """How one llama.cpp architecture maps onto Hugging Face names and values."""

    model_type: str  # HF model_type (config.json)
    hf_class: str  # HF architectures[0]
    layer: dict[str, str]  # llama.cpp leaf -> HF path under model.layers.N
    required: tuple[str, ...]  # per-layer leaves llama.cpp needs (q/k/v may come fused as attn_qkv)
    permute_qk: bool = False  # llama.cpp's converter permutes Q/K rows for its llama-style (NORM) rope
    norm_offset: bool = False  # the converter stores 1 + w for Gemma norms
    tied_only: bool = False  # llama.cpp reuses the embedding as output head; an output.weight is never loaded
    ffn_biases: bool = False
    moe: bool = False
    runtime_only: tuple[str, ...] = ()  # loaded by llama.cpp, computed from config in HF: reported, not fingerprinted
    moe_type: str | None = None  # model_type when expert_count > 0 (llama -> mixtral)


_ROPE = tuple(f"{_leaf(t)}.weight" for t in ("ROPE_FREQS", "ROPE_FACTORS_LONG", "ROPE_FACTORS_SHORT"))
_BASE = (_leaf("ATTN_NORM"), _leaf("ATTN_OUT"), _leaf("FFN_NORM"))
_GATED = (_leaf("FFN_GATE"), _leaf("FFN_UP"), _leaf("FFN_DOWN"))
_QK = (_leaf("ATTN_Q_NORM"), _leaf("ATTN_K_NORM"))
_POST = (_leaf("ATTN_POST_NORM"), _leaf("FFN_POST_NORM"))
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", {**_ATTENTION, **_DENSE}, _BASE + _GATED, permute_qk=True,
                    ffn_biases=True, runtime_only=_ROPE, moe_type="mixtral"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", {**_ATTENTION, **_DENSE}, _BASE + _GATED),
    "qwen2moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", {**_ATTENTION, **_QWEN_MOE, **_QWEN_SHARED},
                       _BASE + _EXPERTS, moe=True),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", {**_ATTENTION, **_DENSE, **_QK_NORM}, _BASE + _GATED + _QK),
    "qwen3moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", {**_ATTENTION, **_QWEN_MOE, **_QK_NORM},
                       _BASE + _EXPERTS + _QK, moe=True),
    "gemma": Family("gemma", "GemmaForCausalLM", {**_ATTENTION, **_DENSE}, _BASE + _GATED, norm_offset=True,
                    tied_only=True),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", {**_ATTENTION, **_DENSE, **_SANDWICH}, _BASE + _GATED + _POST,
                     norm_offset=True, tied_only=True),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", {**_ATTENTION, **_DENSE, **_SANDWICH, **_QK_NORM},
                     _BASE + _GATED + _POST + _QK, norm_offset=True, tied_only=True),
    "phi3": Family("phi3", "Phi3ForCausalLM",
                   {**_ATTENTION, _leaf("FFN_NORM"): "post_attention_layernorm", _leaf("FFN_UP"): "mlp.gate_up_proj",
                    _leaf("FFN_DOWN"): "mlp.down_proj"}, _BASE + _GATED[1:], runtime_only=_ROPE[1:]),
}
_BY_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES.values()}
_BY_MODEL_TYPE["mixtral"] = FAMILIES["llama"]
_MOE_LAYER = {**_ATTENTION, **_MIXTRAL}


@dataclass(frozen=True)
class Transform:
    """What reading a GGUF tensor must undo to give the HF values: Q/K row permutations, the norm offset."""

    unpermute: tuple[tuple[int, int, int], ...] = ()  # (first row, rows, heads) segments
    subtract: float = 0.0


@dataclass(frozen=True)
class MappedModel:
    """A GGUF header as tg-verify sees a model: HF tensors, config, metadata, and what is not fingerprinted."""

    tensors: tuple[TensorInfo, ...]
    config: dict[str, Any]
    metadata: dict[str, str]
    notes: tuple[str, ...] = ()
    unexpected: tuple[TensorInfo, ...] = ()  # stored tensors llama.cpp would not load: never fingerprinted


def display(value: GGUFValue) -> str:
    """A metadata value as one line of text for inspect (long strings cut, arrays summarised)."""
    if value.type == "ARRAY":
        if value.value is not None and value.item_type != "STRING":
            return shown(repr(value.value), METADATA_TEXT)
        return f"[{value.count} x {(value.item_type or '').lower()}]"
    if isinstance(value.value, bytes):
        return f"<{len(value.value)} bytes, not UTF-8>"
    return shown(value.value, METADATA_TEXT)


def _integer(meta: dict[str, GGUFValue], key: str, where: str, *, required: bool, low: int = 1,
             high: int = MAX_WIDTH) -> int | None:
    entry = meta.get(key)
    if entry is None:
        if required:
            raise GGUFMetadataError(f"{where}: metadata '{shown(key)}' is missing (llama.cpp needs it)")
        return None
    if entry.type == "ARRAY":
        raise GGUFMetadataError(f"{where}: metadata '{shown(key)}' is a per-layer array; tg-verify maps only one "
                                f"value for all layers")
    if entry.type not in _INTEGER_TYPES:
        raise GGUFMetadataError(f"{where}: metadata '{shown(key)}' must be an integer, got {entry.type.lower()}")
    value = int(entry.value)
    if not low <= value <= high:
        raise GGUFMetadataError(f"{where}: metadata '{shown(key)}' is {value}, outside [{low}, {high}]")
    return value


def _number(meta: dict[str, GGUFValue], key: str, where: str) -> float | None:
    entry = meta.get(key)
    if entry is None:
        return None
    if entry.type not in _FLOAT_TYPES | _INTEGER_TYPES or not math.isfinite(float(entry.value)):
        raise GGUFMetadataError(f"{where}: metadata '{shown(key)}' must be a finite number")
    # a float32 shown as its shortest decimal (1e-05, not 9.999999747378752e-06), as the HF config wrote it
    return float(f"{entry.value:.7g}") if entry.type == "FLOAT32" else float(entry.value)


def _string(meta: dict[str, GGUFValue], key: str, where: str) -> str | None:
    entry = meta.get(key)
    if entry is None:
        return None
    if entry.type != "STRING" or not isinstance(entry.value, str):
        raise GGUFMetadataError(f"{where}: metadata '{shown(key)}' must be a UTF-8 string, got "
                                f"{entry.type.lower()}")
    return entry.value


def _family(meta: dict[str, GGUFValue], where: str) -> tuple[str, Family]:
    split = _integer(meta, "split.count", where, required=False, low=0, high=1 << 16)
    if split is not None and split > 1:
        raise GGUFSplitError(f"{where}: part of a model split in {split} files (split.count); merge them first "
                             f"(llama-gguf-split --merge) and pass the whole file")
    kind = _string(meta, "general.type", where)
    if kind is not None and kind != "model":
        raise GGUFArchitectureError(f"{where}: general.type is '{shown(kind)}', not a model (a GGUF LoRA adapter or "
                                    f"projector cannot be verified on its own)")
    arch = _string(meta, "general.architecture", where)
    if arch is None:
        raise GGUFMetadataError(f"{where}: metadata 'general.architecture' is missing")
    family = FAMILIES.get(arch)
    if family is None:
        raise GGUFArchitectureError(f"{where}: GGUF architecture '{shown(arch, 80)}' is not supported (supported: "
                                    f"{', '.join(sorted(FAMILIES))})")
    return arch, family


def _config(arch: str, family: Family, meta: dict[str, GGUFValue], where: str) -> dict[str, Any]:
    def key(name: str) -> str:
        return f"{arch}.{name}"

    layers = _integer(meta, key("block_count"), where, required=True, high=MAX_LAYERS)
    width = _integer(meta, key("embedding_length"), where, required=True)
    heads = _integer(meta, key("attention.head_count"), where, required=True, high=1 << 16)
    assert layers is not None and width is not None and heads is not None
    kv_heads = _integer(meta, key("attention.head_count_kv"), where, required=False, high=heads) or heads
    if heads % kv_heads:
        raise GGUFMetadataError(f"{where}: {kv_heads} key-value heads do not divide {heads} attention heads")
    head_dim = _integer(meta, key("attention.key_length"), where, required=False)
    if head_dim is None:
        if width % heads:
            raise GGUFMetadataError(f"{where}: embedding_length {width} is not a multiple of {heads} heads and no "
                                    f"attention.key_length is given")
        head_dim = width // heads
    if family.permute_qk and head_dim % 2:
        raise GGUFMetadataError(f"{where}: head size {head_dim} is odd; llama.cpp's rope pairs need an even one")
    config: dict[str, Any] = {"model_type": family.model_type, "architectures": [family.hf_class],
                              "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
                              "num_key_value_heads": kv_heads, "head_dim": head_dim}
    optional = (("feed_forward_length", "intermediate_size"), ("context_length", "max_position_embeddings"))
    for gguf_key, hf_key in optional:
        entry = meta.get(key(gguf_key))
        if entry is not None and entry.type != "ARRAY":
            config[hf_key] = _integer(meta, key(gguf_key), where, required=False, high=1 << 40)
    for gguf_key, hf_key in (("attention.layer_norm_rms_epsilon", "rms_norm_eps"), ("rope.freq_base", "rope_theta")):
        value = _number(meta, key(gguf_key), where)
        if value is not None:
            config[hf_key] = value
    experts = _integer(meta, key("expert_count"), where, required=False, low=0, high=1 << 16)
    if experts:
        used = _integer(meta, key("expert_used_count"), where, required=False, high=experts)
        config["num_local_experts" if family.moe_type else "num_experts"] = experts
        if used is not None:
            config["num_experts_per_tok"] = used
        if family.moe_type:
            config["model_type"] = family.moe_type
            config["architectures"] = ["MixtralForCausalLM"]
    elif family.moe:
        raise GGUFMetadataError(f"{where}: metadata '{key('expert_count')}' is missing or 0 for the mixture-of-"
                                f"experts architecture '{arch}'")
    return config


def transform_for(config: dict[str, Any], name: str) -> Transform | None:
    """What reading tensor `name` of a GGUF artifact with this (mapped) config must undo, or None."""
    family = _BY_MODEL_TYPE.get(str(config.get("model_type")))
    if family is None:
        return None
    if family.norm_offset and name.endswith("norm.weight"):
        return Transform(subtract=1.0)
    if not family.permute_qk or not name.startswith("model.layers."):
        return None
    heads, kv_heads, head_dim = (int(config[k]) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    if ".self_attn.q_proj." in name:
        return Transform(unpermute=((0, heads * head_dim, heads),))
    if ".self_attn.k_proj." in name:
        return Transform(unpermute=((0, kv_heads * head_dim, kv_heads),))
    if ".self_attn.qkv_proj." in name:
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        return Transform(unpermute=((0, q_rows, heads), (q_rows, kv_rows, kv_heads)))
    return None


def _layer_table(family: Family, config: dict[str, Any]) -> dict[str, str]:
    if family.moe_type and config.get("num_local_experts"):
        return _MOE_LAYER
    return family.layer


def _check_shape(tensor: GGUFTensor, leaf: str, kind: str, config: dict[str, Any], where: str) -> None:
    """The shape checks the mapping depends on (llama.cpp checks every shape and refuses the file otherwise)."""
    ne = tensor.ne
    width, heads, kv_heads, head_dim = (int(config[k]) for k in ("hidden_size", "num_attention_heads",
                                                                 "num_key_value_heads", "head_dim"))
    expected_rank = 1 if kind == "bias" or leaf.endswith("norm") or leaf == _SHARED_GATE else (
        3 if leaf in _EXPERTS[1:] else 2)
    problem = None
    if len(ne) != expected_rank:
        problem = f"{expected_rank} dimensions"
    elif expected_rank >= 2 and leaf in _READS_RESIDUAL and ne[0] != width:
        problem = f"rows of embedding_length {width}"
    elif expected_rank >= 2 and leaf in _WRITES_RESIDUAL and ne[1] != width:
        problem = f"{width} outputs (embedding_length)"
    elif leaf in (_Q, _K, _QKV):
        rows = {_Q: heads, _K: kv_heads, _QKV: heads + 2 * kv_heads}[leaf] * head_dim
        if ne[-1] != rows:
            problem = f"{rows} rows ({heads} heads, {kv_heads} key-value heads of {head_dim})"
    elif leaf in _EXPERTS[1:] and ne[2] != config.get("num_local_experts", config.get("num_experts")):
        problem = f"{config.get('num_local_experts', config.get('num_experts'))} experts"
    if problem is not None:
        raise GGUFTensorsError(f"{where}: tensor '{shown(tensor.name)}' has shape {list(ne)} (ggml order), expected "
                               f"{problem}; llama.cpp would refuse to load this file")


def _infos(tensor: GGUFTensor, hf: str, file: str) -> list[TensorInfo]:
    """TensorInfos for one GGUF tensor: HF shape (reversed ne); merged experts split into contiguous slices."""
    shape = tuple(reversed(tensor.ne))
    if "{e}" not in hf:
        if hf.endswith("shared_expert_gate.weight"):
            shape = (1, *shape)
        return [TensorInfo(hf, tensor.type_name, shape, file, tensor.begin, tensor.end)]
    experts = shape[0]
    step = (tensor.end - tensor.begin) // experts if experts else 0
    return [TensorInfo(hf.format(e=e), tensor.type_name, shape[1:], file, tensor.begin + e * step,
                       tensor.begin + (e + 1) * step) for e in range(experts)]


def map_model(header: GGUFHeader, where: str) -> MappedModel:
    """Map a validated header onto HF names, shapes and config; refuse what llama.cpp could not load."""
    meta = header.metadata
    arch, family = _family(meta, where)
    config = _config(arch, family, meta, where)
    table = _layer_table(family, config)
    layers = int(config["num_hidden_layers"])
    file = header.path.name
    infos: list[TensorInfo] = []
    unloaded: list[tuple[GGUFTensor, str]] = []
    runtime_only: list[str] = []
    present: dict[int, set[str]] = {}
    by_name = {t.name: t for t in header.tensors}
    for tensor in header.tensors:
        name = tensor.name
        if name in _GLOBAL:
            if name == f"{_OUTPUT}.weight" and family.tied_only:
                unloaded.append((tensor, f"llama.cpp uses the token embedding as output head for '{arch}'"))
                continue
            _check_shape(tensor, name.split(".")[0], "weight", config, where)  # token_embd, output, output_norm
            infos.extend(_infos(tensor, _GLOBAL[name], file))
            continue
        if name in family.runtime_only:
            runtime_only.append(name)
            continue
        match = _LAYER_NAME.match(name)
        hf = table.get(match.group(2)) if match else None
        if match is None or hf is None:
            unloaded.append((tensor, f"not a tensor llama.cpp loads for architecture '{arch}'"))
            continue
        layer, leaf, kind = int(match.group(1)), match.group(2), match.group(3)
        if layer >= layers:
            unloaded.append((tensor, f"block {layer} is past block_count {layers}"))
            continue
        biased = leaf in _BIASED or (family.ffn_biases and leaf in _FFN_BIASED)
        if kind == "bias" and not biased:
            unloaded.append((tensor, f"llama.cpp loads no bias for '{leaf}' in architecture '{arch}'"))
            continue
        _check_shape(tensor, leaf, kind, config, where)
        if kind == "weight":
            present.setdefault(layer, set()).add(leaf)
        infos.extend(_infos(tensor, f"model.layers.{layer}.{hf}.{kind}", file))
    _check_required(family, table, present, by_name, layers, where)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and tokens.type == "ARRAY":  # llama.cpp sizes the embedding and head by the vocabulary
        for name in (f"{_EMBEDDING}.weight", f"{_OUTPUT}.weight"):
            sized = by_name.get(name)
            if sized is not None and sized.ne[-1] != tokens.count:
                raise GGUFTensorsError(f"{where}: tensor '{name}' has {sized.ne[-1]} rows but the vocabulary "
                                       f"(tokenizer.ggml.tokens) has {tokens.count} tokens; llama.cpp would refuse "
                                       f"to load this file")
    config["vocab_size"] = by_name[f"{_EMBEDDING}.weight"].ne[1]
    config["tie_word_embeddings"] = f"{_OUTPUT}.weight" not in by_name or family.tied_only
    notes = []
    if runtime_only:
        notes.append(f"{', '.join(runtime_only)}: loaded by llama.cpp (rope frequency factors derived from the "
                     f"config) with no Hugging Face weight to compare: not fingerprinted")
    if unloaded:
        why = "; ".join(f"{shown(t.name)}: {reason}" for t, reason in unloaded[:3])
        notes.append(f"why llama.cpp would not load {len(unloaded)} stored tensor(s): {why}"
                     + (f"; and {len(unloaded) - 3} more" if len(unloaded) > 3 else ""))
    metadata = {"GGUF.version": str(header.version), "GGUF.alignment": str(header.alignment),
                "GGUF.tensor_count": str(len(header.tensors)),
                **{shown(key): display(value) for key, value in meta.items()}}
    infos.sort(key=lambda t: natural_key(t.name))
    unexpected = tuple(TensorInfo(t.name, t.type_name, tuple(reversed(t.ne)), file, t.begin, t.end)
                       for t, _ in unloaded)
    return MappedModel(tensors=tuple(infos), config=config, metadata=metadata, notes=tuple(notes),
                       unexpected=unexpected)


def _check_required(family: Family, table: dict[str, str], present: dict[int, set[str]],
                    by_name: dict[str, GGUFTensor], layers: int, where: str) -> None:
    for name in (f"{_EMBEDDING}.weight", f"{_OUTPUT_NORM}.weight"):
        if name not in by_name:
            raise GGUFTensorsError(f"{where}: tensor '{name}' is missing; llama.cpp cannot load the model")
    required = list(family.required)
    if table is _MOE_LAYER:
        required = [r for r in required if r not in _GATED] + list(_EXPERTS)
    for layer in range(layers):
        leaves = present.get(layer, set())
        missing = [leaf for leaf in required if leaf not in leaves]
        if _QKV not in leaves:
            missing += [leaf for leaf in (_Q, _K, _V) if leaf not in leaves]
        elif leaves & {_Q, _K, _V}:
            raise GGUFTensorsError(f"{where}: block {layer} has both a fused attn_qkv and separate q/k/v tensors; "
                                   f"llama.cpp loads only one of them")
        if missing:
            raise GGUFTensorsError(f"{where}: tensor 'blk.{layer}.{missing[0]}.weight' is missing (block_count is "
                                   f"{layers}); llama.cpp cannot load the model")
