"""FP8 checkpoints: which stored scale multiplies which float8 weight, from config.json's quantization_config,
validated from the headers alone (no tensor data is read; docs/artifact.md, "FP8 checkpoints").

A runtime never computes with the stored float8 values of such a checkpoint: it multiplies each by its scale (on a
GPU inside the FP8 kernel, on a CPU when transformers dequantises at load). So the weight tg-verify fingerprints is
values × scale, and the scales are bound by digest but never fingerprinted as weights of their own. The formats, as
transformers 5 loads them:

- `fp8` (FineGrainedFP8: DeepSeek-V3, Qwen3-*-FP8): `X.weight` and `X.weight_scale_inv`
  [..., ceil(out/bo), ceil(in/bi)] for `weight_block_size` [bo, bi] (absent: transformers' default [128, 128];
  null: one scale, [] or [1]); fused 3-D experts `X` with `X_scale_inv`; `X.activation_scale` (static activations).
- `compressed-tensors` (format `float-quantized` or `naive-quantized`): `X.weight_scale` as the config groups' 8-bit
  float weight strategy says: tensor [1] or [], channel [out, 1], group [out, ceil(in/g)], block
  [ceil(out/bo), ceil(in/bi)]; `X.input_scale`, `X.weight_zero_point` (must be zero), `X.input_zero_point`.
- `fbgemm_fp8`: `X.weight_scale` [out, 1].

With no quantization_config, float8 weights are read as stored (a plain cast) and scale-named tensors are left to
the loading grammar, as before. Every other case that does not fit is refused here, before anything is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tg_verify.artifact.errors import QuantizationConfigError, ScaleTensorError, shown
from tg_verify.artifact.model import Quantisation, ScaledWeight, TensorInfo

FP8_DTYPES: frozenset[str] = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
# float32 (V3-style), bfloat16/float16 (compressed-tensors saves scales in the model's dtype), UE8M0 (V4-style)
SCALE_DTYPES: frozenset[str] = frozenset({"F32", "BF16", "F16", "F64", "F8_E8M0"})
DEFAULT_BLOCK = (128, 128)  # FineGrainedFP8Config's weight_block_size when config.json does not say
FLOAT_FORMATS = ("float-quantized", "naive-quantized")  # compressed-tensors formats that store float8 as it is
METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8")

# A weight strategy: ("tensor",), ("channel",), ("group", g) or ("block", rows, columns)
Strategy = tuple[Any, ...]


@dataclass(frozen=True)
class _Scheme:
    """One quantization_config: the scale-tensor names its weights take and the block strategies it allows."""

    method: str
    strategies: tuple[Strategy, ...]
    scale: Callable[[str], str | None]  # weight name -> its scale's name (None: this format cannot scale it)
    extras: Callable[[str], tuple[str, ...]]  # weight name -> activation scales and zero points it may have
    companion: Callable[[str], bool]  # whether a stored name is one of this format's scale-like tensors
    zero_point: Callable[[str], str | None] = lambda name: None


@dataclass(frozen=True)
class Plan:
    """Each float8 weight's scale and the scale-like tensors beside it, before the loading grammar splits them."""

    method: str
    scaled: dict[str, ScaledWeight]
    members: dict[str, tuple[TensorInfo, ...]] = field(default_factory=dict)  # weight -> its companions

    @property
    def companion_names(self) -> set[str]:
        return {t.name for group in self.members.values() for t in group}

    def split(self, loaded: Iterable[TensorInfo], unexpected: Iterable[TensorInfo]
              ) -> tuple[tuple[TensorInfo, ...], Quantisation]:
        """The unexpected tensors with the companions of unexpected weights added (a runtime loads neither), and the
        quantisation of the loaded weights."""
        names = {t.name for t in loaded}
        extra = [c for weight, group in self.members.items() if weight not in names for c in group]
        kept = {w: s for w, s in self.scaled.items() if w in names}
        companions = tuple(c for weight, group in self.members.items() if weight in names for c in group)
        return (*unexpected, *extra), Quantisation(self.method, kept, companions)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, list) and len(value) == 2 and all(_positive(v) for v in value):
        return int(value[0]), int(value[1])
    return None


def _stem(name: str) -> str | None:
    return name[: -len("weight")] if name.endswith(".weight") else None


def _fp8_scheme(config: Mapping[str, Any], where: str, file: str) -> _Scheme:
    if "weight_block_size" not in config:
        strategy: Strategy = ("block", *DEFAULT_BLOCK)
    elif config["weight_block_size"] is None:
        strategy = ("tensor",)
    else:
        block = _pair(config["weight_block_size"])
        if block is None:
            raise QuantizationConfigError(
                f"{where}: quantization_config.weight_block_size must be null or two positive integers [rows, "
                f"columns], got {shown(repr(config['weight_block_size']), 60)}", file=file)
        strategy = ("block", *block)

    def scale(name: str) -> str:
        stem = _stem(name)
        return stem + "weight_scale_inv" if stem is not None else name + "_scale_inv"

    def extras(name: str) -> tuple[str, ...]:
        stem = _stem(name)
        return (stem + "activation_scale",) if stem is not None else (name + "_activation_scale",)

    return _Scheme("fp8", (strategy,), scale, extras, lambda n: n.endswith(("scale_inv", "activation_scale")))


