"""`tg-verify verify-attestation`: the consumer's offline check, exit codes and named failures."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from attestation_helpers import build_workspace, candidate_record, make_predicate

from tg_verify.artifact import root_digest
from tg_verify.atomic import canonical_json
from tg_verify.attestation import record, statement
from tg_verify.cli import main
from tg_verify.fingerprint.document import BaseModelRecord
from tg_verify.verdict import Finding


def write(predicate, path: Path) -> Path:
    return statement.write_statement(path, statement.statement_of(predicate))


@pytest.fixture
def release(tiny_models, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of a sharded tiny model, its policy file and a PASSED attestation of both."""
    model = shutil.copytree(tiny_models["mistral"]["indexed-shards"], tmp_path / "model")
    policy = tmp_path / "policy.yml"
    policy.write_bytes(b"version: 1\n")
    return model, policy, write(make_predicate(model), tmp_path / "attestation.json")


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
    assert "the policy was NOT checked" in out  # without --policy, said plainly
    assert main(["verify-attestation", str(attestation), str(model), "--policy", str(release[1])]) == 0
    assert "NOT checked" not in capsys.readouterr().out


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
    predicate = make_predicate(model)
    kept = tuple(f for f in predicate.candidate.files if f.path != "config.json")
    kept_root = root_digest({f.path: f.sha256 for f in kept})
    candidate = replace(predicate.candidate, files=kept, root_digest=kept_root, weights_digest=kept_root)
    path = write(replace(predicate, candidate=candidate), tmp_path / "a.json")
    code, report = run_json(capsys, str(path), str(model))
    assert code == 2
    assert set(failed(report)) == {"file config.json"}
    assert failed(report)["file config.json"].startswith("extra")


