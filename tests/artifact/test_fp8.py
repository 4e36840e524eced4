"""artifact/fp8.py and the reader: an FP8 checkpoint's float8 weights are read times their scales, exactly as
transformers dequantises them; the scales are set apart (bound by digest, not weights); every hostile variant is a
typed error, exit 2 from the CLI, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fp8_helpers import dequantised, quantise_blocks, save_fp8
from safetensors.torch import save_file

from tg_verify.artifact import open_reader, resolve
from tg_verify.artifact.errors import QuantizationConfigError, ScaleTensorError, ScaleValueError
from tg_verify.cli import main
from tg_verify.errors import TgVerifyError
from tg_verify.tiny import build_model, save_model

State = dict[str, torch.Tensor]
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def llama() -> Any:
    return build_model("llama", seed=0)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    artifact = resolve(directory)
    with open_reader(artifact) as reader:
        return {info.name: reader.float32(info, finite=True) for info in artifact.tensors}


@pytest.mark.parametrize("block", [(16, 16), (24, 40), (128, 128)])
def test_block_wise_weights_are_what_transformers_dequantises(llama: Any, block: tuple[int, int],
                                                              tmp_path: Path) -> None:
    """Each float8 weight reads as transformers' own dequantisation of it (Fp8Dequantize, what a CPU load runs,
    where the blocks tile the matrix; the backward pass's _dequantize_fp8_weight, which follows weight_block_size
    over partial edge blocks too), within float32 rounding of the original; the rest is read as stored."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    directory = save_fp8(llama, tmp_path / "fp8", "fp8", block)
    artifact = resolve(directory)
    assert artifact.quantisation is not None and artifact.quantisation.method == "fp8"
    assert {t.name for t in artifact.quantisation.companions} == {f"{w[:-6]}weight_scale_inv"
                                                                  for w in artifact.quantisation.scaled}
    assert not artifact.unexpected and not any(t.name.endswith("scale_inv") for t in artifact.tensors)
    read = read_all(directory)
    state = llama.state_dict()
    from safetensors.torch import load_file

    stored = load_file(str(directory / "model.safetensors"))
    for name, weight in read.items():
        if name not in artifact.quantisation.scaled:
            assert torch.equal(weight, state[name])
            continue
        values, scale = stored[name], stored[name[:-6] + "weight_scale_inv"]
        rows, cols = values.shape
        assert torch.equal(weight, _dequantize_fp8_weight(values, scale, list(block), torch.float32))
        if rows % block[0] == 0 and cols % block[1] == 0 or (rows <= block[0] and cols <= block[1]):
            assert torch.equal(weight, Fp8Dequantize(None)._dequantize_one(values, scale, torch.float32))
        assert torch.allclose(weight, dequantised(values, scale, block))
        assert (weight - state[name]).abs().max() <= state[name].abs().max() / 8  # float8's 3 mantissa bits


@pytest.mark.parametrize("method", ["compressed-tensors", "fbgemm_fp8"])
def test_per_channel_weights_are_values_times_their_row_scale(llama: Any, method: str, tmp_path: Path) -> None:
    """compressed-tensors (its FP8 dequantisation is `value.float() * scale.float()`) and fbgemm: one scale per
    output row; compressed-tensors' input scales are companions too, never weights."""
    directory = save_fp8(llama, tmp_path / method, method, scale_dtype=torch.bfloat16)
    from safetensors.torch import load_file

    stored = load_file(str(directory / "model.safetensors"))
    artifact = resolve(directory)
    assert artifact.quantisation is not None and len(artifact.quantisation.scaled) == 14
    suffixes = {t.name.rsplit(".", 1)[1] for t in artifact.quantisation.companions}
    assert suffixes == ({"weight_scale", "input_scale"} if method == "compressed-tensors" else {"weight_scale"})
    for name, weight in read_all(directory).items():
        if name in artifact.quantisation.scaled:
            expected = stored[name].to(torch.float32) * stored[name[:-6] + "weight_scale"].to(torch.float32)
            assert torch.equal(weight, expected)


def test_per_tensor_bf16_and_ue8m0_scales(llama: Any, tmp_path: Path) -> None:
    """weight_block_size null: one scalar scale per weight; block scales stored as bfloat16 or as UE8M0 powers of
    two (DeepSeek-V4's scale_fmt) are read as their values."""
    tensor = save_fp8(llama, tmp_path / "tensor", "fp8", None)
    artifact = resolve(tensor)
    assert artifact.quantisation is not None
    assert all(s.scale.shape == () for s in artifact.quantisation.scaled.values())
    from safetensors.torch import load_file

    stored = load_file(str(tensor / "model.safetensors"))
    assert torch.equal(read_all(tensor)[DOWN + ".weight"],
                       stored[DOWN + ".weight"].float() * stored[DOWN + ".weight_scale_inv"])
    for dtype in (torch.bfloat16, torch.float8_e8m0fnu):
        directory = save_fp8(llama, tmp_path / str(dtype), "fp8", (16, 16), scale_dtype=dtype)
        stored = load_file(str(directory / "model.safetensors"))
        expected = dequantised(stored[DOWN + ".weight"], stored[DOWN + ".weight_scale_inv"].float(), (16, 16))
        assert torch.equal(read_all(directory)[DOWN + ".weight"], expected)


