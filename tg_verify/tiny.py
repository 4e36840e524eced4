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
    """A transformers config for a tiny model of `arch` ('llama', 'qwen2', 'gemma', 'phi3', 'mistral')."""
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig", "phi3": "Phi3Config",
               "mistral": "MistralConfig"}
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {', '.join(classes)}")
    params: dict[str, Any] = dict(_SIZES[size])
    params.update(vocab_size=vocab_size, max_position_embeddings=256)
    if arch == "gemma":
        params["head_dim"] = params["hidden_size"] // params["num_attention_heads"]
    if arch == "phi3":
        params.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    params.update(overrides)
    return getattr(transformers, classes[arch])(**params)


def build_model(arch: str, seed: int = 0, size: str = "small", **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny causal LM, deterministic for a given seed."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, size, **overrides))
    model.eval()
    return model


def save_model(model: torch.nn.Module, directory: str | os.PathLike[str], layout: SaveLayout = "single",
               shards: int = 3) -> Path:
    """Save a model's weights (and config.json) in one of the layouts users ship.

    'single' writes model.safetensors; 'indexed-shards' and 'shards' split tensors over `shards`
    files named model-0000i-of-0000N.safetensors, with or without model.safetensors.index.json.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    model.config.to_json_file(directory / "config.json")
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
