"""GGUF (llama.cpp) files as untrusted artifacts: the header validated with bounded reads, then mapped.

The `gguf` package (the format's own library, maintained with llama.cpp) defines the format's
constants and dequantises the tensors, but its GGUFReader memory-maps the file and trusts every count,
length and offset. So the header is parsed here, every read bounds-checked, with llama.cpp's own rules
(ggml/src/gguf.cpp) plus tg-verify's (docs/artifact.md "GGUF"); only validated byte ranges reach the
package's dequantisers (tg_verify/artifact/gguf_reader.py). No tensor data is read here.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tg_verify.artifact.errors import (
    DataTruncatedError,
    DuplicateKeyError,
    DuplicateTensorError,
    GapError,
    GGUFAlignmentError,
    GGUFCountError,
    GGUFKeyError,
    GGUFLengthError,
    GGUFMagicError,
    GGUFPaddingError,
    GGUFTruncatedError,
    GGUFValueTypeError,
    GGUFVersionError,
    HeaderTooLargeError,
    HeaderTooSmallError,
    MisalignedSizeError,
    OverlapError,
    ShapeError,
    SizeOverflowError,
    TensorNameError,
    TooManyTensorsError,
    TrailingBytesError,
    UnknownDtypeError,
    about_file,
    shown,
)
from tg_verify.artifact.header import valid_name
from tg_verify.artifact.model import Artifact, ArtifactFile, tensor_budget
from tg_verify.artifact.safeio import open_regular, os_error

if TYPE_CHECKING:
    from tg_verify.artifact.gguf_reader import GGUFTensorReader

SUFFIX = ".gguf"
MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 (32-bit counts) is refused by llama.cpp too; v3 added big-endian files, refused here
FIXED_BYTES = 24  # magic, version, tensor count, key-value count
# Everything before the data section (metadata with the tokenizer's vocabulary and merges, tensor infos).
# Published models' headers are a few MB to ~15 MB (vocabularies of 128-262k tokens plus BPE merges).
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_ALIGNMENT = 1 << 20  # llama.cpp accepts any power of two; larger ones only pad the file with zeros
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1: llama.cpp refuses longer tensor names
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_LIMIT = 1 << 63
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, one key byte, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8  # name length, one name byte, n_dims, type, offset
VOCABULARY_KEY = "tokenizer.ggml.tokens"  # token id -> the token's text, kept (Artifact.vocabulary) for the sketch
ARRAY_VALUES_KEPT = 64  # numeric arrays up to this length keep their values (for metadata); longer ones a count

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

__all__ = ["GGUFHeader", "GGUFTensor", "GGUFTensorReader", "GGUFValue", "MAX_HEADER_BYTES", "PLAIN_TYPES", "SUFFIX",
           "decodable", "dequantisable", "is_gguf_path", "parse_gguf", "read_gguf_header", "resolve_gguf",
           "validate_gguf_bytes"]


def __getattr__(name: str) -> Any:
    if name == "GGUFTensorReader":  # imports torch: only when tensors are read
        from tg_verify.artifact.gguf_reader import GGUFTensorReader

        return GGUFTensorReader
    raise AttributeError(f"module 'tg_verify.artifact.gguf' has no attribute {name!r}")


# ggml types stored as plain little-endian numbers: read like the safetensors dtypes of the same name.
PLAIN_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


@lru_cache(maxsize=1)
def dequantisable() -> frozenset[str]:
    """The ggml quantised types the installed `gguf` package can dequantise (asked by dequantising one
    block of zeros of each type: the package's public API, no private registry)."""
    import gguf
    import numpy as np

    names = set()
    for qtype, (block, type_size) in gguf.GGML_QUANT_SIZES.items():
        if qtype.name in PLAIN_TYPES:
            continue
        try:
            values = gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except Exception:  # a probe: whatever the package cannot dequantise is refused when read, with its name
            continue
        if values.shape == (1, block):
            names.add(qtype.name)
    return frozenset(names)


def decodable(dtype: str) -> bool:
    """Whether a GGUF tensor of this ggml type can be decoded to float32 here."""
    return dtype in PLAIN_TYPES or dtype in dequantisable()


def is_gguf_path(name: str) -> bool:
    """Whether a file name is a GGUF model file by its suffix (case-insensitive, as llama.cpp's tools)."""
    return name.lower().endswith(SUFFIX)


@dataclass(frozen=True)
class GGUFValue:
    """One metadata value: `value` for scalars and strings (str, or bytes when not UTF-8); arrays keep
    `count`, `item_type` and, when short and numeric, their values."""

    type: str  # GGUFValueType name: UINT8 ... FLOAT64, BOOL, STRING, ARRAY
    value: Any = None
    count: int = 0
    item_type: str | None = None


@dataclass(frozen=True)
class GGUFTensor:
    """A validated tensor info. `ne` is ggml's order (innermost first); `begin`/`end` are absolute file offsets."""

    name: str
    ggml_type: int
    type_name: str
    ne: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.ne)


