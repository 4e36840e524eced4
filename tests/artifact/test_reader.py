"""Streaming reader: exact float32 decoding of every supported dtype, one tensor at a time, never writing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from stcraft import assemble, entry

from tg_verify.artifact import TensorReader, resolve
from tg_verify.artifact.errors import FileChangedError
from tg_verify.artifact.model import DECODABLE_DTYPES
from tg_verify.artifact.reader import TORCH_DTYPES
from tg_verify.errors import UnsupportedDtypeError, WeightValueError
from tg_verify.tiny import ARCHITECTURES

SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                     torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                     torch.float8_e5m2: "F8_E5M2"}


def test_the_decodable_table_matches_the_reader() -> None:
    assert set(TORCH_DTYPES) == DECODABLE_DTYPES


@pytest.mark.parametrize("dtype", list(SAFETENSORS_NAMES), ids=lambda d: SAFETENSORS_NAMES[d])
def test_every_dtype_decodes_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    source = (torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    save_file({"w": source, "pad": torch.zeros(3, dtype=torch.int8)}, str(tmp_path / "model.safetensors"))
    artifact = resolve(tmp_path)
    with TensorReader(artifact) as reader:
        info = artifact.tensor("w")
        assert reader.raw(info).dtype == dtype
        assert torch.equal(reader.float32(info), source.to(torch.float32))


def test_unaligned_data_is_copied_not_misviewed(tmp_path: Path) -> None:
    values = torch.arange(6, dtype=torch.float32)
    header = b'{"w":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}'  # odd length: data starts unaligned
    assert (8 + len(header)) % 4
    (tmp_path / "x.safetensors").write_bytes(assemble(header, values.numpy().tobytes()))
    artifact = resolve(tmp_path / "x.safetensors")
    with TensorReader(artifact) as reader:
        assert torch.equal(reader.float32(artifact.tensors[0]), values)


@pytest.mark.parametrize(("dtype", "shape", "nbytes"), [("F4", [4], 2), ("F6_E3M2", [4], 3), ("C64", [2], 16)])
def test_undecodable_dtypes_raise_a_clear_error(tmp_path: Path, dtype: str, shape: list[int], nbytes: int) -> None:
    (tmp_path / "q.safetensors").write_bytes(assemble({"q.weight": entry(dtype, shape, [0, nbytes])}, b"\0" * nbytes))
    artifact = resolve(tmp_path / "q.safetensors")
    with TensorReader(artifact) as reader, pytest.raises(UnsupportedDtypeError, match=f"'q.weight'.*{dtype}"):
        reader.float32(artifact.tensors[0])


def test_non_finite_weights_are_refused_on_request(tmp_path: Path) -> None:
    save_file({"w": torch.tensor([1.0, float("nan"), float("inf")])}, str(tmp_path / "model.safetensors"))
    artifact = resolve(tmp_path)
    with TensorReader(artifact) as reader:
        assert torch.isnan(reader.float32(artifact.tensors[0])).any()  # values are data, not validated...
        with pytest.raises(WeightValueError, match="'w' holds 2 NaN or infinite"):
            reader.float32(artifact.tensors[0], finite=True)  # ...unless the caller asks


def test_stream_is_identical_from_every_layout(tiny_models: dict[str, dict[str, Path]]) -> None:
    for arch in ARCHITECTURES:
        streams = {}
        for layout, path in tiny_models[arch].items():
            with TensorReader(resolve(path)) as reader:
                digest = hashlib.sha256()
                for info, tensor in reader.stream():
                    digest.update(info.name.encode())
                    digest.update(tensor.numpy().tobytes())
                streams[layout] = digest.hexdigest()
        assert len(set(streams.values())) == 1, (arch, streams)


def test_reading_never_writes_the_model(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    artifact = resolve(tmp_path)
    with TensorReader(artifact) as reader:
        view = reader.raw(artifact.tensors[0])
        view.mul_(7)  # a careless consumer: the private copy-on-write map absorbs it
        del view
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_a_file_changed_after_validation_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    artifact = resolve(tmp_path)
    with open(tmp_path / "model.safetensors", "ab") as handle:
        handle.write(b"\0" * 16)
    with TensorReader(artifact) as reader, pytest.raises(FileChangedError):
        reader.float32(artifact.tensors[0])
