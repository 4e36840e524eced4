"""The predicate `https://tg-verify.dev/attestation/model-lineage/v1`: its typed form, its JSON, and its parser.

`Predicate` is what an attestation records: the candidate's files and how its features were
obtained, the fingerprint, the policy by digest, the decision rules (tg_verify.verdict.DecisionRules),
the evidence (distances, lineage, attribution) and the verdict with its reasons. `to_json` writes
it; `parse_statement` reads a Statement back as untrusted input, so every malformed field is an
AttestationError naming the field (exit 2), never a crash. Both directions share the field names
here, and `parse_predicate(to_json(p)) == p`, so what verify-attestation decides from is exactly
what verify recorded. docs/attestation.md documents the schema.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from tg_verify.artifact.digest import GIT_PATHS, OTHER_ROLE, root_digest
from tg_verify.errors import AttestationError
from tg_verify.fingerprint.document import BaseModelRecord, FileDigest
from tg_verify.verdict import (
    OBSERVATIONS,
    AttributionEvidence,
    DecisionRules,
    Evidence,
    Finding,
    LineageEvidence,
    ReferenceEvidence,
)
from tg_verify.waivers import Waiver

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://tg-verify.dev/attestation/model-lineage/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
VERIFIER_ID = "https://tg-verify.dev/verifier/tg-verify"
FINGERPRINT_METHOD = "https://tg-verify.dev/fingerprint/tensorguard"
ROOT_ANNOTATION = "tgVerifyRootDigest"
MAX_ATTESTATION_BYTES = 16 * 1024 * 1024  # actions/attest's predicate limit; also our read cap
MAX_SUBJECTS = 1024  # actions/attest's subject limit
MAX_TEXT = 64 * 1024  # one string field (a reason's message is a sentence)
SIGNIFICANT_DIGITS = 10  # features and margins are rounded so the same evidence always gives the same bytes

Result = Literal["PASSED", "FAILED"]
FeaturesSource = Literal["recomputed", "fingerprint"]
RESULTS: tuple[str, ...] = ("PASSED", "FAILED")
# Finding severities in the attestation's (in-toto / SARIF) vocabulary; passed checks are not recorded.
SEVERITY_OUT: dict[str, str] = {"fail": "error", "warn": "warning", "info": "info"}
SEVERITY_IN: dict[str, str] = {v: k for k, v in SEVERITY_OUT.items()}
ACTIONS = ("fail", "warn")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Subject:
    """One in-toto subject: a file (name, sha256) or the whole model's root digest (`root`)."""

    name: str
    sha256: str
    root: bool = False


@dataclass(frozen=True)
class CandidateRecord:
    """The model the verdict is about: its files by digest and how its features were obtained.

    `features`: "recomputed" (fingerprinted from these files in the run) or "fingerprint" (read from
    a fingerprint file); None in attestations written before this was recorded, which proves nothing.
    `files_hashed`: the digests were computed from the files in the run (not only as a fingerprint recorded).
    Then `root_digest` is model_signing's digest of the model path (every file but git paths; files not read
    for the verdict have role `other`) and `allow_symlinks` says whether some file was read through a
    symbolic link. A candidate known only by a fingerprint file has no directory listing: its root digest
    is then the weights digest over the files the fingerprint recorded, and no serialization is claimed.
    """

    name: str
    layout: str
    root_digest: str
    files: tuple[FileDigest, ...]
    features: FeaturesSource | None
    files_hashed: bool
    base: BaseModelRecord | None = None
    format: str = "safetensors"  # the candidate's file format: "safetensors" | "gguf"
    weights_digest: str | None = None  # as recorded (None: written before it was); checked against `files`
    allow_symlinks: bool = False  # some file was read through a symbolic link (a Hugging Face cache)

    @property
    def features_recomputed(self) -> bool:
        return self.features == "recomputed"

    @property
    def evidence_files(self) -> tuple[FileDigest, ...]:
        """The files the fingerprint was computed from (role other than `other`)."""
        return tuple(f for f in self.files if f.role != OTHER_ROLE)

    def weights_digest_of_files(self) -> str:
        """The weights digest the attested files give (root digest over the evidence files)."""
        return root_digest({f.path: f.sha256 for f in self.evidence_files})


@dataclass(frozen=True)
class FingerprintRecord:
    """The candidate's fingerprint: method, feature version, extraction settings, digest and the paper's features."""

    feature_version: str
    parameters: dict[str, Any]
    sha256: str
    features: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return f"{FINGERPRINT_METHOD}/{self.feature_version}"


