"""The streamed adapter merge equals peft's merge_and_unload(); misfits and unsupported adapters are caught."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from tg_verify.artifact import resolve
from tg_verify.artifact.digest import file_digests
from tg_verify.artifact.merge import open_merged
from tg_verify.artifact.peft import (
    AdapterFormatError,
    AdapterMismatchError,
    UnsupportedAdapterError,
    base_record,
    check_adapter,
    check_adapter_against_tensors,
    check_base_name,
)
from tg_verify.errors import AdapterError
from tg_verify.tiny import build_model, save_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_adapter(base: torch.nn.Module, config: Any, directory: Path, seed: int = 1,
                 prepare: Callable[[torch.nn.Module], None] | None = None) -> dict[str, torch.Tensor]:
    """Wrap a copy of `base` with peft, give every trainable tensor random values, save the adapter.

    Returns peft's own merge_and_unload() state dict: the reference the streamed merge must equal.
    """
    model = copy.deepcopy(base)
    if prepare is not None:
        prepare(model)
    wrapped = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05
            if "ia3_l" in name:
                param.copy_(1.0 + noise)
            elif "lora_" in name:
                param.copy_(noise)
            else:
                param.add_(noise)
    wrapped.save_pretrained(str(directory), save_embedding_layers=False)
    merged = wrapped.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_merge_equals(adapter_dir: Path, base_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    adapter, base = resolve(adapter_dir), resolve(base_dir)
    with open_merged(adapter, base) as reader:
        assert not [f for f in reader.findings if f.severity == "error"]
        assert [t.name for t in reader.artifact.tensors] == [t.name for t in base.tensors]
        for info in reader.artifact.tensors:
            merged = reader.raw(info)
            assert merged.dtype == expected[info.name].dtype, info.name
            assert torch.equal(merged, expected[info.name]), info.name
            assert torch.equal(reader.float32(info), expected[info.name].float()), info.name


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = build_model("llama", seed=3)
    return model, save_model(model, tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = build_model("qwen2", seed=4)  # q/k/v projections carry biases
    return model, save_model(model, tmp_path_factory.mktemp("qwen2") / "base")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A gpt2-like model: Conv1D layers store weights [in, out], so adapters need fan_in_fan_out."""
    import transformers

    torch.manual_seed(5)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return model, save_model(model, tmp_path_factory.mktemp("gpt2") / "base")


LLAMA_CASES: dict[str, Callable[[], Any]] = {
    "lora-r4-list": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora-r8-regex-rslora": lambda: peft.LoraConfig(r=8, lora_alpha=32, use_rslora=True,
                                                    target_modules=r".*\.mlp\.(gate|up)_proj"),
    "lora-patterns-modules-to-save": lambda: peft.LoraConfig(
        r=2, lora_alpha=3, target_modules="all-linear", rank_pattern={"o_proj": 6}, alpha_pattern={"down_proj": 20},
        modules_to_save=["lm_head"]),
    "lora-embedding": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"]),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "ia3-regex-ff": lambda: peft.IA3Config(target_modules=r".*\.(q_proj|up_proj)",
                                           feedforward_modules=r".*\.up_proj"),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_streamed_merge_equals_peft_on_llama(case: str, llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = llama
    expected = make_adapter(model, LLAMA_CASES[case](), tmp_path / "adapter")
    assert_merge_equals(tmp_path / "adapter", base_dir, expected)


def test_merge_in_bf16_matches_peft(tmp_path: Path) -> None:
    """A bf16 base: the update is computed in float32 and rounded once, as peft's default autocast does."""
    model = build_model("llama", seed=7).to(torch.bfloat16)
    base_dir = save_model(model, tmp_path / "base")
    expected = make_adapter(model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"]),
                            tmp_path / "adapter")
    assert expected["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert_merge_equals(tmp_path / "adapter", base_dir, expected)


def test_bf16_adapter_loaded_by_peft_from_disk_merges_identically(tmp_path: Path) -> None:
    """The reference as users run it: from_pretrained(base) + PeftModel.from_pretrained(adapter) + merge."""
    import transformers

    model = build_model("llama", seed=8).to(torch.bfloat16)
    base_dir = save_model(model, tmp_path / "base")
    make_adapter(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"]),
                 tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights))  # stored bf16
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    merged = peft.PeftModel.from_pretrained(loaded, str(tmp_path / "adapter")).merge_and_unload()
    assert_merge_equals(tmp_path / "adapter", base_dir, {k: v.detach() for k, v in merged.state_dict().items()})


def test_lora_bias_and_ia3_bias_on_qwen2(qwen2: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = qwen2
    expected = make_adapter(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                                   lora_bias=True), tmp_path / "lora")
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.bias"],
                           model.state_dict()["model.layers.0.self_attn.q_proj.bias"])
    assert_merge_equals(tmp_path / "lora", base_dir, expected)
    expected = make_adapter(model, peft.IA3Config(target_modules=["v_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"]), tmp_path / "ia3")
    assert_merge_equals(tmp_path / "ia3", base_dir, expected)


