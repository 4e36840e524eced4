"""The verdict: one decision procedure, `decide(rules, evidence)`, turning evidence into findings with TGV_* codes.

Each finding is machine-readable (code, severity) and human-readable (one sentence). The verdict is
FAIL when any finding has severity "fail". docs/reasons.md documents every code in REASON_CODES.

`decide` is pure and knows neither the policy file nor the attestation format: `verify` calls it with
the policy's rules (`Policy.decision_rules()`) and the evidence it measured; `verify-attestation`
calls it with the rules and evidence an attestation records, and compares the outcome with the
reasons the attestation states. The types it reads (DecisionRules, Evidence and its parts) live here.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tg_verify.waivers import Waiver, waive

Severity = Literal["fail", "warn", "info", "pass"]
Action = Literal["fail", "warn"]  # what a policy may make of a finding whose severity it controls
SEVERITY_ORDER: dict[str, int] = {"fail": 0, "warn": 1, "info": 2, "pass": 3}

# code -> (default severity, what it means). Severities a policy can change say so.
REASON_CODES: dict[str, tuple[str, str]] = {
    "TGV_DISTANCE_ABOVE_THRESHOLD": ("fail", "the distance to the declared base exceeds its threshold (a warning when "
                                             "the lineage test establishes the declared base; policy "
                                             "on_statistics_disagree: warn | fail)"),
    "TGV_DISTANCE_WITHIN_THRESHOLD": ("pass", "the distance to the declared base is within its threshold"),
    "TGV_FAMILY_MISMATCH": ("fail", "the attributed family differs from the declared family (a warning when the "
                                    "lineage test establishes the declared base; on_statistics_disagree)"),
    "TGV_FAMILY_MATCHES": ("pass", "the attributed family is the declared family"),
    "TGV_OUT_OF_CLUSTER": ("fail", "the candidate is farther than the out-of-cluster threshold from the cluster "
                                   "centre it is attributed to (policy on_out_of_cluster: fail | warn; a warning "
                                   "when the lineage test establishes the declared base; on_statistics_disagree)"),
    "TGV_STATISTICS_NOT_MEANINGFUL": ("warn", "the paper's distance, out-of-cluster rule or family attribution cannot "
                                              "carry a decision with these references (their scale, or a single "
                                              "family), so they are not applied; a failure when no lineage test "
                                              "ran either, an info when only the family check is vacuous"),
    "TGV_IN_CLUSTER": ("pass", "the candidate lies within the out-of-cluster threshold of a cluster centre"),
    "TGV_NEAREST_BASE_DIFFERS": ("warn", "the nearest base is another reference of the declared family "
                                         "(policy on_base_mismatch: warn | fail)"),
    "TGV_FORBIDDEN_MATCH": ("fail", "the candidate is attributed to a forbidden reference (a warning when the "
                                    "lineage test against it ran and shows no derivation)"),
    "TGV_NO_FORBIDDEN_MATCH": ("pass", "the candidate is not attributed to any forbidden reference"),
    "TGV_LINEAGE_ESTABLISHED": ("pass", "the lineage test shows the candidate derives from the declared base"),
    "TGV_LINEAGE_NOT_ESTABLISHED": ("fail", "the lineage test does not show the candidate derives from the "
                                            "declared base"),
    "TGV_FORBIDDEN_LINEAGE": ("fail", "the lineage test shows the candidate derives from a forbidden reference"),
    "TGV_NO_FORBIDDEN_LINEAGE": ("pass", "the lineage test shows no derivation from a forbidden reference"),
    "TGV_LINEAGE_CONTRADICTS_FAMILY": ("fail", "the lineage test shows derivation from a reference of another "
                                               "family than the declared one"),
    "TGV_LINEAGE_UNAVAILABLE": ("warn", "a lineage test could not run: a fingerprint lacks the lineage sketch, "
                                        "or against a forbidden reference the sketches are not comparable "
                                        "(policy lineage.on_unavailable: warn | fail)"),
    "TGV_LINEAGE_DISABLED": ("info", "the policy turned the lineage test off (lineage.enabled: false)"),
    "TGV_ADAPTER_BASE_NAME_MISMATCH": ("warn", "the adapter's base_model_name_or_path disagrees with the declared "
                                               "base (policy on_name_mismatch: warn | fail)"),
    "TGV_UNEXPECTED_TENSORS": ("fail", "the candidate stores tensors that the runtime of its architecture does not "
                                       "load; they were not fingerprinted (policy on_unexpected_tensors: fail | warn)"),
    "TGV_ARTIFACT_WARNING": ("warn", "the candidate artifact was accepted with a warning (e.g. a non-canonical "
                                     "header)"),
    "TGV_COMPARISON_CAVEAT": ("info", "a caveat on how distances were computed (legacy references, degenerate "
                                      "scaling)"),
    "TGV_FEATURES_FROM_FINGERPRINT": ("warn", "the candidate's features were read from a fingerprint file, not "
                                              "recomputed from its weights (policy candidate.require_weights: "
                                              "true makes it fatal)"),
    "TGV_WAIVER_EXPIRED": ("fail", "a policy waiver is past its expiry date: it no longer waives, and must be "
                                   "reviewed"),
    "TGV_WAIVER_UNUSED": ("warn", "a policy waiver matches no failure or warning of this run"),
}


# Evidence fields that hold observations made on the way (one message each): finding code -> field name.
# An attestation records them only as the findings they became, and is read back into these fields.
OBSERVATIONS: dict[str, str] = {
    "TGV_ADAPTER_BASE_NAME_MISMATCH": "adapter_name_mismatches",
    "TGV_ARTIFACT_WARNING": "artifact_warnings",
    "TGV_COMPARISON_CAVEAT": "caveats",
    "TGV_UNEXPECTED_TENSORS": "unexpected_tensors",
}


@dataclass(frozen=True)
class DecisionRules:
    """The rules that turn evidence into findings: the policy's declaration and severities.

    `verify` takes them from the policy (Policy.decision_rules); an attestation records them
    (predicate.declaredLineage and decisionRules), so verify-attestation decides with the same rules.
    """

    declared_base: str | None = None
    declared_family: str | None = None  # the declared family, or the declared base's
    declared_root: str | None = None  # the base at the end of declared_base's parent chain (itself for a base)
    forbidden: tuple[str, ...] = ()
    on_out_of_cluster: Action = "fail"
    on_base_mismatch: Action = "warn"
    on_name_mismatch: Action = "warn"
    lineage_enabled: bool = True
    on_lineage_unavailable: Action = "warn"
    require_weights: bool = False  # features taken from a fingerprint file (not recomputed) fail the verdict
    # what a failing statistic (distance, family, out of cluster) becomes when the lineage test establishes the
    # declared lineage: warn (the stronger evidence decides) or fail (both must agree)
    on_statistics_disagree: Action = "warn"
    # stored tensors the runtime does not load (decoys): fail, or warn
    on_unexpected_tensors: Action = "fail"
    # reviewed, dated exceptions for single findings (tg_verify/waivers.py), judged on Evidence.verified_on
    waivers: tuple[Waiver, ...] = ()


@dataclass(frozen=True)
class LineageEvidence:
    """What the verdict reads from one lineage test (tg_verify.analysis.lineage.LineageResult, or a record of it)."""

    score: float  # NaN when the sketches were not comparable
    threshold: float
    p_value: float
    false_positive_rate: float
    derived: bool
    comparable: bool = True
    alpha: float | None = None
    notes: tuple[str, ...] = ()
    method: str | None = None  # the test's method (analysis/lineage_rule.py); None: the earlier tgl1
    # the calibration class, its null sample size, the share of it scoring at least `score` and that share's exact
    # one-sided 95% upper bound (analysis/calibration.py); None when the reference's architecture is uncalibrated
    calibration: str | None = None
    null_size: int | None = None
    rate: float | None = None
    rate_upper: float | None = None
    null_scope: str | None = None  # which models the null covers (the rate holds for those)
    # the block evidence's score and threshold (tgl4; None when either fingerprint lacks it or it was not comparable)
    block_score: float | None = None
    block_threshold: float | None = None

    def rate_text(self) -> str:
        """The stated rate in words: the calibrated share of unrelated pairs at the score, or 'uncalibrated'."""
        if self.calibration is None or not self.null_size or self.rate is None or self.rate_upper is None:
            return ("uncalibrated (no null measured for this architecture)" if self.method is not None
                    else f"stated false-positive rate {self.false_positive_rate:.2%}")
        count = round(self.rate * self.null_size)
        scope = f"; {self.null_scope}" if self.null_scope else ""
        return (f"{count}/{self.null_size} unrelated pairs score as high "
                f"(95% upper bound {self.rate_upper:.1%}; {self.calibration}{scope})")


@dataclass(frozen=True)
class ReferenceEvidence:
    """What was measured against one reference."""

    id: str
    family: str
    distance: float
    threshold: float
    lineage: LineageEvidence | None = None
    lineage_unavailable: str | None = None  # why no lineage test ran (None when it ran or was disabled)

    @property
    def within_threshold(self) -> bool:
        return self.distance <= self.threshold


@dataclass(frozen=True)
class AttributionEvidence:
    """The family attribution (nearest cluster centre) and the out-of-cluster decision.

    `meaningful`: the distances (to the declared base too) and the out-of-cluster rule are on a scale that
    can carry a decision; `attribution_meaningful`: the family attribution can; `not_meaningful` says why not.
    """

    family: str
    base: str
    distance: float  # to the attributed cluster centre
    out_of_cluster: bool
    threshold: float  # the out-of-cluster threshold
    meaningful: bool = True
    attribution_meaningful: bool = True
    not_meaningful: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evidence:
    """Everything the verdict is decided from; the pipeline gathers it, an attestation records it, tests build it.

    Besides the measurements, observations made on the way (adapter name mismatches, artifact warnings,
    caveats) are evidence too: each becomes one finding. `features_from` says where the candidate's
    features came from when they were not recomputed from its weights in this run (None when they were).
    """

    references: tuple[ReferenceEvidence, ...]
    attribution: AttributionEvidence
    adapter_name_mismatches: tuple[str, ...] = ()
    artifact_warnings: tuple[str, ...] = ()
    unexpected_tensors: tuple[str, ...] = ()  # stored tensor names the runtime does not load (never fingerprinted)
    caveats: tuple[str, ...] = ()
    features_from: str | None = None
    # the day (UTC) the evidence was gathered: the rules' waivers are judged on it (an attestation's timeVerified)
    verified_on: _dt.date | None = None

    def reference(self, ref_id: str) -> ReferenceEvidence:
        for ref in self.references:
            if ref.id == ref_id:
                return ref
        raise KeyError(ref_id)


@dataclass(frozen=True)
class Finding:
    """One check's outcome: a TGV_* code, its severity, one sentence, and the reference it concerns."""

    code: str
    severity: Severity
    message: str
    subject: str | None = None  # a reference id, when the finding concerns one

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "message": self.message, "subject": self.subject}


