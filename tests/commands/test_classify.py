"""`tg-verify classify`: family attribution against reference fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

from tg_verify.cli import main

REAL = Path(__file__).resolve().parents[1] / "data" / "tensorguard-release"


def _refs(tiny_fingerprints) -> str:
    return str(tiny_fingerprints["llama"].parent)


def test_derivative_is_attributed_to_its_base(tiny_fingerprints, capsys):
    assert main(["classify", str(tiny_fingerprints["llama-ft"]), "--refs", _refs(tiny_fingerprints), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    result = document["classification"]
    assert result["family"] == "llama" and result["base"] == "llama" and not result["out_of_cluster"]
    assert result["distance"] == min(c["distance"] for c in result["centroids"])
    assert result["margin"] > 0 and 0 <= result["ratio"] < 1
    # five tiny references: outside the real models' population, too few to be a population themselves
    assert result["scale"] == "references" and not result["meaningful"] and not result["attribution_meaningful"]
    assert any("fitted on 5 references" in r for r in result["not_meaningful"])
    assert document["decision"] == {"family": "llama", "base": "llama", "by": "lineage", "statistics_family": None,
                                    "agrees": None}
    assert {c["base"] for c in result["centroids"]} == {"llama", "qwen2", "gemma", "phi3", "mistral"}
    derived = {entry["reference"]: entry["derived"] for entry in document["lineage"]}
    assert derived["llama"] is True and not any(v for k, v in derived.items() if k != "llama")
    assert any("no --labels" in c for c in result["caveats"])


def test_labels_give_families_and_move_centroids(tiny_fingerprints, tmp_path, capsys):
    labels = tmp_path / "labels.yml"
    labels.write_text("llama: {family: meta, base: true}\nmistral: {family: meta, base: true}\n"
                      "qwen2: alibaba\ngemma: google\nphi3: microsoft\n")
    assert main(["classify", str(tiny_fingerprints["llama-ft"]), "--refs", _refs(tiny_fingerprints),
                 "--labels", str(labels), "--json", "--no-lineage"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["classification"]["family"] == "meta" and result["lineage"] == []


def test_threshold_makes_a_model_out_of_cluster(capsys):
    candidate = REAL / "derivatives" / "unsloth_Llama-3.2-1B_features.json"
    assert main(["classify", str(candidate), "--refs", str(REAL / "bases"), "--labels", str(REAL / "bases.yaml"),
                 "--threshold", "0.0001"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "OUT OF CLUSTER" in out and "nearest family llama" in out and "on the population scale" in out


def test_real_derivative_against_the_eight_bases(capsys):
    """A Qwen2.5-7B fine-tune that a scale fitted on the eight bases put with Llama: right on the population scale."""
    candidate = REAL / "derivatives" / "Gensyn_Qwen2.5-7B-Instruct_features.json"
    args = ["classify", str(candidate), "--refs", str(REAL / "bases"), "--labels", str(REAL / "bases.yaml"), "--json"]
    assert main(args) == 0
    document = json.loads(capsys.readouterr().out)
    result = document["classification"]
    assert result["scale"] == "population" and result["meaningful"] and result["attribution_meaningful"]
    assert (result["family"], result["base"]) == ("qwen", "Qwen2.5-7B-Instruct") and not result["out_of_cluster"]
    assert result["space"]["population"]["models"] == 32 and document["lineage"] == []  # legacy: no sketches
    assert document["decision"]["by"] == "statistics" and document["decision"]["family"] == "qwen"
    assert main([*args, "--scale", "references"]) == 0
    old = json.loads(capsys.readouterr().out)["classification"]
    assert old["family"] == "llama" and old["scale"] == "references" and old["meaningful"]  # 8 references


def test_model_path_is_fingerprinted_with_the_references_settings(tiny_fingerprints, capsys):
    assert main(["classify", str(tiny_fingerprints["llama-ft-model"]), "--refs", _refs(tiny_fingerprints),
                 "--json", "--no-lineage", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)["classification"]
    assert result["family"] == "llama"


def test_stable_across_runs(tiny_fingerprints, capsys):
    args = ["classify", str(tiny_fingerprints["llama-ft"]), "--refs", _refs(tiny_fingerprints), "--json",
            "--space", "pca", "--no-lineage"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first
    assert json.loads(first)["classification"]["space"]["space"] == "pca"


def test_human_output_has_tables(tiny_fingerprints, capsys):
    assert main(["classify", str(tiny_fingerprints["llama-ft"]), "--refs", _refs(tiny_fingerprints)]) == 0
    out = capsys.readouterr().out
    out = " ".join(out.split())
    assert "lineage test: derived from llama (family llama)" in out
    assert "statistics: family attribution not meaningful" in out
    assert "cluster centres" in out and "lineage evidence" in out


def test_missing_label_and_missing_refs_are_exit_2(tiny_fingerprints, tmp_path, capsys):
    labels = tmp_path / "labels.yml"
    labels.write_text("llama: meta\n")
    assert main(["classify", str(tiny_fingerprints["llama-ft"]), "--refs", _refs(tiny_fingerprints),
                 "--labels", str(labels)]) == 2
    assert "no entry in the labels file" in capsys.readouterr().err
    assert main(["classify", str(tiny_fingerprints["llama-ft"]), "--refs", str(tmp_path / "nothing")]) == 2
