"""How close two fingerprints are: the paper's Euclidean distance on a scale that can carry it, and a
scale-free one that always can.

The paper's distance needs per-feature spreads. The population scale (population.py, real models'
spreads) gives them whenever it covers B, the reference side; otherwise a reference set (`--refs`) can,
if it is a population itself (at least MIN_REFERENCE_POPULATION fingerprints that vary on every feature
A or B differs on). Z-scores fitted on the two fingerprints alone are degenerate (every differing feature
becomes +1/-1), so without either scale only `relative_distance` (mean Canberra term, 0 = equal) is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tg_verify.analysis.attribution import (
    DEFAULT_THRESHOLD,
    MIN_REFERENCE_POPULATION,
    SCALES,
    few_references_reason,
    span_reason,
)
from tg_verify.analysis.compat import comparability
from tg_verify.analysis.population import PopulationScale, population_for
from tg_verify.analysis.space import DEFAULT_PCA_COMPONENTS, DEFAULT_SPACE, FeatureSpace, euclidean, relative_distance
from tg_verify.errors import UsageError
from tg_verify.fingerprint.document import Fingerprint

NO_REFERENCES_NOTE = ("no scale for the paper's distance: the population scale does not cover B and no reference set "
                      "was given (z-scores fitted on two fingerprints make every differing feature +1/-1); pass "
                      f"--refs with at least {MIN_REFERENCE_POPULATION} fingerprints for it")


@dataclass(frozen=True)
class FeatureDelta:
    """One feature of both fingerprints, its relative difference and (with a scale) its scaled values."""

    name: str
    a: float
    b: float
    relative: float
    z_a: float | None = None  # z-scores under a reference-fitted scale
    z_b: float | None = None
    scaled: float | None = None  # (a - b) in population spreads (population scale)


@dataclass
class Comparison:
    """The distance between two fingerprints, with the per-feature breakdown behind it.

    `distance` is None when no scale could be had; `meaningful` is False when one was fitted but cannot
    carry a decision (then `within_threshold` is None and `not_meaningful` says why).
    """

    a: str
    b: str
    relative_distance: float
    distance: float | None
    threshold: float | None
    within_threshold: bool | None
    space: dict[str, Any] | None
    features: list[FeatureDelta]
    legacy: bool
    lineage: dict[str, Any] | None = None
    caveats: list[str] = field(default_factory=list)
    scale: str | None = None  # population | references | None
    meaningful: bool = False
    not_meaningful: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for reports."""
        return asdict(self)


def compare(a: Fingerprint, b: Fingerprint, references: Sequence[Fingerprint] | None = None,
            space: str = DEFAULT_SPACE, pca_components: int = DEFAULT_PCA_COMPONENTS,
            threshold: float = DEFAULT_THRESHOLD, scale: str = "auto",
            population: PopulationScale | None = None) -> Comparison:
    """Compare two fingerprints: on the population scale when it covers B (and the references), else in
    the space fitted on `references`.

    Raises IncompatibleFingerprintsError when the fingerprints (or references) were made differently,
    UsageError for an unknown scale or the population scale asked for where it does not apply.
    """
    if scale not in SCALES:
        raise UsageError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    compat = comparability([a, b, *(references or [])])
    caveats = list(compat.caveats)
    va, vb = a.vector(compat.features), b.vector(compat.features)
    rows = [FeatureDelta(name=n, a=x, b=y, relative=relative_distance([x], [y]))
            for n, x, y in zip(compat.features, va, vb)]
    result = Comparison(a=a.model_name, b=b.model_name, relative_distance=relative_distance(va, vb), distance=None,
                        threshold=None, within_threshold=None, space=None, features=rows, legacy=compat.legacy,
                        caveats=caveats)
    if scale != "references" and space == DEFAULT_SPACE:
        fit = population_for([b, *(references or [])], population)
        if fit.scale is not None:
            return _on_population(result, a, b, fit.scale, threshold)
        if scale == "population":
            raise UsageError(f"the population scale does not apply here: {fit.reason}")
        caveats.append(f"the population scale does not apply: {fit.reason}")
    elif scale == "population":
        raise UsageError("the population scale is a standardised space; --space pca needs --scale references")
    if not references:
        caveats.append(NO_REFERENCES_NOTE)
        return result
    fitted = FeatureSpace.fit(references, compat.features, space, pca_components)
    caveats.extend(fitted.caveats)
    points = fitted.transform([a, b])
    distance = float(euclidean(points[:1], points[1:])[0, 0])
    z = fitted.scaler.transform(np.array([va, vb], dtype=np.float64))
    why = []
    if len(references) < MIN_REFERENCE_POPULATION:
        why.append(few_references_reason(len(references)))
    centre = fitted.scaler.mean_
    unspanned = [n for n in fitted.zero_variance
                 if {va[compat.features.index(n)], vb[compat.features.index(n)]} != {centre[compat.features.index(n)]}]
    if unspanned:
        why.append(span_reason(unspanned))
    result.features = [FeatureDelta(name=r.name, a=r.a, b=r.b, relative=r.relative, z_a=float(z[0, i]),
                                    z_b=float(z[1, i])) for i, r in enumerate(rows)]
    result.distance, result.space, result.scale = distance, fitted.describe(), "references"
    result.meaningful, result.not_meaningful = not why, why
    if not why:
        result.threshold, result.within_threshold = threshold, distance <= threshold
    return result


def _on_population(result: Comparison, a: Fingerprint, b: Fingerprint, scale: PopulationScale,
                   threshold: float) -> Comparison:
    pa, pb = scale.population_points([a, b])
    distance = float(np.sqrt(((pa - pb) ** 2).sum()))
    scaled = dict(zip(scale.features, (pa - pb).tolist()))
    result.features = [FeatureDelta(name=r.name, a=r.a, b=r.b, relative=r.relative, scaled=scaled.get(r.name))
                       for r in result.features]
    outside = scale.outside(a)
    if outside:
        result.caveats.append(f"A lies outside the real models the population scale was measured on "
                              f"({'; '.join(outside[:2])}{'; ...' if len(outside) > 2 else ''})")
    result.distance, result.threshold, result.within_threshold = distance, threshold, distance <= threshold
    result.scale, result.meaningful = "population", True
    result.space = {"space": "population", "features": list(scale.features), "reference_count": None,
                    "population": scale.describe()}
    return result
