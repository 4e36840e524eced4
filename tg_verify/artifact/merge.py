"""Merging a PEFT adapter onto its base, one tensor at a time (needs torch), and opening any model to stream.

The header-only half (parsing, pattern matching, fit checks, the merge plan) is artifact/peft.py, which
does not import torch, so `inspect --against` stays light. Docs: docs/adapters.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from tg_verify.artifact.digest import file_digests
from tg_verify.artifact.errors import shown
from tg_verify.artifact.formats import open_reader
from tg_verify.artifact.gguf import decodable as gguf_decodable
from tg_verify.artifact.model import Artifact, TensorInfo
from tg_verify.artifact.peft import (
    AdapterFinding,
    AdapterFormatError,
    AdapterMismatchError,
    Ia3Op,
    LoraBiasOp,
    LoraOp,
    MergePlan,
    TensorPlan,
    base_record,
    check_base_name,
    parse_adapter,
    plan_merge,
)
from tg_verify.artifact.reader import TORCH_DTYPES
from tg_verify.errors import AdapterError, WeightValueError

__all__ = ["MergedReader", "OpenedModel", "open_merged", "open_model"]


def _adapter_tensors(plan: TensorPlan) -> list[TensorInfo]:
    """The adapter's stored tensors that a tensor plan reads, in order."""
    found: list[TensorInfo] = [plan.replacement] if plan.replacement is not None else []
    for op in plan.ops:
        if isinstance(op, LoraOp):
            found += [op.b, op.a] + ([op.magnitude] if op.magnitude is not None else [])
        elif isinstance(op, LoraBiasOp):
            found.append(op.b_bias)
        else:
            found.append(op.vector)
    return found