@dataclass(frozen=True)
class Verdict:
    """PASS or FAIL with every finding, failures first."""

    passed: bool
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """"pass" or "fail", as reports write it."""
        return "pass" if self.passed else "fail"

    @property
    def reasons(self) -> tuple[Finding, ...]:
        """The findings that are not passed checks: failures, warnings and notes."""
        return tuple(f for f in self.findings if f.severity != "pass")

    @property
    def failures(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "fail")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warn")

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.label, "reasons": [f.to_dict() for f in self.reasons],
                "checks": [f.to_dict() for f in self.findings]}


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _lineage_text(result: LineageEvidence) -> str:
    if not result.comparable:
        notes = "; ".join(result.notes) or "no common probe"
        return f"not comparable ({notes})"
    parts = []
    if math.isfinite(result.score):
        parts.append(f"score {_fmt(result.score)} vs threshold {_fmt(result.threshold)}")
    else:
        parts.append("sketch not comparable")
    if result.block_score is not None and result.block_threshold is not None:
        parts.append(f"blocks {_fmt(result.block_score)} vs {_fmt(result.block_threshold)}")
    return f"{'; '.join(parts)}: {result.rate_text()}"


class _Findings:
    """Collects findings; `add` looks up the default severity unless the rules set one."""

    def __init__(self) -> None:
        self.items: list[Finding] = []

    def add(self, code: str, message: str, subject: str | None = None, severity: str | None = None) -> None:
        self.items.append(Finding(code, (severity or REASON_CODES[code][0]), message, subject))  # type: ignore[arg-type]


