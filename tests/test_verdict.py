"""The verdict rules: each reason code fires exactly when its rule is broken, with the policy's severity."""

from __future__ import annotations

from dataclasses import replace
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


def decide(policy: Policy, evidence: Evidence) -> Verdict:
    """The verdict under the policy's rules (verify decides exactly so)."""
    return decide_rules(policy.decision_rules(), evidence)


def lineage(derived: bool, score: float | None = None, comparable: bool = True) -> LineageEvidence:
    return LineageEvidence(score=score if score is not None else (0.9 if derived else 0.05), threshold=0.5,
                           p_value=0.001 if derived else 0.4, false_positive_rate=0.01, derived=derived,
                           comparable=comparable, alpha=0.01, notes=() if comparable else ("probe seeds differ",))


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
    verdict = decide(make_policy(), make_evidence({"base": 7.5}))
    assert not verdict.passed
    assert "TGV_DISTANCE_ABOVE_THRESHOLD" in codes(verdict, "fail")
    failure = next(f for f in verdict.failures if f.code == "TGV_DISTANCE_ABOVE_THRESHOLD")
    assert "7.500" in failure.message and "7.000" in failure.message and failure.subject == "base"


def test_family_mismatch_fails() -> None:
    verdict = decide(make_policy(), make_evidence(attributed=("qwen", "other"), derived=()))
    assert {"TGV_FAMILY_MISMATCH", "TGV_LINEAGE_NOT_ESTABLISHED"} <= codes(verdict, "fail")
    assert "TGV_NEAREST_BASE_DIFFERS" not in codes(verdict)  # another family: the family rule speaks


def test_out_of_cluster_follows_policy() -> None:
    evidence = make_evidence(out_of_cluster=True)
    assert "TGV_OUT_OF_CLUSTER" in codes(decide(make_policy(), evidence), "fail")
    warned = decide(make_policy(on_out_of_cluster="warn"), evidence)
    assert warned.passed and "TGV_OUT_OF_CLUSTER" in codes(warned, "warn")
    assert summarize(warned.findings) == "passed with warnings: TGV_OUT_OF_CLUSTER"


def test_nearest_base_of_the_same_family_is_a_warning_unless_policy_says_fail() -> None:
    evidence = make_evidence(attributed=("llama", "sibling"))
    assert "TGV_NEAREST_BASE_DIFFERS" in codes(decide(make_policy(), evidence), "warn")
    assert "TGV_NEAREST_BASE_DIFFERS" in codes(decide(make_policy(on_base_mismatch="fail"), evidence), "fail")


def test_lineage_not_established_names_where_lineage_points() -> None:
    verdict = decide(make_policy(), make_evidence(derived=("sibling",)))
    failure = next(f for f in verdict.failures if f.code == "TGV_LINEAGE_NOT_ESTABLISHED")
    assert "'sibling'" in failure.message and "false-positive rate 1.00%" in failure.message


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
    verdict = decide(make_policy(forbidden=("leaked",)),
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
