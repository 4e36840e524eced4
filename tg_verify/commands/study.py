"""`tg-verify study clustering|perturbation`: the paper's RQ3 (Table I, Fig. 4/6) and RQ2 (Fig. 5) on your models.

Tables always print; with --out the JSON result and, when matplotlib (the `[plots]` extra) is
installed, the PNG figures are written there too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from tg_verify.analysis.clustering import STRATEGIES, ClusteringStudy, StudySettings, clustering_study
from tg_verify.analysis.perturbation import PerturbationStudy, perturbation_study
from tg_verify.analysis.references import build_references, load_fingerprints, read_labels
from tg_verify.analysis.space import DEFAULT_PCA_COMPONENTS, DEFAULT_SPACE, SPACES
from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.errors import EXIT_OK, UsageError
from tg_verify.fingerprint.settings import DEVICE_CHOICES, FingerprintSettings
from tg_verify.progress import progress_sink, wants_progress
from tg_verify.report import plots
from tg_verify.versions import tool_record

VERB = "study"
ORDER = 60
REPORT_SCHEMA = "https://tg-verify.dev/schemas/study"
SHORT_STRATEGY = {"adversarial": "adv", "structural": "struct", "low-frequency": "low-f", "high-frequency": "high-f",
                  "gaussian": "gauss"}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `study clustering` and `study perturbation`."""
    parser = subparsers.add_parser(
        VERB, help="reproduce the paper's studies on your models (clustering: Table I; perturbation: Fig. 5)",
        description="Reproduce the TensorGuard paper's evaluation on your own fingerprints and models.")
    studies = parser.add_subparsers(dest="study", metavar="STUDY", parser_class=type(parser))
    studies.required = True

    clustering = studies.add_parser(
        "clustering", help="Table I: five clustering strategies, accuracy of each, PCA scatter plots",
        description=("Cluster labelled fingerprints with centroid-initialised K-Means, hierarchical clustering, a "
                     "Gaussian mixture, standard K-Means and DBSCAN; print the accuracy of each (derivatives in a "
                     "cluster of their own family; docs/analysis.md defines the mappings) beside the paper's; with "
                     "--out write the JSON result and PNG scatter plots of the PCA projection (Fig. 4 and 6)."),
        epilog="Exit codes: 0 done; 2 bad input (labels, fingerprints); 3 internal error.")
    clustering.add_argument("--fingerprints", nargs="+", required=True, metavar="DIR|FILE",
                            help="fingerprint files, or directories of *.json")
    clustering.add_argument("--labels", required=True, metavar="FILE",
                            help="YAML/JSON: id -> {family, base: true} for bases, {family, parent: BASE} for "
                                 "derivatives")
    clustering.add_argument("--space", choices=SPACES, default=DEFAULT_SPACE,
                            help="where to cluster: standardized (default, as classify) or pca (the paper's text)")
    clustering.add_argument("--pca-components", type=int, default=DEFAULT_PCA_COMPONENTS, metavar="N",
                            help=f"components with --space pca (default {DEFAULT_PCA_COMPONENTS})")
    clustering.add_argument("--dbscan-eps", type=float, default=None, metavar="EPS",
                            help="DBSCAN radius (default: 90th percentile of nearest-neighbour distances)")
    _add_output(clustering)
    clustering.set_defaults(handler=run_clustering)

    perturbation = studies.add_parser(
        "perturbation", help="Fig. 5: per-layer gradient sensitivity under each noise strategy",
        description=("For every attention and MLP matrix of MODEL, the mean Frobenius norm of the gradient of "
                     "||x W^T|| over the repeats, under each of the five noise strategies and the per-tensor random "
                     "draw, z-scored within the model; as a table and (with --out) a PNG like Fig. 5."),
        epilog="Exit codes: 0 done; 2 bad input (unreadable model); 3 internal error.")
    perturbation.add_argument("model", metavar="MODEL", help="model directory, .safetensors or .gguf file, or index")
    perturbation.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    perturbation.add_argument("--repeats", type=int, default=30, help="repeats averaged per layer (default 30)")
    perturbation.add_argument("--max-blocks", type=int, default=None, metavar="N",
                              help="study only the first N decoder blocks (default: all)")
    perturbation.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="default: auto")
    perturbation.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                              help="progress bar (default: on a terminal outside CI)")
    _add_output(perturbation)
    perturbation.set_defaults(handler=run_perturbation)


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", help="write the JSON result and the PNG plots here")
    parser.add_argument("--json", action="store_true", help="print the canonical JSON result instead of tables")


def _finish(document: dict[str, Any], args: argparse.Namespace, stem: str, render: Any, draw: Any) -> int:
    """Write JSON and plots under --out; print the JSON or the tables; say where the plots went or why not."""
    from tg_verify.report.console import make_console

    data = canonical_json(document)
    written: list[Path] = []
    note = None
    if args.out:
        written.append(write_bytes(Path(args.out) / f"{stem}.json", data))
        if plots.plots_available():
            written.extend(draw(Path(args.out)))
        else:
            note = f"plots skipped: matplotlib is not installed ({plots.PLOTS_HINT})"
    else:
        note = "tables only: pass --out DIR for the JSON result and the PNG plots"
    if args.json:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        console = make_console(stderr=True)
    else:
        console = make_console()  # outside a terminal: full width, so no table is cut at 80 columns
        render(console)
    for path in written:
        console.print(f"[dim]wrote {escape(str(path))}[/dim]")
    if note:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    return EXIT_OK