def _declared_base(rules: DecisionRules, ev: Evidence, out: _Findings) -> None:
    base = rules.declared_base
    if base is None:
        return
    ref = ev.reference(base)
    att = ev.attribution
    support = _lineage_support(rules, ev)
    if not att.meaningful:
        pass  # reported once by _not_meaningful
    elif ref.within_threshold:
        out.add("TGV_DISTANCE_WITHIN_THRESHOLD",
                f"distance {_fmt(ref.distance)} to declared base '{base}' is within the threshold "
                f"{_fmt(ref.threshold)}", base)
    else:
        severity, note = _outweighed(rules, support, "fail")
        out.add("TGV_DISTANCE_ABOVE_THRESHOLD",
                f"distance {_fmt(ref.distance)} to declared base '{base}' exceeds the threshold {_fmt(ref.threshold)}"
                f"{note}", base, severity=severity)
    root = rules.declared_root or base
    if att.attribution_meaningful and att.base != root and att.family == ref.family:
        declared = f"'{base}'" if root == base else f"'{root}' (the base of the declared '{base}')"
        severity, note = _outweighed(rules, support, rules.on_base_mismatch)
        out.add("TGV_NEAREST_BASE_DIFFERS",
                f"the nearest base is '{att.base}', not {declared} (both family '{ref.family}'); the "
                f"paper's statistics rarely separate bases of one family, the lineage test does{note}",
                base, severity=severity)


