"""Artifact layer: resolve a model path, validate safetensors headers, stream tensors.

`TensorReader` (and torch with it) is imported on first use, so header-only work such as
`tg-verify inspect` starts without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tg_verify.artifact import naming
from tg_verify.artifact.categories import CATEGORIES, Category, categorize
from tg_verify.artifact.digest import file_digests, root_digest
from tg_verify.artifact.formats import FORMATS, Format, open_reader
from tg_verify.artifact.header import read_header
from tg_verify.artifact.layout import resolve
from tg_verify.artifact.model import Artifact, ArtifactFile, TensorInfo, natural_key

if TYPE_CHECKING:
    from tg_verify.artifact.reader import TensorReader

__all__ = [
    "FORMATS", "Artifact", "ArtifactFile", "CATEGORIES", "Category", "Format", "TensorInfo", "TensorReader",
    "categorize", "file_digests", "naming", "natural_key", "open_reader", "read_header", "resolve", "root_digest",
]


def __getattr__(name: str) -> Any:
    if name == "TensorReader":
        from tg_verify.artifact.reader import TensorReader

        return TensorReader
    raise AttributeError(f"module 'tg_verify.artifact' has no attribute {name!r}")
