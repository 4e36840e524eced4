"""Reference sets: loading fingerprint files and labels, attaching labels."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tg_verify.analysis.references import build_references, fingerprint_paths, load_fingerprints, read_labels
from tg_verify.errors import InputError


def _write(tmp_path, make_fp, name, scale=1.0):
    path = tmp_path / f"{name}.json"
    path.write_bytes(make_fp(name, np.linspace(1, 2, 16) * scale).to_json_bytes())
    return path


def test_directory_expands_to_json_files_in_natural_order(tmp_path, make_fp):
    for name in ("m10", "m2", "m1"):
        _write(tmp_path, make_fp, name)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in fingerprint_paths([tmp_path])] == ["m1.json", "m2.json", "m10.json"]
    assert [fp.model_name for fp in load_fingerprints([tmp_path])] == ["m1", "m2", "m10"]


def test_missing_path_and_empty_directory_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such fingerprint"):
        fingerprint_paths([tmp_path / "nope.json"])
    with pytest.raises(InputError, match="no fingerprint files"):
        fingerprint_paths([tmp_path])


def test_legacy_flat_files_load_as_references(tmp_path):
    flat = dict.fromkeys(("global_mean", "global_std", "global_norm", "global_skewness", "global_kurtosis",
                          "attention_mean", "attention_std", "attention_norm", "ffn_mean", "ffn_std", "ffn_norm",
                          "embedding_mean", "embedding_std", "embedding_norm", "total_params", "num_layers"), 0.5)
    flat["model_name"] = "Llama-3.2-1B"
    (tmp_path / "llama.json").write_text(json.dumps(flat))
    [fp] = load_fingerprints([tmp_path])
    assert fp.legacy and fp.model_name == "Llama-3.2-1B"


def test_labels_short_and_long_forms(tmp_path):
    path = tmp_path / "labels.yml"
    path.write_text("llama-1b: llama\nacme-ft: {family: llama, parent: llama-1b}\n"
                    "qwen-7b: {family: qwen, base: true}\n")
    labels = read_labels(path)
    assert labels["llama-1b"].base and labels["llama-1b"].family == "llama"
    assert not labels["acme-ft"].base and labels["acme-ft"].parent == "llama-1b"
    assert labels["qwen-7b"].base


def test_labels_json_and_models_wrapper(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"models": {"a": "fam"}}))
    assert read_labels(path)["a"].family == "fam"


@pytest.mark.parametrize("text, message", [
    ("a: [1, 2]\n", "expected a family name"),
    ("a: {family: x, colour: red}\n", "unknown fields colour"),
    ("a: {family: x, parent: b}\n", "'b' is not a labelled model"),
    ("a: x\nb: {family: y, parent: a}\n", "differs from its parent"),
    ("a: {family: x, base: true, parent: a}\n", "cannot have a parent"),
    ("- a\n- b\n", "non-empty mapping"),
    ("a: {family: x\n", "not valid YAML"),
])
def test_bad_labels_name_the_entry(tmp_path, text, message):
    path = tmp_path / "labels.yml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_labels(path)


def test_without_labels_each_reference_is_its_own_family(make_fp):
    refs, caveats = build_references([make_fp("a", np.ones(16)), make_fp("b", np.ones(16))])
    assert [(r.id, r.family, r.base) for r in refs] == [("a", "a", True), ("b", "b", True)]
    assert caveats == []


def test_labels_match_by_model_name_or_file_stem(tmp_path, make_fp):
    fp = dataclasses.replace(make_fp("Org/Model", np.ones(16)), source=str(tmp_path / "org-model.json"))
    labels_path = tmp_path / "labels.yml"
    labels_path.write_text("org-model: fam\nunused: other\n")
    refs, caveats = build_references([fp], read_labels(labels_path))
    assert refs[0].family == "fam" and refs[0].id == "Org/Model"
    assert caveats and "unused" in caveats[0]


def test_unlabelled_fingerprint_and_duplicate_ids_are_errors(tmp_path, make_fp):
    labels_path = tmp_path / "labels.yml"
    labels_path.write_text("a: fam\n")
    with pytest.raises(InputError, match="no entry in the labels file"):
        build_references([make_fp("b", np.ones(16))], read_labels(labels_path))
    with pytest.raises(InputError, match="ids must be unique"):
        build_references([make_fp("a", np.ones(16)), make_fp("a", np.ones(16) * 2)])
