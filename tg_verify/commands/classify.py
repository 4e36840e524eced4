"""`tg-verify classify MODEL|FP --refs DIR|FILES`: which known family a model belongs to, or none of them.

Centroid-initialised K-Means over the references (one cluster per base), nearest converged
centroid, out-of-cluster beyond the threshold; plus the lineage test against every base that
carries a sketch. Families come from --labels, else each reference is its own family.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape

from tg_verify import __version__
from tg_verify.analysis.attribution import Classification, ClassifierSettings, classify
from tg_verify.analysis.references import Reference, build_references, load_fingerprints, read_labels
from tg_verify.commands.compare import (
    add_space_options,
    caveat_lines,
    check_space_options,
    describe,
    emit,
    resolve_inputs,
)
from tg_verify.escaping import shown
from tg_verify.fingerprint.document import Fingerprint

VERB = "classify"
ORDER = 31
REPORT_SCHEMA = "https://tg-verify.dev/schemas/classify"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `classify` parser."""
    parser = subparsers.add_parser(
        VERB, help="attribute a model to the family of the nearest reference cluster",
        description=("Classify MODEL (a model path or a fingerprint file) against reference fingerprints by "
                     "centroid-initialised K-Means (one cluster per base, centroids free to move): the family of the "
                     "nearest converged centroid, or out-of-cluster when that centroid is further than --threshold. "
                     "Families come from --labels (YAML/JSON: id -> family, or id -> {family, base, parent}); "
                     "without it each reference is a base of its own family. A model is fingerprinted with the "
                     "references' settings."),
        epilog="Exit codes: 0 classified (in or out of cluster); 2 bad input or incompatible fingerprints; 3 internal.")
    parser.add_argument("model", metavar="MODEL|FP", help="model path or fingerprint file to classify")
    parser.add_argument("--refs", nargs="+", required=True, metavar="DIR|FILE",
                        help="reference fingerprints: files, or directories of *.json")
    parser.add_argument("--labels", metavar="FILE", help="families (and bases/parents) of the references")
    add_space_options(parser)
    parser.set_defaults(handler=run)


def lineage_against_bases(candidate: Fingerprint, references: list[Reference]) -> list[dict[str, Any]]:
    """The lineage test of the candidate against every base reference (skipped when either lacks a sketch)."""
    from tg_verify.analysis.lineage import lineage_test

    if candidate.sketch is None:
        return []
    return [{"reference": r.id, "family": r.family, **lineage_test(candidate, r.fingerprint).to_dict()}
            for r in references if r.base and r.fingerprint.sketch is not None]


def lineage_table(lineage: list[dict[str, Any]]) -> Any:
    """The lineage tests against the bases: score, p-value, decision."""
    from rich.table import Table

    table = Table(title="lineage evidence (sketch test against each base)", title_justify="left")
    for column, justify in (("base", "left"), ("family", "left"), ("score", "right"), ("threshold", "right"),
                            ("p", "right"), ("decision", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for entry in sorted(lineage, key=lambda e: (-(e.get("score") or -2.0), e["reference"])):
        if not entry.get("comparable", True):
            table.add_row(entry["reference"], entry["family"], "—", "—", "—", "[yellow]not comparable[/yellow]")
            continue
        decision = "[bold green]derived[/bold green]" if entry["derived"] else "not derived"
        table.add_row(entry["reference"], entry["family"], f"{entry['score']:.3f}", f"{entry['threshold']:.3f}",
                      f"{entry['p_value']:.3g}", decision)
    return table


def run(args: argparse.Namespace) -> int:
    """Classify one model and print or write the result."""
    check_space_options(args)
    fingerprints = load_fingerprints(args.refs)
    labels = read_labels(args.labels) if args.labels else None
    references, label_caveats = build_references(fingerprints, labels)
    [candidate] = resolve_inputs([args.model], fingerprints, args)
    settings = ClassifierSettings(threshold=args.threshold, space=args.space, pca_components=args.pca_components)
    result = classify(candidate, references, settings)
    result.caveats.extend(label_caveats)
    if not args.labels:
        result.caveats.append("no --labels: each reference is a base of its own family (named by its id)")
    lineage = lineage_against_bases(candidate, references) if args.lineage else []
    document = {"schema": REPORT_SCHEMA, "tool": {"name": "tg-verify", "version": __version__},
                "candidate": describe(candidate), "classification": result.to_dict(), "lineage": lineage}
    return emit(document, args, lambda console: render(console, result, lineage))


def render(console: Any, result: Classification, lineage: list[dict[str, Any]]) -> None:
    """The human view: the attribution, the centroid and reference tables, lineage, caveats."""
    from rich.table import Table

    if result.out_of_cluster:
        name, family, base = (escape(shown(v)) for v in (result.model_name, result.family, result.base))
        console.print(f"[bold]{name}[/bold]: [bold yellow]OUT OF CLUSTER[/bold yellow] — nearest family {family} "
                      f"(base {base}) at {result.distance:.3f} > threshold {result.threshold:g}: a new model, or one "
                      "modified beyond the known families")
    else:
        name, family, base = (escape(shown(v)) for v in (result.model_name, result.family, result.base))
        console.print(f"[bold]{name}[/bold]: family [bold green]{family}[/bold green] (cluster of base {base}) at "
                      f"distance {result.distance:.3f} ≤ {result.threshold:g}")
    confidence = []
    if result.margin is not None:
        confidence.append(f"margin to runner-up {result.margin:.3f}, ratio {result.ratio:.3f}")
    if result.family_margin is not None:
        confidence.append(f"margin to another family {result.family_margin:.3f}")
    confidence.append(f"nearest reference {result.nearest_reference} at {result.nearest_reference_distance:.3f}")
    console.print("[dim]" + "; ".join(confidence) + f"; {result.space['space']} space of "
                  f"{result.space['reference_count']} references, K-Means converged in {result.iterations} "
                  "iteration(s)[/dim]")
    centroids = Table(title="cluster centroids (named by their initial base)", title_justify="left")
    for column, justify in (("base", "left"), ("family", "left"), ("distance", "right"), ("members", "right")):
        centroids.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result.centroids:
        centroids.add_row(shown(row.base), shown(row.family), f"{row.distance:.3f}", str(len(row.members)))
    console.print(centroids)
    refs = Table(title="references", title_justify="left")
    for column, justify in (("reference", "left"), ("family", "left"), ("role", "left"), ("distance", "right")):
        refs.add_column(column, justify=justify)  # type: ignore[arg-type]
    for ref in result.references:
        refs.add_row(shown(ref.id), shown(ref.family), "base" if ref.base else "derivative", f"{ref.distance:.3f}")
    console.print(refs)
    if lineage:
        console.print(lineage_table(lineage))
    for line in caveat_lines(result.caveats):
        console.print(line)
