"""Property-based fuzzing of the safetensors header reader and the layout resolver.

Every input ends in a valid parse or a typed InputError (exit 2), within a bounded time, never any
other exception. Accepted files are also checked against the reference parser (the `safetensors`
package): whatever tg-verify accepts, the reference accepts with the same tensors.

CI runs a fixed-seed budget (derandomized). Longer run, e.g. 20000 examples per property:
    TG_FUZZ_EXAMPLES=20000 pytest tests/fuzz -q
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from stcraft import assemble, small_valid, tensors_file

from tg_verify.artifact.header import read_header, validate_bytes
from tg_verify.artifact.layout import resolve
from tg_verify.artifact.model import DTYPE_BITS, natural_key
from tg_verify.cli import main
from tg_verify.errors import InputError

EXAMPLES = int(os.environ.get("TG_FUZZ_EXAMPLES", "400"))
settings.register_profile("tg-fuzz", max_examples=EXAMPLES, derandomize="TG_FUZZ_EXAMPLES" not in os.environ,
                          deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("tg-fuzz")
TIME_BOUND_S = 5.0  # per input, on a loaded CI machine; typical inputs take well under a millisecond

SEEDS = [small_valid(), tensors_file({"model.layers.0.self_attn.q_proj.weight": ("BF16", [4, 4]),
                                      "model.layers.0.mlp.up_proj.weight": ("F16", [8, 4]),
                                      "model.norm.weight": ("F32", [4]), "scalar": ("F32", []),
                                      "empty": ("I8", [0, 3])}, metadata={"format": "pt", "k": "v"})]


def check(blob: bytes) -> str:
    """Validate `blob`; on acceptance, check invariants and agreement with the reference parser."""
    started = time.perf_counter()
    try:
        tensors, _, _ = validate_bytes(blob)
    except InputError:
        outcome = "rejected"
    else:
        outcome = "accepted"
        data_len = len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]
        cursor = 0
        for t in sorted(tensors, key=lambda t: (t.start, t.stop)):
            assert t.start == cursor and (t.stop - t.start) * 8 == DTYPE_BITS[t.dtype] * _numel(t.shape)
            cursor = t.stop
        assert cursor == data_len
        reference = {name: (info["dtype"], tuple(info["shape"])) for name, info in safetensors.deserialize(blob)}
        assert reference == {t.name: (t.dtype, t.shape) for t in tensors}
    assert time.perf_counter() - started < TIME_BOUND_S
    event(outcome)
    return outcome


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    blob = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "length", "insert", "delete", "json-flip"]))
        if op == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        elif op == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "json-flip" and len(blob) > 9:  # aim at the header text, where the structure is
            end = min(len(blob), 8 + struct.unpack("<Q", bytes(blob[:8]))[0]) if len(blob) >= 8 else len(blob)
            i = draw(st.integers(8, max(8, end - 1)))
            if i < len(blob):
                blob[i] = draw(st.sampled_from(b'{}[]",:0123456789-e. \\u\x00\xff'))
        elif op == "length" and len(blob) >= 8:
            value = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**63 - 1, 2**64 - 1, 0, 1]),
                                   st.integers(0, len(blob) + 16)))
            blob[:8] = struct.pack("<Q", value)
        elif op == "insert":
            i = draw(st.integers(0, len(blob)))
            blob[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            del blob[i:i + draw(st.integers(1, 16))]
    return bytes(blob)


NAMES = st.one_of(st.sampled_from(["a", "b", "model.layers.0.mlp.weight", "__metadata__", ""]),
                  st.text(max_size=12))
DTYPES = st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.text(max_size=6), st.integers(), st.none())
DIMS = st.one_of(st.integers(0, 8), st.integers(-3, 2**70), st.sampled_from([2**63, 2**64, -(2**63)]),
                 st.floats(allow_nan=True), st.booleans(), st.text(max_size=2))
SHAPES = st.one_of(st.lists(DIMS, max_size=10), st.integers(), st.none(), st.text(max_size=3))
OFFSETS = st.one_of(st.lists(st.one_of(st.integers(0, 64), st.integers(-(2**65), 2**65), st.floats()), max_size=3),
                    st.none(), st.integers())
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=20)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """Headers that are well-formed JSON but lie in every field: shapes, dtypes, offsets, metadata."""
    header: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 5))):
        spec: Any = {"dtype": draw(DTYPES), "shape": draw(SHAPES), "data_offsets": draw(OFFSETS)}
        if draw(st.integers(0, 9)) == 0:
            spec = draw(JSON)
        header[draw(NAMES)] = spec
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), JSON))
    text = json.dumps(header, allow_nan=True)
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", " ", "\n\t"])) + text + " " * draw(st.integers(0, 12))
    return assemble(text, b"\x00" * draw(st.integers(0, 96)))


@st.composite
def consistent(draw: st.DrawFn) -> bytes:
    """Headers whose offsets are laid out correctly, with an occasional off-by-something: near-valid files."""
    header: dict[str, Any] = {}
    cursor = 0
    for i in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nbits = _numel(tuple(shape)) * DTYPE_BITS[dtype]
        size = nbits // 8 + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        start = cursor + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        header[f"t.{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
        cursor = start + size
    return assemble(header, b"\x01" * max(0, cursor + draw(st.sampled_from([0, 0, 0, 1, -1]))))


@given(mutated())
def test_mutated_files(blob: bytes) -> None:
    check(blob)


@given(structured())
def test_lying_headers(blob: bytes) -> None:
    check(blob)


def _reference_accepts(blob: bytes) -> bool:
    try:
        safetensors.deserialize(blob)
    except Exception:  # noqa: BLE001 - the reference raises SafetensorError and others; any means "rejected"
        return False
    return True


@given(consistent())
def test_near_valid_headers(blob: bytes) -> None:
    # These headers use plain names and exact keys, so tg-verify's extra strictness never applies:
    # it must agree with the reference parser both ways.
    assert (check(blob) == "accepted") == _reference_accepts(blob)


@given(JSON, st.binary(max_size=32))
def test_arbitrary_json_headers(document: Any, data: bytes) -> None:
    check(assemble(json.dumps(document, allow_nan=True), data))


@given(st.binary(max_size=256))
def test_random_bytes(blob: bytes) -> None:
    check(blob)


@given(st.integers(1, 200_000), st.sampled_from(["[", '{"a":', '{"a":{"shape":']))
def test_deep_nesting(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '{"a":{"shape":': "}}"}[opener]
    assert check(assemble(opener * depth + "1" + closer * depth)) == "rejected"


@settings(max_examples=max(20, EXAMPLES // 5))
@given(mutated())
def test_files_on_disk(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        try:
            header = read_header(path)
        except InputError:
            return
        assert header.file_size == len(blob)


SHARD_NAMES = st.one_of(st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                         "../model-00001-of-00002.safetensors", "/etc/passwd", ".", "",
                                         "model-00003-of-00002.safetensors", "sub/x.safetensors"]),
                        st.text(max_size=12), st.integers(), st.none())


@settings(max_examples=max(20, EXAMPLES // 5))
@given(st.dictionaries(st.one_of(st.sampled_from(["a", "b", "c"]), st.text(max_size=4)), SHARD_NAMES, max_size=4),
       st.one_of(st.none(), JSON))
def test_shard_indexes(weight_map: dict[str, Any], metadata: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model-00001-of-00002.safetensors").write_bytes(tensors_file({"a": ("F32", [1])}))
        (root / "model-00002-of-00002.safetensors").write_bytes(tensors_file({"b": ("F32", [1])}))
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map, "metadata": metadata}, allow_nan=True))
        try:
            artifact = resolve(root)
        except InputError:
            return
        assert [t.name for t in artifact.tensors] == ["a", "b"]


FILE_NAMES = st.sampled_from(["model.safetensors", "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors", "model-00003-of-00002.safetensors",
                              "model-00001-of-00001.safetensors", "other-00001-of-00002.safetensors",
                              "model.00002-of-00002.safetensors", "consolidated.safetensors",
                              "consolidated.00.safetensors", "adapter_model.safetensors", "pytorch_model.bin",
                              "x.safetensors.index.json", "config.json", "adapter_config.json"])


@settings(max_examples=max(20, EXAMPLES // 5))
@given(st.dictionaries(FILE_NAMES, st.sampled_from(["a", "b", "ab", "junk", "json"]), min_size=1, max_size=6))
def test_directory_layouts(tree: dict[str, str]) -> None:
    """Any mix of real-world file names resolves to one consistent artifact, the same every time, or an InputError."""
    contents = {"a": tensors_file({"a": ("F32", [1])}), "b": tensors_file({"b": ("F32", [1])}),
                "ab": tensors_file({"a": ("F32", [1]), "b": ("F32", [1])}), "junk": b"\x00" * 5,
                "json": b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}, "peft_type": "LORA"}'}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, kind in tree.items():
            (root / name).write_bytes(contents[kind])
        try:
            first = resolve(root)
        except InputError:
            return
        names = [t.name for t in first.tensors]
        assert len(names) == len(set(names)) and names == sorted(names, key=natural_key)
        assert resolve(root) == first


@given(st.lists(st.text(max_size=8), max_size=12), st.randoms(use_true_random=False))
def test_canonical_order_is_total(names: list[str], rng: Any) -> None:
    shuffled = names[:]
    rng.shuffle(shuffled)
    assert sorted(shuffled, key=natural_key) == sorted(names, key=natural_key)


@settings(max_examples=max(20, EXAMPLES // 5))
@given(mutated())
def test_cli_exit_codes(blob: bytes) -> None:
    """Through the real CLI entry point: exit 0 or 2 with one line, never 3 (an internal error)."""
    import contextlib
    import io

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["inspect", "--json", str(path)])
        assert code in (0, 2) and err.getvalue().count("\n") == (code == 2)
