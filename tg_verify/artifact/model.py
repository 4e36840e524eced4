"""The resolved artifact: which files make the model and which tensors they hold."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

Layout = Literal["single", "indexed-shards", "shards", "adapter"]
FileRole = Literal["weights", "index", "config", "adapter-config", "adapter-weights"]

# Bits per element of every safetensors dtype (the reference's `Dtype` enum). Sub-byte and complex
# dtypes pass header validation but are refused when decoding (UnsupportedDtypeError).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# The dtypes TensorReader decodes to float32 (with torch >= 2.7; older torch lacks F8_E8M0 and the unsigned ones).
DECODABLE_DTYPES: frozenset[str] = frozenset({
    "BOOL", "U8", "I8", "I16", "I32", "I64", "U16", "U32", "U64", "F16", "BF16", "F32", "F64",
    "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

# Safetensors dtypes whose values are real numbers a gradient can be taken against. Integer tensors
# (quantised packs, index buffers) have no Linear meaning and are not analysed. Formats extend this set.
FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ",
                                          "F8_E5M2FNUZ", "MXFP4"})
# MXFP4 is no stored dtype: it is what an MXFP4 pair (`_blocks` U8 + `_scales` U8) presents as the float parameter
# the runtime dequantises it into (artifact/mxfp4.py). No header can declare it (DTYPE_BITS lacks it).

# Every tensor costs fixed work (header parsing, sorting, and above all the extractor's per-tensor pass), so
# many tiny tensors are a CPU-amplification attack: 40,000 2x2 tensors in 4.8 MB took 22-30 s. An artifact may
# hold at most MAX_TENSORS tensors, and beyond FREE_TENSORS their mean size must be at least
# MIN_MEAN_TENSOR_BYTES, so the work stays proportional to the bytes. Published checkpoints fit easily: a
# dense 405B model has ~1,100 tensors, large MoE models tens of thousands of multi-MB expert tensors.
# $TG_VERIFY_MAX_TENSORS replaces both rules with a plain cap (TGV_TOO_MANY_TENSORS beyond it).
MAX_TENSORS = 100_000
FREE_TENSORS = 2_048
MIN_MEAN_TENSOR_BYTES = 262_144
MAX_TENSORS_ENV = "TG_VERIFY_MAX_TENSORS"


def max_tensors() -> int:
    """The plain tensor-count cap: $TG_VERIFY_MAX_TENSORS when it is a positive integer, else MAX_TENSORS."""
    value = os.environ.get(MAX_TENSORS_ENV, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return MAX_TENSORS


def tensor_budget(count: int, nbytes: int) -> str | None:
    """Why `count` tensors over `nbytes` bytes are too many to process, or None when they are within budget."""
    explicit = os.environ.get(MAX_TENSORS_ENV, "").strip()
    cap = max_tensors()
    if count > cap:
        return f"{count} tensors, more than the limit of {cap}"
    if not explicit and count > FREE_TENSORS and nbytes < count * MIN_MEAN_TENSOR_BYTES:
        return (f"{count} tensors in {nbytes} bytes: beyond {FREE_TENSORS} tensors the mean tensor must hold at "
                f"least {MIN_MEAN_TENSOR_BYTES} bytes (each tensor costs fixed work)")
    return None


_NATURAL = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders `layers.2` before `layers.10`: ASCII digit runs compare as numbers.

    Numbers compare by (digits without leading zeros: length, then text), so runs of any length
    work without int(); the full name breaks ties (`a01` vs `a1`), so the order is total.
    """
    parts = _NATURAL.split(name)
    key = tuple((len(p.lstrip("0")), p.lstrip("0")) if i % 2 else p for i, p in enumerate(parts))
    return key, name


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header declares it. `begin`/`end` are absolute byte offsets in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # POSIX path relative to the artifact root
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ScaledWeight:
    """How the runtime computes a stored low-precision weight: its values times `scale`, one scale value per block of
    `block` = (rows, columns) of the weight's last two dimensions, edge blocks partial (artifact/fp8.py).

    `kind` names the dequantiser (TensorReader's; "fp8": float8 values times float scales; "gptq", "awq": packed
    integers, the weight an artifact/intquant.py IntPackedTensor that carries its parts, `block` (1, group size),
    rows of a group in g_idx's order); `zero_point`, where an FP8 format stores one, must hold zeros. A new scheme is
    a kind, its planner and its dequantiser."""

    scale: TensorInfo
    block: tuple[int, int]
    kind: str = "fp8"
    zero_point: TensorInfo | None = None


@dataclass(frozen=True)
class Quantisation:
    """A checkpoint whose weights the runtime dequantises (config.json's quantization_config): which stored weight
    each scale multiplies. `companions` are every scale-like tensor the runtime loads beside its weights (weight
    scales, activation/input scales, zero points): bound by digest with their files, never fingerprinted as weights.
    """

    method: str  # quantization_config.quant_method
    scaled: dict[str, ScaledWeight]  # weight name -> how it is dequantised
    companions: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class ArtifactFile:
    """A file that belongs to the artifact, named by POSIX path relative to the root."""

    path: str
    size: int
    role: FileRole


@dataclass(frozen=True)
class Artifact:
    """A resolved model artifact.

    `tensors` is in canonical order: natural sort of tensor names, independent of how the
    weights were sharded, so the same weights stream identically from any layout. It holds only the
    tensors a runtime loads for this architecture (artifact/loading.py); `unexpected` holds the others,
    which are never fingerprinted. `format` picks the reader (artifact/formats.py).
    """

    root: Path
    name: str  # display name: the directory name, or the file stem for a lone file
    layout: Layout
    files: tuple[ArtifactFile, ...]
    tensors: tuple[TensorInfo, ...]
    config: dict[str, Any] | None = None
    adapter_config: dict[str, Any] | None = None
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> __metadata__
    warnings: tuple[str, ...] = ()
    format: str = "safetensors"
    unexpected: tuple[TensorInfo, ...] = ()  # stored tensors no runtime loads (TGV_UNEXPECTED_TENSORS)
    architecture: str | None = None  # the loading grammar applied; None: unknown, the loaded set is unchecked
    other_weights: tuple[str, ...] = ()  # weight files beside the artifact that are not part of it
    # token id -> the token's text as the file stores it, when the weights file holds the vocabulary (GGUF's
    # tokenizer.ggml.tokens); None otherwise. Hashed with the file it comes from.
    vocabulary: tuple[bytes, ...] | None = None
    # A multimodal wrapper's loaded tensors outside its language model (vision tower, projector), and that model's
    # config (config.json's text_config): the fingerprint covers the language model alone (language_model()).
    components: tuple[str, ...] = ()
    text_config: dict[str, Any] | None = None
    # FP8 checkpoints: each float8 weight's scale (artifact/fp8.py); GPTQ/AWQ: each packed weight's parts
    # (artifact/intquant.py); the scales and parts are not in `tensors`. None: the stored values are what the runtime
    # computes with
    quantisation: Quantisation | None = None

    @property
    def model_type(self) -> str | None:
        value = (self.config or {}).get("model_type")
        return value if isinstance(value, str) else None

    def language_model(self) -> Artifact:
        """The artifact as its language model: a wrapper's components left out, its text_config as the config.
        Itself for every other artifact."""
        if not self.components and self.text_config is None:
            return self
        outside = set(self.components)
        return dataclasses.replace(self, tensors=tuple(t for t in self.tensors if t.name not in outside),
                                   config=self.text_config, components=(), text_config=None)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {info.name: info for info in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called `name` (KeyError if absent)."""
        return self._by_name[name]

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath
