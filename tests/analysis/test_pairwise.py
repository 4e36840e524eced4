"""Pairwise comparison: the scale-free distance alone, and the paper's distance under a reference scale."""

from __future__ import annotations

import numpy as np
import pytest

from tg_verify.analysis.pairwise import NO_REFERENCES_NOTE, compare
from tg_verify.analysis.space import FeatureSpace, euclidean
from tg_verify.errors import IncompatibleFingerprintsError
from tg_verify.fingerprint.document import VECTOR_FEATURES


def test_without_references_only_the_relative_distance_is_reported(family_set):
    a, b = family_set[0].fingerprint, family_set[1].fingerprint
    result = compare(a, b)
    assert result.distance is None and result.within_threshold is None and result.space is None
    assert 0 < result.relative_distance < 1
    assert NO_REFERENCES_NOTE in result.caveats
    assert [f.name for f in result.features] == list(VECTOR_FEATURES)
    assert compare(a, a).relative_distance == 0.0


def test_with_references_the_distance_is_in_their_standardised_space(family_set):
    fps = [r.fingerprint for r in family_set]
    a, b = fps[0], fps[7]
    result = compare(a, b, references=fps)
    space = FeatureSpace.fit(fps, VECTOR_FEATURES)
    expected = euclidean(space.transform([a]), space.transform([b]))[0, 0]
    assert result.distance == pytest.approx(expected)
    assert result.within_threshold == (expected <= 7.0)
    z = np.array([f.z_a - f.z_b for f in result.features])
    assert np.linalg.norm(z) == pytest.approx(expected)


def test_derivative_is_closer_than_another_family(family_set):
    fps = [r.fingerprint for r in family_set]
    base, derivative = family_set[0], family_set[1]
    other = next(r for r in family_set if r.family == "gemma")
    near = compare(base.fingerprint, derivative.fingerprint, references=fps)
    far = compare(base.fingerprint, other.fingerprint, references=fps)
    assert near.distance < far.distance
    assert near.relative_distance < far.relative_distance


def test_compare_is_symmetric(family_set):
    fps = [r.fingerprint for r in family_set]
    ab, ba = compare(fps[0], fps[9], fps), compare(fps[9], fps[0], fps)
    assert ab.distance == pytest.approx(ba.distance) and ab.relative_distance == pytest.approx(ba.relative_distance)


def test_incompatible_pair_is_refused(make_fp):
    with pytest.raises(IncompatibleFingerprintsError):
        compare(make_fp("a", np.ones(16), settings={"seed": 0}), make_fp("b", np.ones(16), settings={"seed": 1}))


def test_legacy_pair_carries_a_caveat(make_fp):
    result = compare(make_fp("a", np.ones(16), legacy=True), make_fp("b", np.ones(16) * 2))
    assert result.legacy and any("legacy" in c for c in result.caveats)
    assert "num_layers" not in [f.name for f in result.features]
