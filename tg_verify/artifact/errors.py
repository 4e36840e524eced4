"""The artifact layer's error catalogue: one class, one stable code per validation rule.

Every class is an InputError (exit 2). docs/artifact.md lists the codes with the rule each enforces;
callers may branch on `type(exc)` or `exc.code`, never on message text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from tg_verify.errors import AdapterError, ArtifactError, HeaderError, WeightValueError
from tg_verify.escaping import shown as shown  # the one escaping module, re-exported for the artifact layer


@contextmanager
def about_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """An ArtifactError raised inside is about `path` where its raiser left `file` open: the checks that parse a
    file's bytes know only its display name (`where`), the caller that opened it knows the path."""
    try:
        yield
    except ArtifactError as exc:
        if exc.file is None:
            exc.file = str(path)
        raise


# --- resolving the path -------------------------------------------------------------------------------


class NoModelError(ArtifactError):
    """The path does not exist, or the directory holds no model in any supported layout."""

    code = "TGV_NO_MODEL"


class NotRegularFileError(ArtifactError):
    """A FIFO, device, socket or directory where a regular file is needed (never opened for reading)."""

    code = "TGV_NOT_REGULAR_FILE"


class SymlinkLoopError(ArtifactError):
    """A symbolic link that never reaches a file (a loop, or too many levels)."""

    code = "TGV_SYMLINK_LOOP"


class UnreadableFileError(ArtifactError):
    """A file the operating system will not let us read (permissions, I/O error)."""

    code = "TGV_UNREADABLE"


class PickleFormatError(ArtifactError):
    """Pickle-based weights (.bin, .pt, .pth, .ckpt, ...): refused, never loaded or scanned."""

    code = "TGV_PICKLE_REFUSED"


class NotSafetensorsError(ArtifactError):
    """A file path that does not name a .safetensors file."""

    code = "TGV_NOT_SAFETENSORS"


class JsonFileError(ArtifactError):
    """A side-car JSON file (config, shard index, adapter config) that is too big, not JSON, or not an object."""

    code = "TGV_JSON_FILE"


class AmbiguousLayoutError(ArtifactError):
    """A directory that holds more than one candidate model (e.g. two shard indexes)."""

    code = "TGV_AMBIGUOUS_LAYOUT"


class AmbiguousTensorError(ArtifactError):
    """Two tensors that a runtime would load as the same parameter (e.g. `embed_tokens.weight` and
    `model.embed_tokens.weight`): which one it uses depends on load order, so neither can be verified."""

    code = "TGV_AMBIGUOUS_TENSOR"


class PackedTensorError(ArtifactError):
    """A quantised tensor stored in parts (MXFP4's `_blocks` + `_scales`; GPTQ's and AWQ's `qweight`, `qzeros`,
    `scales`, `g_idx`) with a part missing, an orphan part, or a dtype or shape that does not fit the other parts or
    the config: there is no value a runtime would load for it."""

    code = "TGV_PACKED_TENSOR"


class TooManyTensorsError(ArtifactError):
    """More tensors than the configured cap (a CPU-amplification guard: each tensor costs work)."""

    code = "TGV_TOO_MANY_TENSORS"


class IndexFormatError(ArtifactError):
    """A shard index whose `weight_map` is missing, empty or names something other than a sibling shard."""

    code = "TGV_SHARD_INDEX"


class MissingShardError(ArtifactError):
    """A shard named by the index (or by an N-of-M set) that is not on disk."""

    code = "TGV_MISSING_SHARD"


class UnlistedShardError(ArtifactError):
    """A shard-named file that the index does not mention: refused, not silently ignored."""

    code = "TGV_UNLISTED_SHARD"


class IndexMismatchError(ArtifactError):
    """`weight_map` and the shard headers disagree about which tensor lives where."""

    code = "TGV_INDEX_MISMATCH"


class ShardSetError(ArtifactError):
    """Safetensors files without an index that do not form one complete `<prefix>-i-of-N` set."""

    code = "TGV_SHARD_SET"


class IncompleteShardSetError(ShardSetError):
    """An `<prefix>-i-of-N` set with numbers missing, repeated or out of range."""

    code = "TGV_INCOMPLETE_SHARDS"


