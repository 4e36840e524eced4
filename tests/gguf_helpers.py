"""GGUF files for tests, written in-process with the gguf package's own writer (valid by construction)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_gguf(path: Path, arch: str, metadata: dict[str, int | float | str],
               tensors: dict[str, np.ndarray | tuple[np.ndarray, str]]) -> Path:
    """One GGUF file: `metadata` keys without the `{arch}.` prefix get it; a tensor is a float32/float16 array
    (its ne is the reverse of the numpy shape) or (packed uint8 blocks, ggml type name)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        full = key if key.startswith(("general.", "tokenizer.", "split.")) else f"{arch}.{key}"
        if isinstance(value, str):
            writer.add_string(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            data, qtype = value
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dense_metadata(width: int, heads: int, kv_heads: int, layers: int, ff: int) -> dict[str, int | float | str]:
    return {"block_count": layers, "embedding_length": width, "feed_forward_length": ff,
            "attention.head_count": heads, "attention.head_count_kv": kv_heads, "context_length": 128,
            "attention.layer_norm_rms_epsilon": 1e-5}


def random_blocks(rows: int, row: int, qtype: str, seed: int = 0) -> np.ndarray:
    """`rows` rows of `row` elements of ggml type `qtype` as random packed bytes (any bytes are a valid block)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    generator = np.random.default_rng(seed)
    return generator.integers(0, 256, size=(rows, row // block * size), dtype=np.uint8)


def converter_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter Q/K row permutation (written independently of tg_verify's inverse)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_from_directory(directory: Path, path: Path, qtype: str = "F32") -> Path:
    """Convert a saved tiny HF model (config.json + model.safetensors) to GGUF with tg_verify.tiny.save_gguf."""
    import transformers
    from safetensors.torch import load_file

    from tg_verify.tiny import save_gguf

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return save_gguf(model.eval(), path, qtype)


def with_extra_tensors(source: Path, path: Path, extra: dict[str, np.ndarray]) -> Path:
    """`source` rewritten by gguf's writer with the same metadata and tensors, plus `extra` float tensors
    (what a supplier who adds tensors no runtime loads would ship)."""
    reader = gguf.GGUFReader(str(source))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        plain = tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=None if plain else tensor.tensor_type)
    for name, value in extra.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
