"""The verdict rules: each reason code fires exactly when its rule is broken, with the policy's severity."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from tg_verify.policy import CandidateSpec, Declared, LineagePolicy, Policy, ReferenceSpec
from tg_verify.verdict import (
    REASON_CODES,
    AttributionEvidence,
    Evidence,
    LineageEvidence,
    ReferenceEvidence,
    Verdict,
    summarize,
)
from tg_verify.verdict import decide as decide_rules

REFS = (("base", "llama"), ("sibling", "llama"), ("other", "qwen"), ("leaked", "llama"))


def make_policy(**changes: object) -> Policy:
    refs = tuple(ReferenceSpec(id=i, family=f, index=n, fingerprint=Path(f"{i}.json"))
                 for n, (i, f) in enumerate(REFS))
    policy = Policy(path=Path("policy.yml"), sha256="0" * 64, version=1,
                    candidate=CandidateSpec(path=Path("model"), fingerprint=None),
                    declared=Declared(base="base"), references=refs)
    return replace(policy, **changes)  # type: ignore[arg-type]


def decide(policy: Policy, evidence: Evidence, today: date | None = None) -> Verdict:
    """The verdict under the policy's rules (verify decides exactly so), its waivers judged on `today`."""
    return decide_rules(policy.decision_rules(), evidence if today is None else replace(evidence, verified_on=today))


def lineage(derived: bool, score: float | None = None, comparable: bool = True) -> LineageEvidence:
    return LineageEvidence(score=score if score is not None else (0.9 if derived else 0.05), threshold=0.5,
                           p_value=1 / 201 if derived else 81 / 201, false_positive_rate=0.01, derived=derived,
                           comparable=comparable, alpha=0.01, notes=() if comparable else ("probe seeds differ",),
                           method="tgl3", calibration="llama:h64", null_size=200, rate=0.0 if derived else 0.4,
                           rate_upper=0.015 if derived else 0.46)


def make_evidence(distances: dict[str, float] | None = None, derived: tuple[str, ...] = ("base",),
                  attributed: tuple[str, str] = ("llama", "base"), out_of_cluster: bool = False,
                  no_sketch: tuple[str, ...] = (), **changes: object) -> Evidence:
    distances = {"base": 1.0, "sibling": 2.0, "other": 6.0, "leaked": 3.0, **(distances or {})}
    refs = tuple(ReferenceEvidence(
        id=i, family=f, distance=distances[i], threshold=7.0,
        lineage=None if i in no_sketch else lineage(i in derived),
        lineage_unavailable="the reference fingerprint has no lineage sketch" if i in no_sketch else None)
        for i, f in REFS)
    evidence = Evidence(references=refs, attribution=AttributionEvidence(
        family=attributed[0], base=attributed[1], distance=distances[attributed[1]],
        out_of_cluster=out_of_cluster, threshold=7.0))
    return replace(evidence, **changes)  # type: ignore[arg-type]


def codes(verdict: Verdict, severity: str | None = None) -> set[str]:
    return {f.code for f in verdict.findings if severity is None or f.severity == severity}


def test_true_derivative_passes_with_every_check_recorded() -> None:
    verdict = decide(make_policy(), make_evidence())
    assert verdict.passed and verdict.label == "pass"
    assert codes(verdict, "pass") == {"TGV_DISTANCE_WITHIN_THRESHOLD", "TGV_FAMILY_MATCHES", "TGV_IN_CLUSTER",
                                      "TGV_LINEAGE_ESTABLISHED"}
    assert verdict.reasons == ()
    assert summarize(verdict.findings) == "all checks passed"


def test_distance_above_threshold_fails() -> None:
    verdict = decide(make_policy(), make_evidence({"base": 7.5}, derived=()))
    assert not verdict.passed
    assert "TGV_DISTANCE_ABOVE_THRESHOLD" in codes(verdict, "fail")
    failure = next(f for f in verdict.failures if f.code == "TGV_DISTANCE_ABOVE_THRESHOLD")
    assert "7.500" in failure.message and "7.000" in failure.message and failure.subject == "base"


def test_family_mismatch_fails() -> None:
    verdict = decide(make_policy(), make_evidence(attributed=("qwen", "other"), derived=()))
    assert {"TGV_FAMILY_MISMATCH", "TGV_LINEAGE_NOT_ESTABLISHED"} <= codes(verdict, "fail")
    assert "TGV_NEAREST_BASE_DIFFERS" not in codes(verdict)  # another family: the family rule speaks


