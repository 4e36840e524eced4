"""Family attribution of one candidate against the references a policy lists (the paper's §III-D.3-4, made
to hold with few references).

Two ways, chosen per run and recorded in the result (`scale`):

- **population** (when the shipped population scale covers the references, docs/analysis.md): every
  distance is in z-units of the feature spreads measured on real models, so it does not depend on
  which references are listed and the paper's threshold applies. A base's cluster centre is the mean
  of the base and the derivative references it roots (they move it, as the paper's converged
  centroids do); the candidate is attributed to the nearest centre on the lineage scale (each feature
  divided by how far real fine-tunes move it), and is out of cluster when its distance to that centre
  on the population scale exceeds the threshold.
- **references** (the paper's release): z-scores fitted on the references, centroid-initialised
  K-Means. Such a scale is only the kind the threshold was set on when the references are a
  population themselves; with fewer than MIN_REFERENCE_POPULATION, or a candidate outside their
  span, the distances and the out-of-cluster rule are reported as not meaningful, with the reason.
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
from tg_verify.analysis.population import PopulationScale, population_for
from tg_verify.analysis.references import Reference
from tg_verify.analysis.space import DEFAULT_PCA_COMPONENTS, DEFAULT_SPACE, FeatureSpace, euclidean
from tg_verify.errors import InputError, UsageError
from tg_verify.fingerprint.document import Fingerprint

# The paper's out-of-cluster threshold: a Euclidean distance in z-scores fitted on the authors' whole
# set of real models (the release's StandardScaler over its 58 models), i.e. a population scale.
DEFAULT_THRESHOLD = 7.0
RANDOM_STATE = 0
# A scale fitted on the references stands in for the population scale only from this many references:
# on the authors' real fingerprints, genuine derivatives' distances to their base on a scale fitted on
# k bases are inflated (median) 5.5x at k=2, 2.3x at 3, 1.3x at 5 and 1.0x at 8 against the population
# scale (bench/attribution.py, "scale fitted on k references"); 8 is also the paper's set of centres.
MIN_REFERENCE_POPULATION = 8
SCALES: tuple[str, ...] = ("auto", "population", "references")
NOT_MEANINGFUL = "not meaningful"


@dataclass(frozen=True)
class ClassifierSettings:
    """How classification is done: scale, distance space, out-of-cluster threshold, K-Means limits."""

    threshold: float = DEFAULT_THRESHOLD
    space: str = DEFAULT_SPACE
    pca_components: int = DEFAULT_PCA_COMPONENTS
    max_iter: int = 300
    random_state: int = RANDOM_STATE
    scale: str = "auto"  # auto: population when it covers the references, else references


@dataclass(frozen=True)
class CentroidDistance:
    """Distance from the candidate to one cluster centre (named by its base) and the centre's members."""

    base: str
    family: str
    distance: float
    members: list[str]
    lineage_distance: float | None = None  # on the lineage scale (population scale only)


@dataclass(frozen=True)
class ReferenceDistance:
    """Distance from the candidate to one reference fingerprint."""

    id: str
    family: str
    base: bool
    distance: float
    lineage_distance: float | None = None


@dataclass
class Classification:
    """The attribution of one model: matched family and base, every distance, confidence, caveats.

    `meaningful` says whether the distances and the out-of-cluster rule can carry a decision,
    `attribution_meaningful` whether the family attribution can; `not_meaningful` gives the reasons.
    """

    model_name: str
    family: str
    base: str
    distance: float
    nearest_reference: str
    nearest_reference_distance: float
    margin: float | None  # runner-up centre minus the matched one, on the scale the attribution ranks on
    ratio: float | None  # matched / runner-up (0 = unambiguous, 1 = a tie)
    family_margin: float | None  # nearest centre of another family minus the matched one
    out_of_cluster: bool  # False when the rule is not meaningful
    threshold: float
    space: dict[str, Any]
    centroids: list[CentroidDistance]
    references: list[ReferenceDistance]
    iterations: int
    legacy: bool
    caveats: list[str] = field(default_factory=list)
    scale: str = "references"  # population | references
    meaningful: bool = True
    attribution_meaningful: bool = True
    not_meaningful: list[str] = field(default_factory=list)
    lineage_distance: float | None = None  # to the matched centre on the lineage scale (population scale)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for reports (canonical_json sorts the keys)."""
        return asdict(self)

    @property
    def cluster_text(self) -> str:
        """The out-of-cluster rule in words, the same in every verb and report."""
        if not self.meaningful:
            return f"out-of-cluster rule {NOT_MEANINGFUL}"
        if self.out_of_cluster:
            return f"out of cluster ({self.distance:.3f} > {self.threshold:g})"
        return f"in cluster ({self.distance:.3f} ≤ {self.threshold:g})"