@dataclass(frozen=True)
class GGUFHeader:
    """A validated GGUF header: metadata, tensors in file order, and where the data section starts."""

    path: Path
    file_size: int
    version: int
    alignment: int
    data_start: int
    metadata: dict[str, GGUFValue]
    tensors: tuple[GGUFTensor, ...]


def _constants() -> Any:
    import gguf.constants  # the format's own definitions (imports numpy: only when a GGUF file is read)

    return gguf.constants


class _Cursor:
    """Bounded little-endian reads over the file's bytes: every read is checked against the file's size
    and the header limit before it happens, so no count or length is trusted."""

    def __init__(self, buffer: Any, size: int, where: str, limit: int) -> None:
        self.buffer = buffer
        self.size = size
        self.where = where
        self.limit = min(size, limit)
        self.header_limit = limit
        self.pos = 0

    def _past(self, end: int, what: str) -> Exception:
        if end > self.size:
            return GGUFTruncatedError(f"{self.where}: file ends inside {what} (needs bytes up to {end}, the file "
                                      f"has {self.size})")
        return HeaderTooLargeError(f"{self.where}: header runs past the {self.header_limit}-byte limit while "
                                   f"reading {what}")

    def take(self, count: int, what: str) -> int:
        start = self.pos
        if start + count > self.limit:
            raise self._past(start + count, what)
        self.pos = start + count
        return start

    def u32(self, what: str) -> int:
        return int(_U32.unpack_from(self.buffer, self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack_from(self.buffer, self.take(8, what))[0])

    def length(self, what: str, unit: int = 1) -> int:
        """A u64 length of `unit`-byte items that must fit in what is left of the file and the header."""
        count = self.u64(f"the length of {what}")
        need = count * unit
        if self.pos + need > self.limit:
            left = self.size - self.pos
            if self.pos + need > self.size:
                raise GGUFLengthError(f"{self.where}: {what} declares length {count}, but only {left} bytes are "
                                      f"left in the file")
            raise HeaderTooLargeError(f"{self.where}: {what} declares length {count}, past the "
                                      f"{self.header_limit}-byte header limit")
        return count

    def string(self, what: str) -> bytes:
        count = self.length(what)
        start = self.take(count, what)
        return bytes(self.buffer[start:start + count])

    def skip_strings(self, count: int, what: str, keep: list[bytes] | None = None) -> None:
        """Walk `count` length-prefixed strings (a vocabulary), copying them into `keep` when given."""
        buffer, pos, limit, unpack = self.buffer, self.pos, self.limit, _U64.unpack_from
        for index in range(count):
            if pos + 8 > limit:
                self.pos = pos
                raise self._past(pos + 8, f"item {index} of {what}")
            start = pos + 8
            pos = start + unpack(buffer, pos)[0]
            if keep is not None and pos <= limit:
                keep.append(bytes(buffer[start:pos]))
            if pos > limit:
                if pos > self.size:
                    raise GGUFLengthError(f"{self.where}: item {index} of {what} runs past the end of the file")
                raise HeaderTooLargeError(f"{self.where}: item {index} of {what} runs past the "
                                          f"{self.header_limit}-byte header limit")
        self.pos = pos


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _value(cursor: _Cursor, kind: int, key: str, c: Any) -> GGUFValue:
    types = c.GGUFValueType
    what = f"the value of '{shown(key)}'"
    if kind == types.STRING:
        return GGUFValue("STRING", _text(cursor.string(what)))
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        (value,) = struct.unpack_from(fmt, cursor.buffer, cursor.take(struct.calcsize(fmt), what))
        return GGUFValue(types(kind).name, bool(value) if kind == types.BOOL else value)
    if kind != types.ARRAY:
        raise GGUFValueTypeError(f"{cursor.where}: key '{shown(key)}' has unknown value type {kind} (expected "
                                 f"0-12)")
    item = cursor.u32(f"the item type of {what}")
    if item == types.ARRAY:
        raise GGUFValueTypeError(f"{cursor.where}: key '{shown(key)}' is an array of arrays, which llama.cpp "
                                 f"refuses (arrays nest one level)")
    if item != types.STRING and item not in _SCALARS:
        raise GGUFValueTypeError(f"{cursor.where}: key '{shown(key)}' is an array of unknown type {item} "
                                 f"(expected 0-8 or 10-12)")
    if item == types.STRING:
        count = cursor.length(what, unit=8)
        keep: list[bytes] | None = [] if key == VOCABULARY_KEY else None
        cursor.skip_strings(count, what, keep)
        return GGUFValue("ARRAY", None if keep is None else tuple(keep), count, "STRING")
    fmt = _SCALARS[item]
    size = struct.calcsize(fmt)
    count = cursor.length(what, unit=size)
    start = cursor.take(count * size, what)
    values = None
    if count <= ARRAY_VALUES_KEPT:
        values = list(struct.unpack_from(f"<{count}{fmt[1:]}", cursor.buffer, start))
    return GGUFValue("ARRAY", values, count, types(item).name)


_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
                            11: "<q", 12: "<d"}


