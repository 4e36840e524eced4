"""RQ2 sensitivity study: the score is the mean Frobenius norm of the real autograd gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tg_verify.analysis.perturbation import STUDY_STRATEGIES, perturbation_study, short_name
from tg_verify.artifact import TensorReader, resolve
from tg_verify.errors import WeightValueError
from tg_verify.fingerprint import noise
from tg_verify.fingerprint.extract import tensor_inputs
from tg_verify.fingerprint.settings import FingerprintSettings

SETTINGS = FingerprintSettings(repeats=6, device="cpu", sketch=False)


@pytest.fixture(scope="module")
def study(tiny_models):
    return perturbation_study(tiny_models["llama"]["single"], SETTINGS)


def test_scores_equal_autograd_frobenius_norms(study, tiny_models):
    """For a weight-independent strategy, the score is mean_r ||d||x_r W^T|| / dW||_F from a real backward pass."""
    artifact = resolve(tiny_models["llama"]["single"])
    info = next(t for t in artifact.tensors if t.name == study.layers[0])
    with TensorReader(artifact) as reader:
        weight = reader.float32(info).clone()
    x = torch.from_numpy(tensor_inputs(SETTINGS, info.name, "gaussian", info.shape[-1]))
    norms = []
    for row in x:
        w = weight.clone().requires_grad_(True)
        (row @ w.T).norm().backward()
        norms.append(float(w.grad.norm()))
    assert study.raw["gaussian"][0] == pytest.approx(np.mean(norms), rel=1e-5)


def test_every_strategy_scores_every_attention_and_mlp_matrix(study):
    assert study.strategies == list(STUDY_STRATEGIES)
    assert set(study.categories) == {"attention", "ffn"}
    assert all(name.endswith(".weight") for name in study.layers)
    for strategy in study.strategies:
        z = np.array(study.zscores[strategy])
        assert len(z) == len(study.layers)
        assert z.mean() == pytest.approx(0.0, abs=1e-9) and z.std() == pytest.approx(1.0)
    assert set(study.drawn.values()) <= set(noise.NOISE_STRATEGIES)
    assert study.variance_ratio["random"] == pytest.approx(1.0)


def test_down_proj_is_most_sensitive_because_it_is_widest(study):
    """||grad||_F = ||x||: the widest input (down_proj, intermediate size) scores highest under every strategy."""
    widest = max(study.input_widths)
    for strategy in study.strategies:
        top = int(np.argmax(study.raw[strategy]))
        assert study.input_widths[top] == widest and "down_proj" in study.layers[top]


def test_max_blocks_and_short_names(tiny_models):
    study = perturbation_study(tiny_models["qwen2"]["single"], SETTINGS, max_blocks=1)
    assert study.short_names and all(name.startswith("0.") for name in study.short_names)
    assert short_name("model.layers.12.mlp.down_proj.weight") == "12.mlp.down_proj"
    assert short_name("lm_head.weight") == "lm_head"


def test_deterministic(study, tiny_models):
    again = perturbation_study(tiny_models["llama"]["single"], SETTINGS)
    assert again.to_dict() == study.to_dict()


def test_a_model_without_attention_or_mlp_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"embed_tokens.weight": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightValueError, match="no attention or MLP"):
        perturbation_study(tmp_path / "model.safetensors", SETTINGS)