class DuplicateTensorError(ArtifactError):
    """The same tensor name stored in two files of one artifact."""

    code = "TGV_DUPLICATE_TENSOR"


class AdapterLayoutError(AdapterError):
    """A PEFT adapter directory without its safetensors weights."""

    code = "TGV_ADAPTER_LAYOUT"


class FileChangedError(ArtifactError):
    """A file whose size changed between validation and reading (modified while open)."""

    code = "TGV_FILE_CHANGED"


# --- FP8 checkpoints: weights and their scales (artifact/fp8.py) -----------------------------------------


class QuantizationConfigError(ArtifactError):
    """config.json's quantization_config that tg-verify cannot read the quantised weights by: not an object, a
    malformed `weight_block_size` or weight scheme, a `quant_method` it does not dequantise, or GPTQ/AWQ bits, group
    size or format it does not read."""

    code = "TGV_QUANTIZATION_CONFIG"


class ScaleTensorError(ArtifactError):
    """A float8 weight without its scale, a scale without its float8 weight, or a scale whose dtype or shape does
    not fit its weight and the configured blocks."""

    code = "TGV_SCALE_TENSOR"


class ScaleValueError(WeightValueError):
    """A scale that is NaN, infinite, zero or negative (every FP8 quantiser writes amax / 448 > 0), or a zero point
    that is not zero: found when the weight is dequantised."""

    code = "TGV_SCALE_VALUES"


class PackedValueError(WeightValueError):
    """A GPTQ group index (`g_idx`) naming a group that does not exist, or reordering rows where desc_act says it
    does not (runtimes then compute different weights): found when the weight is dequantised."""

    code = "TGV_PACKED_VALUES"


# --- one safetensors header (checks 1-10 of the reference parser, plus tg-verify's own) ---------------


class HeaderTooSmallError(HeaderError):
    """File shorter than the 8-byte header length."""

    code = "TGV_HEADER_TOO_SMALL"


class HeaderTooLargeError(HeaderError):
    """Header length above the cap (25 MB by default, as huggingface_hub)."""

    code = "TGV_HEADER_TOO_LARGE"


class HeaderLengthError(HeaderError):
    """Header length that runs past the end of the file."""

    code = "TGV_HEADER_LENGTH"


class HeaderEncodingError(HeaderError):
    """Header bytes that are not UTF-8."""

    code = "TGV_HEADER_ENCODING"


class HeaderJsonError(HeaderError):
    """Header that is not one strict JSON object (NaN/Infinity literals are not JSON)."""

    code = "TGV_HEADER_JSON"


class HeaderNestingError(HeaderJsonError):
    """Header JSON nested deeper than any valid header (refused before parsing)."""

    code = "TGV_HEADER_NESTING"


class DuplicateKeyError(HeaderError):
    """A JSON key (tensor name or entry field) written twice: parsers disagree on which one wins."""

    code = "TGV_DUPLICATE_KEY"


class HeaderSchemaError(HeaderError):
    """A tensor entry that is not exactly {dtype, shape, data_offsets}."""

    code = "TGV_HEADER_SCHEMA"


class TensorNameError(HeaderError):
    """A tensor name that is empty or holds control characters or lone surrogates."""

    code = "TGV_TENSOR_NAME"


class UnknownDtypeError(HeaderError):
    """A dtype outside the safetensors enumeration."""

    code = "TGV_UNKNOWN_DTYPE"


class ShapeError(HeaderError):
    """A shape that is not a list of at most 8 non-negative integers."""

    code = "TGV_SHAPE"


class OffsetError(HeaderError):
    """`data_offsets` that is not [begin, end] with 0 <= begin <= end."""

    code = "TGV_OFFSETS"


class SizeOverflowError(HeaderError):
    """numel x dtype bits that does not fit in 64 bits (the reference's ValidationOverflow)."""

    code = "TGV_SIZE_OVERFLOW"


class MisalignedSizeError(HeaderError):
    """A sub-byte dtype whose element count does not fill whole bytes (the reference's MisalignedSlice)."""

    code = "TGV_MISALIGNED"


