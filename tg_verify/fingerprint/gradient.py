"""TensorGuard gradient statistics in closed form (§III-C.3; docs/method.md).

With o = x Wᵀ and L = ||o||₂, the gradient is G = ∂L/∂W = u ⊗ x with u = o/||o|| (shape [out, in]).
Every moment of the entries of an outer product factorises: E[Gᵏ] = mean(uᵏ)·mean(xᵏ), so mean,
population std, skewness and excess kurtosis are exact in O(out + in), and ||G||_F = ||u||·||x||.
G itself is never formed. Moments are taken in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAT_NAMES: tuple[str, ...] = ("mean", "std", "norm", "skewness", "kurtosis")
# A repeat whose variance is below this fraction of E[G²] has (numerically) constant entries:
# its skewness and kurtosis are undefined, so it is treated as degenerate.
RELATIVE_VARIANCE_FLOOR = 1e-12


@dataclass(frozen=True)
class TensorStats:
    """A tensor's gradient statistics, each averaged over its non-degenerate repeats."""

    mean: float
    std: float
    norm: float
    skewness: float
    kurtosis: float
    repeats: int  # repeats that entered the average
    degenerate_repeats: int  # repeats left out: zero response, or constant gradient

    def to_dict(self) -> dict[str, float]:
        """The five statistics by name, as recorded per tensor in the document."""
        return {name: getattr(self, name) for name in STAT_NAMES}


def repeat_statistics(responses: np.ndarray, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-repeat statistics of G = u ⊗ x.

    `responses` o is [repeats, out], `inputs` x is [repeats, in]. Returns ([repeats, 5] float64 in
    STAT_NAMES order, [repeats] bool valid). Invalid rows (||o|| = 0 or constant G) hold zeros.
    """
    o = np.asarray(responses, dtype=np.float64)
    x = np.asarray(inputs, dtype=np.float64)
    length = np.sqrt(np.einsum("ij,ij->i", o, o))
    valid = np.isfinite(length) & (length > 0)
    u = o / np.where(valid, length, 1.0)[:, None]
    m1, m2, m3, m4 = _raw_moments(u) * _raw_moments(x)
    variance = m2 - m1 * m1
    valid &= variance > RELATIVE_VARIANCE_FLOOR * m2
    variance = np.where(valid, variance, 1.0)
    std = np.sqrt(variance)
    central3 = m3 - 3.0 * m1 * m2 + 2.0 * m1 ** 3
    central4 = m4 - 4.0 * m1 * m3 + 6.0 * m1 * m1 * m2 - 3.0 * m1 ** 4
    entries = float(o.shape[1]) * float(x.shape[1])
    norm = np.sqrt(entries * m2)  # ||G||_F² = Σ u_i² x_j² = out·in·E[G²]
    stats = np.stack((m1, std, norm, central3 / variance ** 1.5, central4 / variance ** 2 - 3.0), axis=1)
    return np.where(valid[:, None], stats, 0.0), valid


def _raw_moments(a: np.ndarray) -> np.ndarray:
    """[4, rows]: the row means of a, a², a³, a⁴ (row dot products: no cube or fourth-power arrays)."""
    a2 = a * a
    sums = (a.sum(axis=1), a2.sum(axis=1), np.einsum("ij,ij->i", a2, a), np.einsum("ij,ij->i", a2, a2))
    moments: np.ndarray = np.stack(sums) / a.shape[1]
    return moments


def tensor_statistics(responses: np.ndarray, inputs: np.ndarray) -> TensorStats | None:
    """The tensor's statistics averaged over repeats (the paper's 30-fold average); None if all degenerate."""
    stats, valid = repeat_statistics(responses, inputs)
    used = int(valid.sum())
    if used == 0:
        return None
    mean, std, norm, skewness, kurtosis = (float(v) for v in stats[valid].mean(axis=0))  # STAT_NAMES order
    return TensorStats(mean=mean, std=std, norm=norm, skewness=skewness, kurtosis=kurtosis, repeats=used,
                       degenerate_repeats=int(len(valid) - used))