def _key(cursor: _Cursor, index: int, seen: dict[str, GGUFValue]) -> str:
    raw = cursor.string(f"key {index}")
    text = _text(raw)
    if not isinstance(text, str) or not valid_name(text):
        raise GGUFKeyError(f"{cursor.where}: metadata key {index} ('{shown(raw.decode('utf-8', 'replace'))}') is "
                           f"empty, not UTF-8, or holds control characters")
    if text in seen:
        raise DuplicateKeyError(f"{cursor.where}: metadata key '{shown(text)}' appears twice (llama.cpp refuses "
                                f"duplicate keys)")
    return text


def _alignment(metadata: dict[str, GGUFValue], where: str) -> int:
    entry = metadata.get("general.alignment")
    if entry is None:
        return int(_constants().GGUF_DEFAULT_ALIGNMENT)
    if entry.type != "UINT32":
        raise GGUFAlignmentError(f"{where}: general.alignment must be a uint32, got {entry.type.lower()}")
    value = int(entry.value)
    if value <= 0 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise GGUFAlignmentError(f"{where}: general.alignment {value} is not a power of two in [1, {MAX_ALIGNMENT}]")
    return value


def _zero_padding(buffer: Any, start: int, stop: int, where: str, what: str) -> None:
    if stop > start and bytes(buffer[start:stop]).count(0) != stop - start:
        raise GGUFPaddingError(f"{where}: the {stop - start} alignment padding bytes {what} are not all zero "
                               f"(padding can hide a payload; writers pad with zeros)")


def _tensor_info(cursor: _Cursor, index: int, names: set[str], c: Any) -> tuple[str, int, tuple[int, ...], int]:
    """One tensor info: (name, ggml type, ne, offset relative to the data section), each field checked."""
    where = cursor.where
    raw = cursor.string(f"the name of tensor {index}")
    name = _text(raw)
    if not isinstance(name, str) or not valid_name(name):
        raise TensorNameError(f"{where}: tensor {index} has a name that is empty, not UTF-8 or holds control "
                              f"characters ('{shown(raw.decode('utf-8', 'replace'))}')")
    if len(raw) > MAX_NAME_BYTES:
        raise TensorNameError(f"{where}: tensor '{shown(name)}': name is {len(raw)} bytes; llama.cpp refuses names "
                              f"over {MAX_NAME_BYTES}")
    if name in names:
        raise DuplicateTensorError(f"{where}: tensor '{shown(name)}' appears twice (llama.cpp refuses duplicate "
                                   f"tensor names)")
    names.add(name)
    dims = cursor.u32(f"the dimension count of tensor '{shown(name)}'")
    if dims > MAX_DIMS:
        raise ShapeError(f"{where}: tensor '{shown(name)}' has {dims} dimensions; ggml allows at most {MAX_DIMS}")
    ne = tuple(cursor.u64(f"the shape of tensor '{shown(name)}'") for _ in range(dims))
    if any(n >= INT64_LIMIT for n in ne):
        raise ShapeError(f"{where}: tensor '{shown(name)}': shape {list(ne)} has a dimension that is negative as "
                         f"int64")
    kind = cursor.u32(f"the type of tensor '{shown(name)}'")
    sizes = c.GGML_QUANT_SIZES
    known = {int(t): t for t in sizes}
    if kind not in known:
        raise UnknownDtypeError(f"{where}: tensor '{shown(name)}' has ggml type {kind}, which is not a tensor type "
                                f"of GGUF (removed or unknown)")
    block, type_size = sizes[known[kind]]
    span = math.prod(max(n, 1) for n in ne)  # a 0 in the shape does not excuse the others (numpy, gguf-py check too)
    if span >= INT64_LIMIT or span * type_size >= INT64_LIMIT:
        raise SizeOverflowError(f"{where}: tensor '{shown(name)}': shape {list(ne)} of {known[kind].name} spans 2^63 "
                                f"elements or bytes")
    row = ne[0] if ne else 1
    if row % block:
        raise MisalignedSizeError(f"{where}: tensor '{shown(name)}': rows of {row} elements are not a multiple of "
                                  f"the {known[kind].name} block size {block}")
    offset = cursor.u64(f"the data offset of tensor '{shown(name)}'")
    return name, kind, ne, offset


