"""The console summary of a verify run (rich): candidate, declared lineage, attribution, distances,
lineage evidence, checks, and the verdict in one glance."""

from __future__ import annotations

import math
import os
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tg_verify.analysis.attribution import NOT_MEANINGFUL, attribution_text, scale_words
from tg_verify.escaping import one_line, shown
from tg_verify.pipeline import ReferenceOutcome, VerificationResult
from tg_verify.verdict import Finding, summarize

MARKS: dict[str, tuple[str, str]] = {"fail": ("✗ FAIL", "bold red"), "warn": ("! WARN", "bold yellow"),
                                     "info": ("i INFO", "cyan"), "pass": ("✓ pass", "green")}


# Width of rendered output that is not a terminal (a CI log, a file, a pipe), unless $COLUMNS says otherwise:
# wide enough that no table is cut or wrapped.
LOG_WIDTH = 240


def make_console(*, stderr: bool = False, file: Any = None) -> Console:
    """A rich Console for command output: as rich sizes it on a terminal; elsewhere (a CI log, a pipe) at
    $COLUMNS or LOG_WIDTH columns with lines never wrapped, so tables are not cut at 80 columns."""
    console = Console(stderr=stderr, file=file, highlight=False)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, file=file, highlight=False, width=LOG_WIDTH, soft_wrap=True)


def short_digest(digest: str, length: int = 12) -> str:
    """The first `length` hex digits of a digest, for display."""
    return digest[:length] + "…" if len(digest) > length else digest


def lineage_cell(ref: ReferenceOutcome) -> Text:
    """Lineage evidence against one reference: the score and the decision."""
    result = ref.lineage
    if result is None:
        return Text("off" if ref.lineage_unavailable is None else "unavailable", style="dim")
    if not getattr(result, "comparable", True):
        return Text("not comparable", style="yellow")
    text = Text(f"{result.scores_text()} ")
    if result.derived:
        text.append("derived", style="bold red" if ref.forbidden else "bold green")
    else:
        text.append("not derived", style="yellow" if ref.declared else "dim")
    return text


def _span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if low == high else f"{format(low, fmt)}–{format(high, fmt)}"


def lineage_caption(result: VerificationResult) -> str | None:
    """How the lineage decision is made, once for the table: threshold, alpha, stated false-positive rate."""
    tested = [r.lineage for r in result.references
              if r.lineage is not None and getattr(r.lineage, "comparable", True)]
    if not tested:
        return None
    rates = [t.false_positive_rate for t in tested if math.isfinite(t.false_positive_rate)]
    stated = (f"unrelated models above it in the calibration: {_span(rates, '.2%')}" if rates
              else "uncalibrated for this architecture")
    sketch = [t.threshold for t in tested if math.isfinite(t.threshold)]
    blocks = [t.block_threshold for t in tested if math.isfinite(t.block_threshold)]
    rule = " or ".join(([f"score > {_span(sketch, '.3f')}"] if sketch else [])
                       + ([f"blocks > {_span(blocks, '.3f')}"] if blocks else []))
    return (f"lineage: derived when {rule} (target rate {result.policy.lineage.alpha:g}); {stated}; "
            f"p: share of unrelated pairs scoring as high")


