"""The lineage sketch builder: mixture probe, keys, unit values, determinism, layout independence, size bound."""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path
from typing import Any

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
    HEAD_ROWS,
    LAYER_ROLES,
    MAX_LAYERS,
    SketchBuilder,
    flatten_probe,
    flatten_start,
    layer_budget,
    mixture_coefficients,
    normalise,
    probe_ids,
    sketch_units,
    smallest_keys,
    unit_rows,
)
from tg_verify.fingerprint.tokens import id_keys, tokenizer_keys
from tg_verify.tiny import build_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.lineage import write_tokenizer  # noqa: E402
from bench.transforms import from_model, redraw_rows, relabel  # noqa: E402

TABLE = np.full(65536 + 256, -1, dtype=np.int64)
TABLE[65536:65536 + 256] = np.arange(256)  # byte tokens 0..255
TABLE[np.arange(256) * 256 + 32] = 256 + np.arange(256)  # "x " pairs: 256..511


def sketch_of(path: Path, **settings: int) -> dict:
    artifact = resolve(path)
    with TensorReader(artifact) as reader:
        builder = SketchBuilder(artifact, reader, settings)
        for info, weight in reader.stream():
            builder.add(info, weight)
        return builder.finish()


def decode(unit: dict, k: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(unit["data"]), dtype="<f2").astype(np.float32).reshape(k, k)


def units_of(sketch: dict) -> dict:
    k = sketch["probe"]["mixtures"]
    return {(u["role"], u["layer"]): decode(u, k) for u in sketch["units"]}


