"""Hand-built safetensors bytes for tests: valid files, and every way a header can lie.

Deliberately independent of the `safetensors` package so a test can write what no correct writer would.
"""

from __future__ import annotations

import json
import struct
from typing import Any

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}


def assemble(header: bytes | str | dict[str, Any], data: bytes = b"", length: int | None = None) -> bytes:
    """8-byte length (the true one unless `length` overrides it) + header bytes + data."""
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode("utf-8")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensors_file(tensors: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None,
                 fill: int = 1) -> bytes:
    """A valid file: tensors laid out contiguously in the given order, data bytes set to `fill`."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    cursor = 0
    for name, (dtype, shape) in tensors.items():
        size = ITEMSIZE[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    return assemble(header, bytes([fill]) * cursor)


def entry(dtype: str = "F32", shape: list[Any] | Any = (2,), offsets: list[Any] | Any = (0, 8)) -> dict[str, Any]:
    """One header entry (lists are copied so callers may pass tuples)."""
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def small_valid() -> bytes:
    """Two F32 tensors and metadata: the seed that fuzzing mutates."""
    return tensors_file({"a.weight": ("F32", [2, 3]), "b.bias": ("F32", [3])}, metadata={"format": "pt"})