class MergedReader(AbstractContextManager["MergedReader"]):
    """Reads the base's tensors with the adapter merged in, one tensor at a time.

    `raw(info)` gives the merged tensor in the base tensor's dtype: the update is computed in float32 from the
    adapter's stored values and cast back once, as peft's `merge_and_unload()` does with its default
    `autocast_adapter_dtype=True`; `float32(info)` is that result decoded to float32, so an adapter and the
    same adapter merged and saved in the base dtype fingerprint identically. Untouched tensors pass through.
    """

    def __init__(self, adapter: Artifact, base: Artifact, plan: MergePlan) -> None:
        self.adapter = adapter
        self.base = base
        self.plan = plan
        self.findings: tuple[AdapterFinding, ...] = plan.findings
        self._base_reader = open_reader(base)
        self._adapter_reader = open_reader(adapter)
        self._cache: tuple[str, torch.Tensor] | None = None
        self._base_infos = {info.name: info for info in base.tensors}
        tensors = []
        for info in base.tensors:
            shape = plan.shapes.get(info.name, info.shape)
            if shape != info.shape:
                nbytes = math.prod(shape) * (info.nbytes // max(info.numel, 1))
                info = TensorInfo(info.name, info.dtype, shape, info.file, info.begin, info.begin + nbytes)
            tensors.append(info)
        self.artifact = Artifact(
            root=adapter.root, name=adapter.name, layout="adapter", files=adapter.files, tensors=tuple(tensors),
            config=base.config, adapter_config=adapter.adapter_config, metadata=adapter.metadata,
            warnings=adapter.warnings + tuple(f.message for f in plan.findings if f.severity == "warning"),
            format=base.format, unexpected=base.unexpected, architecture=base.architecture,
            other_weights=adapter.other_weights, vocabulary=base.vocabulary, components=base.components,
            text_config=base.text_config, quantisation=base.quantisation)

    def _adapter(self, info: TensorInfo) -> torch.Tensor:
        return self._adapter_reader.float32(info)

    def _merge(self, info: TensorInfo) -> torch.Tensor:
        plan = self.plan.tensors[info.name]
        base_info = self._base_infos[info.name]
        dtype = TORCH_DTYPES.get(base_info.dtype)
        if dtype is None and self.base.format == "gguf" and gguf_decodable(base_info.dtype):
            dtype = torch.float32  # a quantised GGUF base: the update is merged in float32, as llama.cpp applies LoRA
        if self.base.quantisation is not None and base_info.name in self.base.quantisation.scaled:
            dtype = torch.float32  # an FP8 base's weight is its values times its scale: merged in float32, not cast
        if dtype is None or not dtype.is_floating_point:
            raise AdapterMismatchError(f"{self.base.path_of(base_info.file)}: tensor '{info.name}' has dtype "
                                       f"{base_info.dtype}; an adapter can only be merged into floating-point weights",
                                       file=str(self.base.path_of(base_info.file)))
        weight = self._adapter(plan.replacement) if plan.replacement is not None \
            else self._base_reader.float32(base_info)
        if plan.replacement is not None and plan.ops:
            # peft loads the saved module into the base dtype before merging into it
            weight = weight.to(dtype).to(torch.float32)
        for op in plan.ops:
            weight = self._apply(op, weight, dtype)
        merged = weight.to(dtype)
        if not bool(torch.isfinite(merged).all()):
            raise self._nonfinite(info, plan, base_info)
        return merged

    def _nonfinite(self, info: TensorInfo, plan: TensorPlan, base_info: TensorInfo) -> WeightValueError:
        """Name the file whose values made the merged tensor non-finite: the base's, or the adapter's."""
        base_finite = bool(torch.isfinite(self._base_reader.raw(base_info)).all())
        if base_finite:
            used = [t.name for t in _adapter_tensors(plan)]
            file = self.adapter.path_of(_adapter_tensors(plan)[0].file)
            return WeightValueError(
                f"{shown(file)}: adapter tensor(s) {', '.join(repr(shown(n)) for n in used[:4])} make the merged "
                f"tensor '{shown(info.name)}' hold NaN or infinite values (the base's is finite); a fingerprint of "
                f"it would be meaningless", file=str(file))
        return WeightValueError(f"{shown(self.base.path_of(base_info.file))}: tensor '{shown(base_info.name)}' holds "
                                f"NaN or infinite values; a fingerprint of it would be meaningless",
                                file=str(self.base.path_of(base_info.file)))

    def _apply(self, op: LoraOp | LoraBiasOp | Ia3Op, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(op, Ia3Op):
            vector = self._adapter(op.vector)
            if op.bias:
                return weight * vector.reshape(weight.shape)
            return weight * (vector.T if op.transpose else vector)
        if isinstance(op, LoraBiasOp):
            return weight + self._adapter(op.b_bias) * op.scaling
        product = self._adapter(op.b) @ self._adapter(op.a)
        delta = (product.T if op.transpose else product) * op.scaling
        if op.magnitude is None:
            return weight + delta
        # DoRA: m * (W + dW) / ||W + dW|| with the norm over each output unit's inputs (peft's DoraLinearLayer)
        oriented = (weight + delta).T if op.transpose else weight + delta
        norm = torch.linalg.norm(oriented, dim=1)
        factor = (self._adapter(op.magnitude) / norm).view(-1, 1)
        rescaled: torch.Tensor = (factor.T if op.transpose else factor) * (weight + delta)
        return rescaled

    def raw(self, info: TensorInfo) -> torch.Tensor:
        """The merged tensor in the base tensor's dtype (a pass-through view when the adapter leaves it alone)."""
        if info.name not in self.plan.tensors:
            return self._base_reader.raw(self._base_infos[info.name])
        cached = self._cache  # one read: another thread may replace the slot meanwhile
        if cached is not None and cached[0] == info.name:
            return cached[1]
        merged = self._merge(info)
        self._cache = (info.name, merged)
        return merged

    def float32(self, info: TensorInfo) -> torch.Tensor:
        """The merged tensor as a fresh float32 tensor."""
        if info.name not in self.plan.tensors:
            return self._base_reader.float32(self._base_infos[info.name])
        return self.raw(info).to(torch.float32, copy=True)

    def stream(self, infos: Iterable[TensorInfo] | None = None) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield (info, float32 merged tensor) in canonical order, like TensorReader.stream."""
        for info in (self.artifact.tensors if infos is None else infos):
            yield info, self.float32(info)

    def release(self, info: TensorInfo) -> None:
        """Drop the merged copy of `info` once the caller is done with it (the extractor calls this)."""
        if self._cache is not None and self._cache[0] == info.name:
            self._cache = None

    def close(self) -> None:
        self._cache = None
        self._base_reader.close()
        self._adapter_reader.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_merged(adapter: Artifact, base: Artifact) -> MergedReader:
    """Check `adapter` against `base` (headers only) and return a reader of the merged weights.

    Raises UnsupportedAdapterError / AdapterFormatError for adapters that cannot be merged and
    AdapterMismatchError (listing the misfits) when the adapter does not fit this base.
    """
    if base.layout == "adapter":
        raise AdapterFormatError(f"{base.root}: the base of adapter {adapter.root} is itself an adapter; "
                                 f"merge it first and pass the full weights")
    spec = parse_adapter(adapter)
    label = f"base {base.root}"
    plan = plan_merge(spec, {t.name: t.shape for t in base.tensors}, base_config=base.config, base_label=label)
    errors = plan.errors
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise AdapterMismatchError("; ".join(f.message for f in errors[:3]) + more)
    return MergedReader(adapter, base, plan)


@dataclass
class OpenedModel(AbstractContextManager["OpenedModel"]):
    """A model ready to stream: what to fingerprint (`artifact`), the reader over it, and for an adapter
    the base merged onto, its record for the fingerprint document and the adapter's findings."""

    artifact: Artifact  # the artifact itself, or an adapter's merged view
    reader: Any  # TensorReader (or the format's reader), or a MergedReader
    base: Artifact | None = None
    base_record: dict[str, Any] | None = None
    findings: tuple[AdapterFinding, ...] = field(default_factory=tuple)  # warnings and base-name checks

    def close(self) -> None:
        self.reader.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_model(artifact: Artifact, base: Artifact | None = None, *, base_digests: dict[str, str] | None = None,
               declared_base_names: Sequence[str] = ()) -> OpenedModel:
    """Open any model to stream: a full model as it is (`base` ignored), an adapter merged onto `base`.

    For an adapter, `declared_base_names` (default: the base's name) are compared with its
    base_model_name_or_path (TGV_ADAPTER_BASE_NAME_MISMATCH), and `base_digests` (else hashed now) go into
    `base_record`. Raises AdapterError when an adapter has no base, and what `open_merged` raises.
    """
    if artifact.layout != "adapter":
        return OpenedModel(artifact, open_reader(artifact))
    if base is None:
        claimed = (artifact.adapter_config or {}).get("base_model_name_or_path")
        hint = f" (its adapter_config.json names '{shown(claimed)}')" if isinstance(claimed, str) and claimed else ""
        raise AdapterError(f"{shown(artifact.root)}: is a PEFT adapter; give the base model it was trained on "
                           f"(--base PATH){hint} so it can be merged before fingerprinting")
    merged = open_merged(artifact, base)
    try:
        names = [n for n in declared_base_names if n] or [base.name]
        findings = [f for f in merged.findings if f.severity != "info"] + check_base_name(artifact, names)
        record = base_record(base, base_digests if base_digests is not None else file_digests(base))
    except BaseException:
        merged.close()
        raise
    return OpenedModel(merged.artifact, merged, base, record, tuple(findings))
