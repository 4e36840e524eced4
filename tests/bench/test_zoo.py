"""The zoo's reusable derivation functions (the lineage benchmarks build on them too)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.zoo import ZooModel, cast, corpus, fine_tune, int8_roundtrip, lora_merge, reshard, train, write_labels  # noqa: E402
from tg_verify.analysis.references import read_labels  # noqa: E402
from tg_verify.artifact import TensorReader, resolve  # noqa: E402
from tg_verify.tiny import build_model, one_thread, save_model  # noqa: E402


@pytest.fixture()
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    return corpus("pretrain", 20_000)


def test_corpus_parts_are_disjoint_bytes_of_source(text):
    other = corpus("light", 20_000)
    assert text.max() < 256 and len(text) == 20_000
    assert not torch.equal(text[:4096], other[:4096])
    with pytest.raises(ValueError):
        corpus("nope", 10)


@pytest.mark.usefixtures("single_thread")
def test_training_lowers_the_loss_and_is_deterministic(text):
    a, b = build_model("llama", seed=3), build_model("llama", seed=3)
    first = train(a, text, 1, 3e-3, seed=0, batch=4, context=32)
    last = train(a, text, 15, 3e-3, seed=0, batch=4, context=32)
    train(b, text, 1, 3e-3, seed=0, batch=4, context=32)
    train(b, text, 15, 3e-3, seed=0, batch=4, context=32)
    assert last < first
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_fine_tune_and_lora_merge_copy_and_change_weights(text):
    base = build_model("qwen2", seed=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = fine_tune(base, text, 3, 1e-3, seed=0, batch=2, context=16)
    merged = lora_merge(base, text, 3, 1e-2, seed=0, rank=2, batch=2, context=16)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    for derived in (tuned, merged):
        state = derived.state_dict()
        assert set(state) == set(before)
        assert not all(torch.equal(state[k], before[k]) for k in before)


def test_cast_int8_and_reshard(tmp_path):
    base = build_model("mistral", seed=2)
    assert next(cast(base, torch.bfloat16).parameters()).dtype == torch.bfloat16
    quantised = int8_roundtrip(base)
    for (name, p), q in zip(base.named_parameters(), quantised.parameters()):
        if p.ndim >= 2:
            step = p.abs().amax(dim=-1, keepdim=True) / 127
            assert torch.all((p - q).abs() <= step / 2 + 1e-7), name
            assert not torch.equal(p, q)
    single = resolve(save_model(base, tmp_path / "single"))
    sharded = resolve(reshard(base, tmp_path / "sharded"))
    assert sharded.layout == "indexed-shards" and len(sharded.files) > 1
    assert [t.name for t in sharded.tensors] == [t.name for t in single.tensors]  # zip below would stop short
    with TensorReader(single) as a, TensorReader(sharded) as b:
        for x, y in zip(single.tensors, sharded.tensors):
            assert x.name == y.name and torch.equal(a.raw(x), b.raw(y))


def test_labels_file_reads_back(tmp_path):
    models = [ZooModel("llama-small", "llama", None, tmp_path, "base"),
              ZooModel("llama-small-int8", "llama", "llama-small", tmp_path, "int8")]
    labels = read_labels(write_labels(models, tmp_path / "labels.yml"))
    assert labels["llama-small"].base and labels["llama-small-int8"].parent == "llama-small"
