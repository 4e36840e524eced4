"""The paper's RQ3 (Table I): five clustering strategies on labelled fingerprints, accuracy of each.

Accuracy is the share of derivatives (models that are not bases) put in a cluster of their own
family, as the paper counts its 50 derivatives. Centroid-initialised K-Means names each cluster by
the base it started from, so it needs no mapping. The unsupervised strategies get one: each cluster
takes the majority family of its members (`accuracy`, the paper's reading), or clusters are matched
one to one with lineage groups (a base and its derivatives; families when parents are not labelled)
by the Hungarian method (`hungarian_accuracy`, stricter: two clusters cannot both claim one group).
DBSCAN noise points count as wrong. The adjusted Rand index against the lineage groups needs no
mapping at all. Strategies that depend on a random start (K-Means, GMM) are also run over
SEED_RUNS seeds, so one lucky or unlucky seed cannot make the table.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from tg_verify.analysis.attribution import RANDOM_STATE, centroid_kmeans, duplicate_bases
from tg_verify.analysis.compat import comparability
from tg_verify.analysis.references import Reference
from tg_verify.analysis.space import DEFAULT_PCA_COMPONENTS, DEFAULT_SPACE, FeatureSpace, euclidean
from tg_verify.errors import InputError

STRATEGIES: tuple[str, ...] = ("centroid-kmeans", "hierarchical", "gmm", "kmeans", "dbscan")
STRATEGY_TITLES: dict[str, str] = {
    "centroid-kmeans": "Centroid-init K-Means", "hierarchical": "Hierarchical (Ward)", "gmm": "GMM",
    "kmeans": "Standard K-Means", "dbscan": "DBSCAN",
}
# Table I of the paper (58 models: 8 bases, 50 derivatives, five families).
PAPER_ACCURACY: dict[str, float] = {"centroid-kmeans": 0.94, "hierarchical": 0.78, "gmm": 0.76, "kmeans": 0.54,
                                    "dbscan": 0.44}
# DBSCAN: a point with one other model within eps is a core point (a family can be a base and one
# derivative); eps is the 90th percentile of nearest-neighbour distances, so most models have a
# neighbour within reach, whatever the scale of the space.
DBSCAN_MIN_SAMPLES = 2
DBSCAN_NEIGHBOUR_QUANTILE = 0.9
SEED_RUNS = 10
SEEDED_STRATEGIES: frozenset[str] = frozenset({"kmeans", "gmm"})


@dataclass(frozen=True)
class StudySettings:
    """How the study clusters: space, PCA size, seed; DBSCAN's eps (None: from the data)."""

    space: str = DEFAULT_SPACE
    pca_components: int = DEFAULT_PCA_COMPONENTS
    random_state: int = RANDOM_STATE
    dbscan_eps: float | None = None


@dataclass(frozen=True)
class StudyModel:
    """One model of the study: id, true family, base or derivative, parent, 2-D PCA position (plots)."""

    id: str
    family: str
    base: bool
    parent: str | None
    x: float
    y: float


@dataclass
class StrategyResult:
    """One strategy's clustering and how well it matches the families."""

    strategy: str
    title: str
    clusters: list[int]  # cluster per model, -1 = DBSCAN noise
    assigned: list[str | None]  # family per model after mapping (None: noise or unmatched cluster)
    accuracy: float  # derivatives in a cluster of their own family (majority mapping)
    hungarian_accuracy: float  # one-to-one matching of clusters to lineage groups
    adjusted_rand: float  # against the lineage groups
    correct: int
    evaluated: int
    n_clusters: int
    paper_accuracy: float
    misclassified: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)
    parent_accuracy: float | None = None  # centroid K-Means: derivatives in their own parent's cluster
    seed_accuracies: list[float] | None = None  # K-Means, GMM: accuracy for random_state 0..SEED_RUNS-1