def test_out_of_cluster_follows_policy() -> None:
    evidence = make_evidence(out_of_cluster=True, derived=())
    assert "TGV_OUT_OF_CLUSTER" in codes(decide(make_policy(), evidence), "fail")
    warned = decide(make_policy(on_out_of_cluster="warn", lineage=LineagePolicy(enabled=False)), evidence)
    assert warned.passed and "TGV_OUT_OF_CLUSTER" in codes(warned, "warn")
    assert summarize(warned.findings) == "passed with warnings: TGV_OUT_OF_CLUSTER"


def test_nearest_base_of_the_same_family_is_a_warning_unless_policy_says_fail() -> None:
    evidence = make_evidence(attributed=("llama", "sibling"))
    assert "TGV_NEAREST_BASE_DIFFERS" in codes(decide(make_policy(), evidence), "warn")
    strict = make_policy(on_base_mismatch="fail", on_statistics_disagree="fail")
    assert "TGV_NEAREST_BASE_DIFFERS" in codes(decide(strict, evidence), "fail")
    # the lineage test establishes the declared base: the statistics do not overrule it
    assert "TGV_NEAREST_BASE_DIFFERS" in codes(decide(make_policy(on_base_mismatch="fail"), evidence), "warn")


def test_established_lineage_outweighs_every_disagreeing_statistic() -> None:
    """A rotated or layer-dropped genuine derivative: the statistics say another family, out of cluster, far from
    the base; the lineage test says derived from the declared base. PASS, each statistic a warning with both figures."""
    evidence = make_evidence({"base": 9.0}, attributed=("qwen", "other"), out_of_cluster=True)
    verdict = decide(make_policy(), evidence)
    assert verdict.passed, verdict.failures
    assert {"TGV_DISTANCE_ABOVE_THRESHOLD", "TGV_FAMILY_MISMATCH", "TGV_OUT_OF_CLUSTER"} <= codes(verdict, "warn")
    assert "TGV_LINEAGE_ESTABLISHED" in codes(verdict, "pass")
    mismatch = next(f for f in verdict.findings if f.code == "TGV_FAMILY_MISMATCH")
    assert "attributed family 'qwen'" in mismatch.message and "score 0.900" in mismatch.message
    assert "on_statistics_disagree: warn" in mismatch.message
    both = decide(make_policy(on_statistics_disagree="fail"), evidence)
    assert {"TGV_DISTANCE_ABOVE_THRESHOLD", "TGV_FAMILY_MISMATCH", "TGV_OUT_OF_CLUSTER"} <= codes(both, "fail")
    # without established lineage nothing outweighs them
    refuted = decide(make_policy(), make_evidence({"base": 9.0}, attributed=("qwen", "other"), derived=()))
    assert {"TGV_DISTANCE_ABOVE_THRESHOLD", "TGV_FAMILY_MISMATCH"} <= codes(refuted, "fail")
    untested = decide(make_policy(), make_evidence(attributed=("qwen", "other"), no_sketch=("base",)))
    assert "TGV_FAMILY_MISMATCH" in codes(untested, "fail")


def test_family_only_declaration_is_supported_by_lineage_to_a_reference_of_that_family() -> None:
    policy = make_policy(declared=Declared(family="llama"))
    verdict = decide(policy, make_evidence(attributed=("qwen", "other"), derived=("sibling",)))
    assert verdict.passed and "TGV_FAMILY_MISMATCH" in codes(verdict, "warn")
    leaked = decide(make_policy(declared=Declared(family="llama"), forbidden=("leaked",)),
                    make_evidence(attributed=("qwen", "other"), derived=("leaked",)))
    assert "TGV_FAMILY_MISMATCH" in codes(leaked, "fail")  # derivation from a forbidden reference supports nothing


def _not_meaningful(evidence: Evidence, reasons: tuple[str, ...] = ("the scale was fitted on 2 references",),
                    scale: bool = False) -> Evidence:
    return replace(evidence, attribution=replace(evidence.attribution, meaningful=scale, attribution_meaningful=False,
                                                 not_meaningful=reasons))


def test_statistics_that_are_not_meaningful_are_not_applied_and_the_lineage_decides() -> None:
    far = make_evidence({"base": 19.05}, attributed=("qwen", "other"), out_of_cluster=True)
    verdict = decide(make_policy(), _not_meaningful(far))
    assert verdict.passed, verdict.failures
    applied = {"TGV_DISTANCE_ABOVE_THRESHOLD", "TGV_DISTANCE_WITHIN_THRESHOLD", "TGV_FAMILY_MISMATCH",
               "TGV_FAMILY_MATCHES", "TGV_OUT_OF_CLUSTER", "TGV_IN_CLUSTER", "TGV_NEAREST_BASE_DIFFERS"}
    assert not applied & codes(verdict)
    finding = next(f for f in verdict.findings if f.code == "TGV_STATISTICS_NOT_MEANINGFUL")
    assert finding.severity == "warn" and finding.message == (
        "the distance to the declared base, the out-of-cluster rule and the family attribution are not meaningful: "
        "the scale was fitted on 2 references; the verdict rests on the lineage test")
    unrelated = decide(make_policy(), _not_meaningful(make_evidence(derived=())))
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in codes(unrelated, "fail")


