"""Scaling, PCA and distances, including the degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest

from tg_verify.analysis.space import FeatureSpace, euclidean, feature_matrix, relative_distance
from tg_verify.errors import UsageError
from tg_verify.fingerprint.document import VECTOR_FEATURES


def test_standardized_points_are_z_scores_of_the_references(family_set):
    fps = [r.fingerprint for r in family_set]
    space = FeatureSpace.fit(fps, VECTOR_FEATURES)
    points = space.transform(fps)
    raw = feature_matrix(fps, VECTOR_FEATURES)
    varying = raw.std(axis=0) > 0
    np.testing.assert_allclose(points[:, varying], (raw[:, varying] - raw[:, varying].mean(0)) / raw[:, varying].std(0))
    assert space.zero_variance == ("num_layers",)
    assert any("num_layers" in c for c in space.caveats)


def test_scaling_removes_the_units(family_set):
    """Without scaling the 1e8-scale total_params or norms would dominate; after it no feature does."""
    fps = [r.fingerprint for r in family_set]
    points = FeatureSpace.fit(fps, VECTOR_FEATURES).transform(fps)
    spread = points.std(axis=0)
    assert np.allclose(spread[spread > 0], 1.0)


def test_pca_distances_never_exceed_standardized_ones(family_set):
    fps = [r.fingerprint for r in family_set]
    full = FeatureSpace.fit(fps, VECTOR_FEATURES)
    pca = FeatureSpace.fit(fps, VECTOR_FEATURES, space="pca", pca_components=2)
    d_full = euclidean(full.transform(fps), full.transform(fps))
    d_pca = euclidean(pca.transform(fps), pca.transform(fps))
    assert pca.transform(fps).shape == (len(fps), 2)
    assert np.all(d_pca <= d_full + 1e-9)
    assert pca.explained_variance is not None and 0 < sum(pca.explained_variance) <= 1 + 1e-12
    assert any("threshold of 7" in c for c in pca.caveats)


def test_single_reference_is_raw_units_with_a_caveat(make_fp):
    ref = make_fp("only", np.linspace(1, 2, 16))
    space = FeatureSpace.fit([ref], VECTOR_FEATURES)
    other = make_fp("other", np.linspace(1, 2, 16) + 0.5)
    assert euclidean(space.transform([ref]), space.transform([other]))[0, 0] == pytest.approx(0.5 * np.sqrt(15))
    assert any("single reference" in c for c in space.caveats)


def test_pca_with_few_references_caps_components(make_fp):
    refs = [make_fp(f"m{i}", np.linspace(1, 2, 16) * (i + 1)) for i in range(2)]
    space = FeatureSpace.fit(refs, VECTOR_FEATURES, space="pca", pca_components=5)
    assert space.transform(refs).shape[1] == 2


def test_unknown_space_is_a_usage_error(make_fp):
    with pytest.raises(UsageError, match="unknown distance space"):
        FeatureSpace.fit([make_fp("a", np.ones(16))], VECTOR_FEATURES, space="cosine")


def test_relative_distance_is_scale_free_and_bounded():
    a = np.array([1e-6, 10.0, -3.0])
    assert relative_distance(a, a) == 0.0
    assert relative_distance(a, a * 1.1) == pytest.approx(relative_distance(a * 1e5, a * 1.1e5))
    assert relative_distance(a, -a) == pytest.approx(1.0)
    assert relative_distance([0.0], [0.0]) == 0.0
