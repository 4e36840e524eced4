"""GGUF models read like their safetensors originals: names, shapes, config and values, per architecture and type."""

from __future__ import annotations

import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_helpers import converter_permute, dense_metadata, random_blocks, with_extra_tensors, write_gguf
from ggufcraft import TinyLlama, kv_str, tiny_llama

from tg_verify.artifact import open_reader, resolve
from tg_verify.artifact.errors import AmbiguousLayoutError, GGUFTensorsError
from tg_verify.artifact.gguf import PLAIN_TYPES, dequantisable
from tg_verify.artifact.gguf_reader import GGUFTensorReader
from tg_verify.errors import UnsupportedDtypeError
from tg_verify.tiny import ARCHITECTURES, save_gguf, save_model

# Types gguf.quants can write; the others (K-quants, IQ*, NVFP4) are read from packed blocks below.
WRITABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4")
# Largest |error| of a dequantised weight, as a fraction of the tensor's largest |weight|: one step of each
# type's per-block grid (Q8_0 amax/127, Q5 amax/16, Q4_1 range/15, Q4_0 amax/8, MXFP4's e2m1 grid under a
# power-of-two scale). Rows swapped by a wrong Q/K permutation differ by up to 2x the largest weight.
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q5_1": 7e-2, "Q5_0": 7e-2, "Q4_1": 0.14,
             "Q4_0": 0.14, "MXFP4": 0.35}
CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size")


