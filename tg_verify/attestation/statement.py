"""Building the attestation of a verify run: result -> Predicate (attestation/record.py) -> in-toto Statement v1.

The Statement's subjects are the candidate's files (sha256) plus one whole-model subject whose digest
is the model_signing root digest; the predicate records the rules and evidence the verdict was
decided from, so `verify-attestation` can decide again with the same procedure.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.attestation.record import (
    MAX_ATTESTATION_BYTES,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    AttributionRecord,
    CandidateRecord,
    FingerprintRecord,
    Predicate,
    ReferenceRecord,
    rounded,
    sort_reasons,
    subjects_json,
    to_json,
)
from tg_verify.errors import AttestationError
from tg_verify.versions import component_versions

if TYPE_CHECKING:
    from tg_verify.pipeline import VerificationResult


def rfc3339(moment: _dt.datetime | None = None) -> str:
    """UTC timestamp in RFC 3339 with a Z, whole seconds (in-toto Timestamp)."""
    moment = moment or _dt.datetime.now(_dt.timezone.utc)
    if moment.tzinfo is None:
        raise AttestationError("attestation: timeVerified must be timezone-aware")
    return moment.astimezone(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def predicate_of(result: VerificationResult, *, time_verified: _dt.datetime | None = None,
                 versions: Mapping[str, str] | None = None) -> Predicate:
    """What the attestation of `result` records.

    The numbers the verdict was decided on (distances, thresholds, lineage) are recorded exactly, so
    re-deciding from the record gives the same verdict even at a threshold; features and margins,
    which decide nothing, are rounded so that re-runs give the same bytes. `timeVerified` is when the run
    gathered its evidence (the day its waivers were judged on) unless `time_verified` says otherwise.
    """
    cand, cls, evidence = result.candidate, result.classification, result.evidence
    references = []
    for outcome, measured in zip(result.references, evidence.references):
        references.append(ReferenceRecord(
            id=measured.id, family=measured.family, role=outcome.role, fingerprint_sha256=outcome.fingerprint_digest,
            distance=measured.distance, threshold=measured.threshold, within_threshold=measured.within_threshold,
            lineage=measured.lineage))
    att = evidence.attribution
    declared = result.rules.declared_family
    return Predicate(
        verifier_version=dict(versions if versions is not None else component_versions()),
        time_verified=rfc3339(time_verified or result.time_verified), policy_sha256=result.policy.sha256,
        policy_name=result.policy.path.name,
        candidate=CandidateRecord(name=cand.name, layout=cand.layout, root_digest=cand.root_digest, files=cand.files,
                                  features="recomputed" if cand.files_verified else "fingerprint",
                                  files_hashed=cand.files_hashed, weights_digest=cand.weights_digest,
                                  allow_symlinks=cand.files_hashed and cand.symlinks,
                                  format=str(cand.fingerprint.artifact.get("format", "safetensors")),
                                  base=None if cand.base is None else replace(
                                      cand.base, layout=None,
                                      files=tuple(replace(f, size=None, role=None) for f in cand.base.files))),
        fingerprint=FingerprintRecord(
            feature_version=result.feature_version, parameters=json.loads(canonical_json(result.settings)),
            sha256=cand.fingerprint_digest,
            features={k: rounded(v) for k, v in sorted(cand.fingerprint.features.items())}),
        rules=result.rules, references=tuple(sorted(references, key=lambda r: r.id)),
        attribution=AttributionRecord(family=att.family, base=att.base, distance=att.distance,
                                      threshold=att.threshold, out_of_cluster=att.out_of_cluster,
                                      margin=None if cls.margin is None else rounded(cls.margin),
                                      matches_declared=None if declared is None else att.family == declared,
                                      meaningful=att.meaningful, attribution_meaningful=att.attribution_meaningful,
                                      scale=cls.scale),
        result="PASSED" if result.verdict.passed else "FAILED", reasons=sort_reasons(result.verdict.reasons),
        distance_space=str(cls.space.get("space")) if cls.space else None)


def statement_of(predicate: Predicate) -> dict[str, Any]:
    """The in-toto Statement v1 around `predicate` (subjects: the files and the root digest)."""
    statement = {"_type": STATEMENT_TYPE, "subject": subjects_json(predicate), "predicateType": PREDICATE_TYPE,
                 "predicate": to_json(predicate)}
    size = len(canonical_json(statement))
    if size > MAX_ATTESTATION_BYTES:
        raise AttestationError(f"attestation: {size} bytes is over the {MAX_ATTESTATION_BYTES}-byte limit")
    return statement


def build_statement(result: VerificationResult, *, time_verified: _dt.datetime | None = None,
                    versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The in-toto Statement v1 for a verification result."""
    return statement_of(predicate_of(result, time_verified=time_verified, versions=versions))


def write_statement(path: str | os.PathLike[str], statement: Mapping[str, Any]) -> Path:
    """Write the Statement as canonical JSON, atomically."""
    return write_bytes(path, canonical_json(statement))


def write_predicate(path: str | os.PathLike[str], statement: Mapping[str, Any]) -> Path:
    """Write the predicate alone (for `actions/attest` predicate-path / `cosign attest-blob --predicate`)."""
    return write_bytes(path, canonical_json(statement["predicate"]))
