"""`tg-verify POLICY.yml` end to end: exit codes, console and JSON output, output files, step summary, and
bad input (one line naming file and field, exit 2, nothing written)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tg_verify import demo
from tg_verify.analysis.calibration import Calibration, NullSample, class_key, upper_bound
from tg_verify.analysis.lineage_rule import LINEAGE_METHOD
from tg_verify.cli import main
from tg_verify.fingerprint.document import load
from tg_verify.fingerprint.sketch import SKETCH_VERSION
from tg_verify.policy import MAX_POLICY_BYTES

BASE = demo.BASE_ID


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's models, reference fingerprints and policies, built once per session (shared by modules)."""
    tree, _ = demo.ensure(tmp_path_factory.getbasetemp() / "tg-demo")
    return tree


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TG_VERIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def policy_text(tree: Path, candidate: str, base: str = BASE, outputs: str = "") -> str:
    refs = "".join(f"  - id: {ref_id}\n    family: {family}\n    fingerprint: {tree / 'refs' / f'{ref_id}.json'}\n"
                   for ref_id, family in ((BASE, "llama"), ("demo-qwen2-base", "qwen2"),
                                          ("demo-gemma-base", "gemma")))
    return (f"version: 1\ncandidate:\n  path: {tree / 'models' / candidate}\ndeclared:\n  base: {base}\n"
            f"references:\n{refs}on_out_of_cluster: warn\n{outputs}")


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yml"
    path.write_text(text)
    return path


