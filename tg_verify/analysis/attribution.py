"""Family attribution by centroid-initialised K-Means (the paper's §III-D.3 and D.4).

One cluster per reference base, initialised at the base's point, centroids free to move as the
other references (derivatives) pull them; an unknown model goes to the nearest converged centroid,
and is out-of-cluster when even that one is further than the threshold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from tg_verify.analysis.compat import comparability
from tg_verify.analysis.references import Reference
from tg_verify.analysis.space import DEFAULT_PCA_COMPONENTS, DEFAULT_SPACE, FeatureSpace, euclidean
from tg_verify.errors import InputError
from tg_verify.fingerprint.document import Fingerprint

# The paper's out-of-cluster threshold: a Euclidean distance in the standardised space of the
# release's 15 features (z-scores fitted on the reference set).
DEFAULT_THRESHOLD = 7.0
RANDOM_STATE = 0


@dataclass(frozen=True)
class ClassifierSettings:
    """How classification is done: distance space, out-of-cluster threshold, K-Means limits."""

    threshold: float = DEFAULT_THRESHOLD
    space: str = DEFAULT_SPACE
    pca_components: int = DEFAULT_PCA_COMPONENTS
    max_iter: int = 300
    random_state: int = RANDOM_STATE


@dataclass(frozen=True)
class CentroidDistance:
    """Distance from the candidate to one converged cluster centroid (named by its initial base)."""

    base: str
    family: str
    distance: float
    members: list[str]


@dataclass(frozen=True)
class ReferenceDistance:
    """Distance from the candidate to one reference fingerprint."""

    id: str
    family: str
    base: bool
    distance: float


@dataclass
class Classification:
    """The attribution of one model: matched family and base, every distance, confidence, caveats."""

    model_name: str
    family: str
    base: str
    distance: float
    nearest_reference: str
    nearest_reference_distance: float
    margin: float | None  # runner-up centroid distance minus the matched one
    ratio: float | None  # matched / runner-up distance (0 = unambiguous, 1 = a tie)
    family_margin: float | None  # nearest centroid of another family minus the matched one
    out_of_cluster: bool
    threshold: float
    space: dict[str, Any]
    centroids: list[CentroidDistance]
    references: list[ReferenceDistance]
    iterations: int
    legacy: bool
    caveats: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for reports (canonical_json sorts the keys)."""
        return asdict(self)


def centroid_kmeans(points: np.ndarray, init_indices: Sequence[int], max_iter: int = 300,
                    random_state: int = RANDOM_STATE) -> KMeans:
    """K-Means over `points` with one cluster per init index, started at those points (n_init=1)."""
    init = points[list(init_indices)]
    with warnings.catch_warnings():  # identical bases: sklearn warns; callers report it as a caveat
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=len(init), init=init, n_init=1, max_iter=max_iter,
                      random_state=random_state).fit(points)


def duplicate_bases(points: np.ndarray, init_indices: Sequence[int], ids: Sequence[str]) -> list[str]:
    """Caveats for bases whose points coincide: their clusters cannot be told apart."""
    seen: dict[bytes, str] = {}
    caveats = []
    for i in init_indices:
        key = np.round(points[i], 12).tobytes()
        if key in seen:
            caveats.append(f"bases {seen[key]} and {ids[i]} have identical fingerprints; "
                           "their clusters cannot be told apart")
        else:
            seen[key] = ids[i]
    return caveats


def _nearest(distances: np.ndarray) -> tuple[int, float | None, float | None]:
    """Index of the smallest distance, the margin to the runner-up and their ratio."""
    order = np.argsort(distances, kind="stable")
    best = int(order[0])
    if len(order) < 2:
        return best, None, None
    runner = float(distances[order[1]])
    margin = runner - float(distances[best])
    ratio = float(distances[best]) / runner if runner > 0 else 1.0
    return best, margin, ratio


def classify(candidate: Fingerprint, references: Sequence[Reference],
             settings: ClassifierSettings = ClassifierSettings()) -> Classification:
    """Attribute `candidate` to the family of the nearest converged centroid of the references.

    Raises IncompatibleFingerprintsError when candidate and references were made differently, and
    InputError when no reference is a base.
    """
    if not references:
        raise InputError("classification needs at least one reference fingerprint")
    bases = [i for i, r in enumerate(references) if r.base]
    if not bases:
        raise InputError("no reference is a base model; mark at least one as a base in the labels file")
    fps = [r.fingerprint for r in references]
    compat = comparability([*fps, candidate])
    space = FeatureSpace.fit(fps, compat.features, settings.space, settings.pca_components)
    points = space.transform(fps)
    kmeans = centroid_kmeans(points, bases, settings.max_iter, settings.random_state)
    centres = kmeans.cluster_centers_
    target = space.transform([candidate])
    to_centres = euclidean(target, centres)[0]
    to_refs = euclidean(target, points)[0]

    best, margin, ratio = _nearest(to_centres)
    family = references[bases[best]].family
    other_family = [float(d) for k, d in enumerate(to_centres) if references[bases[k]].family != family]
    nearest_ref = int(np.argmin(to_refs))
    caveats = [*compat.caveats, *space.caveats, *duplicate_bases(points, bases, [r.id for r in references])]
    caveats.extend(_candidate_caveats(candidate, space))
    root = candidate.artifact.get("root_digest")
    same = [r.id for r in references if root and r.fingerprint.artifact.get("root_digest") == root]
    if same:
        caveats.append(f"the candidate's files are those of reference {', '.join(same)} (same root digest): it is "
                       "classified against itself")
    members = [[references[i].id for i in np.flatnonzero(kmeans.labels_ == k)] for k in range(len(bases))]
    centroid_rows = sorted((CentroidDistance(base=references[b].id, family=references[b].family,
                                             distance=float(to_centres[k]), members=members[k])
                            for k, b in enumerate(bases)), key=lambda c: (c.distance, c.base))
    reference_rows = sorted((ReferenceDistance(id=r.id, family=r.family, base=r.base, distance=float(to_refs[i]))
                             for i, r in enumerate(references)), key=lambda r: (r.distance, r.id))
    distance = float(to_centres[best])
    return Classification(
        model_name=candidate.model_name, family=family, base=references[bases[best]].id, distance=distance,
        nearest_reference=references[nearest_ref].id, nearest_reference_distance=float(to_refs[nearest_ref]),
        margin=margin, ratio=ratio, family_margin=(min(other_family) - distance) if other_family else None,
        out_of_cluster=distance > settings.threshold, threshold=settings.threshold, space=space.describe(),
        centroids=centroid_rows, references=reference_rows, iterations=int(kmeans.n_iter_), legacy=compat.legacy,
        caveats=caveats)


def _candidate_caveats(candidate: Fingerprint, space: FeatureSpace) -> list[str]:
    """Say when the candidate differs on a feature the references cannot scale (zero variance)."""
    if not space.zero_variance or space.reference_count < 2:
        return []
    index = {n: i for i, n in enumerate(space.features)}
    centre = space.scaler.mean_
    differs = [n for n in space.zero_variance if candidate.features[n] != centre[index[n]]]
    if not differs:
        return []
    return [f"the candidate differs from every reference on {', '.join(differs)}, which the references "
            "do not vary on; that difference enters the distance unscaled"]
