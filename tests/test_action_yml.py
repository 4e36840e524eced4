"""action.yml stays in step with the entrypoint and the CLI, never interpolates inputs into shell,
and its wrapper script really requests GPUs, falls back to CPU, and passes inputs by name."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tg_verify.cli import build_parser
from tg_verify.commands import action

ROOT = Path(__file__).resolve().parents[1]


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses what the runner refuses and PyYAML lets through: a key defined twice
    (the runner stops with "'args' is already defined" and "Fail to load action.yml"), and anchors/aliases."""

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is already defined (line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_strict(text: str) -> dict:
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


ACTION = load_strict((ROOT / "action.yml").read_text())
STEP = ACTION["runs"]["steps"][0]


def test_strict_loader_refuses_a_key_defined_twice():
    with pytest.raises(yaml.constructor.ConstructorError, match="'args' is already defined"):
        load_strict("inputs:\n  args:\n    description: a\n  args:\n    description: b\n")
    with pytest.raises(yaml.composer.ComposerError, match="aliases"):
        load_strict("a: &x 1\nb: *x\n")


# The runner's manifest schema (actions/runner src/Runner.Worker/action_yaml.json): the properties each
# mapping may hold, which are required, and which expression contexts a value may use.
ROOT_KEYS = {"name", "description", "author", "inputs", "outputs", "runs", "branding"}
OUTPUT_KEYS = {"description", "value"}
RUN_STEP_KEYS = {"name", "id", "run", "env", "working-directory", "shell", "if", "continue-on-error"}
STEP_ENV_CONTEXTS = {"github", "inputs", "strategy", "matrix", "steps", "job", "runner", "env"}
OUTPUT_CONTEXTS = {"github", "strategy", "matrix", "steps", "inputs", "job", "runner", "env"}
INPUT_DEFAULT_CONTEXTS = {"github", "strategy", "matrix", "job", "runner"}
EXPRESSION = re.compile(r"\$\{\{\s*([A-Za-z_][A-Za-z0-9_-]*)")


def contexts(value: str) -> set[str]:
    return set(EXPRESSION.findall(value))


def test_manifest_follows_the_runner_schema():
    assert set(ACTION) <= ROOT_KEYS, set(ACTION) - ROOT_KEYS
    assert isinstance(ACTION["name"], str) and ACTION["name"] and isinstance(ACTION["description"], str)
    assert ACTION["branding"]["icon"] and ACTION["branding"]["color"]
    for name, spec in ACTION["inputs"].items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name), name
        assert isinstance(spec, dict) and isinstance(spec.get("description"), str) and spec["description"], name
        assert isinstance(spec.get("required", False), bool), name
        default = spec.get("default", "")
        assert isinstance(default, str), f"input {name}: a default must be a string, not {default!r}"
        assert contexts(default) <= INPUT_DEFAULT_CONTEXTS, name
    for name, spec in ACTION["outputs"].items():
        assert set(spec) <= OUTPUT_KEYS and isinstance(spec["value"], str), name
        assert contexts(spec["value"]) <= OUTPUT_CONTEXTS, name
    runs = ACTION["runs"]
    assert set(runs) == {"using", "steps"} and runs["using"] == "composite"
    ids = set()
    for n, step in enumerate(runs["steps"]):
        assert isinstance(step, dict), n
        if "uses" in step:
            assert isinstance(step["uses"], str) and step["uses"], n
            continue
        assert set(step) <= RUN_STEP_KEYS, (n, set(step) - RUN_STEP_KEYS)
        assert isinstance(step.get("run"), str) and step["run"].strip(), f"step {n}: run is required"
        assert isinstance(step.get("shell"), str) and step["shell"], f"step {n}: composite run steps need a shell"
        for key, value in (step.get("env") or {}).items():
            assert isinstance(value, str), f"step {n}: env {key} must be a string"
            assert contexts(value) <= STEP_ENV_CONTEXTS, (n, key)
        if "id" in step:
            assert step["id"] not in ids, f"step id {step['id']} twice"
            ids.add(step["id"])
    for spec in ACTION["outputs"].values():
        for step_id in re.findall(r"steps\.([A-Za-z0-9_-]+)\.outputs", spec["value"]):
            assert step_id in ids, f"output refers to unknown step {step_id}"