def test_pass_writes_report_attestation_summary_and_fingerprint(demo_tree: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    summary_file = tmp_path / "step_summary.md"
    summary_file.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary_file))
    policy = write_policy(tmp_path, policy_text(demo_tree, "finetune", outputs="outputs:\n  report: out/report.json\n"))
    code = main([str(policy), "--attestation", str(tmp_path / "att.json"), "--summary", str(tmp_path / "s.md"),
                 "--fingerprint-out", str(tmp_path / "cand.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PASS" in out and "TGV_LINEAGE_ESTABLISHED" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())  # relative to the policy file
    assert report["verdict"] == "pass" and report["policy"]["sha256"]
    assert {c["code"] for c in report["checks"]} >= {"TGV_STATISTICS_NOT_MEANINGFUL", "TGV_LINEAGE_ESTABLISHED"}
    assert report["attribution"]["scale"] == "references" and report["attribution"]["meaningful"] is False
    assert report["candidate"]["root_digest"] and report["fingerprint"]["settings"]["repeats"] == 30
    assert set(report["timings"]) >= {"total"} and report["tool"]["tg-verify"]
    statement = json.loads((tmp_path / "att.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicate"]["verificationResult"] == "PASSED"
    fingerprint = load(tmp_path / "cand.json")
    assert fingerprint.digest() == report["candidate"]["fingerprint_digest"]
    step = summary_file.read_text()
    assert step.startswith("# earlier step\n") and "tg-verify: PASS" in step
    assert (tmp_path / "s.md").read_text() in step


def _calibration(demo_tree: Path, method: str) -> Calibration:
    """A calibration whose only class is the demo base's: 200 null scores spread over [-0.2, 0.3]."""
    architecture = load(demo_tree / "refs" / f"{BASE}.json").sketch["architecture"]  # type: ignore[index]
    key = class_key(architecture)
    null = NullSample(key, np.linspace(-0.2, 0.3, 200))
    return Calibration(method=method, sketch_version=SKETCH_VERSION, recipe={}, classes={key: null}, source="test",
                       scope="null: models trained 150-1200 steps")


@pytest.mark.parametrize("calibrated", [True, False])
def test_fail_exit_1_and_json_on_stdout_with_the_stated_rate(demo_tree: Path, tmp_path: Path, calibrated: bool,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The report states what the rate rests on: the calibration class with its null's size and scope, the rate at
    the score and its 95% upper bound; or "uncalibrated", every rate null (a calibration of another method)."""
    calibration = _calibration(demo_tree, LINEAGE_METHOD if calibrated else "tgl0")
    monkeypatch.setattr("tg_verify.analysis.lineage.packaged_calibration", lambda: calibration)
    policy = write_policy(tmp_path, policy_text(demo_tree, "unrelated"))
    code = main(["verify", str(policy), "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads(captured.out)
    assert report["verdict"] == "fail" and report["report_version"] == 3
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in {r["code"] for r in report["reasons"]}
    lineage = next(r for r in report["references"] if r["declared"])["lineage"]
    assert lineage["derived"] is False and lineage["comparable"] and lineage["method"] == LINEAGE_METHOD
    assert lineage["calibrated"] is calibrated
    (null,) = calibration.classes.values()
    assert lineage["threshold"] == pytest.approx(null.threshold(0.01))  # the fallback is the same single class
    if calibrated:
        count = null.at_or_above(lineage["score"])
        assert lineage["calibration"] == null.key and lineage["null_size"] == 200
        assert lineage["null_scope"] == "null: models trained 150-1200 steps"
        assert lineage["rate"] == pytest.approx(count / 200, abs=0.006)
        assert lineage["rate_upper"] == pytest.approx(upper_bound(round(lineage["rate"] * 200), 200), abs=1e-6)
        assert lineage["false_positive_rate"] == pytest.approx(null.above(null.threshold(0.01)) / 200)
        assert lineage["stated"].startswith(f"{round(lineage['rate'] * 200)}/200 unrelated pairs score as high")
        assert "null: models trained 150-1200 steps" in lineage["stated"]
    else:
        assert lineage["calibration"] == "uncalibrated" and lineage["stated"].startswith("uncalibrated")
        assert all(lineage[k] is None for k in ("null_size", "rate", "rate_upper", "p_value", "false_positive_rate",
                                                 "false_positive_upper"))
        assert any("method 'tgl0'" in note for note in lineage["notes"])


def test_candidate_override_from_the_command_line(demo_tree: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path, policy_text(demo_tree, "unrelated"))
    code = main([str(policy), "--candidate", str(demo_tree / "models" / "finetune"), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["candidate"]["path"] == str(demo_tree / "models" / "finetune")


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


BAD_INPUT = {
    "missing policy": (None, r"nope\.yml: no such policy file"),
    "malformed yaml": (lambda t: "version: 1\ncandidate: {path: [\n", r"policy\.yml: line \d+, column \d+"),
    "wrong type": (lambda t: t.replace("on_out_of_cluster: warn", "on_out_of_cluster: 3"),
                   r"policy\.yml: on_out_of_cluster: expected a string"),
    "unknown reference id": (lambda t: t.replace(f"  base: {BASE}", "  base: llama-70b"),
                             r"policy\.yml: declared\.base: unknown reference id 'llama-70b'"),
    "missing reference file": (lambda t: t.replace("demo-gemma-base.json", "absent.json"),
                               r"policy\.yml: references\[2\]\.fingerprint: .*absent\.json does not exist"),
    "candidate resolves to nothing": (lambda t: t.replace("models/finetune", "refs"),
                                      r"policy\.yml: candidate\.path: .*refs: no model found"),
    "alias bomb": (lambda t: _alias_bomb(), r"policy\.yml: line 1, column \d+: anchors and aliases"),
    "huge file": (lambda t: t + "#" * MAX_POLICY_BYTES + "\n", r"policy\.yml: \d+ bytes is over the"),
    "unknown key": (lambda t: t + "thresholds: {max_distanse: 3}\n",
                    r"policy\.yml: thresholds\.max_distanse: unknown key"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, demo_tree: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    change, expected = BAD_INPUT[case]
    report = tmp_path / "report.json"
    if change is None:
        policy = tmp_path / "nope.yml"
    else:
        policy = write_policy(tmp_path, change(policy_text(demo_tree, "finetune",
                                                           outputs="outputs:\n  attestation: att.json\n")))
    code = main([str(policy), "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert re.search(expected, lines[0]), lines[0]
    assert lines[0].startswith("tg-verify: ")
    assert captured.out == ""
    assert not report.exists() and not (tmp_path / "att.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_malformed_reference_fingerprint_names_the_field(demo_tree: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": 1')
    text = policy_text(demo_tree, "finetune").replace(str(demo_tree / "refs" / "demo-gemma-base.json"), str(broken))
    code = main([str(write_policy(tmp_path, text)), "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "references[2].fingerprint" in err and "not valid JSON" in err
    assert not (tmp_path / "r.json").exists()


def test_outputs_that_would_overwrite_inputs_or_each_other_are_refused(demo_tree: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path, policy_text(demo_tree, "finetune"))
    before = policy.read_bytes()
    assert main([str(policy), "--report", str(policy)]) == 2
    assert "the report output would overwrite the policy file" in capsys.readouterr().err
    assert policy.read_bytes() == before
    same = str(tmp_path / "out.json")
    assert main([str(policy), "--report", same, "--attestation", same]) == 2
    assert "the report and attestation outputs name the same file" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_check_policy_reads_no_weights(demo_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The model reference's weights hold a NaN: any run that read them would stop on it (exit 2)."""
    from safetensors.torch import load_file, save_file

    gemma = tmp_path / "gemma"
    shutil.copytree(demo_tree / "models" / "gemma", gemma)
    state = load_file(str(gemma / "model.safetensors"))
    matrix = next(name for name, tensor in state.items() if tensor.ndim == 2)
    state[matrix][0, 0] = float("nan")
    save_file(state, str(gemma / "model.safetensors"))
    text = policy_text(demo_tree, "finetune").replace(
        f"fingerprint: {demo_tree / 'refs' / 'demo-gemma-base.json'}", f"model: {gemma}")
    policy = write_policy(tmp_path, text)
    assert main([str(policy), "--check-policy"]) == 0
    out = capsys.readouterr().out
    assert "valid policy (version 1; 3 references; declares base demo-llama-base, family llama)" in out
    assert "references[2] (demo-gemma-base) will be fingerprinted from" in out
    assert not (tmp_path / "cache").exists()  # nothing was fingerprinted
    mismatched = write_policy(tmp_path, policy_text(demo_tree, "finetune") + "fingerprint: {repeats: 3}\n")
    assert main([str(mismatched), "--check-policy"]) == 2
    assert "fingerprint: the settings block differs from the settings recorded in" in capsys.readouterr().err


def test_an_output_over_a_candidate_file_is_refused(demo_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_tree / "models" / "finetune", model)
    before = (model / "config.json").read_bytes()
    policy = write_policy(tmp_path, policy_text(demo_tree, "finetune").replace(
        str(demo_tree / "models" / "finetune"), str(model)))
    assert main([str(policy), "--summary", str(model / "config.json")]) == 2
    assert "the summary output would write into the candidate model (candidate.path)" in capsys.readouterr().err
    assert (model / "config.json").read_bytes() == before


def test_no_output_may_land_in_the_reference_cache(demo_tree: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A policy edited in a pull request cannot write its (forged) candidate fingerprint into the persistent
    reference cache, where a protected policy would read it back as a reference."""
    cache = tmp_path / "cache"  # the autouse fixture points TG_VERIFY_CACHE_DIR here
    entry = cache / ("0" * 64 + ".json")
    for flags in (["--fingerprint-out", str(entry)], ["--cache-dir", str(tmp_path / "c2"), "--report",
                                                      str(tmp_path / "c2" / "x.json")]):
        policy = write_policy(tmp_path, policy_text(demo_tree, "finetune"))
        assert main([str(policy), *flags]) == 2
        err = capsys.readouterr().err
        assert "would write into the reference cache" in err and len(err.strip().splitlines()) == 1
    assert not entry.exists() and not (tmp_path / "c2" / "x.json").exists()
    text = policy_text(demo_tree, "finetune", outputs=f"outputs:\n  fingerprint: {entry}\n")
    assert main([str(write_policy(tmp_path, text))]) == 2 and not entry.exists()
    # not with --no-cache either: the default cache persists for the runs that use it
    assert main([str(write_policy(tmp_path, text)), "--no-cache"]) == 2 and not entry.exists()


def test_no_output_may_overwrite_reference_weights_or_an_adapters_base(demo_tree: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    base = shutil.copytree(demo_tree / "models" / "gemma", tmp_path / "gemma")
    weights = base / "model.safetensors"
    before = weights.read_bytes()
    text = policy_text(demo_tree, "finetune").replace(
        f"fingerprint: {demo_tree / 'refs' / 'demo-gemma-base.json'}", f"model: {base}")
    for outputs in (f"outputs:\n  report: {weights}\n", f"outputs:\n  attestation: {base / 'new.json'}\n"):
        assert main([str(write_policy(tmp_path, text + outputs))]) == 2
        assert "would write into the reference model references[2].model" in capsys.readouterr().err
    adapter_base = shutil.copytree(demo_tree / "models" / "base", tmp_path / "adapter-base")
    base_weights = adapter_base / "model.safetensors"
    base_before = base_weights.read_bytes()
    with_base = text.replace(f"  path: {demo_tree / 'models' / 'finetune'}\n",
                             f"  path: {demo_tree / 'models' / 'finetune'}\n  base_model: {adapter_base}\n")
    assert main([str(write_policy(tmp_path, with_base)), "--summary", str(base_weights)]) == 2
    assert "would write into the adapter's base model (candidate.base_model)" in capsys.readouterr().err
    assert weights.read_bytes() == before and not (base / "new.json").exists()
    assert base_weights.read_bytes() == base_before


def test_every_output_path_is_checked_before_the_first_write(demo_tree: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path, policy_text(demo_tree, "finetune"))
    report = tmp_path / "report.json"
    (tmp_path / "existing").mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for flags, message in ((["--attestation", str(tmp_path / "existing")], "the attestation output is a directory"),
                           (["--summary", str(blocker / "summary.md")], "is not a directory")):
        assert main([str(policy), "--report", str(report), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not report.exists()  # refused before anything was read or written
    assert not list(tmp_path.rglob("*.tmp"))


def test_outputs_are_all_or_nothing(demo_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A write that fails after the first output was staged (a full disk) leaves none of them behind."""
    import tg_verify.atomic as atomic

    staged: list[Path] = []
    real = atomic._stage

    def stage(target: Path, data: bytes, created: list[Path]) -> str:
        if staged:
            raise OSError(28, "No space left on device")
        staged.append(target)
        return real(target, data, created)

    monkeypatch.setattr(atomic, "_stage", stage)
    policy = write_policy(tmp_path, policy_text(demo_tree, "finetune"))
    outputs = [tmp_path / "out" / "report.json", tmp_path / "out" / "att.json", tmp_path / "fp.json"]
    assert main([str(policy), "--report", str(outputs[0]), "--attestation", str(outputs[1]),
                 "--fingerprint-out", str(outputs[2])]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert staged and not any(p.exists() for p in outputs) and not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_only_reports_a_fail_and_exits_0(demo_tree: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    policy = demo_tree / "policies" / "fail.yml"
    report = tmp_path / "r.json"
    assert main([str(policy), "--report-only", "--report", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "FAIL" in out and "verdict FAIL reported, not enforced (--report-only): exit 0" in err
    assert json.loads(report.read_text())["verdict"] == "fail"
    assert main([str(tmp_path / "missing.yml"), "--report-only"]) == 2  # bad input still fails
