"""artifact/intquant.py and the reader: a GPTQ or AWQ checkpoint's packed integers are read as the float weights the
runtime computes with, exactly; the packed parts are set apart (bound by digest, not weights); every hostile variant
is a typed error, exit 2 from the CLI, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from intquant_helpers import pack_columns, quantise, save_intquant

from tg_verify.artifact import open_reader, resolve
from tg_verify.artifact.errors import (
    AmbiguousTensorError,
    PackedTensorError,
    PackedValueError,
    QuantizationConfigError,
)
from tg_verify.artifact.intquant import IntPackedTensor
from tg_verify.cli import main
from tg_verify.errors import TgVerifyError
from tg_verify.tiny import build_model

State = dict[str, torch.Tensor]
DOWN = "model.layers.1.mlp.down_proj"  # [64, 128]: 128 inputs, 64 outputs
PARTS = ("qweight", "qzeros", "scales", "g_idx")

# (id, save_intquant arguments)
FORMATS: list[tuple[str, dict[str, Any]]] = [
    ("gptq-v1-sym-g16", {"method": "gptq"}),
    ("gptq-v1-asym-g16", {"method": "gptq", "sym": False}),
    ("gptq-v1-sym-desc_act-g16", {"method": "gptq", "desc_act": True}),
    ("gptq-v1-asym-desc_act-g16", {"method": "gptq", "sym": False, "desc_act": True}),
    ("gptq-v1-sym-g-1", {"method": "gptq", "group_size": -1}),
    ("gptq-v1-asym-desc_act-g-1", {"method": "gptq", "sym": False, "desc_act": True, "group_size": -1}),
    ("gptq-v1-no-g_idx", {"method": "gptq", "g_idx": False}),
    ("gptq-v2-asym-g16", {"method": "gptq", "fmt": "gptq_v2", "sym": False}),
    ("gptq-v2-asym-desc_act-g-1", {"method": "gptq", "fmt": "gptq_v2", "sym": False, "desc_act": True,
                                   "group_size": -1}),
    ("gptq-v1-8bit-g16", {"method": "gptq", "bits": 8, "sym": False}),
    ("gptq-v2-8bit-bf16-g16", {"method": "gptq", "bits": 8, "fmt": "gptq_v2", "dtype": torch.bfloat16}),
    ("awq-g16", {"method": "awq"}),
    ("awq-g-1", {"method": "awq", "group_size": -1}),
    ("awq-bf16-g16", {"method": "awq", "dtype": torch.bfloat16}),
]


@pytest.fixture(scope="module")
def llama() -> Any:
    return build_model("llama", seed=0)


@pytest.mark.parametrize("case", [c for c, _ in FORMATS])
def test_weights_are_the_quantisers_dequantised_values(llama: Any, case: str, tmp_path: Path) -> None:
    """Every quantised projection reads, bit for bit, as the quantiser's own s * (q - z) in the scales' dtype, under
    its parameter's name and shape; the rest is read as stored; the parts are companions, not weights."""
    arguments = dict(FORMATS)[case]
    directory, expected = save_intquant(llama, tmp_path / "q", **arguments)
    artifact = resolve(directory)
    quant = artifact.quantisation
    assert quant is not None and quant.method == arguments["method"]
    assert set(quant.scaled) == set(expected) and len(expected) == 14
    assert not artifact.unexpected and artifact.architecture is not None
    names = {t.name for t in artifact.tensors}
    assert not any(n.endswith(PARTS) for n in names)
    assert {t.name.rsplit(".", 1)[1] for t in quant.companions} == (
        set(PARTS) if arguments["method"] == "gptq" and arguments.get("g_idx", True) else set(PARTS[:3]))
    state = llama.state_dict()
    with open_reader(artifact) as reader:
        for info in artifact.tensors:
            if info.name not in expected:
                assert torch.equal(reader.float32(info), state[info.name])
                continue
            assert isinstance(info, IntPackedTensor) and info.shape == tuple(state[info.name].shape)
            raw = reader.raw(info)
            assert raw.dtype == expected[info.name].dtype and torch.equal(raw, expected[info.name])
            assert reader.raw(info) is raw  # dequantised once while it is being read
            assert torch.equal(reader.float32(info, finite=True), expected[info.name].to(torch.float32))
            reader.release(info)
            error = (raw.float() - state[info.name]).abs().max()
            assert error <= state[info.name].abs().max() / (4 if arguments.get("bits", 4) == 4 else 60)


