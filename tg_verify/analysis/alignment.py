"""Monotone layer alignment: which candidate layer matches which reference layer, for every lineage score."""

from __future__ import annotations

import numpy as np


def align_layers(sims: np.ndarray) -> np.ndarray:
    """Monotone layer alignment maximising the summed similarity (gaps free).

    sims: (Lc, Lr) layer-pair similarities (NaN: not compared). Returns a boolean (Lc, Lr) mask of matched pairs.
    """
    lc, lr = sims.shape
    gain = np.nan_to_num(sims, nan=0.0).astype(np.float64)
    best = np.zeros((lc + 1, lr + 1))
    for i in range(1, lc + 1):
        candidate = best[i - 1].copy()
        candidate[1:] = np.maximum(candidate[1:], best[i - 1, :-1] + gain[i - 1])
        best[i] = np.maximum.accumulate(candidate)
    mask = np.zeros((lc, lr), dtype=bool)
    i, j = lc, lr
    while i > 0 and j > 0:
        if best[i - 1, j - 1] + gain[i - 1, j - 1] >= best[i, j]:
            mask[i - 1, j - 1] = True
            i, j = i - 1, j - 1
        elif best[i - 1, j] >= best[i, j]:
            i -= 1
        else:
            j -= 1
    return mask
