"""Model-or-fingerprint arguments: which is which, and which settings a model is fingerprinted with."""

from __future__ import annotations

import numpy as np
import pytest

from tg_verify.analysis.inputs import is_fingerprint_path, load_or_fingerprint, settings_like
from tg_verify.errors import InputError
from tg_verify.fingerprint.settings import FingerprintSettings


def test_json_files_are_fingerprints_but_shard_indexes_and_directories_are_models(tmp_path):
    assert is_fingerprint_path(tmp_path / "ref.json")
    assert not is_fingerprint_path(tmp_path / "model.safetensors.index.json")
    assert not is_fingerprint_path(tmp_path / "model.safetensors")
    (tmp_path / "weird.json").mkdir()
    assert not is_fingerprint_path(tmp_path / "weird.json")


def test_settings_follow_the_first_native_fingerprint(make_fp):
    recorded = FingerprintSettings(seed=5, repeats=12).to_dict() | {"device": "cuda"}
    legacy = make_fp("old", np.ones(16), legacy=True)
    native = make_fp("new", np.ones(16), settings=recorded)
    chosen = settings_like([legacy, native], device="cpu")
    assert (chosen.seed, chosen.repeats, chosen.device) == (5, 12, "cpu")
    assert settings_like([legacy]) == FingerprintSettings()
    assert settings_like([native]).device == "auto"


def test_missing_fingerprint_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such fingerprint"):
        load_or_fingerprint(tmp_path / "absent.json", FingerprintSettings())
