"""The in-toto Statement: structure, subjects recomputed from disk, stable bytes, wrappers, size limits."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from dataclasses import replace

import pytest
from attestation_helpers import T0, make_evidence

from tg_verify.atomic import canonical_json
from tg_verify.errors import AttestationError
from tg_verify.report import attestation as att
from tg_verify.report.attestation_check import validate_statement

T1 = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.timezone.utc)


VERSIONS = {"tg-verify": "0.1.0", "torch": "2.13.0"}


def test_statement_is_in_toto_v1_with_one_subject_per_file_and_a_root_subject(tiny_models):
    model = tiny_models["llama"]["indexed-shards"]
    statement = att.build_statement(make_evidence(model), time_verified=T0, versions=VERSIONS)
    validate_statement(statement, "test")
    assert set(statement) == {"_type", "subject", "predicateType", "predicate"}
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == att.PREDICATE_TYPE and att.PREDICATE_TYPE.endswith("/v1")
    # Every subject names a file relative to the model root; recompute each digest from the bytes on disk.
    files = [s for s in statement["subject"] if not s.get("annotations")]
    on_disk = sorted(p.name for p in model.iterdir())
    assert sorted(s["name"] for s in files) == on_disk  # 3 shards + index + config
    for subject in files:
        assert subject["digest"]["sha256"] == hashlib.sha256((model / subject["name"]).read_bytes()).hexdigest()
    # The whole-model subject is model_signing's root digest: sha256 over raw digests sorted by path.
    root = [s for s in statement["subject"] if s.get("annotations")]
    assert len(root) == 1 and root[0]["annotations"] == {att.ROOT_ANNOTATION: True}
    expected = hashlib.sha256(b"".join(hashlib.sha256((model / n).read_bytes()).digest() for n in on_disk))
    assert root[0]["digest"]["sha256"] == expected.hexdigest()
    assert statement["predicate"]["candidate"]["rootDigest"]["sha256"] == expected.hexdigest()
    # The predicate lists the same files and digests, so it stands on its own inside another Statement.
    assert {f["name"]: f["digest"]["sha256"] for f in statement["predicate"]["candidate"]["files"]} == \
        {s["name"]: s["digest"]["sha256"] for s in files}


def test_predicate_fields_are_lower_camel_case_and_carry_the_evidence(tiny_models):
    statement = att.build_statement(make_evidence(tiny_models["qwen2"]["single"]), time_verified=T0,
                                    versions=VERSIONS)
    predicate = statement["predicate"]

    def keys(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                if path.endswith("parameters") or path.endswith("features") or path.endswith("version"):
                    continue  # maps whose keys are data (settings names, feature names, package names)
                yield key
                yield from keys(value, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                yield from keys(item, path)

    for key in keys(predicate):
        assert "_" not in key and "." not in key and "$" not in key and key[0].islower(), key
    assert predicate["verificationResult"] == "PASSED"
    assert predicate["timeVerified"] == "2026-01-02T03:04:05Z"
    assert predicate["verifier"]["version"] == VERSIONS
    assert predicate["fingerprint"]["parameters"] == {"repeats": 30, "seed": 0, "strategy": "random"}
    assert predicate["fingerprint"]["digest"] == {"sha256": "c" * 64}
    refs = {r["id"]: r for r in predicate["references"]}
    assert refs["base-1b"]["withinThreshold"] is True and refs["qwen-7b"]["withinThreshold"] is False
    assert refs["base-1b"]["lineage"]["derived"] is True and refs["base-1b"]["lineage"]["pValue"] == 1e-12
    assert predicate["attribution"]["matchesDeclared"] is True
    assert predicate["declaredLineage"] == {"base": "base-1b", "family": "llama", "forbidden": ["qwen-7b"]}
    # Floats are rounded to a fixed number of significant digits so re-runs are byte-stable.
    assert predicate["fingerprint"]["features"]["global_mean"] == 0.123456789


def test_two_builds_differ_only_in_time_verified(tiny_models):
    evidence = make_evidence(tiny_models["gemma"]["shards"])
    a = att.build_statement(evidence, time_verified=T0)
    b = att.build_statement(evidence, time_verified=T1)
    assert a != b
    assert b["predicate"]["timeVerified"] == "2026-03-04T05:06:07Z"
    b["predicate"]["timeVerified"] = a["predicate"]["timeVerified"]
    assert canonical_json(a) == canonical_json(b)
    # Reference order in the evidence does not change the bytes either.
    reordered = replace(evidence, references=tuple(reversed(evidence.references)))
    assert canonical_json(att.build_statement(reordered, time_verified=T0)) == canonical_json(a)


def test_failed_verdict_records_reasons(tiny_models):
    reason = att.Reason("TGV_FAMILY_MISMATCH", "error", "attributed family qwen differs from declared llama")
    evidence = make_evidence(tiny_models["llama"]["single"], verdict="fail", reasons=(reason,),
                             attribution=att.AttributionEvidence(family="qwen", distance=2.0, threshold=7.0))
    predicate = att.build_statement(evidence, time_verified=T0)["predicate"]
    assert predicate["verificationResult"] == "FAILED"
    assert predicate["reasons"] == [{"code": "TGV_FAMILY_MISMATCH", "severity": "error",
                                     "message": "attributed family qwen differs from declared llama"}]
    assert predicate["attribution"]["matchesDeclared"] is False


def test_non_finite_numbers_and_bad_verdicts_are_refused(tiny_models):
    evidence = make_evidence(tiny_models["llama"]["single"])
    bad_ref = replace(evidence.references[0], distance=float("nan"))
    with pytest.raises(AttestationError, match="non-finite"):
        att.build_statement(replace(evidence, references=(bad_ref,)))
    with pytest.raises(AttestationError, match="verdict"):
        att.build_statement(replace(evidence, verdict="maybe"))
    with pytest.raises(AttestationError, match="timezone"):
        att.build_statement(evidence, time_verified=dt.datetime(2026, 1, 1))


def test_subject_limit_and_size_limit(tiny_models, monkeypatch):
    evidence = make_evidence(tiny_models["llama"]["single"])
    many = tuple(att.SubjectFile(f"f{i}.safetensors", "d" * 64) for i in range(att.MAX_SUBJECTS))
    with pytest.raises(AttestationError, match="1024-subject"):
        att.build_statement(replace(evidence, files=many))
    monkeypatch.setattr(att, "MAX_ATTESTATION_BYTES", 2000)
    with pytest.raises(AttestationError, match="over the 2000-byte limit"):
        att.build_statement(evidence)


def test_predicate_file_is_the_statement_predicate(tiny_models, tmp_path):
    statement = att.build_statement(make_evidence(tiny_models["llama"]["single"]), time_verified=T0)
    att.write_statement(tmp_path / "s.json", statement)
    att.write_predicate(tmp_path / "p.json", statement)
    assert json.loads((tmp_path / "s.json").read_text())["predicate"] == json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "s.json").read_bytes() == canonical_json(statement)


def _envelope(statement: dict, urlsafe: bool = False) -> dict:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return {"payloadType": att.PAYLOAD_TYPE, "payload": encode(canonical_json(statement)).decode().rstrip("="),
            "signatures": [{"keyid": "", "sig": "MEUCIQ=="}]}


def test_reads_statement_dsse_bundle_and_jsonl(tiny_models):
    statement = att.build_statement(make_evidence(tiny_models["llama"]["single"]), time_verified=T0)
    bare = att.parse_attestation(canonical_json(statement))
    assert bare.wrapper == "statement" and bare.statement == statement
    dsse = att.parse_attestation(json.dumps(_envelope(statement, urlsafe=True)).encode())
    assert dsse.wrapper == "dsse" and dsse.statement == statement
    bundle = {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "verificationMaterial": {},
              "dsseEnvelope": _envelope(statement)}
    assert att.parse_attestation(json.dumps(bundle).encode()).wrapper == "sigstore-bundle"
    # gh attestation download: JSON Lines, possibly with other predicate types mixed in.
    provenance = dict(statement, predicateType="https://slsa.dev/provenance/v1")
    lines = [json.dumps({"bundle": {"dsseEnvelope": _envelope(provenance)}}),
             json.dumps({"bundle": {"dsseEnvelope": _envelope(statement)}})]
    loaded = att.parse_attestation("\n".join(lines).encode())
    assert loaded.statement == statement and loaded.wrapper == "sigstore-bundle"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"_type": 1, "_type": 2}', "duplicate JSON key"),
    (b'{"payloadType": "text/plain", "payload": "e30=", "signatures": []}', "not an in-toto payload"),
    (b'{"payloadType": "application/vnd.in-toto+json", "payload": "***", "signatures": []}', "base64"),
    (b'{"hello": "world"}', "neither an in-toto Statement"),
    (b'[1, 2]', "expected a JSON object"),
    (b'{"_type": "x", "v": NaN}', "non-finite"),
])
def test_malformed_attestations_are_one_line_errors(data, message):
    with pytest.raises(AttestationError, match=message):
        att.parse_attestation(data, "a.json")


def test_structure_validation_names_the_fault(tiny_models):
    statement = att.build_statement(make_evidence(tiny_models["llama"]["single"]), time_verified=T0)
    for mutate, message in [
        (lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"), "_type"),
        (lambda s: s.update(predicateType="https://slsa.dev/provenance/v1"), "predicateType"),
        (lambda s: s["predicate"]["candidate"]["files"][0].update(name="../etc/passwd"), "relative POSIX path"),
        (lambda s: s["predicate"]["candidate"]["files"][0].update(name="/etc/passwd"), "relative POSIX path"),
        (lambda s: s["predicate"]["candidate"]["files"][1].update(name=s["predicate"]["candidate"]["files"][0]["name"]),
         "duplicate file"),
        (lambda s: s["predicate"]["candidate"]["files"][0].pop("digest"), "digest.sha256"),
        (lambda s: s["subject"][0]["digest"].update(sha256="XYZ"), "digest.sha256"),
        (lambda s: s["subject"][0].update(annotations={att.ROOT_ANNOTATION: True}), "at most one subject"),
        (lambda s: s.update(subject=[]), "non-empty"),
        (lambda s: s["predicate"].update(verificationResult="OK"), "verificationResult"),
        (lambda s: s["predicate"]["references"][0].update(distance="1"), "numbers"),
    ]:
        broken = json.loads(canonical_json(statement))
        mutate(broken)
        with pytest.raises(AttestationError, match=message):
            validate_statement(broken, "a.json")


def test_calibrated_lineage_is_recorded_and_its_decision_rederived(tiny_models):
    """Method tgl2: the predicate carries the calibration class, null size and rates; derived is score > threshold."""
    from tg_verify.report.attestation_check import check_evidence

    evidence = make_evidence(tiny_models["llama"]["single"])

    def with_lineage(derived: bool) -> dict:
        lineage = att.LineageEvidence(score=0.42, threshold=0.29, derived=derived, p_value=1 / 1801,
                                      false_positive_rate=0.009, method="tgl2", alpha=0.01,
                                      calibration="gemma:h96:l3:v512:a6/2:i192", null_size=1800, rate=0.0,
                                      rate_upper=0.0017)
        refs = tuple(replace(r, lineage=lineage) if r.id == "base-1b" else r for r in evidence.references)
        return att.build_statement(replace(evidence, references=refs), time_verified=T0)["predicate"]

    predicate = with_lineage(True)
    lineage = {r["id"]: r for r in predicate["references"]}["base-1b"]["lineage"]
    assert lineage["calibration"] == "gemma:h96:l3:v512:a6/2:i192" and lineage["nullPairs"] == 1800
    assert lineage["rateAtScore"] == 0.0 and lineage["rateUpperBound95"] == 0.0017
    assert not [c for c in check_evidence(predicate) if c.name == "lineage base-1b"]
    # p 1/1801 > alpha would have contradicted "derived" under the old rule; a flipped decision still does
    flipped = [c for c in check_evidence(with_lineage(False)) if c.name == "lineage base-1b"]
    assert flipped and not flipped[0].ok