def _ct_strategy(weights: Mapping[str, Any], where: str, file: str, group: str) -> Strategy:
    kind = weights.get("strategy")
    at = f"{where}: quantization_config.config_groups['{shown(group, 40)}'].weights"
    if kind in ("tensor", "channel"):
        return (kind,)
    if kind == "group":
        size = weights.get("group_size")
        if not _positive(size):
            raise QuantizationConfigError(f"{at}.group_size must be a positive integer, got "
                                          f"{shown(repr(size), 40)}", file=file)
        return ("group", size)
    if kind == "block":
        block = _pair(weights.get("block_structure"))
        if block is None:
            raise QuantizationConfigError(f"{at}.block_structure must be two positive integers, got "
                                          f"{shown(repr(weights.get('block_structure')), 60)}", file=file)
        return ("block", *block)
    raise QuantizationConfigError(f"{at}.strategy {shown(repr(kind), 40)} is not one tg-verify dequantises "
                                  f"(tensor, channel, group, block)", file=file)


def _ct_scheme(config: Mapping[str, Any], where: str, file: str) -> _Scheme:
    groups = config.get("config_groups")
    if not isinstance(groups, dict):
        raise QuantizationConfigError(f"{where}: quantization_config.config_groups must be an object of weight "
                                      f"schemes", file=file)
    strategies: list[Strategy] = []
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict) or weights.get("type") != "float" or weights.get("num_bits") != 8:
            continue
        fmt = group.get("format") or config.get("format")
        if fmt not in FLOAT_FORMATS:
            raise QuantizationConfigError(
                f"{where}: quantization_config format {shown(repr(fmt), 40)} for the 8-bit float weights of group "
                f"'{shown(name, 40)}' is not one tg-verify reads ({', '.join(FLOAT_FORMATS)})", file=file)
        if weights.get("symmetric", True) is not True:
            raise QuantizationConfigError(f"{where}: quantization_config group '{shown(name, 40)}' quantises float "
                                          f"weights asymmetrically, which tg-verify does not dequantise", file=file)
        strategies.append(_ct_strategy(weights, where, file, name))
    if not strategies:
        declared = sorted({f"{w.get('type')}{w.get('num_bits')} in format {g.get('format') or config.get('format')}"
                           for g in groups.values() if isinstance(g, dict)
                           for w in (g.get("weights"),) if isinstance(w, dict)})
        found = f" (it declares {shown(', '.join(declared), 120)})" if declared else ""
        raise QuantizationConfigError(f"{where}: quantization_config (compressed-tensors) declares no 8-bit float "
                                      f"weight scheme in config_groups{found}; tg-verify dequantises only those "
                                      f"(integer packs such as pack-quantized int4/int8 are not read)", file=file)

    def extras(name: str) -> tuple[str, ...]:
        stem = _stem(name)
        return () if stem is None else (stem + "input_scale", stem + "input_zero_point", stem + "weight_zero_point")

    return _Scheme("compressed-tensors", tuple(dict.fromkeys(strategies)),
                   lambda n: None if _stem(n) is None else f"{_stem(n)}weight_scale", extras,
                   lambda n: n.endswith((".weight_scale", ".input_scale", ".weight_zero_point", ".input_zero_point")),
                   zero_point=lambda n: None if _stem(n) is None else f"{_stem(n)}weight_zero_point")


def _fbgemm_scheme(config: Mapping[str, Any], where: str, file: str) -> _Scheme:
    return _Scheme("fbgemm_fp8", (("channel",),), lambda n: None if _stem(n) is None else f"{_stem(n)}weight_scale",
                   lambda n: (), lambda n: n.endswith(".weight_scale"))


_SCHEMES: dict[str, Callable[[Mapping[str, Any], str, str], _Scheme]] = {
    "fp8": _fp8_scheme, "compressed-tensors": _ct_scheme, "fbgemm_fp8": _fbgemm_scheme}


def _block(strategy: Strategy, rows: int, cols: int) -> tuple[int, int]:
    """The (rows, columns) of the weight one scale value covers, clamped to the matrix (a block larger than it is the
    whole matrix: the same values, and no huge repeat when dequantising)."""
    if strategy[0] == "tensor":
        block = (rows, cols)
    elif strategy[0] == "channel":
        block = (1, cols)
    elif strategy[0] == "group":
        block = (1, strategy[1])
    else:
        block = (strategy[1], strategy[2])
    return max(1, min(block[0], rows)), max(1, min(block[1], cols))


