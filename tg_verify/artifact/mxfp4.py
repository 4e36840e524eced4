"""MXFP4 experts (GPT-OSS as OpenAI publishes it): read as the float tensors the runtime dequantises them into.

A checkpoint whose config.json says `quantization_config: {quant_method: "mxfp4"}` stores each block's experts as
two pairs of U8 tensors instead of the parameters `mlp.experts.gate_up_proj` [E, d, 2f] and `mlp.experts.down_proj`
[E, f, d] (both [experts, in, out]):

    <param>_blocks  [E, out, in/32, 16]  two FP4 (e2m1) values per byte, the low nibble first
    <param>_scales  [E, out, in/32]      one E8M0 exponent (bias 127) per 32 values

transformers turns each pair into its parameter with `convert_moe_packed_tensors` (integrations/mxfp4.py, pure
torch, CPU): value = FP4[nibble] * 2^(scale - 127), transposed to [E, in, out]. `pack` pairs the stored tensors
once, at resolve time, validates each pair (PackedTensorError: a missing partner, a dtype or shape that does not
fit its partner or the config; both forms of one parameter stored: AmbiguousTensorError) and puts a PackedTensor in
its place: a TensorInfo of dtype MXFP4 with the parameter's name and shape, which the grammar, the fingerprint, the
sketch and the block evidence read like any other tensor. The readers (artifact/reader.py) hand it out through
`dequantise`, in the dtype the runtime dequantises into (bfloat16, which holds every MXFP4 value exactly; float16
where config.json asks for it). The stored files stay bound by digest like any other.

Only `dequantise` imports torch (and transformers): resolving stays free of both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tg_verify.artifact.errors import AmbiguousTensorError, PackedTensorError, shown
from tg_verify.artifact.model import TensorInfo

if TYPE_CHECKING:
    import torch

DTYPE = "MXFP4"  # the dtype a PackedTensor reports (no safetensors header can declare it)
MODEL_TYPES: tuple[str, ...] = ("gpt_oss",)  # the architectures transformers' MXFP4 quantiser replaces experts of
QUANT_METHOD = "mxfp4"
BLOCK_VALUES = 32  # values per scale
BLOCK_BYTES = 16  # bytes per block of 32 values
STORED_DTYPE = "U8"
# GptOssConfig's defaults: a config.json that leaves a size out gets these from transformers
_DEFAULTS: dict[str, int] = {"hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 128}
_PAIR = re.compile(r"^(?P<param>.+\.experts\.(?P<proj>gate_up_proj|down_proj))_(?P<kind>blocks|scales)$")


@dataclass(frozen=True)
class PackedTensor(TensorInfo):
    """The float parameter an MXFP4 pair loads as: dtype MXFP4, the parameter's name and shape [E, in, out]. Its
    file and byte range are the blocks' (`nbytes` counts both stored tensors)."""

    blocks: TensorInfo
    scales: TensorInfo
    values: str  # the dtype the runtime dequantises into: "BF16" (exact for every MXFP4 value) or "F16"

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + self.scales.nbytes

    @property
    def stored(self) -> tuple[TensorInfo, TensorInfo]:
        return self.blocks, self.scales


def quantised(config: Mapping[str, Any] | None) -> bool:
    """Whether config.json says this model's experts are stored in MXFP4 (for an architecture tg-verify reads so)."""
    quantization = (config or {}).get("quantization_config")
    return ((config or {}).get("model_type") in MODEL_TYPES and isinstance(quantization, dict)
            and quantization.get("quant_method") == QUANT_METHOD)


def pack(tensors: Sequence[TensorInfo], config: Mapping[str, Any] | None, root: Path) -> list[TensorInfo]:
    """`tensors` with each MXFP4 pair replaced by its PackedTensor (validated); unchanged unless `quantised`."""
    if not quantised(config):
        return list(tensors)
    assert config is not None
    pairs: dict[str, dict[str, TensorInfo]] = {}
    out: list[TensorInfo] = []
    for info in tensors:
        match = _PAIR.match(info.name)
        if match is None:
            out.append(info)
        else:
            pairs.setdefault(match["param"], {})[match["kind"]] = info
    plain = {info.name: info for info in out}
    dtype = config.get("dtype", config.get("torch_dtype"))
    values = "F16" if dtype == "float16" else "BF16"
    for param, pair in sorted(pairs.items()):
        if param in plain:
            stored = next(iter(pair.values()))
            raise AmbiguousTensorError(
                f"{shown(root / stored.file)}: tensor '{shown(stored.name)}' is MXFP4 storage of '{shown(param)}', "
                f"which {shown(plain[param].file)} also stores as a float tensor; which one a runtime loads is "
                f"unknown, so neither can be verified (remove one)", file=str(root / stored.file))
        out.append(_packed(param, pair, config, root, values))
    return out


