"""`tg-verify classify MODEL|FP --refs DIR|FILES`: which known family a model belongs to, or none of them.

Lineage evidence first: the sketch test against every base that carries a sketch. Then the paper's
statistics: the nearest cluster centre on the population scale (or, where the population does not
cover the references, centroid-initialised K-Means on a scale fitted on them), out of cluster beyond
the threshold, each reported as not meaningful where the scale cannot carry it. Families come from
--labels, else each reference is its own family.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from rich.markup import escape

from tg_verify.analysis.attribution import (
    Classification,
    ClassifierSettings,
    classify,
    not_meaningful_text,
    scale_words,
)
from tg_verify.analysis.family import Derivation, decide_family
from tg_verify.analysis.references import Reference, build_references, load_fingerprints, read_labels
from tg_verify.commands.compare import (
    add_space_options,
    caveat_lines,
    check_space_options,
    describe,
    emit,
    resolve_inputs,
)
from tg_verify.escaping import one_line, shown
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.versions import tool_record

VERB = "classify"
ORDER = 31
REPORT_SCHEMA = "https://tg-verify.dev/schemas/classify"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `classify` parser."""
    parser = subparsers.add_parser(
        VERB, help="attribute a model to the family of the nearest reference cluster",
        description=("Classify MODEL (a model path or a fingerprint file) against reference fingerprints: the "
                     "lineage test against every base with a sketch first, then the family of the nearest cluster "
                     "centre (one per base; derivative references move it) on the population scale, or by "
                     "centroid-initialised K-Means on a scale fitted on the references where the population does "
                     "not cover them; out-of-cluster beyond --threshold. Distances a scale cannot carry are "
                     "reported as not meaningful, with the reason. Families come from --labels (YAML/JSON: id -> "
                     "family, or id -> {family, base, parent}); without it each reference is a base of its own "
                     "family. A model is fingerprinted with the references' settings."),
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
    from rich.text import Text

    def number(value: Any) -> str:
        return "—" if value is None else f"{value:.3f}"

    table = Table(title="lineage evidence (sketch and blocks against each base)", title_justify="left")
    for column, justify in (("base", "left"), ("family", "left"), ("score", "right"), ("threshold", "right"),
                            ("blocks", "right"), ("threshold", "right"), ("p", "right"), ("decision", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for entry in sorted(lineage, key=lambda e: (-(e.get("score") or -2.0), e["reference"])):
        # ids and families come from fingerprint files: one safe line each, never rich markup
        reference, family = Text(shown(entry["reference"])), Text(shown(entry["family"]))
        if not entry.get("comparable", True):
            table.add_row(reference, family, "—", "—", "—", "—", "—", "[yellow]not comparable[/yellow]")
            continue
        decision = "[bold green]derived[/bold green]" if entry["derived"] else "not derived"
        table.add_row(reference, family, number(entry.get("score")), number(entry.get("threshold")),
                      number(entry.get("block_score")), number(entry.get("block_threshold")),
                      "—" if entry.get("p_value") is None else f"{entry['p_value']:.3g}", decision)
    return table


def run(args: argparse.Namespace) -> int:
    """Classify one model and print or write the result."""
    check_space_options(args)
    fingerprints = load_fingerprints(args.refs)
    labels = read_labels(args.labels) if args.labels else None
    references, label_caveats = build_references(fingerprints, labels)
    [candidate] = resolve_inputs([args.model], fingerprints, args)
    settings = ClassifierSettings(threshold=args.threshold, space=args.space, pca_components=args.pca_components,
                                  scale=args.scale)
    result = classify(candidate, references, settings)
    result.caveats.extend(label_caveats)
    if not args.labels:
        result.caveats.append("no --labels: each reference is a base of its own family (named by its id)")
    lineage = lineage_against_bases(candidate, references) if args.lineage else []
    decision = family_decision(result, lineage)
    document = {"schema": REPORT_SCHEMA, "tool": tool_record(),
                "candidate": describe(candidate), "classification": result.to_dict(), "lineage": lineage,
                "decision": decision}
    return emit(document, args, lambda console: render(console, result, lineage, decision))


def family_decision(result: Classification, lineage: list[dict[str, Any]]) -> dict[str, Any]:
    """analysis.family's rule on this verb's evidence: the comparable derived bases (ties in score: by id), and the
    statistical attribution when it is meaningful and in cluster."""
    # a test the blocks decided alone has no sketch score: it ranks after those that have one
    derived = [Derivation(e["reference"], e["family"], math.nan if e.get("score") is None else float(e["score"]))
               for e in sorted(lineage, key=lambda e: e["reference"]) if e.get("comparable", True) and e.get("derived")]
    statistics = result.family if result.attribution_meaningful and not result.out_of_cluster else None
    return decide_family(derived, statistics, result.base)


def render(console: Any, result: Classification, lineage: list[dict[str, Any]],
           decision: dict[str, Any] | None = None) -> None:
    """The human view: lineage decision first, the statistical attribution, the tables, caveats.

    Names, ids and families come from fingerprint files: each is one safe line (escaping.shown) and never
    rich markup (Text cells, escaped markup); the sentences that quote them are made one line too."""
    from rich.table import Table
    from rich.text import Text

    name, family, base = (escape(shown(v)) for v in (result.model_name, result.family, result.base))
    on = scale_words(result.scale, result.space.get("reference_count"))
    if decision is not None and decision["by"] == "lineage":
        derived_base, derived_family = escape(shown(decision["base"])), escape(shown(decision["family"]))
        console.print(f"[bold]{name}[/bold]: lineage test: derived from [bold green]{derived_base}"
                      f"[/bold green] (family {derived_family}); the statistics below are reported beside")
        if decision["agrees"] is False:
            console.print(f"[yellow]the statistical attribution (family {family}) disagrees with the lineage "
                          "evidence; the lineage test is the stronger evidence[/yellow]")
    prefix = "statistics: " if decision is not None and decision["by"] == "lineage" else f"[bold]{name}[/bold]: "
    why = escape(one_line(not_meaningful_text(result.not_meaningful)))
    if not result.attribution_meaningful:
        console.print(f"{prefix}family attribution [bold yellow]{why}[/bold yellow] [dim](nearest: {family}, base "
                      f"{base})[/dim]")
    elif not result.meaningful:
        console.print(f"{prefix}nearest family {family} (base {base}); distance {result.distance:.3f} on the {on}: "
                      f"[bold yellow]{why}[/bold yellow]")
    elif result.out_of_cluster:
        console.print(f"{prefix}[bold yellow]OUT OF CLUSTER[/bold yellow] — nearest family {family} "
                      f"(base {base}) at {result.distance:.3f} > threshold {result.threshold:g} on the {on}: a new "
                      "model, or one modified beyond the known families")
    else:
        console.print(f"{prefix}family [bold green]{family}[/bold green] (cluster of base {base}) at "
                      f"distance {result.distance:.3f} ≤ {result.threshold:g} on the {on}")
    confidence = []
    if result.margin is not None:
        confidence.append(f"margin to runner-up {result.margin:.3f}, ratio {result.ratio:.3f}")
    if result.family_margin is not None:
        confidence.append(f"margin to another family {result.family_margin:.3f}")
    confidence.append(f"nearest reference {escape(shown(result.nearest_reference))} at "
                      f"{result.nearest_reference_distance:.3f}")
    how = (f"ranked on the lineage scale (distance {result.lineage_distance:.3f}), {len(result.references)} references"
           if result.scale == "population" else
           f"{result.space['space']} space of {result.space['reference_count']} references, K-Means converged in "
           f"{result.iterations} iteration(s)")
    console.print("[dim]" + "; ".join(confidence) + f"; {how}[/dim]")
    lineage_scale = result.scale == "population"
    centroids = Table(title="cluster centres (named by their base)", title_justify="left")
    columns = [("base", "left"), ("family", "left"), ("distance", "right")]
    columns += [("lineage-scale distance", "right")] if lineage_scale else []
    for column, justify in (*columns, ("members", "right")):
        centroids.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result.centroids:
        extra = [f"{row.lineage_distance:.3f}"] if lineage_scale and row.lineage_distance is not None else []
        centroids.add_row(Text(shown(row.base)), Text(shown(row.family)), f"{row.distance:.3f}", *extra,
                          str(len(row.members)))
    console.print(centroids)
    refs = Table(title="references", title_justify="left")
    for column, justify in (("reference", "left"), ("family", "left"), ("role", "left"), ("distance", "right")):
        refs.add_column(column, justify=justify)  # type: ignore[arg-type]
    for ref in result.references:
        refs.add_row(Text(shown(ref.id)), Text(shown(ref.family)), "base" if ref.base else "derivative",
                     f"{ref.distance:.3f}")
    console.print(refs)
    if lineage:
        console.print(lineage_table(lineage))
    for line in caveat_lines(result.caveats):
        console.print(line)
