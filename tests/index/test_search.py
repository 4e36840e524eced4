"""Lineage search over an index: the true base of every derivative is found among distractors and proven."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tg_verify.cli import main
from tg_verify.fingerprint.document import load
from tg_verify.index.build import add_references
from tg_verify.index.search import search
from tg_verify.index.store import ReferenceIndex, open_index


@pytest.fixture(scope="module")
def index(search_zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> ReferenceIndex:
    root = tmp_path_factory.mktemp("search-index") / "index"
    report = add_references(root, [search_zoo.references], create=True)
    assert report.problems == [] and report.count == len(list(search_zoo.references.glob("*.json")))
    return open_index(root)


def test_the_true_base_of_every_derivative_is_retrieved_first_and_called_derived(
        search_zoo: Any, index: ReferenceIndex) -> None:
    assert len(index.entries) > 300 and len(search_zoo.candidates) == 12
    for name, (path, base) in search_zoo.candidates.items():
        result = search(index, load(path), k=5)
        retrieved = {h.retrieval_rank: h.entry.id for h in result.hits}
        assert retrieved[1] == base, (name, retrieved)  # recall@1 of the signature alone
        first = result.hits[0]
        assert first.entry.id == base and first.lineage.derived, (name, first.to_dict())
        assert [h.entry.id for h in result.hits if h.lineage.derived] == [base], name
        assert result.attribution["base"] == base and result.attribution["by"] == "lineage"
        assert first.similarity > 0.5 > max(h.similarity for h in result.hits[1:]), name


def test_an_unrelated_model_finds_no_base(search_zoo: Any, index: ReferenceIndex) -> None:
    result = search(index, load(search_zoo.unrelated), k=10)
    assert len(result.hits) == 10 and not any(h.lineage.derived for h in result.hits)
    assert result.attribution["by"] != "lineage" and "establishes none" in result.attribution["note"]
    assert max(h.similarity for h in result.hits) < 0.3


def test_search_reports_the_statistical_attribution_beside_the_lineage_evidence(search_zoo: Any,
                                                                                  index: ReferenceIndex) -> None:
    path, base = search_zoo.candidates["qwen2-ft"]
    result = search(index, load(path), k=3)
    statistics = result.statistics
    assert statistics is not None and statistics["available"]
    assert {r["id"] for r in statistics["references"]} == {h.entry.id for h in result.hits}
    # toy models lie outside the real models' population: three references give no meaningful scale, said so
    assert statistics["meaningful"] is False and statistics["not_meaningful"]
    assert all(h.distance is None for h in result.hits)
    assert result.attribution["by"] == "lineage" and result.attribution["statistics_family"] is None
    itself = search(index, load(search_zoo.bases["llama"]), k=2)
    assert any("searched against itself" in c for c in itself.caveats)
    assert itself.hits[0].lineage.score == pytest.approx(1.0, abs=1e-3)


def test_cli_search(search_zoo: Any, index: ReferenceIndex, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    path, base = search_zoo.candidates["llama-evasions"]
    assert main(["search", str(path), "--index", str(index.root), "-k", "3", "--json", "-o",
                 str(tmp_path / "r.json")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "https://tg-verify.dev/schemas/search"
    assert document["index"]["sha256"] == index.digest and document["index"]["references"] == len(index.entries)
    assert document["search"]["attribution"]["base"] == base
    assert len(document["search"]["hits"]) == 3 and document["search"]["hits"][0]["lineage"]["derived"]
    assert json.loads((tmp_path / "r.json").read_text()) == document
    assert main(["search", str(path), "--index", str(index.root), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"derived from {base}" in out and "short list" in out
    assert main(["search", str(path), "--index", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a tg-verify reference index" in err
    assert main(["search", str(path), "--index", str(index.root), "-k", "0"]) == 2
    assert "-k must be in [1, 1000]" in capsys.readouterr().err
