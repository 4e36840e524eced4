"""The format seam: which resolver reads a path, which reader streams an artifact.

A new input format is one reader plus one entry in FORMATS. Entries name their code by import path,
so this module (and `resolve`) stays free of torch and of any format's dependencies until used.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tg_verify.errors import InternalError

if TYPE_CHECKING:
    import torch

    from tg_verify.artifact.model import Artifact, TensorInfo


class Reader(Protocol):
    """What every format's reader provides (TensorReader's interface); thread-safe, a context manager."""

    def raw(self, info: TensorInfo) -> torch.Tensor: ...

    def float32(self, info: TensorInfo, *, finite: bool = False) -> torch.Tensor: ...

    def stream(self, infos: Iterable[TensorInfo] | None = None, *, finite: bool = False
               ) -> Iterator[tuple[TensorInfo, torch.Tensor]]: ...

    def release(self, info: TensorInfo) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *args: Any) -> Any: ...


@dataclass(frozen=True)
class Format:
    """One input format: the file suffixes it claims, its resolver and its reader (as "module:name")."""

    name: str
    suffixes: tuple[str, ...]
    resolver: str  # path -> Artifact (validated, no tensor data read)
    reader: str  # Artifact -> reader with TensorReader's interface (raw, float32, stream, release, close)


FORMATS: dict[str, Format] = {
    "safetensors": Format("safetensors", (".safetensors",), "tg_verify.artifact.layout:resolve_safetensors_file",
                          "tg_verify.artifact.reader:TensorReader"),
    # "gguf": Format("gguf", (".gguf",), "tg_verify.artifact.gguf:resolve_gguf", "tg_verify.artifact.gguf:GGUFReader"),
}

# Weight files of formats tg-verify does not read: reported when found beside a model, never opened.
FOREIGN_WEIGHT_SUFFIXES: tuple[str, ...] = (".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".tflite", ".keras")


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def format_for_path(path: str | os.PathLike[str]) -> Format | None:
    """The format whose suffix the file name ends with, or None."""
    name = Path(path).name
    return next((fmt for fmt in FORMATS.values() if name.endswith(fmt.suffixes)), None)


def other_format_files(names: list[str]) -> dict[str, list[str]]:
    """Among directory entries, the files of each registered format other than safetensors: {format: names}."""
    found: dict[str, list[str]] = {}
    for name in names:
        fmt = format_for_path(name)
        if fmt is not None and fmt.name != "safetensors":
            found.setdefault(fmt.name, []).append(name)
    return found


def resolve_with(fmt: Format, path: str | os.PathLike[str]) -> Artifact:
    """Resolve `path` with `fmt`'s resolver."""
    resolver = _load(fmt.resolver)
    return resolver(Path(path))  # type: ignore[no-any-return]


def open_reader(artifact: Artifact) -> Reader:
    """A reader over `artifact`'s tensors, of the artifact's format (imports torch on first use)."""
    fmt = FORMATS.get(artifact.format)
    if fmt is None:
        raise InternalError(f"{artifact.root}: no reader for format {artifact.format!r}")
    reader: Reader = _load(fmt.reader)(artifact)
    return reader
