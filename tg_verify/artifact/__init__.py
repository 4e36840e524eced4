"""Artifact layer: resolve a model path, validate safetensors headers, stream tensors."""

from tg_verify.artifact.categories import CATEGORIES, Category, categorize
from tg_verify.artifact.digest import file_digests, root_digest
from tg_verify.artifact.header import read_header
from tg_verify.artifact.layout import resolve
from tg_verify.artifact.model import Artifact, ArtifactFile, TensorInfo, natural_key
from tg_verify.artifact.reader import TensorReader

__all__ = [
    "Artifact", "ArtifactFile", "CATEGORIES", "Category", "TensorInfo", "TensorReader", "categorize",
    "file_digests", "natural_key", "read_header", "resolve", "root_digest",
]
