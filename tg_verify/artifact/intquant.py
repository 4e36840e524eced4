"""GPTQ and AWQ checkpoints: each linear layer's packed integers read as the float weight the runtime computes with.

A checkpoint whose config.json says `quantization_config: {quant_method: "gptq" | "awq"}` stores no `X.weight` for
its quantised linear layers, but (`in`, `out` the layer's input and output sizes, `pack` = 32 / bits):

    GPTQ  X.qweight I32 [in/pack, out]   packed along the input dimension, lowest bits first
          X.qzeros  I32 [groups, out/pack]  packed along the output dimension, lowest bits first
          X.scales  F16/BF16/F32 [groups, out]
          X.g_idx   I32 [in]             the group of each input row (optional; absent: i // group_size)
    AWQ   X.qweight I32 [in, out/8]      4-bit, packed along the output dimension in AWQ's interleaved order:
          X.qzeros  I32 [groups, out/8]  nibble k of a word holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][k]
          X.scales  F16/BF16/F32 [groups, out]

and the runtime computes with W[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g the row's group; GPTQ's v1 format
(`checkpoint_format: "gptq"`, the default) stores every zero point minus one (z = stored + 1), its v2 format
(`"gptq_v2"`) and AWQ store z itself. `pack` validates every layer's parts against each other and the config from
the headers alone (PackedTensorError; QuantizationConfigError for a config it does not read; both forms of one
weight stored: AmbiguousTensorError) and puts an IntPackedTensor in their place: a TensorInfo named `X.weight`, shape
[out, in], the scales' dtype, which the grammar, the fingerprint, the sketch and the block evidence read like any
other weight. The sizes come from the stored shapes, never from config.json. The reader (artifact/reader.py) hands
it out through `dequantise`, vectorised, one tensor at a time; g_idx is bounds-checked there (PackedValueError).
The stored files stay bound by digest; the parts are listed as the quantisation's companions, never weights.

Only `dequantise` needs torch: resolving stays free of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tg_verify.artifact.errors import (
    AmbiguousTensorError,
    PackedTensorError,
    PackedValueError,
    QuantizationConfigError,
    shown,
)
from tg_verify.artifact.model import Quantisation, ScaledWeight, TensorInfo

if TYPE_CHECKING:
    import torch

METHODS = ("gptq", "awq")
GPTQ_BITS = (4, 8)  # 2 and 3 exist (3 packs across words); they are refused
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is added to a stored zero point
AWQ_FORMATS = ("gemm",)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds column 8c + AWQ_ORDER[k]
AWQ_COLUMNS = tuple(AWQ_ORDER.index(j) for j in range(8))  # column 8c + j lies in nibble AWQ_COLUMNS[j]
PACKED_DTYPE = "I32"
SCALE_DTYPES = ("F16", "BF16", "F32")
_PART = re.compile(r"^(?P<stem>.+\.)(?P<part>qweight|qzeros|scales|g_idx)$")


@dataclass(frozen=True)
class IntPackedTensor(TensorInfo):
    """The float weight `X.weight` [out, in] a GPTQ or AWQ layer loads as, in its scales' dtype. Its file and byte
    range are the qweight's (`nbytes` counts every stored part)."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # input rows per group (the whole input for one group)
    zero_offset: int  # added to each stored zero point: 1 in GPTQ's v1 format, else 0
    act_order: bool  # GPTQ desc_act: g_idx may assign rows to groups in any order
    qweight: TensorInfo
    qzeros: TensorInfo
    scales: TensorInfo
    g_idx: TensorInfo | None

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.stored)

    @property
    def stored(self) -> tuple[TensorInfo, ...]:
        return tuple(p for p in (self.qweight, self.qzeros, self.scales, self.g_idx) if p is not None)


@dataclass(frozen=True)
class _Scheme:
    method: str
    bits: int
    group_size: int  # -1: one group
    zero_offset: int
    act_order: bool


def _config_error(where: str, file: str, text: str) -> QuantizationConfigError:
    return QuantizationConfigError(f"{where}: quantization_config{text}", file=file)


