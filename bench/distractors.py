"""Distractor references for lineage search: realistic fingerprints of models unrelated to a zoo, by the thousand.

Training 10,000 independent models is out of reach on a CPU, and uniform noise would be a strawman
(it shares nothing with real models, so any retrieval finds the base among it). A distractor here is
built from the sketches of a few *independently trained* roots of one shape (same architecture,
vocabulary and depth, trained on the same text as the zoo but from other seeds): each of its units is
a random convex combination of the roots' units of the same role and layer, plus a small symmetric
perturbation, renormalised as the sketch normalises units. Every unit of the sketch is a sum over
attention heads or MLP hidden units, so a weighted sum of the roots' units is exactly the unit of a
block holding all of their heads and hidden units, scaled: the sketch of a plausible (wider) model.
What independently trained models share (token geometry, statistics of the text) every distractor
shares too, which is what makes retrieval hard; what a derivative inherits from its base it does not.
Mixing several roots also averages away part of their idiosyncratic components, so a distractor's
similarity to any candidate is, if anything, higher than a single independent model's: harder than
real. Its 16 features are the same convex combination of the roots' features, jittered by 1%.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tg_verify.analysis.lineage import parse_sketch
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.fingerprint.sketch import SYMMETRIC_ROLES, encode_matrix, normalise

NOISE = 0.05  # perturbation, relative to the spread of a unit's entries
JITTER = 0.01  # relative jitter of the features


Units = dict[tuple[str, int | None], np.ndarray]


def _units(fingerprint: Fingerprint) -> Units:
    return parse_sketch(fingerprint.sketch, fingerprint.source or fingerprint.model_name).units


def distractor(roots: Sequence[Fingerprint], name: str, rng: np.random.Generator, mix: int = 3,
               parsed_roots: Sequence[Units] | None = None) -> Fingerprint:
    """One distractor fingerprint from `mix` of the roots (all of one shape), chosen and weighted by `rng`."""
    if len(roots) < 2:
        raise ValueError("distractors need at least two independently trained roots of one shape")
    chosen = rng.choice(len(roots), size=min(mix, len(roots)), replace=False)
    weights = rng.dirichlet(np.ones(len(chosen)))
    every = parsed_roots if parsed_roots is not None else [_units(root) for root in roots]
    parsed = [every[int(i)] for i in chosen]
    first = roots[int(chosen[0])]
    assert first.sketch is not None
    units: list[dict[str, Any]] = []
    for unit in first.sketch["units"]:
        key = (unit["role"], unit["layer"])
        if not all(key in p for p in parsed):
            continue
        matrix = sum(float(w) * p[key].astype(np.float64) for w, p in zip(weights, parsed))
        assert isinstance(matrix, np.ndarray)
        noise = rng.normal(0.0, NOISE * float(matrix.std()), matrix.shape)
        symmetric = unit["role"] in SYMMETRIC_ROLES
        if symmetric:
            noise = (noise + noise.T) / np.sqrt(2.0)
            np.fill_diagonal(noise, 0.0)
        mixed = normalise(torch.from_numpy(matrix + noise), symmetric)
        units.append({"role": unit["role"], "layer": unit["layer"], "data": encode_matrix(mixed)})
    sketch = {**first.sketch, "units": units, "notes": ["synthetic distractor (bench/distractors.py)"]}
    features = dict(first.features)
    for feature in features:
        if feature in ("total_params", "num_layers"):
            continue
        value = sum(float(w) * roots[int(i)].features[feature] for w, i in zip(weights, chosen))
        features[feature] = float(value * (1.0 + JITTER * rng.normal()))
    return Fingerprint(model_name=name, features=features, settings=dict(first.settings),
                       feature_version=first.feature_version, tool=dict(first.tool),
                       artifact={"layout": "synthetic", "files": []}, tensors=[], sketch=sketch)


def distractors(roots: Sequence[Fingerprint], count: int, prefix: str, seed: int) -> list[Fingerprint]:
    """`count` distractors of the roots' shape, named `<prefix>-00001`..., deterministic for a seed."""
    rng = np.random.default_rng(seed)
    parsed = [_units(root) for root in roots]
    return [distractor(roots, f"{prefix}-{n:05d}", rng, parsed_roots=parsed) for n in range(1, count + 1)]