def _overview(result: VerificationResult) -> Table:
    policy, cand, cls = result.policy, result.candidate, result.classification
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")  # long names are folded, never cut
    files = f"{len(cand.files)} file{'s' if len(cand.files) != 1 else ''}"
    origin = {"model": "fingerprinted in this run", "fingerprint": "features and digests from a fingerprint file "
              "(files not read)", "model+fingerprint": "features from a fingerprint file, its digests checked against "
              "the files"}.get(cand.source, cand.source)
    grid.add_row("Candidate", Text(f"{shown(cand.name)}  ({shown(cand.layout)}, {files}, root sha256 "
                                   f"{short_digest(cand.root_digest)}; {origin})"))
    if cand.base is not None:
        grid.add_row("Merged onto", Text(f"{shown(cand.base.name)} (root sha256 "
                                         f"{short_digest(cand.base.root_digest)})"))
    declared = []
    if policy.declared.base:
        declared.append(f"base {shown(policy.declared.base)}")
    if policy.declared_family:
        declared.append(f"family {shown(policy.declared_family)}")
    if policy.declared.relation:
        declared.append(f"relation {shown(policy.declared.relation)}")
    grid.add_row("Declared", Text(" · ".join(declared)))
    if policy.forbidden:
        grid.add_row("Forbidden", Text(", ".join(shown(f) for f in policy.forbidden)))
    attribution = Text(one_line(attribution_text(cls, reasons=False)),
                       style="bold yellow" if cls.out_of_cluster or not cls.attribution_meaningful else "")
    if cls.margin is not None and cls.attribution_meaningful:
        attribution.append(f" · margin {cls.margin:.3f}")
    grid.add_row("Attribution", attribution)
    grid.add_row("Policy", Text(f"{shown(policy.path)} (sha256 {short_digest(policy.sha256)})", style="dim"))
    return grid


def _distances(result: VerificationResult) -> Table:
    cls = result.classification
    space = scale_words(cls.scale, cls.space.get("reference_count") if cls.space else None)
    meaning = "" if cls.meaningful else f"; {NOT_MEANINGFUL}"
    table = Table(title=f"Distances ({space}{meaning}) and lineage evidence", title_justify="left",
                  caption=lineage_caption(result), caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for name, justify in (("reference", "left"), ("family", "left"), ("role", "left"),
                          ("distance", "right"), ("lineage", "left"), ("p", "right")):
        table.add_column(name, justify=justify, no_wrap=name != "family")  # type: ignore[arg-type]
    for ref in sorted(result.references, key=lambda r: (r.distance, r.spec.id)):
        over = not ref.within_threshold and cls.meaningful
        role = "declared" if ref.declared else "forbidden" if ref.forbidden else ""
        table.add_row(Text(shown(ref.spec.id), style="bold" if ref.declared else "red" if ref.forbidden else ""),
                      Text(shown(ref.spec.family)), role,
                      Text(f"{ref.distance:.3f} {'>' if over else '≤'} {ref.threshold:g}" if cls.meaningful
                           else f"{ref.distance:.3f}", style="bold red" if over and ref.declared else ""),
                      lineage_cell(ref), "" if ref.lineage is None or not math.isfinite(ref.lineage.p_value)
                      else f"{ref.lineage.p_value:.3g}")
    return table


def _findings(findings: tuple[Finding, ...]) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for finding in findings:
        mark, style = MARKS[finding.severity]
        table.add_row(Text(mark, style=style), Text(shown(finding.code), style="bold"),
                      Text(one_line(finding.message)))
    return table


def _verdict_line(result: VerificationResult) -> Text:
    label = "PASS" if result.passed else "FAIL"
    text = Text(f" {label} ", style="bold white on green" if result.passed else "bold white on red")
    text.append(f"  {summarize(result.verdict.findings)}  ·  exit {result.exit_code}  ·  "
                f"{result.timings.get('total', 0.0):.1f} s")
    return text


def render(result: VerificationResult, console: Console) -> None:
    """Print the summary to `console`."""
    parts: list[Any] = [_overview(result)]
    console.print(Panel(Group(*parts), title="tg-verify", title_align="left", expand=console.is_terminal,
                        border_style="green" if result.passed else "red"))
    console.print(_distances(result))
    console.print(Text("Checks", style="bold"))
    console.print(_findings(result.verdict.findings))
    if any(ref.lineage_unavailable for ref in result.references):
        for ref in result.references:
            if ref.lineage_unavailable:
                console.print(Text(f"  lineage vs {shown(ref.spec.id)}: {one_line(ref.lineage_unavailable)}",
                                   style="dim"))
    console.print(_verdict_line(result))
