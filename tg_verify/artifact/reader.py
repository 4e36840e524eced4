"""Stream tensors from a resolved artifact: memory-mapped, one at a time, decoded to float32.

Peak memory is about one tensor: `raw()` is a zero-copy view of the mapped file, `float32()` one copy. A float8
weight of an FP8 checkpoint (artifact/fp8.py) is read as the runtime computes with it: its values times its scale,
dequantised once into a fresh float32 tensor.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType

import torch

from tg_verify.artifact import intquant
from tg_verify.artifact.errors import FileChangedError, ScaleValueError, shown
from tg_verify.artifact.model import Artifact, ScaledWeight, TensorInfo
from tg_verify.artifact.mxfp4 import PackedTensor, dequantise
from tg_verify.artifact.safeio import drop_pages, open_regular, os_error
from tg_verify.errors import InternalError, UnsupportedDtypeError, WeightValueError

# safetensors dtype -> torch dtype that can be viewed directly from the (little-endian) bytes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # present in torch >= 2.1 (fp8) / 2.3 (unsigned) / 2.7 (e8m0)
        TORCH_DTYPES[_name] = getattr(torch, _attr)
# Not decodable: F4, F6_E2M3, F6_E3M2 (packed sub-byte, need the quantisation scales) and C64 (complex).


def decodable(dtype: str) -> bool:
    """Whether `float32()` can decode tensors of this safetensors dtype with the installed torch."""
    return dtype in TORCH_DTYPES


class TensorReader(AbstractContextManager["TensorReader"]):
    """Memory-maps the artifact's weight files lazily; `raw()` views bytes, `float32()` decodes.

    Maps are copy-on-write private (never written back), so views are zero-copy and safe to hand to
    torch. A file whose size changed since `resolve` validated it is refused (FileChangedError).
    """

    def __init__(self, artifact: Artifact) -> None:
        if sys.byteorder != "little":
            raise InternalError("tg-verify reads safetensors (little-endian) on little-endian hosts only")
        self.artifact = artifact
        self._maps: dict[str, mmap.mmap] = {}
        self._sizes = {f.path: f.size for f in artifact.files}
        self._lock = threading.Lock()  # the extractor reads tensors from several threads
        self._scaled = artifact.quantisation.scaled if artifact.quantisation is not None else {}
        # the last weight `raw()` dequantised, until `release()`: code that slices raw(info)[a:b] block by block then
        # dequantises the weight once, not once per block
        self._dequantised: tuple[TensorInfo, torch.Tensor] | None = None

    def _map(self, relpath: str) -> mmap.mmap:
        with self._lock:
            return self._map_locked(relpath)

    def _map_locked(self, relpath: str) -> mmap.mmap:
        if relpath not in self._maps:
            path = self.artifact.path_of(relpath)
            fd, info = open_regular(path, "weights file")
            try:
                if info.st_size != self._sizes.get(relpath):
                    raise FileChangedError(f"{shown(path)}: file is {info.st_size} bytes, not the "
                                           f"{self._sizes.get(relpath)} validated by resolve(); it changed while open",
                                           file=str(path))
                self._maps[relpath] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise os_error(path, exc, "weights file") from None
            finally:
                os.close(fd)
        return self._maps[relpath]

    def raw(self, info: TensorInfo) -> torch.Tensor:
        """The tensor as the runtime computes with it: in its stored dtype, viewed (not copied) from the mapped file
        when aligned; a scaled float8 weight dequantised to float32, MXFP4 experts (artifact/mxfp4.py) from their
        stored pair, in the dtype the runtime gives them, a GPTQ/AWQ weight (artifact/intquant.py) from its packed
        integers, in its scales' dtype. Like a view, the result is shared: never modify it in
        place."""
        if isinstance(info, PackedTensor):
            return dequantise(self.raw, info, str(self.artifact.path_of(info.file)))
        scaled = self._scaled.get(info.name)
        if scaled is None and not isinstance(info, intquant.IntPackedTensor):
            return self.stored(info)
        with self._lock:
            recent = self._dequantised
        if recent is not None and recent[0] == info:
            return recent[1]
        tensor = self._scaled_values(info, scaled)
        with self._lock:
            self._dequantised = (info, tensor)
        return tensor

    def _scaled_values(self, info: TensorInfo, scaled: ScaledWeight | None) -> torch.Tensor:
        """A fresh float32 tensor: the stored values times the scale broadcast over each block of the last two
        dimensions (edge blocks partial), as transformers' `_dequantize_fp8_weight` computes it. The scale must be
        finite and positive, the zero point (where stored) zero: ScaleValueError otherwise. A GPTQ/AWQ weight: its
        packed integers dequantised (intquant.dequantise), in its scales' dtype."""
        if isinstance(info, intquant.IntPackedTensor):
            return intquant.dequantise(self.stored, info, lambda part: str(self.artifact.path_of(part.file)))
        if scaled is None or scaled.kind != "fp8":  # a scheme's planner and its dequantiser come together
            kind = scaled.kind if scaled is not None else None
            raise UnsupportedDtypeError(f"{shown(self.artifact.path_of(info.file))}: tensor '{shown(info.name)}' is "
                                        f"quantised as {kind!r}, which this reader cannot dequantise",
                                        file=str(self.artifact.path_of(info.file)))
        scale = self._checked_scale(info, scaled)
        weight = self.stored(info).to(torch.float32, copy=True)  # a fresh copy: the map is never written
        if weight.numel() == 0:
            return weight
        *lead, rows, cols = weight.shape
        bo, bi = scaled.block
        grid = scale.reshape(*lead, -(-rows // bo), -(-cols // bi))
        # the scales expanded over rows only, and broadcast over each block's columns through a view of the weight
        per_row = grid.repeat_interleave(bo, dim=-2)[..., :rows, :]
        full, rest = divmod(cols, bi)
        if full:
            weight[..., :full * bi].view(*weight.shape[:-1], full, bi).mul_(per_row[..., :full, None])
        if rest:
            weight[..., full * bi:].mul_(per_row[..., full:])
        return weight

    def _checked_scale(self, info: TensorInfo, scaled: ScaledWeight) -> torch.Tensor:
        path = self.artifact.path_of(scaled.scale.file)
        scale = self.stored(scaled.scale).to(torch.float32)
        bad = int((~(torch.isfinite(scale) & (scale > 0))).sum())
        if bad:
            raise ScaleValueError(
                f"{shown(path)}: scale tensor '{shown(scaled.scale.name)}' of '{shown(info.name)}' holds {bad} NaN, "
                f"infinite, zero or negative value(s) of {scaled.scale.numel}; FP8 scales are positive (amax / 448)",
                file=str(path))
        if scaled.zero_point is not None:
            zero = self.stored(scaled.zero_point)
            if bool((zero != 0).any()):
                where = self.artifact.path_of(scaled.zero_point.file)
                raise ScaleValueError(
                    f"{shown(where)}: zero point '{shown(scaled.zero_point.name)}' of '{shown(info.name)}' is not "
                    f"zero; tg-verify dequantises symmetric float8 weights only", file=str(where))
        return scale

    def stored(self, info: TensorInfo) -> torch.Tensor:
        """The tensor in its stored dtype, viewed (not copied) from the mapped file when aligned. A tensor stored in
        parts (MXFP4, GPTQ/AWQ) has no bytes of its own: it is read as `raw()` reads it."""
        if isinstance(info, (PackedTensor, intquant.IntPackedTensor)):
            return self.raw(info)
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise UnsupportedDtypeError(
                f"{shown(self.artifact.path_of(info.file))}: tensor '{shown(info.name)}' has dtype {info.dtype}, "
                f"which tg-verify cannot decode to float32 (supported: {', '.join(sorted(TORCH_DTYPES))})",
                file=str(self.artifact.path_of(info.file)))
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        buffer = self._map(info.file)
        if info.begin % dtype.itemsize:  # writers need not align the data section; never hand torch a misaligned view
            flat = torch.frombuffer(bytearray(buffer[info.begin:info.end]), dtype=dtype)
        else:
            flat = torch.frombuffer(buffer, dtype=dtype, count=info.numel, offset=info.begin)
        return flat.view(info.shape)

    def float32(self, info: TensorInfo, *, finite: bool = False) -> torch.Tensor:
        """The tensor decoded to a fresh float32 tensor; with `finite=True`, NaN/Inf is a WeightValueError."""
        if info.name in self._scaled:
            with self._lock:
                recent = self._dequantised
            if recent is not None and recent[0] == info:
                tensor = recent[1].to(torch.float32, copy=True)
            else:
                tensor = self._scaled_values(info, self._scaled[info.name]).to(torch.float32)
        else:
            raw = self.raw(info)  # the stored dtype, or MXFP4 experts dequantised
            tensor = raw.clone() if raw.dtype == torch.float32 else raw.to(torch.float32)
        if finite:
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise WeightValueError(
                    f"{shown(self.artifact.path_of(info.file))}: tensor '{shown(info.name)}' holds {bad} NaN or "
                    f"infinite value(s) of {info.numel}; a fingerprint of it would be meaningless",
                    file=str(self.artifact.path_of(info.file)))
        return tensor

    def stream(self, infos: Iterable[TensorInfo] | None = None, *, finite: bool = False
               ) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield (info, float32 tensor) one at a time, in canonical order by default."""
        for info in (self.artifact.tensors if infos is None else infos):
            yield info, self.float32(info, finite=finite)

    def release(self, info: TensorInfo) -> None:
        """Drop the mapped pages of a tensor already consumed, so a streamed pass keeps ~one tensor resident.

        The maps are private and never written, so the kernel re-reads the pages from the file if they
        are touched again: views stay valid, only resident memory (RSS) shrinks.
        """
        with self._lock:
            if self._dequantised is not None and self._dequantised[0] == info:
                self._dequantised = None
        if isinstance(info, (PackedTensor, intquant.IntPackedTensor)):
            for part in info.stored:
                self.release(part)
            return
        buffer = self._maps.get(info.file)
        if buffer is not None and info.end > info.begin:
            drop_pages(buffer, info.begin, info.end)

    def close(self) -> None:
        """Release the maps (a map still viewed by a live tensor is released when that tensor goes)."""
        self._dequantised = None
        for buffer in self._maps.values():
            try:
                buffer.close()
            except BufferError:
                pass
        self._maps.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_reader(artifact: Artifact) -> TensorReader:
    """The reader for the artifact's format: TensorReader for safetensors, GGUFTensorReader for GGUF."""
    if artifact.format == "gguf":
        from tg_verify.artifact.gguf_reader import GGUFTensorReader

        return GGUFTensorReader(artifact)
    return TensorReader(artifact)
