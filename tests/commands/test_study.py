"""`tg-verify study clustering|perturbation`: tables, JSON, plots, and the no-matplotlib path."""

from __future__ import annotations

import json
import sys

import pytest

from tg_verify.cli import main


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels.yml"
    path.write_text("llama: {family: llama, base: true}\nqwen2: {family: qwen, base: true}\ngemma: gemma\n"
                    "phi3: phi\nmistral: mistral\nllama-ft: {family: llama, parent: llama}\n"
                    "qwen2-ft: {family: qwen, parent: qwen2}\n")
    return path


def _clustering_args(tiny_fingerprints, labels, *extra):
    return ["study", "clustering", "--fingerprints", str(tiny_fingerprints["llama"].parent),
            str(tiny_fingerprints["llama-ft"].parent), "--labels", str(labels), *extra]


def test_clustering_prints_table_i_and_writes_json_and_plots(tiny_fingerprints, labels, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(_clustering_args(tiny_fingerprints, labels, "--out", str(out))) == 0
    text = capsys.readouterr().out
    assert "Centroid-init K-Means" in text and "94.0%" in text and "DBSCAN" in text
    result = json.loads((out / "clustering-study.json").read_text())["result"]
    centroid = next(r for r in result["results"] if r["strategy"] == "centroid-kmeans")
    assert centroid["evaluated"] == 2 and centroid["accuracy"] == 1.0
    for name in ("centroid-kmeans", "hierarchical", "gmm", "kmeans", "dbscan", "overview"):
        png = out / f"clustering-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_tables_print_and_the_hint_is_given(tiny_fingerprints, labels, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "study"
    assert main(_clustering_args(tiny_fingerprints, labels, "--out", str(out))) == 0
    text = capsys.readouterr().out
    assert "pip install 'matplotlib>=3.7', the [plots] extra" in text and "Centroid-init K-Means" in text
    assert (out / "clustering-study.json").exists() and not list(out.glob("*.png"))


def test_clustering_json_is_stable(tiny_fingerprints, labels, capsys):
    assert main(_clustering_args(tiny_fingerprints, labels, "--json")) == 0
    first = capsys.readouterr().out
    assert main(_clustering_args(tiny_fingerprints, labels, "--json")) == 0
    assert capsys.readouterr().out == first
    assert json.loads(first)["study"] == "clustering"


def test_clustering_without_derivatives_is_exit_2(tiny_fingerprints, tmp_path, capsys):
    labels = tmp_path / "labels.yml"
    labels.write_text("llama: a\nqwen2: b\ngemma: c\nphi3: d\nmistral: e\n")
    assert main(["study", "clustering", "--fingerprints", str(tiny_fingerprints["llama"].parent),
                 "--labels", str(labels)]) == 2
    assert "derivatives to score" in capsys.readouterr().err


def test_perturbation_table_json_and_plot(tiny_models, tmp_path, capsys):
    out = tmp_path / "rq2"
    assert main(["study", "perturbation", str(tiny_models["llama"]["single"]), "--repeats", "8",
                 "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0.mlp.down_proj" in text and "gauss" in text and "spread across layers" in text
    result = json.loads((out / "perturbation-study.json").read_text())["result"]
    assert result["repeats"] == 8 and len(result["strategies"]) == 6
    assert (out / "perturbation-sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_perturbation_without_out_says_how_to_get_plots(tiny_models, capsys):
    assert main(["study", "perturbation", str(tiny_models["qwen2"]["single"]), "--repeats", "4",
                 "--max-blocks", "1"]) == 0
    text = capsys.readouterr().out
    assert "pass --out DIR" in text and "1.mlp" not in text


def test_study_needs_a_kind(capsys):
    assert main(["study"]) == 2


def test_tables_are_not_cut_outside_a_terminal(tiny_fingerprints, labels, capsys, monkeypatch):
    """In a CI log or a pipe the tables keep every column and every character (no 80-column cut, no "…")."""
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(_clustering_args(tiny_fingerprints, labels)) == 0
    text = capsys.readouterr().out
    assert "…" not in text
    header = next(line for line in text.splitlines() if "strategy" in line and "ARI" in line)
    for column in ("paper", "Hungarian", "ARI", "clusters", "over seeds"):
        assert column in header
    assert "Centroid-init K-Means" in text
    assert "tables only: pass --out DIR for the JSON result and the PNG plots" in text  # one line, not wrapped
