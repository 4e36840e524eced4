"""`tg-verify compare A B`: how close two models are (models or fingerprint files; models fingerprinted on the fly).

Reports the scale-free relative distance always, the paper's standardised distance when a reference
set gives the scale (--refs), and the lineage evidence when both fingerprints carry sketches.
Also holds the options and rendering helpers `classify` shares.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.markup import escape

from tg_verify.analysis.attribution import DEFAULT_THRESHOLD, SCALES, not_meaningful_text, scale_words
from tg_verify.analysis.inputs import is_fingerprint_path, load_or_fingerprint, settings_like
from tg_verify.analysis.pairwise import Comparison, compare
from tg_verify.analysis.references import load_fingerprints
from tg_verify.analysis.space import DEFAULT_PCA_COMPONENTS, DEFAULT_SPACE, SPACES
from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.errors import EXIT_OK, UsageError
from tg_verify.escaping import one_line, shown
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.fingerprint.settings import DEVICE_CHOICES, FingerprintSettings
from tg_verify.progress import progress_sink, wants_progress
from tg_verify.versions import tool_record

VERB = "compare"
ORDER = 30
REPORT_SCHEMA = "https://tg-verify.dev/schemas/compare"


def add_space_options(parser: argparse.ArgumentParser) -> None:
    """Distance-space and output options shared by compare and classify."""
    group = parser.add_argument_group("distance space (docs/analysis.md)")
    group.add_argument("--scale", choices=SCALES, default="auto",
                       help="auto (default): the population scale (real models' feature spreads, shipped) when it "
                            "covers the references, else a scale fitted on the references; population or "
                            "references to insist on one")
    group.add_argument("--space", choices=SPACES, default=DEFAULT_SPACE,
                       help="standardized (default; the release, where the threshold 7 was set): z-scores; pca: the "
                            "paper's text, PCA after the z-scores fitted on the references (smaller distances)")
    group.add_argument("--pca-components", type=int, default=DEFAULT_PCA_COMPONENTS, metavar="N",
                       help=f"components kept with --space pca (default {DEFAULT_PCA_COMPONENTS})")
    group.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="D",
                       help=f"out-of-cluster distance (default {DEFAULT_THRESHOLD:g}, the paper's; applied on the "
                            "population scale, or on a scale fitted on enough references)")
    models = parser.add_argument_group("models given instead of fingerprints")
    models.add_argument("--base", metavar="PATH", help="base model a PEFT adapter argument is merged onto")
    models.add_argument("--device", choices=DEVICE_CHOICES, default=None,
                        help="where models are fingerprinted (default: auto)")
    models.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar while fingerprinting (default: on a terminal outside CI)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the canonical JSON result instead of tables")
    out.add_argument("-o", "--output", metavar="FILE.json", help="also write the JSON result to FILE")
    out.add_argument("--no-lineage", dest="lineage", action="store_false",
                     help="skip the lineage test (sketch and block evidence)")


def check_space_options(args: argparse.Namespace) -> None:
    """Reject values no distance can be computed with."""
    if not args.threshold > 0:
        raise UsageError(f"--threshold must be a positive distance, got {args.threshold:g}")
    if args.pca_components < 1:
        raise UsageError(f"--pca-components must be at least 1, got {args.pca_components}")


def resolve_inputs(paths: list[str], known: list[Fingerprint], args: argparse.Namespace) -> list[Fingerprint]:
    """Load fingerprint files; fingerprint model paths with the settings of the known fingerprints."""
    documents = {p: load_or_fingerprint(p, FingerprintSettings()) for p in paths if is_fingerprint_path(p)}
    models = [p for p in paths if p not in documents]
    if models:
        settings = settings_like([*known, *documents.values()], args.device)
        with progress_sink(wants_progress(args.progress)) as sink:
            for path in models:
                documents[path] = load_or_fingerprint(path, settings, sink, base=args.base)
    elif args.base:
        raise UsageError("--base is for PEFT adapter arguments; every argument here is a fingerprint file")
    return [documents[p] for p in paths]


def emit(document: dict[str, Any], args: argparse.Namespace, render: Any) -> int:
    """Write the JSON result (-o), then print it (--json) or the human rendering."""
    data = canonical_json(document)
    if args.output:
        write_bytes(args.output, data)
    if args.json:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        from tg_verify.report.console import make_console

        console = make_console()  # outside a terminal: full width, so no table is cut at 80 columns
        render(console)
        if args.output:
            console.print(f"[dim]JSON result written to {escape(str(args.output))}[/dim]")
    return EXIT_OK


def caveat_lines(caveats: list[str]) -> list[str]:
    """Caveats as dimmed console lines."""
    return [f"[yellow]caveat:[/yellow] {escape(one_line(c))}" for c in caveats]


def lineage_summary(result: dict[str, Any] | None) -> str:
    """One line of lineage evidence for the console."""
    if result is None:
        return "[dim]lineage: not tested[/dim]"
    if not result.get("comparable", True):
        return f"[yellow]lineage: not comparable[/yellow] ({escape('; '.join(result.get('notes', [])))})"
    verdict = "[bold green]derived[/bold green]" if result["derived"] else "not derived"
    if result.get("calibration", "uncalibrated") == "uncalibrated" or result.get("rate") is None:
        stated = "uncalibrated (no null measured for this architecture)"
    else:
        count = round(result["rate"] * result["null_size"])
        scope = f"; {result['null_scope']}" if result.get("null_scope") else ""
        stated = (f"{count}/{result['null_size']} unrelated pairs score as high (95% upper bound "
                  f"{result['rate_upper']:.1%}; {escape(result['calibration'] + scope)})")
    scores = [f"{label} {result[score]:.3f} (threshold {result[threshold]:.3f})"
              for label, score, threshold in (("score", "score", "threshold"),
                                              ("blocks", "block_score", "block_threshold"))
              if result.get(score) is not None and result.get(threshold) is not None]
    return f"lineage: {verdict} — {', '.join(scores) or 'no score'}, {stated}"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `compare` parser."""
    parser = subparsers.add_parser(
        VERB, help="distance between two models or fingerprints (and lineage evidence)",
        description=("Compare A and B (model paths or fingerprint files; models are fingerprinted on the fly with "
                     "the settings of the fingerprints given). Prints the scale-free relative distance; the paper's "
                     "Euclidean distance on the population scale when it covers B, else in the space fitted on --refs "
                     "(reported as not meaningful with fewer than 8 references; two fingerprints alone cannot set a "
                     "scale); and the lineage test when both carry sketches."),
        epilog="Exit codes: 0 compared; 2 bad input or incompatible fingerprints; 3 internal error.")
    parser.add_argument("a", metavar="A", help="model path or fingerprint file (the candidate, for lineage)")
    parser.add_argument("b", metavar="B", help="model path or fingerprint file (the reference, for lineage)")
    parser.add_argument("--refs", nargs="+", metavar="DIR|FILE",
                        help="reference fingerprints that set the scale of the standardised distance")
    add_space_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Compare two fingerprints and print or write the result."""
    check_space_options(args)
    references = load_fingerprints(args.refs) if args.refs else []
    a, b = resolve_inputs([args.a, args.b], references, args)
    result = compare(a, b, references or None, args.space, args.pca_components, args.threshold, args.scale)
    if args.lineage and a.sketch is not None and b.sketch is not None:
        from tg_verify.analysis.lineage import lineage_test

        result.lineage = lineage_test(a, b).to_dict()
    document = {"schema": REPORT_SCHEMA, "tool": tool_record(),
                "a": describe(a), "b": describe(b), "comparison": result.to_dict()}
    return emit(document, args, lambda console: render(console, result, a, b))


def describe(fp: Fingerprint) -> dict[str, Any]:
    """How a result names one fingerprint: name, source, digest, legacy flag."""
    return {"model_name": fp.model_name, "source": fp.source or None, "fingerprint_sha256": fp.digest(),
            "legacy": fp.legacy, "root_digest": fp.artifact.get("root_digest")}


def render(console: Any, result: Comparison, a: Fingerprint, b: Fingerprint) -> None:
    """The human view: the distances, the per-feature table, lineage, caveats."""
    from rich.table import Table

    console.print(f"[bold]{escape(shown(a.model_name))}[/bold] vs [bold]{escape(shown(b.model_name))}[/bold]")
    console.print(f"relative distance {result.relative_distance:.4f}  [dim](scale-free, mean over features of "
                  f"|a-b|/(|a|+|b|); 0 = identical)[/dim]")
    if result.distance is not None and result.space is not None:
        on = scale_words(result.scale, result.space.get("reference_count"))
        if not result.meaningful:
            console.print(f"distance {result.distance:.3f} on the {on}: [bold yellow]"
                          f"{escape(not_meaningful_text(result.not_meaningful))}[/bold yellow]")
        else:
            where = "within" if result.within_threshold else "[bold yellow]beyond[/bold yellow]"
            console.print(f"distance {result.distance:.3f} on the {on}: {where} the threshold {result.threshold:g}")
    table = Table(title="features", title_justify="left")
    table.add_column("feature")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column("relative diff", justify="right")
    with_z = result.scale == "references"
    with_scaled = result.scale == "population"
    if with_z:
        table.add_column("z A", justify="right")
        table.add_column("z B", justify="right")
    if with_scaled:
        table.add_column("(A-B) / spread", justify="right")
    for row in result.features:
        cells = [row.name, f"{row.a:.6g}", f"{row.b:.6g}", f"{row.relative:.4f}"]
        if with_z:
            cells += [f"{row.z_a:+.2f}", f"{row.z_b:+.2f}"]
        if with_scaled:
            cells += ["—" if row.scaled is None else f"{row.scaled:+.2f}"]
        table.add_row(*cells)
    console.print(table)
    console.print(lineage_summary(result.lineage))
    for line in caveat_lines(result.caveats):
        console.print(line)
