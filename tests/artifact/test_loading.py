"""What the runtime loads: each architecture's tensor-name grammar against transformers' own model classes,
prefix and ambiguity rules, and the decoy-tensor attack (an unrelated model plus the base's weights under
names no runtime loads) end to end through verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tg_verify import demo
from tg_verify.artifact import resolve
from tg_verify.artifact.errors import AmbiguousTensorError
from tg_verify.artifact.loading import (
    _BY_MODEL_TYPE,
    GRAMMARS,
    _component,
    _language_name,
    classify,
    expected_parameters,
    text_config_of,
)
from tg_verify.artifact.model import TensorInfo
from tg_verify.artifact.summary import describe
from tg_verify.fingerprint.extract import fingerprint_artifact
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.pipeline import verify
from tg_verify.policy import load_policy
from tg_verify.tiny import WRAPPERS, build_wrapper

# (transformers config class, keyword variations that change which parameters exist)
FAMILIES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "llama": ("LlamaConfig", [{}, {"attention_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True}]),
    "mistral": ("MistralConfig", [{}]),
    "qwen2": ("Qwen2Config", [{}, {"tie_word_embeddings": True}]),
    "qwen3": ("Qwen3Config", [{}, {"attention_bias": True}]),
    "gemma": ("GemmaConfig", [{}, {"attention_bias": True}, {"tie_word_embeddings": False}]),
    "gemma2": ("Gemma2Config", [{}]),
    "gemma3_text": ("Gemma3TextConfig", [{}]),
    "phi3": ("Phi3Config", [{"pad_token_id": 0}]),
    "olmo2": ("Olmo2Config", [{}]),
    "granite": ("GraniteConfig", [{}, {"mlp_bias": True}]),
    "starcoder2": ("Starcoder2Config", [{}, {"use_bias": False}]),
    "phi": ("PhiConfig", [{}, {"qk_layernorm": True}]),
    "cohere": ("CohereConfig", [{}, {"use_qk_norm": True}]),
    "gpt2": ("GPT2Config", [{}]),
    "gpt_neox": ("GPTNeoXConfig", [{}, {"attention_bias": False}]),
    "gpt_oss": ("GptOssConfig", [{}, {"attention_bias": False}, {"tie_word_embeddings": True}]),
}
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256}
GPT2_SIZES = {"n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 256}


def meta_model(family: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], set[str], set[str]]:
    """(config.json as save_pretrained writes it, state-dict keys, tied keys that save_pretrained drops)."""
    import transformers

    class_name, _ = FAMILIES[family]
    sizes = GPT2_SIZES if family == "gpt2" else SIZES
    config = getattr(transformers, class_name)(**sizes, **overrides)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    document = config.to_diff_dict()  # what config.json holds: only values that differ from the defaults
    document["architectures"] = [type(model).__name__]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return document, set(model.state_dict()), tied


def infos(names: list[str]) -> list[TensorInfo]:
    return [TensorInfo(name, "F32", (2, 2), "model.safetensors", 16 * i, 16 * (i + 1)) for i, name in enumerate(names)]


def test_every_grammar_is_tested() -> None:
    assert {g.family for g in GRAMMARS} == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grammar_is_what_transformers_loads(family: str) -> None:
    """The grammar names exactly the state dict of the class transformers builds from the config (meta
    device: no weights, no network); a checkpoint saved without the tied head loads with nothing missing."""
    for overrides in FAMILIES[family][1]:
        config, keys, tied = meta_model(family, overrides)
        assert set(expected_parameters(config) or ()) == keys, (family, overrides)
        loaded = classify(infos(sorted(keys)), config, "m")
        assert loaded.architecture == family and not loaded.unexpected and not loaded.notes
        saved = sorted(keys - tied)  # save_pretrained drops tied copies
        assert not classify(infos(saved), config, "m").notes, (family, overrides)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_model_prefix_is_added_or_stripped_per_key_and_two_keys_for_one_parameter_are_refused(family: str
                                                                                                     ) -> None:
    config, keys, _ = meta_model(family, FAMILIES[family][1][0])
    prefix = next(g.prefix for g in GRAMMARS if g.family == family) + "."
    bare = sorted(k[len(prefix):] if k.startswith(prefix) else k for k in keys)  # saved from the base model class
    assert len(classify(infos(bare), config, "m").loaded) == len(keys)
    inner = next(k for k in sorted(keys) if k.startswith(prefix))
    with pytest.raises(AmbiguousTensorError, match="both load into"):
        classify(infos(sorted(keys) + [inner[len(prefix):]]), config, "m")


def test_parameters_outside_the_grammar_are_unexpected_and_never_loaded() -> None:
    config, keys, _ = meta_model("llama", {})
    extra = ["a.wte.weight", "zz.h.0.self_attn.q_proj.weight", "zz.lm_head.weight", "model.layers.3.mlp.up_proj.weight",
             "model.layers.01.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.bias", "model.embed_tokens.weight.x"]
    result = classify(infos(sorted(keys) + extra), config, "m")
    assert sorted(t.name for t in result.unexpected) == sorted(extra)
    assert {t.name for t in result.loaded} == keys


def test_a_base_model_class_loads_no_head_and_unknown_classes_fall_back() -> None:
    config, keys, _ = meta_model("llama", {})
    result = classify(infos(sorted(keys)), {**config, "architectures": ["LlamaModel"]}, "m")
    assert [t.name for t in result.unexpected] == ["lm_head.weight"]
    generic = classify(infos(sorted(keys)), {**config, "architectures": ["LlamaForSequenceClassification"]}, "m")
    assert generic.architecture is None and len(generic.loaded) == len(keys)
    assert "cannot be checked" in generic.notes[0]


def test_missing_parameters_and_ignored_buffers_are_reported() -> None:
    config, keys, _ = meta_model("llama", {})
    present = sorted(keys - {"model.layers.1.mlp.down_proj.weight"}) + ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    result = classify(infos(present), config, "m")
    assert not result.unexpected and len(result.loaded) == len(keys) - 1
    assert any("model.layers.1.mlp.down_proj.weight" in n and "randomly" in n for n in result.notes)
    assert any("inv_freq" in n for n in result.notes)


def test_without_config_or_grammar_every_tensor_is_kept_with_a_warning_and_prefix_twins_are_refused(
        tmp_path: Path) -> None:
    save_file({"w": torch.ones(2, 2), "embed_tokens.weight": torch.ones(4, 2)}, str(tmp_path / "model.safetensors"))
    artifact = resolve(tmp_path / "model.safetensors")
    assert artifact.architecture is None and len(artifact.tensors) == 2 and not artifact.unexpected
    assert any("no config.json" in w and "cannot be checked" in w for w in artifact.warnings)
    save_file({"model.embed_tokens.weight": torch.ones(4, 2), "embed_tokens.weight": torch.ones(4, 2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(AmbiguousTensorError):
        resolve(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(AmbiguousTensorError):
        resolve(tmp_path)


def test_without_a_grammar_blocks_and_experts_past_the_configs_counts_are_not_loaded() -> None:
    """A runtime built from config.json has no block past its layer count and no expert past its expert count:
    without a grammar such tensors (a decoy expert 99 beside 4, a decoy layer 5 beside 2) are unexpected and said
    so; a tower's own deeper stack is not counted against the decoder's layers."""
    def names(layers: range, experts: range, stack: str = "model.layers") -> list[str]:
        return [f"{stack}.{i}.block_sparse_moe.experts.{e}.{w}.weight" for i in layers for e in experts
                for w in ("w1", "w2", "w3")]

    config = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 4}
    stored = ["model.embed_tokens.weight", *names(range(2), range(4))]
    decoys = names(range(2), [99]) + names([5], range(4))
    tower = [f"vision.blocks.{i}.attn.proj.weight" for i in range(6)]
    result = classify(infos(stored + decoys + tower), config, "m")
    assert {t.name for t in result.unexpected} == set(decoys)
    assert {t.name for t in result.loaded} == set(stored + tower)
    assert any("past config.json's counts (2 layers, 4 experts" in note for note in result.notes)
    # no counts in config.json: nothing is ruled out
    assert not classify(infos(stored + decoys), {"model_type": "mixtral"}, "m").unexpected


def test_experts_are_units_of_their_own_and_their_decoys_are_still_twins() -> None:
    """Without a grammar (Mixtral, Qwen-MoE ...), expert 0's and expert 1's w1 of one block are two units, not twins;
    the same expert's w1 under a second stack is."""
    names = [f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(2) for w in ("w1", "w2", "w3")]
    config = {"model_type": "mixtral", "num_hidden_layers": 1}
    assert len(classify(infos(names), config, "m").loaded) == 6
    with pytest.raises(AmbiguousTensorError, match="no tensor-name grammar says"):
        classify(infos([*names, "zz.h.0.block_sparse_moe.experts.1.w1.weight"]), config, "m")
    # the same block's experts fused in 3-D as well (transformers >= 5's form): which does a runtime load?
    with pytest.raises(AmbiguousTensorError, match="both fused and one by one"):
        classify(infos([*names, "model.layers.0.mlp.experts.down_proj"]), config, "m")
    fused = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    assert len(classify(infos(fused), config, "m").loaded) == 2
    with pytest.raises(AmbiguousTensorError):
        classify(infos([*fused, "zz.h.0.mlp.experts.down_proj"]), config, "m")


