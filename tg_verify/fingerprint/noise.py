"""Seeded inputs and the five noise strategies of §III-C.2 (what x is, for each tensor and repeat).

Every random draw comes from a Philox stream keyed by sha256(seed, tensor name, purpose), so a
tensor's inputs never depend on which other tensors exist, their order or the shard layout. Normals
come from Box-Muller over the raw 64-bit stream (whose bits NumPy keeps stable across releases),
not from a library sampler whose algorithm may change, and are computed in float32: the inputs are
float32 anyway, and float32 SIMD log/cos/sin make the inputs ~3x cheaper than float64 (they were a
quarter of the CPU fingerprint's time). Row r of every draw is repeat r, so the first k repeats are
the same whatever `repeats` is.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from tg_verify.fingerprint.settings import NOISE_STRATEGIES, FingerprintSettings

# One raw 64-bit draw gives one Box-Muller pair: two 24-bit uniforms (a float32 holds 24 bits exactly).
_BITS = 24
_SCALE = np.float32(2.0 ** -_BITS)
_ANGLE = np.float32(2.0 * math.pi * 2.0 ** -_BITS)
_MASK = np.uint64((1 << _BITS) - 1)


def stream(seed: int, name: str, purpose: str) -> np.random.Generator:
    """A Philox generator keyed by (seed, tensor name, purpose): independent, reproducible streams."""
    digest = hashlib.sha256(f"tg-verify/noise\0{seed}\0{name}\0{purpose}".encode()).digest()
    key = int.from_bytes(digest[:16], "little")
    return np.random.Generator(np.random.Philox(key=key))


def standard_normal(generator: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """[rows, width] float32 standard normals by Box-Muller; row r uses only the r-th slice of the stream.

    Draw i of the stream makes the pair (2i, 2i+1): radius from its top 24 bits h as
    sqrt(-2 ln((2^24 - h) / 2^24)) (never ln 0; tails reach 5.8 sigma), angle from the next 24 bits.
    """
    pairs = (width + 1) // 2
    raw = generator.bit_generator.random_raw(rows * pairs)
    radius = (np.float32(2 ** _BITS) - (raw >> np.uint64(64 - _BITS)).astype(np.float32)) * _SCALE
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    angle = ((raw >> np.uint64(64 - 2 * _BITS)) & _MASK).astype(np.float32)
    angle *= _ANGLE
    normals = np.empty((rows * pairs, 2), dtype=np.float32)
    np.cos(angle, out=normals[:, 0])
    np.sin(angle, out=normals[:, 1])
    normals *= radius[:, None]
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
    """Keep the lowest (side="low") or highest (side="high") `fraction` of each row's rFFT bins (float64)."""
    width = noise.shape[-1]
    spectrum = np.fft.rfft(noise.astype(np.float64), axis=-1)
    keep = band_count(width, fraction)
    mask = np.zeros(spectrum.shape[-1], dtype=bool)
    if side == "low":
        mask[:keep] = True
    else:
        mask[spectrum.shape[-1] - keep:] = True
    return np.fft.irfft(np.where(mask, spectrum, 0), n=width, axis=-1)


def base_inputs(settings: FingerprintSettings, name: str, width: int) -> np.ndarray:
    """x0 ~ N(0, 1): one independent row per repeat, [repeats, width] float32."""
    return standard_normal(stream(settings.seed, name, "x0"), settings.repeats, width)


def additive_noise(settings: FingerprintSettings, name: str, strategy: str, width: int) -> np.ndarray:
    """The perturbation added to x0 by a weight-independent strategy, [repeats, width] float32."""
    noise = standard_normal(stream(settings.seed, name, "noise"), settings.repeats, width)
    if strategy == "gaussian":
        added = settings.noise_scale * noise.astype(np.float64)
    elif strategy == "structural":
        added = settings.structural_scale * band_pass(noise, settings.structural_band, "low")
    elif strategy == "low-frequency":
        added = settings.noise_scale * band_pass(noise, settings.low_band, "low")
    elif strategy == "high-frequency":
        added = settings.noise_scale * band_pass(noise, settings.high_band, "high")
    else:
        raise ValueError(f"{strategy!r} is not an additive noise strategy")
    return added.astype(np.float32)


def pseudo_targets(settings: FingerprintSettings, name: str, classes: int) -> np.ndarray:
    """FGSM's pseudo-label per repeat: uniform over the tensor's `classes` outputs, int64 [repeats]."""
    raw = stream(settings.seed, name, "target").bit_generator.random_raw(settings.repeats)
    targets: np.ndarray = (raw % np.uint64(classes)).astype(np.int64)
    return targets


def softmax_minus_onehot(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """d CE(o, t) / d o = softmax(o) - e_t, row-wise in float64 (stable: max subtracted)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    probs[np.arange(len(targets)), targets] -= 1.0
    return probs


def fgsm(x0: np.ndarray, input_gradient: np.ndarray, epsilon: float) -> np.ndarray:
    """x_adv = x0 + epsilon * sign(grad_x J), Eq. (1)-(2)."""
    adversarial: np.ndarray = x0 + epsilon * np.sign(input_gradient)
    return adversarial