def _shapes(strategy: Strategy, lead: tuple[int, ...], rows: int, cols: int) -> list[tuple[int, ...]]:
    """The scale shapes a strategy writes for a weight [*lead, rows, cols]."""
    if strategy[0] == "tensor":
        return [lead, (*lead, 1), (*lead, 1, 1)]
    if strategy[0] == "channel":
        return [(*lead, rows, 1)]
    bo, bi = _block(strategy, rows, cols)
    return [(*lead, math.ceil(rows / bo), math.ceil(cols / bi))]


def _fit(scheme: _Scheme, weight: TensorInfo, scale: TensorInfo, where: Callable[[TensorInfo], str],
         file: Callable[[TensorInfo], str]) -> tuple[int, int]:
    """The block one value of `scale` covers in `weight`; ScaleTensorError when its shape fits no strategy, or
    fits two that read it differently."""
    if scale.dtype not in SCALE_DTYPES:
        raise ScaleTensorError(f"{where(scale)}: scale tensor '{shown(scale.name)}' of '{shown(weight.name)}' has "
                               f"dtype {scale.dtype}; expected one of {', '.join(sorted(SCALE_DTYPES))}",
                               file=file(scale))
    *lead, rows, cols = weight.shape
    fits = {_block(s, rows, cols) for s in scheme.strategies if scale.shape in _shapes(s, tuple(lead), rows, cols)}
    if len(fits) == 1:
        return fits.pop()
    wanted = " or ".join(sorted({str(list(shape)) for s in scheme.strategies
                                 for shape in _shapes(s, tuple(lead), rows, cols)}))
    why = "fits several block sizes" if fits else f"does not fit it (expected {wanted})"
    raise ScaleTensorError(f"{where(scale)}: scale tensor '{shown(scale.name)}' has shape {list(scale.shape)}, which "
                           f"for {scheme.method} weight '{shown(weight.name)}' of shape {list(weight.shape)} {why}",
                           file=file(scale))


def plan(tensors: Sequence[TensorInfo], config: Mapping[str, Any] | None, root: Path) -> Plan | None:
    """Each float8 weight's scale, per config.json's quantization_config, checked from the headers: None when
    config.json has none (float8 values are then read as stored). Raises QuantizationConfigError for a
    quantization_config tg-verify cannot read float8 weights by, ScaleTensorError for a missing, orphan or
    ill-fitting scale."""
    quant = (config or {}).get("quantization_config")
    if quant is None:
        return None
    config_path = root / "config.json"
    where_config, config_file = shown(config_path), str(config_path)
    floats = [t for t in tensors if t.dtype in FP8_DTYPES]
    if not isinstance(quant, dict):
        raise QuantizationConfigError(f"{where_config}: quantization_config must be an object", file=config_file)
    method = quant.get("quant_method")
    if not isinstance(method, str) or method not in _SCHEMES:
        if not floats:
            return None  # another method's own tensors (int4 packs ...): not this module's to read
        raise QuantizationConfigError(
            f"{where_config}: quantization_config.quant_method {shown(repr(method), 40)} is not one tg-verify "
            f"dequantises ({', '.join(METHODS)}), and {len(floats)} float8 tensor(s) (e.g. "
            f"'{shown(floats[0].name)}') would otherwise be read without their scales", file=config_file)
    scheme = _SCHEMES[method](quant, where_config, config_file)
    by_name = {t.name: t for t in tensors}

    def where(info: TensorInfo) -> str:
        return shown(root / info.file)

    def file(info: TensorInfo) -> str:
        return str(root / info.file)

    scaled: dict[str, ScaledWeight] = {}
    members: dict[str, tuple[TensorInfo, ...]] = {}
    for weight in floats:
        name = scheme.scale(weight.name)
        scale = by_name.get(name) if name is not None else None
        if scale is None or len(weight.shape) < 2:
            expected = f"'{shown(name)}'" if name is not None else "a '<module>.weight' name with a scale beside it"
            raise ScaleTensorError(
                f"{where(weight)}: float8 tensor '{shown(weight.name)}' of shape {list(weight.shape)} has no scale "
                f"(expected {expected} under quant_method {method}); a runtime would compute with a scale it does not "
                f"have", file=file(weight))
        zero_name = scheme.zero_point(weight.name)
        zero = by_name.get(zero_name) if zero_name is not None else None
        if zero is not None and zero.shape != scale.shape:
            raise ScaleTensorError(f"{where(zero)}: zero point '{shown(zero.name)}' has shape {list(zero.shape)}, not "
                                   f"its scale's {list(scale.shape)}", file=file(zero))
        scaled[weight.name] = ScaledWeight(scale, _fit(scheme, weight, scale, where, file), "fp8", zero)
        members[weight.name] = (scale, *(by_name[n] for n in scheme.extras(weight.name) if n in by_name))
    claimed = {t.name for group in members.values() for t in group}
    for info in tensors:
        if info.name not in claimed and scheme.companion(info.name):
            raise ScaleTensorError(
                f"{where(info)}: tensor '{shown(info.name)}' is named as a {method} scale, but no float8 weight it "
                f"belongs to is stored (its weight is missing, or not float8); a runtime's use of it cannot be "
                f"verified", file=file(info))
    return Plan(method, scaled, members)