def test_no_meaningful_statistics_and_no_lineage_test_is_a_failure() -> None:
    for policy, evidence in ((make_policy(), make_evidence(no_sketch=("base",))),
                             (make_policy(lineage=LineagePolicy(enabled=False)), make_evidence(derived=()))):
        verdict = decide(policy, _not_meaningful(evidence))
        assert not verdict.passed and "TGV_STATISTICS_NOT_MEANINGFUL" in codes(verdict, "fail")
        finding = next(f for f in verdict.failures if f.code == "TGV_STATISTICS_NOT_MEANINGFUL")
        assert finding.message.endswith("no lineage test ran: nothing supports the declared lineage")


def test_one_family_makes_only_the_family_check_vacuous() -> None:
    evidence = _not_meaningful(make_evidence({"base": 7.5}, derived=()), scale=True,
                               reasons=("every reference is of family 'llama', so the attribution cannot disagree",))
    verdict = decide(make_policy(), evidence)
    assert "TGV_DISTANCE_ABOVE_THRESHOLD" in codes(verdict, "fail") and "TGV_IN_CLUSTER" in codes(verdict, "pass")
    assert "TGV_STATISTICS_NOT_MEANINGFUL" in codes(verdict, "info") and "TGV_FAMILY_MATCHES" not in codes(verdict)


def test_forbidden_attribution_is_not_claimed_without_a_meaningful_attribution() -> None:
    policy = make_policy(forbidden=("leaked",))
    verdict = decide(policy, _not_meaningful(make_evidence(attributed=("llama", "leaked"))))
    assert not {"TGV_FORBIDDEN_MATCH", "TGV_NO_FORBIDDEN_MATCH"} & codes(verdict)
    assert "TGV_NO_FORBIDDEN_LINEAGE" in codes(verdict, "pass")


def test_lineage_not_established_names_where_lineage_points() -> None:
    verdict = decide(make_policy(), make_evidence(derived=("sibling",)))
    failure = next(f for f in verdict.failures if f.code == "TGV_LINEAGE_NOT_ESTABLISHED")
    assert "'sibling'" in failure.message and "80/200 unrelated pairs score as high" in failure.message


def test_not_comparable_lineage_is_not_a_silent_pass() -> None:
    evidence = make_evidence()
    refs = tuple(replace(r, lineage=lineage(False, comparable=False)) if r.id == "base" else r
                 for r in evidence.references)
    verdict = decide(make_policy(), replace(evidence, references=refs))
    failure = next(f for f in verdict.failures if f.code == "TGV_LINEAGE_NOT_ESTABLISHED")
    assert "not comparable (probe seeds differ)" in failure.message


def test_forbidden_match_and_forbidden_lineage() -> None:
    policy = make_policy(forbidden=("leaked",))
    clean = decide(policy, make_evidence())
    assert clean.passed and {"TGV_NO_FORBIDDEN_MATCH", "TGV_NO_FORBIDDEN_LINEAGE"} <= codes(clean, "pass")
    by_distance = decide(policy, make_evidence({"leaked": 0.5}, attributed=("llama", "leaked"), derived=("leaked",)))
    assert {"TGV_FORBIDDEN_MATCH", "TGV_FORBIDDEN_LINEAGE"} <= codes(by_distance, "fail")
    no_sketch = decide(policy, make_evidence({"leaked": 0.5}, attributed=("llama", "leaked"), no_sketch=("leaked",)))
    assert "TGV_FORBIDDEN_MATCH" in codes(no_sketch, "fail")
    refuted = decide(policy, make_evidence({"leaked": 0.5}, attributed=("llama", "leaked")))
    assert "TGV_FORBIDDEN_MATCH" in codes(refuted, "warn") and refuted.passed  # lineage outweighs attribution
    finding = next(f for f in refuted.findings if f.code == "TGV_FORBIDDEN_MATCH")
    assert "but the lineage test shows no derivation" in finding.message
    by_lineage = decide(policy, make_evidence(derived=("base", "leaked")))
    assert codes(by_lineage, "fail") == {"TGV_FORBIDDEN_LINEAGE"}