@dataclass(frozen=True)
class ReferenceRecord:
    """One reference the candidate was measured against, and the lineage test against it."""

    id: str
    family: str
    role: str  # declared-base | forbidden | reference
    fingerprint_sha256: str
    distance: float
    threshold: float
    within_threshold: bool  # as recorded (checked against distance and threshold)
    lineage: LineageEvidence | None = None

    def evidence(self) -> ReferenceEvidence:
        return ReferenceEvidence(id=self.id, family=self.family, distance=self.distance, threshold=self.threshold,
                                 lineage=self.lineage)


@dataclass(frozen=True)
class AttributionRecord:
    """The family attribution: nearest cluster centre, its distance and the out-of-cluster decision."""

    family: str
    base: str
    distance: float
    threshold: float
    out_of_cluster: bool  # as recorded (checked against distance and threshold)
    margin: float | None = None
    matches_declared: bool | None = None  # as recorded (checked against the declared family)
    meaningful: bool = True  # the distances and the out-of-cluster rule could carry a decision (were applied)
    attribution_meaningful: bool = True  # the family attribution could (was applied)
    scale: str | None = None  # the distance scale (population, references, ...)

    def evidence(self) -> AttributionEvidence:
        return AttributionEvidence(family=self.family, base=self.base, distance=self.distance,
                                   out_of_cluster=self.out_of_cluster, threshold=self.threshold,
                                   meaningful=self.meaningful, attribution_meaningful=self.attribution_meaningful)


@dataclass(frozen=True)
class Predicate:
    """Everything a tg-verify attestation records (the predicate of the Statement)."""

    verifier_version: dict[str, str]
    time_verified: str
    policy_sha256: str
    policy_name: str | None
    candidate: CandidateRecord
    fingerprint: FingerprintRecord
    rules: DecisionRules
    references: tuple[ReferenceRecord, ...]
    attribution: AttributionRecord
    result: Result
    reasons: tuple[Finding, ...]
    distance_space: str | None = None
    policy_uri: str | None = None

    def evidence(self) -> Evidence:
        """The evidence the verdict is decided from, as recorded.

        Observations (artifact warnings, adapter name mismatches, caveats) are recorded only as the
        reasons they became, so they are read back from there.
        """
        observed: dict[str, list[str]] = {name: [] for name in OBSERVATIONS.values()}
        for reason in self.reasons:
            if reason.code in OBSERVATIONS:
                observed[OBSERVATIONS[reason.code]].append(reason.message)
        features_from = None if self.candidate.features_recomputed else (
            "a fingerprint file (as this attestation records)" if self.candidate.features == "fingerprint"
            else "an unrecorded source (this attestation does not say the features were recomputed)")
        return Evidence(references=tuple(r.evidence() for r in self.references),
                        attribution=self.attribution.evidence(), features_from=features_from,
                        verified_on=self.verified_on,
                        **{name: tuple(messages) for name, messages in observed.items()})

    @property
    def verified_on(self) -> _dt.date:
        """The UTC day of timeVerified: the day the run judged the policy's waivers on."""
        return parse_time(self.time_verified).date()

    @property
    def passed(self) -> bool:
        return self.result == "PASSED"


@dataclass(frozen=True)
class ParsedStatement:
    """A validated Statement: its subjects and its predicate."""

    subjects: tuple[Subject, ...]
    predicate: Predicate


def parse_time(text: str) -> _dt.datetime:
    """An RFC 3339 timestamp with a time zone (as `timeVerified` records it) in UTC; ValueError otherwise."""
    moment = _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    if moment.tzinfo is None or "T" not in text.upper():
        raise ValueError(f"{text[:40]!r} is not an RFC 3339 timestamp with a time zone")
    return moment.astimezone(_dt.timezone.utc)


