"""`tg-verify demo`: builds offline into a cache, reuses it, and shows a PASS and a FAIL as expected."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tg_verify import demo
from tg_verify.cli import main


def test_demo_builds_then_reuses_and_both_verdicts_come_out_as_expected(
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = tmp_path_factory.getbasetemp() / "tg-demo"  # shared with the pipeline tests' fixture
    assert main(["demo", "--dir", str(directory), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "demo: both verdicts as expected" in out
    assert "PASS" in out and "FAIL" in out and "TGV_LINEAGE_NOT_ESTABLISHED" in out
    assert "why family" in out and "llama by architecture" in out
    tree = directory / demo.DEMO_VERSION
    assert sorted(p.name for p in (tree / "policies").iterdir()) == ["fail.yml", "pass.yml"]
    assert sorted(p.name for p in (tree / "refs").iterdir()) == sorted(
        f"{i}.json" for i in (demo.BASE_ID, *(r[0] for r in demo.OTHER_REFERENCES)))
    assert not [p for p in directory.iterdir() if p.name.startswith(".build-")]
    stamp = (tree / "refs" / f"{demo.BASE_ID}.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert main(["demo", "--dir", str(directory), "--no-progress"]) == 0
    assert "reusing models" in capsys.readouterr().out
    assert (tree / "refs" / f"{demo.BASE_ID}.json").stat().st_mtime_ns == stamp  # nothing rebuilt
    assert time.perf_counter() - start < 120  # generous: a shared CI machine; ~10 s when idle


def test_demo_runs_report_expected_verdicts(tmp_path_factory: pytest.TempPathFactory) -> None:
    runs = demo.run(tmp_path_factory.getbasetemp() / "tg-demo")
    assert [r.case.expect_pass for r in runs] == [True, False]
    assert all(r.as_expected for r in runs)
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in {f.code for f in runs[1].result.verdict.failures}
    assert "TGV_LINEAGE_ESTABLISHED" in {f.code for f in runs[0].result.verdict.findings}


def test_demo_directory_that_is_a_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--dir", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_the_unrelated_models_family_is_explained(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The unrelated llama is attributed to another reference family; the demo says why, and what refutes it."""
    fine_tune, unrelated = demo.run(tmp_path_factory.getbasetemp() / "tg-demo")
    assert demo.attribution_note(fine_tune) is None  # attributed to llama, its architecture: nothing to explain
    family = unrelated.result.classification.family
    note = demo.attribution_note(unrelated)
    assert family != "llama" and note is not None
    assert note.startswith(f"why family {family}?") and "llama by architecture" in note
    assert f"lineage test against {demo.BASE_ID}: no derivation" in note