@given(st.integers(16, 300_000), st.integers(1, 100_000), st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_tgs1_probe_ids_are_a_nested_bottom_k_sample(vocab: int, extra: int, seed: int) -> None:
    """tgs1's public probe, kept so the benches can re-draw exactly those rows."""
    small, grown = probe_ids(vocab, 32, seed), probe_ids(vocab + extra, 32, seed)
    assert len(small) == min(32, vocab) and np.all(np.diff(small) > 0) and small.min() >= 0 and small.max() < vocab
    assert set(grown[grown < vocab].tolist()) <= set(small.tolist())


def test_mixture_coefficients_depend_on_the_key_alone() -> None:
    keys = id_keys(20_000).keys
    c = mixture_coefficients(keys, 32, 0)
    assert c.shape == (32, 20_000)
    assert set(np.unique(c).tolist()) == {-1.0, 1.0} and abs(c.mean()) < 0.01  # random signs
    order = np.random.default_rng(0).permutation(20_000)
    assert np.array_equal(mixture_coefficients(keys[order], 32, 0), c[:, order])  # where a key sits does not matter
    assert np.array_equal(mixture_coefficients(keys, 16, 0), c[:16])  # nested in k
    assert not np.allclose(mixture_coefficients(keys, 32, 1), c)
    assert abs(np.corrcoef(c)[np.triu_indices(32, 1)]).max() < 0.05  # independent mixtures


def test_head_rows_are_the_smallest_keys_and_nested() -> None:
    small, grown = id_keys(10_000), id_keys(14_000)
    rows_small, rows_grown = smallest_keys(small, HEAD_ROWS), smallest_keys(grown, HEAD_ROWS)
    assert len(rows_small) == HEAD_ROWS and np.all(np.diff(rows_small) > 0)
    assert set(rows_grown[rows_grown < 10_000].tolist()) <= set(rows_small.tolist())


def test_same_sketch_from_every_layout(tiny_models: dict[str, dict[str, Path]], arch: str) -> None:
    sketches = [sketch_of(path) for path in tiny_models[arch].values()]
    assert all(s == sketches[0] for s in sketches[1:])
    roles = {(u["role"], u["layer"]) for u in sketches[0]["units"]}
    assert roles == {(r, None) for r in GLOBAL_ROLES} | {(r, i) for r in LAYER_ROLES for i in (0, 1)}
    assert sketches[0]["notes"] == [] and sketches[0]["layers"] == [0, 1]
    assert sketches[0]["probe"]["keys"] == "ids" and sketches[0]["probe"]["keyed_rows"] == 512
    assert sketches[0]["architecture"]["model_type"] == arch and sketches[0]["architecture"]["layers"] == 2
    assert json.loads(json.dumps(sketches[0])) == sketches[0]


def test_units_equal_a_direct_computation(tiny_models: dict[str, dict[str, Path]],
                                          tiny_model_objects: dict[str, torch.nn.Module]) -> None:
    """The llama units, recomputed here from the module's weights by the definitions in docs/lineage.md."""
    sketch = sketch_of(tiny_models["llama"]["single"])
    model = tiny_model_objects["llama"]
    k = sketch["probe"]["mixtures"]
    embedding = model.model.embed_tokens.weight.detach().double()
    coefficients = torch.from_numpy(mixture_coefficients(id_keys(512).keys, k, 0))
    rows = unit_rows(embedding)
    mixtures = unit_rows(coefficients @ rows)
    # flattened: the 32 leading principal directions of the rows' covariance scaled to the bulk (exact eigenvectors
    # here; the sketch estimates them by a few subspace iterations, hence the looser tolerance below)
    values, vectors = torch.linalg.eigh(rows.T @ rows / 512)
    lam, directions = values.flip(0)[:32], vectors.flip(1)[:, :32]
    bulk = (1 - lam.sum()) / (64 - 32)
    flat = mixtures / bulk.sqrt() + ((mixtures @ directions) * (lam.rsqrt() - bulk.rsqrt())) @ directions.T
    probe = unit_rows(flat).float()
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
    units = units_of(sketch)
    for key, matrix in expected.items():
        assert np.allclose(units[key], matrix.numpy(), atol=3e-2, rtol=3e-2), key
        assert np.corrcoef(units[key].ravel(), matrix.numpy().ravel())[0, 1] > 0.999, key


def test_flattening_converges_to_the_exact_one_and_turns_with_the_residual_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """flatten_probe is the embedding's leading directions scaled to the bulk (exact in the limit of iterations),
    gives the same probe whatever the order of the rows, and rotates with the residual stream."""
    from tg_verify.fingerprint import sketch as sketch_module

    generator = torch.Generator().manual_seed(0)
    rows = unit_rows(torch.randn(400, 48, generator=generator, dtype=torch.float64)
                     @ torch.diag(torch.linspace(4, 0.5, 48, dtype=torch.float64)))
    keys = id_keys(400).keys
    start = flatten_start(keys, 48)
    probe = unit_rows(torch.from_numpy(mixture_coefficients(keys, 16, 3)) @ rows)
    monkeypatch.setattr(sketch_module, "FLATTEN_ITERATIONS", 200)
    values, vectors = torch.linalg.eigh(rows.T @ rows / 400)
    lam, directions = values.flip(0)[:24], vectors.flip(1)[:, :24]
    bulk = (1 - lam.sum()) / 24
    exact = unit_rows(probe / bulk.sqrt() + ((probe @ directions) * (lam.rsqrt() - bulk.rsqrt())) @ directions.T)
    assert torch.allclose(flatten_probe(probe, rows, start), exact, atol=2e-6)  # float32 inside
    monkeypatch.undo()
    flat = flatten_probe(probe, rows, start)
    order = torch.randperm(400, generator=generator)
    assert torch.allclose(flatten_probe(probe, rows[order], start[order]), flat, atol=2e-6)
    rotation, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    assert torch.allclose(flatten_probe(probe @ rotation, rows @ rotation, start), flat @ rotation, atol=2e-6)
    # the probe no longer lies along the leading directions: its share there falls to about the bulk's
    share = lambda p: float((p @ directions).pow(2).sum() / p.pow(2).sum())  # noqa: E731
    assert share(probe) > 0.8 and share(flat) < 0.7


@pytest.mark.parametrize("name", ["llama", "phi3", "gemma"])  # split, fused, tied with 1 + w gains
def test_sketch_units_from_live_parameters_equal_the_fingerprint(name: str, tiny_models: dict[str, dict[str, Path]],
                                                                 tiny_model_objects: dict[str, torch.nn.Module]
                                                                 ) -> None:
    model = tiny_model_objects[name]
    recorded = units_of(sketch_of(tiny_models[name]["single"]))
    state = dict(model.named_parameters())
    live = sketch_units(state, model.config.to_dict())
    assert set(live) == set(recorded)
    for key, unit in live.items():
        assert np.allclose(unit.detach().numpy(), recorded[key], atol=2e-3, rtol=2e-3), key
    # gradients reach the weights through every unit
    loss = sum(unit.pow(2).sum() for key, unit in live.items() if key[0] != "embed")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.layers.0.mlp.down_proj.weight"] is not None
    assert float(grads["model.embed_tokens.weight"].abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_relabelled_vocabulary_with_its_tokenizer_gives_the_same_sketch(tmp_path: Path) -> None:
    """Token texts key the probe: moving every row to another id, tokenizer rewritten to match, changes no unit."""
    ck = from_model(build_model("llama", seed=3))
    base_dir = ck.save(tmp_path / "base")
    write_tokenizer(base_dir, TABLE)
    order = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    moved_dir = relabel(ck, order).save(tmp_path / "moved")
    write_tokenizer(moved_dir, TABLE, order=order.numpy())
    base, moved = sketch_of(base_dir), sketch_of(moved_dir)
    assert base["probe"]["keys"] == moved["probe"]["keys"] == "strings"
    assert base["probe"]["key_sample"] == moved["probe"]["key_sample"]
    for key, unit in units_of(base).items():
        assert np.allclose(units_of(moved)[key], unit, atol=2e-3), key
    # the same relabelling without a tokenizer moves the probe
    (moved_dir / "tokenizer.json").unlink()
    bare = sketch_of(moved_dir)
    assert bare["probe"]["keys"] == "ids"
    assert not np.allclose(units_of(bare)[("mlp_gate", 1)], units_of(base)[("mlp_gate", 1)], atol=0.05)


def test_live_units_take_the_tokenizer_keys(tmp_path: Path) -> None:
    model = build_model("llama", seed=3)
    directory = save_model(model, tmp_path / "m")
    path = write_tokenizer(directory, TABLE)
    live = sketch_units(dict(model.named_parameters()), model.config.to_dict(), tokenizer_keys(path, 512))
    for key, unit in units_of(sketch_of(directory)).items():
        assert np.allclose(live[key].detach().numpy(), unit, atol=2e-3), key


def probe_of(path: Path) -> torch.Tensor:
    artifact = resolve(path)
    with TensorReader(artifact) as reader:
        probe = SketchBuilder(artifact, reader, None).probe
    assert probe is not None
    return probe


def test_re_drawn_rows_move_the_probe_little(tmp_path: Path, trained_zoo: Any) -> None:
    """No small set of rows carries the probe of a trained model: with a fraction f of the rows re-drawn, each
    mixture keeps a cosine of about 1 - f with its old direction (tgs1's probe lost all of its 32 rows to this
    attack)."""
    ck = trained_zoo.bases["llama"]
    base = probe_of(ck.save(tmp_path / "base"))
    for name, ids in (("tgs1-probe", probe_ids(512, 32, 0).tolist()), ("quarter", list(range(0, 512, 4)))):
        moved = probe_of(redraw_rows(ck, ids, 1).save(tmp_path / name))
        cosines = (base * moved).sum(dim=1)
        expected = 1 - len(ids) / 512
        assert float(cosines.min()) > expected - 0.2 and abs(float(cosines.mean()) - expected) < 0.05, cosines


def test_tied_head_uses_the_embedding(tiny_models: dict[str, dict[str, Path]]) -> None:
    sketch = sketch_of(tiny_models["gemma"]["single"])  # gemma ties lm_head to the embedding
    assert "head" in {u["role"] for u in sketch["units"]}


def test_deterministic_and_settable(tiny_models: dict[str, dict[str, Path]]) -> None:
    path = tiny_models["qwen2"]["single"]
    assert sketch_of(path) == sketch_of(path)
    small = sketch_of(path, sketch_tokens=16, sketch_seed=5)
    assert small["probe"]["mixtures"] == 16 and small["probe"]["seed"] == 5
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
    head_rows = builder.right_rows(by_leaf["lm_head"])  # the head's token sample, here all 512 rows
    assert head_rows is not None and torch.equal(head_rows, torch.arange(by_leaf["lm_head"].shape[0]))
    assert builder.right_rows(by_leaf["q_proj"]) is None
    for leaf in ("o_proj", "down_proj"):
        left = builder.left_probe(by_leaf[leaf])
        assert left is not None and left.shape == (k, width) and builder.right_probe(by_leaf[leaf]) is None
    for leaf in ("embed_tokens", "input_layernorm"):  # untied embedding; norms are read up front
        assert builder.right_probe(by_leaf[leaf]) is None and builder.left_probe(by_leaf[leaf]) is None
    with pytest.raises(InternalError, match="o_proj"):
        builder.add_products(by_leaf["o_proj"], right=torch.zeros(width, k))


def test_non_finite_embedding_is_refused(tmp_path: Path) -> None:
    from tg_verify.errors import WeightValueError

    model = build_model("llama", seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 3] = float("nan")
    with pytest.raises(WeightValueError, match="embed_tokens") as caught:
        sketch_of(save_model(model, tmp_path / "nan"))
    assert caught.value.file is not None and Path(caught.value.file).is_file()  # names the weights file


def test_private_sketch_seed_is_a_setting_that_changes_only_the_sketch(tiny_models: dict[str, dict[str, Path]]) -> None:
    from tg_verify.analysis.lineage import lineage_test
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    artifact = resolve(tiny_models["llama"]["single"])
    public = fingerprint_artifact(artifact, FingerprintSettings(repeats=4))
    private = fingerprint_artifact(artifact, FingerprintSettings(repeats=4, sketch_seed=123456))
    assert private.features == public.features and "sketch_seed" not in public.settings
    assert private.settings["sketch_seed"] == 123456 and private.sketch["probe"]["seed"] == 123456
    assert FingerprintSettings(repeats=4).compatible_with(private.settings)
    assert lineage_test(private, private).derived
    mixed = lineage_test(private, public)  # one probe, or no comparison of the sketches; the blocks have no seed
    assert math.isnan(mixed.score) and any("probes differ" in n for n in mixed.notes)
    assert mixed.evidence == "blocks" and private.blocks == public.blocks
    with pytest.raises(UsageError, match="sketch_seed"):
        FingerprintSettings(sketch_seed=-1)
