"""A GGUF model fingerprints like its safetensors original: identical at F32, recorded as GGUF, extras ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_helpers import with_extra_tensors

from tg_verify.artifact import file_digests, resolve
from tg_verify.artifact.merge import open_merged
from tg_verify.fingerprint.extract import fingerprint_artifact
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.tiny import ARCHITECTURES, save_gguf, save_lora_adapter, save_model

SETTINGS = FingerprintSettings(device="cpu")


def _with_vocabulary(model: torch.nn.Module, directory: Path) -> Path:
    """The safetensors original with its vocabulary beside it (the tokens save_gguf writes into the GGUF file):
    the lineage sketch keys tokens by text, so the two are compared with the same vocabulary on both sides."""
    return save_model(model, directory, vocabulary=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_f32_gguf_fingerprint_equals_the_safetensors_one(arch: str, tiny_models: dict[str, dict[str, Path]],
                                                          tiny_model_objects: dict[str, torch.nn.Module],
                                                          tmp_path: Path) -> None:
    path = save_gguf(tiny_model_objects[arch], tmp_path / f"{arch}.gguf", "F32")
    original = fingerprint_artifact(resolve(_with_vocabulary(tiny_model_objects[arch], tmp_path / arch)), SETTINGS)
    converted = fingerprint_artifact(resolve(path), SETTINGS)
    assert converted.features == original.features
    assert converted.sketch is not None and original.sketch is not None
    if arch == "mistral":  # llama.cpp stores mistral as its llama architecture: the sketch records what the file says
        assert converted.sketch["architecture"]["model_type"] == "llama"
        converted.sketch["architecture"]["model_type"] = "mistral"
    assert converted.sketch == original.sketch
    assert converted.sketch["probe"]["keys"] == "strings"
    bare = fingerprint_artifact(resolve(tiny_models[arch]["single"]), SETTINGS)  # weights only: keyed by ids
    assert bare.features == original.features and bare.sketch is not None and bare.sketch["probe"]["keys"] == "ids"
    assert [(t["name"], t["shape"]) for t in converted.tensors] == [(t["name"], t["shape"]) for t in original.tensors]
    record = converted.artifact
    assert record["format"] == "gguf" and "format" not in original.artifact
    assert [f["path"] for f in record["files"]] == [path.name]
    assert record["files"][0]["sha256"] == file_digests(resolve(path))[path.name]
    assert set(record["quantisation"]) == {"F32"}


def test_quantisation_types_are_recorded_and_quantised_matrices_analysed(tiny_model_objects, tmp_path: Path) -> None:
    fp = fingerprint_artifact(resolve(save_gguf(tiny_model_objects["qwen2"], tmp_path / "q.gguf", "Q4_0")), SETTINGS)
    assert fp.artifact["quantisation"] == {"F32": 11, "Q4_0": 16}  # 1-D norms (5) and q/k/v biases (6) stay F32
    analysed = {t["name"] for t in fp.tensors if t["analysis"] == "gradient"}
    assert analysed == {t["name"] for t in fp.tensors if t["dtype"] == "Q4_0"}
    assert fp.sketch is not None and len(fp.sketch["units"]) > 2


def test_tensors_llama_cpp_does_not_load_change_nothing(tiny_model_objects, tmp_path: Path) -> None:
    path = save_gguf(tiny_model_objects["llama"], tmp_path / "plain.gguf", "Q8_0")
    with_extra_tensors(path, tmp_path / "extra.gguf", {"blk.0.backdoor.weight": np.full((64, 64), 9.0, np.float32)})
    plain = fingerprint_artifact(resolve(path), SETTINGS)
    extra = fingerprint_artifact(resolve(tmp_path / "extra.gguf"), SETTINGS)
    assert extra.features == plain.features and extra.sketch == plain.sketch
    assert extra.extraction is not None and extra.extraction["unexpected_tensors"] == ["blk.0.backdoor.weight"]
    assert plain.extraction is not None and "unexpected_tensors" not in plain.extraction


def test_an_adapter_merges_onto_a_gguf_base_as_onto_its_safetensors_original(
        tiny_models: dict[str, dict[str, Path]], tiny_model_objects: dict[str, torch.nn.Module],
        tmp_path: Path) -> None:
    base_model = tiny_model_objects["llama"]
    adapter = resolve(save_lora_adapter(base_model, tmp_path / "adapter"))
    gguf_base = resolve(save_gguf(base_model, tmp_path / "base.gguf", "F32"))
    with open_merged(adapter, resolve(_with_vocabulary(base_model, tmp_path / "base"))) as merged:
        expected = fingerprint_artifact(merged.artifact, SETTINGS, reader=merged)
    with open_merged(adapter, gguf_base) as merged:
        got = fingerprint_artifact(merged.artifact, SETTINGS, reader=merged)
    assert got.features == expected.features and got.sketch == expected.sketch
    assert got.sketch is not None and got.sketch["probe"]["keys"] == "strings"  # the base's vocabulary keys both
