"""The closed form equals the paper's autograd gradient on every tensor kind of the five tiny architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from autograd_reference import assert_close, reference_inputs, reference_statistics

from tg_verify.artifact import resolve
from tg_verify.fingerprint.extract import fingerprint_artifact
from tg_verify.fingerprint.gradient import repeat_statistics, tensor_statistics
from tg_verify.fingerprint.settings import STRATEGY_CHOICES, FingerprintSettings
from tg_verify.tiny import ARCHITECTURES

# Every kind of weight the five tiny architectures hold, by leaf name.
KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
         "embed_tokens", "lm_head"}


@pytest.mark.parametrize("strategy", STRATEGY_CHOICES)
def test_fast_path_equals_autograd_on_every_tensor(strategy, tiny_models, tiny_model_objects):
    # 10 repeats keep the literal backward passes quick; the closed form does not depend on the count.
    settings = FingerprintSettings(strategy=strategy, repeats=10, sketch=False)
    covered = set()
    for arch in ARCHITECTURES:
        fingerprint = fingerprint_artifact(resolve(tiny_models[arch]["single"]), settings)
        state = tiny_model_objects[arch].state_dict()
        for record in fingerprint.tensors:
            if record["analysis"] != "gradient":
                continue
            weight = state[record["name"]].detach().float()
            inputs = reference_inputs(weight, record["name"], settings, record["strategy"])
            expected = reference_statistics(weight, inputs)
            assert_close(record["stats"], expected, f"{arch} {record['name']} ({record['strategy']})")
            covered.add(record["name"].split(".")[-2])
    assert covered >= KINDS, f"tensor kinds not exercised: {KINDS - covered}"


def test_moments_match_a_formed_outer_product():
    rng = np.random.default_rng(7)
    o = rng.normal(size=(4, 37)) + 0.3
    x = rng.normal(size=(4, 23)) ** 3  # skewed, heavy-tailed inputs
    stats, valid = repeat_statistics(o, x)
    assert valid.all()
    for r in range(4):
        g = np.outer(o[r] / np.linalg.norm(o[r]), x[r])
        z = (g - g.mean()) / g.std()
        np.testing.assert_allclose(stats[r], [g.mean(), g.std(), np.linalg.norm(g), (z ** 3).mean(),
                                              (z ** 4).mean() - 3.0], rtol=1e-10, atol=1e-14)


def test_zero_response_repeats_are_excluded_and_all_zero_is_degenerate():
    x = np.random.default_rng(0).normal(size=(3, 8))
    o = np.random.default_rng(1).normal(size=(3, 5))
    o[1] = 0.0
    stats = tensor_statistics(o, x)
    assert stats is not None and stats.repeats == 2 and stats.degenerate_repeats == 1
    expected = tensor_statistics(o[[0, 2]], x[[0, 2]])
    assert stats.to_dict() == expected.to_dict()
    assert tensor_statistics(np.zeros((3, 5)), x) is None


def test_each_statistic_is_the_mean_of_its_own_column_over_valid_repeats():
    """TensorStats' fields are filled by name: mean from the mean column, ..., kurtosis from the kurtosis column."""
    rng = np.random.default_rng(5)
    o = rng.normal(size=(4, 11)) + 0.2
    x = rng.standard_exponential(size=(4, 13))  # skewed inputs: the five columns differ from one another
    o[2] = 0.0
    per_repeat, valid = repeat_statistics(o, x)
    stats = tensor_statistics(o, x)
    assert stats is not None and (stats.repeats, stats.degenerate_repeats) == (3, 1)
    expected = per_repeat[valid].mean(axis=0)
    assert len(set(expected.round(12))) == 5
    np.testing.assert_array_equal([stats.mean, stats.std, stats.norm, stats.skewness, stats.kurtosis], expected)


def test_constant_gradient_is_degenerate_not_nan():
    # A 1x1 weight: G = sign(w)·x has a single entry, so its variance is 0 and shape statistics undefined.
    assert tensor_statistics(np.array([[2.0], [3.0]]), np.array([[0.5], [1.5]])) is None
    stats = tensor_statistics(np.array([[1.0, 2.0]]), np.array([[1.0, 1.0]]))
    assert stats is not None and all(np.isfinite(list(stats.to_dict().values())))


def test_norm_feature_is_the_input_norm():
    """||G||_F = ||x|| whatever the weight (the paper's *_norm depend on the inputs only)."""
    torch.manual_seed(0)
    x = np.random.default_rng(3).normal(size=(5, 16))
    for weight in (torch.randn(9, 16), 100 * torch.randn(9, 16)):
        o = x @ weight.double().numpy().T
        stats, _ = repeat_statistics(o, x)
        np.testing.assert_allclose(stats[:, 2], np.linalg.norm(x, axis=1), rtol=1e-12)