@pytest.fixture(scope="module")
def gguf_files(tiny_model_objects: dict[str, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {(arch, qtype): save_gguf(tiny_model_objects[arch], root / f"{arch}-{qtype}.gguf", qtype)
            for arch in ARCHITECTURES for qtype in WRITABLE}


@pytest.mark.parametrize("qtype", WRITABLE)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gguf_reads_like_the_safetensors_original(arch: str, qtype: str, tiny_models: dict[str, dict[str, Path]],
                                                  gguf_files: dict[tuple[str, str], Path]) -> None:
    original = resolve(tiny_models[arch]["single"])
    converted = resolve(gguf_files[(arch, qtype)])
    assert converted.format == "gguf" and converted.layout == "single" and not converted.unexpected
    assert converted.architecture == {"mistral": "llama"}.get(arch, arch)
    assert [(t.name, t.shape) for t in converted.tensors] == [(t.name, t.shape) for t in original.tensors]
    assert converted.total_params == original.total_params
    assert original.config is not None and converted.config is not None
    assert {k: converted.config[k] for k in CONFIG_KEYS} == {k: original.config[k] for k in CONFIG_KEYS}
    expected_type = "F16" if qtype == "F16" else qtype
    assert {t.dtype for t in converted.tensors if len(t.shape) == 2} == {expected_type}
    with open_reader(original) as a, open_reader(converted) as b:
        assert isinstance(b, GGUFTensorReader)
        for x, y in zip(original.tensors, converted.tensors):
            want, got = a.float32(x), b.float32(y)
            if len(x.shape) == 1 or qtype == "F32":
                assert torch.equal(got, want), y.name  # 1-D tensors stay F32; Q/K un-permuted exactly
            else:
                assert float((got - want).abs().max()) <= TOLERANCE[qtype] * float(want.abs().max()), y.name


def test_mistral_and_llama_map_to_llama_as_llama_cpp_loads_them(gguf_files: dict[tuple[str, str], Path]) -> None:
    config = resolve(gguf_files[("mistral", "F32")]).config
    assert config is not None and config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random blocks hold NaN/Inf scales; compared as such
@pytest.mark.parametrize("qtype", sorted(dequantisable()))
def test_every_dequantisable_type_reads_what_gguf_dequantises(qtype: str, tmp_path: Path) -> None:
    width, heads, ff, vocab = 256, 4, 256, 8
    blocks = {"token_embd.weight": random_blocks(vocab, width, qtype, 1),
              "blk.0.attn_q.weight": random_blocks(width, width, qtype, 2),
              "blk.0.attn_k.weight": random_blocks(width, width, qtype, 3),
              "blk.0.attn_v.weight": random_blocks(width, width, qtype, 4),
              "blk.0.attn_output.weight": random_blocks(width, width, qtype, 5),
              "blk.0.ffn_gate.weight": random_blocks(ff, width, qtype, 6),
              "blk.0.ffn_up.weight": random_blocks(ff, width, qtype, 7),
              "blk.0.ffn_down.weight": random_blocks(width, ff, qtype, 8)}
    norms = {n: np.ones(width, dtype=np.float32) for n in ("output_norm.weight", "blk.0.attn_norm.weight",
                                                          "blk.0.ffn_norm.weight")}
    tensors = {**{n: (b, qtype) for n, b in blocks.items()}, **norms}
    path = write_gguf(tmp_path / "m.gguf", "qwen2", dense_metadata(width, heads, heads, 1, ff), tensors)
    artifact = resolve(path)
    hf = {"token_embd.weight": "model.embed_tokens.weight",
          "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
          "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
    with open_reader(artifact) as reader:
        for name, target in hf.items():
            info = artifact.tensor(target)
            assert info.dtype == qtype
            expected = torch.from_numpy(gguf.quants.dequantize(blocks[name], gguf.GGMLQuantizationType[qtype]))
            torch.testing.assert_close(reader.float32(info), expected, rtol=0, atol=0, equal_nan=True)
        embedding = artifact.tensor("model.embed_tokens.weight")
        ids = torch.tensor([1, 5, 6])
        torch.testing.assert_close(reader.rows(embedding, ids), reader.float32(embedding)[ids], rtol=0, atol=0,
                                   equal_nan=True)


def test_plain_and_dequantisable_types_cover_every_float_type_of_gguf() -> None:
    storage = {t.name for t in gguf.GGMLQuantizationType} - {"Q8_1", "Q8_K"}  # llama.cpp's dot-product intermediates
    missing = storage - PLAIN_TYPES - dequantisable()
    assert missing <= {"Q1_0"}, missing  # what the installed gguf cannot dequantise is refused when read


def test_a_type_the_package_cannot_dequantise_is_refused_when_read(tmp_path: Path) -> None:
    blob = tiny_llama().replace(b"", b"")
    path = tmp_path / "m.gguf"
    path.write_bytes(blob)
    artifact = resolve(path)
    info = artifact.tensor("model.layers.0.self_attn.q_proj.weight")
    fake = type(info)(info.name, "Q1_0", info.shape, info.file, info.begin, info.end)
    with GGUFTensorReader(artifact) as reader, pytest.raises(UnsupportedDtypeError, match="Q1_0"):
        reader.float32(fake)


def _extra_model(kind: str) -> torch.nn.Module:
    common = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128, "head_dim": 16}
    config = {"qwen3": transformers.Qwen3Config, "gemma2": transformers.Gemma2Config,
              "gemma3_text": transformers.Gemma3TextConfig}[kind](**common)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # trained-looking norms, so Gemma's stored 1 + w is exercised
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.randn(parameter.shape) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "gemma3_text"])
def test_more_families_map_exactly(kind: str, tmp_path: Path) -> None:
    model = _extra_model(kind)
    original = resolve(save_model(model, tmp_path / "st"))
    converted = resolve(save_gguf(model, tmp_path / "m.gguf", "F32"))
    assert [(t.name, t.shape) for t in converted.tensors] == [(t.name, t.shape) for t in original.tensors]
    assert converted.config is not None and converted.config["model_type"] == kind
    with open_reader(original) as a, open_reader(converted) as b:
        for x, y in zip(original.tensors, converted.tensors):
            torch.testing.assert_close(b.float32(y), a.float32(x), rtol=0, atol=1e-7 if "norm" in x.name else 0)


