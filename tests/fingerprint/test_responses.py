"""ResponseEngine: the whole-tensor (device) path agrees with the blocked CPU path, run here on the CPU."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from tg_verify.artifact import TensorReader, resolve
from tg_verify.fingerprint import extract, responses
from tg_verify.fingerprint.extract import fingerprint_artifact, gradient_response_and_products
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.fingerprint.sketch import SketchBuilder
from tg_verify.tiny import ARCHITECTURES

CPU = torch.device("cpu")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_whole_tensor_path_gives_the_blocked_products(arch, tiny_models, monkeypatch):
    """Every matrix, every strategy drawn, sketch products included; 64-element blocks make long block sums."""
    monkeypatch.setattr(responses, "BLOCK_ELEMENTS", 64)
    artifact = resolve(tiny_models[arch]["single"])
    settings = FingerprintSettings(repeats=6)
    matrices = [info for info in artifact.tensors if extract.analysis_kind(info) == "gradient"]
    capacity = max(info.numel for info in matrices)
    with TensorReader(artifact) as reader:
        builder = SketchBuilder(artifact, reader, settings)
        engines = {"blocked": responses.ResponseEngine(CPU, capacity),
                   "whole": responses.ResponseEngine(CPU, capacity, whole=True)}
        seen: set[str] = set()
        for info in matrices:
            strategy = extract.noise.strategy_for(settings, info.name)
            seen.add(strategy)
            probes = builder.right_probe(info), builder.left_probe(info), builder.right_rows(info)
            got = {}
            for name, engine in engines.items():
                engine.load(reader.raw(info))
                got[name] = gradient_response_and_products(engine, reader, info, settings, strategy, *probes)
                engine.unload()
            (xb, ob, rb, lb), (xw, ow, rw, lw) = got["blocked"], got["whole"]
            if strategy != "adversarial":
                np.testing.assert_array_equal(xb, xw)
            else:  # a sign of a near-zero input-gradient coordinate may differ with the summation order
                assert np.mean(xb != xw) < 0.01
            np.testing.assert_allclose(ow, ob, rtol=1e-4, atol=1e-5 * np.abs(ob).max())
            for blocked, whole in ((rb, rw), (lb, lw)):
                assert (blocked is None) == (whole is None)
                if blocked is not None:
                    torch.testing.assert_close(whole, blocked, rtol=1e-4, atol=1e-5 * float(blocked.abs().max()))
    assert "adversarial" in seen and len(seen) >= 3


def test_fingerprint_through_the_whole_tensor_path_matches(tiny_models, monkeypatch):
    """The extractor as it runs with --device cuda (one computing thread, whole tensors), on the CPU."""
    artifact = resolve(tiny_models["llama"]["indexed-shards"])
    settings = FingerprintSettings(repeats=8)
    blocked = fingerprint_artifact(artifact, settings, threads=1)

    class Whole(responses.ResponseEngine):
        def __init__(self, device: torch.device, capacity: int) -> None:
            super().__init__(device, capacity, whole=True)

    monkeypatch.setattr(extract, "ResponseEngine", Whole)
    whole = fingerprint_artifact(artifact, settings, threads=1)
    for name, value in blocked.features.items():
        assert whole.features[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert whole.file_digests == blocked.file_digests
    assert [u["role"] for u in whole.sketch["units"]] == [u["role"] for u in blocked.sketch["units"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it there)")
@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_fingerprint_on_cuda_matches_the_cpus(name, tiny_models):
    """--device cuda for real: the features, the sketch and the block evidence of a tiny model made on the GPU
    agree with the CPU's (float32 both; the GPU sums in its own order), and the file digests are the same."""
    from tg_verify.analysis.blocks import block_score, parse_blocks

    artifact = resolve(tiny_models[name]["indexed-shards"])
    cpu = fingerprint_artifact(artifact, FingerprintSettings(repeats=8, device="cpu"), threads=1)
    cuda = fingerprint_artifact(artifact, FingerprintSettings(repeats=8, device="cuda"))
    for feature, value in cpu.features.items():
        assert cuda.features[feature] == pytest.approx(value, rel=1e-4, abs=1e-7), feature
    assert cuda.file_digests == cpu.file_digests
    mine = {(u["role"], u["layer"]): np.frombuffer(base64.b64decode(u["data"]), "<f2") for u in cuda.sketch["units"]}
    theirs = {(u["role"], u["layer"]): np.frombuffer(base64.b64decode(u["data"]), "<f2") for u in cpu.sketch["units"]}
    assert mine.keys() == theirs.keys()
    assert all(np.abs(mine[k].astype(np.float32) - theirs[k].astype(np.float32)).max() < 2e-3 for k in mine)
    assert cpu.blocks is not None and cuda.blocks is not None
    result = block_score(parse_blocks(cuda.blocks, "cuda"), parse_blocks(cpu.blocks, "cpu"))
    assert result.score is not None and result.score > 0.999


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_project_gives_both_products_without_responses(whole, dtype, monkeypatch):
    """`project` (the block evidence's MLP read): W right and left W of the stored weight, blocked or whole, equal to
    the products of its float32 copy; 100-element blocks over 37-wide rows leave a partial last block."""
    monkeypatch.setattr(responses, "BLOCK_ELEMENTS", 100)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn((53, 37), generator=generator).to(dtype)
    right, left = torch.randn((37, 5), generator=generator), torch.randn((4, 53), generator=generator)
    engine = responses.ResponseEngine(CPU, weight.numel(), whole=whole)
    engine.load(weight)
    got_right, got_left = engine.project(right, left)
    assert engine.project(None, None) == (None, None)
    exact = weight.double()
    assert got_right is not None and got_left is not None
    torch.testing.assert_close(got_right.double(), exact @ right.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_left.double(), left.double() @ exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("whole", [False, True])
def test_a_left_probe_per_expert_multiplies_each_experts_rows_alone(whole, monkeypatch):
    """`left_groups`: a 3-D tensor of 5 experts [5, 12, 7] taken as 60 rows; left [k, 12] multiplies each expert's
    12 rows alone ([5, k, 7]); 40-element blocks (5 rows) cut experts apart and hold two at once."""
    monkeypatch.setattr(responses, "BLOCK_ELEMENTS", 40)
    generator = torch.Generator().manual_seed(4)
    experts = torch.randn((5, 12, 7), generator=generator).to(torch.bfloat16)
    left = torch.randn((3, 12), generator=generator)
    inputs = np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32)
    engine = responses.ResponseEngine(CPU, experts.numel(), whole=whole)
    engine.load(experts)
    got, _, per_expert = engine.respond_and_project(inputs, left=left, left_groups=5)
    assert per_expert is not None and per_expert.shape == (5, 3, 7)
    torch.testing.assert_close(per_expert.double(), left.double() @ experts.double(), rtol=1e-5, atol=1e-5)
    assert np.allclose(got, engine.respond(inputs))
