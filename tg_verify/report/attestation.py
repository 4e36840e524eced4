"""in-toto Statement v1 for a lineage verdict: build it, write it, and read it back from any wrapper.

The predicate (type `PREDICATE_TYPE`, documented in docs/attestation.md) records what a consumer
needs to re-check the verdict offline: the policy by digest, the fingerprint method and parameters,
every reference by fingerprint digest with its distance and threshold, attribution, lineage
evidence, the decision rules, and the result with reason codes. Subjects are the model's files
(sha256) plus one whole-model subject whose digest is the digest model_signing signs for the model
directory (artifact/digest.py).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tg_verify.artifact.digest import GIT_PATHS
from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.errors import AttestationError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://tg-verify.dev/attestation/model-lineage/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
VERIFIER_ID = "https://tg-verify.dev/verifier/tg-verify"
FINGERPRINT_METHOD = "https://tg-verify.dev/fingerprint/tensorguard"
ROOT_ANNOTATION = "tgVerifyRootDigest"
MAX_ATTESTATION_BYTES = 16 * 1024 * 1024  # actions/attest's predicate limit; also our read cap
MAX_SUBJECTS = 1024  # actions/attest's subject limit
SIGNIFICANT_DIGITS = 10  # floats are rounded so the same evidence always gives the same bytes
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("tg-verify", "tg-verify"), ("torch", "torch"), ("safetensors", "safetensors"),
    ("transformers", "transformers"), ("peft", "peft"), ("scikit-learn", "sklearn"), ("numpy", "numpy"),
)
RESULTS = ("PASSED", "FAILED")
OTHER_ROLE = "other"  # a file hashed for the root digest (model_signing's file set) but not read for the verdict
SEVERITIES = ("error", "warning", "info")


# ---------------------------------------------------------------------------------------------
# The evidence an attestation records. pipeline.VerificationResult is converted into this by
# `evidence_from_result`, so the Statement's shape does not move when the result object does.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubjectFile:
    """One artifact file: POSIX path relative to the model root, its sha256 and role."""

    path: str
    sha256: str
    size: int | None = None
    role: str | None = None


@dataclass(frozen=True)
class LineageEvidence:
    """The lineage test of the candidate against one reference (issue 6)."""

    score: float
    threshold: float
    derived: bool
    p_value: float | None = None
    false_positive_rate: float | None = None
    method: str | None = None
    alpha: float | None = None  # derived iff comparable and p_value <= alpha and score >= threshold
    comparable: bool = True


@dataclass(frozen=True)
class ReferenceEvidence:
    """One reference the candidate was measured against. `role`: declared-base | forbidden | reference."""

    id: str
    family: str | None
    fingerprint_sha256: str
    distance: float
    threshold: float
    role: str = "reference"
    lineage: LineageEvidence | None = None


@dataclass(frozen=True)
class AttributionEvidence:
    """Nearest-centroid family attribution of the candidate."""

    family: str | None
    base: str | None = None
    distance: float | None = None
    margin: float | None = None
    threshold: float | None = None
    out_of_cluster: bool = False


@dataclass(frozen=True)
class Reason:
    """One verdict reason: machine code, severity (error fails the verdict), and a sentence."""

    code: str
    severity: str
    message: str
    subject: str | None = None  # the reference id the reason concerns, if any


@dataclass(frozen=True)
class AttestationEvidence:
    """Everything a Statement records, independent of how the verify pipeline holds it."""

    model_name: str
    layout: str
    files: tuple[SubjectFile, ...]
    policy_sha256: str
    policy_name: str
    fingerprint_sha256: str
    fingerprint_settings: Mapping[str, Any]
    feature_version: str
    verdict: str  # "pass" | "fail"
    reasons: tuple[Reason, ...]
    references: tuple[ReferenceEvidence, ...] = ()
    attribution: AttributionEvidence | None = None
    declared_base: str | None = None
    declared_family: str | None = None
    forbidden: tuple[str, ...] = ()
    on_out_of_cluster: str = "fail"
    require_lineage: bool = True
    features: Mapping[str, float] = field(default_factory=dict)
    distance_space: str | None = None
    policy_uri: str | None = None
    base_files: tuple[SubjectFile, ...] = ()  # adapters: the base the adapter was merged onto
    base_name: str | None = None
    # Further policy rules the verdict applied (onBaseMismatch, onNameMismatch, lineageOnUnavailable, ...),
    # recorded so a consumer can re-derive every reason code.
    decision_rules: Mapping[str, Any] = field(default_factory=dict)
    allow_symlinks: bool = False  # some file was read through a symbolic link (recorded as it was read)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def _number(value: float | None) -> float | None:
    """Round to SIGNIFICANT_DIGITS so re-runs give identical bytes; refuse NaN/Inf."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise AttestationError(f"attestation: non-finite number {value} cannot be recorded")
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