def _lineage_support(rules: DecisionRules, ev: Evidence) -> tuple[str, LineageEvidence] | None:
    """The lineage evidence that establishes the declared lineage: derivation from the declared base, or (family
    only) from a non-forbidden reference of the declared family. None when there is none."""
    if not rules.lineage_enabled:
        return None

    def established(ref: ReferenceEvidence) -> bool:
        return ref.lineage is not None and ref.lineage.comparable and ref.lineage.derived

    base = rules.declared_base
    if base is not None:
        ref = ev.reference(base)
        return (f"declared base '{base}'", ref.lineage) if established(ref) and ref.lineage is not None else None
    family = rules.declared_family
    for ref in ev.references:
        if ref.family == family and ref.id not in rules.forbidden and established(ref) and ref.lineage is not None:
            return f"'{ref.id}' of the declared family", ref.lineage
    return None


def _outweighed(rules: DecisionRules, support: tuple[str, LineageEvidence] | None, severity: str) -> tuple[str, str]:
    """A statistical finding's severity and a note: a warning when the lineage test establishes the declared
    lineage, unless the rules ask for both (on_statistics_disagree: fail)."""
    if support is None or severity != "fail" or rules.on_statistics_disagree == "fail":
        return severity, ""
    what, result = support
    return "warn", (f"; the lineage test establishes derivation from {what} ({_lineage_text(result)}), which "
                    "outweighs the paper's statistics (on_statistics_disagree: warn)")


def _family(rules: DecisionRules, ev: Evidence, out: _Findings) -> None:
    family = rules.declared_family
    att = ev.attribution
    if family is None or not att.attribution_meaningful:
        return
    if att.family == family:
        out.add("TGV_FAMILY_MATCHES", f"attributed family '{att.family}' (nearest base '{att.base}') is the "
                                      f"declared family")
    else:
        severity, note = _outweighed(rules, _lineage_support(rules, ev), "fail")
        out.add("TGV_FAMILY_MISMATCH", f"attributed family '{att.family}' (nearest base '{att.base}') differs from "
                                       f"the declared family '{family}'{note}", severity=severity)


def _cluster(rules: DecisionRules, ev: Evidence, out: _Findings) -> None:
    att = ev.attribution
    if not att.meaningful:
        return
    if att.out_of_cluster:
        severity, note = _outweighed(rules, _lineage_support(rules, ev), rules.on_out_of_cluster)
        out.add("TGV_OUT_OF_CLUSTER",
                f"distance {_fmt(att.distance)} to the nearest cluster centre ('{att.family}') exceeds the "
                f"out-of-cluster threshold {_fmt(att.threshold)}: possibly a new, heavily modified or "
                f"quantised model{note}", severity=severity)
    else:
        out.add("TGV_IN_CLUSTER", f"distance {_fmt(att.distance)} to the nearest cluster centre ('{att.family}') is "
                                  f"within the out-of-cluster threshold {_fmt(att.threshold)}")