def run_clustering(args: argparse.Namespace) -> int:
    """Run Table I on the user's labelled fingerprints."""
    if args.pca_components < 1:
        raise UsageError(f"--pca-components must be at least 1, got {args.pca_components}")
    if args.dbscan_eps is not None and not args.dbscan_eps > 0:
        raise UsageError(f"--dbscan-eps must be a positive distance, got {args.dbscan_eps:g}")
    references, caveats = build_references(load_fingerprints(args.fingerprints), read_labels(args.labels))
    settings = StudySettings(space=args.space, pca_components=args.pca_components, dbscan_eps=args.dbscan_eps)
    study = clustering_study(references, settings, STRATEGIES)
    study.caveats.extend(caveats)
    document = {"schema": REPORT_SCHEMA, "study": "clustering", "tool": tool_record(),
                "result": study.to_dict()}
    return _finish(document, args, "clustering-study", lambda console: render_clustering(console, study),
                   lambda out: plots.write_clustering_plots(study, out))


def _percent(value: float) -> str:
    return f"{value:.1%}"


def render_clustering(console: Any, study: ClusteringStudy) -> None:
    """Table I beside the paper's, and the misclassified models."""
    from rich.table import Table

    evaluated = study.results[0].evaluated
    console.print(f"[bold]Clustering study[/bold]: {len(study.models)} models ({len(study.bases)} bases, {evaluated} "
                  f"derivatives scored), {len(study.families)} families; {study.space['space']} space")
    table = Table(title="accuracy by strategy (derivatives in a cluster of their own family)", title_justify="left")
    for column in ("strategy", "accuracy", "paper", "Hungarian", "ARI", "clusters", "over seeds"):
        table.add_column(column, justify="left" if column == "strategy" else "right", overflow="fold")
    for result in study.results:
        seeds = ""
        if result.seed_accuracies:
            values = result.seed_accuracies
            seeds = f"{min(values):.0%}–{max(values):.0%} (mean {sum(values) / len(values):.0%})"
        table.add_row(result.title, _percent(result.accuracy), _percent(result.paper_accuracy),
                      _percent(result.hungarian_accuracy), f"{result.adjusted_rand:.3f}", str(result.n_clusters), seeds)
    console.print(table)
    centroid = study.result("centroid-kmeans")
    if centroid.parent_accuracy is not None:
        console.print(f"centroid-initialised K-Means put {centroid.parent_accuracy:.1%} of the derivatives in the "
                      "cluster of their own parent base")
    for result in study.results:
        if result.misclassified:
            shown = ", ".join(result.misclassified[:6]) + (" …" if len(result.misclassified) > 6 else "")
            console.print(f"[dim]{result.strategy} misclassified {len(result.misclassified)}: {escape(shown)}[/dim]")
    for caveat in study.caveats:
        console.print(f"[yellow]caveat:[/yellow] {escape(caveat)}")


def run_perturbation(args: argparse.Namespace) -> int:
    """Run the RQ2 sensitivity study on one model."""
    if args.max_blocks is not None and args.max_blocks < 1:
        raise UsageError(f"--max-blocks must be at least 1, got {args.max_blocks}")
    settings = FingerprintSettings(seed=args.seed, repeats=args.repeats, device=args.device, sketch=False)
    with progress_sink(wants_progress(args.progress)) as sink:
        study = perturbation_study(args.model, settings, sink, args.max_blocks)
    document = {"schema": REPORT_SCHEMA, "study": "perturbation",
                "tool": tool_record(), "result": study.to_dict()}
    return _finish(document, args, "perturbation-study", lambda console: render_perturbation(console, study),
                   lambda out: [plots.write_sensitivity_plot(study, out / "perturbation-sensitivity.png")])


def render_perturbation(console: Any, study: PerturbationStudy) -> None:
    """Per-layer z-scores under every strategy, then the spread of each strategy."""
    from rich.table import Table

    console.print(f"[bold]Perturbation study[/bold] of {study.model_name}: {len(study.layers)} matrices, "
                  f"{study.repeats} repeats, seed {study.seed}")
    from rich import box

    table = Table(title="sensitivity: z-score within the model of the mean ||grad||_F", title_justify="left",
                  box=box.SIMPLE)
    table.add_column("layer", overflow="fold")
    for strategy in study.strategies:
        table.add_column(SHORT_STRATEGY.get(strategy, strategy), justify="right")
    for i, name in enumerate(study.short_names):
        table.add_row(name, *(f"{study.zscores[s][i]:+.2f}" for s in study.strategies))
    console.print(table)
    spread = Table(title="spread across layers", title_justify="left")
    for column in ("strategy", "variance of raw scores", "random / this", "mean z attention", "mean z ffn"):
        spread.add_column(column, justify="left" if column == "strategy" else "right")
    for strategy in study.strategies:
        means = study.category_means[strategy]
        ratio = study.variance_ratio.get(strategy)
        spread.add_row(strategy, f"{study.variance[strategy]:.4g}", "—" if ratio is None else f"{ratio:.2f}×",
                       f"{means.get('attention', float('nan')):+.2f}", f"{means.get('ffn', float('nan')):+.2f}")
    console.print(spread)
    for note in study.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]")