def scale_words(scale: str | None, reference_count: int | None = None) -> str:
    """Which scale distances are on, in the words verify, compare, classify and the reports share."""
    if scale == "population":
        return "population scale"
    if scale == "references":
        return f"scale fitted on {reference_count} reference{'s' if reference_count != 1 else ''}"
    return "no scale"


def not_meaningful_text(reasons: Sequence[str]) -> str:
    """'not meaningful: <reasons>', the same sentence in every verb and report."""
    return f"{NOT_MEANINGFUL}: {'; '.join(reasons)}" if reasons else NOT_MEANINGFUL


def attribution_text(result: Classification, separator: str = " · ", reasons: bool = True) -> str:
    """The attribution in one line, the same in verify's console and Markdown reports and in classify.

    `reasons=False` leaves the reasons out (the verdict's TGV_STATISTICS_NOT_MEANINGFUL finding gives them).
    """
    on = scale_words(result.scale, result.space.get("reference_count"))
    why = not_meaningful_text(result.not_meaningful if reasons else ())
    parts = [f"family {result.family}", f"nearest base {result.base}", f"distance {result.distance:.3f} on the {on}"]
    if not result.meaningful:
        parts.append(why)
        return separator.join(parts)
    parts.append(result.cluster_text)
    if not result.attribution_meaningful:
        parts.append(f"family attribution {why}")
    return separator.join(parts)


def few_references_reason(count: int) -> str:
    """Why a scale fitted on `count` references cannot carry the distance or the threshold."""
    return (f"the scale was fitted on {count} reference{'s' if count != 1 else ''} (it takes "
            f"{MIN_REFERENCE_POPULATION} to stand in for the population scale the threshold of 7 was set on)")


def one_family_reason(family: str) -> str:
    """Why an attribution among references of one family is no evidence."""
    return f"every reference is of family '{family}', so the attribution cannot disagree with it"


def span_reason(features: Sequence[str]) -> str:
    """Why references that do not vary on a feature the candidate differs on cannot scale its distance."""
    return (f"the references do not span the candidate: they do not vary on {', '.join(features)}, on which the "
            "candidate differs, so that difference has no scale")


def reference_support(references: Sequence[Reference], population: PopulationScale | None = None) -> list[str]:
    """What these references cannot support, judged before any candidate is seen (`--check-policy`).

    Empty when the population scale covers them (or they are a population themselves) and they hold two
    families or more. A candidate can still fall outside their span; that is only known at run time.
    """
    problems = []
    fit = population_for([r.fingerprint for r in references], population)
    if fit.scale is None and len(references) < MIN_REFERENCE_POPULATION:
        problems.append(f"the paper's distance and out-of-cluster rule: {few_references_reason(len(references))}, "
                        f"and the population scale does not apply ({fit.reason})")
    families = sorted({r.family for r in references})
    if len(families) < 2:
        problems.append(f"the family attribution: {one_family_reason(families[0])}")
    return problems


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


def roots(references: Sequence[Reference]) -> list[int | None]:
    """For each reference, the index of the base whose cluster it belongs to (its parent chain's end).

    A derivative without a parent (labels that give only a family) is left as None here; callers
    assign it to the nearest base of its family on their scale.
    """
    index = {r.id: i for i, r in enumerate(references)}
    result: list[int | None] = []
    for i in range(len(references)):
        j: int | None = i
        seen: set[int] = set()
        while j is not None and not references[j].base and j not in seen:
            seen.add(j)
            parent = references[j].parent
            j = index.get(parent) if parent is not None else None
        result.append(j if j is not None and references[j].base else None)
    return result


