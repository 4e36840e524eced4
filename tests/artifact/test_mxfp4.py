"""artifact/mxfp4.py: GPT-OSS's MXFP4 experts resolve as the float parameters the runtime loads, read with the values
transformers dequantises them into; every pair is validated once, and a hostile one is a typed error (exit 2, one
line), never a traceback or a silently skipped tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tg_verify.artifact import open_reader, resolve
from tg_verify.artifact.errors import AmbiguousTensorError, PackedTensorError
from tg_verify.artifact.model import FLOAT_DTYPES
from tg_verify.artifact.mxfp4 import DTYPE, PackedTensor
from tg_verify.artifact.summary import describe
from tg_verify.cli import main
from tg_verify.tiny import FP4_VALUES, build_gpt_oss, save_mxfp4

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.1.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_mxfp4(build_gpt_oss(seed=0), tmp_path_factory.mktemp("mxfp4") / "model")


def decoded(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 decoded from its definition, independently of transformers: [E, out, in/32, 16] bytes, low nibble
    first, times 2^(scale - 127), as [E, in, out]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    values = values * torch.exp2(scales.double() - 127)[..., None]
    return values.flatten(-2).transpose(1, 2)


def test_each_pair_resolves_as_its_parameter_with_the_values_the_runtime_loads(packed: Path) -> None:
    """The pairs are the parameters gate_up_proj [E, d, 2f] and down_proj [E, f, d] (dtype MXFP4, their stored
    bytes counted), nothing is unexpected or missing, and the values read are bit for bit those transformers loads
    from the checkpoint, and those of the format's definition."""
    import transformers

    artifact = resolve(packed)
    assert artifact.architecture == "gpt_oss" and not artifact.unexpected
    assert not any("not stored" in w for w in artifact.warnings), artifact.warnings
    infos = {info.name: info for info in artifact.tensors}
    assert not any(name.endswith(("_blocks", "_scales")) for name in infos)
    gate_up, down = infos[GATE_UP], infos[DOWN]
    assert isinstance(gate_up, PackedTensor) and gate_up.dtype == DTYPE and gate_up.shape == (4, 64, 256)
    assert isinstance(down, PackedTensor) and down.shape == (4, 128, 64)
    stored = load_file(packed / "model.safetensors")
    assert gate_up.nbytes == sum(stored[GATE_UP + s].numel() for s in ("_blocks", "_scales"))
    document = describe(artifact)
    assert document["dtypes"][DTYPE]["tensors"] == 4 and DTYPE in FLOAT_DTYPES
    assert not any("cannot be decoded" in w for w in document["validation"]["warnings"])
    assert document["total_bytes"] == sum(v.numel() * v.element_size() for v in stored.values())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32).state_dict()
    with open_reader(artifact) as reader:
        for info in (gate_up, down):
            assert reader.raw(info).dtype == torch.bfloat16
            values = reader.float32(info, finite=True)
            assert torch.equal(values, loaded[info.name])
            assert torch.equal(values.double(), decoded(stored[info.name + "_blocks"], stored[info.name + "_scales"]))


def test_without_mxfp4_in_config_the_pairs_are_not_loaded(packed: Path, tmp_path: Path) -> None:
    """A runtime without the MXFP4 quantiser loads no `_blocks`/`_scales`: they are unexpected, under their stored
    names, and the parameters they would have made are reported missing."""
    config = json.loads((packed / "config.json").read_text())
    del config["quantization_config"]
    directory = tmp_path / "plain"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes((packed / "model.safetensors").read_bytes())
    (directory / "config.json").write_text(json.dumps(config))
    artifact = resolve(directory)
    assert {info.name for info in artifact.unexpected} >= {GATE_UP + "_blocks", GATE_UP + "_scales"}
    assert any(GATE_UP in w and "not stored" in w for w in artifact.warnings)


def _edit_state(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        state = load_file(directory / "model.safetensors")
        edit(state)
        save_file(state, str(directory / "model.safetensors"))
    return apply


def _edit_config(key: str, value: Any) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config[key] = value
        (directory / "config.json").write_text(json.dumps(config))
    return apply


HOSTILE: dict[str, tuple[type[Exception], str, Callable[[Path], None]]] = {
    "missing scales": (PackedTensorError, "no partner", _edit_state(lambda s: s.pop(GATE_UP + "_scales"))),
    "orphan scales": (PackedTensorError, "no partner", _edit_state(lambda s: s.pop(DOWN + "_blocks"))),
    "scales off their blocks": (PackedTensorError, "one scale per block", _edit_state(
        lambda s: s.update({GATE_UP + "_scales": s[GATE_UP + "_scales"][:, :128].contiguous()}))),
    "the other orientation": (PackedTensorError, "config.json's sizes", _edit_state(
        lambda s: s.update({GATE_UP + "_blocks": torch.zeros(4, 64, 8, 16, dtype=torch.uint8),
                            GATE_UP + "_scales": torch.zeros(4, 64, 8, dtype=torch.uint8)}))),
    "not bytes": (PackedTensorError, "expected U8", _edit_state(
        lambda s: s.update({DOWN + "_blocks": s[DOWN + "_blocks"].to(torch.int8)}))),
    "eight bytes a block": (PackedTensorError, "expected [experts, rows, groups, 16]", _edit_state(
        lambda s: s.update({DOWN + "_blocks": s[DOWN + "_blocks"][..., :8].contiguous()}))),
    "float beside its pair": (AmbiguousTensorError, "also stores", _edit_state(
        lambda s: s.update({GATE_UP: torch.zeros(4, 64, 256)}))),
    "a size that is no integer": (PackedTensorError, "not a positive integer", _edit_config("hidden_size", "64")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_pair_is_a_typed_error_naming_file_tensor_and_expectation(
        case: str, packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error, words, edit = HOSTILE[case]
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("model.safetensors", "config.json"):
        (directory / name).write_bytes((packed / name).read_bytes())
    edit(directory)
    with pytest.raises(error) as raised:
        resolve(directory)
    message = str(raised.value)
    assert words in message and raised.value.file == str(directory / "model.safetensors"), message
    assert message.startswith(str(directory / "model.safetensors") + ": ")
    if case != "a size that is no integer":
        assert "_blocks" in message or "_scales" in message or "gate_up_proj" in message
    for argv in (["inspect", str(directory)], ["fingerprint", str(directory), "-o", str(tmp_path / "fp.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("tg-verify: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_infinite_scales_are_refused_as_weight_values(packed: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Scale byte 255 (2^128: E8M0's NaN) dequantises past float range: refused like any non-finite weight."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_bytes((packed / "config.json").read_bytes())
    state = load_file(packed / "model.safetensors")
    state[DOWN + "_scales"][0, 0, 0] = 255
    save_file(state, str(directory / "model.safetensors"))
    assert main(["fingerprint", str(directory), "-o", str(tmp_path / "fp.json")]) == 2
    err = capsys.readouterr().err
    assert f"'{DOWN}' holds NaN or infinite values" in err and err.count("\n") == 1, err
