"""SARIF 2.1.0 for a verdict, so GitHub code scanning shows a FAIL as an alert on the policy file.

`verify_sarif` makes one result per failing (`error`) or warning (`warning`) finding, anchored in the
policy at the line of the reference it concerns (else the `declared:` block); a PASS has no results,
which closes earlier alerts. `attestation_sarif` does the same for `verify-attestation`, anchored in
the attestation file. Locations are relative to $GITHUB_WORKSPACE (the checkout code scanning maps
them onto) or to the working directory, under `%SRCROOT%`. Every text from an input goes through
tg_verify.escaping, and `partialFingerprints` are stable across runs so an alert is tracked, not
reopened, from one run to the next.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tg_verify.atomic import canonical_json
from tg_verify.escaping import one_line
from tg_verify.report.github import policy_line
from tg_verify.versions import VERSION

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://tg-verify.dev/"
LEVELS = {"fail": "error", "warn": "warning"}  # info and pass findings are not alerts
FINGERPRINT_KEY = "tgVerifyFinding/v1"
ATTESTATION_RULES = {"integrity": "TGV_ATTESTATION_INTEGRITY", "evidence": "TGV_ATTESTATION_EVIDENCE",
                     "result": "TGV_ATTESTATION_RESULT"}
ATTESTATION_HELP = {
    "TGV_ATTESTATION_INTEGRITY": "the model files or the policy differ from what the attestation records",
    "TGV_ATTESTATION_EVIDENCE": "the attestation's verdict does not follow from the evidence it records",
    "TGV_ATTESTATION_RESULT": "the attestation records a FAILED verification",
}


def artifact_location(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A SARIF artifactLocation: relative to the workspace (or working directory) under %SRCROOT%, else a
    file: URI. Relative URIs are percent-encoded POSIX paths, as SARIF requires."""
    env = os.environ if environ is None else environ
    absolute = Path(os.path.abspath(path))
    for base in (env.get("GITHUB_WORKSPACE"), os.getcwd()):
        if not base:
            continue
        try:
            relative = absolute.relative_to(Path(os.path.abspath(base))).as_posix()
        except ValueError:
            continue
        return {"uri": quote(relative, safe="/"), "uriBaseId": "%SRCROOT%"}
    return {"uri": absolute.as_uri()}


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _rule(rule_id: str, level: str, text: str) -> dict[str, Any]:
    return {"id": rule_id, "name": rule_id, "shortDescription": {"text": rule_id},
            "fullDescription": {"text": text},
            "help": {"text": f"{rule_id}: {text}. The reason codes are documented in docs/reasons.md of tg-verify."},
            "defaultConfiguration": {"level": level},
            "properties": {"tags": ["supply-chain", "model-lineage"]}}


def _log(rules: Sequence[dict[str, Any]], results: list[dict[str, Any]], *, automation_id: str,
         exit_code: int, properties: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [{
            "tool": {"driver": {"name": "tg-verify", "version": VERSION, "semanticVersion": VERSION,
                                "informationUri": INFORMATION_URI, "rules": list(rules)}},
            "automationDetails": {"id": automation_id},
            "originalUriBaseIds": {"%SRCROOT%": {"description": {"text": "the repository checkout"}}},
            "invocations": [{"executionSuccessful": True, "exitCode": exit_code}],
            "results": results,
            "properties": dict(properties),
        }],
    }


def verify_sarif(result: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The SARIF log of a verify run (pipeline.VerificationResult): FAIL and warning findings as results."""
    policy = result.policy
    location = artifact_location(policy.path, environ)
    declared_line = policy_line(policy.path, "declared:") or 1
    rules: dict[str, dict[str, Any]] = {}
    results = []
    for finding in result.verdict.findings:
        level = LEVELS.get(finding.severity)
        if level is None:
            continue
        code = one_line(finding.code)
        if code not in rules:
            rules[code] = _rule(code, level, "a lineage check of tg-verify's verdict "
                                             f"({'fails the verdict' if level == 'error' else 'a warning'})")
        elif level == "error":
            rules[code]["defaultConfiguration"]["level"] = "error"
        line = policy_line(policy.path, finding.subject) or declared_line
        results.append({
            "ruleId": code,
            "ruleIndex": list(rules).index(code),
            "level": level,
            "message": {"text": one_line(f"{finding.message} (candidate {result.candidate.name}, verdict "
                                         f"{result.verdict.label.upper()})")},
            "locations": [{"physicalLocation": {"artifactLocation": location, "region": {"startLine": line}}}],
            "partialFingerprints": {FINGERPRINT_KEY: _fingerprint(code, finding.subject or "", location["uri"])},
            "properties": {"subject": one_line(finding.subject or ""), "severity": finding.severity},
        })
    properties = {"verdict": result.verdict.label, "candidate": one_line(str(result.candidate.name)),
                  "rootDigest": f"sha256:{result.candidate.root_digest}",
                  "policyDigest": f"sha256:{policy.sha256}"}
    return _log(list(rules.values()), results, automation_id=f"tg-verify/{location['uri']}/",
                exit_code=result.exit_code, properties=properties)


def attestation_sarif(report: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The SARIF log of `verify-attestation` (attestation.check.AttestationReport): each failed check a result."""
    source = report.source if os.path.exists(report.source) else re.sub(r":\d+$", "", report.source)  # JSONL line
    location = artifact_location(source, environ)
    rules: dict[str, dict[str, Any]] = {}
    results = []
    for check in report.checks:
        if check.ok:
            continue
        rule_id = ATTESTATION_RULES.get(check.kind, "TGV_ATTESTATION_INTEGRITY")
        rules.setdefault(rule_id, _rule(rule_id, "error", ATTESTATION_HELP[rule_id]))
        results.append({
            "ruleId": rule_id,
            "ruleIndex": list(rules).index(rule_id),
            "level": "error",
            "message": {"text": one_line(f"{check.name}: {check.detail}")},
            "locations": [{"physicalLocation": {"artifactLocation": location, "region": {"startLine": 1}}}],
            "partialFingerprints": {FINGERPRINT_KEY: _fingerprint(rule_id, one_line(check.name), location["uri"])},
        })
    properties = {"verified": report.ok, "verificationResult": one_line(str(report.verification_result)),
                  "signaturesVerified": False}
    return _log(list(rules.values()), results, automation_id=f"tg-verify-attestation/{location['uri']}/",
                exit_code=report.exit_code, properties=properties)


def sarif_bytes(log: Mapping[str, Any]) -> bytes:
    """The SARIF log as canonical JSON (sorted keys, UTF-8, trailing newline)."""
    return canonical_json(dict(log))