def classify(candidate: Fingerprint, references: Sequence[Reference],
             settings: ClassifierSettings = ClassifierSettings(),
             population: PopulationScale | None = None) -> Classification:
    """Attribute `candidate` to the family of the nearest cluster centre of the references.

    `population` replaces the shipped population scale (the benchmark's leave-one-out passes one
    fitted without the candidate). Raises IncompatibleFingerprintsError when candidate and references
    were made differently, InputError when no reference is a base, UsageError for an unknown scale.
    """
    if not references:
        raise InputError("classification needs at least one reference fingerprint")
    if settings.scale not in SCALES:
        raise UsageError(f"unknown scale {settings.scale!r}; expected one of {', '.join(SCALES)}")
    bases = [i for i, r in enumerate(references) if r.base]
    if not bases:
        raise InputError("no reference is a base model; mark at least one as a base in the labels file")
    fps = [r.fingerprint for r in references]
    compat = comparability([*fps, candidate])
    reasons: list[str] = []
    if settings.scale != "references" and settings.space == DEFAULT_SPACE:
        fit = population_for(fps, population)
        if fit.scale is not None:
            return _on_population(candidate, references, settings, fit.scale, compat.caveats, compat.legacy)
        if settings.scale == "population":
            raise UsageError(f"the population scale does not apply here: {fit.reason}")
        reasons.append(f"the population scale does not apply: {fit.reason}")
    elif settings.scale == "population":
        raise UsageError("the population scale is a standardised space; --space pca needs --scale references")
    return _on_references(candidate, references, settings, compat.features, compat.caveats, compat.legacy, reasons)


def _common_caveats(candidate: Fingerprint, references: Sequence[Reference]) -> list[str]:
    root = candidate.artifact.get("root_digest")
    same = [r.id for r in references if root and r.fingerprint.artifact.get("root_digest") == root]
    if same:
        return [f"the candidate's files are those of reference {', '.join(same)} (same root digest): it is "
                "classified against itself"]
    return []


def _families_reason(references: Sequence[Reference]) -> list[str]:
    families = sorted({r.family for r in references})
    return [one_family_reason(families[0])] if len(families) < 2 else []


def _on_population(candidate: Fingerprint, references: Sequence[Reference], settings: ClassifierSettings,
                   scale: PopulationScale, compat_caveats: list[str], legacy: bool) -> Classification:
    fps = [r.fingerprint for r in references]
    pop, lin = scale.population_points(fps), scale.lineage_points(fps)
    target_pop, target_lin = scale.population_points([candidate])[0], scale.lineage_points([candidate])[0]
    bases = [i for i, r in enumerate(references) if r.base]
    owner = roots(references)
    for i, ref in enumerate(references):  # a derivative labelled with a family only joins its family's nearest base
        if owner[i] is None:
            same = [b for b in bases if references[b].family == ref.family]
            if same:
                owner[i] = min(same, key=lambda b: (float(np.linalg.norm(pop[b] - pop[i])), references[b].id))
    members = {b: [i for i in range(len(references)) if owner[i] == b] for b in bases}
    centre_pop = np.array([pop[members[b]].mean(axis=0) for b in bases])
    centre_lin = np.array([lin[members[b]].mean(axis=0) for b in bases])
    to_lin = np.sqrt(((centre_lin - target_lin) ** 2).sum(axis=1))
    to_pop = np.sqrt(((centre_pop - target_pop) ** 2).sum(axis=1))
    ref_pop = np.sqrt(((pop - target_pop) ** 2).sum(axis=1))
    ref_lin = np.sqrt(((lin - target_lin) ** 2).sum(axis=1))
    best, margin, ratio = _nearest(to_lin)
    family = references[bases[best]].family
    other = [float(d) for k, d in enumerate(to_lin) if references[bases[k]].family != family]
    distance = float(to_pop[best])
    nearest_ref = int(np.lexsort(([r.id for r in references], ref_pop))[0])
    caveats = [*compat_caveats, *duplicate_bases(lin, bases, [r.id for r in references]),
               *_common_caveats(candidate, references)]
    if candidate.feature_version != "tensorguard-release" and not candidate.legacy:
        caveats.append(f"feature version {candidate.feature_version}: the population scale was measured on the "
                       f"authors' published fingerprints (release format) and is used for the {len(scale.features)} "
                       "features both define alike (docs/analysis.md)")
    outside = scale.outside(candidate)
    if outside:
        caveats.append(f"the candidate lies outside the real models the population scale was measured on "
                       f"({'; '.join(outside[:2])}{'; ...' if len(outside) > 2 else ''}): far from every reference")
    family_reasons = _families_reason(references)
    centroid_rows = sorted((CentroidDistance(base=references[b].id, family=references[b].family,
                                             distance=float(to_pop[k]), lineage_distance=float(to_lin[k]),
                                             members=[references[i].id for i in members[b]])
                            for k, b in enumerate(bases)), key=lambda c: (c.lineage_distance or 0.0, c.base))
    reference_rows = sorted((ReferenceDistance(id=r.id, family=r.family, base=r.base, distance=float(ref_pop[i]),
                                               lineage_distance=float(ref_lin[i]))
                             for i, r in enumerate(references)), key=lambda r: (r.distance, r.id))
    space = {"space": "population", "features": list(scale.features), "reference_count": len(references),
             "zero_variance_features": [], "pca_components": None, "explained_variance": None,
             "population": scale.describe()}
    return Classification(
        model_name=candidate.model_name, family=family, base=references[bases[best]].id, distance=distance,
        nearest_reference=references[nearest_ref].id, nearest_reference_distance=float(ref_pop[nearest_ref]),
        margin=margin, ratio=ratio, family_margin=(min(other) - float(to_lin[best])) if other else None,
        out_of_cluster=distance > settings.threshold, threshold=settings.threshold, space=space,
        centroids=centroid_rows, references=reference_rows, iterations=0, legacy=legacy, caveats=caveats,
        scale="population", meaningful=True, attribution_meaningful=not family_reasons,
        not_meaningful=family_reasons, lineage_distance=float(to_lin[best]))