def test_statement_made_by_actions_attest_around_our_predicate_verifies(release, capsys, tmp_path):
    """actions/attest names subjects by basename, has no root subject, and wraps our predicate."""
    model, policy, attestation = release
    ours = json.loads(attestation.read_text())
    theirs = {"_type": ours["_type"], "predicateType": record.PREDICATE_TYPE, "predicate": ours["predicate"],
              "subject": [{"name": p.name, "digest": {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()}}
                          for p in sorted(model.glob("*.safetensors"))]}
    bundle = {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
              "dsseEnvelope": {"payloadType": record.PAYLOAD_TYPE, "signatures": [{"sig": "AAAA"}],
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
    predicate = make_predicate(model)
    far = replace(predicate.references[0], distance=9.0, within_threshold=False)  # declared base beyond its threshold
    reason = Finding("TGV_DISTANCE_ABOVE_THRESHOLD", "fail", "distance 9.0 to base-1b exceeds 7.0", "base-1b")
    both = replace(predicate.rules, on_statistics_disagree="fail")  # the distance fails despite the lineage
    path = write(replace(predicate, rules=both, references=(far, predicate.references[1]), result="FAILED",
                         reasons=(reason,)), tmp_path / "a.json")
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
    envelope = {"payloadType": record.PAYLOAD_TYPE, "payload": base64.b64encode(attestation.read_bytes()).decode(),
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
    base_record = candidate_record(base)
    base_files = base_record.files
    recorded_base = BaseModelRecord(name="base", files=tuple(replace(f, size=None, role=None) for f in base_files),
                                    root_digest=base_record.root_digest)
    predicate = make_predicate(model)
    path = write(replace(predicate, candidate=replace(predicate.candidate, layout="adapter", base=recorded_base)),
                 tmp_path / "a.json")
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


@pytest.mark.parametrize("name, content", [
    ("pytorch_model.bin", b"\x80\x02}q\x00."),  # a pickle a runtime would load with use_safetensors=False
    ("consolidated.safetensors", None),  # another copy of the weights, not the attested one
    ("original/consolidated.00.pth", b"\x80\x02."),
])
def test_an_unattested_weight_file_next_to_the_model_is_not_verified(release, capsys, name, content):
    model, policy, attestation = release
    target = model / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        data = bytearray((model / "model-00001-of-00003.safetensors").read_bytes())
        data[-1] ^= 0x01
        content = bytes(data)
    target.write_bytes(content)
    code, report = run_json(capsys, str(attestation), str(model), "--policy", str(policy))
    assert code == 2 and not report["ok"]
    assert failed(report)[f"file {name}"].startswith("unattested weights")


def test_features_from_a_fingerprint_file_do_not_verify_the_files(tmp_path, capsys):
    """A fingerprint-only candidate: the fingerprint records an unrelated model's file digests with a derivative's
    features. The attestation says how its evidence was obtained, and verify-attestation does not call the
    unrelated model's files VERIFIED on it."""
    ws = build_workspace(tmp_path)
    genuine = tmp_path / "genuine.json"
    assert main(["fingerprint", str(ws / "candidate"), "-o", str(genuine)]) == 0
    capsys.readouterr()
    document = json.loads(genuine.read_text())
    assert main(["fingerprint", str(ws / "qwen-base"), "-o", str(tmp_path / "qwen.json")]) == 0
    capsys.readouterr()
    document["artifact"] = json.loads((tmp_path / "qwen.json").read_text())["artifact"]  # the unrelated files
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(document))
    policy = tmp_path / "fp-only.yml"
    policy.write_text((ws / "pass.yml").read_text().replace("  path: ./candidate", f"  fingerprint: {forged}")
                      .replace("./llama-base", str(ws / "llama-base")).replace("./qwen-base", str(ws / "qwen-base")))
    out = tmp_path / "att.json"
    assert main([str(policy), "--attestation", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    predicate = json.loads(out.read_text())["predicate"]
    assert predicate["candidate"]["evidence"] == {"features": "fingerprint", "fileDigests": "recorded"}
    assert "serialization" not in predicate["candidate"]
    assert {r["code"]: r["severity"] for r in predicate["reasons"]}["TGV_FEATURES_FROM_FINGERPRINT"] == "warning"
    code, report = run_json(capsys, str(out), str(ws / "qwen-base"))
    assert code == 1 and not report["ok"] and report["featuresRecomputed"] is False
    assert set(failed(report)) == {"features recomputed"}
    code, report = run_json(capsys, str(out), str(ws / "qwen-base"), "--allow-fingerprint-evidence")
    assert code == 0 and "accepted" in next(c["detail"] for c in report["checks"] if c["name"] == "features recomputed")


@pytest.mark.parametrize("path, value", [
    ("references.0.distance", "1e999"),  # a number that overflows to infinity
    ("decisionRules", ["onOutOfCluster"]),
    ("declaredLineage", "base-1b"),
    ("declaredLineage.forbidden", 7),
    ("candidate.base", ["base"]),
    ("attribution", None),
    ("reasons", [{"code": 1}]),
])
def test_a_malformed_predicate_is_one_line_and_exit_2(release, capsys, path, value):
    model, _, attestation = release
    text = attestation.read_text()
    statement = json.loads(text)
    node = statement["predicate"]
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = "__RAW__" if value == "1e999" else value
    raw = canonical_json(statement).decode().replace('"__RAW__"', "1e999")
    attestation.write_text(raw)
    assert main(["verify-attestation", str(attestation), str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tg-verify: ") and str(attestation) in err[0]


def test_a_model_given_as_one_file_is_not_blamed_for_its_neighbours(tiny_models, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    single = shutil.copy(tiny_models["llama"]["single"] / "model.safetensors", folder / "model.safetensors")
    (folder / "other-model.bin").write_bytes(b"\x80\x02.")
    path = write(make_predicate(Path(single)), tmp_path / "a.json")
    code, report = run_json(capsys, str(path), str(single))
    assert code == 0, failed(report)
    code, report = run_json(capsys, str(path), str(folder))
    assert code == 2 and "file other-model.bin" in failed(report)