def stored(tensors: Iterable[TensorInfo]) -> tuple[TensorInfo, ...]:
    """The stored tensors behind `tensors`: each PackedTensor as its blocks and scales (e.g. to list what is not
    loaded under the names it is stored as)."""
    return tuple(part for info in tensors
                 for part in (info.stored if isinstance(info, PackedTensor) else (info,)))


def _size(config: Mapping[str, Any], key: str, where: str, file: str) -> int:
    value = config.get(key, _DEFAULTS[key])
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PackedTensorError(f"{where}: config.json's {key} is {shown(repr(value), 40)}, not a positive integer, so "
                                f"the shape of its MXFP4 experts cannot be checked", file=file)
    return value


def _packed(param: str, pair: Mapping[str, TensorInfo], config: Mapping[str, Any], root: Path,
            values: str) -> PackedTensor:
    """One pair, validated against each other and the config, as its PackedTensor."""
    blocks, scales = pair.get("blocks"), pair.get("scales")
    if blocks is None or scales is None:
        present = blocks or scales
        assert present is not None
        missing = f"{param}_{'scales' if scales is None else 'blocks'}"
        raise PackedTensorError(
            f"{shown(root / present.file)}: MXFP4 tensor '{shown(present.name)}' has no partner '{shown(missing)}': "
            f"the values are the pair's together, so one alone has none a runtime would load",
            file=str(root / present.file))
    for info in (blocks, scales):
        if info.dtype != STORED_DTYPE:
            raise PackedTensorError(f"{shown(root / info.file)}: MXFP4 tensor '{shown(info.name)}' has dtype "
                                    f"{info.dtype}, expected {STORED_DTYPE}", file=str(root / info.file))
    where, file = shown(root / blocks.file), str(root / blocks.file)
    if len(blocks.shape) != 4 or blocks.shape[3] != BLOCK_BYTES:
        raise PackedTensorError(f"{where}: MXFP4 tensor '{shown(blocks.name)}' has shape {list(blocks.shape)}, "
                                f"expected [experts, rows, groups, {BLOCK_BYTES}]", file=file)
    if scales.shape != blocks.shape[:3]:
        raise PackedTensorError(
            f"{shown(root / scales.file)}: MXFP4 tensor '{shown(scales.name)}' has shape {list(scales.shape)}, "
            f"expected {list(blocks.shape[:3])} (one scale per block of '{shown(blocks.name)}')",
            file=str(root / scales.file))
    experts = _size(config, "num_local_experts", where, file)
    width, inner = (_size(config, key, where, file) for key in ("hidden_size", "intermediate_size"))
    rows, columns = (2 * inner, width) if param.endswith("gate_up_proj") else (width, inner)  # out, in
    if columns % BLOCK_VALUES or blocks.shape[:3] != (experts, rows, columns // BLOCK_VALUES):
        raise PackedTensorError(
            f"{where}: MXFP4 tensor '{shown(blocks.name)}' has shape {list(blocks.shape)}, but config.json's sizes "
            f"make '{shown(param)}' [{experts}, {columns}, {rows}] (experts, in, out), stored as "
            f"[{experts}, {rows}, {columns / BLOCK_VALUES:g}, {BLOCK_BYTES}]", file=file)
    return PackedTensor(param, DTYPE, (experts, columns, rows), blocks.file, blocks.begin, blocks.end,
                        blocks=blocks, scales=scales, values=values)


def dequantise(raw: Callable[[TensorInfo], torch.Tensor], info: PackedTensor, where: str) -> torch.Tensor:
    """The parameter's values as the runtime dequantises them (transformers' convert_moe_packed_tensors, one expert
    at a time: peak memory is the result plus one expert's scratch). `raw` reads a stored tensor; `where` is the
    file's display path for messages."""
    import torch

    from tg_verify.errors import InternalError, UnsupportedDtypeError

    try:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except ImportError:
        raise UnsupportedDtypeError(f"{where}: tensor '{shown(info.name)}' is stored in MXFP4 "
                                    f"('{shown(info.blocks.name)}', '{shown(info.scales.name)}'), which tg-verify "
                                    f"dequantises with transformers >= 4.55; the installed one cannot", file=where
                                    ) from None
    dtype = torch.float16 if info.values == "F16" else torch.bfloat16
    out = torch.empty(info.shape, dtype=dtype)
    if info.numel == 0:
        return out
    blocks, scales = raw(info.blocks), raw(info.scales)
    for expert in range(info.shape[0]):
        one = convert_moe_packed_tensors(blocks[expert:expert + 1], scales[expert:expert + 1], dtype=dtype)
        if tuple(one.shape) != (1, *info.shape[1:]):
            raise InternalError(f"transformers' MXFP4 dequantiser gave {list(one.shape)} for an expert of "
                                f"'{info.name}', not {[1, *info.shape[1:]]}: its layout changed")
        out[expert] = one[0]
    return out
