"""bench/attribution.py runs on a folder of release files and writes a population the product can load."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.attribution import main  # noqa: E402
from tg_verify.analysis.population import load_population  # noqa: E402

REAL = Path(__file__).resolve().parents[1] / "data" / "tensorguard-release"


def test_tables_on_real_files(capsys) -> None:
    assert main(["--data", str(REAL)]) == 0
    out = capsys.readouterr().out
    assert "13 fingerprints, 8 bases" in out and "(5 derivatives scored), leave-one-out" in out
    for row in ("scale fitted on the 8 bases", "population scale + lineage spread (tg-verify classify)",
                "paper: joint clustering of everything, in sample"):
        assert f"| {row}" in out
    assert "| 2 | " in out and "| 8 | " in out  # the k-references table
    assert "in sample (files the population was measured on): 100.0% (5/5) right" in out


def test_write_population_is_loadable_and_names_its_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "population.json"
    assert main(["--data", str(REAL), "--labels", str(REAL / "labels.yaml"), "--write-population", str(out)]) == 0
    scale = load_population(out)
    assert scale.models == 13 and scale.derivatives == 5
    assert sorted(f["name"] for f in scale.provenance["files"]) == sorted(p.name for p in REAL.rglob("*.json"))