def test_v1_zero_points_are_stored_minus_one(llama: Any, tmp_path: Path) -> None:
    """The same integers read as GPTQ v1 and as v2 differ by one zero point step (the v1 format's historical +1):
    s * (q - (stored + 1)) against s * (q - stored)."""
    v1, expected = save_intquant(llama, tmp_path / "v1", sym=False)

    def as_v2(state: State, config: dict[str, Any]) -> None:
        config["quantization_config"]["checkpoint_format"] = "gptq_v2"

    v2, _ = save_intquant(llama, tmp_path / "v2", sym=False, edit=as_v2)
    a1, a2 = resolve(v1), resolve(v2)
    with open_reader(a1) as r1, open_reader(a2) as r2:
        w1 = r1.float32(a1.tensor(DOWN + ".weight"))
        w2 = r2.float32(a2.tensor(DOWN + ".weight"))
        scales = r1.float32(a1.quantisation.scaled[DOWN + ".weight"].scale)  # type: ignore[union-attr]
    step = scales.repeat_interleave(16, 0).t()  # [out, in]: the scale of each weight
    assert torch.allclose(w2 - w1, step, rtol=0, atol=5e-4)  # each side rounded once to float16
    assert step.min() > 1e-3
    assert torch.equal(w1, expected[DOWN + ".weight"].float())


def test_awq_order_is_interleaved(tmp_path: Path) -> None:
    """AWQ's nibble k holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][k]: a weight with one distinct value per column
    reads back in column order (a plain low-first order would swap columns 1 and 2, 3 and 4 ...)."""
    from tg_verify.artifact.intquant import dequantise

    columns = torch.arange(16).repeat(8, 1)  # q [in 8, out 16]: column j holds j % 16
    qweight = pack_columns(columns % 16, 4, (0, 2, 4, 6, 1, 3, 5, 7))
    zeros = pack_columns(torch.zeros(1, 16, dtype=torch.long), 4, (0, 2, 4, 6, 1, 3, 5, 7))
    scales = torch.ones(1, 16, dtype=torch.float16)
    from tg_verify.artifact.model import TensorInfo

    parts = {"q": qweight, "z": zeros, "s": scales}
    info = IntPackedTensor("x.weight", "F16", (16, 8), "m", 0, 0, method="awq", bits=4, group_size=8,
                           zero_offset=0, act_order=False, qweight=TensorInfo("q", "I32", (8, 2), "m", 0, 0),
                           qzeros=TensorInfo("z", "I32", (1, 2), "m", 0, 0),
                           scales=TensorInfo("s", "F16", (1, 16), "m", 0, 0), g_idx=None)
    weight = dequantise(lambda t: parts[t.name], info, lambda t: "m")
    assert torch.equal(weight, torch.arange(16, dtype=torch.float16)[:, None].expand(16, 8))


def test_quantiser_round_trip_is_close(llama: Any) -> None:
    """The helper's quantiser itself: 4-bit round-to-nearest in groups of 16 stays within half a step."""
    weight = llama.state_dict()[DOWN + ".weight"]
    result = quantise(weight, 4, 16, sym=False)
    step = result.scales.float()[result.g_idx].t()
    assert ((result.values.float() - weight).abs() <= step * 0.5 + 1e-3).all()


# --- hostile checkpoints -----------------------------------------------------------------------------------------


def _state(change: Callable[[State], None]) -> Callable[[State, dict[str, Any]], None]:
    def edit(state: State, config: dict[str, Any]) -> None:
        change(state)
    return edit


def _set(key: str, value: Any) -> Callable[[State, dict[str, Any]], None]:
    def edit(state: State, config: dict[str, Any]) -> None:
        config["quantization_config"][key] = value
    return edit


def _put(name: str, value: torch.Tensor) -> Callable[[State, dict[str, Any]], None]:
    return _state(lambda s: s.__setitem__(name, value))


def _drop(name: str) -> Callable[[State, dict[str, Any]], None]:
    return _state(lambda s: s.pop(name))


