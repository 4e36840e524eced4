"""Generate the nasty-file corpus under tests/corpus/files/: one malformed artifact per validation rule.

Run `python tests/corpus/make_corpus.py` after changing CASES; test_corpus.py checks the committed
files equal what this script generates, and that `tg-verify inspect` exits 2 with the expected code.
Special files git cannot hold (FIFO, symlink loop, device) are made by the tests at run time.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ggufcraft import (  # noqa: E402
    F32,
    Q4_0,
    VT,
    T,
    TinyLlama,
    gguf_bytes,
    kv,
    kv_array,
    kv_str,
    kv_u32,
    string,
    tiny_llama,
    u32,
    u64,
    with_tensors,
)
from stcraft import assemble, entry, small_valid, tensors_file  # noqa: E402

FILES = Path(__file__).parent / "files"
Tree = dict[str, bytes]  # a directory: relative name -> content; a single file case uses one key "."


def _shard(names: dict[str, tuple[str, list[int]]]) -> bytes:
    return tensors_file(names, metadata={"format": "pt"})


def _index(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=1).encode()


A = {"a.weight": ("F32", [2, 2])}
B = {"b.weight": ("F32", [2, 2])}
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

def _gguf_one(*tensors: T, kvs: tuple[bytes, ...] = (), **overrides: object) -> bytes:
    """A GGUF file with a valid header around `tensors` (header-level cases fail before the model is mapped)."""
    return gguf_bytes([kv_str("general.architecture", "llama"), *kvs], list(tensors), **overrides)  # type: ignore


def _truncated_in_tensor_info() -> bytes:
    blob = _gguf_one(T("a.weight", (4,)))
    return blob[:24 + len(kv_str("general.architecture", "llama")) + len(string("a.weight")) + 2]  # inside n_dims


def _replace_tensor(name: str, new: T | None) -> object:
    def edit(tensors: list[T]) -> list[T]:
        return [(new if t.name == name else t) for t in tensors if t.name != name or new is not None]
    return edit


ONE = T("a.weight", (4,))
# name -> (expected error code, builder of the file (bytes) or directory (Tree))
CASES: dict[str, tuple[str, Callable[[], bytes | Tree]]] = {
    # header checks 1-10 and tg-verify's own
    "empty.safetensors": ("TGV_HEADER_TOO_SMALL", lambda: b""),
    "seven-bytes.safetensors": ("TGV_HEADER_TOO_SMALL", lambda: b"\x10\x00\x00\x00\x00\x00\x00"),
    "length-2p63.safetensors": ("TGV_HEADER_TOO_LARGE", lambda: assemble({}, length=2**63)),
    "length-max-u64.safetensors": ("TGV_HEADER_TOO_LARGE", lambda: assemble({}, length=2**64 - 1)),
    "length-past-end.safetensors": ("TGV_HEADER_LENGTH", lambda: assemble({}, length=4096)),
    "invalid-utf8.safetensors": ("TGV_HEADER_ENCODING", lambda: assemble(b'{"\xff\xfe":1}')),
    "not-json.safetensors": ("TGV_HEADER_JSON", lambda: assemble(b'{"a": [1, 2')),
    "json-array.safetensors": ("TGV_HEADER_JSON", lambda: assemble(b"[1, 2, 3]")),
    "nan-literal.safetensors": ("TGV_HEADER_JSON", lambda: assemble(b'{"a":{"dtype":"F32","shape":[NaN],'
                                                                     b'"data_offsets":[0,0]}}')),
    "deeply-nested.safetensors": ("TGV_HEADER_NESTING", lambda: assemble(b"{\"a\":" + b"[" * 100_000
                                                                         + b"]" * 100_000 + b"}")),
    "duplicate-key.safetensors": ("TGV_DUPLICATE_KEY", lambda: assemble(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4)),
    "entry-extra-key.safetensors": ("TGV_HEADER_SCHEMA", lambda: assemble(
        {"a": {**entry(), "extra": 1}}, b"\0" * 8)),
    "entry-not-object.safetensors": ("TGV_HEADER_SCHEMA", lambda: assemble({"a": [0, 8]}, b"\0" * 8)),
    "nul-in-name.safetensors": ("TGV_TENSOR_NAME", lambda: assemble({"a\u0000hidden": entry()}, b"\0" * 8)),
    "surrogate-name.safetensors": ("TGV_TENSOR_NAME", lambda: assemble(
        b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8)),
    "unknown-dtype.safetensors": ("TGV_UNKNOWN_DTYPE", lambda: assemble({"a": entry(dtype="F128")}, b"\0" * 8)),
    "negative-shape.safetensors": ("TGV_SHAPE", lambda: assemble({"a": entry(shape=[-2])}, b"\0" * 8)),
    "float-shape.safetensors": ("TGV_SHAPE", lambda: assemble({"a": entry(shape=[2.0])}, b"\0" * 8)),
    "rank-9.safetensors": ("TGV_SHAPE", lambda: assemble({"a": entry(shape=[1] * 9, offsets=[0, 4])}, b"\0" * 4)),
    "offsets-reversed.safetensors": ("TGV_OFFSETS", lambda: assemble({"a": entry(offsets=[8, 0])}, b"\0" * 8)),
    "offsets-three.safetensors": ("TGV_OFFSETS", lambda: assemble({"a": entry(offsets=[0, 4, 8])}, b"\0" * 8)),
    "offsets-negative.safetensors": ("TGV_OFFSETS", lambda: assemble({"a": entry(offsets=[-8, 0])}, b"\0" * 8)),
    "shape-overflow.safetensors": ("TGV_SIZE_OVERFLOW", lambda: assemble(
        {"a": entry(shape=[2**32, 2**32, 2**8], offsets=[0, 8])}, b"\0" * 8)),
    "f4-odd-count.safetensors": ("TGV_MISALIGNED", lambda: assemble(
        {"a": entry(dtype="F4", shape=[3], offsets=[0, 2])}, b"\0" * 2)),
    "wrong-dtype-size.safetensors": ("TGV_SIZE_MISMATCH", lambda: assemble(
        {"a": entry(dtype="F16", shape=[2], offsets=[0, 8])}, b"\0" * 8)),
    "overlap.safetensors": ("TGV_OVERLAP", lambda: assemble(
        {"a": entry(offsets=[0, 8]), "b": entry(offsets=[4, 12])}, b"\0" * 12)),
    "duplicated-range.safetensors": ("TGV_OVERLAP", lambda: assemble(
        {"a": entry(offsets=[0, 8]), "b": entry(offsets=[0, 8])}, b"\0" * 8)),
    "gap.safetensors": ("TGV_GAP", lambda: assemble(
        {"a": entry(offsets=[0, 8]), "b": entry(offsets=[12, 20])}, b"\0" * 20)),
    "first-not-at-zero.safetensors": ("TGV_GAP", lambda: assemble({"a": entry(offsets=[4, 12])}, b"\0" * 12)),
    "offsets-past-end.safetensors": ("TGV_DATA_TRUNCATED", lambda: assemble({"a": entry(offsets=[0, 8])}, b"\0" * 4)),
    "trailing-bytes.safetensors": ("TGV_TRAILING_BYTES", lambda: small_valid() + b"PK\x03\x04polyglot"),
    "metadata-not-string.safetensors": ("TGV_METADATA", lambda: assemble(
        {"__metadata__": {"format": 1}, "a": entry()}, b"\0" * 8)),
    "metadata-not-object.safetensors": ("TGV_METADATA", lambda: assemble(
        {"__metadata__": ["pt"], "a": entry()}, b"\0" * 8)),
    # GGUF: llama.cpp's gguf.cpp rules and tg-verify's own (docs/artifact.md "GGUF")
    "gguf-empty.gguf": ("TGV_HEADER_TOO_SMALL", lambda: b""),
    "gguf-magic-only.gguf": ("TGV_HEADER_TOO_SMALL", lambda: b"GGUF" + u32(3)),
    "gguf-bad-magic.gguf": ("TGV_GGUF_MAGIC", lambda: _gguf_one(ONE, magic=b"GGML")),
    "gguf-version-1.gguf": ("TGV_GGUF_VERSION", lambda: _gguf_one(ONE, version=1)),
    "gguf-big-endian.gguf": ("TGV_GGUF_VERSION", lambda: _gguf_one(ONE, version=0x03000000)),
    "gguf-tensor-count-huge.gguf": ("TGV_GGUF_COUNT", lambda: _gguf_one(ONE, tensor_count=2**40)),
    "gguf-kv-count-negative.gguf": ("TGV_GGUF_COUNT", lambda: _gguf_one(ONE, kv_count=2**64 - 1)),
    "gguf-truncated-header.gguf": ("TGV_GGUF_TRUNCATED", _truncated_in_tensor_info),
    "gguf-key-length-absurd.gguf": ("TGV_GGUF_LENGTH", lambda: _gguf_one(
        ONE, kvs=(string("x", length=2**62) + u32(VT["UINT8"]) + b"\0",))),
    "gguf-string-length-absurd.gguf": ("TGV_GGUF_LENGTH", lambda: _gguf_one(
        ONE, kvs=(kv("general.name", VT["STRING"], string("tiny", length=2**60)),))),
    "gguf-array-length-absurd.gguf": ("TGV_GGUF_LENGTH", lambda: _gguf_one(
        ONE, kvs=(kv_array("x.scores", VT["FLOAT32"], [], count=2**60),))),
    "gguf-array-item-length-absurd.gguf": ("TGV_GGUF_LENGTH", lambda: _gguf_one(
        ONE, kvs=(kv_array("tokenizer.ggml.tokens", VT["STRING"], [string("a"), string("b", length=2**50)]),))),
    "gguf-nested-array.gguf": ("TGV_GGUF_VALUE_TYPE", lambda: _gguf_one(
        ONE, kvs=(kv_array("x.nested", VT["ARRAY"], [u32(VT["UINT8"]) + u64(1) + b"\1"]),))),
    "gguf-unknown-value-type.gguf": ("TGV_GGUF_VALUE_TYPE", lambda: _gguf_one(ONE, kvs=(kv("x.y", 13, b"\0"),))),
    "gguf-duplicate-key.gguf": ("TGV_DUPLICATE_KEY", lambda: _gguf_one(
        ONE, kvs=(kv_str("general.name", "a"), kv_str("general.name", "b")))),
    "gguf-empty-key.gguf": ("TGV_GGUF_KEY", lambda: _gguf_one(ONE, kvs=(kv_u32("", 1),))),
    "gguf-alignment-not-power-of-two.gguf": ("TGV_GGUF_ALIGNMENT", lambda: _gguf_one(
        ONE, kvs=(kv_u32("general.alignment", 48),), alignment=48)),
    "gguf-alignment-zero.gguf": ("TGV_GGUF_ALIGNMENT", lambda: _gguf_one(ONE, kvs=(kv_u32("general.alignment", 0),))),
    "gguf-alignment-wrong-type.gguf": ("TGV_GGUF_ALIGNMENT", lambda: _gguf_one(
        ONE, kvs=(kv("general.alignment", VT["UINT64"], u64(32)),))),
    "gguf-five-dims.gguf": ("TGV_SHAPE", lambda: _gguf_one(T("a.weight", (1, 1, 1, 1, 4)))),
    "gguf-negative-dim.gguf": ("TGV_SHAPE", lambda: _gguf_one(T("a.weight", (2**63, 1), data=b""))),
    "gguf-numel-overflow.gguf": ("TGV_SIZE_OVERFLOW", lambda: _gguf_one(T("a.weight", (2**32, 2**32), data=b""))),
    "gguf-removed-type.gguf": ("TGV_UNKNOWN_DTYPE", lambda: _gguf_one(T("a.weight", (4,), type=4, data=b"\0" * 16))),
    "gguf-unknown-type.gguf": ("TGV_UNKNOWN_DTYPE", lambda: _gguf_one(T("a.weight", (4,), type=1000,
                                                                        data=b"\0" * 16))),
    "gguf-row-not-whole-blocks.gguf": ("TGV_MISALIGNED", lambda: _gguf_one(T("a.weight", (33, 2), type=Q4_0,
                                                                             data=b"\0" * 36))),
    "gguf-duplicate-tensor.gguf": ("TGV_DUPLICATE_TENSOR", lambda: _gguf_one(ONE, T("a.weight", (4,)))),
    "gguf-nul-in-name.gguf": ("TGV_TENSOR_NAME", lambda: _gguf_one(T(b"a.weight\0hidden", (4,)))),
    "gguf-name-64-bytes.gguf": ("TGV_TENSOR_NAME", lambda: _gguf_one(T("w" * 64, (4,)))),
    "gguf-offset-past-end.gguf": ("TGV_DATA_TRUNCATED", lambda: _gguf_one(T("a.weight", (4,), offset=2**40))),
    "gguf-data-truncated.gguf": ("TGV_DATA_TRUNCATED", lambda: tiny_llama()[:-40]),
    "gguf-overlap.gguf": ("TGV_OVERLAP", lambda: _gguf_one(ONE, T("b.weight", (4,), offset=0))),
    "gguf-gap.gguf": ("TGV_GAP", lambda: _gguf_one(ONE, T("b.weight", (4,), offset=64)) + b"\0" * 32),
    "gguf-unaligned-offset.gguf": ("TGV_GAP", lambda: _gguf_one(ONE, T("b.weight", (4,), offset=40)) + b"\0" * 32),
    "gguf-padding-not-zero.gguf": ("TGV_GGUF_PADDING", lambda: _gguf_one(ONE, pad=0x41)),
    "gguf-trailing-bytes.gguf": ("TGV_TRAILING_BYTES", lambda: tiny_llama() + b"PK\x03\x04polyglot"),
    "gguf-unknown-architecture.gguf": ("TGV_GGUF_ARCHITECTURE", lambda: tiny_llama(arch="mamba9")),
    "gguf-adapter.gguf": ("TGV_GGUF_ARCHITECTURE", lambda: tiny_llama(extra_kvs=[kv_str("general.type", "adapter")])),
    "gguf-split-part.gguf": ("TGV_GGUF_SPLIT", lambda: tiny_llama(extra_kvs=[
        kv("split.count", VT["UINT16"], b"\x03\x00")])),
    "gguf-no-architecture.gguf": ("TGV_GGUF_METADATA", lambda: gguf_bytes([], [ONE])),
    "gguf-kv-heads-not-dividing.gguf": ("TGV_GGUF_METADATA", lambda: tiny_llama(heads=4, kv_heads=3)),
    "gguf-missing-tensor.gguf": ("TGV_GGUF_TENSORS", lambda: with_tensors(
        TinyLlama(), _replace_tensor("blk.0.ffn_down.weight", None))),
    "gguf-q-rows-off-metadata.gguf": ("TGV_GGUF_TENSORS", lambda: with_tensors(
        TinyLlama(), _replace_tensor("blk.0.attn_q.weight", T("blk.0.attn_q.weight", (16, 8), F32)))),
    "gguf-vocabulary-off-embedding.gguf": ("TGV_GGUF_TENSORS", lambda: gguf_bytes(
        [*TinyLlama().kvs()[:-1], kv_array("tokenizer.ggml.tokens", VT["STRING"], [string("a")] * 9)],
        TinyLlama().tensors())),
    "dir-two-gguf-files": ("TGV_AMBIGUOUS_LAYOUT", lambda: {"model-Q4_0.gguf": tiny_llama(),
                                                          "model-Q8_0.gguf": tiny_llama()}),
    # paths and layouts
    "not-safetensors.txt": ("TGV_NOT_SAFETENSORS", lambda: small_valid()),
    "weights.bin": ("TGV_PICKLE_REFUSED", lambda: b"\x80\x02}q\x00."),
    "dir-no-model": ("TGV_NO_MODEL", lambda: {"README.md": b"# nothing here\n"}),
    "dir-pickle-only": ("TGV_PICKLE_REFUSED", lambda: {"pytorch_model-00001-of-00001.bin": b"\x80\x02}q\x00."}),
    "dir-index-missing-shard": ("TGV_MISSING_SHARD", lambda: {
        "model.safetensors.index.json": _index({"a.weight": SHARD1, "b.weight": SHARD2}), SHARD1: _shard(A)}),
    "dir-index-unlisted-shard": ("TGV_UNLISTED_SHARD", lambda: {
        "model.safetensors.index.json": _index({"a.weight": SHARD1}), SHARD1: _shard(A), SHARD2: _shard(B)}),
    "dir-index-wrong-shard": ("TGV_INDEX_MISMATCH", lambda: {
        "model.safetensors.index.json": _index({"a.weight": SHARD2, "b.weight": SHARD1}),
        SHARD1: _shard(A), SHARD2: _shard(B)}),
    "dir-index-tensor-unmapped": ("TGV_INDEX_MISMATCH", lambda: {
        "model.safetensors.index.json": _index({"a.weight": SHARD1, "b.weight": SHARD2}),
        SHARD1: _shard({**A, "c.weight": ("F32", [1])}), SHARD2: _shard(B)}),
    "dir-index-path-traversal": ("TGV_SHARD_INDEX", lambda: {
        "model.safetensors.index.json": _index({"a.weight": "../outside.safetensors"}), SHARD1: _shard(A)}),
    "dir-index-not-json": ("TGV_JSON_FILE", lambda: {"model.safetensors.index.json": b"{weight_map:",
                                                     SHARD1: _shard(A)}),
    "dir-index-bad-shard-header": ("TGV_TRAILING_BYTES", lambda: {
        "model.safetensors.index.json": _index({"a.weight": SHARD1, "b.weight": SHARD2}),
        SHARD1: _shard(A), SHARD2: _shard(B) + b"\0"}),
    "dir-shards-incomplete": ("TGV_MISSING_SHARD", lambda: {SHARD1: _shard(A)}),
    "dir-shards-duplicate-tensor": ("TGV_DUPLICATE_TENSOR", lambda: {SHARD1: _shard(A), SHARD2: _shard(A)}),
    "dir-shards-two-sets": ("TGV_SHARD_SET", lambda: {
        SHARD1: _shard(A), SHARD2: _shard(B), "other-00001-of-00001.safetensors": _shard(A)}),
    "dir-shards-out-of-range": ("TGV_INCOMPLETE_SHARDS", lambda: {
        SHARD1: _shard(A), "model-00003-of-00002.safetensors": _shard(B)}),
    "dir-shards-huge-total": ("TGV_MISSING_SHARD", lambda: {"model-00001-of-99999999.safetensors": _shard(A)}),
    "dir-single-and-shards": ("TGV_AMBIGUOUS_LAYOUT", lambda: {
        "model.safetensors": _shard({**A, **B}), SHARD1: _shard(A), SHARD2: _shard(B)}),
    "dir-two-loose-files": ("TGV_SHARD_SET", lambda: {"a.safetensors": _shard(A), "b.safetensors": _shard(B)}),
    "dir-adapter-no-weights": ("TGV_ADAPTER_LAYOUT", lambda: {"adapter_config.json": b'{"peft_type": "LORA"}'}),
    "dir-config-not-json": ("TGV_JSON_FILE", lambda: {"config.json": b"model_type: llama\n",
                                                      "model.safetensors": _shard(A)}),
}


def build(name: str) -> bytes | Tree:
    """The content of one case."""
    return CASES[name][1]()


def write(target: Path = FILES) -> list[Path]:
    """(Re)write every case under `target`; returns the paths written."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    written = []
    for name in CASES:
        content = build(name)
        path = target / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.mkdir()
            for rel, data in content.items():
                (path / rel).write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    paths = write(Path(sys.argv[1]) if len(sys.argv) > 1 else FILES)
    print(f"wrote {len(paths)} corpus cases under {paths[0].parent}")
