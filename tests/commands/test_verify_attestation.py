"""`tg-verify verify-attestation`: the consumer's offline check, exit codes and named failures."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from attestation_helpers import T0, build_workspace, make_evidence

from tg_verify.atomic import canonical_json
from tg_verify.cli import main
from tg_verify.report import attestation as att


@pytest.fixture
def release(tiny_models, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of a sharded tiny model, its policy file and a PASSED attestation of both."""
    model = shutil.copytree(tiny_models["mistral"]["indexed-shards"], tmp_path / "model")
    policy = tmp_path / "policy.yml"
    policy.write_bytes(b"version: 1\n")
    statement = att.build_statement(make_evidence(model), time_verified=T0)
    path = att.write_statement(tmp_path / "attestation.json", statement)
    return model, policy, path


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["verify-attestation", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def test_untouched_release_verifies(release, capsys):
    model, policy, attestation = release
    code, report = run_json(capsys, str(attestation), str(model), "--policy", str(policy))
    assert code == 0 and report["ok"] and report["verificationResult"] == "PASSED"
    assert report["signaturesVerified"] is False
    assert failed(report) == {}
    names = {c["name"] for c in report["checks"]}
    assert {"policy digest", "root digest (disk)", "file model-00002-of-00003.safetensors"} <= names


def test_human_output_says_signatures_are_not_checked(release, capsys):
    model, _, attestation = release
    assert main(["verify-attestation", str(attestation), str(model)]) == 0
    out = capsys.readouterr().out
    assert "VERIFIED: attested PASSED" in out and "signatures are not verified" in out


def test_tampering_with_one_weight_file_fails(release, capsys):
    model, _, attestation = release
    shard = model / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    shard.write_bytes(bytes(data))
    code, report = run_json(capsys, str(attestation), str(model))
    assert code == 2 and not report["ok"]
    problems = failed(report)
    assert "sha256 mismatch" in problems["file model-00002-of-00003.safetensors"]
    assert "root digest (disk)" in problems
    assert len([n for n in problems if n.startswith("file ")]) == 1  # only the changed file is named


def test_missing_and_extra_files_are_named(release, capsys):
    model, _, attestation = release
    (model / "config.json").unlink()
    shutil.copy(model / "model-00001-of-00003.safetensors", model / "model-00004-of-00003.safetensors")
    code, report = run_json(capsys, str(attestation), str(model))
    assert code == 2
    problems = failed(report)
    assert problems["file config.json"].startswith("missing")
    assert "model-00004-of-00003.safetensors is not mentioned in weight_map" in problems["artifact resolves"]


def test_file_on_disk_that_was_not_attested_is_named(tiny_models, tmp_path, capsys):
    model = shutil.copytree(tiny_models["llama"]["single"], tmp_path / "model")
    # An attestation of the same model made before config.json was added to it.
    evidence = make_evidence(model)
    kept = tuple(f for f in evidence.files if f.path != "config.json")
    statement = att.build_statement(replace(evidence, files=kept), time_verified=T0)
    path = att.write_statement(tmp_path / "a.json", statement)
    code, report = run_json(capsys, str(path), str(model))
    assert code == 2
    assert set(failed(report)) == {"file config.json"}
    assert failed(report)["file config.json"].startswith("extra")


def test_statement_made_by_actions_attest_around_our_predicate_verifies(release, capsys, tmp_path):
    """actions/attest names subjects by basename, has no root subject, and wraps our predicate."""
    model, policy, attestation = release
    ours = json.loads(attestation.read_text())
    theirs = {"_type": ours["_type"], "predicateType": att.PREDICATE_TYPE, "predicate": ours["predicate"],
              "subject": [{"name": p.name, "digest": {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()}}
                          for p in sorted(model.glob("*.safetensors"))]}
    bundle = {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
              "dsseEnvelope": {"payloadType": att.PAYLOAD_TYPE, "signatures": [{"sig": "AAAA"}],
                               "payload": base64.b64encode(canonical_json(theirs)).decode()}}
    path = tmp_path / "bundle.sigstore.json"
    path.write_text(json.dumps(bundle))
    code, report = run_json(capsys, str(path), str(model), "--policy", str(policy))
    assert code == 0 and report["wrapper"] == "sigstore-bundle", failed(report)
    # A subject whose digest is not an attested file's is named.
    theirs["subject"][0]["digest"]["sha256"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(canonical_json(theirs)).decode()
    path.write_text(json.dumps(bundle))
    code, report = run_json(capsys, str(path), str(model))
    name = theirs["subject"][0]["name"]
    assert code == 2 and "differs from the attested file" in failed(report)[f"subject {name}"]


def test_root_subject_that_disagrees_is_named(release, capsys):
    model, _, attestation = release
    statement = json.loads(attestation.read_text())
    statement["subject"][-1]["digest"]["sha256"] = "1" * 64
    attestation.write_bytes(canonical_json(statement))
    code, report = run_json(capsys, str(attestation), str(model))
    assert code == 2 and "predicate records" in failed(report)["root subject"]


def test_other_policy_is_rejected(release, capsys, tmp_path):
    model, _, attestation = release
    other = tmp_path / "other.yml"
    other.write_bytes(b"version: 1\n# edited\n")
    code, report = run_json(capsys, str(attestation), str(model), "--policy", str(other))
    assert code == 2 and "differs from the attested policy" in failed(report)["policy digest"]


def test_failed_attestation_exits_1(tiny_models, tmp_path, capsys):
    model = shutil.copytree(tiny_models["llama"]["single"], tmp_path / "model")
    evidence = make_evidence(model)
    far = replace(evidence.references[1], distance=9.0)  # declared base now beyond its threshold
    reason = att.Reason("TGV_DISTANCE_ABOVE_THRESHOLD", "error", "distance 9.0 to base-1b exceeds 7.0")
    statement = att.build_statement(replace(evidence, references=(evidence.references[0], far), verdict="fail",
                                            reasons=(reason,)), time_verified=T0)
    path = att.write_statement(tmp_path / "a.json", statement)
    code, report = run_json(capsys, str(path), str(model))
    assert code == 1 and report["verificationResult"] == "FAILED"
    assert set(failed(report)) == {"verificationResult"}  # evidence is consistent; the verdict is FAILED


@pytest.mark.parametrize("edit, broken_check", [
    # A PASSED verdict whose own numbers put the declared base beyond its threshold.
    (lambda p: p["references"][0].update(distance=8.0), "reference base-1b"),
    # Recorded flag flipped without touching the reasons.
    (lambda p: p["references"][1].update(withinThreshold=True), "reference qwen-7b"),
    # Lineage says derived from the forbidden model, but no reason and still PASSED.
    (lambda p: p["references"][1]["lineage"].update(derived=True, score=0.9), "reason TGV_FORBIDDEN_LINEAGE"),
    # Verdict flipped to PASSED while an error reason stays.
    (lambda p: p.update(reasons=[{"code": "TGV_CUSTOM", "severity": "error", "message": "x"}]),
     "verdict follows from reasons"),
    # Attribution moved to another family.
    (lambda p: p["attribution"].update(family="qwen"), "reason TGV_FAMILY_MISMATCH"),
])
def test_evidence_that_contradicts_the_verdict_exits_1(release, capsys, edit, broken_check):
    model, _, attestation = release
    statement = json.loads(attestation.read_text())
    statement["predicate"]["references"].sort(key=lambda r: r["id"] != "base-1b")
    edit(statement["predicate"])
    attestation.write_bytes(canonical_json(statement))
    code, report = run_json(capsys, str(attestation), str(model))
    assert code == 1
    assert broken_check in failed(report)


def test_dsse_envelope_is_accepted(release, capsys, tmp_path):
    model, _, attestation = release
    envelope = {"payloadType": att.PAYLOAD_TYPE, "payload": base64.b64encode(attestation.read_bytes()).decode(),
                "signatures": [{"sig": "AAAA"}]}
    path = tmp_path / "envelope.json"
    path.write_text(json.dumps(envelope))
    code, report = run_json(capsys, str(path), str(model))
    assert code == 0 and report["wrapper"] == "dsse"


def test_malformed_attestation_is_a_one_line_error(release, capsys, tmp_path):
    model, _, _ = release
    path = tmp_path / "bad.json"
    path.write_text('{"_type": "https://in-toto.io/Statement/v1", "subject": []}')
    assert main(["verify-attestation", str(path), str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and "predicateType" in err[0]


def test_adapter_base_model_is_checked_with_base(tiny_models, tmp_path, capsys):
    model = shutil.copytree(tiny_models["llama"]["single"], tmp_path / "adapter")
    base = shutil.copytree(tiny_models["llama"]["shards"], tmp_path / "base")
    base_files = make_evidence(base).files
    statement = att.build_statement(make_evidence(model, layout="adapter", base_files=base_files, base_name="base"),
                                    time_verified=T0)
    path = att.write_statement(tmp_path / "a.json", statement)
    assert main(["verify-attestation", str(path), str(model)]) == 0
    assert "pass --base DIR" in capsys.readouterr().out
    code, report = run_json(capsys, str(path), str(model), "--base", str(base))
    assert code == 0 and report["recordsBaseModel"]
    assert {c["name"] for c in report["checks"]} >= {f"base file {f.path}" for f in base_files}
    shard = next(base.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, report = run_json(capsys, str(path), str(model), "--base", str(base))
    assert code == 2 and "sha256 mismatch" in failed(report)[f"base file {shard.name}"]


def test_base_given_for_a_full_model_is_refused(release, capsys):
    model, _, attestation = release
    code, report = run_json(capsys, str(attestation), str(model), "--base", str(model))
    assert code == 2 and "records no base model" in failed(report)["base model"]


def test_real_verify_runs_round_trip_and_differ_only_in_time(tmp_path, capsys):
    """`tg-verify POLICY.yml --attestation` twice: same bytes but timeVerified; both verify; a FAIL exits 1."""
    ws = build_workspace(tmp_path)
    cache = str(tmp_path / "cache")
    for name in ("one.json", "two.json"):
        assert main([str(ws / "pass.yml"), "--attestation", str(tmp_path / name), "--cache-dir", cache]) == 0
    one, two = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    two["predicate"]["timeVerified"] = one["predicate"]["timeVerified"]
    assert canonical_json(one) == canonical_json(two)
    capsys.readouterr()
    code, report = run_json(capsys, str(tmp_path / "one.json"), str(ws / "candidate"), "--policy", str(ws / "pass.yml"))
    assert code == 0, failed(report)
    assert main([str(ws / "fail.yml"), "--attestation", str(tmp_path / "fail.json"), "--cache-dir", cache]) == 1
    capsys.readouterr()
    code, report = run_json(capsys, str(tmp_path / "fail.json"), str(ws / "candidate"),
                            "--policy", str(ws / "fail.yml"))
    assert code == 1 and set(failed(report)) == {"verificationResult"}  # FAILED, and its evidence is consistent
