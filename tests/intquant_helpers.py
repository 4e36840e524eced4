"""GPTQ and AWQ checkpoints for tests, quantised in-process by round-to-nearest and packed from the formats'
definitions (written here from the formats, independent of tg_verify/artifact/intquant.py):

- GPTQ: qweight I32 [in/pack, out], word r holds rows r*pack + k at bits k*b.. (lowest first); qzeros I32
  [groups, out/pack] likewise along the output; scales [groups, out]; g_idx I32 [in]. v1 ("gptq") stores each zero
  point minus one, v2 ("gptq_v2") the zero point. W = s[g] * (q - z[g]).
- AWQ (GEMM): qweight I32 [in, out/8], word c holds columns 8c + AWQ_ORDER[k] at bits 4k..; qzeros I32
  [groups, out/8] likewise; scales [groups, out]; W = (q - z[g]) * s[g], g = i // group_size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fp8_helpers import Edit, projections
from safetensors.torch import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class Quantised:
    """One linear weight [out, in] quantised: integers q [in, out], zero points and scales [groups, out], the group
    of each input row, and the float values a runtime computes with ([out, in], in the scales' dtype)."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    values: torch.Tensor


def quantise(weight: torch.Tensor, bits: int, group_size: int, sym: bool, perm: torch.Tensor | None = None,
             min_zero: int = 0, dtype: torch.dtype = torch.float16) -> Quantised:
    """Round-to-nearest: the input rows in `perm` order (desc_act; None: in order) split into groups of
    `group_size` (-1: one group); per group and output an asymmetric (min..max) or symmetric (zero 2^(bits-1))
    grid. `min_zero` keeps zero points >= 1 where the v1 format cannot store 0."""
    out, inputs = weight.shape
    maxq = (1 << bits) - 1
    size = inputs if group_size == -1 else group_size
    order = torch.arange(inputs) if perm is None else perm
    g_idx = torch.empty(inputs, dtype=torch.long)
    g_idx[order] = torch.arange(inputs) // size
    groups = -(-inputs // size)
    w = weight.detach().to(torch.float32).t()  # [in, out]
    scales = torch.empty(groups, out, dtype=dtype)
    zeros = torch.empty(groups, out, dtype=torch.long)
    for g in range(groups):
        rows = w[g_idx == g]
        low, high = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if sym:
            bound = torch.maximum(low.abs(), high)
            scale = (2 * bound / maxq).clamp(min=1e-5)
            zero = torch.full((out,), (maxq + 1) // 2, dtype=torch.long)
        else:
            scale = ((high - low) / maxq).clamp(min=1e-5)
            zero = torch.round(-low / scale).to(torch.long).clamp(min_zero, maxq)
        scales[g], zeros[g] = scale.to(dtype), zero
    s, z = scales.to(torch.float32)[g_idx], zeros[g_idx]  # [in, out]
    q = (torch.round(w / s) + z).clamp(0, maxq).to(torch.long)
    values = (scales[g_idx] * (q - z).to(dtype)).t().contiguous()  # the product in the scales' dtype
    return Quantised(q, zeros, scales, g_idx, values)


def _int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns, as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, columns] fields -> I32 [rows*bits/32, columns]: row r*pack + k at bits k*bits of word r."""
    pack = 32 // bits
    words = torch.zeros(values.shape[0] // pack, values.shape[1], dtype=torch.long)
    for k in range(pack):
        words |= (values[k::pack].to(torch.long) & ((1 << bits) - 1)) << (bits * k)
    return _int32(words)


def pack_columns(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[rows, columns] fields -> I32 [rows, columns*bits/32]: column c*pack + order[k] at bits k*bits of word c."""
    pack = 32 // bits
    order = order or tuple(range(pack))
    words = torch.zeros(values.shape[0], values.shape[1] // pack, dtype=torch.long)
    for k in range(pack):
        words |= (values[:, order[k]::pack].to(torch.long) & ((1 << bits) - 1)) << (bits * k)
    return _int32(words)




def save_intquant(model: Any, directory: Path, method: str = "gptq", *, bits: int = 4, group_size: int = 16,
                  sym: bool = True, desc_act: bool = False, fmt: str = "gptq", g_idx: bool = True,
                  dtype: torch.dtype = torch.float16, edit: Edit | None = None
                  ) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save `model` with its decoder projections as a GPTQ (`fmt` "gptq" v1 or "gptq_v2") or AWQ GEMM checkpoint,
    config.json's quantization_config as each writer puts it; the rest as it is. Returns the directory and each
    quantised weight's values as the runtime computes them. `edit(state, config)` runs before writing."""
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = model.config.to_dict()
    generator = torch.Generator().manual_seed(7)
    for name, value in projections(model, state):
        stem = name[: -len("weight")]
        perm = torch.randperm(value.shape[1], generator=generator) if desc_act else None
        v1 = method == "gptq" and fmt == "gptq"
        result = quantise(value, bits, group_size, sym if method == "gptq" else False, perm,
                          min_zero=1 if v1 else 0, dtype=dtype)
        expected[name] = result.values
        if method == "gptq":
            state[stem + "qweight"] = pack_rows(result.q, bits)
            state[stem + "qzeros"] = pack_columns(result.zeros - (1 if v1 else 0), bits)
            if g_idx:
                state[stem + "g_idx"] = result.g_idx.to(torch.int32)
        else:
            state[stem + "qweight"] = pack_columns(result.q, bits, AWQ_ORDER)
            state[stem + "qzeros"] = pack_columns(result.zeros, bits, AWQ_ORDER)
        state[stem + "scales"] = result.scales
    if method == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                         "desc_act": desc_act, "sym": sym, "checkpoint_format": fmt,
                                         "damp_percent": 0.01, "true_sequential": True}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                         "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    if edit is not None:
        edit(state, config)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory, expected