def test_fused_experts_pair_with_their_scale_inv(tmp_path: Path) -> None:
    """transformers 5's fused experts (`mlp.experts.gate_up_proj` [experts, out, in]) take `<name>_scale_inv` with
    the experts' dimension leading; each expert is dequantised by its own grid."""
    weights = torch.randn(2, 40, 24)
    pairs = [quantise_blocks(w, (16, 16)) for w in weights]
    state = {"model.layers.0.mlp.experts.gate_up_proj": torch.stack([v for v, _ in pairs]),
             "model.layers.0.mlp.experts.gate_up_proj_scale_inv": torch.stack([s for _, s in pairs]),
             "model.embed_tokens.weight": torch.randn(8, 24)}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "unknown", "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}))
    read = read_all(tmp_path)["model.layers.0.mlp.experts.gate_up_proj"]
    for expert, (values, scale) in enumerate(pairs):
        assert torch.equal(read[expert], dequantised(values, scale, (16, 16)))


def test_float8_without_quantization_config_is_read_as_stored(llama: Any, tmp_path: Path) -> None:
    """A plain cast to float8 (no quantization_config) keeps working as before: values as stored, and scale-named
    tensors, which such a runtime never loads, are unexpected."""
    cast = build_model("llama", seed=0).to(torch.float8_e4m3fn)
    directory = save_model(cast, tmp_path / "cast")
    artifact = resolve(directory)
    assert artifact.quantisation is None
    weight = read_all(directory)[DOWN + ".weight"]
    assert torch.equal(weight, cast.state_dict()[DOWN + ".weight"].float())

    def drop_config(state: State, config: dict[str, Any]) -> None:
        del config["quantization_config"]

    stray = resolve(save_fp8(llama, tmp_path / "no-config", edit=drop_config))
    assert stray.quantisation is None and len(stray.unexpected) == 14


# --- hostile suppliers ------------------------------------------------------------------------------------------

def _set(key: str, value: Any) -> Callable[[State, dict[str, Any]], None]:
    def edit(state: State, config: dict[str, Any]) -> None:
        config["quantization_config"][key] = value
    return edit


def _state(change: Callable[[State], None]) -> Callable[[State, dict[str, Any]], None]:
    def edit(state: State, config: dict[str, Any]) -> None:
        change(state)
    return edit


def _bf16_weight(state: State) -> None:
    state[DOWN + ".weight"] = state[DOWN + ".weight"].to(torch.bfloat16)


def _config(value: Any) -> Callable[[State, dict[str, Any]], None]:
    def edit(state: State, config: dict[str, Any]) -> None:
        config["quantization_config"] = value
    return edit


def _scale(value: float) -> Callable[[State], None]:
    def change(state: State) -> None:
        state[DOWN + ".weight_scale_inv"][0, 1] = value
    return change


# name -> (method, edit, error class, text the message holds)
RESOLVE_CASES: dict[str, tuple[str, Any, type[TgVerifyError], str]] = {
    "scale shape off the blocks": ("fp8", _state(lambda s: s.__setitem__(DOWN + ".weight_scale_inv",
                                                                         torch.ones(4, 4))),
                                   ScaleTensorError, "expected [4, 8]"),
    "missing scale": ("fp8", _state(lambda s: s.pop(DOWN + ".weight_scale_inv")), ScaleTensorError, "has no scale"),
    "orphan scale": ("fp8", _state(lambda s: s.__setitem__("model.layers.0.mlp.spare.weight_scale_inv",
                                                           torch.ones(1, 1))), ScaleTensorError, "no float8 weight"),
    "scale of a bf16 weight": ("fp8", _state(_bf16_weight), ScaleTensorError, "not float8"),
    "integer scale": ("fp8", _state(lambda s: s.__setitem__(DOWN + ".weight_scale_inv",
                                                            torch.ones(4, 8, dtype=torch.int32))),
                      ScaleTensorError, "dtype I32"),
    "block size of one number": ("fp8", _set("weight_block_size", [128]), QuantizationConfigError,
                                 "weight_block_size"),
    "block size of zero": ("fp8", _set("weight_block_size", [0, 128]), QuantizationConfigError, "weight_block_size"),
    "block size as text": ("fp8", _set("weight_block_size", "128"), QuantizationConfigError, "weight_block_size"),
    "block size of booleans": ("fp8", _set("weight_block_size", [True, True]), QuantizationConfigError,
                               "weight_block_size"),
    "unknown quant_method": ("fp8", _set("quant_method", "gptq"), QuantizationConfigError, "'gptq'"),
    "quant_method not a name": ("fp8", _set("quant_method", ["fp8"]), QuantizationConfigError, "['fp8']"),
    "quantization_config not an object": ("fp8", _config(["fp8"]), QuantizationConfigError, "must be an object"),
    "packed compressed-tensors": ("compressed-tensors", _set("format", "pack-quantized"), QuantizationConfigError,
                                  "'pack-quantized'"),
    "per-token weight strategy": ("compressed-tensors", lambda s, c: c["quantization_config"]["config_groups"]
                                  ["group_0"]["weights"].__setitem__("strategy", "token"),
                                  QuantizationConfigError, "'token'"),
    "channel scale as a block grid": ("fbgemm_fp8", _state(lambda s: s.__setitem__(DOWN + ".weight_scale",
                                                                                   torch.ones(64, 2))),
                                      ScaleTensorError, "expected [64, 1]"),
}