def _g_idx(change: Callable[[torch.Tensor], None]) -> Callable[[State, dict[str, Any]], None]:
    def edit(state: State, config: dict[str, Any]) -> None:
        change(state[DOWN + ".g_idx"])
    return edit


def _float_weight_too(state: State, config: dict[str, Any]) -> None:
    state[DOWN + ".weight"] = torch.zeros(64, 128)


# name -> (method, edit, error class, text the message holds)
RESOLVE_CASES: dict[str, tuple[str, Any, type[TgVerifyError], str]] = {
    "missing qzeros": ("gptq", _drop(DOWN + ".qzeros"), PackedTensorError, "has no 'model.layers.1.mlp.down_proj."
                                                                           "qzeros'"),
    "missing scales": ("awq", _drop(DOWN + ".scales"), PackedTensorError, "has no"),
    "orphan scales": ("gptq", _drop(DOWN + ".qweight"), PackedTensorError, "no 'model.layers.1.mlp.down_proj."
                                                                           "qweight' is stored"),
    "orphan g_idx": ("gptq", _put("model.layers.0.mlp.spare.g_idx", torch.zeros(4, dtype=torch.int32)),
                     PackedTensorError, "no 'model.layers.0.mlp.spare.qweight'"),
    "g_idx in an AWQ layer": ("awq", _put(DOWN + ".g_idx", torch.zeros(128, dtype=torch.int32)), PackedTensorError,
                              "AWQ layer has no use"),
    "float qweight": ("gptq", _put(DOWN + ".qweight", torch.zeros(16, 64)), PackedTensorError, "dtype F32"),
    "uint8 qzeros": ("gptq", _put(DOWN + ".qzeros", torch.zeros(8, 8, dtype=torch.uint8)), PackedTensorError,
                     "dtype U8"),
    "integer scales": ("awq", _put(DOWN + ".scales", torch.zeros(8, 64, dtype=torch.int32)), PackedTensorError,
                       "dtype I32"),
    "float g_idx": ("gptq", _put(DOWN + ".g_idx", torch.zeros(128)), PackedTensorError, "dtype F32"),
    "rank-3 qweight": ("gptq", _put(DOWN + ".qweight", torch.zeros(2, 8, 64, dtype=torch.int32)),
                       PackedTensorError, "of rank 2"),
    "scales of too few groups": ("gptq", _put(DOWN + ".scales", torch.ones(4, 64, dtype=torch.float16)),
                                 PackedTensorError, "expected [8, 64]"),
    "qzeros of the wrong width": ("awq", _put(DOWN + ".qzeros", torch.zeros(8, 16, dtype=torch.int32)),
                                  PackedTensorError, "expected [8, 8]"),
    "short g_idx": ("gptq", _put(DOWN + ".g_idx", torch.zeros(64, dtype=torch.int32)), PackedTensorError,
                    "expected [128]"),
    "bits not the packing's": ("gptq", _set("bits", 8), PackedTensorError, "8-bit, group size 16"),
    "a group size of 2^40": ("gptq", _set("group_size", 1 << 40), PackedTensorError, "expected [1, 64]"),
    "AWQ rows not a multiple of the group": ("awq", _set("group_size", 48), PackedTensorError, "not a multiple"),
    "float weight beside its packing": ("gptq", _float_weight_too, AmbiguousTensorError, "also stores"),
    "3-bit GPTQ": ("gptq", _set("bits", 3), QuantizationConfigError, "4 or 8 bits only"),
    "2-bit GPTQ": ("gptq", _set("bits", 2), QuantizationConfigError, "4 or 8 bits only"),
    "bits as text": ("gptq", _set("bits", "4"), QuantizationConfigError, "not an integer"),
    "bits as a boolean": ("gptq", _set("bits", True), QuantizationConfigError, "not an integer"),
    "no bits": ("gptq", lambda s, c: c["quantization_config"].pop("bits"), QuantizationConfigError, ".bits"),
    "group size of zero": ("gptq", _set("group_size", 0), QuantizationConfigError, "group_size is 0"),
    "group size of -2": ("awq", _set("group_size", -2), QuantizationConfigError, "group_size is -2"),
    "marlin checkpoint format": ("gptq", _set("checkpoint_format", "marlin"), QuantizationConfigError, "'marlin'"),
    "desc_act as text": ("gptq", _set("desc_act", "yes"), QuantizationConfigError, "not true or false"),
    "per-module dynamic bits": ("gptq", _set("dynamic", {"+:.*down_proj": {"bits": 8}}), QuantizationConfigError,
                                ".dynamic"),
    "AWQ GEMV": ("awq", _set("version", "gemv"), QuantizationConfigError, "'gemv'"),
    "llm-awq backend": ("awq", _set("backend", "llm-awq"), QuantizationConfigError, "'llm-awq'"),
    "8-bit AWQ": ("awq", _set("bits", 8), QuantizationConfigError, "4-bit"),
    "AWQ without zero points": ("awq", _set("zero_point", False), QuantizationConfigError, ".zero_point is false"),
}


