"""FP8 checkpoints for tests, quantised in-process the way published ones are: each linear weight of the decoder
blocks stored as float8 (e4m3) with a scale per block (amax / 448) or per output channel, the rest left as it is."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantise_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 scale [ceil(out/bo), ceil(in/bi)]) with W ≈ values * scale over each block; edge
    blocks are partial. A block of zeros gets scale 1 (as transformers' Fp8Quantize does)."""
    rows, cols = weight.shape
    bo, bi = block
    grid = (math.ceil(rows / bo), math.ceil(cols / bi))
    padded = torch.zeros(grid[0] * bo, grid[1] * bi)
    padded[:rows, :cols] = weight.to(torch.float32)
    amax = padded.reshape(grid[0], bo, grid[1], bi).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    spread = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
    values = (weight.to(torch.float32) / spread).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale


def quantise_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 scale [out, 1]): one scale per output channel (compressed-tensors, fbgemm)."""
    values, scale = quantise_blocks(weight, (1, weight.shape[1]))
    return values, scale.reshape(-1, 1)


def dequantised(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The formula: values * scale, the scale broadcast over each block (edge blocks partial), in float32."""
    rows, cols = values.shape
    grid = scale.reshape(math.ceil(rows / block[0]), math.ceil(cols / block[1])).to(torch.float32)
    spread = grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return values.to(torch.float32) * spread


def quantised(name: str) -> bool:
    """The weights an FP8 checkpoint stores in float8: the decoder blocks' linear projections."""
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS


Edit = Callable[[dict[str, torch.Tensor], dict[str, Any]], None]


def projections(model: Any, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The decoder projections of `model` a quantised checkpoint stores packed, as (name, a contiguous copy); every
    other tensor is put in `state` as it is (a tied head is not stored)."""
    for name, value in model.state_dict().items():
        value = value.detach().contiguous().clone()
        if getattr(model.config, "tie_word_embeddings", False) and name == "lm_head.weight":
            continue
        if quantised(name):
            yield name, value
        else:
            state[name] = value


def save_fp8(model: Any, directory: Path, method: str = "fp8", block: tuple[int, int] | None = (16, 16),
             scale_dtype: torch.dtype = torch.float32, edit: Edit | None = None) -> Path:
    """Save `model` as an FP8 checkpoint of `method` ("fp8": block-wise `weight_scale_inv`, per-tensor with block
    None; "compressed-tensors": per-channel `weight_scale` and an `input_scale`; "fbgemm_fp8": per-channel
    `weight_scale`), with config.json's quantization_config as each format's writer puts it. `edit(state, config)`
    changes either before they are written (the hostile cases)."""
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = model.config.to_dict()
    for name, value in projections(model, state):
        stem = name[: -len("weight")]
        if method == "fp8":
            values, scale = quantise_blocks(value, block if block is not None else tuple(value.shape))
            state[name] = values
            state[stem + "weight_scale_inv"] = (scale if block is not None else scale.reshape(())).to(scale_dtype)
        else:
            values, scale = quantise_channels(value)
            state[name] = values
            state[stem + "weight_scale"] = scale.to(scale_dtype)
            if method == "compressed-tensors":
                state[stem + "input_scale"] = torch.tensor([0.05], dtype=scale_dtype)
    if method == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": list(block) if block is not None else None}
    elif method == "compressed-tensors":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                      "dynamic": False}}}}
    else:
        config["quantization_config"] = {"quant_method": method, "activation_scale_ub": 1200.0,
                                         "modules_to_not_convert": ["lm_head"]}
    if edit is not None:
        edit(state, config)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