class SizeMismatchError(HeaderError):
    """`end - begin` differs from numel x dtype size (the reference's TensorInvalidInfo)."""

    code = "TGV_SIZE_MISMATCH"


class OverlapError(HeaderError):
    """Two tensors whose byte ranges overlap (aliasing bytes is a denial-of-service vector)."""

    code = "TGV_OVERLAP"


class GapError(HeaderError):
    """Bytes in the data section that no tensor covers (room for a polyglot payload)."""

    code = "TGV_GAP"


class CoverageError(HeaderError):
    """The tensors do not end exactly at the end of the file."""

    code = "TGV_COVERAGE"


class DataTruncatedError(CoverageError):
    """Tensor data that runs past the end of the file (truncated download, lying offsets)."""

    code = "TGV_DATA_TRUNCATED"


class TrailingBytesError(CoverageError):
    """Bytes after the last tensor (a polyglot file, or a partially overwritten one)."""

    code = "TGV_TRAILING_BYTES"


class MetadataError(HeaderError):
    """`__metadata__` that is not a map of strings to strings."""

    code = "TGV_METADATA"


# --- one GGUF file (llama.cpp's gguf.cpp checks, plus tg-verify's own; docs/artifact.md "GGUF") --------
# Rules shared with safetensors reuse those classes: TGV_HEADER_TOO_SMALL, TGV_HEADER_TOO_LARGE,
# TGV_DUPLICATE_KEY, TGV_TENSOR_NAME, TGV_DUPLICATE_TENSOR, TGV_SHAPE, TGV_SIZE_OVERFLOW, TGV_UNKNOWN_DTYPE,
# TGV_MISALIGNED, TGV_OVERLAP, TGV_GAP, TGV_DATA_TRUNCATED, TGV_TRAILING_BYTES.


class GGUFMagicError(HeaderError):
    """A .gguf file that does not start with the magic bytes `GGUF`."""

    code = "TGV_GGUF_MAGIC"


class GGUFVersionError(HeaderError):
    """A GGUF version other than 2 or 3 (v1 and big-endian files are refused, as llama.cpp does)."""

    code = "TGV_GGUF_VERSION"


class GGUFCountError(HeaderError):
    """A tensor or key-value count that is negative as int64 or cannot fit in the file."""

    code = "TGV_GGUF_COUNT"


class GGUFTruncatedError(HeaderError):
    """A GGUF header (metadata or tensor infos) that ends before its last field."""

    code = "TGV_GGUF_TRUNCATED"


class GGUFLengthError(HeaderError):
    """A string or array length that runs past the end of the file (or of the header limit)."""

    code = "TGV_GGUF_LENGTH"


class GGUFKeyError(HeaderError):
    """A metadata key that is empty, not UTF-8, or holds control characters."""

    code = "TGV_GGUF_KEY"


class GGUFValueTypeError(HeaderError):
    """A metadata value of an unknown type, or an array of arrays (llama.cpp refuses both)."""

    code = "TGV_GGUF_VALUE_TYPE"


class GGUFAlignmentError(HeaderError):
    """`general.alignment` that is not a uint32 power of two within the limit."""

    code = "TGV_GGUF_ALIGNMENT"


class GGUFPaddingError(HeaderError):
    """Alignment padding that holds non-zero bytes (room for a hidden payload)."""

    code = "TGV_GGUF_PADDING"


class GGUFMetadataError(HeaderError):
    """Model metadata (architecture, dimensions, head counts) missing, mistyped or inconsistent."""

    code = "TGV_GGUF_METADATA"


class GGUFArchitectureError(ArtifactError):
    """A GGUF architecture (or file type) tg-verify does not map onto a known model family."""

    code = "TGV_GGUF_ARCHITECTURE"


class GGUFTensorsError(ArtifactError):
    """A GGUF model that llama.cpp could not load: a required tensor missing, or a shape off its metadata."""

    code = "TGV_GGUF_TENSORS"


class GGUFSplitError(ArtifactError):
    """One part of a split GGUF model (`split.count` > 1): only whole files are read."""

    code = "TGV_GGUF_SPLIT"

