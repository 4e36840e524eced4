"""The paper's Table I study on labelled fingerprints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tg_verify.analysis.clustering import (
    PAPER_ACCURACY,
    SEED_RUNS,
    STRATEGIES,
    StudySettings,
    _hungarian_mapping,
    _majority_mapping,
    clustering_study,
    lineage_groups,
)
from tg_verify.atomic import canonical_json
from tg_verify.errors import InputError


def test_every_strategy_is_scored_on_derivatives(family_set):
    study = clustering_study(family_set)
    assert [r.strategy for r in study.results] == list(STRATEGIES)
    derivatives = sum(1 for r in family_set if not r.base)
    for result in study.results:
        assert result.evaluated == derivatives
        assert result.accuracy == result.correct / derivatives
        assert result.paper_accuracy == PAPER_ACCURACY[result.strategy]
        assert len(result.clusters) == len(result.assigned) == len(family_set)
        assert -1 <= result.adjusted_rand <= 1
    centroid = study.result("centroid-kmeans")
    assert centroid.accuracy == 1.0 and centroid.parent_accuracy == 1.0 and centroid.misclassified == []
    assert centroid.n_clusters == len(study.bases) and centroid.adjusted_rand == 1.0
    for name in ("kmeans", "gmm"):
        seeds = study.result(name).seed_accuracies
        assert seeds is not None and len(seeds) == SEED_RUNS and all(0 <= a <= 1 for a in seeds)
    assert study.result("hierarchical").seed_accuracies is None


def test_lineage_groups_follow_parents_or_fall_back_to_families(family_set):
    groups = lineage_groups(family_set)
    assert groups[:2] == ["llama-a", "llama-a"] and "qwen-a" in groups
    orphan = dataclasses.replace(family_set[1], parent=None)
    assert lineage_groups([family_set[0], orphan]) == ["llama", "llama"]


def test_hungarian_accuracy_penalises_two_clusters_claiming_one_group(family_set, make_fp):
    """Two qwen fine-tunes drift far from their base and the two llama lineages sit together, so Ward (k = five
    bases) splits qwen in two and merges the llamas. Majority mapping lets both qwen halves claim 'qwen' (every
    derivative right); the one-to-one matching gives one half to the llama-b group, so its two models count wrong."""
    def vector(ref_id: str) -> np.ndarray:
        ref = next(r for r in family_set if r.id == ref_id)
        return np.array(ref.fingerprint.vector(tuple(ref.fingerprint.features)))

    llama, qwen = vector("llama-a"), vector("qwen-a")
    spread = np.abs(qwen) + np.abs(llama)
    rng = np.random.default_rng(1)

    def moved(ref):
        if ref.id.startswith("llama-b"):
            values = llama * (1 + rng.normal(0, 0.01, len(llama)))
        elif ref.id in ("qwen-a-ft3", "qwen-a-ft4"):
            values = qwen + 3 * spread * (1 + rng.normal(0, 0.01, len(qwen)))
        else:
            return ref
        values[15] = 10.0
        return dataclasses.replace(ref, fingerprint=make_fp(ref.id, values))

    references = [moved(r) for r in family_set]
    result = clustering_study(references, strategies=("hierarchical",)).result("hierarchical")
    cluster = dict(zip([r.id for r in references], result.clusters))
    assert cluster["qwen-a"] == cluster["qwen-a-ft0"] != cluster["qwen-a-ft3"] == cluster["qwen-a-ft4"]  # split
    assert cluster["llama-a"] == cluster["llama-b"] == cluster["llama-b-ft0"]  # merged
    assert result.accuracy == 1.0 and result.misclassified == []
    assert result.hungarian_accuracy == pytest.approx((result.evaluated - 2) / result.evaluated)
    assert result.adjusted_rand < 1


def test_misclassification_is_counted(family_set, make_fp):
    """A derivative labelled 'qwen' sitting on the gemma base must count as wrong."""
    gemma = next(r for r in family_set if r.id == "gemma-a")
    values = np.array(gemma.fingerprint.vector(tuple(gemma.fingerprint.features)))
    impostor = dataclasses.replace(family_set[-1], id="impostor", family="qwen", parent="qwen-a",
                                   fingerprint=make_fp("impostor", values * 1.0001))
    study = clustering_study([*family_set, impostor])
    centroid = study.result("centroid-kmeans")
    assert centroid.misclassified == ["impostor"]
    assert centroid.correct == centroid.evaluated - 1


def test_study_is_deterministic(family_set):
    first = canonical_json(clustering_study(family_set).to_dict())
    assert canonical_json(clustering_study(family_set).to_dict()) == first


def test_pca_space_and_given_dbscan_eps(family_set):
    study = clustering_study(family_set, StudySettings(space="pca", pca_components=2, dbscan_eps=0.5))
    assert study.space["space"] == "pca"
    assert study.result("dbscan").parameters["eps"] == 0.5
    assert study.result("dbscan").parameters["eps_rule"] == "given"


def test_projection_coordinates_are_recorded(family_set):
    study = clustering_study(family_set)
    xs = np.array([m.x for m in study.models])
    assert xs.std() > 0 and len(study.projection_variance) == 2


def test_needs_bases_and_derivatives(family_set):
    with pytest.raises(InputError, match="derivatives to score"):
        clustering_study([r for r in family_set if r.base])
    with pytest.raises(InputError, match="at least two base"):
        clustering_study([family_set[0], family_set[1]])


def test_majority_and_hungarian_mappings():
    clusters = np.array([0, 0, 0, 1, 1, 2, -1])
    families = ["a", "a", "b", "a", "a", "b", "b"]
    bases = [True, False, False, False, False, True, False]
    assert _majority_mapping(clusters, families, bases) == {0: "a", 1: "a", 2: "b"}
    hungarian = _hungarian_mapping(clusters, families)
    assert sorted(hungarian.values()) == ["a", "b"] and len(hungarian) == 2
    assert -1 not in hungarian


def test_legacy_fingerprints_join_the_study_with_a_caveat(family_set, make_fp):
    old = family_set[1]
    values = np.array(old.fingerprint.vector(tuple(old.fingerprint.features)))
    legacy = dataclasses.replace(old, id="legacy-ft", fingerprint=make_fp("legacy-ft", values, legacy=True))
    study = clustering_study([*family_set, legacy])
    assert "num_layers" not in study.space["features"]
    assert any("legacy" in c for c in study.caveats)
    assert "legacy-ft" not in study.result("centroid-kmeans").misclassified
