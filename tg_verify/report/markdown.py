"""The Markdown summary of a verify run, for $GITHUB_STEP_SUMMARY and pull-request comments.

A verdict table a reviewer reads in the run page, the reasons, the distance table (bounded in rows),
and the details (checks, settings, digests) folded in <details>. Size-bounded by construction.
Every value that comes from an input (names, ids, families, messages, paths) goes through `cell()` or
`code()`, so HTML or Markdown in a model file or a policy shows as text and never renders.
The pipeline and the analysis are imported only where a verify result is rendered, so the light verb
`verify-attestation --format markdown` stays free of torch and scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tg_verify.escaping import markdown_code, markdown_text
from tg_verify.verdict import summarize

if TYPE_CHECKING:
    from tg_verify.pipeline import ReferenceOutcome, VerificationResult

MAX_REFERENCE_ROWS = 200
MAX_FILE_ROWS = 200
ICONS = {"fail": "❌", "warn": "⚠️", "info": "ℹ️", "pass": "✅"}


def cell(text: object) -> str:
    """Input text as inert Markdown for one table cell: one line, HTML and Markdown characters escaped."""
    return markdown_text(text)


def code(text: object) -> str:
    """Input text as inline code: one line, backticks cannot close it, pipes escaped for tables."""
    return markdown_code(text)


def _lineage(ref: ReferenceOutcome) -> str:
    result = ref.lineage
    if result is None:
        return "unavailable" if ref.lineage_unavailable else "off"
    if not getattr(result, "comparable", True):
        return "not comparable: " + "; ".join(cell(note) for note in getattr(result, "notes", []) or [])
    decision = "**derived**" if result.derived else "not derived"
    rate_text = getattr(result, "rate_text", None)  # the calibrated rate in words (analysis/lineage.py)
    stated = rate_text() if callable(rate_text) else f"p={result.p_value:.3g}, FPR {result.false_positive_rate:.1%}"
    scores = result.scores_text(thresholds=True) if hasattr(result, "scores_text") else \
        f"{result.score:.3f} / {result.threshold:.3f}"
    return f"{scores}, {stated}: {decision}"


def render(result: VerificationResult) -> str:
    """The summary as GitHub-flavoured Markdown."""
    from tg_verify.analysis.attribution import NOT_MEANINGFUL, attribution_text

    policy, cand, cls = result.policy, result.candidate, result.classification
    label = "PASS" if result.passed else "FAIL"
    lines = [f"## {ICONS['pass' if result.passed else 'fail']} tg-verify: {label} — {cell(cand.name)}", "",
             f"{cell(summarize(result.verdict.findings))}", "",
             "| | |", "|---|---|",
             f"| Candidate | {code(cand.name)} ({cand.layout}, {len(cand.files)} files, root sha256 "
             f"{code(cand.root_digest[:16])}) |"]
    declared = ", ".join(x for x in (f"base {code(policy.declared.base)}" if policy.declared.base else "",
                                     f"family {code(policy.declared_family)}" if policy.declared_family else "") if x)
    lines.append(f"| Declared | {declared} |")
    if policy.forbidden:
        lines.append(f"| Forbidden | {', '.join(code(f) for f in policy.forbidden)} |")
    lines.append(f"| Attribution | {cell(attribution_text(cls, ', ', reasons=False))} |")
    declared_ref = result.declared_reference
    if declared_ref is not None:
        distance = (f"{declared_ref.distance:.3f} (threshold {declared_ref.threshold:g})" if cls.meaningful
                    else f"{declared_ref.distance:.3f} ({NOT_MEANINGFUL})")
        lines.append(f"| Distance to declared base | {distance} |")
        lines.append(f"| Lineage to declared base | {_lineage(declared_ref)} |")
    lines.append(f"| Verdict | **{label}** |")
    lines.append("")
    reasons = result.verdict.reasons
    if reasons:
        lines += ["### Reasons", ""]
        lines += [f"- {ICONS[f.severity]} {code(f.code)} {cell(f.message)}" for f in reasons]
        lines.append("")
    lines += ["### References", "", "| reference | family | role | distance | threshold | lineage (score / "
              "threshold, p, FPR) |", "|---|---|---|---:|---:|---|"]
    refs = sorted(result.references, key=lambda r: (r.distance, r.spec.id))
    for ref in refs[:MAX_REFERENCE_ROWS]:
        lines.append(f"| {code(ref.spec.id)} | {cell(ref.spec.family)} | {ref.role} | {ref.distance:.3f} | "
                     f"{ref.threshold:g} | {_lineage(ref)} |")
    if len(refs) > MAX_REFERENCE_ROWS:
        lines.append(f"| … {len(refs) - MAX_REFERENCE_ROWS} more in the JSON report | | | | | |")
    lines += ["", "<details><summary>Checks, fingerprint settings and file digests</summary>", ""]
    lines += [f"- {ICONS[f.severity]} {code(f.code)} {cell(f.message)}" for f in result.verdict.findings]
    lines += ["", f"Policy {code(policy.path.name)} sha256 {code(policy.sha256)}; fingerprint sha256 "
              f"{code(cand.fingerprint_digest)}; feature version {code(result.feature_version)}; settings "
              f"{code(', '.join(f'{k}={v}' for k, v in sorted(result.settings.items())))}", "",
              "| file | sha256 |", "|---|---|"]
    for entry in cand.files[:MAX_FILE_ROWS]:
        lines.append(f"| {code(entry.path)} | {code(entry.sha256)} |")
    if len(cand.files) > MAX_FILE_ROWS:
        lines.append(f"| … {len(cand.files) - MAX_FILE_ROWS} more in the JSON report | |")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(result.tool.items()))
    lines += ["", f"{cell(versions)}; {result.timings.get('total', 0.0):.1f} s", "", "</details>", ""]
    return "\n".join(lines)


def render_attestation(report: Any) -> str:
    """`verify-attestation`'s checks as Markdown (tg_verify.attestation.check.AttestationReport)."""
    verified = report.ok
    lines = [f"## {ICONS['pass' if verified else 'fail']} tg-verify attestation: "
             f"{'VERIFIED' if verified else 'NOT VERIFIED'} — {code(report.model)}", "",
             f"Attestation {code(report.source)} ({cell(report.wrapper)}) records {code(report.verification_result)}; "
             f"exit {report.exit_code}. Signatures are not verified by tg-verify.", "",
             "| | check | detail |", "|---|---|---|"]
    for check in report.checks[:MAX_FILE_ROWS * 2]:
        lines.append(f"| {ICONS['pass' if check.ok else 'fail']} | {cell(check.name)} | {cell(check.detail)} |")
    if len(report.checks) > MAX_FILE_ROWS * 2:
        lines.append(f"| … | {len(report.checks) - MAX_FILE_ROWS * 2} more with --format json | |")
    lines.append("")
    return "\n".join(lines)
