"""Safetensors header parsing and validation, treating every byte as untrusted.

Mirrors the reference parser's checks (safetensors `read_metadata` + `Metadata::validate`, 1-10 in
docs/artifact.md), each with its own error class, and adds what the reference lacks: duplicate JSON
keys, NaN/Infinity literals, control characters or lone surrogates in names, a nesting bound and a
stricter size cap. No tensor data is read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tg_verify.artifact.errors import (
    DataTruncatedError,
    DuplicateKeyError,
    GapError,
    HeaderEncodingError,
    HeaderJsonError,
    HeaderLengthError,
    HeaderNestingError,
    HeaderSchemaError,
    HeaderTooLargeError,
    HeaderTooSmallError,
    MetadataError,
    MisalignedSizeError,
    OffsetError,
    OverlapError,
    ShapeError,
    SizeMismatchError,
    SizeOverflowError,
    TensorNameError,
    TooManyTensorsError,
    TrailingBytesError,
    UnknownDtypeError,
    about_file,
    shown,
)
from tg_verify.artifact.model import DTYPE_BITS, tensor_budget
from tg_verify.artifact.safeio import open_regular, os_error, read_exactly, strict_json

MAX_HEADER_BYTES = 25_000_000  # huggingface_hub's cap (SAFETENSORS_MAX_HEADER_LENGTH); the Rust reference allows 100 MB
MAX_RANK = 8  # no published checkpoint stores a tensor of higher rank
MAX_JSON_DEPTH = 4  # a valid header nests 3 deep: {name: {shape: [...]}}; deeper is refused by the schema
JSON_WHITESPACE = b" \t\r\n"
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


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
    canonical: bool  # False when padded beyond the writer's 8-byte alignment (or leading whitespace)


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return document


def _naturals(values: Any) -> bool:
    """A list of non-negative integers (JSON integers only: no booleans, no floats)."""
    return type(values) is list and all(type(v) is int and v >= 0 for v in values)


def valid_name(text: str) -> bool:
    """A tensor or file name we accept: non-empty, no control characters, no lone surrogates.

    (Lone surrogates come from JSON escapes or undecodable file names and cannot be written back as UTF-8.)
    """
    if not text:
        return False
    if text.isprintable():
        return text.isascii() or _encodable(text)
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        return False
    return _encodable(text)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def header_length(prefix: bytes, file_size: int, where: str, max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """Checks 1-3: the 8-byte little-endian length, within the cap and within the file."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderTooSmallError(f"{where}: file is {file_size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(prefix[:8], "little")  # the unsigned 64-bit little-endian length
    if length > max_header_bytes:
        raise HeaderTooLargeError(f"{where}: header length {length} exceeds the limit of {max_header_bytes} bytes")
    if 8 + length > file_size:
        raise HeaderLengthError(f"{where}: header length {length} runs past the end of the {file_size}-byte file")
    return length


def _document(raw: bytes, where: str) -> tuple[dict[str, Any], bool]:
    """Checks 4-5 (encoding, JSON): the header object and whether it is canonical (unpadded)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderEncodingError(f"{where}: header is not valid UTF-8 (byte {exc.start})") from None
    stripped = raw.strip(JSON_WHITESPACE)
    if not stripped.startswith(b"{"):
        raise HeaderJsonError(f"{where}: header is not a JSON object (expected '{{' after optional whitespace)")
    try:
        document = strict_json(stripped.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _Duplicate as dup:
        raise DuplicateKeyError(f"{where}: header has the key '{shown(dup.key)}' twice in one object") from None
    except RecursionError:
        # CPython's json scanner bounds its own recursion (RecursionError, no stack overflow): a valid header
        # nests 3 deep, so anything that reaches the interpreter's limit is hostile.
        raise HeaderNestingError(f"{where}: header JSON nests deeper than the parser's recursion limit "
                                 f"(a valid header nests {MAX_JSON_DEPTH - 1} levels)") from None
    except ValueError as exc:
        raise HeaderJsonError(f"{where}: header is not valid JSON ({shown(str(exc)[:120])})") from None
    if not isinstance(document, dict):
        raise HeaderJsonError(f"{where}: header is not a JSON object")
    # The reference writer pads with up to 7 trailing spaces to align the data section to 8 bytes; that is
    # canonical. Leading whitespace, or other or longer padding, is accepted but reported.
    tail = raw[len(raw.rstrip(JSON_WHITESPACE)):]
    return document, raw.startswith(b"{") and tail == b" " * len(tail) and len(tail) < 8


def _metadata(spec: Any, where: str) -> dict[str, str]:
    if not isinstance(spec, dict):
        raise MetadataError(f"{where}: __metadata__ must be an object of strings to strings, "
                            f"got {type(spec).__name__}")
    for key, value in spec.items():
        if not isinstance(value, str):
            raise MetadataError(f"{where}: __metadata__['{shown(key)}'] must be a string, got {type(value).__name__}")
        for text in (key, value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise MetadataError(f"{where}: __metadata__ holds a lone surrogate in '{shown(key)}'") from None
    return dict(spec)


def _entry(name: str, spec: Any, data_len: int, where: str) -> RawTensor:
    """One tensor entry: schema (check 5) and its own size arithmetic (checks 7-9)."""
    if not valid_name(name):
        raise TensorNameError(f"{where}: tensor name '{shown(name)}' is empty or holds control characters")
    if type(spec) is not dict or spec.keys() != ENTRY_KEYS:
        got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise HeaderSchemaError(f"{where}: tensor '{shown(name)}': expected exactly the keys data_offsets, dtype, "
                                f"shape, got {shown(repr(got), 120)}")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise UnknownDtypeError(f"{where}: tensor '{shown(name)}': unknown dtype {shown(repr(dtype)[:40])} "
                                f"(expected one of {', '.join(DTYPE_BITS)})")
    if not _naturals(shape) or len(shape) > MAX_RANK:
        raise ShapeError(f"{where}: tensor '{shown(name)}': shape must be a list of at most {MAX_RANK} "
                         f"non-negative integers, got {shown(repr(shape)[:80])}")
    if not _naturals(offsets) or len(offsets) != 2 or offsets[1] < offsets[0]:
        raise OffsetError(f"{where}: tensor '{shown(name)}': data_offsets must be [begin, end] with "
                          f"0 <= begin <= end, got {shown(repr(offsets)[:80])}")
    start, stop = offsets
    nbits = math.prod(shape) * DTYPE_BITS[dtype]
    if nbits >= 1 << 64:
        raise SizeOverflowError(f"{where}: tensor '{shown(name)}': {dtype}{shape} is larger than 2^64 bits")
    if nbits % 8:
        raise MisalignedSizeError(f"{where}: tensor '{shown(name)}': {dtype}{shape} is {nbits} bits, "
                                  f"not a whole number of bytes")
    if stop - start != nbits // 8:
        raise SizeMismatchError(f"{where}: tensor '{shown(name)}': {dtype}{shape} needs {nbits // 8} bytes but "
                                f"data_offsets [{start}, {stop}] span {stop - start}")
    if stop > data_len:
        raise DataTruncatedError(f"{where}: tensor '{shown(name)}': data_offsets end at {stop} but the data section "
                                 f"holds {data_len} bytes (file truncated or offsets past the end)")
    return RawTensor(name, dtype, tuple(shape), start, stop)


def parse_header(raw: bytes, file_size: int, where: str) -> tuple[tuple[RawTensor, ...], dict[str, str], bool]:
    """Checks 4-10 on the header bytes of a file of `file_size` bytes: (tensors by offset, metadata, canonical)."""
    document, canonical = _document(raw, where)
    data_len = file_size - 8 - len(raw)
    too_many = tensor_budget(len(document) - ("__metadata__" in document), data_len)
    if too_many is not None:  # before any per-tensor work
        raise TooManyTensorsError(f"{where}: {too_many}; set TG_VERIFY_MAX_TENSORS to a larger count to accept a "
                                  f"file like this")
    metadata: dict[str, str] = {}
    entries: list[RawTensor] = []
    for name, spec in document.items():
        if name == "__metadata__":
            metadata = _metadata(spec, where)
        else:
            entries.append(_entry(name, spec, data_len, where))
    entries.sort(key=lambda t: (t.start, t.stop))
    cursor, previous = 0, None
    for entry in entries:  # check 6: contiguous, from 0, no overlap and no hole
        if entry.start < cursor:
            raise OverlapError(f"{where}: tensor '{shown(entry.name)}': data_offsets start at {entry.start}, inside "
                               f"'{shown(previous)}' which ends at {cursor} (expected {cursor})")
        if entry.start > cursor:
            after = f"after '{shown(previous)}'" if previous is not None else "at the start of the data section"
            raise GapError(f"{where}: tensor '{shown(entry.name)}': data_offsets start at {entry.start}, leaving "
                           f"{entry.start - cursor} unindexed bytes {after} (expected {cursor})")
        cursor, previous = entry.stop, entry.name
    if cursor != data_len:  # check 10 (cursor > data_len was refused per tensor above)
        raise TrailingBytesError(f"{where}: tensors cover {cursor} data bytes but the file holds {data_len} "
                                 f"after the header ({data_len - cursor} trailing bytes)")
    return tuple(entries), metadata, canonical


def read_header(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of one safetensors file without touching its data."""
    path = Path(path)
    where = shown(path)
    fd, info = open_regular(path, "weights file")
    try:
        try:
            prefix = read_exactly(fd, 8)
            with about_file(path):
                length = header_length(prefix, info.st_size, where, max_header_bytes)
            raw = read_exactly(fd, length)
        except OSError as exc:
            raise os_error(path, exc, "weights file") from None
    finally:
        os.close(fd)
    if len(raw) != length:
        raise HeaderLengthError(f"{where}: header truncated while reading ({len(raw)} of {length} bytes)",
                                file=str(path))
    with about_file(path):
        tensors, metadata, canonical = parse_header(raw, info.st_size, where)
    return Header(path=path, file_size=info.st_size, data_start=8 + length, tensors=tensors, metadata=metadata,
                  canonical=canonical)


def validate_bytes(blob: bytes, where: str = "<bytes>", *, max_header_bytes: int = MAX_HEADER_BYTES
                   ) -> tuple[tuple[RawTensor, ...], dict[str, str], bool]:
    """All ten checks on an in-memory safetensors file (used by the fuzz suite and by tests)."""
    length = header_length(blob[:8], len(blob), where, max_header_bytes)
    return parse_header(blob[8:8 + length], len(blob), where)