def _integer(quant: Mapping[str, Any], keys: tuple[str, ...], default: int | None, where: str, file: str) -> int:
    """The first of `keys` present (legacy spellings after the current one), as an integer."""
    key = next((k for k in keys if quant.get(k) is not None), None)
    value = quant[key] if key is not None else default
    if not isinstance(value, int) or isinstance(value, bool):
        raise _config_error(where, file, f".{key or keys[0]} is {shown(repr(value), 40)}, not an integer")
    return value


def _flag(quant: Mapping[str, Any], key: str, default: bool, where: str, file: str) -> bool:
    value = quant.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _config_error(where, file, f".{key} is {shown(repr(value), 40)}, not true or false")
    return value


def _text(quant: Mapping[str, Any], keys: tuple[str, ...], default: str, where: str, file: str) -> str:
    key = next((k for k in keys if quant.get(k) is not None), None)
    value = quant[key] if key is not None else default
    if not isinstance(value, str):
        raise _config_error(where, file, f".{key} is {shown(repr(value), 40)}, not a name")
    return value.lower()


def _scheme(quant: Mapping[str, Any], method: str, where: str, file: str) -> _Scheme:
    """The layout config.json's quantization_config declares, checked; QuantizationConfigError otherwise."""
    if method == "gptq":
        bits = _integer(quant, ("bits",), None, where, file)
        if bits not in GPTQ_BITS:
            raise _config_error(where, file, f".bits is {bits}; tg-verify dequantises GPTQ weights of "
                                             f"{' or '.join(map(str, GPTQ_BITS))} bits only")
        fmt = _text(quant, ("checkpoint_format", "format"), "gptq", where, file)  # transformers' precedence
        if fmt not in GPTQ_FORMATS:
            raise _config_error(where, file, f".checkpoint_format {shown(repr(fmt), 40)} is not one tg-verify reads "
                                             f"({', '.join(GPTQ_FORMATS)})")
        dynamic = quant.get("dynamic")
        if dynamic not in (None, {}):
            raise _config_error(where, file, ".dynamic sets bits or group sizes per module, which tg-verify does not "
                                             "read (each layer's layout would be a guess)")
        offset, act_order = GPTQ_FORMATS[fmt], _flag(quant, "desc_act", False, where, file)
    else:
        bits = _integer(quant, ("bits", "w_bit"), 4, where, file)
        if bits != 4:
            raise _config_error(where, file, f".bits is {bits}; AWQ weights are 4-bit")
        fmt = _text(quant, ("version", "format"), "gemm", where, file)  # transformers' precedence
        backend = quant.get("backend")
        if fmt not in AWQ_FORMATS or backend == "llm-awq":
            shownfmt = "llm-awq" if backend == "llm-awq" else fmt
            raise _config_error(where, file, f" AWQ format {shown(repr(shownfmt), 40)} is not one tg-verify reads "
                                             f"({', '.join(AWQ_FORMATS)}: GEMV and llm-awq pack differently)")
        if _flag(quant, "zero_point", True, where, file) is not True:
            raise _config_error(where, file, ".zero_point is false: tg-verify reads AWQ weights with zero points "
                                             "only (what a GEMM kernel makes of the others is not determined)")
        offset, act_order = 0, False
    group = _integer(quant, ("group_size", "q_group_size"), 128, where, file)
    if group != -1 and group <= 0:
        raise _config_error(where, file, f".group_size is {group}, not a positive integer or -1")
    return _Scheme(method, bits, group, offset, act_order)


def method_of(config: Mapping[str, Any] | None) -> str | None:
    """"gptq" or "awq" when config.json's quantization_config names one, else None."""
    quant = (config or {}).get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return method if isinstance(method, str) and method in METHODS else None