def rounded(value: float) -> float:
    """`value` at SIGNIFICANT_DIGITS significant digits (for features and margins, not for decided numbers)."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


# ------------------------------------------------------------------------------------------- writing


def _finite(value: float | None, where: str) -> float | None:
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number):
        raise AttestationError(f"attestation: {where}: non-finite number {number} cannot be recorded")
    return number


def _drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


def _lineage_json(lineage: LineageEvidence, where: str) -> dict[str, Any]:
    def number(value: float, name: str) -> float | None:
        # a test whose sketches were not comparable (tgl4: whose block evidence alone decided), or whose reference
        # is uncalibrated, has no rate: left out, never NaN
        if not math.isfinite(value) and (not lineage.comparable or name in ("pValue", "falsePositiveRate")
                                         or (name in ("score", "threshold") and lineage.block_score is not None)):
            return None
        return _finite(value, f"{where}.{name}")

    return _drop_none({
        "method": lineage.method, "score": number(lineage.score, "score"),
        "threshold": number(lineage.threshold, "threshold"), "pValue": number(lineage.p_value, "pValue"),
        "falsePositiveRate": number(lineage.false_positive_rate, "falsePositiveRate"),
        "alpha": _finite(lineage.alpha, f"{where}.alpha"), "comparable": lineage.comparable,
        "derived": lineage.derived, "notes": list(lineage.notes) or None,
        "calibration": lineage.calibration, "nullPairs": lineage.null_size, "nullScope": lineage.null_scope,
        "rateAtScore": _finite(lineage.rate, f"{where}.rateAtScore"),
        "rateUpperBound95": _finite(lineage.rate_upper, f"{where}.rateUpperBound95"),
        "blockScore": _finite(lineage.block_score, f"{where}.blockScore"),
        "blockThreshold": _finite(lineage.block_threshold, f"{where}.blockThreshold"),
    })


def _rules_json(rules: DecisionRules, distance_space: str | None,
                attribution: AttributionRecord | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(declaredLineage, decisionRules): every field of DecisionRules, so a consumer decides with the same rules,
    and which statistics the scale could carry (they decide which rules applied)."""
    declared = _drop_none({"base": rules.declared_base, "family": rules.declared_family,
                           "forbidden": sorted(rules.forbidden)})
    decision = _drop_none({
        "declaredBaseRoot": rules.declared_root, "onOutOfCluster": rules.on_out_of_cluster,
        "onBaseMismatch": rules.on_base_mismatch, "onNameMismatch": rules.on_name_mismatch,
        "requireLineage": rules.lineage_enabled, "lineageOnUnavailable": rules.on_lineage_unavailable,
        "requireWeights": rules.require_weights, "onStatisticsDisagree": rules.on_statistics_disagree,
        "onUnexpectedTensors": rules.on_unexpected_tensors, "distanceSpace": distance_space,
        "waivers": [w.to_dict() for w in rules.waivers] or None,
    })
    if attribution is not None:
        decision.update(_drop_none({"distanceScale": attribution.scale, "distancesMeaningful": attribution.meaningful,
                                    "attributionMeaningful": attribution.attribution_meaningful}))
    return declared, decision


def _files_json(files: tuple[FileDigest, ...], *, roles: bool) -> list[dict[str, Any]]:
    return [_drop_none({"name": f.path, "digest": {"sha256": f.sha256}, "role": f.role if roles else None,
                        "size": f.size if roles else None}) for f in sorted(files, key=lambda f: f.path)]


def to_json(predicate: Predicate) -> dict[str, Any]:
    """The predicate as JSON (lists sorted, None dropped, no NaN): what `actions/attest` predicate-path takes."""
    cand = predicate.candidate
    candidate: dict[str, Any] = {
        "name": cand.name, "layout": cand.layout, "format": cand.format,
        "rootDigest": {"sha256": cand.root_digest},
        "evidence": _drop_none({"features": cand.features,
                                "fileDigests": "hashed" if cand.files_hashed else "recorded"}),
        "files": _files_json(cand.files, roles=True),
    }
    if cand.weights_digest is not None:
        candidate["weightsDigest"] = {"sha256": cand.weights_digest}
    if cand.files_hashed:
        # the root digest was made in this run from the model path's files, as model_signing makes it (its
        # predicate's `serialization`); a fingerprint-only candidate listed no directory, so it claims none
        candidate["serialization"] = {"method": "files", "hashType": "sha256", "allowSymlinks": cand.allow_symlinks,
                                      "ignorePaths": list(GIT_PATHS)}
    if cand.base is not None:
        candidate["base"] = {"name": cand.base.name, "rootDigest": {"sha256": cand.base.root_digest},
                             "files": _files_json(cand.base.files, roles=False)}
    declared, decision = _rules_json(predicate.rules, predicate.distance_space, predicate.attribution)
    att = predicate.attribution
    fingerprint = predicate.fingerprint
    return _drop_none({
        "verifier": {"id": VERIFIER_ID, "version": dict(predicate.verifier_version)},
        "timeVerified": predicate.time_verified,
        "policy": _drop_none({"uri": predicate.policy_uri, "name": predicate.policy_name,
                              "digest": {"sha256": predicate.policy_sha256}}),
        "candidate": candidate,
        "fingerprint": _drop_none({
            "method": fingerprint.method, "featureVersion": fingerprint.feature_version,
            "parameters": dict(fingerprint.parameters), "digest": {"sha256": fingerprint.sha256},
            "features": {k: _finite(v, f"fingerprint.features.{k}")
                         for k, v in sorted(fingerprint.features.items())} or None,
        }),
        "declaredLineage": declared,
        "decisionRules": decision,
        "references": [_drop_none({
            "id": r.id, "family": r.family, "role": r.role, "fingerprintDigest": {"sha256": r.fingerprint_sha256},
            "distance": _finite(r.distance, f"references.{r.id}.distance"),
            "threshold": _finite(r.threshold, f"references.{r.id}.threshold"),
            "withinThreshold": r.within_threshold,
            "lineage": None if r.lineage is None else _lineage_json(r.lineage, f"references.{r.id}.lineage"),
        }) for r in sorted(predicate.references, key=lambda r: r.id)],
        "attribution": _drop_none({
            "family": att.family, "base": att.base, "distance": _finite(att.distance, "attribution.distance"),
            "margin": _finite(att.margin, "attribution.margin"),
            "threshold": _finite(att.threshold, "attribution.threshold"), "outOfCluster": att.out_of_cluster,
            "matchesDeclared": att.matches_declared,
        }),
        "verificationResult": predicate.result,
        "reasons": [_drop_none({"code": r.code, "severity": SEVERITY_OUT[r.severity], "message": r.message,
                                "subject": r.subject}) for r in sort_reasons(predicate.reasons)],
    })