# ------------------------------------------------------------------------------- the decoy attack, end to end


@pytest.fixture(scope="module")
def decoy_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(demo tree, a candidate = the unrelated model + the base's weights under names no llama runtime loads)."""
    tree, _ = demo.ensure(tmp_path_factory.getbasetemp() / "tg-demo")
    candidate = tmp_path_factory.mktemp("decoy")
    state = load_file(str(tree / "models" / "unrelated" / "model.safetensors"))
    for name, tensor in load_file(str(tree / "models" / "base" / "model.safetensors")).items():
        decoy = ("a.wte.weight" if name == "model.embed_tokens.weight" else "zz.lm_head.weight"
                 if name == "lm_head.weight" else "zz." + name.replace("model.layers.", "h.").replace("model.", ""))
        state[decoy] = tensor
    save_file(state, str(candidate / "model.safetensors"))
    for name in ("config.json", "vocab.json"):
        shutil.copy(tree / "models" / "unrelated" / name, candidate / name)
    return tree, candidate


def test_decoy_tensors_are_never_fingerprinted(decoy_tree: tuple[Path, Path]) -> None:
    tree, candidate = decoy_tree
    artifact = resolve(candidate)
    assert {t.name for t in artifact.tensors} == {t.name for t in resolve(tree / "models" / "unrelated").tensors}
    assert len(artifact.unexpected) == len(resolve(tree / "models" / "base").tensors)
    settings = FingerprintSettings(device="cpu")
    fp = fingerprint_artifact(artifact, settings)
    clean = fingerprint_artifact(resolve(tree / "models" / "unrelated"), settings)
    assert fp.features == clean.features and fp.sketch == clean.sketch
    assert sorted(fp.extraction["unexpected_tensors"]) == sorted(t.name for t in artifact.unexpected)


@pytest.mark.parametrize("relaxed", [False, True])
def test_decoy_candidate_fails_verify(decoy_tree: tuple[Path, Path], tmp_path: Path, relaxed: bool) -> None:
    """Before the grammar this passed with lineage 1.000: the sketch took `a.wte.weight` and the base's blocks."""
    tree, candidate = decoy_tree
    policy = tmp_path / "policy.yml"
    policy.write_text(
        f"version: 1\ncandidate:\n  path: {candidate}\ndeclared:\n  base: {demo.BASE_ID}\nreferences:\n"
        f"  - id: {demo.BASE_ID}\n    family: llama\n    fingerprint: {tree / 'refs' / f'{demo.BASE_ID}.json'}\n"
        f"on_out_of_cluster: warn\n" + ("on_unexpected_tensors: warn\n" if relaxed else ""))
    result = verify(load_policy(policy))
    codes = {f.code: f.severity for f in result.verdict.findings}
    assert codes["TGV_UNEXPECTED_TENSORS"] == ("warn" if relaxed else "fail")
    assert codes.get("TGV_LINEAGE_NOT_ESTABLISHED") == "fail"  # the lineage test saw only the unrelated model
    assert not result.passed
    assert len(result.candidate.unexpected) == len(resolve(tree / "models" / "base").tensors)


@pytest.mark.parametrize("config", ["withheld", "unknown model_type"])
def test_decoy_tensors_without_a_grammar_are_refused(decoy_tree: tuple[Path, Path], tmp_path: Path,
                                                    config: str) -> None:
    """With config.json withheld (or naming a type tg-verify has no grammar for), the loaded set cannot be
    checked; the decoys then collide with the real tensors by unit, and neither is verified."""
    _, candidate = decoy_tree
    bare = tmp_path / "bare"
    shutil.copytree(candidate, bare)
    state = load_file(str(bare / "model.safetensors"))
    del state["zz.lm_head.weight"]  # the prefix-twin rule alone would catch this one
    save_file(state, str(bare / "model.safetensors"))
    if config == "withheld":
        (bare / "config.json").unlink()
    else:
        (bare / "config.json").write_text(json.dumps({"model_type": "llama-custom", "num_hidden_layers": 2}))
    with pytest.raises(AmbiguousTensorError, match="'a.wte.weight' and 'model.embed_tokens.weight'|"
                                                   "'model.embed_tokens.weight' and 'a.wte.weight'"):
        resolve(bare)
    del state["a.wte.weight"]  # the block decoys alone collide too
    save_file(state, str(bare / "model.safetensors"))
    with pytest.raises(AmbiguousTensorError, match="same unit by name"):
        resolve(bare)


def wrapper_tree(kind: str, directory: Path, native: bool = False) -> tuple[Path, Any]:
    """A tiny multimodal checkpoint as save_pretrained publishes it (`language_model.model.` roots), or with
    `native` under the names the model class itself uses (`model.language_model.`, as transformers >= 4.52 saves)."""
    model = build_wrapper(kind)
    model.save_pretrained(directory)
    if native:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if json.loads((directory / "config.json").read_text()).get("tie_word_embeddings"):
            state.pop("lm_head.weight")
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory, model


@pytest.mark.parametrize("native", [False, True], ids=["published-names", "native-names"])
@pytest.mark.parametrize("kind", WRAPPERS)
def test_a_multimodal_wrapper_is_read_as_its_language_model_beside_its_components(kind: str, native: bool,
                                                                                  tmp_path: Path) -> None:
    """Gemma 3, LLaVA, Qwen2-VL: the language model is checked by its own grammar (text_config), nothing of it is
    missing or unexpected, and the towers and projector are kept as components the lineage evidence does not read."""
    directory, _ = wrapper_tree(kind, tmp_path / kind, native)
    artifact = resolve(directory)
    config = json.loads((directory / "config.json").read_text())
    text = text_config_of(config)
    assert text is not None and artifact.architecture == _BY_MODEL_TYPE[text["model_type"]].family
    assert not artifact.unexpected and not any("not stored" in w for w in artifact.warnings)
    language = artifact.language_model()
    assert language.config == text and not language.components
    expected = set(expected_parameters(text) or ())
    if text.get("tie_word_embeddings", _BY_MODEL_TYPE[text["model_type"]].tied(text)):
        expected.discard("lm_head.weight")
    assert {_language_name(t.name) for t in language.tensors} == expected
    assert set(artifact.components) == {t.name for t in artifact.tensors} - {t.name for t in language.tensors}
    assert artifact.components and all(_component(name) for name in artifact.components)
    summary = describe(artifact)  # what `inspect --json` prints: the language model's dimensions, the towers' count
    assert summary["config"]["hidden_size"] == text["hidden_size"]
    assert summary["component_tensors"] == len(artifact.components)


def test_a_wrapper_storing_its_language_model_twice_or_beside_stray_roots_is_refused_or_flagged(
        tmp_path: Path) -> None:
    """The same language-model parameter under the published and the native root is ambiguous; a tensor under a
    root no wrapper has is unexpected (never fingerprinted)."""
    directory, _ = wrapper_tree("llava", tmp_path / "llava")
    state = load_file(directory / "model.safetensors")
    up = state["language_model.model.layers.1.mlp.up_proj.weight"]
    twin = dict(state, **{"model.language_model.layers.1.mlp.up_proj.weight": up.clone()})
    save_file(twin, str(directory / "model.safetensors"))
    with pytest.raises(AmbiguousTensorError, match="up_proj"):
        resolve(directory)
    stray = dict(state, **{"decoy.model.layers.1.mlp.up_proj.weight": up.clone()})
    save_file(stray, str(directory / "model.safetensors"))
    artifact = resolve(directory)
    assert [t.name for t in artifact.unexpected] == ["decoy.model.layers.1.mlp.up_proj.weight"]


def test_a_wrapper_whose_language_model_has_no_grammar_keeps_its_towers_apart(tmp_path: Path) -> None:
    """Llama 3.2 Vision (mllama), Llama 4 and their kind: the language model has no grammar, so it is kept under the
    generic rules, but its towers, whose layers share its leaf names, are still set apart (not refused as twins of
    the language model's, as before); stored twice under two roots it is still ambiguous."""
    directory, _ = wrapper_tree("llava", tmp_path / "llava")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["model_type"] = "mystery_text"
    (directory / "config.json").write_text(json.dumps(config))
    artifact = resolve(directory)
    assert artifact.architecture is None and artifact.components and not artifact.unexpected
    assert any("'mystery_text' has no tensor-name grammar" in w for w in artifact.warnings)
    language = artifact.language_model()
    assert language.config is not None and language.config["model_type"] == "mystery_text"
    assert not {t.name for t in language.tensors} & set(artifact.components)
    state = load_file(directory / "model.safetensors")
    up = state["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(dict(state, **{"model.language_model.layers.1.mlp.up_proj.weight": up.clone()}),
              str(directory / "model.safetensors"))
    with pytest.raises(AmbiguousTensorError, match="same parameter"):
        resolve(directory)


def test_a_wrapper_with_a_flat_config_is_read_as_its_language_model(tmp_path: Path) -> None:
    """Qwen2-VL as first published: config.json holds the language model's keys at its top level beside a
    vision_config, and no text_config. Its vision blocks must not be read as the language model's layers (they share
    block indices, and outnumber them)."""
    directory, _ = wrapper_tree("qwen2_vl", tmp_path / "qwen2_vl")
    config = json.loads((directory / "config.json").read_text())
    outer = {k: v for k, v in config.items() if k != "text_config"}
    flat = {**outer, **config["text_config"], "model_type": "qwen2_vl"}
    (directory / "config.json").write_text(json.dumps(flat))
    artifact = resolve(directory)
    assert artifact.architecture == "qwen2" and not artifact.unexpected
    assert artifact.components and all(name.startswith("visual.") for name in artifact.components)
    language = artifact.language_model()
    assert language.config is not None and "vision_config" not in language.config
    assert not any(t.name.startswith("visual.") for t in language.tensors)