@dataclass
class ClusteringStudy:
    """Table I on the user's fingerprints: every strategy's result plus what the plots need."""

    models: list[StudyModel]
    families: list[str]
    bases: list[str]
    space: dict[str, Any]
    projection_variance: list[float]
    results: list[StrategyResult]
    settings: dict[str, Any]
    caveats: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the study report."""
        return asdict(self)

    def result(self, strategy: str) -> StrategyResult:
        """The result of one strategy by name."""
        return next(r for r in self.results if r.strategy == strategy)


def _majority_mapping(clusters: np.ndarray, families: Sequence[str], bases: Sequence[bool]) -> dict[int, str]:
    """Each cluster's majority family (ties: a base's family in the cluster, then alphabetical)."""
    mapping: dict[int, str] = {}
    for cluster in sorted(set(clusters.tolist()) - {-1}):
        members = np.flatnonzero(clusters == cluster).tolist()
        counts = Counter(families[i] for i in members)
        top = max(counts.values())
        tied = sorted(f for f, c in counts.items() if c == top)
        base_families = [families[i] for i in members if bases[i] and families[i] in tied]
        mapping[cluster] = sorted(base_families)[0] if base_families else tied[0]
    return mapping


def _hungarian_mapping(clusters: np.ndarray, groups: Sequence[str]) -> dict[int, str]:
    """One-to-one matching of clusters to groups maximising the models matched."""
    ids = sorted(set(clusters.tolist()) - {-1})
    names = sorted(set(groups))
    if not ids:
        return {}
    counts = np.zeros((len(ids), len(names)))
    for c, f in zip(clusters.tolist(), groups):
        if c != -1:
            counts[ids.index(c), names.index(f)] += 1
    rows, cols = linear_sum_assignment(-counts)
    return {ids[r]: names[c] for r, c in zip(rows, cols)}


def lineage_groups(references: Sequence[Reference]) -> list[str]:
    """The group of each model: its base (itself for a base, its parent for a derivative) when every
    derivative names a labelled parent, else its family."""
    ids = {r.id for r in references}
    if all(r.base or r.parent in ids for r in references):
        return [r.id if r.base else str(r.parent) for r in references]
    return [r.family for r in references]


def _score(clusters: np.ndarray, mapping: dict[int, str], families: Sequence[str], evaluate: Sequence[int]) -> int:
    return sum(1 for i in evaluate if mapping.get(int(clusters[i])) == families[i])


def _dbscan_eps(points: np.ndarray) -> float:
    distances = euclidean(points, points)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.min(axis=1)
    eps = float(np.quantile(nearest, DBSCAN_NEIGHBOUR_QUANTILE))
    return eps if eps > 0 else 1e-9


def _cluster(strategy: str, points: np.ndarray, base_idx: list[int], settings: StudySettings
             ) -> tuple[np.ndarray, dict[str, Any]]:
    k = len(base_idx)
    seed = settings.random_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if strategy == "centroid-kmeans":
            model = centroid_kmeans(points, base_idx, random_state=seed)
            return model.labels_.astype(int), {"n_clusters": k, "init": "bases", "iterations": int(model.n_iter_)}
        if strategy == "kmeans":
            labels = KMeans(n_clusters=k, init="random", n_init=1, random_state=seed).fit_predict(points)
            return labels.astype(int), {"n_clusters": k, "init": "random", "n_init": 1, "random_state": seed}
        if strategy == "gmm":
            gmm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=1e-4, random_state=seed)
            return gmm.fit(points).predict(points).astype(int), {
                "n_components": k, "covariance_type": "full", "reg_covar": 1e-4, "random_state": seed}
        if strategy == "hierarchical":
            labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(points)
            return labels.astype(int), {"n_clusters": k, "linkage": "ward"}
        if strategy == "dbscan":
            eps = settings.dbscan_eps if settings.dbscan_eps is not None else _dbscan_eps(points)
            labels = DBSCAN(eps=eps, min_samples=DBSCAN_MIN_SAMPLES).fit_predict(points)
            return labels.astype(int), {"eps": eps, "min_samples": DBSCAN_MIN_SAMPLES,
                                        "eps_rule": "given" if settings.dbscan_eps is not None else
                                        f"{DBSCAN_NEIGHBOUR_QUANTILE:.0%} quantile of nearest-neighbour distances"}
    raise InputError(f"unknown clustering strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def clustering_study(references: Sequence[Reference], settings: StudySettings = StudySettings(),
                     strategies: Sequence[str] = STRATEGIES) -> ClusteringStudy:
    """Run every strategy on labelled fingerprints (bases and derivatives) and score each.

    Raises InputError without at least two bases and one derivative, IncompatibleFingerprintsError
    when the fingerprints were made differently.
    """
    base_idx = [i for i, r in enumerate(references) if r.base]
    evaluate = [i for i, r in enumerate(references) if not r.base]
    if len(base_idx) < 2:
        raise InputError(f"the clustering study needs at least two base models; the labels mark {len(base_idx)}")
    if not evaluate:
        raise InputError("the clustering study needs derivatives to score; every labelled model is a base "
                         "(mark derivatives with `parent: BASE` or `base: false` in the labels file)")
    fps = [r.fingerprint for r in references]
    compat = comparability(fps)
    space = FeatureSpace.fit(fps, compat.features, settings.space, settings.pca_components)
    points = space.transform(fps)
    plane = FeatureSpace.fit(fps, compat.features, "pca", 2)
    xy = plane.transform(fps)
    if xy.shape[1] == 1:
        xy = np.hstack([xy, np.zeros_like(xy)])
    families = [r.family for r in references]
    groups = lineage_groups(references)
    group_family = dict(zip(groups, families))
    is_base = [r.base for r in references]
    ids = [r.id for r in references]
    results = []
    for strategy in strategies:
        clusters, parameters = _cluster(strategy, points, base_idx, settings)
        if strategy == "centroid-kmeans":
            mapping = {k: families[b] for k, b in enumerate(base_idx)}
            hungarian = mapping
        else:
            mapping = _majority_mapping(clusters, families, is_base)
            hungarian = {c: group_family[g] for c, g in _hungarian_mapping(clusters, groups).items()}
        correct = _score(clusters, mapping, families, evaluate)
        seed_accuracies = None
        if strategy in SEEDED_STRATEGIES:
            seed_accuracies = []
            for seed in range(SEED_RUNS):
                other, _ = _cluster(strategy, points, base_idx, replace(settings, random_state=seed))
                other_mapping = _majority_mapping(other, families, is_base)
                seed_accuracies.append(_score(other, other_mapping, families, evaluate) / len(evaluate))
        parent_accuracy = None
        if strategy == "centroid-kmeans":
            parents = [(i, references[i].parent) for i in evaluate if references[i].parent in ids]
            if parents:
                own = sum(1 for i, p in parents if ids[base_idx[int(clusters[i])]] == p)
                parent_accuracy = own / len(parents)
        results.append(StrategyResult(
            strategy=strategy, title=STRATEGY_TITLES[strategy], clusters=clusters.tolist(),
            assigned=[mapping.get(int(c)) for c in clusters], accuracy=correct / len(evaluate),
            hungarian_accuracy=_score(clusters, hungarian, families, evaluate) / len(evaluate),
            adjusted_rand=float(adjusted_rand_score(groups, clusters)), correct=correct, evaluated=len(evaluate),
            n_clusters=len(set(clusters.tolist()) - {-1}), paper_accuracy=PAPER_ACCURACY[strategy],
            misclassified=[ids[i] for i in evaluate if mapping.get(int(clusters[i])) != families[i]],
            parameters=parameters, parent_accuracy=parent_accuracy, seed_accuracies=seed_accuracies))
    models = [StudyModel(id=r.id, family=r.family, base=r.base, parent=r.parent, x=float(xy[i, 0]), y=float(xy[i, 1]))
              for i, r in enumerate(references)]
    return ClusteringStudy(
        models=models, families=sorted(set(families)), bases=[ids[i] for i in base_idx], space=space.describe(),
        projection_variance=plane.explained_variance or [], results=results,
        settings=asdict(settings), caveats=[*compat.caveats, *space.caveats, *duplicate_bases(points, base_idx, ids)])
