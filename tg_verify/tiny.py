"""Tiny transformer models built in-process from transformers configs (no network).

Used by the embedded demo, the test fixtures and the bench zoo, so all three agree on what a
"tiny llama" is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gemma", "phi3", "mistral")
SaveLayout = Literal["single", "indexed-shards", "shards"]

_SIZES: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    "medium": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 6,
               "num_key_value_heads": 2},
}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore: tiny models gain nothing from threads, and on a busy
    machine each extra thread's barrier waits cost ~10x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_config(arch: str, size: str = "small", vocab_size: int = 512, **overrides: Any) -> Any:
    """A transformers config for a tiny model of `arch`: one of ARCHITECTURES, or 'gemma2', 'gemma3_text' or 'qwen3'
    (the fixtures' zoo keeps to the first five; the others are there for what only their layout has)."""
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig", "phi3": "Phi3Config",
               "mistral": "MistralConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
               "qwen3": "Qwen3Config"}
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {', '.join(classes)}")
    params: dict[str, Any] = dict(_SIZES[size])
    params.update(vocab_size=vocab_size, max_position_embeddings=256)
    if arch.startswith("gemma") or arch == "qwen3":
        params["head_dim"] = params["hidden_size"] // params["num_attention_heads"]
    if arch == "phi3":
        params.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    params.update(overrides)
    return getattr(transformers, classes[arch])(**params)


def build_model(arch: str, seed: int = 0, size: str = "small", **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny causal LM, deterministic for a given seed."""
    import transformers

    torch.manual_seed(seed)
    # transformers leaves from_config unannotated (its result is a PreTrainedModel, a torch Module)
    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        tiny_config(arch, size, **overrides))
    model.eval()
    return model


WRAPPERS: tuple[str, ...] = ("gemma3", "llava", "qwen2_vl")


def build_wrapper(kind: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny multimodal model (`kind` one of WRAPPERS): a small language model, a vision
    tower and a projector, as Gemma 3, LLaVA and Qwen2-VL ship them."""
    import transformers

    text = {**_SIZES["small"], "vocab_size": 512, "max_position_embeddings": 256}
    config: Any
    if kind == "gemma3":
        config = transformers.Gemma3Config(
            text_config={**text, "head_dim": 16}, mm_tokens_per_image=4,
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                           "num_attention_heads": 2, "image_size": 28, "patch_size": 14})
    elif kind == "llava":
        config = transformers.LlavaConfig(
            text_config={**text, "model_type": "llama"}, image_token_index=3,
            vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                           "projection_dim": 32})
    elif kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config={**text, "bos_token_id": 0, "eos_token_id": 1}, image_token_id=3, video_token_id=4,
            vision_config={"depth": 3, "embed_dim": 32, "hidden_size": 64, "num_heads": 2})
    else:
        raise ValueError(f"unknown tiny wrapper {kind!r}; expected one of {', '.join(WRAPPERS)}")
    torch.manual_seed(seed)
    # transformers leaves from_config unannotated (its result is a PreTrainedModel, a torch Module)
    model: torch.nn.Module = transformers.AutoModelForImageTextToText.from_config(config)  # type: ignore[no-untyped-call]
    model.eval()
    return model


