"""Seeded inputs and the five noise strategies of §III-C.2 (what x is, for each tensor and repeat).

Every random draw comes from a Philox stream keyed by sha256(seed, tensor name, purpose), so a
tensor's inputs never depend on which other tensors exist, their order or the shard layout. Normals
come from Box-Muller over the raw 64-bit stream (whose bits NumPy keeps stable across releases),
not from a library sampler whose algorithm may change. Row r of every draw is repeat r, so the
first k repeats are the same whatever `repeats` is.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from tg_verify.fingerprint.settings import NOISE_STRATEGIES, FingerprintSettings

_TWO_PI = 2.0 * math.pi
_UNIT = 2.0 ** -53


def stream(seed: int, name: str, purpose: str) -> np.random.Generator:
    """A Philox generator keyed by (seed, tensor name, purpose): independent, reproducible streams."""
    digest = hashlib.sha256(f"tg-verify/noise\0{seed}\0{name}\0{purpose}".encode()).digest()
    key = int.from_bytes(digest[:16], "little")
    return np.random.Generator(np.random.Philox(key=key))


def uniform(generator: np.random.Generator, count: int) -> np.ndarray:
    """`count` float64 uniforms in [0, 1) from the top 53 bits of the raw stream."""
    raw = generator.bit_generator.random_raw(count)
    return (raw >> np.uint64(11)).astype(np.float64) * _UNIT


def standard_normal(generator: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """[rows, width] float64 standard normals by Box-Muller; row r uses only the r-th slice of the stream."""
    pairs = (width + 1) // 2
    u = uniform(generator, rows * pairs * 2).reshape(rows, pairs, 2)
    radius = np.sqrt(-2.0 * np.log1p(-u[..., 0]))  # 1 - u in (0, 1]: never log(0)
    angle = _TWO_PI * u[..., 1]
    normals = np.stack((radius * np.cos(angle), radius * np.sin(angle)), axis=-1)
    return normals.reshape(rows, pairs * 2)[:, :width]


def strategy_for(settings: FingerprintSettings, name: str) -> str:
    """The noise strategy of a tensor: the fixed one, or for "random" one drawn per tensor from (seed, name)."""
    if settings.strategy != "random":
        return settings.strategy
    draw = int(stream(settings.seed, name, "strategy").bit_generator.random_raw(1)[0])
    return NOISE_STRATEGIES[draw % len(NOISE_STRATEGIES)]


def band_count(width: int, fraction: float) -> int:
    """How many rFFT bins a band of `fraction` of the spectrum holds: at least one, at most all."""
    bins = width // 2 + 1
    return min(bins, max(1, int(math.floor(bins * fraction))))


def band_pass(noise: np.ndarray, fraction: float, side: str) -> np.ndarray:
    """Keep the lowest (side="low") or highest (side="high") `fraction` of each row's rFFT bins."""
    width = noise.shape[-1]
    spectrum = np.fft.rfft(noise, axis=-1)
    keep = band_count(width, fraction)
    mask = np.zeros(spectrum.shape[-1], dtype=bool)
    if side == "low":
        mask[:keep] = True
    else:
        mask[spectrum.shape[-1] - keep:] = True
    return np.fft.irfft(np.where(mask, spectrum, 0), n=width, axis=-1)


def base_inputs(settings: FingerprintSettings, name: str, width: int) -> np.ndarray:
    """x0 ~ N(0, 1): one independent row per repeat, [repeats, width] float64."""
    return standard_normal(stream(settings.seed, name, "x0"), settings.repeats, width)


def additive_noise(settings: FingerprintSettings, name: str, strategy: str, width: int) -> np.ndarray:
    """The perturbation added to x0 by a weight-independent strategy, [repeats, width] float64."""
    noise = standard_normal(stream(settings.seed, name, "noise"), settings.repeats, width)
    if strategy == "gaussian":
        return settings.noise_scale * noise
    if strategy == "structural":
        return settings.structural_scale * band_pass(noise, settings.structural_band, "low")
    if strategy == "low-frequency":
        return settings.noise_scale * band_pass(noise, settings.low_band, "low")
    if strategy == "high-frequency":
        return settings.noise_scale * band_pass(noise, settings.high_band, "high")
    raise ValueError(f"{strategy!r} is not an additive noise strategy")


def pseudo_targets(settings: FingerprintSettings, name: str, classes: int) -> np.ndarray:
    """FGSM's pseudo-label per repeat: uniform over the tensor's `classes` outputs, int64 [repeats]."""
    raw = stream(settings.seed, name, "target").bit_generator.random_raw(settings.repeats)
    return (raw % np.uint64(classes)).astype(np.int64)


def softmax_minus_onehot(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """d CE(o, t) / d o = softmax(o) - e_t, row-wise in float64 (stable: max subtracted)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=1, keepdims=True)
    probs[np.arange(len(targets)), targets] -= 1.0
    return probs


def fgsm(x0: np.ndarray, input_gradient: np.ndarray, epsilon: float) -> np.ndarray:
    """x_adv = x0 + epsilon * sign(grad_x J), Eq. (1)-(2)."""
    return x0 + epsilon * np.sign(input_gradient)
