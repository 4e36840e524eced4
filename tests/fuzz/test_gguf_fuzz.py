"""Property-based fuzzing of the GGUF reader, like the safetensors header's (tests/fuzz/test_header_fuzz.py).

Every input ends in a valid parse or a typed InputError (exit 2), within a bounded time, never any other
exception. Accepted files are checked against the gguf package's own GGUFReader (the format's reference
library): whatever tg-verify accepts, it reads with the same tensors, types, shapes and data offsets.
Accepted models are then mapped, read and dequantised in full, and the CLI must exit 0 or 2 with one line.

CI runs a fixed-seed budget (derandomized); TG_FUZZ_EXAMPLES=20000 for a long run.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from pathlib import Path

import gguf
import pytest
from ggufcraft import F16, F32, Q4_0, Q8_0, VT, T, TinyLlama, gguf_bytes, kv, kv_array, kv_str, kv_u32, string, u32, u64
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tg_verify.artifact import open_reader, resolve
from tg_verify.artifact.gguf import validate_gguf_bytes
from tg_verify.cli import main
from tg_verify.errors import InputError

EXAMPLES = int(os.environ.get("TG_FUZZ_EXAMPLES", "400"))
settings.register_profile("tg-fuzz", max_examples=EXAMPLES, derandomize="TG_FUZZ_EXAMPLES" not in os.environ,
                          deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("tg-fuzz")
TIME_BOUND_S = 5.0

SEEDS = [TinyLlama().build(), TinyLlama(width=32, ff=32, matrix_type=Q8_0).build(),
         TinyLlama(width=32, ff=32, matrix_type=Q4_0, layers=2, arch="qwen2").build(),
         gguf_bytes([kv_str("general.architecture", "llama"), kv_u32("general.alignment", 64),
                     kv_array("x.ints", VT["INT32"], [struct.pack("<i", i) for i in range(5)])],
                    [T("a.weight", (4, 2), F16), T("b", (8,), F32)], alignment=64)]
INTERESTING_U32 = [0, 1, 2, 3, 4, 8, 9, 12, 13, 31, 32, 48, 2**31, 2**32 - 1]
INTERESTING_U64 = [0, 1, 7, 8, 32, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def reference_tensors(blob: bytes) -> list[tuple[str, int, tuple[int, ...], int]]:
    """The tensors gguf.GGUFReader reads from `blob`: (name, ggml type, ne, absolute data offset)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "x.gguf"
        path.write_bytes(blob)
        reader = gguf.GGUFReader(str(path))
        found = [(t.name, int(t.tensor_type), tuple(int(n) for n in t.shape), int(t.data_offset))
                 for t in reader.tensors]
        del reader
    return found


