"""Fingerprint documents are untrusted input: hand-edited JSON fails with one clear line; valid ones round-trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tg_verify.cli import main
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.document import FEATURE_NAMES, Fingerprint, load

FEATURES = {name: float(i + 1) / 7 for i, name in enumerate(FEATURE_NAMES)}


def native(**overrides: Any) -> dict[str, Any]:
    document = Fingerprint(model_name="m", features=dict(FEATURES), settings={"seed": 0, "repeats": 30},
                           tool={"name": "tg-verify"},
                           artifact={"layout": "single", "files": [{"path": "model.safetensors", "size": 8,
                                                                    "sha256": "ab" * 32}]}).to_dict()
    document.update(overrides)
    return document


def write(tmp_path: Path, document: Any, raw: str | None = None) -> Path:
    path = tmp_path / "fp.json"
    path.write_text(raw if raw is not None else json.dumps(document))
    return path


def test_a_native_document_round_trips_byte_identically(tmp_path: Path) -> None:
    path = write(tmp_path, native())
    first = load(path)
    path.write_bytes(first.to_json_bytes())
    second = load(path)
    assert second.to_json_bytes() == first.to_json_bytes() and second.digest() == first.digest()
    assert second.features == FEATURES and not second.legacy and second.file_digests == {"model.safetensors": "ab" * 32}


def test_the_papers_flat_format_is_imported_as_legacy(tmp_path: Path) -> None:
    fp = load(write(tmp_path, {**FEATURES, "model_name": "llama-3.2-1b"}))
    assert fp.legacy and fp.model_name == "llama-3.2-1b" and fp.feature_version == "tensorguard-release"
    assert fp.settings == {"legacy": True} and fp.sketch is None and fp.features == FEATURES


def _without(name: str) -> dict[str, float]:
    return {k: v for k, v in FEATURES.items() if k != name}


HAND_EDITED = [
    (native(format_version=2), "format_version 2 is not supported"),
    (native(schema="https://example.com/other"), "'schema' must be"),
    (native(features=_without("global_std")), "features lack global_std"),
    (native(features={**FEATURES, "global_entropy": 1.0}), "unknown features global_entropy"),
    (native(features={**FEATURES, "ffn_norm": "3.1"}), "features.ffn_norm: expected a number"),
    (native(features={**FEATURES, "ffn_norm": True}), "features.ffn_norm: expected a number"),
    (native(features={**FEATURES, "total_params": 10 ** 400}), "features.total_params: expected a finite number"),
    (native(surprise=1), "unknown fields surprise"),
    (native(model_name=5), "'model_name' must be a string"),
    (native(settings=[]), "'settings' must be an object"),
    (native(legacy="yes"), "'legacy' must be true or false"),
    (native(tensors={"a": 1}), "'tensors' must be a list"),
    (native(sketch="AAAA"), "'sketch' must be an object"),
    (native(artifact={"files": [{"path": "m.safetensors", "sha256": "zz" * 32}]}), "artifact.files must be"),
    ({**_without("num_layers"), "model_name": "x"}, "features lack num_layers"),
    ({**FEATURES, "model_name": "x", "extra": 1}, "legacy fingerprint has unknown keys extra"),
    ([1, 2, 3], "must be a JSON object"),
]


@pytest.mark.parametrize(("document", "expected"), HAND_EDITED)
def test_hand_edited_documents_fail_naming_file_and_field(tmp_path: Path, document: Any, expected: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(FingerprintFormatError) as info:
        load(path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value), str(info.value)


@pytest.mark.parametrize(("raw", "expected"), [
    (json.dumps(native()).replace('"global_mean": ' + json.dumps(FEATURES["global_mean"]), '"global_mean": NaN'),
     "non-finite number NaN"),
    (json.dumps(native()).replace('"global_mean": ' + json.dumps(FEATURES["global_mean"]), '"global_mean": 1e400'),
     "overflows to infinity"),
    ('{"model_name": "a", "model_name": "b"}', "duplicate key 'model_name'"),
    ('{"schema": ', "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
])
def test_non_finite_duplicate_and_broken_json_are_refused(tmp_path: Path, raw: str, expected: str) -> None:
    with pytest.raises(FingerprintFormatError, match=expected):
        load(write(tmp_path, None, raw))


def test_binary_directory_and_fifo_are_refused_without_blocking(tmp_path: Path) -> None:
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FingerprintFormatError, match="not UTF-8"):
        load(binary)
    with pytest.raises(FingerprintFormatError, match="not a regular file"):
        load(tmp_path)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(FingerprintFormatError, match="not a regular file"):
        load(fifo)


def test_the_cli_turns_a_bad_fingerprint_into_exit_2_and_one_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, native())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(native(features=_without("ffn_std"))))
    assert main(["compare", str(bad), str(good)]) == 2
    err = capsys.readouterr().err
    assert "features lack ffn_std" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