def pack(tensors: Sequence[TensorInfo], config: Mapping[str, Any] | None, root: Path) -> list[TensorInfo]:
    """`tensors` with each GPTQ/AWQ layer's parts replaced by its IntPackedTensor (validated); unchanged unless
    config.json's quantization_config names one of METHODS."""
    method = method_of(config)
    if method is None:
        return list(tensors)
    assert config is not None
    layers: dict[str, dict[str, TensorInfo]] = {}
    out: list[TensorInfo] = []
    for info in tensors:
        match = _PART.match(info.name)
        if match is None:
            out.append(info)
        else:
            layers.setdefault(match["stem"], {})[match["part"]] = info
    if not layers:
        return out  # nothing stored in this method's parts (float8 weights under it are fp8.plan's to refuse)
    config_path = root / "config.json"
    scheme = _scheme(config["quantization_config"], method, shown(config_path), str(config_path))
    plain = {info.name: info for info in out}
    for stem, parts in sorted(layers.items()):
        name = stem + "weight"
        if "qweight" in parts and name in plain:
            stored = parts["qweight"]
            raise AmbiguousTensorError(
                f"{shown(root / stored.file)}: tensor '{shown(stored.name)}' is {method.upper()} storage of "
                f"'{shown(name)}', which {shown(plain[name].file)} also stores as a float tensor; which one a "
                f"runtime loads is unknown, so neither can be verified (remove one)", file=str(root / stored.file))
        out.append(_layer(name, parts, scheme, root))
    return out


def stored(tensors: Iterable[TensorInfo]) -> tuple[TensorInfo, ...]:
    """The stored tensors behind `tensors`: each IntPackedTensor as its parts."""
    return tuple(part for info in tensors
                 for part in (info.stored if isinstance(info, IntPackedTensor) else (info,)))


def quantisation(loaded: Iterable[TensorInfo]) -> Quantisation | None:
    """The loaded weights' GPTQ/AWQ layout as the artifact's Quantisation (None when there is none): each weight
    scaled by its `scales`, its parts the companions (bound by digest, never weights)."""
    packed = [info for info in loaded if isinstance(info, IntPackedTensor)]
    if not packed:
        return None
    scaled = {info.name: ScaledWeight(info.scales, (1, info.group_size), info.method) for info in packed}
    return Quantisation(packed[0].method, scaled, stored(packed))