def check(blob: bytes, record: bool = True) -> str:
    """Validate `blob`; on acceptance, check the layout invariants and agreement with gguf.GGUFReader."""
    started = time.perf_counter()
    try:
        header = validate_gguf_bytes(blob)
    except InputError:
        outcome = "rejected"
    else:
        outcome = "accepted"
        assert header.data_start % header.alignment == 0
        cursor = header.data_start
        for tensor in header.tensors:
            assert tensor.begin == cursor and tensor.end <= len(blob)
            cursor = tensor.begin + -(-(tensor.end - tensor.begin) // header.alignment) * header.alignment
        assert len(blob) <= max(cursor, header.data_start)
        assert reference_tensors(blob) == [(t.name, t.ggml_type, t.ne, t.begin) for t in header.tensors]
    assert time.perf_counter() - started < TIME_BOUND_S
    if record:
        event(outcome)
    return outcome


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """Truncations, bit flips, byte insertions and deletions, and u32/u64 fields overwritten with lies."""
    blob = bytearray(draw(st.sampled_from(SEEDS)))
    header_end = min(len(blob), 1200)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "u32", "u64", "insert", "delete", "data"]))
        if op == "data" and len(blob) > 64:  # weights (and quantisation scales) are data: accepted, then read
            i = draw(st.integers(len(blob) // 2, len(blob) - 1))
            blob[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        elif op == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif op in ("u32", "u64") and len(blob) > 16:
            size = 4 if op == "u32" else 8
            i = draw(st.integers(4, max(4, min(header_end, len(blob)) - size)))
            values = INTERESTING_U32 if size == 4 else INTERESTING_U64
            value = draw(st.one_of(st.sampled_from(values), st.integers(0, 2 ** (8 * size) - 1)))
            blob[i:i + size] = value.to_bytes(size, "little")
        elif op == "insert":
            i = draw(st.integers(0, len(blob)))
            blob[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            del blob[i:i + draw(st.integers(1, 16))]
    return bytes(blob)


KEYS = st.one_of(st.sampled_from(["general.architecture", "general.alignment", "general.name", "llama.block_count",
                                  "tokenizer.ggml.tokens", "", "a\x00b"]), st.text(max_size=10))
SCALAR_TYPES = [t for t in range(13) if t not in (VT["STRING"], VT["ARRAY"])]


@st.composite
def value(draw: st.DrawFn) -> bytes:
    """One value type + payload, honest or lying about its type, length or count."""
    kind = draw(st.sampled_from(["scalar", "string", "array", "strings", "nested", "unknown"]))
    if kind == "scalar":
        vtype = draw(st.sampled_from(SCALAR_TYPES))
        size = struct.calcsize({0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q",
                                12: "d"}[vtype])
        return u32(vtype) + draw(st.binary(min_size=size, max_size=size))
    if kind == "string":
        text = draw(st.binary(max_size=12))
        length = draw(st.one_of(st.just(len(text)), st.sampled_from(INTERESTING_U64)))
        return u32(VT["STRING"]) + string(text, length)
    if kind == "array":
        item = draw(st.sampled_from(SCALAR_TYPES))
        count = draw(st.integers(0, 6))
        size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}[item]
        claimed = draw(st.one_of(st.just(count), st.sampled_from(INTERESTING_U64)))
        return u32(VT["ARRAY"]) + u32(item) + u64(claimed) + draw(st.binary(min_size=count * size,
                                                                             max_size=count * size))
    if kind == "strings":
        items = draw(st.lists(st.binary(max_size=6), max_size=5))
        claimed = draw(st.one_of(st.just(len(items)), st.sampled_from(INTERESTING_U64)))
        return u32(VT["ARRAY"]) + u32(VT["STRING"]) + u64(claimed) + b"".join(string(i) for i in items)
    if kind == "nested":
        return u32(VT["ARRAY"]) + u32(VT["ARRAY"]) + u64(1) + u32(VT["UINT8"]) + u64(1) + b"\x01"
    return u32(draw(st.integers(13, 2**32 - 1))) + b"\x00" * 8


DIM = st.one_of(st.integers(0, 64), st.sampled_from(INTERESTING_U64))


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """Headers whose fields lie: keys, value types, lengths, counts, alignment, dims, types and offsets."""
    kvs = [kv_str("general.architecture", draw(st.sampled_from(["llama", "qwen2", "gemma", "unknown"])))]
    alignment = draw(st.sampled_from([32, 32, 64, 1, 16, 48, 0, 2**20, 2**21]))
    if alignment != 32 or draw(st.booleans()):
        kvs.append(kv_u32("general.alignment", alignment))
    for _ in range(draw(st.integers(0, 4))):
        kvs.append(string(draw(KEYS).encode("utf-8", "surrogatepass")) + draw(value()))
    tensors = []
    for index in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.just(f"t{index}.weight"), st.sampled_from(["t0.weight", "", "x" * 64]),
                              st.text(max_size=8)))
        dims = tuple(draw(st.lists(DIM, max_size=5)))
        ggml_type = draw(st.one_of(st.sampled_from([F32, F16, Q8_0, Q4_0]), st.integers(0, 45)))
        block, size = (1, 4)
        if ggml_type in (Q8_0, Q4_0):
            block = 32
        count = 1
        for n in dims:
            count *= n
        data = b"\x00" * max(0, min(256, count // block * size)) if count < 2**20 else b""
        offset = draw(st.one_of(st.none(), st.integers(0, 512), st.sampled_from(INTERESTING_U64)))
        tensors.append(T(name.encode("utf-8", "surrogatepass"), dims, ggml_type, offset, None, data))
    return gguf_bytes(kvs, tensors, alignment=max(1, alignment) if alignment & (alignment - 1) == 0 else 32,
                      tensor_count=draw(st.one_of(st.none(), st.sampled_from(INTERESTING_U64))),
                      kv_count=draw(st.one_of(st.none(), st.sampled_from(INTERESTING_U64))))


@given(mutated())
def test_mutated_files_parse_or_fail_cleanly(blob: bytes) -> None:
    check(blob)


@given(structured())
def test_lying_fields_parse_or_fail_cleanly(blob: bytes) -> None:
    check(blob)


@given(st.binary(max_size=256).map(lambda b: b"GGUF" + u32(3) + b))
def test_random_bytes_after_the_magic(blob: bytes) -> None:
    check(blob)


@settings(max_examples=max(20, EXAMPLES // 4))
@given(mutated())
def test_mutated_models_resolve_read_and_exit_0_or_2(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("gguf-fuzz") / "m.gguf"
    path.write_bytes(blob)
    started = time.perf_counter()
    try:
        artifact = resolve(path)
        with open_reader(artifact) as reader:
            for info in artifact.tensors:
                reader.float32(info)
    except InputError:
        event("rejected")
    else:
        event("accepted")
    assert main(["inspect", "--json", str(path)]) in (0, 2)
    assert time.perf_counter() - started < TIME_BOUND_S


def test_the_seeds_are_accepted_by_both() -> None:
    assert all(check(seed, record=False) == "accepted" for seed in SEEDS)
    assert kv  # the crafting helpers are shared with the corpus
