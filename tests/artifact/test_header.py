"""Header validation: every rule of the reference parser (and tg-verify's own) has its own typed error."""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path

import pytest
import torch
from make_corpus import CASES, build
from safetensors.torch import save_file
from stcraft import assemble, entry, small_valid, tensors_file

from tg_verify.artifact import errors as artifact_errors
from tg_verify.artifact.header import read_header, validate_bytes
from tg_verify.errors import HeaderError, InputError

HEADER_CASES = {name: code for name, (code, _) in CASES.items()
                if name.endswith(".safetensors") and isinstance(build(name), bytes)}


def _error_classes() -> list[type]:
    return [cls for _, cls in inspect.getmembers(artifact_errors, inspect.isclass)
            if issubclass(cls, InputError) and cls.__module__ == artifact_errors.__name__]


def test_every_artifact_error_has_its_own_code() -> None:
    codes = [cls.code for cls in _error_classes()]
    assert len(codes) == len(set(codes)) >= 30
    assert all(cls.exit_code == 2 for cls in _error_classes())


@pytest.mark.parametrize("name", sorted(HEADER_CASES))
def test_each_malformed_header_raises_its_own_error(name: str) -> None:
    with pytest.raises(HeaderError) as caught:
        validate_bytes(build(name), where=f"/x/{name}")  # type: ignore[arg-type]
    assert caught.value.code == HEADER_CASES[name]
    message = str(caught.value)
    assert message.startswith(f"/x/{name}: ") and "\n" not in message


def test_messages_name_the_tensor_and_the_expectation() -> None:
    blob = assemble({"model.layers.0.q_proj.weight": entry(dtype="F16", shape=[2], offsets=[0, 8])}, b"\0" * 8)
    with pytest.raises(artifact_errors.SizeMismatchError, match=r"'model\.layers\.0\.q_proj\.weight'.*needs 4 bytes"):
        validate_bytes(blob)


def test_the_reference_writer_output_is_valid_and_canonical(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {"w": torch.ones(3, 5, dtype=torch.bfloat16), "s": torch.tensor(2.0), "e": torch.zeros(0, 4)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.canonical and header.metadata == {"format": "pt"}
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {
        "w": ("BF16", (3, 5)), "s": ("F32", ()), "e": ("F32", (0, 4))}
    assert header.data_start + header.tensors[-1].stop == header.file_size


def test_leading_whitespace_is_accepted_but_not_canonical() -> None:
    raw = json.dumps({"a": entry()}).encode()
    _, _, canonical = validate_bytes(assemble(b"\n\t " + raw + b" " * 20, b"\0" * 8))
    assert not canonical
    _, _, canonical = validate_bytes(assemble(raw + b"   ", b"\0" * 8))
    assert canonical


def test_zero_sized_tensors_may_share_an_offset() -> None:
    blob = assemble({"a": entry(shape=[0], offsets=[0, 0]), "b": entry(shape=[0, 3], offsets=[0, 0]),
                     "c": entry(shape=[2], offsets=[0, 8])}, b"\0" * 8)
    tensors, _, _ = validate_bytes(blob)
    assert [t.name for t in tensors][-1] == "c"


def test_header_cap_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(small_valid())
    read_header(path)
    with pytest.raises(artifact_errors.HeaderTooLargeError, match="limit of 16 bytes"):
        read_header(path, max_header_bytes=16)


def test_validation_matches_the_file_size_not_the_header_claims() -> None:
    blob = tensors_file({"a": ("F32", [4])})
    length = struct.unpack("<Q", blob[:8])[0]
    with pytest.raises(artifact_errors.DataTruncatedError, match="'a'"):
        validate_bytes(blob[: 8 + length + 3])
