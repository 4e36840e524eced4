"""Hand-built GGUF bytes for tests: valid files, and every way a GGUF header can lie.

Deliberately independent of the `gguf` package's writer (which never writes a bad file): each field is
packed here, so a test can set any count, length, type or offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

# GGUF value types and the few ggml tensor types used here: (block size, bytes per block)
VT = {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6, "BOOL": 7,
      "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}
F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8
TYPE_SIZES = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q8_0: (32, 34)}


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return u64(len(raw) if length is None else length) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return string(key) + u32(vtype) + payload


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, VT["STRING"], string(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, VT["UINT32"], u32(value))


def kv_f32(key: str, value: float) -> bytes:
    return kv(key, VT["FLOAT32"], struct.pack("<f", value))


def kv_array(key: str, item_type: int, items: list[bytes], count: int | None = None) -> bytes:
    return kv(key, VT["ARRAY"], u32(item_type) + u64(len(items) if count is None else count) + b"".join(items))


@dataclass(frozen=True)
class T:
    """One tensor: name, ne (ggml order: innermost first), ggml type; `offset`/`n_dims`/`data` override."""

    name: str | bytes
    ne: tuple[int, ...]
    type: int = F32
    offset: int | None = None
    n_dims: int | None = None
    data: bytes | None = None

    def nbytes(self) -> int:
        if self.type not in TYPE_SIZES:
            return len(self.data or b"")
        block, size = TYPE_SIZES[self.type]
        count = 1
        for n in self.ne:
            count *= n
        return count // block * size


def _values(t: T) -> bytes:
    """Deterministic small weights (F32/F16), or a repeating byte pattern for quantised types."""
    count = t.nbytes()
    if t.type == F32:
        return b"".join(struct.pack("<f", 0.01 * ((i * 7) % 13 - 6)) for i in range(count // 4))
    if t.type == F16:
        return b"".join(struct.pack("<e", 0.01 * ((i * 7) % 13 - 6)) for i in range(count // 2))
    block = bytes([0x00, 0x2C] + [(i * 37) % 256 for i in range(TYPE_SIZES[t.type][1] - 2)])  # f16 scale ~0.06
    return block * (count // len(block))


def gguf_bytes(kvs: list[bytes], tensors: list[T], *, magic: bytes = b"GGUF", version: int = 3,
               tensor_count: int | None = None, kv_count: int | None = None, alignment: int = 32,
               pad: int = 0) -> bytes:
    """A GGUF file: header, tensor infos, `pad`-filled alignment padding, data laid out as llama.cpp expects
    (unless a tensor's `offset` says otherwise)."""
    infos, data, cursor = b"", b"", 0
    for t in tensors:
        payload = _values(t) if t.data is None else t.data  # given data may disagree with the declared shape
        size = len(payload)
        padded = -(-size // alignment) * alignment
        infos += (string(t.name) + u32(len(t.ne) if t.n_dims is None else t.n_dims)
                  + b"".join(u64(n) for n in t.ne) + u32(t.type) + u64(cursor if t.offset is None else t.offset))
        data += payload + bytes([pad]) * (padded - size)
        cursor += padded
    head = (magic + u32(version) + u64(len(tensors) if tensor_count is None else tensor_count)
            + u64(len(kvs) if kv_count is None else kv_count) + b"".join(kvs) + infos)
    if tensors:
        head += bytes([pad]) * (-len(head) % alignment)
    return head + data


@dataclass
class TinyLlama:
    """A minimal valid llama-architecture GGUF model, editable field by field before `build()`."""

    width: int = 16
    heads: int = 2
    kv_heads: int = 1
    ff: int = 16
    vocab: int = 8
    layers: int = 1
    matrix_type: int = F16
    arch: str = "llama"
    extra_kvs: list[bytes] = field(default_factory=list)

    def kvs(self) -> list[bytes]:
        a = self.arch
        return [kv_str("general.architecture", a), kv_str("general.name", "tiny"),
                kv_u32(f"{a}.block_count", self.layers), kv_u32(f"{a}.context_length", 64),
                kv_u32(f"{a}.embedding_length", self.width), kv_u32(f"{a}.feed_forward_length", self.ff),
                kv_u32(f"{a}.attention.head_count", self.heads), kv_u32(f"{a}.attention.head_count_kv", self.kv_heads),
                kv_f32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
                kv_array("tokenizer.ggml.tokens", VT["STRING"], [string(f"<{i}>") for i in range(self.vocab)]),
                *self.extra_kvs]

    def tensors(self) -> list[T]:
        w, head_dim, m = self.width, self.width // self.heads, self.matrix_type
        out = [T("token_embd.weight", (w, self.vocab), m), T("output_norm.weight", (w,)),
               T("output.weight", (w, self.vocab), m)]
        for b in range(self.layers):
            out += [T(f"blk.{b}.attn_norm.weight", (w,)), T(f"blk.{b}.attn_q.weight", (w, w), m),
                    T(f"blk.{b}.attn_k.weight", (w, self.kv_heads * head_dim), m),
                    T(f"blk.{b}.attn_v.weight", (w, self.kv_heads * head_dim), m),
                    T(f"blk.{b}.attn_output.weight", (w, w), m), T(f"blk.{b}.ffn_norm.weight", (w,)),
                    T(f"blk.{b}.ffn_gate.weight", (w, self.ff), m), T(f"blk.{b}.ffn_up.weight", (w, self.ff), m),
                    T(f"blk.{b}.ffn_down.weight", (self.ff, w), m)]
        return out

    def build(self, **overrides: object) -> bytes:
        return gguf_bytes(self.kvs(), self.tensors(), **overrides)  # type: ignore[arg-type]


def tiny_llama(**fields: object) -> bytes:
    """The bytes of a valid tiny llama GGUF (fields of TinyLlama override the defaults)."""
    return TinyLlama(**fields).build()  # type: ignore[arg-type]


def with_tensors(model: TinyLlama, edit: object) -> bytes:
    """`model`'s bytes after `edit(tensors) -> tensors` (drop, add or alter tensor infos)."""
    return gguf_bytes(model.kvs(), edit(model.tensors()))  # type: ignore[operator]


__all__ = ["F16", "F32", "Q4_0", "Q8_0", "T", "TinyLlama", "VT", "gguf_bytes", "kv", "kv_array", "kv_f32", "kv_str",
           "kv_u32", "replace", "string", "tiny_llama", "u32", "u64", "with_tensors"]
