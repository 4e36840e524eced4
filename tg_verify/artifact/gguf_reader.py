"""Stream a GGUF artifact's tensors: validated byte ranges through the `gguf` package's dequantisers.

Float types (F32, F16, BF16, F64) are viewed from the map as TensorReader does; quantised ones
(Q4_0 ... Q8_0, the K-quants, IQ*, TQ*, MXFP4 ...) are dequantised one tensor at a time by
`gguf.quants.dequantize`, so peak memory is about one tensor in float32 per reading thread. Then
what llama.cpp's converter changed is undone (Q/K row permutation, Gemma's norm offset), so the
values are those of the Hugging Face original.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from tg_verify.artifact.errors import shown
from tg_verify.artifact.gguf import PLAIN_TYPES, dequantisable
from tg_verify.artifact.gguf_names import Transform, transform_for
from tg_verify.artifact.model import Artifact, TensorInfo
from tg_verify.artifact.reader import TORCH_DTYPES, TensorReader
from tg_verify.errors import UnsupportedDtypeError, WeightValueError


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter permutation (per head, rows [first half, second half] interleaved)."""
    head_dim = rows.shape[0] // heads
    rest = rows.shape[1:]
    return rows.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows.shape)


def apply_transform(tensor: torch.Tensor, transform: Transform) -> torch.Tensor:
    """A fresh tensor with `transform` applied (the input is never modified)."""
    if transform.subtract:
        return tensor.to(torch.float32) - transform.subtract
    out = tensor.clone()
    for first, count, heads in transform.unpermute:
        out[first:first + count] = _unpermute(tensor[first:first + count], heads)
    return out


class GGUFTensorReader(TensorReader):
    """TensorReader's interface over one GGUF file: `raw`, `float32`, `stream`, `release`, `close`.

    Thread-safe like TensorReader: maps are opened under a lock, and dequantising and transforming
    allocate fresh tensors. `raw()` gives the stored dtype for plain types and float32 for quantised
    ones (there is no torch dtype for a Q4_0 block); `rows()` dequantises only the rows asked for.
    """

    def __init__(self, artifact: Artifact) -> None:
        super().__init__(artifact)
        config = artifact.config or {}
        self._transforms = {info.name: t for info in artifact.tensors if (t := transform_for(config, info.name))}
        # The last tensor `raw()` had to compute (dequantised or transformed), until `release()`: code that slices
        # raw(info)[a:b] block by block then dequantises the tensor once, not once per block.
        self._recent: tuple[TensorInfo, torch.Tensor] | None = None
        self._recent_lock = threading.Lock()

    def _viewable(self, info: TensorInfo) -> bool:
        return info.dtype in PLAIN_TYPES and info.dtype in TORCH_DTYPES and info.name not in self._transforms

    def _compute(self, info: TensorInfo) -> torch.Tensor:
        """A fresh tensor of the HF values of `info` (dequantised and/or with the converter's change undone)."""
        if info.dtype in PLAIN_TYPES and info.dtype in TORCH_DTYPES:
            tensor = super().raw(info)
        else:
            tensor = self._dequantise(info)
        transform = self._transforms.get(info.name)
        return apply_transform(tensor, transform) if transform is not None else tensor

    def _cached(self, info: TensorInfo) -> torch.Tensor | None:
        with self._recent_lock:
            recent = self._recent
        return recent[1] if recent is not None and recent[0] == info else None

    def _dequantise(self, info: TensorInfo) -> torch.Tensor:
        import gguf

        if info.dtype not in dequantisable():
            raise UnsupportedDtypeError(
                f"{shown(self.artifact.path_of(info.file))}: tensor '{shown(info.name)}' has ggml type {info.dtype}, "
                f"which the installed gguf package cannot dequantise (supported: "
                f"{', '.join(sorted(PLAIN_TYPES | dequantisable()))})", file=str(self.artifact.path_of(info.file)))
        if info.numel == 0:
            return torch.empty(info.shape, dtype=torch.float32)
        qtype = gguf.GGMLQuantizationType[info.dtype]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = (info.shape[-1] if info.shape else 1) // block * type_size
        buffer = self._map(info.file)
        data = np.frombuffer(buffer, dtype=np.uint8, count=info.nbytes, offset=info.begin).reshape(-1, row_bytes)
        with np.errstate(all="ignore"):  # NaN/Inf scales are the weights' own values, refused with finite=True
            values = gguf.quants.dequantize(data, qtype)
        del data  # the view pins the map; the values are a fresh array
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)

    def raw(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's HF values: stored dtype for F32/F16/BF16/F64/I* (a view of the map when nothing is
        undone), float32 once dequantised. Like a view, the result is shared: never modify it in place."""
        if self._viewable(info):
            return super().raw(info)
        cached = self._cached(info)
        if cached is not None:
            return cached
        tensor = self._compute(info)
        with self._recent_lock:
            self._recent = (info, tensor)
        return tensor

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's mapped pages, and its computed values if `raw()` kept them."""
        with self._recent_lock:
            if self._recent is not None and self._recent[0] == info:
                self._recent = None
        super().release(info)

    def close(self) -> None:
        with self._recent_lock:
            self._recent = None
        super().close()

    def rows(self, info: TensorInfo, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor in float32, dequantising only those rows (the sketch's probe rows)."""
        if info.dtype in PLAIN_TYPES or info.name in self._transforms or len(info.shape) != 2 or info.numel == 0:
            return self.raw(info)[ids].to(torch.float32)
        import gguf

        if info.dtype not in dequantisable():
            return self.raw(info)  # raises UnsupportedDtypeError with the message above
        qtype = gguf.GGMLQuantizationType[info.dtype]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = info.shape[1] // block * type_size
        buffer = self._map(info.file)
        data = np.frombuffer(buffer, dtype=np.uint8, count=info.nbytes, offset=info.begin).reshape(-1, row_bytes)
        picked = data[ids.numpy()]
        del data
        with np.errstate(all="ignore"):
            values = gguf.quants.dequantize(picked, qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def float32(self, info: TensorInfo, *, finite: bool = False) -> torch.Tensor:
        """The tensor as a fresh float32 tensor; with `finite=True`, NaN/Inf is a WeightValueError."""
        cached = self._cached(info)
        if self._viewable(info) or cached is not None:
            shared = super().raw(info) if cached is None else cached
            tensor = shared.to(torch.float32) if shared.dtype != torch.float32 else shared.clone()
        else:
            tensor = self._compute(info)
            if tensor.dtype != torch.float32:
                tensor = tensor.to(torch.float32)
        if finite:
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise WeightValueError(
                    f"{shown(self.artifact.path_of(info.file))}: tensor '{shown(info.name)}' holds {bad} NaN or "
                    f"infinite value(s) of {info.numel}; a fingerprint of it would be meaningless",
                    file=str(self.artifact.path_of(info.file)))
        return tensor
