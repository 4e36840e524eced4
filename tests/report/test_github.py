"""Runner protocol helpers: toolkit escaping, heredoc outputs, summary trimming."""

from __future__ import annotations

from pathlib import Path

import pytest

from tg_verify.errors import InputError
from tg_verify.report import github


def test_escaping_matches_the_toolkit():
    assert github.escape_data("100% done\r\nnext") == "100%25 done%0D%0Anext"
    assert github.escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"


def test_annotation_with_file_line_and_title():
    line = github.annotation("error", "distance 9.1 > 7\nsecond line", file="policies/gate.yml", line=8,
                             title="tg-verify: FAIL")
    assert line == "::error file=policies/gate.yml,line=8,title=tg-verify%3A FAIL::distance 9.1 > 7%0Asecond line"
    assert github.annotation("warning", "w", title=None) == "::warning::w"
    with pytest.raises(ValueError):
        github.annotation("fatal", "x")  # type: ignore[arg-type]


def test_a_value_cannot_forge_a_command_or_another_output():
    forged = "ok\n::error::pwned\nverdict<<EOF\npass\nEOF"
    line = github.annotation("notice", forged)
    # The runner only parses commands at the start of a line: one line means one command.
    assert len(line.splitlines()) == 1 and line.startswith("::notice title=tg-verify::ok%0A::error")


def test_groups():
    assert github.group_start("Hashing 3 files") == "::group::Hashing 3 files"
    assert github.group_end() == "::endgroup::"


def test_outputs_use_a_random_delimiter_and_refuse_values_that_contain_it(tmp_path):
    record = github.format_output("reasons", "A\nB", delimiter="ghadelimiter_x")
    assert record == "reasons<<ghadelimiter_x\nA\nB\nghadelimiter_x\n"
    with pytest.raises(InputError, match="delimiter"):
        github.format_output("reasons", "text ghadelimiter_x more", delimiter="ghadelimiter_x")
    with pytest.raises(InputError, match="newline"):
        github.format_output("bad\nname", "v")
    first, second = github.format_output("a", "1"), github.format_output("a", "1")
    assert first != second  # uuid4 delimiters
    output = tmp_path / "out"
    output.write_text("earlier<<d\nx\nd\n")
    assert github.write_outputs({"verdict": "pass", "family": "llama"}, {"GITHUB_OUTPUT": str(output)})
    text = output.read_text()
    assert text.startswith("earlier<<d\nx\nd\nverdict<<ghadelimiter_") and "\npass\n" in text
    assert not github.write_outputs({"verdict": "pass"}, {})


def test_oversized_output_is_refused():
    with pytest.raises(InputError, match="over"):
        github.format_output("big", "x" * (github.OUTPUT_VALUE_LIMIT_BYTES + 1))


def test_trim_summary_keeps_short_text_and_cuts_long_text_on_a_line():
    assert github.trim_summary("# ok\n", 100) == "# ok\n"
    rows = "".join(f"| row {i} | {'é' * 40} |\n" for i in range(2000))
    text = "# Verdict\n<details>\n\n```\n" + rows
    trimmed = github.trim_summary(text, 20_000)
    assert len(trimmed.encode("utf-8")) <= 20_000
    assert "Summary truncated" in trimmed
    body = trimmed.split("\n\n> **Summary truncated**")[0]
    assert body.rstrip().endswith("</details>")  # the open fence and <details> were closed
    assert body.count("```") % 2 == 0
    kept = [line for line in body.splitlines() if line.startswith("| row")]
    assert kept and all(line.endswith("|") for line in kept)  # no half rows


def test_append_step_summary_counts_what_the_file_already_holds(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("x" * 900)
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    assert github.append_step_summary("line\n" * 400, env, limit_bytes=github.SUMMARY_MARGIN_BYTES + 1500)
    assert summary.stat().st_size <= 1500
    assert "Summary truncated" in summary.read_text()
    assert not github.append_step_summary("x", {})


def test_workspace_relative(tmp_path):
    (tmp_path / "policies").mkdir()
    policy = tmp_path / "policies" / "gate.yml"
    assert github.workspace_relative(policy, {"GITHUB_WORKSPACE": str(tmp_path)}) == "policies/gate.yml"
    assert github.workspace_relative(Path("/elsewhere/x.yml"), {"GITHUB_WORKSPACE": str(tmp_path)}) == \
        "/elsewhere/x.yml"


def test_output_paths_are_normalised_and_workspace_relative(tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    (workspace / "policies").mkdir(parents=True)
    monkeypatch.chdir(workspace)
    env = {"GITHUB_WORKSPACE": str(workspace)}
    assert github.output_path("policies/../out/./report.json", env) == "out/report.json"
    assert github.output_path(workspace / "policies" / ".." / "tg.json", env) == "tg.json"
    assert github.output_path(tmp_path / "temp" / "x" / ".." / "predicate.json", env) == \
        (tmp_path / "temp" / "predicate.json").as_posix()  # outside the workspace: absolute
    assert github.output_path("a/../b.json", {}) == (workspace / "b.json").as_posix()