def test_bias_lora_only_replaces_biases(qwen2: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = qwen2
    expected = make_adapter(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], bias="lora_only"),
                            tmp_path / "adapter")
    assert_merge_equals(tmp_path / "adapter", base_dir, expected)


@pytest.mark.parametrize("kind", ["lora", "ia3", "lora-config-says-false"])
def test_fan_in_fan_out_on_gpt2_conv1d(kind: str, gpt2: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = gpt2
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                fan_in_fan_out=True)
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)
    expected = make_adapter(model, config, tmp_path / "adapter")
    if kind == "lora-config-says-false":
        # peft forces fan_in_fan_out on Conv1D whatever the config says; so must the merge
        config_path = tmp_path / "adapter" / "adapter_config.json"
        document = json.loads(config_path.read_text())
        document["fan_in_fan_out"] = False
        config_path.write_text(json.dumps(document))
    assert_merge_equals(tmp_path / "adapter", base_dir, expected)


def test_conv1d_orientation_inferred_from_shapes_without_config(gpt2: tuple[torch.nn.Module, Path],
                                                                tmp_path: Path) -> None:
    model, base_dir = gpt2
    make_adapter(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                 tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    document = json.loads(config_path.read_text())
    document["fan_in_fan_out"] = False
    config_path.write_text(json.dumps(document))
    tensors = [{"name": t.name, "shape": list(t.shape)} for t in resolve(base_dir).tensors]
    findings = check_adapter_against_tensors(resolve(tmp_path / "adapter"), tensors)
    codes = [f.code for f in findings]
    assert "TGV_ADAPTER_FAN_IN_FAN_OUT_INFERRED" in codes
    assert "TGV_ADAPTER_SHAPE_MISMATCH" not in codes


def test_reader_keeps_one_merged_tensor(llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = llama
    make_adapter(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"]), tmp_path / "a")
    with open_merged(resolve(tmp_path / "a"), resolve(base_dir)) as reader:
        cached = set()
        for info in reader.artifact.tensors:
            reader.raw(info)
            if reader._cache is not None:
                cached.add(reader._cache[0])
                assert reader._cache[0] == info.name or info.name not in reader.plan.tensors
        assert cached == set(reader.plan.tensors)
        merged = next(t for t in reader.artifact.tensors if t.name in reader.plan.tensors)
        assert reader.raw(merged) is reader.raw(merged)  # computed once while in use
        reader.release(merged)
        assert reader._cache is None


def test_merged_view_carries_adapter_files_and_base_config(llama: tuple[torch.nn.Module, Path],
                                                           tmp_path: Path) -> None:
    model, base_dir = llama
    make_adapter(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"]), tmp_path / "a")
    adapter, base = resolve(tmp_path / "a"), resolve(base_dir)
    with open_merged(adapter, base) as reader:
        view = reader.artifact
        assert view.layout == "adapter" and view.files == adapter.files and view.root == adapter.root
        assert view.config == base.config and view.total_params == base.total_params
    record = base_record(base, file_digests(base))
    assert {f["path"] for f in record["files"]} == {f.path for f in base.files}
    assert record["name"] == "base" and len(record["root_digest"]) == 64
    with pytest.raises(AdapterFormatError, match="no digest"):
        base_record(base, {})


def test_name_prefix_remapped_when_base_saved_without_model_prefix(llama: tuple[torch.nn.Module, Path],
                                                                  tmp_path: Path) -> None:
    model, base_dir = llama
    expected = make_adapter(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "a")
    bare = tmp_path / "bare"
    bare.mkdir()
    state = load_file(str(base_dir / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in state.items()}, str(bare / "model.safetensors"))
    adapter, base = resolve(tmp_path / "a"), resolve(bare)
    with open_merged(adapter, base) as reader:
        assert "TGV_ADAPTER_NAME_REMAPPED" in [f.code for f in reader.findings]
        info = base.tensor("layers.1.self_attn.q_proj.weight")
        assert torch.equal(reader.raw(info), expected["model.layers.1.self_attn.q_proj.weight"])


def test_resized_vocabulary_via_modules_to_save(llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = llama
    expected = make_adapter(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                   modules_to_save=["embed_tokens", "lm_head"]),
                            tmp_path / "a", prepare=lambda m: m.resize_token_embeddings(520))
    with open_merged(resolve(tmp_path / "a"), resolve(base_dir)) as reader:
        assert "TGV_ADAPTER_RESIZED_TENSOR" in [f.code for f in reader.findings]
        embed = next(t for t in reader.artifact.tensors if t.name == "model.embed_tokens.weight")
        assert embed.shape == (520, 64) and embed.nbytes == 520 * 64 * 4
        assert torch.equal(reader.raw(embed), expected["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------- misfits


def test_adapter_for_a_deeper_model_names_missing_modules(tmp_path: Path) -> None:
    deep = build_model("llama", seed=1, num_hidden_layers=3)
    make_adapter(deep, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), tmp_path / "a")
    shallow = save_model(build_model("llama", seed=1), tmp_path / "base")
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight") as info:
        open_merged(resolve(tmp_path / "a"), resolve(shallow))
    assert info.value.code == "TGV_ADAPTER_MISMATCH" and info.value.exit_code == 2


def test_adapter_for_another_width_reports_every_shape_misfit(tmp_path: Path) -> None:
    medium = build_model("llama", seed=1, size="medium")
    make_adapter(medium, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"]), tmp_path / "a")
    small = resolve(save_model(build_model("llama", seed=1), tmp_path / "base"))
    findings = check_adapter(resolve(tmp_path / "a"), {t.name: t.shape for t in small.tensors})
    errors = [f for f in findings if f.severity == "error"]
    assert {f.code for f in errors} >= {"TGV_ADAPTER_SHAPE_MISMATCH", "TGV_ADAPTER_MODULE_MISSING"}
    assert any("up_proj" in f.message and "[128, 64]" in f.message for f in errors)
    assert "TGV_ADAPTER_FITS" not in {f.code for f in findings}
    with pytest.raises(AdapterMismatchError, match="more"):
        open_merged(resolve(tmp_path / "a"), small)


def test_ia3_vector_of_the_wrong_role_is_a_misfit(llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = llama
    make_adapter(model, peft.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
                 tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    document = json.loads(config_path.read_text())
    document["feedforward_modules"] = []  # now ia3_l [1, 128] would have to scale down_proj's 64 output rows
    config_path.write_text(json.dumps(document))
    findings = check_adapter(resolve(tmp_path / "a"), {t.name: t.shape for t in resolve(base_dir).tensors})
    assert any(f.code == "TGV_ADAPTER_SHAPE_MISMATCH" and "non-feedforward" in f.message for f in findings)


def test_header_only_check_against_a_reference_fingerprint_structure(llama: tuple[torch.nn.Module, Path],
                                                                    qwen2: tuple[torch.nn.Module, Path],
                                                                    tmp_path: Path) -> None:
    model, base_dir = llama
    make_adapter(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), tmp_path / "a")
    adapter = resolve(tmp_path / "a")

    def structure(path: Path) -> list[dict[str, Any]]:
        return [{"name": t.name, "shape": list(t.shape), "size": t.numel, "category": "unknown"}
                for t in resolve(path).tensors]

    findings = check_adapter_against_tensors(adapter, structure(base_dir))
    assert [f.code for f in findings] == ["TGV_ADAPTER_FITS"]
    assert "14 module(s)" in findings[0].message
    # same shapes, other architecture: a structural check cannot tell them apart (the fingerprint must)
    assert [f.code for f in check_adapter_against_tensors(adapter, structure(qwen2[1]))] == ["TGV_ADAPTER_FITS"]
    wider = save_model(build_model("llama", seed=0, size="medium"), tmp_path / "medium")
    other = check_adapter_against_tensors(adapter, structure(wider), base_label="reference llama-medium")
    assert all(f.severity == "error" for f in other) and len(other) == 14
    assert "reference llama-medium" in other[0].message
    legacy = check_adapter_against_tensors(adapter, [])
    assert [f.code for f in legacy] == ["TGV_ADAPTER_NO_STRUCTURE"]
    with pytest.raises(AdapterFormatError, match="integer shape"):
        check_adapter_against_tensors(adapter, [{"name": "x", "shape": ["a"]}])


# --------------------------------------------------------------------------------- names and formats


def _adapter_dir(tmp_path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    directory = tmp_path / "adapter"
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


LORA_KEYS = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)}


def test_base_name_check(tmp_path: Path) -> None:
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                              "base_model_name_or_path": "meta-llama/Llama-3.2-1B"}, LORA_KEYS))
    assert check_base_name(adapter, ["llama-3.2-1b", "/models/other"]) == []
    assert check_base_name(adapter, ["/srv/models/Llama-3.2-1B/"]) == []
    mismatch = check_base_name(adapter, ["qwen2.5-3b", "/models/Qwen2.5-3B"])
    assert [(f.code, f.severity) for f in mismatch] == [("TGV_ADAPTER_BASE_NAME_MISMATCH", "warning")]
    assert "meta-llama/Llama-3.2-1B" in mismatch[0].message and "qwen2.5-3b" in mismatch[0].message
    unnamed = resolve(_adapter_dir(tmp_path / "x", {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, LORA_KEYS))
    assert [f.code for f in check_base_name(unnamed, ["llama"])] == ["TGV_ADAPTER_BASE_NAME_MISSING"]


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "PROMPT_TUNING", "LOHA", "LOKR", "ADALORA", "VERA"])
def test_unsupported_types_are_refused_naming_the_supported_ones(peft_type: str, tmp_path: Path,
                                                                 llama: tuple[torch.nn.Module, Path]) -> None:
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": peft_type, "r": 2}, LORA_KEYS))
    with pytest.raises(UnsupportedAdapterError, match=rf"{peft_type}.*supported: LoRA .* and IA3") as info:
        open_merged(adapter, resolve(llama[1]))
    assert info.value.code == "TGV_ADAPTER_UNSUPPORTED"


def test_real_loha_adapter_is_refused(llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, base_dir = llama
    make_adapter(model, peft.LoHaConfig(r=2, target_modules=["q_proj"]), tmp_path / "a")
    with pytest.raises(UnsupportedAdapterError, match="LOHA"):
        check_adapter(resolve(tmp_path / "a"), {})


@pytest.mark.parametrize("config, tensors, error, pattern", [
    ({"r": 2, "lora_alpha": 2, "target_parameters": ["experts.gate_up_proj"]}, LORA_KEYS,
     UnsupportedAdapterError, "target_parameters"),
    ({"r": 2, "lora_alpha": 2, "layer_replication": [[0, 2]]}, LORA_KEYS, UnsupportedAdapterError, "replication"),
    ({"r": 4, "lora_alpha": 2}, LORA_KEYS, AdapterFormatError, "rank 2 but adapter_config.json says 4"),
    ({"r": 2, "lora_alpha": "x"}, LORA_KEYS, AdapterFormatError, "lora_alpha"),
    ({"r": 2, "lora_alpha": 2, "bias": "some"}, LORA_KEYS, AdapterFormatError, "'bias'"),
    ({"r": 2, "lora_alpha": 2}, {k: v for k, v in LORA_KEYS.items() if "lora_A" in k}, AdapterFormatError,
     "no lora_B"),
    ({"r": 2, "lora_alpha": 2}, {**LORA_KEYS, "base_model.model.model.layers.0.self_attn.q_proj"
                                              ".lora_magnitude_vector": torch.ones(64)},
     AdapterFormatError, "use_dora=false"),
    ({"r": 2, "lora_alpha": 2}, {"base_model.model.x.lora_A.one.weight": torch.zeros(2, 4),
                                 "base_model.model.x.lora_B.one.weight": torch.zeros(4, 2),
                                 "base_model.model.y.lora_A.two.weight": torch.zeros(2, 4),
                                 "base_model.model.y.lora_B.two.weight": torch.zeros(4, 2)},
     AdapterFormatError, "several adapters"),
    ({"r": 2, "lora_alpha": 2}, {k: v.to(torch.int8) for k, v in LORA_KEYS.items()}, AdapterFormatError,
     "floating-point"),
    ({"r": 2, "lora_alpha": 2, "use_dora": True}, LORA_KEYS, AdapterFormatError, "lora_magnitude_vector"),
])
def test_malformed_or_unsupported_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                                       error: type[AdapterError], pattern: str, tmp_path: Path) -> None:
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": "LORA", **config}, tensors))
    with pytest.raises(error, match=pattern):
        check_adapter(adapter, {"model.layers.0.self_attn.q_proj.weight": (64, 64)})


def test_kohya_style_keys_are_refused(tmp_path: Path) -> None:
    keys = {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(8, 2)}
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, keys))
    with pytest.raises(UnsupportedAdapterError, match="kohya"):
        check_adapter(adapter, {})