def _forbidden(rules: DecisionRules, ev: Evidence, out: _Findings) -> None:
    if not rules.forbidden:
        return
    att = ev.attribution
    if not att.attribution_meaningful:
        return  # no attribution to check; _not_meaningful says so, the lineage test still runs against them
    if att.base in rules.forbidden and not att.out_of_cluster:
        ref = ev.reference(att.base)
        lineage = ref.lineage
        refuted = lineage is not None and lineage.comparable and not lineage.derived
        if refuted and rules.lineage_enabled:
            # the paper's statistics rarely separate bases of one family; the lineage test is the stronger evidence
            assert lineage is not None
            out.add("TGV_FORBIDDEN_MATCH", f"the candidate is attributed to forbidden reference '{att.base}' "
                                           f"(distance {_fmt(ref.distance)}), but the lineage test shows no "
                                           f"derivation from it ({_lineage_text(lineage)})", att.base, severity="warn")
        else:
            out.add("TGV_FORBIDDEN_MATCH", f"the candidate is attributed to forbidden reference '{att.base}' "
                                           f"(distance {_fmt(ref.distance)})", att.base)
    else:
        out.add("TGV_NO_FORBIDDEN_MATCH", f"the candidate is not attributed to any forbidden reference "
                                          f"({', '.join(rules.forbidden)})")


def _not_meaningful(rules: DecisionRules, ev: Evidence, out: _Findings) -> None:
    """One finding for the statistical checks that were not applied, why, and what the verdict rests on."""
    att = ev.attribution
    skipped = []
    if not att.meaningful:
        skipped += (["the distance to the declared base"] if rules.declared_base else []) + ["the out-of-cluster rule"]
    if not att.attribution_meaningful and (rules.declared_family is not None or rules.forbidden):
        skipped.append("the family attribution")
    if not skipped:
        return
    what = ", ".join(skipped[:-1]) + (" and " if len(skipped) > 1 else "") + skipped[-1]
    # the wording of tg_verify.analysis.attribution.not_meaningful_text (not imported: the verdict stays light)
    message = f"{what} {'are' if len(skipped) > 1 else 'is'} not meaningful: {'; '.join(att.not_meaningful)}"
    if att.meaningful:  # the scale is fine; only a one-family reference set makes the family check vacuous
        out.add("TGV_STATISTICS_NOT_MEANINGFUL", message, severity="info")
        return
    tested = rules.lineage_enabled and (
        ev.reference(rules.declared_base).lineage is not None if rules.declared_base is not None
        else any(r.lineage is not None for r in ev.references))
    if tested:
        out.add("TGV_STATISTICS_NOT_MEANINGFUL", f"{message}; the verdict rests on the lineage test")
    else:
        out.add("TGV_STATISTICS_NOT_MEANINGFUL", f"{message}, and no lineage test ran: nothing supports the declared "
                                                 "lineage", severity="fail")


def _derived_elsewhere(ev: Evidence, exclude: str) -> list[str]:
    return [r.id for r in ev.references if r.id != exclude and r.lineage is not None and r.lineage.derived]


def _unavailable(rules: DecisionRules, ref: ReferenceEvidence, role: str, out: _Findings) -> bool:
    if ref.lineage is not None:
        return False
    reason = ref.lineage_unavailable or "no lineage result"
    out.add("TGV_LINEAGE_UNAVAILABLE", f"no lineage test against {role} '{ref.id}': {reason}", ref.id,
            severity=rules.on_lineage_unavailable)
    return True


