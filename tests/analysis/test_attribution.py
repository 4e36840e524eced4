"""Centroid-initialised K-Means attribution of an unknown model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tg_verify.analysis.attribution import ClassifierSettings, centroid_kmeans, classify
from tg_verify.analysis.references import Reference
from tg_verify.atomic import canonical_json
from tg_verify.errors import IncompatibleFingerprintsError, InputError


def _derivative_of(make_fp, ref: Reference, scale: float = 0.05, seed: int = 99):
    values = np.array(ref.fingerprint.vector(tuple(ref.fingerprint.features)))
    rng = np.random.default_rng(seed)
    moved = values * (1 + rng.normal(0, scale, len(values)))
    moved[15] = values[15]  # num_layers: a fine-tune keeps the depth
    return make_fp("unknown", moved)


def test_a_derivative_is_attributed_to_its_family_and_base(family_set, make_fp):
    qwen = next(r for r in family_set if r.id == "qwen-a")
    result = classify(_derivative_of(make_fp, qwen), family_set)
    assert result.family == "qwen" and result.base == "qwen-a"
    assert not result.out_of_cluster and result.distance < result.threshold
    assert result.centroids[0].base == "qwen-a" and result.centroids[0].distance == result.distance
    assert result.margin == pytest.approx(result.centroids[1].distance - result.distance)
    assert 0 <= result.ratio < 1
    assert result.references[0].family == "qwen"
    assert {c.base for c in result.centroids} == {r.id for r in family_set if r.base}
    assert len(result.references) == len(family_set)
    assert "qwen-a-ft0" in result.centroids[0].members


def test_centroids_move_away_from_the_bases(family_set):
    """Centroids start at the bases and converge to the means of their members."""
    from tg_verify.analysis.space import FeatureSpace
    from tg_verify.fingerprint.document import VECTOR_FEATURES

    fps = [r.fingerprint for r in family_set]
    points = FeatureSpace.fit(fps, VECTOR_FEATURES).transform(fps)
    bases = [i for i, r in enumerate(family_set) if r.base]
    model = centroid_kmeans(points, bases)
    for k, b in enumerate(bases):
        members = points[model.labels_ == k]
        np.testing.assert_allclose(model.cluster_centers_[k], members.mean(axis=0), atol=1e-9)
        assert not np.allclose(model.cluster_centers_[k], points[b])
        assert model.labels_[b] == k


def test_far_model_is_out_of_cluster(family_set, make_fp):
    values = np.array(family_set[0].fingerprint.vector(tuple(family_set[0].fingerprint.features))) * -50
    values[15] = 10.0  # the depth every reference has: the candidate is far, not outside their span
    result = classify(make_fp("alien", values), family_set)
    assert result.meaningful and result.out_of_cluster and result.distance > 7.0


def test_threshold_is_a_setting(family_set, make_fp):
    qwen = next(r for r in family_set if r.id == "qwen-a")
    candidate = _derivative_of(make_fp, qwen)
    tight = classify(candidate, family_set, ClassifierSettings(threshold=1e-6))
    assert tight.out_of_cluster and tight.threshold == 1e-6 and tight.family == "qwen"


def test_family_margin_skips_same_family_bases(family_set, make_fp):
    llama = next(r for r in family_set if r.id == "llama-a")
    result = classify(_derivative_of(make_fp, llama), family_set)
    other = min(c.distance for c in result.centroids if c.family != "llama")
    assert result.family_margin == pytest.approx(other - result.distance)


def test_the_result_does_not_depend_on_the_k_means_seed_or_the_run(family_set, make_fp):
    """The centroids start at the bases (one start, no random choice): another random_state, or a second run,
    gives the same bytes. The 26 references fit a scale of their own, so K-Means does run here."""
    candidate = _derivative_of(make_fp, family_set[3])
    result = classify(candidate, family_set)
    assert result.scale == "references" and result.meaningful and result.iterations >= 1
    first = canonical_json(result.to_dict())
    for seed in (0, 1, 7, 2**31 - 1):
        again = classify(candidate, family_set, ClassifierSettings(random_state=seed))
        assert canonical_json(again.to_dict()) == first, seed
    json.loads(first)


def test_pca_space_is_supported_and_says_so(family_set, make_fp):
    qwen = next(r for r in family_set if r.id == "qwen-a")
    result = classify(_derivative_of(make_fp, qwen), family_set, ClassifierSettings(space="pca"))
    assert result.family == "qwen" and result.space["space"] == "pca" and result.space["pca_components"] == 2
    assert any("PCA" in c for c in result.caveats)


def test_incompatible_candidate_is_refused(family_set, make_fp):
    candidate = make_fp("x", np.ones(16), settings={"seed": 5, "repeats": 30})
    with pytest.raises(IncompatibleFingerprintsError):
        classify(candidate, family_set)


def test_legacy_candidate_is_compared_with_a_caveat(family_set, make_fp):
    qwen = next(r for r in family_set if r.id == "qwen-a")
    values = np.array(qwen.fingerprint.vector(tuple(qwen.fingerprint.features)))
    legacy = make_fp("legacy-qwen", values * 1.001, legacy=True)
    result = classify(legacy, family_set)
    assert result.legacy and result.family == "qwen"
    assert "num_layers" not in result.space["features"]
    assert any("legacy" in c for c in result.caveats)


def test_candidate_differing_on_a_constant_feature_is_flagged(family_set, make_fp):
    qwen = next(r for r in family_set if r.id == "qwen-a")
    values = np.array(qwen.fingerprint.vector(tuple(qwen.fingerprint.features)))
    values[15] = 12.0  # num_layers: 10 for every reference
    result = classify(make_fp("deeper", values), family_set)
    assert any("differs from every reference on num_layers" in c for c in result.caveats)


def test_needs_a_base(family_set, make_fp):
    derivatives = [dataclasses.replace(r, base=False) for r in family_set]
    with pytest.raises(InputError, match="no reference is a base"):
        classify(make_fp("x", np.ones(16)), derivatives)
    with pytest.raises(InputError, match="needs at least one reference"):
        classify(make_fp("x", np.ones(16)), [])


def test_identical_bases_are_reported(family_set, make_fp):
    twin = dataclasses.replace(family_set[0], id="llama-twin")
    values = np.array(family_set[0].fingerprint.vector(tuple(family_set[0].fingerprint.features)))
    result = classify(make_fp("x", values), [*family_set, twin])
    assert any("identical fingerprints" in c for c in result.caveats)


def test_candidate_that_is_a_reference_is_flagged(family_set, make_fp):
    qwen = next(r for r in family_set if r.id == "qwen-a")
    qwen.fingerprint.artifact["root_digest"] = "ab" * 32
    candidate = _derivative_of(make_fp, qwen)
    assert not any("classified against itself" in c for c in classify(candidate, family_set).caveats)
    candidate.artifact["root_digest"] = "ab" * 32
    assert any("qwen-a (same root digest)" in c for c in classify(candidate, family_set).caveats)


def test_attribution_does_not_depend_on_the_order_of_the_references(family_set, make_fp):
    """A policy's verdict never depends on the order its references (or a directory's files) come in."""
    for target in family_set:
        candidate = _derivative_of(make_fp, target)
        forward = classify(candidate, family_set)
        backward = classify(candidate, list(reversed(family_set)))
        assert (backward.family, backward.base, backward.out_of_cluster) == \
            (forward.family, forward.base, forward.out_of_cluster)
        assert backward.distance == pytest.approx(forward.distance, rel=1e-9, abs=1e-12)
        by_id = {c.base: c.distance for c in forward.centroids}
        assert {c.base: c.distance for c in backward.centroids} == pytest.approx(by_id, rel=1e-9, abs=1e-12)