def test_missing_peft_type_and_non_adapter(tmp_path: Path, llama: tuple[torch.nn.Module, Path]) -> None:
    adapter = resolve(_adapter_dir(tmp_path, {"r": 2}, LORA_KEYS))
    with pytest.raises(AdapterFormatError, match="peft_type"):
        check_adapter(adapter, {})
    with pytest.raises(AdapterFormatError, match="not a PEFT adapter"):
        check_adapter(resolve(llama[1]), {})
    with pytest.raises(AdapterFormatError, match="itself an adapter"):
        open_merged(adapter, adapter)


def test_adapter_name_in_keys_and_tied_lm_head_hint(tmp_path: Path) -> None:
    keys = {"base_model.model.lm_head.lora_A.default.weight": torch.zeros(2, 64),
            "base_model.model.lm_head.lora_B.default.weight": torch.zeros(512, 2)}
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, keys))
    base = save_model(build_model("gemma", seed=0), tmp_path / "gemma")  # ties lm_head to the embeddings
    with pytest.raises(AdapterMismatchError, match="ties lm_head"):
        open_merged(adapter, resolve(base))


def test_base_rewriting_init_is_flagged(tmp_path: Path) -> None:
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                              "init_lora_weights": "pissa_niter_4"}, LORA_KEYS))
    findings = check_adapter(adapter, {"model.layers.0.self_attn.q_proj.weight": (64, 64)})
    assert "TGV_ADAPTER_INIT_MODIFIES_BASE" in {f.code for f in findings}
    assert {f.severity for f in findings} <= {"warning", "info"}