def _value_case(value: float) -> tuple[str, Any, type[TgVerifyError], str]:
    return "fp8", _state(_scale(value)), ScaleValueError, "NaN, infinite, zero or negative"


def _zero_point(state: State) -> None:
    state[DOWN + ".weight_zero_point"] = torch.zeros(64, 1)
    state[DOWN + ".weight_zero_point"][3] = 1.0


READ_CASES: dict[str, tuple[str, Any, type[TgVerifyError], str]] = {
    "NaN scale": _value_case(float("nan")), "infinite scale": _value_case(float("inf")),
    "zero scale": _value_case(0.0), "negative scale": _value_case(-0.01),
    "non-zero zero point": ("compressed-tensors", _state(_zero_point), ScaleValueError, "is not zero"),
}


@pytest.mark.parametrize("case", sorted(RESOLVE_CASES))
def test_hostile_checkpoint_is_refused_when_resolved(llama: Any, case: str, tmp_path: Path) -> None:
    method, edit, error, text = RESOLVE_CASES[case]
    directory = save_fp8(llama, tmp_path / "m", method, edit=edit)
    with pytest.raises(error) as raised:
        resolve(directory)
    assert text in str(raised.value) and raised.value.file is not None and Path(raised.value.file).is_file()


@pytest.mark.parametrize("case", sorted(READ_CASES))
def test_hostile_scale_values_are_refused_when_read(llama: Any, case: str, tmp_path: Path) -> None:
    method, edit, error, text = READ_CASES[case]
    directory = save_fp8(llama, tmp_path / "m", method, edit=edit)
    artifact = resolve(directory)
    with open_reader(artifact) as reader, pytest.raises(error) as raised:
        reader.raw(artifact.tensor(DOWN + ".weight"))
    assert text in str(raised.value) and raised.value.file == str(directory / "model.safetensors")
    assert DOWN in str(raised.value)


@pytest.mark.parametrize("case", ["missing scale", "block size of zero", "unknown quant_method", "NaN scale",
                                  "non-zero zero point"])
def test_cli_exits_2_with_one_line(llama: Any, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    method, edit, error, text = {**RESOLVE_CASES, **READ_CASES}[case]
    directory = save_fp8(llama, tmp_path / "m", method, edit=edit)
    code = main(["fingerprint", str(directory), "-o", str(tmp_path / "out.json")])
    _, err = capsys.readouterr()
    assert code == 2 and not (tmp_path / "out.json").exists()
    assert err.startswith("tg-verify: ") and err.count("\n") == 1 and "Traceback" not in err and text in err


def test_inspect_lists_the_scales(llama: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = save_fp8(llama, tmp_path / "fp8")
    assert main(["inspect", "--json", str(directory)]) == 0
    document = json.loads(capsys.readouterr().out)
    quantization = document["quantization"]
    assert quantization["method"] == "fp8" and quantization["scaled_weights"] == 14
    assert DOWN + ".weight_scale_inv" in quantization["scale_tensors"] and not document["unexpected_tensors"]
    assert document["dtypes"]["F8_E4M3"]["tensors"] == 14 and "F32" in document["dtypes"]


def test_an_adapter_merges_onto_the_dequantised_weight(llama: Any, tmp_path: Path) -> None:
    """A LoRA adapter on an FP8 base adds its update to values × scale in float32 (never cast back to float8, which
    would drop the scale): the same update as on the float32 base."""
    from tg_verify.artifact.merge import open_model
    from tg_verify.tiny import save_lora_adapter

    adapter = resolve(save_lora_adapter(llama, tmp_path / "adapter"))
    fp8, plain = resolve(save_fp8(llama, tmp_path / "fp8")), resolve(save_model(llama, tmp_path / "plain"))
    name = "model.layers.0.self_attn.q_proj.weight"
    updates = []
    for base in (fp8, plain):
        with open_model(adapter, base) as merged, open_reader(base) as reader:
            updates.append(merged.reader.float32(merged.artifact.tensor(name)) - reader.float32(base.tensor(name)))
    assert updates[0].abs().max() > 1e-3 and torch.allclose(updates[0], updates[1], atol=1e-6)