def verify_flags() -> set[str]:
    parser = build_parser("verify")
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {opt for a in sub.choices["verify"]._actions for opt in a.option_strings}


def test_every_input_is_known_to_the_entrypoint_or_the_wrapper():
    declared = set(ACTION["inputs"])
    assert declared == (set(action.FLAG_INPUTS) | set(action.SWITCH_INPUTS) | set(action.OTHER_INPUTS)
                        | set(action.WRAPPER_INPUTS))
    assert ACTION["inputs"]["policy"]["required"] is True
    for name, spec in ACTION["inputs"].items():
        assert spec.get("description"), name
        assert isinstance(spec.get("default", ""), str), f"{name}: defaults must be strings"


def test_flag_inputs_map_to_real_verify_flags():
    flags = verify_flags()
    for name, flag in {**action.FLAG_INPUTS, **action.SWITCH_INPUTS}.items():
        assert flag in flags, f"input {name!r} maps to {flag}, which `tg-verify verify` does not have"
    for flag in action.REFUSED_FLAGS:
        assert flag in flags or flag == "--no-progress"


def test_outputs_match_what_the_entrypoint_writes():
    class Ref:
        distance, lineage = 1.0, type("L", (), {"score": 0.9, "comparable": True})()

    class Result:
        declared_reference = Ref()
        verdict = type("V", (), {"label": "pass", "reasons": ()})()
        classification = type("C", (), {"family": "llama"})()
        candidate = type("Cand", (), {"fingerprint_digest": "a" * 64, "root_digest": "b" * 64})()

    outcome = type("Outcome", (), {"result": Result(), "written": {"report": Path("r"), "attestation": Path("a"),
                                                                   "predicate": Path("p")}})()
    written = set(action.outputs_for(outcome)) | {"error"}
    assert written == set(ACTION["outputs"])
    for name, spec in ACTION["outputs"].items():
        assert spec["value"] == f"${{{{ steps.tg-verify.outputs.{name} }}}}"


def test_composite_passes_inputs_through_the_environment_only():
    assert ACTION["runs"]["using"] == "composite"
    script = STEP["run"]
    assert "${{" not in script, "inputs must never be interpolated into the shell script"
    env = STEP["env"]
    for name in set(action.FLAG_INPUTS) | set(action.SWITCH_INPUTS) | set(action.OTHER_INPUTS):
        variable = f"INPUT_{name.upper().replace('-', '_')}"
        assert env[variable] == f"${{{{ inputs.{name} }}}}"
        assert f"--env {variable} " in script + " ", f"{variable} is not passed into the container"
    for name in action.WRAPPER_INPUTS:
        assert env[f"TGV_{name.upper()}"] == f"${{{{ inputs.{name} }}}}"
    assert STEP["shell"] == "bash"
    subprocess.run(["bash", "-n", "-c", script], check=True)


FAKE_DOCKER = """#!/bin/bash
# Records each call; `info` reports the runtimes in $FAKE_RUNTIMES; `run --gpus` exits $FAKE_GPU_STATUS.
printf '%s\\n' "$*" >> "$FAKE_LOG"
case "$1" in
  info) echo "$FAKE_RUNTIMES" ;;
  build) echo "sha256:built" ;;
  run)
    echo "policy=$INPUT_POLICY args=$INPUT_ARGS" >> "$FAKE_LOG"
    for arg in "$@"; do if [ "$arg" = "--gpus" ]; then exit "${FAKE_GPU_STATUS:-0}"; fi; done
    exit "${FAKE_CPU_STATUS:-0}" ;;
esac
"""


def run_wrapper(tmp_path: Path, **env: str) -> tuple[int, str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "docker.log"
    log.write_text("")
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "RUNNER_TEMP": str(tmp_path / "temp"),
            "GITHUB_WORKSPACE": str(tmp_path), "GITHUB_ACTION_PATH": str(ROOT), "FAKE_RUNTIMES": "{}",
            "INPUT_POLICY": "gate.yml; touch pwned", "INPUT_ARGS": "$(touch pwned)"}
    for name in set(STEP["env"]) - set(base):
        base.setdefault(name, "")
    base.update({"TGV_RUNNER": "docker", "TGV_GPUS": "all"})
    base.update(env)
    proc = subprocess.run(["bash", "-c", STEP["run"]], env=base, cwd=tmp_path, capture_output=True, text=True)
    assert not (tmp_path / "pwned").exists(), "an input was evaluated by the shell"
    return proc.returncode, proc.stdout + proc.stderr, log.read_text().splitlines()


