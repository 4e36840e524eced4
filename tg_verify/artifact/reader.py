"""Stream tensors from a resolved artifact: memory-mapped, one at a time, decoded to float32."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType

import torch

from tg_verify.artifact.model import Artifact, TensorInfo
from tg_verify.errors import ArtifactError, UnsupportedDtypeError

# safetensors dtype -> torch dtype that can be viewed directly from the bytes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)


class TensorReader(AbstractContextManager["TensorReader"]):
    """Memory-maps the artifact's weight files lazily; `raw()` views bytes, `float32()` decodes.

    Maps are copy-on-write private (never written), so views are zero-copy and safe to hand to torch.
    """

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, relpath: str) -> mmap.mmap:
        if relpath not in self._maps:
            path = self.artifact.path_of(relpath)
            try:
                with open(path, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    expected = next(f.size for f in self.artifact.files if f.path == relpath)
                    if size != expected:
                        raise ArtifactError(f"{path}: file changed size since it was validated")
                    self._maps[relpath] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise ArtifactError(f"{path}: cannot map ({exc.strerror or exc})") from exc
        return self._maps[relpath]

    def raw(self, info: TensorInfo) -> torch.Tensor:
        """The tensor in its stored dtype, viewed (not copied) from the mapped file."""
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise UnsupportedDtypeError(
                f"{self.artifact.path_of(info.file)}: tensor '{info.name}' has dtype {info.dtype}, which tg-verify "
                f"cannot decode (supported: {', '.join(sorted(TORCH_DTYPES))})")
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        buffer = self._map(info.file)
        flat = torch.frombuffer(buffer, dtype=dtype, count=info.numel, offset=info.begin)
        return flat.view(info.shape)

    def float32(self, info: TensorInfo) -> torch.Tensor:
        """The tensor decoded to a fresh float32 tensor."""
        raw = self.raw(info)
        if raw.dtype == torch.float32:
            return raw.clone()
        return raw.to(torch.float32)

    def stream(self, infos: Iterable[TensorInfo] | None = None) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield (info, float32 tensor) one at a time, in canonical order by default."""
        for info in (self.artifact.tensors if infos is None else infos):
            yield info, self.float32(info)

    def close(self) -> None:
        for buffer in self._maps.values():
            try:
                buffer.close()
            except BufferError:
                pass  # a view still references it; the map is released when the view goes
        self._maps.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
