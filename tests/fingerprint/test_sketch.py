"""The lineage sketch builder: probe choice, unit values, determinism, layout independence, size bound."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tg_verify.artifact import TensorReader, resolve
from tg_verify.errors import UsageError
from tg_verify.fingerprint.sketch import (
    GLOBAL_ROLES,
    LAYER_ROLES,
    MAX_LAYERS,
    SketchBuilder,
    layer_budget,
    normalise,
    probe_ids,
)
from tg_verify.tiny import build_model, save_model


def sketch_of(path: Path, **settings: int) -> dict:
    artifact = resolve(path)
    with TensorReader(artifact) as reader:
        builder = SketchBuilder(artifact, reader, settings)
        for info, weight in reader.stream():
            builder.add(info, weight)
        return builder.finish()


def decode(unit: dict, k: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(unit["data"]), dtype="<f2").astype(np.float32).reshape(k, k)


@given(st.integers(16, 300_000), st.integers(1, 100_000), st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_probe_is_a_nested_bottom_k_sample(vocab: int, extra: int, seed: int) -> None:
    small, grown = probe_ids(vocab, 32, seed), probe_ids(vocab + extra, 32, seed)
    assert len(small) == min(32, vocab) and np.all(np.diff(small) > 0) and small.min() >= 0 and small.max() < vocab
    # every probe id of the grown vocabulary that existed before was already in the old probe
    assert set(grown[grown < vocab].tolist()) <= set(small.tolist())
    assert np.array_equal(small, probe_ids(vocab, 32, seed))


def test_probe_depends_on_seed() -> None:
    assert not np.array_equal(probe_ids(50_000, 32, 0), probe_ids(50_000, 32, 1))


def test_same_sketch_from_every_layout(tiny_models: dict[str, dict[str, Path]], arch: str) -> None:
    sketches = [sketch_of(path) for path in tiny_models[arch].values()]
    assert all(s == sketches[0] for s in sketches[1:])
    roles = {(u["role"], u["layer"]) for u in sketches[0]["units"]}
    assert roles == {(r, None) for r in GLOBAL_ROLES} | {(r, i) for r in LAYER_ROLES for i in (0, 1)}
    assert sketches[0]["notes"] == [] and sketches[0]["layers"] == [0, 1]
    assert json.loads(json.dumps(sketches[0])) == sketches[0]


def test_units_equal_a_direct_computation(tiny_models: dict[str, dict[str, Path]],
                                          tiny_model_objects: dict[str, torch.nn.Module]) -> None:
    """The llama units, recomputed here from the module's weights by the definitions in docs/lineage.md."""
    sketch = sketch_of(tiny_models["llama"]["single"])
    model = tiny_model_objects["llama"]
    k = sketch["probe"]["tokens"]
    ids = torch.tensor(sketch["probe"]["ids"])
    probe = model.model.embed_tokens.weight.detach()[ids]
    probe = probe / probe.norm(dim=1, keepdim=True)
    layer = model.model.layers[1]
    gain_attn = layer.input_layernorm.weight.detach()
    gain_mlp = layer.post_attention_layernorm.weight.detach()
    heads, kv, hd = 4, 2, 16
    q = (layer.self_attn.q_proj.weight.detach() @ (probe * gain_attn).T).reshape(heads, hd, k)
    kk = (layer.self_attn.k_proj.weight.detach() @ (probe * gain_attn).T).reshape(kv, hd, k)
    v = (layer.self_attn.v_proj.weight.detach() @ (probe * gain_attn).T).reshape(kv, hd, k)
    o = (probe @ layer.self_attn.o_proj.weight.detach()).reshape(k, heads, hd)
    qk = sum(q[h].T @ kk[h // 2] for h in range(heads))
    ov = sum(o[:, h] @ v[h // 2] for h in range(heads))
    gate = layer.mlp.gate_proj.weight.detach() @ (probe * gain_mlp).T
    ud = (probe @ layer.mlp.down_proj.weight.detach()) @ (layer.mlp.up_proj.weight.detach() @ (probe * gain_mlp).T)
    head = model.lm_head.weight.detach() @ (probe * model.model.norm.weight.detach()).T
    expected = {("embed", None): normalise(probe @ probe.T, True), ("head", None): normalise(head.T @ head, True),
                ("attn_qk", 1): normalise(qk, False), ("attn_ov", 1): normalise(ov, False),
                ("mlp_gate", 1): normalise(gate.T @ gate, True), ("mlp_ud", 1): normalise(ud, False)}
    units = {(u["role"], u["layer"]): decode(u, k) for u in sketch["units"]}
    for key, matrix in expected.items():
        assert np.allclose(units[key], matrix.numpy(), atol=2e-3, rtol=2e-3), key


def test_tied_head_uses_the_embedding(tiny_models: dict[str, dict[str, Path]]) -> None:
    sketch = sketch_of(tiny_models["gemma"]["single"])  # gemma ties lm_head to the embedding
    assert "head" in {u["role"] for u in sketch["units"]}


def test_deterministic_and_settable(tiny_models: dict[str, dict[str, Path]]) -> None:
    path = tiny_models["qwen2"]["single"]
    assert sketch_of(path) == sketch_of(path)
    small = sketch_of(path, sketch_tokens=16, sketch_seed=5)
    assert small["probe"]["tokens"] == 16 and small["probe"]["seed"] == 5
    assert len(base64.b64decode(small["units"][0]["data"])) == 2 * 16 * 16
    with pytest.raises(UsageError, match="sketch_tokens"):
        sketch_of(path, sketch_tokens=200)


def test_size_stays_under_four_megabytes_for_deep_models(tmp_path: Path) -> None:
    """The largest probe (k=64) on a model deeper than its layer budget; the default k=32 keeps 256 layers."""
    assert layer_budget(32) == MAX_LAYERS and layer_budget(64) < 90
    deep = build_model("llama", hidden_size=16, intermediate_size=16, num_hidden_layers=90, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=256)
    sketch = sketch_of(save_model(deep, tmp_path / "deep"), sketch_tokens=64)
    assert len(sketch["layers"]) == layer_budget(64)
    assert sketch["layers"][0] == 0 and sketch["layers"][-1] == 89  # evenly spaced, ends kept
    assert any("evenly spaced" in note for note in sketch["notes"])
    assert len(json.dumps(sketch)) < 4_000_000


def test_no_embedding_gives_an_empty_sketch_with_a_note(tmp_path: Path) -> None:
    save_file({"encoder.block.weight": torch.randn(8, 8)}, str(tmp_path / "model.safetensors"))
    sketch = sketch_of(tmp_path)
    assert sketch["units"] == [] and "no token embedding" in sketch["notes"][0]


def test_probes_name_the_products_each_tensor_feeds(tiny_models: dict[str, dict[str, Path]]) -> None:
    """Input-side projections and the head take a right probe, o/down a left one, everything else none."""
    from tg_verify.errors import InternalError

    artifact = resolve(tiny_models["llama"]["single"])
    with TensorReader(artifact) as reader:
        builder = SketchBuilder(artifact, reader, None)
    by_leaf = {info.name.split(".")[-2]: info for info in artifact.tensors}
    k, width = builder.k, builder.width
    for leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"):
        right = builder.right_probe(by_leaf[leaf])
        assert right is not None and right.shape == (k, width) and builder.left_probe(by_leaf[leaf]) is None
    head_rows = builder.right_rows(by_leaf["lm_head"])  # the head's nested token sample, here all 512 rows
    assert head_rows is not None and torch.equal(head_rows, torch.arange(by_leaf["lm_head"].shape[0]))
    assert builder.right_rows(by_leaf["q_proj"]) is None
    for leaf in ("o_proj", "down_proj"):
        left = builder.left_probe(by_leaf[leaf])
        assert left is not None and left.shape == (k, width) and builder.right_probe(by_leaf[leaf]) is None
    for leaf in ("embed_tokens", "input_layernorm"):  # untied embedding; norms are read up front
        assert builder.right_probe(by_leaf[leaf]) is None and builder.left_probe(by_leaf[leaf]) is None
    with pytest.raises(InternalError, match="o_proj"):
        builder.add_products(by_leaf["o_proj"], right=torch.zeros(width, k))
