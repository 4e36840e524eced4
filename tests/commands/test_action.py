"""`tg-verify action` run as the runner runs it: INPUT_* variables, $GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY files."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from attestation_helpers import build_workspace

from tg_verify.cli import main
from tg_verify.commands import action
from tg_verify.errors import UsageError
from tg_verify.report.attestation import PREDICATE_TYPE


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("workspace"))


def runner_env(workspace: Path, tmp_path: Path, **inputs: str) -> dict[str, str]:
    """The environment the runner gives a step: workspace, temp dir, file-command files, INPUT_*."""
    temp = tmp_path / "runner-temp"
    (temp / "_runner_file_commands").mkdir(parents=True)
    env = {"GITHUB_ACTIONS": "true", "CI": "true", "GITHUB_WORKSPACE": str(workspace), "RUNNER_TEMP": str(temp),
           "GITHUB_OUTPUT": str(temp / "_runner_file_commands" / "set_output"),
           "GITHUB_STEP_SUMMARY": str(temp / "_runner_file_commands" / "step_summary"),
           "INPUT_CACHE": str(workspace / ".cache")}
    env.update({f"INPUT_{name.upper()}": value for name, value in inputs.items()})
    return env


def read_outputs(path: str) -> dict[str, str]:
    """Parse $GITHUB_OUTPUT as the runner does: name<<DELIM / value / DELIM records."""
    text = Path(path).read_text()
    outputs: dict[str, str] = {}
    pattern = re.compile(r"^(?P<name>[^<\n]+)<<(?P<delim>ghadelimiter_[0-9a-f-]{36})\n(?P<value>.*?)\n(?P=delim)\n",
                         re.S | re.M)
    consumed = 0
    for match in pattern.finditer(text):
        assert match.start() == consumed, "unparseable text between records"
        outputs[match["name"]] = match["value"]
        consumed = match.end()
    assert consumed == len(text)
    return outputs


def run_action(env: dict[str, str], monkeypatch, workspace: Path) -> tuple[int, str]:
    monkeypatch.chdir(workspace)
    out = io.StringIO()
    code = action.run(type("Args", (), {"debug": False})(), environ=env, out=out)
    return code, out.getvalue()


def test_pass_writes_outputs_summary_report_and_attestation(workspace, tmp_path, monkeypatch):
    env = runner_env(workspace, tmp_path, policy="pass.yml", report="out/report.json",
                     attestation="out/attestation.json", summary="true")
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 0, log
    outputs = read_outputs(env["GITHUB_OUTPUT"])
    # two tiny references cannot scale the paper's distance: a warning, the lineage test decides
    assert outputs["verdict"] == "pass" and outputs["family"] == "llama"
    assert outputs["reasons"] == "TGV_STATISTICS_NOT_MEANINGFUL"
    assert 0 < float(outputs["distance"]) <= 7.0 and float(outputs["lineage-score"]) > 0.5
    assert outputs["report-path"] == "out/report.json" and outputs["attestation-path"] == "out/attestation.json"
    assert outputs["predicate-type"] == PREDICATE_TYPE
    report = json.loads((workspace / "out/report.json").read_text())
    assert report["verdict"] == "pass"
    statement = json.loads((workspace / "out/attestation.json").read_text())
    predicate = json.loads(Path(outputs["predicate-path"]).read_text())
    assert predicate == statement["predicate"] and predicate["verificationResult"] == "PASSED"
    assert outputs["root-digest"] == "sha256:" + statement["predicate"]["candidate"]["rootDigest"]["sha256"]
    assert Path(outputs["predicate-path"]).is_relative_to(env["RUNNER_TEMP"])  # default under $RUNNER_TEMP
    summary = Path(env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "PASS" in summary and "llama-base" in summary
    # Long phases are folded into balanced log groups; no error annotation on a PASS.
    assert log.count("::group::") == log.count("::endgroup::") >= 1  # candidate, and references not cached
    lines = log.splitlines()
    opened = lines.index("::group::fingerprint candidate")
    assert re.fullmatch(r"candidate: \d+/\d+ tensors, [\d.]+ MB read in [\d.]+ s", lines[opened + 1])
    assert lines[opened + 2] == "::endgroup::"
    assert "::error" not in log
    # The consumer's check passes on what the Action wrote.
    assert main(["verify-attestation", str(workspace / "out/attestation.json"), str(workspace / "candidate"),
                 "--policy", str(workspace / "pass.yml")]) == 0


def test_fail_annotates_the_policy_and_exits_1(workspace, tmp_path, monkeypatch):
    env = runner_env(workspace, tmp_path, policy="fail.yml", summary="false", args="--fingerprint-out fp.json")
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 1, log
    outputs = read_outputs(env["GITHUB_OUTPUT"])
    assert outputs["verdict"] == "fail" and outputs["family"] == "llama"
    assert {"TGV_LINEAGE_NOT_ESTABLISHED", "TGV_FORBIDDEN_LINEAGE"} <= set(outputs["reasons"].split(","))
    errors = [line for line in log.splitlines() if line.startswith("::error ")]
    assert any("TGV_LINEAGE_NOT_ESTABLISHED" in line for line in errors)
    # Annotations point at the policy file (relative to the workspace) and the line naming the reference.
    assert all("file=fail.yml" in line for line in errors)
    assert any(",line=8," in line and "TGV_FORBIDDEN" in line for line in errors), errors  # `id: llama-base`
    assert not Path(env["GITHUB_STEP_SUMMARY"]).exists()  # summary: false
    assert (workspace / "fp.json").is_file()  # extra verify flags from `args` were applied
    statement = json.loads(Path(env["RUNNER_TEMP"], "tg-verify", "attestation.json").read_text())
    assert statement["predicate"]["verificationResult"] == "FAILED"


def test_bad_input_is_an_error_annotation_and_exit_2(workspace, tmp_path, monkeypatch):
    env = runner_env(workspace, tmp_path, policy="missing.yml")
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 2
    assert log.startswith("::error ") and "missing.yml" in log and "title=tg-verify%3A bad input" in log
    outputs = read_outputs(env["GITHUB_OUTPUT"])
    assert outputs["verdict"] == "" and "missing.yml" in outputs["error"]


def test_broken_policy_annotation_points_at_the_policy(workspace, tmp_path, monkeypatch):
    (workspace / "broken.yml").write_text("version: 1\ncandidate: [\n")
    env = runner_env(workspace, tmp_path, policy="broken.yml")
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 2 and "file=broken.yml" in log.splitlines()[0]


def test_broken_weights_file_annotation_points_at_that_file(workspace, tmp_path, monkeypatch):
    broken = workspace / "broken-model"
    broken.mkdir()
    for source in (workspace / "candidate").iterdir():
        data = source.read_bytes()
        (broken / source.name).write_bytes(data[: len(data) // 2] if source.name.startswith("model-00002") else data)
    env = runner_env(workspace, tmp_path, policy="pass.yml", candidate="broken-model")
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 2
    assert log.splitlines()[0].startswith("::error file=broken-model/model-00002-of-00003.safetensors,")


@pytest.mark.parametrize("inputs, message", [
    ({}, "input 'policy' is required"),
    ({"policy": "p.yml", "report": "--json"}, "looks like a flag"),
    ({"policy": "p.yml", "args": "--report x.json"}, "use the input 'report'"),
    ({"policy": "p.yml", "args": "--json"}, "not available in the Action"),
    ({"policy": "p.yml", "args": "--rep=x.json"}, "sets --report"),
    ({"policy": "p.yml", "args": "--js"}, "not available in the Action"),
    ({"policy": "p.yml", "args": "other.yml"}, "must hold flags"),
    ({"policy": "p.yml", "args": "--fingerprint-out 'unterminated"}, "cannot be split"),
    ({"policy": "p.yml", "summary": "maybe"}, "'summary' must be true or false"),
])
def test_inputs_are_validated(inputs, message):
    with pytest.raises(UsageError, match=message):
        action.parse_inputs({f"INPUT_{k.upper()}": v for k, v in inputs.items()})


def test_inputs_become_a_verify_command_line():
    env = {"INPUT_POLICY": "gate.yml", "INPUT_CANDIDATE": "build/model", "INPUT_DEVICE": "cuda",
           "INPUT_CACHE": "/cache", "INPUT_ARGS": "--no-cache --fingerprint-out 'fp file.json'",
           "INPUT_SUMMARY": "false", "INPUT_PREDICATE": "pred.json"}
    inputs = action.parse_inputs(env)
    assert inputs.argv == ("gate.yml", "--candidate", "build/model", "--device", "cuda", "--cache-dir", "/cache",
                           "--no-cache", "--fingerprint-out", "fp file.json")
    args = action.verify_namespace(inputs)
    assert args.candidate == "build/model" and args.device == "cuda" and args.fingerprint_out == "fp file.json"
    assert inputs.summary is False and inputs.predicate == Path("pred.json")
    with pytest.raises(UsageError, match="valid `tg-verify verify` command line"):
        action.verify_namespace(action.parse_inputs({"INPUT_POLICY": "p.yml", "INPUT_DEVICE": "tpu"}))


def test_docker_style_hyphenated_input_names_are_read():
    assert action.read_input("fingerprint-out", {"INPUT_FINGERPRINT-OUT": " x "}) == "x"
    assert action.read_input("fingerprint-out", {"INPUT_FINGERPRINT_OUT": "y"}) == "y"


def test_bad_input_is_noted_in_the_job_summary(workspace, tmp_path, monkeypatch):
    env = runner_env(workspace, tmp_path, policy="missing.yml")
    run_action(env, monkeypatch, workspace)
    summary = Path(env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "tg-verify could not verify" in summary and "missing.yml" in summary


def test_internal_error_is_annotated_and_exits_3(workspace, tmp_path, monkeypatch):
    import tg_verify.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tg_verify.pipeline, "verify", broken)
    env = runner_env(workspace, tmp_path, policy="pass.yml", summary="false")
    env["RUNNER_DEBUG"] = "1"
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 3
    assert log.startswith("::error title=tg-verify%3A internal error::internal error: RuntimeError: boom")
    assert "Traceback" in log  # debug logging on a re-run shows where
    assert read_outputs(env["GITHUB_OUTPUT"])["error"].startswith("internal error")
