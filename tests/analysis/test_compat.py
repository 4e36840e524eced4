"""Which fingerprints may be compared, and on which features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tg_verify.analysis.compat import LEGACY_INCOMPARABLE, comparability
from tg_verify.errors import IncompatibleFingerprintsError
from tg_verify.fingerprint.document import VECTOR_FEATURES

VALUES = np.linspace(1.0, 2.0, 16)


def test_same_settings_compare_on_all_vector_features(make_fp):
    result = comparability([make_fp("a", VALUES), make_fp("b", VALUES * 2)])
    assert result.features == VECTOR_FEATURES and not result.legacy and result.caveats == []


def test_different_settings_are_refused_naming_the_setting(make_fp):
    a = make_fp("a", VALUES, settings={"seed": 0, "repeats": 30})
    b = make_fp("b", VALUES, settings={"seed": 1, "repeats": 30})
    with pytest.raises(IncompatibleFingerprintsError, match=r"seed: 0 vs 1"):
        comparability([a, b])


def test_fingerprints_that_differ_only_in_device_compare(make_fp):
    """The device is not a comparability setting; that it does not change the values is tested on the extractor
    (tests/fingerprint/test_responses.py runs the device's whole-tensor path on the CPU)."""
    a = make_fp("a", VALUES, settings={"seed": 0, "device": "cpu"})
    b = make_fp("b", VALUES, settings={"seed": 0, "device": "cuda"})
    assert comparability([a, b]).features == VECTOR_FEATURES


def test_different_feature_versions_are_refused(make_fp):
    a, b = make_fp("a", VALUES), dataclasses.replace(make_fp("b", VALUES), feature_version="tg0")
    with pytest.raises(IncompatibleFingerprintsError, match="feature version"):
        comparability([a, b])


def test_all_legacy_compare_on_release_features_with_caveat(make_fp):
    result = comparability([make_fp("a", VALUES, legacy=True), make_fp("b", VALUES, legacy=True)])
    assert result.features == VECTOR_FEATURES and result.legacy
    assert any("settings unknown" in c for c in result.caveats)


def test_legacy_mixed_with_native_drops_incomparable_features(make_fp):
    result = comparability([make_fp("old", VALUES, legacy=True), make_fp("new", VALUES)])
    assert result.legacy
    assert not set(LEGACY_INCOMPARABLE) & set(result.features)
    assert len(result.features) == len(VECTOR_FEATURES) - len(LEGACY_INCOMPARABLE)
    assert any("old" in c and "mixed with native" in c for c in result.caveats)


def test_nothing_to_compare_is_an_error():
    with pytest.raises(IncompatibleFingerprintsError):
        comparability([])
