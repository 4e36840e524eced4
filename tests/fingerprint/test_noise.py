"""The seeded inputs and the five noise strategies, as docs/method.md defines them."""

from __future__ import annotations

import numpy as np
import torch

from tg_verify.fingerprint import noise
from tg_verify.fingerprint.settings import NOISE_STRATEGIES, FingerprintSettings

WIDTH = 96


def _spectrum_support(signal: np.ndarray) -> np.ndarray:
    """Indices of the rFFT bins that carry energy in any row (above float32 rounding)."""
    power = np.abs(np.fft.rfft(signal, axis=-1)).max(axis=0)
    return np.flatnonzero(power > 1e-4 * power.max())  # float32 inputs: rounding leaks ~1e-6 into empty bins


def test_base_inputs_are_standard_normal_and_independent_per_repeat():
    x = noise.base_inputs(FingerprintSettings(repeats=400), "w", 500)
    assert x.shape == (400, 500)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    # repeats are independent draws, not one input re-used (the release's accident)
    assert len({row.tobytes() for row in x}) == 400
    assert abs(np.corrcoef(x[0], x[1])[0, 1]) < 0.2


def test_repeat_prefix_is_stable():
    """Repeat r's input does not depend on how many repeats are taken."""
    few = noise.base_inputs(FingerprintSettings(repeats=5), "w", WIDTH)
    many = noise.base_inputs(FingerprintSettings(repeats=30), "w", WIDTH)
    np.testing.assert_array_equal(few, many[:5])
    np.testing.assert_array_equal(noise.additive_noise(FingerprintSettings(repeats=5), "w", "gaussian", WIDTH),
                                  noise.additive_noise(FingerprintSettings(repeats=30), "w", "gaussian", WIDTH)[:5])


def test_draws_depend_on_seed_and_name_only():
    a = noise.base_inputs(FingerprintSettings(seed=1), "layers.0.q", WIDTH)
    assert np.array_equal(a, noise.base_inputs(FingerprintSettings(seed=1), "layers.0.q", WIDTH))
    assert not np.array_equal(a, noise.base_inputs(FingerprintSettings(seed=2), "layers.0.q", WIDTH))
    assert not np.array_equal(a, noise.base_inputs(FingerprintSettings(seed=1), "layers.1.q", WIDTH))


def test_random_strategy_is_drawn_per_tensor_from_seed_and_name():
    settings = FingerprintSettings()
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(200)]
    drawn = [noise.strategy_for(settings, n) for n in names]
    assert drawn == [noise.strategy_for(settings, n) for n in reversed(names)][::-1]  # order-free
    counts = {s: drawn.count(s) for s in NOISE_STRATEGIES}
    assert set(counts) == set(NOISE_STRATEGIES) and min(counts.values()) > 20  # all five, roughly uniform
    assert drawn != [noise.strategy_for(FingerprintSettings(seed=9), n) for n in names]
    assert noise.strategy_for(FingerprintSettings(strategy="gaussian"), names[0]) == "gaussian"


def test_gaussian_noise_is_scaled_standard_normal():
    settings = FingerprintSettings(repeats=200)
    added = noise.additive_noise(settings, "w", "gaussian", 400)
    assert abs(added.std() - 0.1) < 0.002
    np.testing.assert_allclose(added, 0.1 * noise.standard_normal(noise.stream(0, "w", "noise"), 200, 400), rtol=1e-6)


def test_structural_keeps_the_lowest_quarter_of_the_band_at_unit_scale():
    added = noise.additive_noise(FingerprintSettings(), "w", "structural", WIDTH)
    bins = WIDTH // 2 + 1  # 49
    assert _spectrum_support(added).max() == int(bins * 0.25) - 1
    raw = noise.standard_normal(noise.stream(0, "w", "noise"), 30, WIDTH)
    np.testing.assert_allclose(np.fft.rfft(added)[:, :12], np.fft.rfft(raw)[:, :12], atol=1e-5)


def test_low_frequency_keeps_the_lowest_eighth_scaled():
    added = noise.additive_noise(FingerprintSettings(), "w", "low-frequency", WIDTH)
    assert _spectrum_support(added).max() == int((WIDTH // 2 + 1) * 0.125) - 1
    raw = noise.standard_normal(noise.stream(0, "w", "noise"), 30, WIDTH)
    np.testing.assert_allclose(np.fft.rfft(added)[:, :6], 0.1 * np.fft.rfft(raw)[:, :6], atol=1e-6)


def test_high_frequency_keeps_the_upper_half_scaled():
    added = noise.additive_noise(FingerprintSettings(), "w", "high-frequency", WIDTH)
    bins = WIDTH // 2 + 1
    support = _spectrum_support(added)
    assert support.min() == bins - int(bins * 0.5) and support.max() == bins - 1
    raw = noise.standard_normal(noise.stream(0, "w", "noise"), 30, WIDTH)
    np.testing.assert_allclose(np.fft.rfft(added)[:, support], 0.1 * np.fft.rfft(raw)[:, support], atol=1e-5)


def test_band_never_empty_for_narrow_tensors():
    for width in (1, 2, 3, 5):
        for strategy in ("structural", "low-frequency", "high-frequency"):
            added = noise.additive_noise(FingerprintSettings(repeats=2), "w", strategy, width)
            assert added.shape == (2, width) and np.isfinite(added).all() and np.abs(added).max() > 0


def test_fgsm_closed_form_equals_autograd_cross_entropy():
    torch.manual_seed(0)
    weight = torch.randn(40, 24, dtype=torch.float64)
    settings = FingerprintSettings(repeats=6)
    x0 = noise.base_inputs(settings, "w", 24).astype(np.float64)
    targets = noise.pseudo_targets(settings, "w", 40)
    assert targets.min() >= 0 and targets.max() < 40
    closed = noise.softmax_minus_onehot(x0 @ weight.numpy().T, targets) @ weight.numpy()
    x = torch.from_numpy(x0).requires_grad_(True)
    torch.nn.functional.cross_entropy(x @ weight.T, torch.from_numpy(targets), reduction="sum").backward()
    np.testing.assert_allclose(closed, x.grad.numpy(), rtol=1e-10, atol=1e-12)
    adversarial = noise.fgsm(x0, closed, settings.epsilon)
    np.testing.assert_allclose(np.abs(adversarial - x0), settings.epsilon)


def test_normals_do_not_depend_on_library_samplers():
    """Box-Muller over the raw Philox stream (24-bit halves of one draw per pair), not a NumPy sampler."""
    values = noise.standard_normal(noise.stream(0, "pin", "x0"), 1, 4)[0]
    raw = noise.stream(0, "pin", "x0").bit_generator.random_raw(2)
    top = (raw >> np.uint64(40)).astype(np.float64)
    angle = 2 * np.pi * ((raw >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) / 2 ** 24
    radius = np.sqrt(-2 * np.log((2 ** 24 - top) / 2 ** 24))
    expected = np.array([radius[0] * np.cos(angle[0]), radius[0] * np.sin(angle[0]),
                         radius[1] * np.cos(angle[1]), radius[1] * np.sin(angle[1])])
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)  # float32 evaluation of the same draw


def test_normal_tails_are_finite_and_bounded():
    """The largest 24-bit draw gives radius sqrt(2 * 24 ln 2) ~ 5.77, never ln 0 or infinity."""
    values = noise.standard_normal(noise.stream(3, "tails", "x0"), 200, 5000)
    assert np.isfinite(values).all() and np.abs(values).max() <= np.sqrt(2 * 24 * np.log(2)) + 1e-5
    assert np.abs(values).max() > 4.0  # the tail is reached, not clipped at a few sigma