def build_moe(seed: int = 0, experts: int = 4) -> torch.nn.Module:
    """A randomly initialised tiny Mixtral (transformers >= 5 holds each block's experts fused in 3-D tensors)."""
    import transformers

    sizes: dict[str, Any] = dict(_SIZES["small"])
    config = transformers.MixtralConfig(**sizes, vocab_size=512, max_position_embeddings=256,
                                        num_local_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(seed)
    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model.eval()


def save_published_moe(model: torch.nn.Module, directory: str | os.PathLike[str],
                       order: list[int] | None = None) -> Path:
    """A tiny Mixtral (build_moe) saved as published checkpoints store it (each expert's w1/w2/w3 a tensor of its
    own, `block_sparse_moe.gate` the router), its experts renumbered by `order` (router rows with them: the same
    model). Mixtral-8x7B and its fine-tunes ship them so; save_model writes the 3-D form transformers >= 5 holds."""
    from safetensors.torch import save_file

    config: Any = model.config
    order = list(range(config.num_local_experts)) if order is None else order
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        prefix, _, rest = name.partition("mlp.")
        if rest == "experts.gate_up_proj":  # [experts, 2 x intermediate, hidden]: gate rows, then up rows
            half = value.shape[1] // 2
            for new, old in enumerate(order):
                state[f"{prefix}block_sparse_moe.experts.{new}.w1.weight"] = value[old, :half].clone()
                state[f"{prefix}block_sparse_moe.experts.{new}.w3.weight"] = value[old, half:].clone()
        elif rest == "experts.down_proj":
            for new, old in enumerate(order):
                state[f"{prefix}block_sparse_moe.experts.{new}.w2.weight"] = value[old].clone()
        elif rest == "gate.weight":
            state[f"{prefix}block_sparse_moe.gate.weight"] = value[order].clone()
        else:
            state[name] = value.clone()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.to_json_file(directory / "config.json")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def build_gpt_oss(seed: int = 0, experts: int = 4) -> torch.nn.Module:
    """A randomly initialised tiny GPT-OSS: each block's experts in two 3-D parameters, [experts, in, out], gate and
    up interleaved in gate_up_proj; attention with biases and sinks; sliding and full attention layers."""
    import transformers

    config = transformers.AutoConfig.for_model(
        "gpt_oss", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=experts, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(seed)
    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model.eval()


# FP4 (e2m1) values by nibble, as the MXFP4 format defines them (OCP Microscaling spec): sign bit 3
FP4_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_pack(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GPT-OSS experts parameter [experts, in, out] as OpenAI's checkpoints store it: (blocks [experts, out, in/32,
    16] U8, two FP4 values a byte, the low nibble first; scales [experts, out, in/32] U8, E8M0 exponents with bias
    127). Each block of 32 values gets the smallest power-of-two scale under which it fits FP4's range (±6) and each
    value its nearest FP4 value."""
    weight = param.detach().transpose(1, 2).to(torch.float32)
    experts, rows, columns = weight.shape
    groups = weight.reshape(experts, rows, columns // 32, 32)
    peak = groups.abs().amax(dim=-1).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    nibbles = (scaled[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(dim=-1).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def save_mxfp4(model: torch.nn.Module, directory: str | os.PathLike[str]) -> Path:
    """A tiny GPT-OSS (build_gpt_oss) saved as openai/gpt-oss-20b is: every experts parameter as its MXFP4
    `_blocks` + `_scales` pair (mxfp4_pack), config.json's quantization_config saying so."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[name + "_blocks"], state[name + "_scales"] = mxfp4_pack(value)
        else:
            state[name] = value.detach().contiguous().clone()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: Any = model.config
    document = json.loads(config.to_json_string())
    document["architectures"] = ["GptOssForCausalLM"]
    document["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(document, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def placeholder_tokens(vocab: int) -> list[str]:
    """The tiny models' vocabulary: one placeholder text per id, the same in vocab.json and in GGUF metadata."""
    return [f"<t{i}>" for i in range(vocab)]


def save_model(model: torch.nn.Module, directory: str | os.PathLike[str], layout: SaveLayout = "single",
               shards: int = 3, vocabulary: bool = False) -> Path:
    """Save a model's weights (and config.json) in one of the layouts users ship.

    'single' writes model.safetensors; 'indexed-shards' and 'shards' split tensors over `shards`
    files named model-0000i-of-0000N.safetensors, with or without model.safetensors.index.json.
    With `vocabulary`, a vocab.json of placeholder tokens goes beside them (as a model ships its tokenizer,
    and as save_gguf writes the same tokens into GGUF metadata).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    config: Any = model.config  # a transformers PretrainedConfig (torch's Module typing sees a submodule)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config.to_json_file(directory / "config.json")
    if vocabulary:
        tokens = placeholder_tokens(int(config.vocab_size))
        (directory / "vocab.json").write_text(json.dumps({text: i for i, text in enumerate(tokens)}))
    if layout == "single":
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in group}, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
    if layout == "indexed-shards":
        total = sum(v.numel() * v.element_size() for v in state.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    return directory


def save_lora_adapter(base: torch.nn.Module, directory: str | os.PathLike[str], *,
                      targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 4, alpha: int = 8,
                      seed: int = 1, scale: float = 0.02, base_name: str | None = None,
                      merged_dir: str | os.PathLike[str] | None = None) -> Path:
    """Save a peft LoRA adapter of `base` whose A and B are seeded random (a trained-looking update).

    `base` is not modified. `base_name` overrides adapter_config's base_model_name_or_path; with
    `merged_dir`, peft's own `merge_and_unload()` of the same adapter is saved there as full weights.
    """
    import copy

    import peft

    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha,
                                                                        target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    directory = Path(directory)
    wrapped.save_pretrained(str(directory), save_embedding_layers=False)
    if base_name is not None:
        config_path = directory / "adapter_config.json"
        document = json.loads(config_path.read_text())
        document["base_model_name_or_path"] = base_name
        config_path.write_text(json.dumps(document))
    if merged_dir is not None:
        save_model(wrapped.merge_and_unload(), merged_dir)
    return directory


# HF model_type -> llama.cpp architecture, as llama.cpp's convert_hf_to_gguf.py writes it (Mistral and
# Mixtral are "llama" there).
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                                      "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def _converter_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to Q and K for its llama-style (NORM) rope."""
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def save_gguf(model: torch.nn.Module, path: str | os.PathLike[str], qtype: str = "F32") -> Path:
    """Write a dense model to one GGUF file as llama.cpp's converter plus llama-quantize would, in-process.

    Names through the gguf package's own HF -> GGUF table; Q/K permuted for llama-arch models; Gemma norms
    stored as 1 + w; 1-D tensors (norms, biases) stay F32; 2-D ones are stored as `qtype` ("F32", "F16",
    "BF16" or a type gguf.quants can quantise: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 ...), falling back to F16 for
    rows that are not a whole number of blocks, as llama-quantize does. A vocabulary of placeholder tokens
    goes into the metadata.
    """
    import gguf
    import numpy as np

    config: Any = model.config
    model_type = str(config.model_type)
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"save_gguf: no llama.cpp architecture for model_type {model_type!r}")
    arch = GGUF_ARCHITECTURES[model_type]
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    target = gguf.GGMLQuantizationType[qtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{model_type}")
    writer.add_block_count(layers)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(getattr(config, "rms_norm_eps", 1e-6)))
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_token_list(placeholder_tokens(int(config.vocab_size)))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"save_gguf: no GGUF name for {hf_name!r}")
        weight = value.detach().to(torch.float32)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            weight = _converter_permute(weight, heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            weight = _converter_permute(weight, kv_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            weight = weight + 1
        array = weight.contiguous().numpy()
        block = gguf.GGML_QUANT_SIZES[target][0]
        if array.ndim < 2 or target == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        elif target == gguf.GGMLQuantizationType.F16 or array.shape[-1] % block:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