def component_versions() -> dict[str, str]:
    """Installed versions of tg-verify and the libraries that shape a verdict (VSA `verifier.version`)."""
    versions: dict[str, str] = {}
    for dist, key in COMPONENTS:
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if key == "tg-verify":
                from tg_verify import __version__
                versions[key] = __version__
    return versions


def rfc3339(moment: _dt.datetime | None = None) -> str:
    """UTC timestamp in RFC 3339 with a Z, whole seconds (in-toto Timestamp)."""
    moment = moment or _dt.datetime.now(_dt.timezone.utc)
    if moment.tzinfo is None:
        raise AttestationError("attestation: timeVerified must be timezone-aware")
    return moment.astimezone(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def subject_files(artifact: Any, digests: Mapping[str, str]) -> tuple[SubjectFile, ...]:
    """The artifact's files as subjects: path, sha256 (from `digests`, keyed by path), size and role."""
    missing = [f.path for f in artifact.files if f.path not in digests]
    if missing:
        raise AttestationError(f"attestation: no sha256 recorded for {', '.join(missing)}")
    return tuple(SubjectFile(f.path, digests[f.path], f.size, f.role) for f in artifact.files)


def root_digest_of(files: Sequence[SubjectFile]) -> str:
    """The model_signing root digest over `files` (sha256 of raw digests sorted by path)."""
    from tg_verify.artifact import root_digest
    return root_digest({f.path: f.sha256 for f in files})


def _lineage(evidence: LineageEvidence | None) -> dict[str, Any] | None:
    if evidence is None:
        return None
    return _drop_none({
        "method": evidence.method, "score": _number(evidence.score), "threshold": _number(evidence.threshold),
        "pValue": _number(evidence.p_value), "falsePositiveRate": _number(evidence.false_positive_rate),
        "alpha": _number(evidence.alpha), "comparable": bool(evidence.comparable), "derived": bool(evidence.derived),
    })


def _reference(ref: ReferenceEvidence) -> dict[str, Any]:
    distance, threshold = _number(ref.distance), _number(ref.threshold)
    return _drop_none({
        "id": ref.id, "family": ref.family, "role": ref.role,
        "fingerprintDigest": {"sha256": ref.fingerprint_sha256},
        "distance": distance, "threshold": threshold,
        "withinThreshold": bool(distance is not None and threshold is not None and distance <= threshold),
        "lineage": _lineage(ref.lineage),
    })


def _attribution(attr: AttributionEvidence | None, declared_family: str | None) -> dict[str, Any] | None:
    if attr is None:
        return None
    return _drop_none({
        "family": attr.family, "base": attr.base, "distance": _number(attr.distance),
        "margin": _number(attr.margin), "threshold": _number(attr.threshold),
        "outOfCluster": bool(attr.out_of_cluster),
        "matchesDeclared": (attr.family == declared_family) if declared_family is not None else None,
    })


def _subjects(evidence: AttestationEvidence) -> list[dict[str, Any]]:
    files = sorted(evidence.files, key=lambda f: f.path)
    if not files:
        raise AttestationError("attestation: the candidate has no files to name as subjects")
    if len(files) + 1 > MAX_SUBJECTS:
        raise AttestationError(
            f"attestation: {len(files) + 1} subjects exceed the {MAX_SUBJECTS}-subject limit of actions/attest")
    subjects: list[dict[str, Any]] = [{"name": f.path, "digest": {"sha256": f.sha256}} for f in files]
    subjects.append({"name": evidence.model_name, "digest": {"sha256": root_digest_of(files)},
                     "annotations": {ROOT_ANNOTATION: True}})
    return subjects


def build_predicate(evidence: AttestationEvidence, *, time_verified: _dt.datetime | None = None,
                    versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The predicate alone (what `actions/attest` predicate-path and `cosign attest-blob` take)."""
    if evidence.verdict not in ("pass", "fail"):
        raise AttestationError(f"attestation: verdict must be 'pass' or 'fail', got {evidence.verdict!r}")
    files = sorted(evidence.files, key=lambda f: f.path)
    candidate: dict[str, Any] = {
        "name": evidence.model_name,
        "layout": evidence.layout,
        "format": "safetensors",
        "rootDigest": {"sha256": root_digest_of(files)},
        # the same construction over the files the fingerprint was computed from (role other than "other")
        "weightsDigest": {"sha256": root_digest_of([f for f in files if f.role != OTHER_ROLE])},
        # how rootDigest was made, in model_signing's terms (its predicate's `serialization`)
        "serialization": {"method": "files", "hashType": "sha256", "allowSymlinks": bool(evidence.allow_symlinks),
                          "ignorePaths": list(GIT_PATHS)},
        "files": [_drop_none({"name": f.path, "digest": {"sha256": f.sha256}, "role": f.role, "size": f.size})
                  for f in files],
    }
    if evidence.base_files:
        base_files = sorted(evidence.base_files, key=lambda f: f.path)
        candidate["base"] = {
            "name": evidence.base_name or "base",
            "rootDigest": {"sha256": root_digest_of(base_files)},
            "files": [{"name": f.path, "digest": {"sha256": f.sha256}} for f in base_files],
        }
    references = sorted((_reference(r) for r in evidence.references), key=lambda r: r["id"])
    predicate: dict[str, Any] = {
        "verifier": {"id": VERIFIER_ID, "version": dict(versions if versions is not None else component_versions())},
        "timeVerified": rfc3339(time_verified),
        "policy": _drop_none({"uri": evidence.policy_uri, "name": evidence.policy_name,
                              "digest": {"sha256": evidence.policy_sha256}}),
        "candidate": candidate,
        "fingerprint": _drop_none({
            "method": f"{FINGERPRINT_METHOD}/{evidence.feature_version}",
            "featureVersion": evidence.feature_version,
            "parameters": json.loads(canonical_json(dict(evidence.fingerprint_settings))),
            "digest": {"sha256": evidence.fingerprint_sha256},
            "features": {k: _number(v) for k, v in sorted(evidence.features.items())} or None,
        }),
        "declaredLineage": _drop_none({"base": evidence.declared_base, "family": evidence.declared_family,
                                       "forbidden": sorted(evidence.forbidden)}),
        "decisionRules": _drop_none({**json.loads(canonical_json(dict(evidence.decision_rules))),
                                     "onOutOfCluster": evidence.on_out_of_cluster,
                                     "requireLineage": bool(evidence.require_lineage),
                                     "distanceSpace": evidence.distance_space}),
        "references": references,
        "attribution": _attribution(evidence.attribution, evidence.declared_family),
        "verificationResult": "PASSED" if evidence.verdict == "pass" else "FAILED",
        "reasons": sorted((_drop_none({"code": r.code, "severity": r.severity, "message": r.message,
                                       "subject": r.subject}) for r in evidence.reasons),
                          key=lambda r: (r["code"], r.get("subject") or "", r["message"])),
    }
    return _drop_none(predicate)


def build_statement(result: Any, *, time_verified: _dt.datetime | None = None,
                    versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The in-toto Statement v1 for a verification result (or an `AttestationEvidence`)."""
    evidence = result if isinstance(result, AttestationEvidence) else evidence_from_result(result)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": _subjects(evidence),
        "predicateType": PREDICATE_TYPE,
        "predicate": build_predicate(evidence, time_verified=time_verified, versions=versions),
    }
    size = len(canonical_json(statement))
    if size > MAX_ATTESTATION_BYTES:
        raise AttestationError(f"attestation: {size} bytes is over the {MAX_ATTESTATION_BYTES}-byte limit")
    return statement


def write_statement(path: str | os.PathLike[str], statement: Mapping[str, Any]) -> Path:
    """Write the Statement as canonical JSON, atomically."""
    return write_bytes(path, canonical_json(statement))


def write_predicate(path: str | os.PathLike[str], statement: Mapping[str, Any]) -> Path:
    """Write the predicate alone (for `actions/attest` predicate-path / `cosign attest-blob --predicate`)."""
    return write_bytes(path, canonical_json(statement["predicate"]))


# ---------------------------------------------------------------------------------------------
# VerificationResult -> AttestationEvidence
# ---------------------------------------------------------------------------------------------

def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def evidence_from_result(result: Any) -> AttestationEvidence:
    """Convert pipeline.VerificationResult into the evidence the Statement records."""
    converter = getattr(result, "attestation_evidence", None)
    if callable(converter):
        evidence = converter()
        if isinstance(evidence, AttestationEvidence):
            return evidence
    raise AttestationError(
        f"attestation: cannot build a Statement from {type(result).__name__}; expected AttestationEvidence "
        "or an object with attestation_evidence()")


# ---------------------------------------------------------------------------------------------
# Reading: bare Statement, DSSE envelope, Sigstore bundle, JSON Lines of those
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedStatement:
    """A Statement read from a file, with the wrapper it came in (signatures are NOT verified here)."""

    statement: dict[str, Any]
    wrapper: str  # statement | dsse | sigstore-bundle
    source: str


def _b64decode(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise AttestationError(f"{where}: payload must be a base64 string")
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationError(f"{where}: payload is not valid base64") from None


def _loads(data: bytes | str, where: str) -> Any:
    def reject_constant(value: str) -> Any:
        raise AttestationError(f"{where}: non-finite number {value} is not allowed")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            raise AttestationError(f"{where}: duplicate JSON key {dupes[0]!r}")
        return dict(pairs)

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=reject_constant, object_pairs_hook=no_duplicates)
    except AttestationError:
        raise
    except UnicodeDecodeError:
        raise AttestationError(f"{where}: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise AttestationError(f"{where}: not valid JSON ({str(exc)[:120]})") from None


def _unwrap(document: Any, where: str) -> tuple[dict[str, Any], str]:
    """Peel a Sigstore bundle / GitHub API record / DSSE envelope down to the Statement."""
    if not isinstance(document, dict):
        raise AttestationError(f"{where}: expected a JSON object")
    if "bundle" in document and isinstance(document["bundle"], dict):  # GitHub attestations API record
        document = document["bundle"]
    if "dsseEnvelope" in document:  # Sigstore bundle (v0.1-v0.3)
        statement, _ = _unwrap(document["dsseEnvelope"], f"{where}: dsseEnvelope")
        return statement, "sigstore-bundle"
    if "payload" in document and "payloadType" in document:  # DSSE envelope
        payload_type = document["payloadType"]
        if not isinstance(payload_type, str) or not payload_type.startswith("application/vnd.in-toto"):
            raise AttestationError(f"{where}: payloadType {payload_type!r} is not an in-toto payload")
        if not isinstance(document.get("signatures"), list):
            raise AttestationError(f"{where}: DSSE envelope has no 'signatures' list")
        statement = _loads(_b64decode(document["payload"], where), f"{where}: payload")
        if not isinstance(statement, dict):
            raise AttestationError(f"{where}: payload is not a JSON object")
        return statement, "dsse"
    if "_type" in document:
        return document, "statement"
    raise AttestationError(f"{where}: neither an in-toto Statement, a DSSE envelope nor a Sigstore bundle")


def parse_attestation(data: bytes, source: str = "<attestation>") -> LoadedStatement:
    """Find our Statement in `data`: a Statement, DSSE envelope, Sigstore bundle, or JSON Lines of those."""
    if len(data) > MAX_ATTESTATION_BYTES * 2:
        raise AttestationError(f"{source}: {len(data)} bytes is over the attestation size limit")
    stripped = data.strip()
    if not stripped:
        raise AttestationError(f"{source}: file is empty")
    try:
        documents = [(_loads(stripped, source), source)]
    except AttestationError:
        lines = [line for line in stripped.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        documents = [(_loads(line, f"{source}:{n}"), f"{source}:{n}") for n, line in enumerate(lines, 1)]
    found = []
    for document, where in documents:
        statement, wrapper = _unwrap(document, where)
        if len(documents) == 1 or statement.get("predicateType") == PREDICATE_TYPE:
            found.append(LoadedStatement(statement, wrapper, where))
    if not found:
        raise AttestationError(f"{source}: no Statement with predicateType {PREDICATE_TYPE}")
    if len({canonical_json(f.statement) for f in found}) > 1:
        raise AttestationError(
            f"{source}: holds {len(found)} different tg-verify Statements; pass a file with exactly one")
    return found[0]


def load_attestation(path: str | os.PathLike[str]) -> LoadedStatement:
    """Read an attestation file (see `parse_attestation`) as untrusted input."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_ATTESTATION_BYTES * 2:
            raise AttestationError(f"{path}: {size} bytes is over the attestation size limit")
        data = path.read_bytes()
    except AttestationError:
        raise
    except OSError as exc:
        raise AttestationError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_attestation(data, str(path))