def _on_references(candidate: Fingerprint, references: Sequence[Reference], settings: ClassifierSettings,
                   features: tuple[str, ...], compat_caveats: list[str], legacy: bool,
                   reasons: list[str]) -> Classification:
    fps = [r.fingerprint for r in references]
    bases = [i for i, r in enumerate(references) if r.base]
    space = FeatureSpace.fit(fps, features, settings.space, settings.pca_components)
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
    caveats = [*compat_caveats, *space.caveats, *duplicate_bases(points, bases, [r.id for r in references])]
    caveats.extend(_candidate_caveats(candidate, space))
    caveats.extend(_common_caveats(candidate, references))
    why: list[str] = []
    if len(references) < MIN_REFERENCE_POPULATION:
        why.append(few_references_reason(len(references)))
    unspanned = _unspanned(candidate, space)
    if unspanned:
        why.append(span_reason(unspanned))
    meaningful = not why
    if meaningful:
        caveats.extend(reasons)  # which scale, and why not the population's (when not meaningful: a reason)
    family_reasons = _families_reason(references)
    members = [[references[int(i)].id for i in np.flatnonzero(kmeans.labels_ == k)] for k in range(len(bases))]
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
        out_of_cluster=meaningful and distance > settings.threshold, threshold=settings.threshold,
        space=space.describe(), centroids=centroid_rows, references=reference_rows,
        iterations=int(kmeans.n_iter_), legacy=legacy, caveats=caveats, scale="references",
        meaningful=meaningful, attribution_meaningful=meaningful and not family_reasons,
        not_meaningful=[*why, *(reasons if why else []), *family_reasons])


def _unspanned(candidate: Fingerprint, space: FeatureSpace) -> list[str]:
    """Features the references do not vary on (no scale) while the candidate differs from them."""
    index = {n: i for i, n in enumerate(space.features)}
    centre = space.scaler.mean_
    return [n for n in space.zero_variance if candidate.features[n] != centre[index[n]]]


def _candidate_caveats(candidate: Fingerprint, space: FeatureSpace) -> list[str]:
    """Say when the candidate differs on a feature the references cannot scale (zero variance)."""
    if space.reference_count < 2:
        return []
    differs = _unspanned(candidate, space)
    if not differs:
        return []
    return [f"the candidate differs from every reference on {', '.join(differs)}, which the references "
            "do not vary on; that difference enters the distance unscaled"]
