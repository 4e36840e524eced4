"""fingerprint_artifact: determinism, layout invariance, cast stability, aggregation rules, failure modes."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tg_verify.artifact import file_digests, resolve
from tg_verify.errors import UsageError, WeightValueError
from tg_verify.fingerprint.document import FEATURE_NAMES, load
from tg_verify.fingerprint.extract import count_layers, evenly_spaced, fingerprint_artifact
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.tiny import ARCHITECTURES, WRAPPERS, build_model, build_wrapper, save_model

FAST = FingerprintSettings(repeats=6, sketch=False)


def _write(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory / "model.safetensors"


def _stats(fingerprint) -> dict[str, dict[str, float]]:
    return {r["name"]: r["stats"] for r in fingerprint.tensors if "stats" in r}


class RecordingSink:
    """A ProgressSink that records what it is told, from any thread."""

    def __init__(self) -> None:
        self.total = None
        self.advanced = 0.0
        self.descriptions: list[str] = []
        self.lock = threading.Lock()

    def start(self, description, total):
        self.total = total

    def advance(self, amount=1.0):
        with self.lock:
            self.advanced += amount

    def finish(self):
        pass

    def describe(self, text):
        self.descriptions.append(text)


def test_byte_identical_twice_and_across_thread_counts(tiny_models):
    artifact = resolve(tiny_models["llama"]["single"])
    settings = FingerprintSettings()  # the defaults, sketch included
    first = fingerprint_artifact(artifact, settings, threads=1).to_json_bytes()
    assert fingerprint_artifact(artifact, settings, threads=1).to_json_bytes() == first
    assert fingerprint_artifact(artifact, settings, threads=2).to_json_bytes() == first
    assert torch.get_num_threads() == 1  # restored (the autouse fixture pins 1)


def test_tensors_shared_by_threads_give_the_same_bytes(tiny_models, monkeypatch):
    """1, 2 and 4 threads share the tensors; with 64-element blocks the block sums are long ones too."""
    from tg_verify.fingerprint import responses

    monkeypatch.setattr(responses, "BLOCK_ELEMENTS", 64)
    artifact = resolve(tiny_models["qwen2"]["shards"])
    settings = FingerprintSettings(repeats=6)  # FGSM tensors included: their input gradient is a block sum
    first = fingerprint_artifact(artifact, settings, threads=1)
    assert "adversarial" in first.extraction["strategies"]
    for threads in (2, 4):
        assert fingerprint_artifact(artifact, settings, threads=threads).to_json_bytes() == first.to_json_bytes()
    unhashed = fingerprint_artifact(artifact, settings, threads=1, digests=file_digests(artifact))  # no helper
    assert unhashed.to_json_bytes() == first.to_json_bytes()


def test_document_round_trips_byte_identically(tiny_models, tmp_path):
    data = fingerprint_artifact(resolve(tiny_models["gemma"]["single"]), FAST).to_json_bytes()
    (tmp_path / "fp.json").write_bytes(data)
    assert load(tmp_path / "fp.json").to_json_bytes() == data


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_does_not_change_features(arch, tiny_models):
    single, indexed, shards = (fingerprint_artifact(resolve(tiny_models[arch][layout]), FAST)
                               for layout in ("single", "indexed-shards", "shards"))
    assert single.features == indexed.features == shards.features
    assert single.tensors == indexed.tensors == shards.tensors


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_cast_stays_within_the_documented_distance(arch, tiny_model_objects, tmp_path):
    model = tiny_model_objects[arch]
    fp32 = fingerprint_artifact(resolve(save_model(model, tmp_path / "fp32")), FingerprintSettings(sketch=False))
    half = build_model(arch, seed=ARCHITECTURES.index(arch)).to(torch.bfloat16)
    bf16 = fingerprint_artifact(resolve(save_model(half, tmp_path / "bf16")), FingerprintSettings(sketch=False))
    a, b = fp32.features, bf16.features
    for name in FEATURE_NAMES:  # docs/method.md, "bf16 and fp16 copies"
        if name.endswith("_mean"):
            scale = max(a[name.replace("_mean", "_std")], 1e-30)
            assert abs(a[name] - b[name]) <= 1e-3 * scale, name
        elif name.endswith("_skewness"):
            assert abs(a[name] - b[name]) <= 1e-3, name
        else:
            assert abs(a[name] - b[name]) <= 1e-3 * abs(a[name]), name


def test_nan_weight_is_a_weight_value_error_naming_the_tensor(tmp_path):
    w = torch.randn(8, 16)
    w[3, 5] = float("nan")
    path = _write(tmp_path, {"model.layers.0.mlp.down_proj.weight": w,
                             "model.embed_tokens.weight": torch.randn(32, 16)})
    with pytest.raises(WeightValueError, match="model.layers.0.mlp.down_proj.weight.*NaN"):
        fingerprint_artifact(resolve(path), FAST)


def test_infinite_norm_gain_is_a_weight_value_error(tmp_path):
    gain = torch.ones(16)
    gain[0] = float("inf")
    path = _write(tmp_path, {"model.norm.weight": gain, "model.embed_tokens.weight": torch.randn(32, 16)})
    with pytest.raises(WeightValueError, match="model.norm.weight"):
        fingerprint_artifact(resolve(path), FAST)


def test_a_non_finite_gain_error_names_its_file_as_an_attribute(tmp_path):
    gain = torch.ones(16)
    gain[3] = float("nan")
    path = _write(tmp_path, {"model.norm.weight": gain, "model.embed_tokens.weight": torch.randn(32, 16)})
    artifact = resolve(path)
    with pytest.raises(WeightValueError) as raised:
        fingerprint_artifact(artifact, FAST)
    assert raised.value.file == str(artifact.path_of(artifact.files[0].path))


def test_bf16_nan_is_caught_too(tmp_path):
    w = torch.randn(8, 16).bfloat16()
    w[0, 0] = float("inf")
    path = _write(tmp_path, {"model.layers.0.self_attn.q_proj.weight": w})
    with pytest.raises(WeightValueError, match="q_proj"):
        fingerprint_artifact(resolve(path), FAST)


def test_nothing_to_analyse_is_an_error(tmp_path):
    path = _write(tmp_path, {"model.norm.weight": torch.ones(16), "ids": torch.arange(16).reshape(4, 4)})
    with pytest.raises(WeightValueError, match="nothing to fingerprint"):
        fingerprint_artifact(resolve(path), FAST)
    zeros = _write(tmp_path / "z", {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 16)})
    with pytest.raises(WeightValueError, match="zero response"):
        fingerprint_artifact(resolve(zeros), FAST)


def test_zero_tensor_is_degenerate_recorded_and_excluded(tmp_path):
    torch.manual_seed(0)
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16),
               "model.layers.0.mlp.down_proj.weight": torch.zeros(16, 24),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16)}
    fingerprint = fingerprint_artifact(resolve(_write(tmp_path, tensors)), FAST)
    record = {r["name"]: r for r in fingerprint.tensors}
    assert record["model.layers.0.mlp.down_proj.weight"]["analysis"] == "degenerate"
    assert fingerprint.extraction["degenerate_tensors"] == ["model.layers.0.mlp.down_proj.weight"]
    assert fingerprint.extraction["category_tensors"]["ffn"] == ["model.layers.0.mlp.up_proj.weight"]
    assert all(np.isfinite(list(fingerprint.features.values())))


def test_global_covers_every_analysed_tensor_and_categories_sample_three(tiny_models):
    fingerprint = fingerprint_artifact(resolve(tiny_models["llama"]["single"]), FAST)
    stats = _stats(fingerprint)
    for stat in ("mean", "std", "norm", "skewness", "kurtosis"):
        assert fingerprint.features[f"global_{stat}"] == pytest.approx(np.mean([s[stat] for s in stats.values()]),
                                                                      rel=1e-12)
    attention = [n for n in stats if ".self_attn." in n]
    picks = [attention[i] for i in evenly_spaced(len(attention))]
    assert fingerprint.extraction["category_tensors"]["attention"] == picks and len(picks) == 3
    for stat in ("mean", "std", "norm"):
        assert fingerprint.features[f"attention_{stat}"] == pytest.approx(np.mean([stats[n][stat] for n in picks]),
                                                                         rel=1e-12)
    assert fingerprint.extraction["analysed_tensors"] == len(stats)
    assert "lm_head.weight" in stats  # uncategorised 2-D tensors count in global


def test_evenly_spaced_is_the_release_linspace():
    assert evenly_spaced(0) == [] and evenly_spaced(1) == [0] and evenly_spaced(2) == [0, 1]
    assert evenly_spaced(4) == [0, 1, 3] and evenly_spaced(8) == [0, 3, 7] and evenly_spaced(100) == [0, 49, 99]


def test_empty_category_is_zero_and_recorded(tmp_path):
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16), "lm_head.weight": torch.randn(40, 16)}
    fingerprint = fingerprint_artifact(resolve(_write(tmp_path, tensors)), FAST)
    assert fingerprint.extraction["empty_categories"] == ["attention", "embedding"]
    assert all(fingerprint.features[f"{c}_{s}"] == 0.0 for c in ("attention", "embedding")
               for s in ("mean", "std", "norm"))


def test_num_layers_is_model_depth_and_total_params_counts_everything(tiny_models, tiny_model_objects):
    for arch in ("llama", "phi3"):
        fingerprint = fingerprint_artifact(resolve(tiny_models[arch]["single"]), FAST)
        model = tiny_model_objects[arch]
        assert fingerprint.features["num_layers"] == model.config.num_hidden_layers
        stored = dict(model.state_dict().items())
        if getattr(model.config, "tie_word_embeddings", False):
            stored.pop("lm_head.weight", None)
        assert fingerprint.features["total_params"] == sum(v.numel() for v in stored.values())
    assert count_layers(["model.layers.0.a", "model.layers.1.a", "model.layers.3.b", "vision.layers.0.x"]) == (
        3, "model.layers.")
    assert count_layers(["transformer.h.0.attn.c_attn.weight", "transformer.h.11.mlp.c_fc.weight"]) == (
        2, "transformer.h.")
    assert count_layers(["embed.weight"]) == (0, None)


def test_higher_rank_tensors_are_rows_of_their_last_axis(tmp_path):
    torch.manual_seed(1)
    conv = torch.randn(4, 3, 16)
    a = fingerprint_artifact(resolve(_write(tmp_path / "a", {"blocks.0.conv.weight": conv})), FAST)
    b = fingerprint_artifact(resolve(_write(tmp_path / "b", {"blocks.0.conv.weight": conv.reshape(12, 16)})), FAST)
    assert _stats(a) == _stats(b)


def test_integer_and_one_dimensional_tensors_are_not_analysed(tmp_path):
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16), "model.layers.0.mlp.up_proj.bias":
               torch.randn(24), "model.layers.0.mlp.up_proj.qweight": torch.randint(0, 9, (6, 16), dtype=torch.int32)}
    fingerprint = fingerprint_artifact(resolve(_write(tmp_path, tensors)), FAST)
    kinds = {r["name"]: r["analysis"] for r in fingerprint.tensors}
    assert kinds == {"model.layers.0.mlp.up_proj.weight": "gradient", "model.layers.0.mlp.up_proj.bias":
                     "one-dimensional", "model.layers.0.mlp.up_proj.qweight": "not-float"}
    assert fingerprint.extraction["skipped_tensors"] == {"one-dimensional": 1, "not-float": 1, "empty": 0}
    assert fingerprint.features["total_params"] == 24 * 16 + 24 + 6 * 16


def test_a_tensor_s_statistics_do_not_depend_on_the_other_tensors(tiny_model_objects, tmp_path):
    state = {k: v.detach().clone() for k, v in tiny_model_objects["mistral"].state_dict().items()}
    full = _stats(fingerprint_artifact(resolve(_write(tmp_path / "full", state)), FAST))
    dropped = {k: v for k, v in state.items() if ".layers.0." not in k}
    partial = _stats(fingerprint_artifact(resolve(_write(tmp_path / "part", dropped)), FAST))
    assert partial == {k: v for k, v in full.items() if ".layers.0." not in k}


def test_any_reader_and_given_digests_are_used(tiny_models):
    artifact = resolve(tiny_models["qwen2"]["indexed-shards"])
    reference = fingerprint_artifact(artifact, FAST)

    class Wrapped:  # only raw() and float32(), like a merged-adapter reader
        def __init__(self):
            from tg_verify.artifact import TensorReader
            self.inner = TensorReader(artifact)
            self.raw_calls = 0

        def raw(self, info):
            self.raw_calls += 1
            return self.inner.raw(info)

        def float32(self, info):
            return self.inner.float32(info)

    reader = Wrapped()
    digests = reference.file_digests
    again = fingerprint_artifact(artifact, FAST, reader=reader, digests=digests)
    assert again.to_json_bytes() == reference.to_json_bytes() and reader.raw_calls > 0
    for entry in artifact.files:
        assert digests[entry.path] == hashlib.sha256(artifact.path_of(entry.path).read_bytes()).hexdigest()
    stand_ins = {path: f"{n:064x}" for n, path in enumerate(digests)}  # not the files' digests: recorded as given
    recorded = fingerprint_artifact(artifact, FAST, digests=stand_ins)
    assert recorded.file_digests == stand_ins and recorded.features == reference.features
    with pytest.raises(UsageError, match="lack"):
        fingerprint_artifact(artifact, FAST, digests={})


def test_sketch_does_not_change_features(tiny_models):
    artifact = resolve(tiny_models["phi3"]["single"])
    with_sketch = fingerprint_artifact(artifact, FingerprintSettings(repeats=6, sketch=True))
    without = fingerprint_artifact(artifact, FAST)
    assert with_sketch.sketch and without.sketch is None
    assert with_sketch.features == without.features and with_sketch.tensors == without.tensors


def test_progress_counts_tensor_and_file_bytes(tiny_models):
    artifact = resolve(tiny_models["gemma"]["shards"])
    sink = RecordingSink()
    fingerprint_artifact(artifact, FAST, progress=sink)
    expected = sum(t.nbytes for t in artifact.tensors) + sum(f.size for f in artifact.files)
    assert sink.total == expected and sink.advanced == expected
    assert sink.descriptions[-1].endswith(f"{len(artifact.tensors)}/{len(artifact.tensors)} tensors")


def test_settings_and_provenance_are_recorded(tiny_models):
    artifact = resolve(tiny_models["llama"]["shards"])
    fingerprint = fingerprint_artifact(artifact, FingerprintSettings(seed=3, repeats=4, sketch=False),
                                       model_name="my-llama")
    assert fingerprint.model_name == "my-llama"
    assert fingerprint.settings == {**FingerprintSettings(seed=3, repeats=4).to_dict(), "device": "cpu"}
    assert fingerprint.tool["name"] == "tg-verify"
    assert [f["path"] for f in fingerprint.artifact["files"]] == [f.path for f in artifact.files]
    assert fingerprint.artifact["layout"] == "shards"
    assert {r["name"] for r in fingerprint.tensors} == {t.name for t in artifact.tensors}


def _decoded_units(sketch: dict) -> dict[tuple[str, int | None], np.ndarray]:
    import base64

    k = sketch["probe"]["mixtures"]
    return {(u["role"], u["layer"]): np.frombuffer(base64.b64decode(u["data"]), dtype="<f2").astype(np.float32)
            .reshape(k, k) for u in sketch["units"]}


def _direct_sketch(artifact) -> dict:
    """The sketch from whole float32 weights (SketchBuilder.add), the definition the fused pass must match."""
    from tg_verify.artifact import TensorReader
    from tg_verify.fingerprint.sketch import SketchBuilder

    with TensorReader(artifact) as reader:
        builder = SketchBuilder(artifact, reader, None)
        for info, weight in reader.stream():
            builder.add(info, weight)
        return builder.finish()


def test_fused_sketch_is_the_direct_sketch(arch, tiny_models):
    """The products taken inside the response pass give byte-identical units when a tensor is one block."""
    artifact = resolve(tiny_models[arch]["single"])
    fused = fingerprint_artifact(artifact, FingerprintSettings(repeats=6)).sketch
    assert fused == _direct_sketch(artifact)


def test_fused_sketch_over_many_row_blocks_matches_to_fp16(monkeypatch, tiny_models):
    """Tiny row blocks split every tensor (embedding, o/down, fused qkv/gate_up): the left products then
    accumulate block by block, which may move a unit by an fp16 rounding step, never more."""
    from tg_verify.fingerprint import responses

    monkeypatch.setattr(responses, "BLOCK_ELEMENTS", 1 << 10)
    for arch in ("llama", "phi3", "gemma"):
        artifact = resolve(tiny_models[arch]["single"])
        direct = _direct_sketch(artifact)
        fused = fingerprint_artifact(artifact, FingerprintSettings(repeats=6)).sketch
        assert {k: v for k, v in fused.items() if k != "units"} == {k: v for k, v in direct.items() if k != "units"}
        expected, got = _decoded_units(direct), _decoded_units(fused)
        assert got.keys() == expected.keys()
        for key, matrix in expected.items():
            assert np.allclose(got[key], matrix, rtol=2e-3, atol=2e-3), (arch, key)


def test_response_pass_products_equal_whole_weight_products(monkeypatch):
    """respond_and_project: responses bitwise those of respond; W Rᵀ and L W as from the whole weight."""
    from tg_verify.fingerprint import responses

    monkeypatch.setattr(responses, "BLOCK_ELEMENTS", 1 << 9)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=generator).to(torch.bfloat16)
    inputs = torch.randn(6, 24, generator=generator).numpy()
    right, left = torch.randn(5, 24, generator=generator), torch.randn(5, 40, generator=generator)
    engine = responses.ResponseEngine(torch.device("cpu"), weight.numel())
    engine.load(weight)
    alone = engine.respond(inputs)
    together, right_product, left_product = engine.respond_and_project(inputs, right, left)
    assert np.array_equal(alone, together)
    w = weight.to(torch.float32)
    assert right_product is not None and left_product is not None
    assert torch.allclose(right_product, w @ right.T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(left_product, left @ w, rtol=1e-5, atol=1e-5)
    assert engine.respond_and_project(inputs)[1:] == (None, None)


@pytest.mark.parametrize("kind", WRAPPERS)
def test_a_multimodal_wrapper_has_its_language_models_lineage_evidence_and_depth(kind, tmp_path):
    """The sketch and the block evidence of a wrapper are those of its language model published alone (a text-only
    extraction is a derivative of the wrapper and the other way round); its tower and projector, whose loading no
    grammar checks, move no feature (num_layers is the language model's depth however deep the tower is) and are
    listed as left out."""
    import transformers

    wrapper = build_wrapper(kind)
    wrapper.save_pretrained(tmp_path / "wrapper")
    text_config = wrapper.config.text_config
    if kind == "qwen2_vl":  # its language model has no causal-LM class of its own: Qwen2's, as published alone
        text_config = transformers.Qwen2Config(**{k: v for k, v in text_config.to_dict().items()
                                                  if k not in ("model_type", "rope_parameters")})
    alone = transformers.AutoModelForCausalLM.from_config(text_config)
    state = {k.replace("model.language_model.", "model."): v for k, v in wrapper.state_dict().items()
             if k.startswith(("model.language_model.", "lm_head."))}
    alone.load_state_dict(state)
    save_model(alone, tmp_path / "alone")
    both = [fingerprint_artifact(resolve(tmp_path / name)) for name in ("wrapper", "alone")]
    assert both[0].sketch["units"] == both[1].sketch["units"] and both[0].blocks == both[1].blocks
    assert both[0].features["num_layers"] == text_config.num_hidden_layers == both[1].features["num_layers"]
    assert both[0].features["total_params"] == both[1].features["total_params"]
    components = resolve(tmp_path / "wrapper").components
    assert components and both[0].extraction["component_tensors"] == list(components)
    assert {t["name"] for t in both[0].tensors}.isdisjoint(components)
    # a supplier's tensors under a tower's root (no runtime need load them) cannot move the fingerprint
    from safetensors.torch import load_file

    state = load_file(tmp_path / "wrapper" / "model.safetensors")
    layer = next(t.name for t in resolve(tmp_path / "wrapper").language_model().tensors
                 if t.name.endswith("layers.0.mlp.down_proj.weight"))
    save_file({**state, "vision_tower.decoy.layers.0.mlp.down_proj.weight": state[layer] * 3},
              str(tmp_path / "wrapper" / "model.safetensors"))
    decoyed = fingerprint_artifact(resolve(tmp_path / "wrapper"))
    assert decoyed.features == both[0].features and decoyed.blocks == both[0].blocks
    assert "vision_tower.decoy.layers.0.mlp.down_proj.weight" in decoyed.extraction["component_tensors"]
