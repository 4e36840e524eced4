"""`tg-verify search CANDIDATE --index INDEX [-k 10]`: which indexed references the candidate derives from.

Retrieval by signature short-lists k references; each gets the full lineage test against the
candidate; hits are ordered by that evidence and the attribution follows it (tg_verify/index/search.py).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from tg_verify import __version__

VERB = "search"
ORDER = 34
REPORT_SCHEMA = "https://tg-verify.dev/schemas/search"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `search` parser."""
    from tg_verify.fingerprint.settings import DEVICE_CHOICES

    parser = subparsers.add_parser(
        VERB, help="lineage search: the indexed references a model most likely derives from",
        description=("Search a reference index (`tg-verify index build`) for the references CANDIDATE (a fingerprint "
                     "file, or a model fingerprinted on the fly with the index's settings) most likely derives from: "
                     "the k nearest by signature, each with the full lineage test, ordered by its evidence, and the "
                     "family that evidence attributes. Docs: docs/scale.md."),
        epilog="Exit codes: 0 searched (whatever was found); 2 bad input or a broken index; 3 internal error.")
    parser.add_argument("candidate", metavar="CANDIDATE", help="fingerprint file or model path")
    parser.add_argument("--index", required=True, metavar="INDEX", help="the reference index directory")
    parser.add_argument("-k", type=int, default=10, metavar="K", help="references short-listed and tested (default 10)")
    parser.add_argument("--base", metavar="PATH", help="base model a PEFT adapter CANDIDATE is merged onto")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="where a model is fingerprinted")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar while fingerprinting (default: on a terminal outside CI)")
    parser.add_argument("--json", action="store_true", help="print the canonical JSON result instead of tables")
    parser.add_argument("-o", "--output", metavar="FILE.json", help="also write the JSON result to FILE")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Open the index, get the candidate's fingerprint, search, and print or write the result."""
    from tg_verify.analysis.inputs import is_fingerprint_path, load_or_fingerprint
    from tg_verify.commands.compare import describe, emit
    from tg_verify.errors import UsageError
    from tg_verify.fingerprint.settings import FingerprintSettings
    from tg_verify.index.search import check_index_usable, search
    from tg_verify.index.store import open_index
    from tg_verify.progress import progress_sink, wants_progress

    started = time.perf_counter()
    index = open_index(args.index)
    check_index_usable(index)
    opened = time.perf_counter() - started
    recorded = index.references.get("settings", {})
    settings = FingerprintSettings.from_dict(dict(recorded), **({"device": args.device} if args.device else {}))
    if args.base and is_fingerprint_path(args.candidate):
        raise UsageError("--base is for a PEFT adapter CANDIDATE; the candidate here is a fingerprint file")
    with progress_sink(wants_progress(args.progress)) as sink:
        candidate = load_or_fingerprint(args.candidate, settings, sink, base=args.base)
    result = search(index, candidate, args.k)
    result.seconds["open_index"] = opened
    document = {"schema": REPORT_SCHEMA, "tool": {"name": "tg-verify", "version": __version__},
                "candidate": describe(candidate),
                "index": {"path": str(index.root), "sha256": index.digest, "references": len(index.entries)},
                "search": result.to_dict()}
    return emit(document, args, lambda console: render(console, document))


def _number(value: float | None, spec: str) -> str:
    """A figure of the result, or a dash where it is not defined (JSON null: not computed, or not finite)."""
    return "—" if value is None else format(value, spec)


def render(console: Any, document: dict[str, Any]) -> None:
    """The human view: the attribution, the hits with their lineage tests, the nearest by features, caveats."""
    from rich.markup import escape as markup_escape
    from rich.table import Table

    from tg_verify.escaping import one_line, shown

    def escape(value: object) -> str:  # names from fingerprints and the index: one safe line, no rich markup
        return markup_escape(shown(value))

    def sentence(text: str) -> str:  # a sentence quoting such names: one safe line, not cut
        return markup_escape(one_line(text))

    from tg_verify.commands.compare import caveat_lines

    result = document["search"]
    name = escape(document["candidate"]["model_name"])
    attribution = result["attribution"]
    if attribution["by"] == "lineage":
        console.print(f"[bold]{name}[/bold]: lineage test: derived from [bold green]{escape(attribution['base'])}"
                      f"[/bold green] (family {escape(attribution['family'])}, score "
                      f"{_number(attribution['score'], '.3f')})")
        if attribution["agrees"] is False:
            console.print(f"[yellow]the statistical attribution (family {escape(attribution['statistics_family'])}) "
                          "disagrees with the lineage evidence; the lineage test is the stronger evidence[/yellow]")
    elif attribution["by"] == "statistics":
        console.print(f"[bold]{name}[/bold]: [bold yellow]no base found by the lineage test[/bold yellow]; the "
                      f"statistics attribute it to family {escape(attribution['family'])} (nearest base "
                      f"{escape(attribution['base'])}) — {sentence(attribution['note'])}")
    else:
        console.print(f"[bold]{name}[/bold]: [bold yellow]no base found[/bold yellow] — "
                      f"{sentence(attribution['note'])}")
    index = document["index"]
    console.print(f"[dim]index {escape(index['path'])}: {index['references']} references (sha256 "
                  f"{index['sha256'][:16]}…); {len(result['hits'])} short-listed by signature and tested[/dim]")
    table = Table(title="short list (ordered by lineage evidence)", title_justify="left")
    for column, justify in (("reference", "left"), ("family", "left"), ("similarity", "right"), ("score", "right"),
                            ("threshold", "right"), ("p", "right"), ("decision", "left"), ("distance", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for hit in result["hits"]:
        lineage = hit["lineage"]
        if not lineage["comparable"]:
            cells = ["—", "—", "—", "[yellow]not comparable[/yellow]"]
        else:
            decision = "[bold green]derived[/bold green]" if lineage["derived"] else "not derived"
            cells = [_number(lineage["score"], ".3f"), _number(lineage["threshold"], ".3f"),
                     _number(lineage["p_value"], ".3g"), decision]
        distance = _number(hit["distance"], ".2f")
        table.add_row(escape(hit["reference"]), escape(hit["family"]), f"{hit['similarity']:.3f}", *cells, distance)
    console.print(table)
    statistics = result["statistics"]
    if statistics is not None and statistics.get("available"):
        reasons = statistics.get("not_meaningful") or []
        words = (f"family {escape(statistics['family'])} (nearest base {escape(statistics['base'])}, distance "
                 f"{statistics['distance']:.2f} on the {statistics['scale']} scale)" if statistics["meaningful"]
                 else f"not meaningful ({sentence('; '.join(reasons))})")
        console.print(f"[dim]statistics (the paper's features, over the short list): {words}[/dim]")
    elif statistics is not None:
        console.print(f"[dim]statistics: not available ({sentence(statistics['reason'])})[/dim]")
    for line in caveat_lines(result["caveats"]):
        console.print(line)