def parse_gguf(buffer: Any, size: int, where: str, path: Path | None = None,
               max_header_bytes: int = MAX_HEADER_BYTES) -> GGUFHeader:
    """Validate a whole GGUF file held in `buffer` (bytes or a read-only map of `size` bytes)."""
    c = _constants()
    if size < FIXED_BYTES:
        raise HeaderTooSmallError(f"{where}: file is {size} bytes, shorter than the {FIXED_BYTES}-byte GGUF header")
    cursor = _Cursor(buffer, size, where, max_header_bytes)
    magic = bytes(buffer[cursor.take(4, "the magic"):4])
    if magic != MAGIC:
        raise GGUFMagicError(f"{where}: does not start with the GGUF magic (got {magic!r})")
    version = cursor.u32("the version")
    if version not in VERSIONS:
        hint = " (a big-endian file, or a byte-swapped version)" if version and not version & 0xFFFF else ""
        raise GGUFVersionError(f"{where}: GGUF version {version}{hint} is not supported (expected 2 or 3)")
    tensor_count = cursor.u64("the tensor count")
    kv_count = cursor.u64("the key-value count")
    for count, what in ((tensor_count, "tensor count"), (kv_count, "key-value count")):
        if count >= INT64_LIMIT:
            raise GGUFCountError(f"{where}: {what} {count} is negative as int64 (llama.cpp refuses it)")
    room = cursor.limit - cursor.pos
    if kv_count * MIN_KV_BYTES + tensor_count * MIN_TENSOR_INFO_BYTES > room:
        raise GGUFCountError(f"{where}: {kv_count} key-value pairs and {tensor_count} tensors cannot fit in the "
                             f"{room} header bytes the file can hold")
    too_many = tensor_budget(tensor_count, size - cursor.pos)  # before any per-tensor work
    if too_many:
        raise TooManyTensorsError(f"{where}: {too_many}; set TG_VERIFY_MAX_TENSORS to a larger count to accept it")
    metadata: dict[str, GGUFValue] = {}
    for index in range(kv_count):
        key = _key(cursor, index, metadata)
        metadata[key] = _value(cursor, cursor.u32(f"the value type of '{shown(key)}'"), key, c)
    alignment = _alignment(metadata, where)
    names: set[str] = set()
    infos = [_tensor_info(cursor, index, names, c) for index in range(tensor_count)]
    header_end = cursor.pos
    data_start = -(-header_end // alignment) * alignment
    _zero_padding(buffer, header_end, min(data_start, size), where, "after the tensor infos")
    if infos and data_start > size:
        raise DataTruncatedError(f"{where}: the data section would start at byte {data_start}, past the end of the "
                                 f"{size}-byte file")
    sizes = c.GGML_QUANT_SIZES
    tensors: list[GGUFTensor] = []
    cursor_offset, previous = 0, None
    for name, kind, ne, offset in infos:  # llama.cpp's rule: in info order, contiguous, each padded to alignment
        qtype = c.GGMLQuantizationType(kind)
        block, type_size = sizes[qtype]
        nbytes = math.prod(ne) // block * type_size
        begin = data_start + offset
        end = begin + nbytes
        if end > size:
            raise DataTruncatedError(f"{where}: tensor '{shown(name)}' ends at byte {end}, past the end of the "
                                     f"{size}-byte file (truncated, or offsets past the end)")
        if offset != cursor_offset:
            after = f"after '{shown(previous)}'" if previous is not None else "at the start of the data section"
            cls = OverlapError if offset < cursor_offset else GapError
            raise cls(f"{where}: tensor '{shown(name)}' has data offset {offset}, expected {cursor_offset} {after} "
                      f"(tensors are stored in order, each padded to {alignment} bytes)")
        padded = -(-nbytes // alignment) * alignment
        _zero_padding(buffer, end, min(begin + padded, size), where, f"after tensor '{shown(name)}'")
        tensors.append(GGUFTensor(name, kind, qtype.name, ne, begin, end))
        cursor_offset += padded
        previous = name
    data_end = data_start + cursor_offset if infos else data_start
    if size > data_end:
        raise TrailingBytesError(f"{where}: {size - data_end} bytes after the end of the data section (at byte "
                                 f"{data_end})")
    return GGUFHeader(path=path or Path(where), file_size=size, version=version, alignment=alignment,
                      data_start=data_start, metadata=metadata, tensors=tuple(tensors))


def read_gguf_header(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> GGUFHeader:
    """Read and validate one GGUF file's header, offsets and padding, without touching tensor data."""
    path = Path(path)
    where = shown(path)
    fd, info = open_regular(path, "GGUF file")
    try:
        if info.st_size < FIXED_BYTES:
            raise HeaderTooSmallError(f"{where}: file is {info.st_size} bytes, shorter than the {FIXED_BYTES}-byte "
                                      f"GGUF header", file=str(path))
        try:
            with mmap.mmap(fd, info.st_size, access=mmap.ACCESS_READ) as buffer, about_file(path):
                return parse_gguf(buffer, info.st_size, where, path, max_header_bytes)
        except OSError as exc:
            raise os_error(path, exc, "GGUF file") from None
    finally:
        os.close(fd)


def validate_gguf_bytes(blob: bytes, where: str = "<bytes>", *, max_header_bytes: int = MAX_HEADER_BYTES
                        ) -> GGUFHeader:
    """All checks on an in-memory GGUF file (used by the fuzz suite and by tests)."""
    return parse_gguf(blob, len(blob), where, None, max_header_bytes)


def resolve_gguf(path: str | os.PathLike[str], warnings: tuple[str, ...] = ()) -> Artifact:
    """Resolve one .gguf file to an Artifact with Hugging Face tensor names, shapes and config.

    The header is validated first; then the architecture's metadata and tensors are mapped onto the
    family tg-verify knows (tg_verify/artifact/gguf_names.py). Tensors llama.cpp would not load for that
    architecture are reported, never fingerprinted.
    """
    from tg_verify.artifact.gguf_names import map_model

    path = Path(path)
    header = read_gguf_header(path)
    with about_file(path):
        mapped = map_model(header, shown(path))
    notes = list(warnings) + list(mapped.notes)
    if os.path.islink(path):
        notes.append(f"followed a symbolic link ({shown(path.name)} -> {shown(os.readlink(path))}); the digest is of "
                     f"the link target")
    stem = path.name[: -len(SUFFIX)] if is_gguf_path(path.name) else path.name
    too_many = tensor_budget(len(mapped.tensors), sum(t.nbytes for t in mapped.tensors))  # experts multiply
    if too_many:
        raise TooManyTensorsError(f"{shown(path)}: {too_many}; set TG_VERIFY_MAX_TENSORS to a larger count to "
                                  f"accept it", file=str(path))
    arch = header.metadata["general.architecture"].value
    tokens = header.metadata.get(VOCABULARY_KEY)
    vocabulary = tokens.value if tokens is not None and tokens.item_type == "STRING" else None
    return Artifact(root=path.parent, name=stem or path.name, layout="single",
                    files=(ArtifactFile(path.name, header.file_size, "weights"),), tensors=mapped.tensors,
                    config=mapped.config, metadata={path.name: mapped.metadata}, warnings=tuple(notes),
                    format="gguf", unexpected=mapped.unexpected, architecture=arch, vocabulary=vocabulary)