def _out_of_range(value: int) -> Callable[[State, dict[str, Any]], None]:
    return _g_idx(lambda g: g.__setitem__(5, value))


READ_CASES: dict[str, tuple[dict[str, Any], Any, type[TgVerifyError], str]] = {
    "g_idx past the last group": ({"desc_act": True}, _out_of_range(8), PackedValueError, "outside 0..7"),
    "negative g_idx": ({"desc_act": True}, _out_of_range(-1), PackedValueError, "outside 0..7"),
    "huge g_idx": ({"desc_act": True}, _out_of_range(2**31 - 1), PackedValueError, "outside 0..7"),
    "g_idx reordering rows without desc_act": ({}, _g_idx(lambda g: g.copy_(g.flip(0))), PackedValueError,
                                               "desc_act is false"),
}


@pytest.mark.parametrize("case", sorted(RESOLVE_CASES))
def test_hostile_checkpoint_is_refused_when_resolved(llama: Any, case: str, tmp_path: Path) -> None:
    method, edit, error, text = RESOLVE_CASES[case]
    directory, _ = save_intquant(llama, tmp_path / "m", method, edit=edit)
    with pytest.raises(error) as raised:
        resolve(directory)
    assert text in str(raised.value), str(raised.value)
    assert raised.value.file is not None and Path(raised.value.file).is_file()


@pytest.mark.parametrize("case", sorted(READ_CASES))
def test_hostile_group_index_is_refused_when_read(llama: Any, case: str, tmp_path: Path) -> None:
    arguments, edit, error, text = READ_CASES[case]
    directory, _ = save_intquant(llama, tmp_path / "m", "gptq", edit=edit, **arguments)
    artifact = resolve(directory)
    with open_reader(artifact) as reader, pytest.raises(error) as raised:
        reader.raw(artifact.tensor(DOWN + ".weight"))
    assert text in str(raised.value) and raised.value.file == str(directory / "model.safetensors")
    assert DOWN + ".g_idx" in str(raised.value)


@pytest.mark.parametrize("case", ["missing qzeros", "scales of too few groups", "3-bit GPTQ", "AWQ GEMV",
                                  "float weight beside its packing", "g_idx past the last group",
                                  "g_idx reordering rows without desc_act"])
