"""How close two fingerprints are: the paper's Euclidean distance, and a scale-free one for two alone.

Z-scores fitted on two fingerprints are degenerate (every feature that differs becomes +1 and -1,
so the distance is 2*sqrt(k) for k differing features, whatever the models), so the paper's
standardised distance is only reported under the scaling of a reference set. Without one,
`relative_distance` (mean Canberra term per feature, 0 = equal, 1 = nothing in common) stands alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tg_verify.analysis.attribution import DEFAULT_THRESHOLD
from tg_verify.analysis.compat import comparability
from tg_verify.analysis.space import DEFAULT_PCA_COMPONENTS, DEFAULT_SPACE, FeatureSpace, euclidean, relative_distance
from tg_verify.fingerprint.document import Fingerprint

NO_REFERENCES_NOTE = ("no reference set: the paper's standardised distance (the scale of its threshold 7) needs "
                      "z-scores fitted on references; with only two fingerprints every differing feature scales "
                      "to +1/-1, so it is not reported; pass --refs for it")


@dataclass(frozen=True)
class FeatureDelta:
    """One feature of both fingerprints, its relative difference and (with references) its z-scores."""

    name: str
    a: float
    b: float
    relative: float
    z_a: float | None = None
    z_b: float | None = None


@dataclass
class Comparison:
    """The distance between two fingerprints, with the per-feature breakdown behind it."""

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for reports."""
        return asdict(self)


def compare(a: Fingerprint, b: Fingerprint, references: Sequence[Fingerprint] | None = None,
            space: str = DEFAULT_SPACE, pca_components: int = DEFAULT_PCA_COMPONENTS,
            threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """Compare two fingerprints; with `references`, also the distance in the space fitted on them.

    Raises IncompatibleFingerprintsError when the fingerprints (or references) were made differently.
    """
    compat = comparability([a, b, *(references or [])])
    caveats = list(compat.caveats)
    va, vb = a.vector(compat.features), b.vector(compat.features)
    rows = [FeatureDelta(name=n, a=x, b=y, relative=relative_distance([x], [y]))
            for n, x, y in zip(compat.features, va, vb)]
    distance: float | None = None
    described: dict[str, Any] | None = None
    if references:
        fitted = FeatureSpace.fit(references, compat.features, space, pca_components)
        caveats.extend(fitted.caveats)
        points = fitted.transform([a, b])
        distance = float(euclidean(points[:1], points[1:])[0, 0])
        described = fitted.describe()
        z = fitted.scaler.transform(np.array([va, vb], dtype=np.float64))
        rows = [FeatureDelta(name=r.name, a=r.a, b=r.b, relative=r.relative, z_a=float(z[0, i]), z_b=float(z[1, i]))
                for i, r in enumerate(rows)]
    else:
        caveats.append(NO_REFERENCES_NOTE)
    return Comparison(a=a.model_name, b=b.model_name, relative_distance=relative_distance(va, vb), distance=distance,
                      threshold=threshold if distance is not None else None,
                      within_threshold=None if distance is None else distance <= threshold,
                      space=described, features=rows, legacy=compat.legacy, caveats=caveats)
