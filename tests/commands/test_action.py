"""`tg-verify action` run as the runner runs it: INPUT_* variables, $GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY files."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from tg_verify.attestation.record import PREDICATE_TYPE
from tg_verify.cli import main
from tg_verify.commands import action
from tg_verify.errors import UsageError


@pytest.fixture(scope="module")
def workspace(action_workspace: Path) -> Path:
    return action_workspace  # shared with tests/test_action_yml.py (tests/conftest.py)


def runner_env(workspace: Path, tmp_path: Path, **inputs: str) -> dict[str, str]:
    """The environment the runner gives a step: workspace, temp dir, file-command files, INPUT_*."""
    temp = tmp_path / "runner-temp"
    (temp / "_runner_file_commands").mkdir(parents=True)
    env = {"GITHUB_ACTIONS": "true", "CI": "true", "GITHUB_WORKSPACE": str(workspace), "RUNNER_TEMP": str(temp),
           "GITHUB_OUTPUT": str(temp / "_runner_file_commands" / "set_output"),
           "GITHUB_STEP_SUMMARY": str(temp / "_runner_file_commands" / "step_summary"),
           "INPUT_CACHE": str(workspace / ".tg-cache")}
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
    request = action.verify_request(inputs, {"RUNNER_TEMP": "/runner/temp"})
    assert request.candidate == Path("build/model") and request.device == "cuda"
    assert request.fingerprint_out == Path("fp file.json") and request.no_cache and request.cache_dir == Path("/cache")
    assert request.predicate == Path("pred.json") and request.require_weights
    assert request.defaults["report"] == Path("/runner/temp/tg-verify/report.json")
    assert inputs.summary is False and inputs.predicate == Path("pred.json")
    with pytest.raises(UsageError, match="valid `tg-verify verify` command line"):
        action.verify_request(action.parse_inputs({"INPUT_POLICY": "p.yml", "INPUT_DEVICE": "tpu"}), {})


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


def test_the_action_runs_the_cli_verify_path_with_every_flag(workspace, tmp_path, monkeypatch):
    """One verify path: the Action builds the same request the CLI builds and calls the same function, so flags
    the old entrypoint dropped (--threads) or ignored (--check-policy) act as they do on the command line."""
    import tg_verify.pipeline

    seen = []
    real = tg_verify.pipeline.verify

    def spy(policy, options=None):
        seen.append(options)
        return real(policy, options)

    monkeypatch.setattr(tg_verify.pipeline, "verify", spy)
    env = runner_env(workspace, tmp_path, policy="pass.yml", summary="false", args="--threads 1")
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 0, log
    assert seen[0].threads == 1 and seen[0].require_weights is True and seen[0].cache_dir == workspace / ".tg-cache"
    seen.clear()
    env = runner_env(workspace, tmp_path / "check", policy="pass.yml", args="--check-policy")
    code, log = run_action(env, monkeypatch, workspace)
    assert code == 0 and "valid policy (version 1; 2 references" in log and not seen  # nothing was verified
    outputs = read_outputs(env["GITHUB_OUTPUT"])
    assert outputs["verdict"] == "" and outputs["report-path"] == ""
    assert not (Path(env["RUNNER_TEMP"]) / "tg-verify" / "report.json").exists()


@pytest.fixture(scope="module")
def fingerprinted(workspace):
    """A policy whose references are fingerprint files, and the candidate's own fingerprint."""
    for name in ("llama-base", "qwen-base", "candidate"):
        assert main(["fingerprint", str(workspace / name), "-o", str(workspace / "fps" / f"{name}.json")]) == 0
    text = (workspace / "pass.yml").read_text().replace("model: ./llama-base", "fingerprint: fps/llama-base.json") \
        .replace("model: ./qwen-base", "fingerprint: fps/qwen-base.json")
    (workspace / "fps.yml").write_text(text)
    (workspace / "fp-only.yml").write_text(text.replace("path: ./candidate", "fingerprint: fps/candidate.json"))
    return workspace


@pytest.mark.parametrize("inputs, message", [
    ({"report": "fps.yml"}, "the report output would overwrite the policy file"),
    ({"attestation": "fps/llama-base.json"}, "would overwrite references[0].fingerprint"),
    ({"predicate": "candidate/model-00001-of-00003.safetensors"}, "would write into the candidate model"),
    ({"attestation": "out/a.json", "predicate": "out/a.json"}, "the attestation and predicate outputs name the same"),
    ({"args": "--fingerprint-out .tg-cache/x.json"}, "would write into the reference cache"),
])
def test_action_outputs_never_overwrite_inputs_or_each_other(fingerprinted, tmp_path, monkeypatch, inputs, message):
    before = {p: p.read_bytes() for p in fingerprinted.rglob("*") if p.is_file() and ".cache" not in p.parts}
    env = runner_env(fingerprinted, tmp_path, policy="fps.yml", **inputs)
    code, log = run_action(env, monkeypatch, fingerprinted)
    assert code == 2 and message in log, log
    assert log.startswith("::error ") and "title=tg-verify%3A bad input" in log
    after = {p: p.read_bytes() for p in fingerprinted.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert after == before  # nothing overwritten, nothing written
    assert read_outputs(env["GITHUB_OUTPUT"])["verdict"] == ""


def test_the_action_requires_recomputed_features_by_default(fingerprinted, tmp_path, monkeypatch):
    env = runner_env(fingerprinted, tmp_path, policy="fp-only.yml", summary="false")
    code, log = run_action(env, monkeypatch, fingerprinted)
    assert code == 1, log
    assert "TGV_FEATURES_FROM_FINGERPRINT" in read_outputs(env["GITHUB_OUTPUT"])["reasons"].split(",")
    assert any(line.startswith("::error ") and "TGV_FEATURES_FROM_FINGERPRINT" in line for line in log.splitlines())
    relaxed = fingerprinted / "fp-only-relaxed.yml"
    relaxed.write_text((fingerprinted / "fp-only.yml").read_text().replace(
        "fingerprint: fps/candidate.json", "fingerprint: fps/candidate.json\n  require_weights: false"))
    env = runner_env(fingerprinted, tmp_path / "relaxed", policy="fp-only-relaxed.yml", summary="false")
    code, log = run_action(env, monkeypatch, fingerprinted)
    assert code == 0 and "TGV_FEATURES_FROM_FINGERPRINT" in read_outputs(env["GITHUB_OUTPUT"])["reasons"]