def sort_reasons(reasons: tuple[Finding, ...]) -> tuple[Finding, ...]:
    """Reasons in the order an attestation lists them (by code, then subject and message)."""
    return tuple(sorted(reasons, key=lambda r: (r.code, r.subject or "", r.message)))


def subjects_json(predicate: Predicate) -> list[dict[str, Any]]:
    """One subject per attested file plus the whole-model subject (the root digest)."""
    files = sorted(predicate.candidate.files, key=lambda f: f.path)
    if not files:
        raise AttestationError("attestation: the candidate has no files to name as subjects")
    if len(files) + 1 > MAX_SUBJECTS:
        raise AttestationError(
            f"attestation: {len(files) + 1} subjects exceed the {MAX_SUBJECTS}-subject limit of actions/attest")
    subjects: list[dict[str, Any]] = [{"name": f.path, "digest": {"sha256": f.sha256}} for f in files]
    subjects.append({"name": predicate.candidate.name, "digest": {"sha256": predicate.candidate.root_digest},
                     "annotations": {ROOT_ANNOTATION: True}})
    return subjects


# ------------------------------------------------------------------------------------------- reading


class _Reader:
    """Typed access to untrusted JSON: every failure is an AttestationError naming the field path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, message: str) -> AttestationError:
        return AttestationError(f"{self.where}: {path}: {message}", file=self.where.split(": ")[0], field=path)

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected an object, got {_kind(value)}")
        return value

    def lst(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {_kind(value)}")
        return value

    def text(self, value: Any, path: str, *, choices: tuple[str, ...] | None = None, empty: bool = False) -> str:
        if not isinstance(value, str) or (not value and not empty):
            raise self.fail(path, f"expected a non-empty string, got {_kind(value)}")
        if len(value) > MAX_TEXT:
            raise self.fail(path, f"string of {len(value)} characters is over the {MAX_TEXT}-character limit")
        if choices is not None and value not in choices:
            raise self.fail(path, f"expected one of {', '.join(choices)}, got {value[:80]!r}")
        return value

    def opt_text(self, value: Any, path: str) -> str | None:
        return None if value is None else self.text(value, path)

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(path, "expected a finite number")
        return number

    def opt_number(self, value: Any, path: str) -> float | None:
        return None if value is None else self.number(value, path)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_kind(value)}")
        return value

    def digest(self, value: Any, path: str) -> str:
        sha = self.obj(value, path).get("sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise self.fail(f"{path}.sha256", "expected 64 lowercase hex digits")
        return sha

    def relpath(self, value: Any, path: str) -> str:
        name = self.text(value, path)
        pure = PurePosixPath(name)
        if "\\" in name or "\x00" in name or pure.is_absolute() or ".." in pure.parts or "." in pure.parts:
            raise self.fail(path, f"{name[:120]!r} is not a relative POSIX path inside the model")
        return name

    def count(self, value: Any, path: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**63:
            raise self.fail(path, f"expected a size in bytes, got {_kind(value)}")
        return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _files(r: _Reader, raw: Any, path: str, *, roles: bool) -> tuple[FileDigest, ...]:
    files: list[FileDigest] = []
    seen: set[str] = set()
    for n, entry in enumerate(r.lst(raw, path)):
        at = f"{path}[{n}]"
        item = r.obj(entry, at)
        name = r.relpath(item.get("name"), f"{at}.name")
        if name in seen:
            raise r.fail(at, f"duplicate file {name[:120]!r}")
        seen.add(name)
        files.append(FileDigest(path=name, sha256=r.digest(item.get("digest"), f"{at}.digest"),
                                size=r.count(item.get("size"), f"{at}.size") if roles else None,
                                role=r.opt_text(item.get("role"), f"{at}.role") if roles else None))
    return tuple(sorted(files, key=lambda f: f.path))


def _candidate(r: _Reader, raw: Any) -> CandidateRecord:
    doc = r.obj(raw, "predicate.candidate")
    files = _files(r, doc.get("files"), "predicate.candidate.files", roles=True)
    if not files:
        raise r.fail("predicate.candidate.files", "must list the attested files")
    evidence = r.obj(doc.get("evidence", {}), "predicate.candidate.evidence")
    features = evidence.get("features")
    if features is not None:
        features = r.text(features, "predicate.candidate.evidence.features", choices=("recomputed", "fingerprint"))
    digests = evidence.get("fileDigests", "hashed" if "serialization" in doc else "recorded")
    hashed = r.text(digests, "predicate.candidate.evidence.fileDigests", choices=("hashed", "recorded")) == "hashed"
    allow_symlinks = _serialization(r, doc.get("serialization"), hashed)
    weights = doc.get("weightsDigest")
    base = None
    if doc.get("base") is not None:
        record = r.obj(doc["base"], "predicate.candidate.base")
        base = BaseModelRecord(name=r.text(record.get("name"), "predicate.candidate.base.name"),
                               files=_files(r, record.get("files"), "predicate.candidate.base.files", roles=False),
                               root_digest=r.digest(record.get("rootDigest"), "predicate.candidate.base.rootDigest"))
    return CandidateRecord(name=r.text(doc.get("name"), "predicate.candidate.name"),
                           layout=r.text(doc.get("layout"), "predicate.candidate.layout"),
                           root_digest=r.digest(doc.get("rootDigest"), "predicate.candidate.rootDigest"),
                           files=files, features=features, files_hashed=hashed, base=base,  # type: ignore[arg-type]
                           format=r.text(doc.get("format", "safetensors"), "predicate.candidate.format",
                                         choices=("safetensors", "gguf")),
                           weights_digest=None if weights is None else r.digest(weights,
                                                                                "predicate.candidate.weightsDigest"),
                           allow_symlinks=allow_symlinks)


def _serialization(r: _Reader, raw: Any, hashed: bool) -> bool:
    """candidate.serialization (how the root digest was made, in model_signing's terms): its allowSymlinks.

    Only files hashed in the run can claim one; a record of digests taken from a fingerprint file cannot.
    """
    path = "predicate.candidate.serialization"
    if raw is None:
        return False
    if not hashed:
        raise r.fail(path, "recorded file digests (evidence.fileDigests: recorded) were not serialized in the run; "
                           "no serialization can be claimed for them")
    doc = r.obj(raw, path)
    r.text(doc.get("method"), f"{path}.method", choices=("files",))
    r.text(doc.get("hashType"), f"{path}.hashType", choices=("sha256",))
    for n, item in enumerate(r.lst(doc.get("ignorePaths", []), f"{path}.ignorePaths")):
        r.text(item, f"{path}.ignorePaths[{n}]")
    return r.boolean(doc.get("allowSymlinks", False), f"{path}.allowSymlinks")


def _fingerprint(r: _Reader, raw: Any) -> FingerprintRecord:
    doc = r.obj(raw, "predicate.fingerprint")
    features = r.obj(doc.get("features", {}), "predicate.fingerprint.features")
    return FingerprintRecord(
        feature_version=r.text(doc.get("featureVersion"), "predicate.fingerprint.featureVersion"),
        parameters=dict(r.obj(doc.get("parameters"), "predicate.fingerprint.parameters")),
        sha256=r.digest(doc.get("digest"), "predicate.fingerprint.digest"),
        features={r.text(k, "predicate.fingerprint.features"): r.number(v, f"predicate.fingerprint.features.{k}")
                  for k, v in features.items()})


def _rules(r: _Reader, declared_raw: Any, rules_raw: Any, ids: set[str]) -> tuple[DecisionRules, str | None]:
    declared = r.obj(declared_raw if declared_raw is not None else {}, "predicate.declaredLineage")
    doc = r.obj(rules_raw, "predicate.decisionRules")
    base = r.opt_text(declared.get("base"), "predicate.declaredLineage.base")
    family = r.opt_text(declared.get("family"), "predicate.declaredLineage.family")
    forbidden = tuple(r.text(item, f"predicate.declaredLineage.forbidden[{n}]")
                      for n, item in enumerate(r.lst(declared.get("forbidden", []), "predicate.declaredLineage"
                                                                                     ".forbidden")))
    for name, value in (("base", base), *((f"forbidden[{n}]", f) for n, f in enumerate(forbidden))):
        if value is not None and value not in ids:
            raise r.fail(f"predicate.declaredLineage.{name}", f"{value[:80]!r} is not one of the recorded references")
    if len(set(forbidden)) != len(forbidden):
        raise r.fail("predicate.declaredLineage.forbidden", "lists a reference twice")

    def action(key: str, default: str) -> str:
        return r.text(doc.get(key, default), f"predicate.decisionRules.{key}", choices=ACTIONS)

    def flag(key: str, default: bool) -> bool:
        return r.boolean(doc.get(key, default), f"predicate.decisionRules.{key}")

    rules = DecisionRules(
        declared_base=base, declared_family=family,
        declared_root=r.opt_text(doc.get("declaredBaseRoot"), "predicate.decisionRules.declaredBaseRoot"),
        forbidden=forbidden, on_out_of_cluster=action("onOutOfCluster", "fail"),  # type: ignore[arg-type]
        on_base_mismatch=action("onBaseMismatch", "warn"),  # type: ignore[arg-type]
        on_name_mismatch=action("onNameMismatch", "warn"),  # type: ignore[arg-type]
        lineage_enabled=flag("requireLineage", True),
        on_lineage_unavailable=action("lineageOnUnavailable", "warn"),  # type: ignore[arg-type]
        # attestations written before this rule existed applied every statistic and let none be outweighed
        on_statistics_disagree=action("onStatisticsDisagree", "fail"),  # type: ignore[arg-type]
        on_unexpected_tensors=action("onUnexpectedTensors", "fail"),  # type: ignore[arg-type]
        require_weights=flag("requireWeights", False),
        waivers=_waivers(r, doc.get("waivers"), ids))
    return rules, r.opt_text(doc.get("distanceSpace"), "predicate.decisionRules.distanceSpace")


def _waivers(r: _Reader, raw: Any, ids: set[str]) -> tuple[Waiver, ...]:
    """decisionRules.waivers: the policy's waivers as recorded (tg_verify/waivers.py, Waiver.to_dict)."""
    path = "predicate.decisionRules.waivers"
    waivers: list[Waiver] = []
    for n, entry in enumerate(r.lst(raw if raw is not None else [], path)):
        at = f"{path}[{n}]"
        doc = r.obj(entry, at)
        reference = r.opt_text(doc.get("reference"), f"{at}.reference")
        if reference is not None and reference not in ids:
            raise r.fail(f"{at}.reference", f"{reference[:80]!r} is not one of the recorded references")
        expires = r.text(doc.get("expires"), f"{at}.expires")
        try:
            day = _dt.date.fromisoformat(expires)
        except ValueError:
            raise r.fail(f"{at}.expires", f"expected a date YYYY-MM-DD, got {expires[:40]!r}") from None
        waiver = Waiver(code=r.text(doc.get("code"), f"{at}.code"), reason=r.text(doc.get("reason"), f"{at}.reason"),
                        expires=day, reference=reference)
        if any(w.code == waiver.code and w.reference == waiver.reference for w in waivers):
            raise r.fail(at, f"a second waiver for {waiver.code[:80]!r}")
        waivers.append(waiver)
    return tuple(waivers)


def _lineage(r: _Reader, raw: Any, path: str) -> LineageEvidence:
    doc = r.obj(raw, path)
    comparable = r.boolean(doc.get("comparable", True), f"{path}.comparable")
    method = r.opt_text(doc.get("method"), f"{path}.method")
    block_score = r.opt_number(doc.get("blockScore"), f"{path}.blockScore")
    block_threshold = r.opt_number(doc.get("blockThreshold"), f"{path}.blockThreshold")
    if (block_score is None) != (block_threshold is None):
        raise r.fail(f"{path}.blockScore", "blockScore and blockThreshold are recorded together or not at all")
    if block_score is not None and not -1.0 <= block_score <= 1.0:
        raise r.fail(f"{path}.blockScore", f"a score is in [-1, 1], got {block_score}")
    # the earlier test (no method) decided with its p-value; tgl2 states no rate where the reference is uncalibrated;
    # tgl4 may have decided on the block evidence alone (no sketch score then)
    required = (() if block_score is not None else ("score", "threshold")) if method is not None \
        else ("score", "threshold", "pValue")

    def number(key: str, default: float) -> float:
        value = doc.get(key)
        if value is None:
            if comparable and key in required:
                raise r.fail(f"{path}.{key}", "a comparable lineage test records a number here")
            return default  # not comparable: no score, threshold or rate
        return r.number(value, f"{path}.{key}")

    def rate(key: str) -> float | None:
        value = r.opt_number(doc.get(key), f"{path}.{key}")
        if value is not None and not 0.0 <= value <= 1.0:
            raise r.fail(f"{path}.{key}", f"a rate is in [0, 1], got {value}")
        return value

    null_size = doc.get("nullPairs")
    if null_size is not None and (isinstance(null_size, bool) or not isinstance(null_size, int) or null_size <= 0
                                  or null_size > 10**9):
        raise r.fail(f"{path}.nullPairs", f"expected a positive count of null pairs, got {_kind(null_size)}")
    notes = tuple(r.text(note, f"{path}.notes[{n}]", empty=True)
                  for n, note in enumerate(r.lst(doc.get("notes", []), f"{path}.notes")))
    return LineageEvidence(score=number("score", math.nan), threshold=number("threshold", math.nan),
                           p_value=number("pValue", 1.0 if method is None else math.nan),
                           false_positive_rate=number("falsePositiveRate", math.nan),
                           derived=r.boolean(doc.get("derived"), f"{path}.derived"), comparable=comparable,
                           alpha=r.opt_number(doc.get("alpha"), f"{path}.alpha"), notes=notes, method=method,
                           calibration=r.opt_text(doc.get("calibration"), f"{path}.calibration"),
                           null_size=null_size, rate=rate("rateAtScore"), rate_upper=rate("rateUpperBound95"),
                           null_scope=r.opt_text(doc.get("nullScope"), f"{path}.nullScope"),
                           block_score=block_score, block_threshold=block_threshold)


def _references(r: _Reader, raw: Any) -> tuple[ReferenceRecord, ...]:
    refs: list[ReferenceRecord] = []
    seen: set[str] = set()
    for n, entry in enumerate(r.lst(raw, "predicate.references")):
        at = f"predicate.references[{n}]"
        doc = r.obj(entry, at)
        ref_id = r.text(doc.get("id"), f"{at}.id")
        if ref_id in seen:
            raise r.fail(f"{at}.id", f"duplicate reference {ref_id[:80]!r}")
        seen.add(ref_id)
        lineage = None if doc.get("lineage") is None else _lineage(r, doc["lineage"], f"{at}.lineage")
        refs.append(ReferenceRecord(
            id=ref_id, family=r.text(doc.get("family"), f"{at}.family"),
            role=r.text(doc.get("role", "reference"), f"{at}.role", choices=("declared-base", "forbidden",
                                                                             "reference")),
            fingerprint_sha256=r.digest(doc.get("fingerprintDigest"), f"{at}.fingerprintDigest"),
            distance=r.number(doc.get("distance"), f"{at}.distance"),
            threshold=r.number(doc.get("threshold"), f"{at}.threshold"),
            within_threshold=r.boolean(doc.get("withinThreshold"), f"{at}.withinThreshold"),
            lineage=lineage))
    if not refs:
        raise r.fail("predicate.references", "must list the references the candidate was measured against")
    return tuple(sorted(refs, key=lambda ref: ref.id))


def _attribution(r: _Reader, raw: Any, rules_raw: Any, ids: set[str]) -> AttributionRecord:
    doc = r.obj(raw, "predicate.attribution")
    rules = r.obj(rules_raw, "predicate.decisionRules")
    base = r.text(doc.get("base"), "predicate.attribution.base")
    if base not in ids:
        raise r.fail("predicate.attribution.base", f"{base[:80]!r} is not one of the recorded references")
    matches = doc.get("matchesDeclared")
    return AttributionRecord(
        family=r.text(doc.get("family"), "predicate.attribution.family"), base=base,
        distance=r.number(doc.get("distance"), "predicate.attribution.distance"),
        threshold=r.number(doc.get("threshold"), "predicate.attribution.threshold"),
        out_of_cluster=r.boolean(doc.get("outOfCluster", False), "predicate.attribution.outOfCluster"),
        margin=r.opt_number(doc.get("margin"), "predicate.attribution.margin"),
        matches_declared=None if matches is None else r.boolean(matches, "predicate.attribution.matchesDeclared"),
        meaningful=r.boolean(rules.get("distancesMeaningful", True), "predicate.decisionRules.distancesMeaningful"),
        attribution_meaningful=r.boolean(rules.get("attributionMeaningful", True),
                                         "predicate.decisionRules.attributionMeaningful"),
        scale=r.opt_text(rules.get("distanceScale"), "predicate.decisionRules.distanceScale"))


def _reasons(r: _Reader, raw: Any) -> tuple[Finding, ...]:
    reasons = []
    for n, entry in enumerate(r.lst(raw if raw is not None else [], "predicate.reasons")):
        at = f"predicate.reasons[{n}]"
        doc = r.obj(entry, at)
        severity = r.text(doc.get("severity"), f"{at}.severity", choices=tuple(SEVERITY_IN))
        reasons.append(Finding(code=r.text(doc.get("code"), f"{at}.code"),
                               severity=SEVERITY_IN[severity],  # type: ignore[arg-type]
                               message=r.text(doc.get("message", ""), f"{at}.message", empty=True),
                               subject=r.opt_text(doc.get("subject"), f"{at}.subject")))
    return sort_reasons(tuple(reasons))


def _time(r: _Reader, raw: Any) -> str:
    text = r.text(raw, "predicate.timeVerified")
    try:
        parse_time(text)
    except ValueError:
        raise r.fail("predicate.timeVerified", f"expected an RFC 3339 timestamp such as 2026-01-02T03:04:05Z, "
                                               f"got {text[:40]!r}") from None
    return text


def parse_predicate(raw: Any, where: str = "<attestation>") -> Predicate:
    """Validate an untrusted predicate and return its typed form; AttestationError (exit 2) naming the field."""
    r = _Reader(where)
    doc = r.obj(raw, "predicate")
    verifier = r.obj(doc.get("verifier", {}), "predicate.verifier")
    versions = r.obj(verifier.get("version", {}), "predicate.verifier.version")
    policy = r.obj(doc.get("policy"), "predicate.policy")
    references = _references(r, doc.get("references"))
    ids = {ref.id for ref in references}
    rules, space = _rules(r, doc.get("declaredLineage"), doc.get("decisionRules", {}), ids)
    return Predicate(
        verifier_version={r.text(k, "predicate.verifier.version"): r.text(v, f"predicate.verifier.version.{k}")
                          for k, v in versions.items()},
        time_verified=_time(r, doc.get("timeVerified")),
        policy_sha256=r.digest(policy.get("digest"), "predicate.policy.digest"),
        policy_name=r.opt_text(policy.get("name"), "predicate.policy.name"),
        policy_uri=r.opt_text(policy.get("uri"), "predicate.policy.uri"),
        candidate=_candidate(r, doc.get("candidate")), fingerprint=_fingerprint(r, doc.get("fingerprint")),
        rules=rules, distance_space=space, references=references,
        attribution=_attribution(r, doc.get("attribution"), doc.get("decisionRules", {}), ids),
        result=r.text(doc.get("verificationResult"), "predicate.verificationResult",
                      choices=RESULTS),  # type: ignore[arg-type]
        reasons=_reasons(r, doc.get("reasons")))


def parse_statement(raw: Mapping[str, Any], where: str = "<attestation>") -> ParsedStatement:
    """Validate an untrusted in-toto Statement v1 carrying our predicate; AttestationError naming the field."""
    r = _Reader(where)
    if raw.get("_type") != STATEMENT_TYPE:
        raise r.fail("_type", f"must be {STATEMENT_TYPE}")
    if raw.get("predicateType") != PREDICATE_TYPE:
        raise r.fail("predicateType", f"{str(raw.get('predicateType'))[:120]!r} is not {PREDICATE_TYPE}")
    subjects_raw = r.lst(raw.get("subject"), "subject")
    if not subjects_raw:
        raise r.fail("subject", "must list at least one subject")
    subjects: list[Subject] = []
    for n, entry in enumerate(subjects_raw):
        at = f"subject[{n}]"
        doc = r.obj(entry, at)
        annotations = r.obj(doc.get("annotations") or {}, f"{at}.annotations")
        subjects.append(Subject(name=r.text(doc.get("name"), f"{at}.name", empty=True),
                                sha256=r.digest(doc.get("digest"), f"{at}.digest"),
                                root=annotations.get(ROOT_ANNOTATION) is True))
    if sum(s.root for s in subjects) > 1:
        raise r.fail("subject", f"at most one subject may carry annotations.{ROOT_ANNOTATION}")
    return ParsedStatement(subjects=tuple(subjects), predicate=parse_predicate(raw.get("predicate"), where))