def _moe(arch: str, experts: int = 4, width: int = 32, ff: int = 64, seed: int = 0
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(HF state with per-expert tensors as on the Hub, GGUF tensors as llama.cpp's converter stacks them)."""
    generator = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return generator.standard_normal(shape).astype(np.float32)

    heads, kv_heads, head_dim = 4, 2, width // 4
    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": w(16, width), "model.norm.weight": w(width),
                                 "lm_head.weight": w(16, width)}
    g: dict[str, np.ndarray] = {"token_embd.weight": hf["model.embed_tokens.weight"],
                                "output_norm.weight": hf["model.norm.weight"], "output.weight": hf["lm_head.weight"]}
    mixtral = arch == "llama"
    moe = "block_sparse_moe" if mixtral else "mlp"
    names = ("w1", "w2", "w3") if mixtral else ("gate_proj", "down_proj", "up_proj")
    for b in range(2):
        p = f"model.layers.{b}."
        q, k, v, o = w(heads * head_dim, width), w(kv_heads * head_dim, width), w(kv_heads * head_dim, width), \
            w(width, heads * head_dim)
        hf.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": o, p + "input_layernorm.weight": w(width),
                   p + "post_attention_layernorm.weight": w(width), p + f"{moe}.gate.weight": w(experts, width)})
        g.update({f"blk.{b}.attn_q.weight": converter_permute(q, heads) if mixtral else q,
                  f"blk.{b}.attn_k.weight": converter_permute(k, kv_heads) if mixtral else k,
                  f"blk.{b}.attn_v.weight": v, f"blk.{b}.attn_output.weight": o,
                  f"blk.{b}.attn_norm.weight": hf[p + "input_layernorm.weight"],
                  f"blk.{b}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
                  f"blk.{b}.ffn_gate_inp.weight": hf[p + f"{moe}.gate.weight"]})
        if arch == "qwen3moe":
            for part in ("q_norm", "k_norm"):
                hf[p + f"self_attn.{part}.weight"] = g[f"blk.{b}.attn_{part}.weight"] = w(head_dim)
        if arch == "qwen2moe":  # a shared expert and its gate ([1, hidden] in HF, a vector in GGUF)
            for part, shape in (("gate", (ff, width)), ("up", (ff, width)), ("down", (width, ff))):
                hf[p + f"mlp.shared_expert.{part}_proj.weight"] = g[f"blk.{b}.ffn_{part}_shexp.weight"] = w(*shape)
            hf[p + "mlp.shared_expert_gate.weight"] = w(1, width)
            g[f"blk.{b}.ffn_gate_inp_shexp.weight"] = hf[p + "mlp.shared_expert_gate.weight"][0]
        stacks: dict[str, list[np.ndarray]] = {"gate": [], "down": [], "up": []}
        for e in range(experts):
            gate, down, up = w(ff, width), w(width, ff), w(ff, width)
            for part, value, name in zip(("gate", "down", "up"), (gate, down, up), names):
                hf[p + f"{moe}.experts.{e}.{name}.weight"] = value
                stacks[part].append(value)
        for part, values in stacks.items():
            g[f"blk.{b}.ffn_{part}_exps.weight"] = np.stack(values)
    return hf, g


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe"])
def test_merged_experts_become_one_tensor_per_expert(arch: str, tmp_path: Path) -> None:
    hf, tensors = _moe(arch)
    metadata = {**dense_metadata(32, 4, 2, 2, 64), "expert_count": 4, "expert_used_count": 2,
                "attention.key_length": 8}
    artifact = resolve(write_gguf(tmp_path / "moe.gguf", arch, metadata, tensors))
    assert sorted(t.name for t in artifact.tensors) == sorted(hf)
    assert artifact.config is not None
    assert artifact.config["model_type"] == {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}[arch]
    with open_reader(artifact) as reader:
        for info in artifact.tensors:
            assert info.shape == hf[info.name].shape, info.name
            assert torch.equal(reader.float32(info), torch.from_numpy(hf[info.name])), info.name


def test_tensors_llama_cpp_would_not_load_are_reported_not_mapped(tmp_path: Path) -> None:
    model = TinyLlama()
    extra = {"blk.0.evil.weight": np.ones((16, 16), np.float32), "blk.7.attn_q.weight": np.ones((16, 16), np.float32),
             "blk.0.ffn_norm.bias": np.ones(16, np.float32), "rope_freqs.weight": np.ones(4, np.float32)}
    base = resolve(_write(tmp_path / "plain.gguf", model.build()))
    path = with_extra_tensors(base.path_of(base.files[0].path), tmp_path / "extra.gguf", extra)
    artifact = resolve(path)
    assert [t.name for t in artifact.tensors] == [t.name for t in base.tensors]
    assert sorted(t.name for t in artifact.unexpected) == ["blk.0.evil.weight", "blk.0.ffn_norm.bias",
                                                           "blk.7.attn_q.weight"]
    assert any("rope_freqs.weight" in w for w in artifact.warnings)
    assert any("block 7 is past block_count 1" in w for w in artifact.warnings)