def _layer(name: str, parts: Mapping[str, TensorInfo], scheme: _Scheme, root: Path) -> IntPackedTensor:
    """One layer's parts, validated against each other and the config, as its IntPackedTensor."""
    qweight = parts.get("qweight")
    if qweight is None:
        orphan = next(iter(parts.values()))
        raise PackedTensorError(
            f"{shown(root / orphan.file)}: tensor '{shown(orphan.name)}' is named as a {scheme.method.upper()} part, "
            f"but no '{shown(name[:-len('weight')] + 'qweight')}' is stored for it to belong to; a runtime's use of it "
            f"cannot be verified", file=str(root / orphan.file))
    where, file = shown(root / qweight.file), str(root / qweight.file)
    label = scheme.method.upper()
    for part in ("qzeros", "scales"):
        if part not in parts:
            raise PackedTensorError(
                f"{where}: {label} tensor '{shown(qweight.name)}' has no '{shown(name[:-len('weight')] + part)}': "
                f"the weight is the parts' together, so it has no value a runtime would load", file=file)
    qzeros, scales, g_idx = parts["qzeros"], parts["scales"], parts.get("g_idx")
    if g_idx is not None and scheme.method == "awq":
        raise PackedTensorError(f"{shown(root / g_idx.file)}: tensor '{shown(g_idx.name)}' is a GPTQ group index, "
                                f"which an AWQ layer has no use for", file=str(root / g_idx.file))
    for info, wanted in ((qweight, (PACKED_DTYPE,)), (qzeros, (PACKED_DTYPE,)), (scales, SCALE_DTYPES),
                         (g_idx, (PACKED_DTYPE,))):
        if info is not None and (info.dtype not in wanted or len(info.shape) != (1 if info is g_idx else 2)):
            raise PackedTensorError(
                f"{shown(root / info.file)}: {label} tensor '{shown(info.name)}' has dtype {info.dtype} and shape "
                f"{list(info.shape)}, expected {' or '.join(wanted)} of rank {1 if info is g_idx else 2}",
                file=str(root / info.file))
    per_word = 32 // scheme.bits
    if scheme.method == "gptq":
        inputs, outputs = qweight.shape[0] * per_word, qweight.shape[1]
        zero_columns = outputs / per_word
    else:
        inputs, outputs = qweight.shape[0], qweight.shape[1] * per_word
        zero_columns = qweight.shape[1]
    group = inputs if scheme.group_size == -1 or scheme.group_size > inputs else scheme.group_size
    groups = -(-inputs // group) if group else 0
    if scheme.method == "awq" and group and inputs % group:
        raise PackedTensorError(f"{where}: AWQ tensor '{shown(qweight.name)}' has {inputs} input rows, not a multiple "
                                f"of group_size {group}", file=file)

    def expect(info: TensorInfo, shape: tuple[float, ...], why: str) -> None:
        if tuple(info.shape) != shape:
            raise PackedTensorError(
                f"{shown(root / info.file)}: {label} tensor '{shown(info.name)}' has shape {list(info.shape)}, "
                f"expected [{', '.join(f'{v:g}' for v in shape)}] ({why}, for '{shown(qweight.name)}' of shape "
                f"{list(qweight.shape)}: {inputs} inputs, {outputs} outputs, {scheme.bits}-bit, group size "
                f"{scheme.group_size})", file=str(root / info.file))

    expect(scales, (groups, outputs), "one scale per group and output")
    expect(qzeros, (groups, zero_columns), f"{per_word} zero points per word, one per group and output")
    if g_idx is not None:
        expect(g_idx, (inputs,), "one group index per input row")
    return IntPackedTensor(name, scales.dtype, (outputs, inputs), qweight.file, qweight.begin, qweight.end,
                           method=scheme.method, bits=scheme.bits, group_size=group, zero_offset=scheme.zero_offset,
                           act_order=scheme.act_order, qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The unsigned `bits`-bit fields of int32 `words` [rows, columns], lowest bits first, spread along `dim` (0:
    each word becomes 32/bits consecutive rows; 1: consecutive columns). int32 result."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if dim == 0:
        fields = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
        return fields.reshape(-1, words.shape[1])
    fields = (words.unsqueeze(2) >> shifts.view(1, 1, -1)) & ((1 << bits) - 1)
    return fields.reshape(words.shape[0], -1)


def dequantise(stored: Callable[[TensorInfo], torch.Tensor], info: IntPackedTensor,
               path: Callable[[TensorInfo], str]) -> torch.Tensor:
    """The weight [out, in] as the runtime computes with it, in the scales' dtype (each value one product of a
    scale and a small integer, exact in float32, rounded once: what a float16 or bfloat16 kernel computes). `stored`
    reads a part as stored; `path` gives a part's file. PackedValueError for a group index
    out of range, or one that reorders rows without desc_act (runtimes then disagree on the weight)."""
    import torch

    scales = stored(info.scales)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=scales.dtype)
    outputs, inputs = info.shape
    groups = info.scales.shape[0]
    if info.method == "gptq":
        q = _unpack(stored(info.qweight), info.bits, 0)  # [in, out]
        zeros = _unpack(stored(info.qzeros), info.bits, 1)  # [groups, out]
    else:
        order = torch.tensor(AWQ_COLUMNS, dtype=torch.long)
        q = _unpack(stored(info.qweight), info.bits, 1).view(inputs, -1, 8)[:, :, order].reshape(inputs, outputs)
        zeros = _unpack(stored(info.qzeros), info.bits, 1).view(groups, -1, 8)[:, :, order].reshape(groups, outputs)
    trivial = torch.arange(inputs, dtype=torch.long) // info.group_size
    group = trivial
    if info.g_idx is not None:
        group = stored(info.g_idx).to(torch.long)
        file = path(info.g_idx)
        bad = int(((group < 0) | (group >= groups)).sum())
        if bad:
            raise PackedValueError(
                f"{shown(file)}: group index '{shown(info.g_idx.name)}' of '{shown(info.name)}' holds {bad} value(s) "
                f"outside 0..{groups - 1} (there are {groups} groups of scales)", file=file)
        if not info.act_order and not torch.equal(group, trivial):
            raise PackedValueError(
                f"{shown(file)}: group index '{shown(info.g_idx.name)}' of '{shown(info.name)}' is not row // "
                f"{info.group_size} although quantization_config.desc_act is false: some runtimes follow it, others "
                f"ignore it, so the weight that runs is not determined", file=file)
    # in place where it can be: peak memory is about three int32/float32 copies of the weight
    q.sub_(zeros.add_(info.zero_offset)[group])
    values = q.to(torch.float32)
    del q
    values.mul_(scales.to(torch.float32)[group])
    return values.t().to(scales.dtype).contiguous()
