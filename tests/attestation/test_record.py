"""The predicate's record: the in-toto Statement's shape, stable bytes, the round trip, and strict validation."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import fields, replace

import pytest
from attestation_helpers import candidate_record, make_predicate

from tg_verify.atomic import canonical_json
from tg_verify.attestation import record, statement
from tg_verify.attestation.record import ROOT_ANNOTATION, parse_predicate, parse_statement, to_json
from tg_verify.errors import AttestationError
from tg_verify.verdict import DecisionRules, Finding
from tg_verify.waivers import Waiver


def test_statement_is_in_toto_v1_with_one_subject_per_file_and_a_root_subject(tiny_models):
    model = tiny_models["llama"]["indexed-shards"]
    built = statement.statement_of(make_predicate(model))
    parse_statement(built, "test")
    assert set(built) == {"_type", "subject", "predicateType", "predicate"}
    assert built["_type"] == "https://in-toto.io/Statement/v1"
    assert built["predicateType"] == record.PREDICATE_TYPE and record.PREDICATE_TYPE.endswith("/v1")
    # Every subject names a file relative to the model root; recompute each digest from the bytes on disk.
    files = [s for s in built["subject"] if not s.get("annotations")]
    on_disk = sorted(p.name for p in model.iterdir())
    assert sorted(s["name"] for s in files) == on_disk  # 3 shards + index + config
    for subject in files:
        assert subject["digest"]["sha256"] == hashlib.sha256((model / subject["name"]).read_bytes()).hexdigest()
    # The whole-model subject is model_signing's root digest: sha256 over raw digests sorted by path.
    root = [s for s in built["subject"] if s.get("annotations")]
    assert len(root) == 1 and root[0]["annotations"] == {ROOT_ANNOTATION: True}
    expected = hashlib.sha256(b"".join(hashlib.sha256((model / n).read_bytes()).digest() for n in on_disk))
    assert root[0]["digest"]["sha256"] == expected.hexdigest()
    assert built["predicate"]["candidate"]["rootDigest"]["sha256"] == expected.hexdigest()
    # The predicate lists the same files and digests, so it stands on its own inside another Statement.
    assert {f["name"]: f["digest"]["sha256"] for f in built["predicate"]["candidate"]["files"]} == \
        {s["name"]: s["digest"]["sha256"] for s in files}


def test_predicate_fields_are_lower_camel_case_and_carry_the_evidence(tiny_models):
    predicate = to_json(make_predicate(tiny_models["qwen2"]["single"]))

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
    assert predicate["fingerprint"]["parameters"] == {"repeats": 30, "seed": 0, "strategy": "random"}
    assert predicate["fingerprint"]["digest"] == {"sha256": "c" * 64}
    refs = {r["id"]: r for r in predicate["references"]}
    assert refs["base-1b"]["withinThreshold"] is True and refs["qwen-7b"]["withinThreshold"] is False
    assert refs["base-1b"]["lineage"]["derived"] is True and refs["base-1b"]["lineage"]["pValue"] == 1e-12
    assert predicate["attribution"]["matchesDeclared"] is True
    assert predicate["declaredLineage"] == {"base": "base-1b", "family": "llama", "forbidden": ["qwen-7b"]}
    assert predicate["candidate"]["evidence"] == {"features": "recomputed", "fileDigests": "hashed"}
    assert predicate["candidate"]["serialization"]["method"] == "files"


def test_reference_order_does_not_change_the_bytes(tiny_models):
    predicate = make_predicate(tiny_models["gemma"]["shards"])
    reordered = replace(predicate, references=tuple(reversed(predicate.references)))
    assert canonical_json(statement.statement_of(reordered)) == canonical_json(statement.statement_of(predicate))
    assert statement.rfc3339(__import__("datetime").datetime(2026, 3, 4, 5, 6, 7, 890123,
                                                            tzinfo=__import__("datetime").timezone.utc)) == \
        "2026-03-04T05:06:07Z"


def test_the_record_reads_back_exactly_what_was_written(tiny_models):
    """parse(to_json(p)) == p: verify-attestation decides from exactly the rules and numbers verify recorded."""
    predicate = make_predicate(tiny_models["llama"]["single"], reasons=(
        Finding("TGV_ARTIFACT_WARNING", "warn", "model.safetensors: header padded"),
        Finding("TGV_NEAREST_BASE_DIFFERS", "warn", "nearest base differs", "base-1b")))
    built = statement.statement_of(predicate)
    assert parse_statement(json.loads(canonical_json(built)), "a.json").predicate == predicate
    # Exact floats: a distance a hair above its threshold stays above it when read back.
    close = replace(predicate.references[0], distance=math.nextafter(7.0, 8.0), within_threshold=False)
    again = parse_predicate(json.loads(canonical_json(to_json(replace(
        predicate, references=(close, predicate.references[1]))))))
    assert again.references[0].distance > again.references[0].threshold
    # what the action branch added reads back too: the weights digest, symlinks as read, the waivers
    model = tiny_models["llama"]["single"]
    linked = replace(predicate, candidate=candidate_record(model, allow_symlinks=True),
                     rules=replace(predicate.rules, waivers=(Waiver("TGV_OUT_OF_CLUSTER", "new family, SEC-9",
                                                                    dt.date(2027, 1, 1)),)))
    assert linked.candidate.weights_digest is not None
    assert parse_predicate(json.loads(canonical_json(to_json(linked)))) == linked


def test_a_fingerprint_only_candidate_claims_no_serialization(tiny_models):
    """Digests recorded in a fingerprint file were not serialized in the run: the record says nothing of
    model_signing's ignore rules or symbolic links, its root digest is the weights digest, and a record that
    claims a serialization for such digests is refused."""
    model = tiny_models["llama"]["single"]
    recorded = candidate_record(model, features="fingerprint", files_hashed=False)
    predicate = make_predicate(model, candidate=recorded)
    candidate = to_json(predicate)["candidate"]
    assert "serialization" not in candidate and candidate["evidence"]["fileDigests"] == "recorded"
    assert candidate["rootDigest"] == candidate["weightsDigest"]
    assert parse_predicate(to_json(predicate)) == predicate
    hashed = to_json(make_predicate(model))
    assert hashed["candidate"]["serialization"]["ignorePaths"] == [".git", ".gitattributes", ".github", ".gitignore"]
    forged = to_json(predicate)
    forged["candidate"]["serialization"] = hashed["candidate"]["serialization"]
    with pytest.raises(AttestationError, match="candidate.serialization: recorded file digests"):
        parse_predicate(forged, "a.json")


def test_every_decision_rule_is_recorded():
    """A rule that the attestation did not record could not be applied by verify-attestation."""
    changed = DecisionRules(declared_base="b", declared_family="f", declared_root="r", forbidden=("x",),
                            on_out_of_cluster="warn", on_base_mismatch="fail", on_name_mismatch="fail",
                            lineage_enabled=False, on_lineage_unavailable="fail", require_weights=True,
                            on_statistics_disagree="fail", on_unexpected_tensors="warn",
                            waivers=(Waiver("TGV_OUT_OF_CLUSTER", "new family, SEC-9", dt.date(2027, 1, 1)),
                                     Waiver("TGV_FORBIDDEN_MATCH", "r", dt.date(2026, 12, 31), "x")))
    for spec in fields(DecisionRules):
        assert getattr(changed, spec.name) != getattr(DecisionRules(), spec.name), spec.name
    declared, decision = record._rules_json(changed, "standardized")
    parsed, space = record._rules(record._Reader("a.json"), declared, decision, {"b", "x", "r"})
    assert parsed == changed and space == "standardized"


def test_non_finite_numbers_are_refused(tiny_models):
    predicate = make_predicate(tiny_models["llama"]["single"])
    bad = replace(predicate.references[0], distance=float("nan"))
    with pytest.raises(AttestationError, match="non-finite"):
        to_json(replace(predicate, references=(bad,)))
    with pytest.raises(AttestationError, match="timezone"):
        statement.rfc3339(__import__("datetime").datetime(2026, 1, 1))


def test_subject_limit_and_size_limit(tiny_models, monkeypatch):
    predicate = make_predicate(tiny_models["llama"]["single"])
    many = tuple(replace(predicate.candidate.files[0], path=f"f{i}.safetensors") for i in range(record.MAX_SUBJECTS))
    with pytest.raises(AttestationError, match="1024-subject"):
        statement.statement_of(replace(predicate, candidate=replace(predicate.candidate, files=many)))
    monkeypatch.setattr(statement, "MAX_ATTESTATION_BYTES", 2000)
    with pytest.raises(AttestationError, match="over the 2000-byte limit"):
        statement.statement_of(predicate)


def test_predicate_file_is_the_statement_predicate(tiny_models, tmp_path):
    built = statement.statement_of(make_predicate(tiny_models["llama"]["single"]))
    statement.write_statement(tmp_path / "s.json", built)
    statement.write_predicate(tmp_path / "p.json", built)
    assert json.loads((tmp_path / "s.json").read_text())["predicate"] == json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "s.json").read_bytes() == canonical_json(built)


def _set(path: str, value):
    """A mutation that sets field `path` (dotted; a number is a list index) to `value`."""
    def mutate(statement_doc: dict) -> None:
        node = statement_doc
        keys = [int(part) if part.isdigit() else part for part in path.split(".")]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"), "_type"),
    (lambda s: s.update(predicateType="https://slsa.dev/provenance/v1"), "predicateType"),
    (_set("predicate.candidate.files.0.name", "../etc/passwd"), "relative POSIX path"),
    (_set("predicate.candidate.files.0.name", "/etc/passwd"), "relative POSIX path"),
    (lambda s: s["predicate"]["candidate"]["files"][1].update(name=s["predicate"]["candidate"]["files"][0]["name"]),
     "duplicate file"),
    (lambda s: s["predicate"]["candidate"]["files"][0].pop("digest"), "digest"),
    (_set("subject.0.digest.sha256", "XYZ"), "64 lowercase hex"),
    (lambda s: s["subject"][0].update(annotations={ROOT_ANNOTATION: True}), "at most one subject"),
    (lambda s: s.update(subject=[]), "at least one subject"),
    (_set("predicate.verificationResult", "OK"), "verificationResult"),
    (_set("predicate.references.0.distance", "1"), r"references\[0\]\.distance: expected a number"),
    # The attacks of a hostile predicate: each a one-line error naming the field (exit 2), never a crash.
    (_set("predicate.references.0.distance", 1e308 * 10), "finite"),
    (_set("predicate.decisionRules", ["onOutOfCluster", "warn"]), "decisionRules: expected an object, got a list"),
    (_set("predicate.declaredLineage", "base-1b"), "declaredLineage: expected an object, got a string"),
    (_set("predicate.declaredLineage.forbidden", 3), "forbidden: expected a list, got an integer"),
    (_set("predicate.candidate.base", ["x"]), "candidate.base: expected an object, got a list"),
    (_set("predicate.declaredLineage.base", "nobody"), "not one of the recorded references"),
    (_set("predicate.attribution.base", "nobody"), "not one of the recorded references"),
    (_set("predicate.decisionRules.onOutOfCluster", "ignore"), "expected one of fail, warn"),
    (_set("predicate.references.0.lineage.score", None), "comparable lineage test records a number"),
    (_set("predicate.reasons", [{"code": "TGV_X", "severity": "fatal"}]), "severity"),
    (lambda s: s["predicate"].pop("attribution"), "attribution: expected an object"),
    (_set("predicate.references", []), "must list the references"),
    (_set("predicate.timeVerified", "yesterday"), r"timeVerified: expected an RFC 3339 timestamp"),
    (_set("predicate.timeVerified", "2026-01-02T03:04:05"), r"timeVerified: expected an RFC 3339 timestamp"),
    (_set("predicate.candidate.weightsDigest", {"sha256": "x"}), r"weightsDigest\.sha256: expected 64"),
    (_set("predicate.candidate.serialization.allowSymlinks", "yes"), r"allowSymlinks: expected true or false"),
    (_set("predicate.candidate.serialization.hashType", "md5"), r"hashType: expected one of sha256"),
    (_set("predicate.decisionRules.waivers", {"code": "TGV_X"}), r"waivers: expected a list, got an object"),
    (_set("predicate.decisionRules.waivers", [{"code": "TGV_X", "reason": "r", "expires": "soon"}]),
     r"waivers\[0\]\.expires: expected a date"),
    (_set("predicate.decisionRules.waivers", [{"code": "TGV_X", "reason": "r", "expires": "2027-01-01",
                                               "reference": "nobody"}]), r"waivers\[0\]\.reference: .*not one of"),
    (_set("predicate.decisionRules.waivers", [{"code": "TGV_X", "expires": "2027-01-01"}]),
     r"waivers\[0\]\.reason: expected a non-empty string"),
    (_set("predicate.decisionRules.waivers", [{"code": "TGV_X", "reason": "r", "expires": "2027-01-01"}] * 2),
     r"waivers\[1\]: a second waiver"),
])
def test_structure_validation_names_the_fault(tiny_models, mutate, message):
    built = json.loads(canonical_json(statement.statement_of(make_predicate(tiny_models["llama"]["single"]))))
    mutate(built)
    with pytest.raises(AttestationError, match=message) as raised:
        parse_statement(built, "a.json")
    assert str(raised.value).startswith("a.json: ") and "\n" not in str(raised.value)


def test_a_calibrated_lineage_test_is_recorded_and_its_decision_checked(tiny_models):
    """Method tgl2: the record carries the calibration class, null size and rates, reads them back exactly, and
    verify-attestation re-checks `derived` as score > threshold (an uncalibrated test records no rate)."""
    from tg_verify.attestation.check import check_evidence
    from tg_verify.verdict import LineageEvidence

    def with_lineage(lineage: LineageEvidence) -> record.Predicate:
        predicate = make_predicate(tiny_models["llama"]["single"])
        return replace(predicate, references=(replace(predicate.references[0], lineage=lineage),
                                              predicate.references[1]))

    calibrated = LineageEvidence(score=0.42, threshold=0.29, derived=True, p_value=1 / 1846,
                                 false_positive_rate=0.0097, alpha=0.01, method="tgl3",
                                 calibration="gemma:h96:l3:v512:a6/2:i192", null_size=1845, rate=0.0, rate_upper=0.0016,
                                 null_scope="twins trained 150-1200 steps")
    predicate = with_lineage(calibrated)
    written = to_json(predicate)["references"][0]["lineage"]
    assert written["method"] == "tgl3" and written["calibration"] == "gemma:h96:l3:v512:a6/2:i192"
    assert written["nullScope"] == "twins trained 150-1200 steps"  # the rate holds for the models the null covers
    assert written["nullPairs"] == 1845 and written["rateAtScore"] == 0.0 and written["rateUpperBound95"] == 0.0016
    assert parse_predicate(json.loads(canonical_json(to_json(predicate)))) == predicate
    assert "0/1845 unrelated pairs score as high (95% upper bound 0.2%" in calibrated.rate_text()
    assert not [c for c in check_evidence(predicate) if c.name == "lineage base-1b"]
    flipped = [c for c in check_evidence(with_lineage(replace(calibrated, derived=False)))
               if c.name == "lineage base-1b"]
    assert flipped and not flipped[0].ok
    # uncalibrated: no p-value or rate is written, and the record still reads back and checks
    uncalibrated = replace(calibrated, p_value=math.nan, false_positive_rate=math.nan, calibration=None,
                           null_size=None, rate=None, rate_upper=None, null_scope=None)
    written = to_json(with_lineage(uncalibrated))["references"][0]["lineage"]
    assert not {"pValue", "falsePositiveRate", "calibration", "nullPairs", "rateAtScore", "nullScope"} & set(written)
    back = parse_predicate(json.loads(canonical_json(to_json(with_lineage(uncalibrated)))))
    assert back.references[0].lineage is not None and back.references[0].lineage.rate_text().startswith("uncalibrated")
    assert not [c for c in check_evidence(back) if c.name == "lineage base-1b"]
    # a rate outside [0, 1] is refused with the field named
    broken = to_json(predicate)
    broken["references"][0]["lineage"]["rateAtScore"] = 1.5
    with pytest.raises(AttestationError, match=r"rateAtScore"):
        parse_predicate(broken)


def test_block_evidence_is_recorded_and_either_evidence_decides(tiny_models):
    """Method tgl4: the block score and threshold are written and read back; verify-attestation re-checks `derived`
    as sketch above its threshold or blocks above theirs, also when the sketch was not comparable (no score)."""
    from tg_verify.attestation.check import check_evidence
    from tg_verify.verdict import LineageEvidence

    def with_lineage(lineage: LineageEvidence) -> record.Predicate:
        predicate = make_predicate(tiny_models["llama"]["single"])
        return replace(predicate, references=(replace(predicate.references[0], lineage=lineage),
                                              predicate.references[1]))

    def lineage_checks(predicate: record.Predicate) -> list:
        return [c for c in check_evidence(predicate) if c.name == "lineage base-1b" and not c.ok]

    by_blocks = LineageEvidence(score=0.02, threshold=0.31, derived=True, p_value=1 / 1846, false_positive_rate=0.009,
                                alpha=0.01, method="tgl4", calibration="llama:h64:l2:v512:a4/2:i128", null_size=1845,
                                rate=0.0, rate_upper=0.0016, block_score=0.64, block_threshold=0.08)
    written = to_json(with_lineage(by_blocks))["references"][0]["lineage"]
    assert written["blockScore"] == 0.64 and written["blockThreshold"] == 0.08 and written["method"] == "tgl4"
    back = parse_predicate(json.loads(canonical_json(to_json(with_lineage(by_blocks)))))
    assert back == with_lineage(by_blocks) and not lineage_checks(back)
    assert lineage_checks(with_lineage(replace(by_blocks, derived=False)))  # blocks above theirs: derived
    assert lineage_checks(with_lineage(replace(by_blocks, block_score=0.05)))  # neither above: not derived
    # the sketch not comparable (tokenizer withheld on one side): no score written, the blocks decided alone
    blocks_only = replace(by_blocks, score=math.nan, threshold=math.nan)
    written = to_json(with_lineage(blocks_only))["references"][0]["lineage"]
    assert "score" not in written and "threshold" not in written and written["blockScore"] == 0.64
    back = parse_predicate(json.loads(canonical_json(to_json(with_lineage(blocks_only)))))
    assert not lineage_checks(back)
    from tg_verify.verdict import _lineage_text

    assert _lineage_text(back.references[0].lineage).startswith("sketch not comparable; blocks 0.640 vs 0.080: 0/1845")
    # half a pair is refused, with the field named
    broken = to_json(with_lineage(by_blocks))
    del broken["references"][0]["lineage"]["blockThreshold"]
    with pytest.raises(AttestationError, match=r"blockScore"):
        parse_predicate(broken)
    # an old method's record ignores block numbers it could not have had
    old = replace(by_blocks, method="tgl3", derived=False)
    assert not lineage_checks(with_lineage(old))
