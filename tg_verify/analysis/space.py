"""The space distances are measured in: z-scores fitted on a reference set, optionally followed by PCA.

The raw vector mixes 1e-6 gradient means with norms near 10, so every distance is taken after
scaling each feature with a StandardScaler fitted on the references (the authors' release). The
default space is that standardised 15-dimensional space, because the paper's threshold of 7 was
set there; `space="pca"` follows the paper's text (PCA after scaling) and shrinks distances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from tg_verify.errors import UsageError
from tg_verify.fingerprint.document import Fingerprint

SpaceName = Literal["standardized", "pca"]
SPACES: tuple[str, ...] = ("standardized", "pca")
DEFAULT_SPACE: SpaceName = "standardized"
DEFAULT_PCA_COMPONENTS = 2


def feature_matrix(fingerprints: Sequence[Fingerprint], features: Sequence[str]) -> np.ndarray:
    """The raw feature vectors of `fingerprints` as a float64 matrix [n, len(features)]."""
    return np.array([fp.vector(tuple(features)) for fp in fingerprints], dtype=np.float64).reshape(
        len(fingerprints), len(features))


def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of `a` [n, d] and of `b` [m, d], exactly (no dot-product trick)."""
    distances: np.ndarray = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    return distances


def relative_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Scale-free distance in [0, 1]: the mean over features of |a - b| / (|a| + |b|) (Canberra, averaged).

    Needs no reference set, so `compare` can report it for any two fingerprints; 0 means equal.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    denominator = np.abs(x) + np.abs(y)
    terms = np.divide(np.abs(x - y), denominator, out=np.zeros_like(x), where=denominator > 0)
    return float(terms.mean()) if terms.size else 0.0


def _space_name(space: str) -> SpaceName:
    """`space` as a SpaceName, or a UsageError naming the choices (it comes from the command line or a policy)."""
    if space == "standardized":
        return "standardized"
    if space == "pca":
        return "pca"
    raise UsageError(f"unknown distance space {space!r}; expected one of {', '.join(SPACES)}")


@dataclass
class FeatureSpace:
    """A scaling (and optional PCA) fitted on reference fingerprints; maps fingerprints to points."""

    features: tuple[str, ...]
    space: SpaceName
    scaler: StandardScaler
    pca: PCA | None
    zero_variance: tuple[str, ...]
    reference_count: int
    caveats: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, references: Sequence[Fingerprint], features: Sequence[str], space: str = DEFAULT_SPACE,
            pca_components: int = DEFAULT_PCA_COMPONENTS) -> FeatureSpace:
        """Fit the z-score scaling (and PCA for space="pca") on `references`.

        Degenerate cases: a feature with zero variance across the references is centred but not
        scaled (sklearn's convention, as in the release); with a single reference every feature has
        zero variance, so distances are in raw feature units and the threshold does not apply.
        """
        name = _space_name(space)
        if not references:
            raise UsageError("a feature space needs at least one reference fingerprint")
        names = tuple(features)
        raw = feature_matrix(references, names)
        scaler = StandardScaler().fit(raw)
        zero = tuple(n for n, v in zip(names, scaler.var_) if v == 0.0)
        caveats: list[str] = []
        if len(references) == 1:
            caveats.append("a single reference gives no scale: distances are in raw feature units and the "
                           "threshold is not calibrated for them; add references of other models")
        elif zero:
            caveats.append(f"features with zero variance across the references are centred but not scaled: "
                           f"{', '.join(zero)}")
        pca: PCA | None = None
        if name == "pca":
            if pca_components < 1:
                raise UsageError(f"pca_components must be at least 1, got {pca_components}")
            components = min(pca_components, len(references), len(names))
            if components < pca_components:
                caveats.append(f"PCA reduced to {components} component(s): only {len(references)} reference(s)")
            pca = PCA(n_components=components, svd_solver="full").fit(scaler.transform(raw))
            caveats.append("distances are in a PCA projection of the standardised space (never larger than there); "
                           "the threshold of 7 was calibrated in the standardised space")
        return cls(features=names, space=name, scaler=scaler, pca=pca, zero_variance=zero,
                   reference_count=len(references), caveats=caveats)

    def transform(self, fingerprints: Sequence[Fingerprint]) -> np.ndarray:
        """Map fingerprints to points of this space [n, d]."""
        return self.transform_matrix(feature_matrix(fingerprints, self.features))

    def transform_matrix(self, raw: np.ndarray) -> np.ndarray:
        """Map raw feature vectors [n, len(features)] to points of this space."""
        z: np.ndarray = self.scaler.transform(raw)  # sklearn is untyped: its arrays come back as Any
        if self.pca is None:
            return z
        projected: np.ndarray = self.pca.transform(z)
        return projected

    @property
    def explained_variance(self) -> list[float] | None:
        """The share of variance each PCA component explains (None in the standardised space)."""
        return None if self.pca is None else [float(v) for v in self.pca.explained_variance_ratio_]

    def describe(self) -> dict[str, object]:
        """A JSON-safe description of the space, for reports."""
        return {"space": self.space, "features": list(self.features), "reference_count": self.reference_count,
                "zero_variance_features": list(self.zero_variance),
                "pca_components": None if self.pca is None else int(self.pca.n_components_),
                "explained_variance": self.explained_variance}
