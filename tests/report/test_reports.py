"""Console, JSON and Markdown renderings of real verify results: content, escaping, bounds."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace

from rich.console import Console

from tg_verify import demo
from tg_verify.atomic import canonical_json
from tg_verify.pipeline import VerificationResult
from tg_verify.report import console, json_report, markdown


def render_console(result: VerificationResult, width: int = 100) -> str:
    buffer = io.StringIO()
    console.render(result, Console(file=buffer, width=width, force_terminal=False, highlight=False))
    return buffer.getvalue()


def _distance_shown(result: VerificationResult) -> str:
    """The declared base's distance as the console states it (against the threshold when the scale carries it)."""
    ref = result.declared_reference
    if not result.classification.meaningful:
        return f"{ref.distance:.3f}"
    return f"{ref.distance:.3f} {'>' if ref.distance > ref.threshold else '≤'} {ref.threshold:g}"


def _rate_shown(result: VerificationResult) -> str:
    """How the console states the declared base's lineage rate: from the calibration, or "uncalibrated"."""
    lineage = result.declared_reference.lineage
    assert lineage is not None
    return "unrelated pairs score as high" if lineage.calibrated else "uncalibrated"


def test_console_shows_candidate_declaration_attribution_distances_lineage_and_verdict(
        results: dict[str, VerificationResult]) -> None:
    text = " ".join(render_console(results["fail"]).split())  # wrapping aside
    result = results["fail"]
    for expected in (result.candidate.name, f"base {demo.BASE_ID}", f"family {result.classification.family}",
                     "TGV_LINEAGE_NOT_ESTABLISHED", "not derived", _rate_shown(result), "FAIL",
                     "exit 1", _distance_shown(result)):
        assert expected in text, expected
    passed = " ".join(render_console(results["pass"]).replace("│", " ").split())
    assert " PASS " in passed and "derived" in passed
    assert "passed with warnings: TGV_STATISTICS_NOT_MEANINGFUL" in passed  # three tiny references
    assert "distance" in passed and "on the scale fitted on 3 references · not meaningful" in passed


def test_console_fits_a_narrow_terminal(results: dict[str, VerificationResult]) -> None:
    text = render_console(results["pass"], width=60)
    assert max(len(line) for line in text.splitlines()) <= 60


def test_json_report_is_canonical_and_complete(results: dict[str, VerificationResult]) -> None:
    result = results["fail"]
    data = json_report.report_bytes(result)
    document = json.loads(data)
    assert canonical_json(document) == data
    assert document["verdict"] == "fail" and document["report_version"] == json_report.REPORT_VERSION
    assert document["declared"] == {"base": demo.BASE_ID, "family": "llama", "relation": "finetune", "forbidden": []}
    assert [r["id"] for r in document["references"]] == [r.spec.id for r in result.references]
    declared = next(r for r in document["references"] if r["role"] == "declared-base")
    assert declared["distance"] == result.declared_reference.distance
    assert declared["lineage"]["derived"] is False and "units" in declared["lineage"]
    assert document["candidate"]["files"] == [f.to_dict() for f in result.candidate.files]
    assert document["candidate"]["files_verified"] is True and document["candidate"]["files_hashed"] is True
    assert document["fingerprint"]["feature_version"] == result.feature_version
    assert document["attribution"]["centroids"] and document["tool"]["tg-verify"]
    assert [r["code"] for r in document["reasons"]] == [f.code for f in result.verdict.reasons]


def test_markdown_summary_has_the_verdict_table_and_details(results: dict[str, VerificationResult]) -> None:
    text = markdown.render(results["fail"])
    assert text.startswith("## ❌ tg-verify: FAIL")
    assert "| Verdict | **FAIL** |" in text and "`TGV_LINEAGE_NOT_ESTABLISHED`" in text
    assert text.count("<details>") == text.count("</details>") == 1
    assert results["fail"].candidate.fingerprint_digest in text
    assert markdown.render(results["pass"]).startswith("## ✅ tg-verify: PASS")


def test_markdown_escapes_table_cells_and_bounds_rows(results: dict[str, VerificationResult]) -> None:
    result = results["pass"]
    hostile = replace(result.candidate, name="evil | name `with` ticks\nand newline")
    many = tuple(replace(result.references[0], spec=replace(result.references[0].spec, id=f"ref-{i}"),
                         declared=False) for i in range(markdown.MAX_REFERENCE_ROWS + 50))
    text = markdown.render(replace(result, candidate=hostile, references=(*result.references, *many)))
    candidate_row = next(line for line in text.splitlines() if line.startswith("| Candidate |"))
    assert candidate_row.count(" | ") == 1 and "\\|" in candidate_row  # the pipe is escaped, not a column
    assert "`evil \\| name 'with' ticks\\nand newline`" in candidate_row  # the newline shown as \n, one line
    assert f"… {len(result.references) + 50} more in the JSON report" in text
    assert len(text.encode()) < 200_000


def test_cell_and_code_helpers() -> None:
    assert markdown.cell("a|b c") == "a\\|b c"
    assert markdown.cell("a\nb") == "a\\\\nb"  # one line; the escape's backslash is itself escaped for Markdown
    assert markdown.code("x`y") == "`x'y`"
    assert markdown.cell("<img src=x>") == "&lt;img src=x&gt;" and markdown.cell("![t](u)") == "\\!\\[t\\]\\(u\\)"


HTML_PAYLOAD = "</details><h1>PASS</h1><img src=https://example.invalid/t.png>"


def test_markdown_summary_never_renders_html_or_markdown_from_inputs(results: dict[str, VerificationResult]) -> None:
    """Names, ids, families and messages from model files and the policy are text in the step summary."""
    from tg_verify.verdict import Finding

    result = results["fail"]
    ref = next(r for r in result.references if not r.declared)
    others = tuple(r for r in result.references if r is not ref)
    hostile = replace(
        result,
        candidate=replace(result.candidate, name=HTML_PAYLOAD, files=(
            replace(result.candidate.files[0], path=HTML_PAYLOAD + ".safetensors"), *result.candidate.files[1:])),
        references=(replace(ref, spec=replace(ref.spec, id="![x](https://example.invalid/p.png)",
                                              family=HTML_PAYLOAD)), *others),
        verdict=replace(result.verdict, findings=(*result.verdict.findings,
                                                  Finding("TGV_X", "fail", f"model says {HTML_PAYLOAD}"))))
    text = markdown.render(hostile)
    # Inside an inline code span nothing renders; outside one, no tag and no image may remain.
    spans = re.findall(r"`[^`\n]*`", text)
    assert all(span.count("`") == 2 for span in spans)
    outside = re.sub(r"`[^`\n]*`", "", text)
    assert "<h1>" not in outside and "<img" not in outside and "![x]" not in outside
    assert outside.count("<details>") == 1 and outside.count("</details>") == 1  # only the summary's own block
    assert "&lt;/details&gt;&lt;h1&gt;PASS&lt;/h1&gt;" in outside  # the finding's message, shown as text