def test_gemma_output_head_is_never_loaded(tmp_path: Path, tiny_model_objects: dict[str, torch.nn.Module]) -> None:
    path = save_gguf(tiny_model_objects["gemma"], tmp_path / "g.gguf")
    assert not resolve(path).unexpected
    head = {"output.weight": np.ones((512, 64), np.float32)}
    artifact = resolve(with_extra_tensors(path, tmp_path / "g2.gguf", head))
    assert "lm_head.weight" not in [t.name for t in artifact.tensors]
    assert [t.name for t in artifact.unexpected] == ["output.weight"]


def test_fused_and_separate_attention_together_are_refused(tmp_path: Path) -> None:
    base = resolve(_write(tmp_path / "plain.gguf", tiny_llama()))
    path = with_extra_tensors(base.path_of(base.files[0].path), tmp_path / "both.gguf",
                              {"blk.0.attn_qkv.weight": np.ones((32, 16), np.float32)})
    with pytest.raises(GGUFTensorsError, match="both a fused attn_qkv"):
        resolve(path)


def test_directories_holding_gguf_files(tmp_path: Path, tiny_models: dict[str, dict[str, Path]]) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "Model-Q8_0.GGUF").write_bytes(tiny_llama())
    (lone / "README.md").write_text("a model card")
    artifact = resolve(lone)
    assert artifact.format == "gguf" and artifact.files[0].path == "Model-Q8_0.GGUF"
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(tiny_llama())
    with pytest.raises(AmbiguousLayoutError, match="pass one file"):
        resolve(two)
    beside = tmp_path / "beside"
    beside.mkdir()
    for source in tiny_models["llama"]["single"].iterdir():
        (beside / source.name).write_bytes(source.read_bytes())
    (beside / "model.gguf").write_bytes(tiny_llama())
    mixed = resolve(beside)
    assert mixed.format == "safetensors" and any("model.gguf" in w for w in mixed.warnings)


def test_reader_is_thread_safe(gguf_files: dict[tuple[str, str], Path]) -> None:
    artifact = resolve(gguf_files[("llama", "Q4_0")])
    with open_reader(artifact) as reader:
        serial = {t.name: reader.float32(t) for t in artifact.tensors}
        results: dict[str, torch.Tensor] = {}

        def work(part: int) -> None:
            for info in artifact.tensors[part::4]:
                results[info.name] = reader.float32(info)
                reader.release(info)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results.keys() == serial.keys()
    assert all(torch.equal(results[n], serial[n]) for n in serial)


def test_metadata_is_shown_and_the_vocabulary_summarised(gguf_files: dict[tuple[str, str], Path]) -> None:
    artifact = resolve(gguf_files[("qwen2", "Q8_0")])
    metadata = artifact.metadata["qwen2-Q8_0.gguf"]
    assert metadata["general.architecture"] == "qwen2"
    assert metadata["tokenizer.ggml.tokens"] == "[512 x string]"
    assert metadata["GGUF.version"] == "3"


def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def test_general_type_model_is_accepted(tmp_path: Path) -> None:
    artifact = resolve(_write(tmp_path / "m.gguf", tiny_llama(extra_kvs=[kv_str("general.type", "model")])))
    assert artifact.config is not None and artifact.config["model_type"] == "llama"


def test_the_vocabulary_is_exposed_for_the_sketch(gguf_files: dict[tuple[str, str], Path]) -> None:
    artifact = resolve(gguf_files[("llama", "Q8_0")])
    assert artifact.vocabulary is not None and len(artifact.vocabulary) == 512
    assert artifact.vocabulary[:2] == (b"<t0>", b"<t1>")
    assert resolve(gguf_files[("llama", "F32")]).vocabulary == artifact.vocabulary


def test_raw_computes_a_quantised_tensor_once_until_released(gguf_files: dict[tuple[str, str], Path]) -> None:
    artifact = resolve(gguf_files[("llama", "Q4_0")])
    info = artifact.tensor("model.embed_tokens.weight")
    with open_reader(artifact) as reader:
        first = reader.raw(info)
        assert reader.raw(info) is first  # slicing raw(info)[a:b] block by block dequantises once
        copy = reader.float32(info)
        assert torch.equal(copy, first) and copy.data_ptr() != first.data_ptr()
        ids = torch.arange(100, 164)
        assert torch.equal(reader.rows(info, ids), first[ids])
        reader.release(info)
        again = reader.raw(info)
        assert again is not first and torch.equal(again, first)