def test_cli_exits_2_with_one_line(llama: Any, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case in READ_CASES:
        arguments, edit, _, text = READ_CASES[case]
        method = "gptq"
    else:
        method, edit, _, text = RESOLVE_CASES[case]
        arguments = {}
    directory, _ = save_intquant(llama, tmp_path / "m", method, edit=edit, **arguments)
    code = main(["fingerprint", str(directory), "-o", str(tmp_path / "out.json")])
    _, err = capsys.readouterr()
    assert code == 2 and not (tmp_path / "out.json").exists()
    assert err.startswith("tg-verify: ") and err.count("\n") == 1 and "Traceback" not in err and text in err


def test_inspect_lists_the_parts(llama: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory, _ = save_intquant(llama, tmp_path / "gptq")
    assert main(["inspect", "--json", str(directory)]) == 0
    document = json.loads(capsys.readouterr().out)
    quantization = document["quantization"]
    assert quantization["method"] == "gptq" and quantization["scaled_weights"] == 14
    assert {DOWN + "." + part for part in PARTS} <= set(quantization["scale_tensors"])
    assert not document["unexpected_tensors"]
    assert document["dtypes"]["F16"]["tensors"] == 14 and "I32" not in document["dtypes"]
    assert not any("cannot be decoded" in w for w in document["validation"]["warnings"])
    down = next(t for t in document["tensors"] if t["name"] == DOWN + ".weight")
    assert down["shape"] == [64, 128] and down["dtype"] == "F16"


def test_without_quantization_config_the_parts_are_not_loaded(llama: Any, tmp_path: Path) -> None:
    """No quantization_config: no runtime reads the packs, so they are unexpected and the weights missing."""
    directory, _ = save_intquant(llama, tmp_path / "m", edit=lambda s, c: c.pop("quantization_config"))
    artifact = resolve(directory)
    assert artifact.quantisation is None and DOWN + ".weight" not in {t.name for t in artifact.tensors}
    assert DOWN + ".qweight" in {t.name for t in artifact.unexpected}


def test_an_adapter_merges_onto_the_dequantised_weight(llama: Any, tmp_path: Path) -> None:
    """A LoRA adapter on a GPTQ base adds its update to the dequantised weight, in float32."""
    from tg_verify.artifact.merge import open_model
    from tg_verify.tiny import save_lora_adapter

    adapter = resolve(save_lora_adapter(llama, tmp_path / "adapter"))
    directory, expected = save_intquant(llama, tmp_path / "gptq")
    base = resolve(directory)
    name = "model.layers.0.self_attn.q_proj.weight"
    with open_model(adapter, base) as merged:
        update = merged.reader.float32(merged.artifact.tensor(name)) - expected[name].float()
    assert update.abs().max() > 0 and torch.isfinite(update).all()


def test_parts_in_different_shards(llama: Any, tmp_path: Path) -> None:
    """A layer's parts may lie in different shards: each is read from its own file, and an error about one names
    that file."""
    from safetensors.torch import load_file, save_file

    directory, expected = save_intquant(llama, tmp_path / "m", desc_act=True)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    second = {n: t for n, t in state.items() if n.endswith((".scales", ".g_idx"))}
    first = {n: t for n, t in state.items() if n not in second}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for name, part in zip(names, (first, second)):
        save_file(part, str(directory / name), metadata={"format": "pt"})
    weight_map = dict.fromkeys(first, names[0]) | dict.fromkeys(second, names[1])
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    artifact = resolve(directory)
    info = artifact.tensor(DOWN + ".weight")
    assert isinstance(info, IntPackedTensor) and info.file == names[0] and info.scales.file == names[1]
    with open_reader(artifact) as reader:
        assert torch.equal(reader.raw(info), expected[DOWN + ".weight"])

    def past_the_end(s: State) -> None:
        s[DOWN + ".g_idx"][0] = 99

    past_the_end(second)
    save_file(second, str(directory / names[1]), metadata={"format": "pt"})
    artifact = resolve(directory)
    with open_reader(artifact) as reader, pytest.raises(PackedValueError) as raised:
        reader.raw(artifact.tensor(DOWN + ".weight"))
    assert raised.value.file == str(directory / names[1])


def test_compressed_tensors_integer_packs_are_refused_by_name(llama: Any, tmp_path: Path) -> None:
    """compressed-tensors `pack-quantized` int4 (weight_packed, weight_scale, weight_shape) is not read: a typed
    refusal that names the format, never a fingerprint of the packs."""
    def pack_quantized(state: State, config: dict[str, Any]) -> None:
        for name in [n for n in state if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]:
            stem, part = name.rsplit(".", 1)
            state[stem + {"qweight": ".weight_packed", "qzeros": ".weight_zero_point", "scales": ".weight_scale",
                          "g_idx": ".weight_g_idx"}[part]] = state.pop(name)
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                   "group_size": 16, "symmetric": True}}}}

    directory, _ = save_intquant(llama, tmp_path / "m", edit=pack_quantized)
    with pytest.raises(QuantizationConfigError) as raised:
        resolve(directory)
    assert "int4 in format pack-quantized" in str(raised.value)
    assert main(["fingerprint", str(directory), "-o", str(tmp_path / "out.json")]) == 2