def _lineage(rules: DecisionRules, ev: Evidence, out: _Findings) -> None:
    if not rules.lineage_enabled:
        out.add("TGV_LINEAGE_DISABLED", "the lineage test is off (lineage.enabled: false); the verdict rests on "
                                        "the paper's distance and family attribution only")
        return
    base = rules.declared_base
    if base is not None:
        ref = ev.reference(base)
        if not _unavailable(rules, ref, "declared base", out):
            assert ref.lineage is not None
            if ref.lineage.derived:
                out.add("TGV_LINEAGE_ESTABLISHED", f"lineage to declared base '{base}' established: "
                                                   f"{_lineage_text(ref.lineage)}", base)
            else:
                others = _derived_elsewhere(ev, base)
                hint = f"; lineage points to {', '.join(repr(o) for o in others)} instead" if others else ""
                out.add("TGV_LINEAGE_NOT_ESTABLISHED", f"lineage to declared base '{base}' not established: "
                                                       f"{_lineage_text(ref.lineage)}{hint}", base)
    for ref_id in rules.forbidden:
        ref = ev.reference(ref_id)
        if _unavailable(rules, ref, "forbidden reference", out):
            continue
        assert ref.lineage is not None
        if not ref.lineage.comparable:
            # sketches that cannot be compared refute nothing: withholding a tokenizer must not buy a pass
            out.add("TGV_LINEAGE_UNAVAILABLE", f"no lineage test against forbidden reference '{ref_id}': "
                                               f"{_lineage_text(ref.lineage)}", ref_id,
                    severity=rules.on_lineage_unavailable)
        elif ref.lineage.derived:
            out.add("TGV_FORBIDDEN_LINEAGE", f"the candidate derives from forbidden reference '{ref_id}': "
                                             f"{_lineage_text(ref.lineage)}", ref_id)
        else:
            out.add("TGV_NO_FORBIDDEN_LINEAGE", f"no derivation from forbidden reference '{ref_id}': "
                                                f"{_lineage_text(ref.lineage)}", ref_id)
    family = rules.declared_family
    for ref in ev.references:
        if ref.id in rules.forbidden or ref.lineage is None or not ref.lineage.derived:
            continue
        if family is not None and ref.family != family:
            out.add("TGV_LINEAGE_CONTRADICTS_FAMILY",
                    f"the candidate derives from '{ref.id}' of family '{ref.family}', not the declared family "
                    f"'{family}': {_lineage_text(ref.lineage)}", ref.id)


def _candidate(rules: DecisionRules, ev: Evidence, out: _Findings) -> None:
    """How the candidate's own evidence was obtained, and what was noticed on the way."""
    if ev.features_from is not None:
        out.add("TGV_FEATURES_FROM_FINGERPRINT",
                f"the candidate's features were read from {ev.features_from}, not recomputed from its weights: the "
                f"verdict holds for the weights only if that fingerprint was made from them"
                + (" (candidate.require_weights: true)" if rules.require_weights else ""),
                severity="fail" if rules.require_weights else "warn")
    for message in ev.adapter_name_mismatches:
        out.add("TGV_ADAPTER_BASE_NAME_MISMATCH", message, rules.declared_base, severity=rules.on_name_mismatch)
    if ev.unexpected_tensors:
        names = ev.unexpected_tensors
        listed = ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        out.add("TGV_UNEXPECTED_TENSORS", f"{len(names)} stored tensor(s) that the runtime does not load were left out "
                f"of the fingerprint: {listed}", severity=rules.on_unexpected_tensors)
    for message in ev.artifact_warnings:
        out.add("TGV_ARTIFACT_WARNING", message)
    for message in ev.caveats:
        out.add("TGV_COMPARISON_CAVEAT", message)


def decide(rules: DecisionRules, evidence: Evidence) -> Verdict:
    """Apply the rules to the evidence, then the rules' waivers as of `evidence.verified_on`.
    Pure: the same inputs give the same verdict."""
    out = _Findings()
    _declared_base(rules, evidence, out)
    _family(rules, evidence, out)
    _cluster(rules, evidence, out)
    _forbidden(rules, evidence, out)
    _not_meaningful(rules, evidence, out)
    _lineage(rules, evidence, out)
    _candidate(rules, evidence, out)
    items = out.items
    if rules.waivers:
        if evidence.verified_on is None:
            raise ValueError("decide: the rules carry waivers, so the evidence must say the day it was gathered "
                             "(Evidence.verified_on)")
        items = waive(items, rules.waivers, evidence.verified_on, Finding)
    findings = sorted(items, key=lambda f: SEVERITY_ORDER[f.severity])  # stable: rule order within a severity
    return Verdict(passed=not any(f.severity == "fail" for f in findings), findings=tuple(findings))


def summarize(findings: Sequence[Finding]) -> str:
    """One line: the failing codes, or the warnings, or 'all checks passed'."""
    failures = [f.code for f in findings if f.severity == "fail"]
    if failures:
        return "failed: " + ", ".join(dict.fromkeys(failures))
    warnings = [f.code for f in findings if f.severity == "warn"]
    return "passed with warnings: " + ", ".join(dict.fromkeys(warnings)) if warnings else "all checks passed"
