"""PNG figures of the paper's studies (Fig. 4/6 scatter plots, Fig. 5 sensitivity bars).

matplotlib is the optional `[plots]` extra: callers check `plots_available()` first and tell the
user PLOTS_HINT when it is missing; the tables never depend on it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tg_verify.atomic import write_bytes

if TYPE_CHECKING:
    from tg_verify.analysis.clustering import ClusteringStudy, StrategyResult
    from tg_verify.analysis.perturbation import PerturbationStudy

# tg-verify is not on PyPI, so the hint names matplotlib itself (the [plots] extra of a checkout or git URL)
PLOTS_HINT = "pip install 'matplotlib>=3.7', the [plots] extra"
CATEGORY_COLOURS = {"attention": "#f28e2b", "ffn": "#4e79a7", "embedding": "#59a14f", "norm": "#b07aa1",
                    "unknown": "#9c9c9c"}


def plots_available() -> bool:
    """True when matplotlib (the `[plots]` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(figure)
    return write_bytes(path, buffer.getvalue())


def _family_colours(families: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    return {family: palette(i % palette.N) for i, family in enumerate(families)}


def _scatter(axes: Any, study: ClusteringStudy, result: StrategyResult | None, colours: dict[str, Any]) -> None:
    """Draw one panel: bases as stars, derivatives as circles, coloured by assigned (or true) family."""
    wrong = set(result.misclassified) if result else set()
    for index, model in enumerate(study.models):
        family = result.assigned[index] if result else model.family
        colour = colours.get(family, "#bbbbbb") if family else "#bbbbbb"
        marker, size = ("*", 260) if model.base else ("o", 55)
        edge = "#d62728" if model.id in wrong else "black"
        axes.scatter(model.x, model.y, marker=marker, s=size, color=colour, edgecolors=edge,
                     linewidths=1.6 if model.id in wrong else 0.6, zorder=3 if model.base else 2)
    variance = study.projection_variance + [0.0, 0.0]
    axes.set_xlabel(f"PC1 ({variance[0]:.0%} of variance)")
    axes.set_ylabel(f"PC2 ({variance[1]:.0%} of variance)")
    if result is None:
        axes.set_title("True families")
    else:
        axes.set_title(f"{result.title}\naccuracy {result.accuracy:.1%} (paper {result.paper_accuracy:.0%})")
    axes.grid(alpha=0.3)


def _legend(axes: Any, families: Sequence[str], colours: dict[str, Any]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=colours[f], label=f) for f in families]
    handles += [Line2D([], [], marker="*", linestyle="", color="grey", markersize=12, label="base model"),
                Line2D([], [], marker="o", linestyle="", color="grey", label="derivative"),
                Line2D([], [], marker="o", linestyle="", color="white", markeredgecolor="#d62728",
                       label="misclassified")]
    axes.legend(handles=handles, loc="best", fontsize="small", framealpha=0.85)


def write_clustering_plots(study: ClusteringStudy, out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per strategy (like Fig. 4 and Fig. 6) and an overview grid with the true families."""
    plt = _pyplot()
    out = Path(out_dir)
    colours = _family_colours(study.families)
    written = []
    for result in study.results:
        figure, axes = plt.subplots(figsize=(7, 5.5), constrained_layout=True)
        _scatter(axes, study, result, colours)
        _legend(axes, study.families, colours)
        written.append(_save(figure, out / f"clustering-{result.strategy}.png"))
    panels = len(study.results) + 1
    columns = 3
    rows = (panels + columns - 1) // columns
    figure, grid = plt.subplots(rows, columns, figsize=(6 * columns, 5 * rows), squeeze=False,
                                constrained_layout=True)
    cells = list(grid.flat)
    _scatter(cells[0], study, None, colours)
    _legend(cells[0], study.families, colours)
    for cell, result in zip(cells[1:], study.results):
        _scatter(cell, study, result, colours)
    for cell in cells[panels:]:
        cell.axis("off")
    figure.suptitle("Clustering strategies on the PCA projection of the fingerprints")
    written.append(_save(figure, out / "clustering-overview.png"))
    return written


def write_sensitivity_plot(study: PerturbationStudy, path: str | os.PathLike[str]) -> Path:
    """Per-layer sensitivity bars, one panel per strategy, coloured by tensor category (like Fig. 5)."""
    plt = _pyplot()
    strategies = list(study.strategies)
    columns = 3
    rows = (len(strategies) + columns - 1) // columns
    width = max(8.0, 0.25 * len(study.layers) + 2)
    figure, grid = plt.subplots(rows, columns, figsize=(width * columns / 2, 3.6 * rows), squeeze=False,
                                sharey=True, constrained_layout=True)
    cells = list(grid.flat)
    colours = [CATEGORY_COLOURS.get(category, CATEGORY_COLOURS["unknown"]) for category in study.categories]
    positions = range(len(study.layers))
    for cell, strategy in zip(cells, strategies):
        scores = study.zscores[strategy]
        cell.bar(positions, scores, color=colours)
        cell.set_title(f"{strategy} (variance of raw scores {study.variance[strategy]:.3g})")
        cell.set_xticks(list(positions))
        cell.set_xticklabels(study.short_names, rotation=90, fontsize=6)
        cell.axhline(0.0, color="black", linewidth=0.6)
        cell.grid(axis="y", alpha=0.3)
    for cell in cells[len(strategies):]:
        cell.axis("off")
    cells[0].set_ylabel("sensitivity (z-score within the model)")
    from matplotlib.patches import Patch

    present = [c for c in CATEGORY_COLOURS if c in set(study.categories)]
    cells[0].legend(handles=[Patch(color=CATEGORY_COLOURS[c], label=c) for c in present], fontsize="small")
    figure.suptitle(f"Per-layer gradient sensitivity of {study.model_name} "
                    f"(mean Frobenius norm over {study.repeats} repeats)")
    return _save(figure, path)