def test_not_comparable_lineage_to_a_forbidden_reference_refutes_nothing() -> None:
    """Withholding the tokenizer makes sketches incomparable; that must not read as 'no derivation'."""
    evidence = make_evidence(derived=("base", "leaked"))
    refs = tuple(replace(r, lineage=lineage(True, comparable=False)) if r.id == "leaked" else r
                 for r in evidence.references)
    withheld = replace(evidence, references=refs)
    warned = decide(make_policy(forbidden=("leaked",)), withheld)
    assert "TGV_NO_FORBIDDEN_LINEAGE" not in codes(warned) and "TGV_LINEAGE_UNAVAILABLE" in codes(warned, "warn")
    finding = next(f for f in warned.findings if f.code == "TGV_LINEAGE_UNAVAILABLE")
    assert finding.subject == "leaked" and "not comparable (probe seeds differ)" in finding.message
    strict = make_policy(forbidden=("leaked",), lineage=LineagePolicy(on_unavailable="fail"))
    assert not decide(strict, withheld).passed


def test_forbidden_match_does_not_fire_out_of_cluster() -> None:
    policy = make_policy(forbidden=("leaked",), on_out_of_cluster="warn")
    verdict = decide(policy, make_evidence(attributed=("llama", "leaked"), out_of_cluster=True))
    assert "TGV_FORBIDDEN_MATCH" not in codes(verdict)


def test_family_only_declaration_and_lineage_to_another_family() -> None:
    policy = make_policy(declared=Declared(family="llama"))
    assert decide(policy, make_evidence(derived=())).passed
    verdict = decide(policy, make_evidence(derived=("other",)))
    assert codes(verdict, "fail") == {"TGV_LINEAGE_CONTRADICTS_FAMILY"}


def test_lineage_unavailable_follows_policy_and_disabled_is_recorded() -> None:
    evidence = make_evidence(no_sketch=("base",))
    warned = decide(make_policy(), evidence)
    assert warned.passed and "TGV_LINEAGE_UNAVAILABLE" in codes(warned, "warn")
    strict = make_policy(lineage=LineagePolicy(on_unavailable="fail"))
    assert "TGV_LINEAGE_UNAVAILABLE" in codes(decide(strict, evidence), "fail")
    off = decide(make_policy(lineage=LineagePolicy(enabled=False)), make_evidence(derived=()))
    assert off.passed and "TGV_LINEAGE_DISABLED" in codes(off, "info")


def test_adapter_name_mismatch_artifact_warnings_and_caveats() -> None:
    evidence = make_evidence(adapter_name_mismatches=("adapter says meta/llama-x",),
                             artifact_warnings=("model.safetensors: header JSON is whitespace-padded",),
                             caveats=("legacy fingerprints mixed",))
    verdict = decide(make_policy(), evidence)
    assert verdict.passed
    assert codes(verdict, "warn") == {"TGV_ADAPTER_BASE_NAME_MISMATCH", "TGV_ARTIFACT_WARNING"}
    assert codes(verdict, "info") == {"TGV_COMPARISON_CAVEAT"}
    assert "TGV_ADAPTER_BASE_NAME_MISMATCH" in codes(decide(make_policy(on_name_mismatch="fail"), evidence), "fail")


def test_failures_come_first_and_every_code_is_known() -> None:
    verdict = decide(make_policy(forbidden=("leaked",), on_statistics_disagree="fail"),
                     make_evidence({"base": 9.0}, derived=("leaked",), out_of_cluster=True))
    severities = [f.severity for f in verdict.findings]
    assert severities == sorted(severities, key=["fail", "warn", "info", "pass"].index)
    assert all(f.code in REASON_CODES for f in verdict.findings)
    document = verdict.to_dict()
    assert document["verdict"] == "fail"
    assert [r["code"] for r in document["reasons"]] == [f.code for f in verdict.reasons]


@pytest.mark.parametrize("code", sorted(REASON_CODES))
def test_every_code_is_documented(code: str) -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "reasons.md"
    assert f"`{code}`" in docs.read_text(encoding="utf-8")


def test_declared_derivative_is_compared_with_the_base_of_its_cluster() -> None:
    refs = (*make_policy().references, ReferenceSpec(id="tuned", family="llama", index=4,
                                                     fingerprint=Path("t.json"), parent="base"))
    policy = make_policy(references=refs, declared=Declared(base="tuned"))
    evidence = make_evidence(derived=("tuned",))
    evidence = replace(evidence, references=(*evidence.references, ReferenceEvidence(
        id="tuned", family="llama", distance=0.5, threshold=7.0, lineage=lineage(True))))
    assert "TGV_NEAREST_BASE_DIFFERS" not in codes(decide(policy, evidence))  # attributed to 'base', its root
    moved = replace(evidence, attribution=replace(evidence.attribution, base="sibling"))
    finding = next(f for f in decide(policy, moved).findings if f.code == "TGV_NEAREST_BASE_DIFFERS")
    assert "'base' (the base of the declared 'tuned')" in finding.message