def test_gpu_runtime_present_requests_gpus(tmp_path):
    code, out, calls = run_wrapper(tmp_path, FAKE_RUNTIMES='{"nvidia":{},"runc":{}}', TGV_IMAGE="ghcr.io/x/tg@sha256:1")
    assert code == 0, out
    runs = [c for c in calls if c.startswith("run ")]
    assert len(runs) == 1 and "--gpus all" in runs[0] and runs[0].endswith("ghcr.io/x/tg@sha256:1 action")
    assert f"--volume {tmp_path}:{tmp_path}" in runs[0] and "--user " in runs[0]
    assert "policy=gate.yml; touch pwned args=$(touch pwned)" in calls  # values arrive verbatim
    assert not any(c.startswith("build") for c in calls)


def test_no_gpu_runtime_runs_on_cpu_with_a_notice(tmp_path):
    code, out, calls = run_wrapper(tmp_path, TGV_IMAGE="img")
    assert code == 0
    assert "::notice title=tg-verify::no NVIDIA container runtime" in out
    assert all("--gpus" not in c for c in calls)


def test_gpu_start_failure_falls_back_to_cpu(tmp_path):
    code, out, calls = run_wrapper(tmp_path, FAKE_RUNTIMES='{"nvidia":{}}', FAKE_GPU_STATUS="125", TGV_IMAGE="img")
    assert code == 0
    assert "::warning title=tg-verify::could not start the container with --gpus all" in out
    runs = [c for c in calls if c.startswith("run ")]
    assert len(runs) == 2 and "--gpus" in runs[0] and "--gpus" not in runs[1]


@pytest.mark.parametrize("status", ["1", "2"])
def test_verdict_exit_code_is_the_step_result(tmp_path, status):
    code, _, _ = run_wrapper(tmp_path, TGV_IMAGE="img", FAKE_CPU_STATUS=status)
    assert code == int(status)


def test_cpu_device_or_gpus_none_never_requests_gpus(tmp_path):
    for env in ({"INPUT_DEVICE": "cpu"}, {"TGV_GPUS": "none"}):
        _, _, calls = run_wrapper(tmp_path, FAKE_RUNTIMES='{"nvidia":{}}', TGV_IMAGE="img", **env)
        assert all("--gpus" not in c for c in calls if c.startswith("run "))


def test_empty_image_builds_the_action_dockerfile(tmp_path):
    code, out, calls = run_wrapper(tmp_path)
    assert code == 0
    assert calls[0] == f"build --quiet --tag tg-verify-action:local {ROOT}"
    assert "::group::Building the tg-verify image" in out and "::endgroup::" in out


def test_unknown_runner_is_bad_input(tmp_path):
    code, out, _ = run_wrapper(tmp_path, TGV_RUNNER="kubernetes")
    assert code == 2 and "::error title=tg-verify::input 'runner' must be docker or local" in out


def test_dockerfile_follows_the_docker_action_rules():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split()[0].upper() for line in text.splitlines() if line.strip() and not line.startswith("#")
                    and not line.startswith(" ")]
    assert instructions[0] in ("FROM", "ARG")
    assert "USER" not in instructions and "WORKDIR" not in instructions
    assert re.search(r'^ENTRYPOINT \["tg-verify"\]$', text, re.M), "exec-form ENTRYPOINT [\"tg-verify\"]"
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and re.search(r":\d+\.\d+\.\d+-cuda", base.group(1)) and "@sha256:" in base.group(1)
    pins = re.findall(r'"([a-z0-9_.-]+)==([0-9][^"]*)"', text)
    pinned = {name for name, _ in pins}
    assert {"safetensors", "transformers", "peft", "scikit-learn", "numpy", "pyyaml", "rich"} <= pinned
    assert "torch" not in pinned  # torch comes from the CUDA base image, never a CPU wheel from PyPI
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in dockerignore and ".venv" in dockerignore


# ---------------------------------------------------------------------------------------------
# The composite step as the runner runs it: bash, INPUT_* from `env:`, runner: local, tg-verify on PATH.
# Each run is a fresh `tg-verify action` process (the entrypoint as the runner starts it), so these tests
# also stand for the entrypoint's process tests: PASS 0, FAIL 1, bad input 2, report-only 0 on FAIL.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(action_workspace):
    return action_workspace  # shared with tests/commands/test_action.py (tests/conftest.py)