def test_nan_from_the_adapter_names_the_adapter_file(llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """A merged tensor made non-finite by the adapter is reported against adapter_model.safetensors, not the
    base's file (whose values are finite)."""
    from tg_verify.errors import WeightValueError
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    keys = dict(LORA_KEYS)
    keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.full((64, 2), float("inf"))
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, keys))
    with open_merged(adapter, resolve(llama[1])) as merged, pytest.raises(WeightValueError) as info:
        fingerprint_artifact(merged.artifact, FingerprintSettings(device="cpu", sketch=False), reader=merged)
    message = str(info.value)
    assert "adapter_model.safetensors" in message and "model.layers.0.self_attn.q_proj.weight" in message
    assert "lora_B" in message and str(llama[1]) not in message


def test_header_only_adapter_checks_import_neither_torch_nor_sklearn(llama: tuple[torch.nn.Module, Path],
                                                                     tmp_path: Path) -> None:
    """`inspect --against` (resolve, check_adapter_against_tensors, check_base_name, the verb itself) stays light."""
    import subprocess
    import sys

    adapter = _adapter_dir(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                      "rank_pattern": {"q_proj": 2}}, LORA_KEYS)
    reference = tmp_path / "ref.json"
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    reference.write_bytes(fingerprint_artifact(resolve(llama[1]), FingerprintSettings(device="cpu", sketch=False,
                                                                                      repeats=2)).to_json_bytes())
    code = f"""
import sys, argparse
from tg_verify.artifact import resolve
from tg_verify.artifact.peft import check_adapter_against_tensors, check_base_name
from tg_verify.fingerprint.document import load
adapter = resolve({str(adapter)!r})
findings = check_adapter_against_tensors(adapter, load({str(reference)!r}).tensors) + check_base_name(adapter, ["x"])
assert any(f.code == "TGV_ADAPTER_FITS" for f in findings), findings
from tg_verify.commands import inspect
status = inspect.run(argparse.Namespace(path={str(adapter)!r}, json=True, hash=False, tensors=False, progress=False,
                                        against={str(reference)!r}))
assert status == 0, status
heavy = sorted(m for m in ("torch", "sklearn", "transformers", "peft") if m in sys.modules)
assert not heavy, heavy
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("config, tensors, file, field", [
    ({"r": 2, "lora_alpha": "x"}, LORA_KEYS, "adapter_config.json", "lora_alpha"),
    ({"r": 0, "lora_alpha": 2}, LORA_KEYS, "adapter_config.json", "r"),
    ({"r": 2, "lora_alpha": 2, "rank_pattern": {"(a)\\1": 4}}, LORA_KEYS, "adapter_config.json", "rank_pattern"),
    ({"r": 2, "lora_alpha": 2, "layer_replication": [[0, 2]]}, LORA_KEYS, "adapter_config.json",
     "layer_replication"),
    ({"r": 2, "lora_alpha": 2}, {k: v for k, v in LORA_KEYS.items() if "lora_A" in k}, "adapter_model.safetensors",
     None),
])
def test_adapter_errors_carry_their_file_and_field(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                                                   file: str, field: str | None, tmp_path: Path) -> None:
    """The file (config or weights) and the config field are attributes, for the Action's annotations: not text."""
    adapter = resolve(_adapter_dir(tmp_path, {"peft_type": "LORA", **config}, tensors))
    with pytest.raises(AdapterError) as raised:
        check_adapter(adapter, {"model.layers.0.self_attn.q_proj.weight": (64, 64)})
    assert raised.value.file == str(adapter.root / file) and raised.value.field == field


def test_lora_on_a_multimodal_wrapper_merges_into_its_language_model_not_its_tower(tmp_path: Path) -> None:
    """peft names a LLaVA's modules as the class holds them (`model.language_model.layers.0...`) while the published
    base stores `language_model.model.layers.0...`; its vision tower has layers of the same names. The renaming may
    only move base-model prefixes, so the update lands on the language model, as peft's own merge puts it."""
    from tg_verify.tiny import build_wrapper

    model = build_wrapper("llava", seed=2)
    model.save_pretrained(tmp_path / "base")
    expected = make_adapter(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                   target_modules=r".*language_model.*\.(q_proj|v_proj)"),
                            tmp_path / "adapter")
    published = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.", ""))  # as save_pretrained writes the class's names; first match wins

    def stored(name: str) -> str:
        return next(new + name[len(old):] for old, new in published if name.startswith(old))

    assert_merge_equals(tmp_path / "adapter", tmp_path / "base", {stored(k): v for k, v in expected.items()})
