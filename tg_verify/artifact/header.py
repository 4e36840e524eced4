"""Safetensors header parsing and validation, treating every byte as untrusted.

Mirrors the reference implementation's checks (safetensors `Metadata::validate`) and adds
the ones it lacks: duplicate JSON keys, control characters in names, a stricter size cap.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tg_verify.artifact.model import DTYPE_BITS
from tg_verify.errors import HeaderError

MAX_HEADER_BYTES = 25_000_000  # huggingface_hub's cap; the Rust reference allows 100 MB
MAX_RANK = 8
MAX_JSON_DEPTH = 4


class HeaderTooSmallError(HeaderError):
    code = "TGV_HEADER_TOO_SMALL"


class HeaderTooLargeError(HeaderError):
    code = "TGV_HEADER_TOO_LARGE"


class HeaderLengthError(HeaderError):
    code = "TGV_HEADER_LENGTH"


class HeaderEncodingError(HeaderError):
    code = "TGV_HEADER_ENCODING"


class HeaderJsonError(HeaderError):
    code = "TGV_HEADER_JSON"


class HeaderSchemaError(HeaderError):
    code = "TGV_HEADER_SCHEMA"


class DuplicateTensorError(HeaderError):
    code = "TGV_DUPLICATE_TENSOR"


class TensorNameError(HeaderError):
    code = "TGV_TENSOR_NAME"


class UnknownDtypeError(HeaderError):
    code = "TGV_UNKNOWN_DTYPE"


class ShapeError(HeaderError):
    code = "TGV_SHAPE"


class OffsetError(HeaderError):
    code = "TGV_OFFSETS"


class SizeMismatchError(HeaderError):
    code = "TGV_SIZE_MISMATCH"


class CoverageError(HeaderError):
    code = "TGV_COVERAGE"


class MetadataError(HeaderError):
    code = "TGV_METADATA"


@dataclass(frozen=True)
class RawTensor:
    """A header entry; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class Header:
    """A validated header: its tensors (in data order), metadata and where data begins."""

    path: Path
    file_size: int
    data_start: int  # 8 + header length
    tensors: tuple[RawTensor, ...]
    metadata: dict[str, str]
    canonical: bool  # False when the JSON is whitespace-padded


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _depth_ok(text: str) -> bool:
    """Cheap nesting bound before json.loads, so deeply nested JSON cannot exhaust the stack."""
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of one safetensors file without touching its data."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            if file_size < 8:
                raise HeaderTooSmallError(f"{where}: file is {file_size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > max_header_bytes:
                raise HeaderTooLargeError(
                    f"{where}: header length {length} exceeds the limit of {max_header_bytes} bytes")
            if 8 + length > file_size:
                raise HeaderLengthError(
                    f"{where}: header length {length} runs past the end of the {file_size}-byte file")
            raw = handle.read(length)
    except HeaderError:
        raise
    except OSError as exc:
        raise HeaderError(f"{where}: cannot read ({exc.strerror or exc})") from exc
    if len(raw) != length:
        raise HeaderLengthError(f"{where}: header truncated ({len(raw)} of {length} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderEncodingError(f"{where}: header is not valid UTF-8 (byte {exc.start})") from exc
    stripped = text.strip(" \t\r\n")
    if not stripped.startswith("{"):
        raise HeaderJsonError(f"{where}: header is not a JSON object")
    if not _depth_ok(stripped):
        raise HeaderJsonError(f"{where}: header JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        document = json.loads(stripped, object_pairs_hook=_reject_duplicates)
    except _Duplicate as dup:
        raise DuplicateTensorError(f"{where}: header names '{dup.key}' twice") from None
    except (ValueError, RecursionError) as exc:
        raise HeaderJsonError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise HeaderJsonError(f"{where}: header is not a JSON object")

    metadata: dict[str, str] = {}
    entries: list[RawTensor] = []
    for name, spec in document.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise MetadataError(f"{where}: __metadata__ must map strings to strings")
            metadata = dict(spec)
            continue
        if not name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise TensorNameError(f"{where}: tensor name {name!r} is empty or holds control characters")
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise HeaderSchemaError(
                f"{where}: tensor '{name}': expected exactly the keys dtype, shape, data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise UnknownDtypeError(f"{where}: tensor '{name}': unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
            raise ShapeError(
                f"{where}: tensor '{name}': shape must be a list of at most {MAX_RANK} non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
            raise OffsetError(
                f"{where}: tensor '{name}': data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        nbits = math.prod(shape) * DTYPE_BITS[dtype]
        if nbits % 8:
            raise SizeMismatchError(f"{where}: tensor '{name}': {shape} x {dtype} is not a whole number of bytes")
        if offsets[1] - offsets[0] != nbits // 8:
            raise SizeMismatchError(
                f"{where}: tensor '{name}': {dtype}{shape} needs {nbits // 8} bytes but data_offsets span "
                f"{offsets[1] - offsets[0]}")
        entries.append(RawTensor(name, dtype, tuple(shape), offsets[0], offsets[1]))

    entries.sort(key=lambda t: (t.start, t.stop))
    cursor = 0
    for entry in entries:
        if entry.start != cursor:
            kind = "overlaps the previous tensor" if entry.start < cursor else "leaves a gap after the previous tensor"
            raise OffsetError(
                f"{where}: tensor '{entry.name}': data_offsets start at {entry.start}, expected {cursor} ({kind})")
        cursor = entry.stop
    data_start = 8 + length
    if data_start + cursor != file_size:
        raise CoverageError(
            f"{where}: tensors cover {cursor} data bytes but the file holds {file_size - data_start} "
            f"({'truncated' if data_start + cursor > file_size else 'trailing bytes'})")
    return Header(path=path, file_size=file_size, data_start=data_start, tensors=tuple(entries),
                  metadata=metadata, canonical=(stripped == text))
