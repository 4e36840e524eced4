"""Study figures: written as PNGs atomically; availability follows matplotlib."""

from __future__ import annotations

import sys

import numpy as np

from tg_verify.analysis.clustering import clustering_study
from tg_verify.analysis.references import Reference
from tg_verify.fingerprint.document import FEATURE_NAMES, Fingerprint
from tg_verify.report import plots


def _references() -> list[Reference]:
    rng = np.random.default_rng(3)
    refs = []
    for family in ("a", "b", "c"):
        centre = rng.normal(0, 1, len(FEATURE_NAMES))
        refs.append(Reference(family, family, Fingerprint(family, dict(zip(FEATURE_NAMES, centre)), {"seed": 0})))
        for k in range(3):
            values = centre + rng.normal(0, 0.05, len(FEATURE_NAMES))
            name = f"{family}-{k}"
            refs.append(Reference(name, family, Fingerprint(name, dict(zip(FEATURE_NAMES, values)), {"seed": 0}),
                                  base=False, parent=family))
    return refs


def test_clustering_plots_are_pngs_per_strategy_and_an_overview(tmp_path):
    study = clustering_study(_references(), strategies=("centroid-kmeans", "dbscan"))
    written = plots.write_clustering_plots(study, tmp_path)
    assert {p.name for p in written} == {f"clustering-{r.strategy}.png" for r in study.results} | {
        "clustering-overview.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_availability_follows_matplotlib(monkeypatch):
    assert plots.plots_available()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots.plots_available()
    assert "matplotlib" in plots.PLOTS_HINT and "tg-verify[plots]" not in plots.PLOTS_HINT  # not on PyPI
