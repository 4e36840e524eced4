"""FingerprintSettings: defaults, validation, what is recorded and what makes fingerprints comparable."""

from __future__ import annotations

import pytest

from tg_verify.errors import UsageError
from tg_verify.fingerprint.settings import FingerprintSettings


def test_defaults_follow_the_paper_and_release():
    s = FingerprintSettings()
    assert (s.seed, s.repeats, s.strategy, s.epsilon, s.noise_scale) == (0, 30, "random", 0.03, 0.1)
    assert (s.structural_scale, s.structural_band, s.low_band, s.high_band) == (1.0, 0.25, 0.125, 0.5)
    assert s.device == "auto" and s.sketch is True


@pytest.mark.parametrize("bad", [{"seed": -1}, {"seed": 1.5}, {"repeats": 0}, {"repeats": True},
                                 {"strategy": "fgsm"}, {"device": "tpu"}, {"epsilon": float("nan")},
                                 {"noise_scale": -0.1}, {"low_band": 0.0}, {"high_band": 1.5}, {"sketch": "yes"}])
def test_invalid_settings_are_usage_errors_naming_the_field(bad):
    with pytest.raises(UsageError, match=next(iter(bad))):
        FingerprintSettings(**bad)


def test_recorded_settings_and_compatibility():
    a = FingerprintSettings(device="cpu", sketch=False)
    recorded = a.to_dict()
    assert "sketch" not in recorded and recorded["device"] == "cpu"
    assert a.compatible_with(FingerprintSettings(device="cuda"))  # device and sketch do not change values
    assert a.compatible_with({**recorded, "device": "cuda"})
    for change in ({"seed": 1}, {"repeats": 29}, {"strategy": "gaussian"}, {"epsilon": 0.05}, {"low_band": 0.2}):
        assert not a.compatible_with(FingerprintSettings(**change))


def test_round_trip_through_the_document_form():
    s = FingerprintSettings(seed=5, repeats=12, strategy="structural")
    assert FingerprintSettings.from_dict(s.to_dict()) == FingerprintSettings(seed=5, repeats=12,
                                                                             strategy="structural")
    assert FingerprintSettings.from_dict(s.to_dict(), repeats=3).repeats == 3
    with pytest.raises(UsageError, match="unknown keys"):
        FingerprintSettings.from_dict({"temperature": 1})