def run_composite(workspace: Path, tmp_path: Path, **inputs: str) -> tuple[int, str, dict[str, str], str]:
    """Run action.yml's step with `runner: local`; (exit code, log, outputs, step summary)."""
    import sys

    temp = tmp_path / "runner-temp"
    (temp / "_runner_file_commands").mkdir(parents=True)
    output, summary = temp / "_runner_file_commands" / "set_output", temp / "_runner_file_commands" / "summary"
    env = dict.fromkeys(STEP["env"], "")
    env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
                "GITHUB_ACTIONS": "true", "CI": "true", "RUNNER_TEMP": str(temp), "GITHUB_WORKSPACE": str(workspace),
                "GITHUB_ACTION_PATH": str(ROOT), "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary),
                "TGV_RUNNER": "local", "TGV_GPUS": "none", "INPUT_SUMMARY": "true", "INPUT_REPORT_ONLY": "false",
                "INPUT_CACHE": str(workspace / ".tg-cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    env.update({f"INPUT_{k.upper().replace('-', '_')}": v for k, v in inputs.items()})
    proc = subprocess.run(["bash", "-c", STEP["run"]], env=env, cwd=workspace, capture_output=True, text=True,
                          timeout=600)
    outputs = {}
    if output.exists():
        pattern = r"^([^<\n]+)<<(ghadelimiter_[0-9a-f-]{36})\n(.*?)\n\2\n"
        for match in re.finditer(pattern, output.read_text(), re.S | re.M):
            outputs[match[1]] = match[3]
    return proc.returncode, proc.stdout + proc.stderr, outputs, summary.read_text() if summary.exists() else ""


def test_composite_pass(workspace, tmp_path):
    code, log, outputs, summary = run_composite(workspace, tmp_path, policy="pass.yml")
    assert code == 0, log
    assert outputs["verdict"] == "pass" and not outputs.get("error")
    assert outputs["report-path"].startswith(str(tmp_path)) and Path(outputs["sarif-path"]).is_file()
    for name in ("report-path", "attestation-path", "predicate-path", "subjects-path"):
        assert Path(outputs[name]).is_file(), name
    assert "## ✅ tg-verify: PASS" in summary and "::error" not in log


def test_composite_fail_fails_the_step(workspace, tmp_path):
    code, log, outputs, summary = run_composite(workspace, tmp_path, policy="fail.yml")
    assert code == 1, log
    assert outputs["verdict"] == "fail" and "TGV_LINEAGE_NOT_ESTABLISHED" in outputs["reasons"]
    assert re.search(r"^::error file=fail\.yml,line=\d+,title=tg-verify FAIL::TGV_", log, re.M)
    assert "## ❌ tg-verify: FAIL" in summary and Path(outputs["attestation-path"]).is_file()
    assert "report-only" not in log
    sarif_log = json.loads(Path(outputs["sarif-path"]).read_text())
    assert {r["level"] for r in sarif_log["runs"][0]["results"]} >= {"error"}


def test_composite_report_only_reports_a_fail_without_failing(workspace, tmp_path):
    code, log, outputs, summary = run_composite(workspace, tmp_path, policy="fail.yml", **{"report-only": "true"})
    assert code == 0, log
    assert outputs["verdict"] == "fail" and "## ❌ tg-verify: FAIL" in summary  # reported in full
    assert re.search(r"^::error file=fail\.yml", log, re.M)  # the annotations are still there
    assert "::warning file=fail.yml,title=tg-verify report-only::verdict FAIL reported, not enforced" in log
    assert json.loads(Path(outputs["report-path"]).read_text())["verdict"] == "fail"


@pytest.mark.parametrize("inputs", [{"policy": "missing.yml", "report-only": "true"},
                                    {"policy": "pass.yml", "report-only": "maybe"}])
def test_composite_bad_input_fails_even_report_only(workspace, tmp_path, inputs):
    code, log, outputs, summary = run_composite(workspace, tmp_path, **inputs)
    assert code == 2, log
    assert outputs["verdict"] == "" and outputs["error"]
    assert inputs["policy"] != "missing.yml" or "missing.yml" in outputs["error"]
    assert log.startswith("::error ") and "tg-verify could not verify" in summary
