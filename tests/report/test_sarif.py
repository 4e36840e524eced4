"""SARIF 2.1.0 output: valid against the SARIF schema, a FAIL is an alert on the policy line it concerns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from tg_verify.cli import main
from tg_verify.pipeline import VerificationResult
from tg_verify.report import sarif
from tg_verify.verdict import Finding

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "sarif-2.1.0-rtm.5.json").read_text(encoding="utf-8"))


def validate(log: dict) -> None:
    jsonschema.Draft4Validator(SCHEMA).validate(json.loads(sarif.sarif_bytes(log)))


def test_the_vendored_schema_rejects_what_code_scanning_would() -> None:
    jsonschema.Draft4Validator.check_schema(SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate({"version": "2.1.0", "runs": [{"results": []}]})  # no tool


def test_a_fail_is_an_error_result_on_the_policy_line_of_its_reference(
        results: dict[str, VerificationResult], monkeypatch) -> None:
    result = results["fail"]
    monkeypatch.chdir(result.policy.path.parent.parent)
    log = sarif.verify_sarif(result, environ={})
    validate(log)
    run = log["runs"][0]
    failing = {f.code for f in result.verdict.findings if f.severity == "fail"}
    assert {r["ruleId"] for r in run["results"] if r["level"] == "error"} == failing
    assert [rule["id"] for rule in run["tool"]["driver"]["rules"]] == list(dict.fromkeys(
        r["ruleId"] for r in run["results"]))
    policy_lines = result.policy.path.read_text().splitlines()
    for item in run["results"]:
        location = item["locations"][0]["physicalLocation"]
        assert location["artifactLocation"] == {"uri": "policies/fail.yml", "uriBaseId": "%SRCROOT%"}
        line = policy_lines[location["region"]["startLine"] - 1]
        subject = item["properties"]["subject"]
        assert (subject in line) if subject else ("declared:" in line)
        assert item["ruleIndex"] < len(run["tool"]["driver"]["rules"])
    assert run["invocations"][0]["exitCode"] == 1 and run["properties"]["verdict"] == "fail"


def test_a_pass_has_no_results_and_fingerprints_are_stable(results: dict[str, VerificationResult]) -> None:
    log = sarif.verify_sarif(results["pass"], environ={})
    validate(log)
    assert all(r["level"] == "warning" for r in log["runs"][0]["results"])
    assert not [f for f in results["pass"].verdict.findings if f.severity == "fail"]
    first = sarif.verify_sarif(results["fail"], environ={})["runs"][0]["results"]
    again = sarif.verify_sarif(results["fail"], environ={})["runs"][0]["results"]
    assert [r["partialFingerprints"] for r in first] == [r["partialFingerprints"] for r in again]


def test_hostile_codes_and_messages_stay_one_line(results: dict[str, VerificationResult]) -> None:
    result = results["fail"]
    hostile = replace(result, verdict=replace(result.verdict, findings=(
        *result.verdict.findings, Finding("TGV_X\n::error::y", "fail", "line\n::add-mask::FAIL", "ref\nx"))))
    log = sarif.verify_sarif(hostile, environ={})
    validate(log)

    def strings(value: object) -> list[str]:
        if isinstance(value, dict):
            return [s for v in (*value.keys(), *value.values()) for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(log) if "\n" in s or "::" in s]  # inputs made one line, no command markers


def test_cli_format_sarif_and_sarif_file(demo_tree: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(demo_tree)
    assert main(["verify", "policies/fail.yml", "--format", "sarif", "--sarif", str(tmp_path / "x.sarif")]) == 1
    printed = json.loads(capsys.readouterr().out)
    validate(printed)
    assert json.loads((tmp_path / "x.sarif").read_text()) == printed
    assert main(["verify", "policies/pass.yml", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("## ✅ tg-verify: PASS")
    assert main(["verify", "policies/pass.yml", "--json", "--format", "sarif"]) == 2
    assert "--json and --format sarif disagree" in capsys.readouterr().err


def test_verify_attestation_formats(demo_tree: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(demo_tree)
    statement = tmp_path / "att.json"
    assert main(["verify", "policies/pass.yml", "--attestation", str(statement)]) == 0
    capsys.readouterr()
    model = demo_tree / "models" / "finetune"
    assert main(["verify-attestation", str(statement), str(model), "--format", "sarif"]) == 0
    log = json.loads(capsys.readouterr().out)
    validate(log)
    assert log["runs"][0]["results"] == [] and log["runs"][0]["properties"]["verified"] is True
    (model / "config.json").write_text((model / "config.json").read_text())  # same bytes: still verified
    other = demo_tree / "models" / "unrelated"
    assert main(["verify-attestation", str(statement), str(other), "--format", "sarif"]) == 2
    log = json.loads(capsys.readouterr().out)
    validate(log)
    assert {r["ruleId"] for r in log["runs"][0]["results"]} == {"TGV_ATTESTATION_INTEGRITY"}
    assert main(["verify-attestation", str(statement), str(other), "--format", "markdown"]) == 2
    assert "NOT VERIFIED" in capsys.readouterr().out
