"""Offline check of a tg-verify attestation against a model directory (and optionally the policy).

Recomputes every file digest and the model_signing root digest, compares the policy digest, and
re-derives the verdict from the evidence the predicate records (distances vs thresholds, lineage
decisions, attribution, reason codes). Signatures are not verified here: that is cosign's or
`gh attestation verify`'s job.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tg_verify.artifact import Artifact, ArtifactFile, file_digests, resolve, root_digest
from tg_verify.artifact.digest import model_files
from tg_verify.errors import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, ArtifactError, AttestationError, InputError
from tg_verify.report.attestation import (
    OTHER_ROLE,
    PREDICATE_TYPE,
    RESULTS,
    ROOT_ANNOTATION,
    SEVERITIES,
    STATEMENT_TYPE,
    LoadedStatement,
)
from tg_verify.waivers import WAIVER_EXPIRED, from_records

# Reason codes the predicate's evidence fully determines (mirroring tg_verify.verdict.decide); any
# other recorded code (adapter name mismatch, artifact warnings, caveats) is taken as recorded: it
# can only add reasons, never turn FAILED into PASSED.
DISTANCE_ABOVE_THRESHOLD = "TGV_DISTANCE_ABOVE_THRESHOLD"
FAMILY_MISMATCH = "TGV_FAMILY_MISMATCH"
OUT_OF_CLUSTER = "TGV_OUT_OF_CLUSTER"
NEAREST_BASE_DIFFERS = "TGV_NEAREST_BASE_DIFFERS"
FORBIDDEN_MATCH = "TGV_FORBIDDEN_MATCH"
FORBIDDEN_LINEAGE = "TGV_FORBIDDEN_LINEAGE"
LINEAGE_NOT_ESTABLISHED = "TGV_LINEAGE_NOT_ESTABLISHED"
LINEAGE_UNAVAILABLE = "TGV_LINEAGE_UNAVAILABLE"
LINEAGE_CONTRADICTS_FAMILY = "TGV_LINEAGE_CONTRADICTS_FAMILY"
LINEAGE_DISABLED = "TGV_LINEAGE_DISABLED"
STATISTICS_NOT_MEANINGFUL = "TGV_STATISTICS_NOT_MEANINGFUL"
DERIVABLE_CODES = frozenset({DISTANCE_ABOVE_THRESHOLD, FAMILY_MISMATCH, OUT_OF_CLUSTER, NEAREST_BASE_DIFFERS,
                             FORBIDDEN_MATCH, FORBIDDEN_LINEAGE, LINEAGE_NOT_ESTABLISHED, LINEAGE_UNAVAILABLE,
                             LINEAGE_CONTRADICTS_FAMILY, LINEAGE_DISABLED, STATISTICS_NOT_MEANINGFUL})
# Policy actions (fail | warn) as the predicate's reason severities.
_SEVERITY = {"fail": "error", "warn": "warning", "info": "info"}

# Check kinds, in order of gravity: integrity (files, policy: tampering -> exit 2), evidence (the
# recorded verdict does not follow from the recorded numbers -> exit 1), result (FAILED -> exit 1).
INTEGRITY, EVIDENCE, RESULT = "integrity", "evidence", "result"


@dataclass(frozen=True)
class Check:
    """One comparison: what was checked, whether it held, and the detail a reviewer needs."""

    kind: str
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class AttestationReport:
    """All checks of one attestation; `exit_code` is 0 only when every check holds and it PASSED."""

    source: str
    wrapper: str
    model: str
    verification_result: str
    checks: list[Check] = field(default_factory=list)
    has_base: bool = False  # an adapter whose base model is recorded

    @property
    def exit_code(self) -> int:
        if any(not c.ok and c.kind == INTEGRITY for c in self.checks):
            return EXIT_BAD_INPUT
        if any(not c.ok for c in self.checks):
            return EXIT_FAIL
        return EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "attestation": self.source, "wrapper": self.wrapper, "model": self.model,
            "predicateType": PREDICATE_TYPE, "verificationResult": self.verification_result,
            "ok": self.ok, "exitCode": self.exit_code, "signaturesVerified": False, "recordsBaseModel": self.has_base,
            "checks": [c.to_dict() for c in self.checks],
        }


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------

def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise AttestationError(f"{where}: {message}")


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _safe_relpath(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "." not in path.parts


def validate_statement(statement: Mapping[str, Any], where: str) -> None:
    """Check the in-toto Statement v1 structure and our predicate's required fields; raise on the first fault."""
    _require(statement.get("_type") == STATEMENT_TYPE, where, f"_type must be {STATEMENT_TYPE}")
    _require(statement.get("predicateType") == PREDICATE_TYPE, where,
             f"predicateType {statement.get('predicateType')!r} is not {PREDICATE_TYPE}")
    subjects = statement.get("subject")
    _require(isinstance(subjects, list) and len(subjects) >= 1, where, "subject must be a non-empty list")
    roots = 0
    for n, subject in enumerate(subjects):
        at = f"{where}: subject[{n}]"
        _require(isinstance(subject, dict), at, "must be an object")
        _require(isinstance(subject.get("name"), str), at, "name must be a string")
        _require(isinstance(subject.get("digest"), dict) and _is_hex64(subject["digest"].get("sha256")), at,
                 "digest.sha256 must be 64 lowercase hex digits")
        annotations = subject.get("annotations") or {}
        _require(isinstance(annotations, dict), at, "annotations must be an object")
        roots += annotations.get(ROOT_ANNOTATION) is True
    _require(roots <= 1, where, f"at most one subject may carry annotations.{ROOT_ANNOTATION}")
    predicate = statement.get("predicate")
    _require(isinstance(predicate, dict), where, "predicate must be an object")
    at = f"{where}: predicate"
    _require(predicate.get("verificationResult") in RESULTS, at, "verificationResult must be PASSED or FAILED")
    policy = predicate.get("policy")
    _require(isinstance(policy, dict) and isinstance(policy.get("digest"), dict)
             and _is_hex64(policy["digest"].get("sha256")), at, "policy.digest.sha256 is missing or malformed")
    candidate = predicate.get("candidate")
    _require(isinstance(candidate, dict) and isinstance(candidate.get("rootDigest"), dict)
             and _is_hex64(candidate["rootDigest"].get("sha256")), at, "candidate.rootDigest.sha256 is missing")
    files = candidate.get("files")
    _require(isinstance(files, list) and len(files) >= 1, at, "candidate.files must list the attested files")
    names: set[str] = set()
    for n, entry in enumerate(files):
        fat = f"{at}.candidate.files[{n}]"
        _require(isinstance(entry, dict) and _safe_relpath(entry.get("name")), fat,
                 f"name {entry.get('name') if isinstance(entry, dict) else entry!r} is not a relative POSIX path "
                 "inside the model")
        _require(isinstance(entry.get("digest"), dict) and _is_hex64(entry["digest"].get("sha256")), fat,
                 "digest.sha256 must be 64 lowercase hex digits")
        _require(entry["name"] not in names, fat, f"duplicate file {entry['name']!r}")
        names.add(entry["name"])
    fingerprint = predicate.get("fingerprint")
    _require(isinstance(fingerprint, dict) and isinstance(fingerprint.get("digest"), dict)
             and _is_hex64(fingerprint["digest"].get("sha256")), at, "fingerprint.digest.sha256 is missing")
    _require(isinstance(fingerprint.get("parameters"), dict), at, "fingerprint.parameters must be an object")
    _require(isinstance(predicate.get("timeVerified"), str), at, "timeVerified must be an RFC 3339 string")
    references = predicate.get("references", [])
    _require(isinstance(references, list), at, "references must be a list")
    for n, ref in enumerate(references):
        rat = f"{at}.references[{n}]"
        _require(isinstance(ref, dict) and isinstance(ref.get("id"), str), rat, "must be an object with an id")
        _require(_is_number(ref.get("distance")) and _is_number(ref.get("threshold")), rat,
                 "distance and threshold must be numbers")
        _require(isinstance(ref.get("withinThreshold"), bool), rat, "withinThreshold must be true or false")
        _require(isinstance(ref.get("fingerprintDigest"), dict) and _is_hex64(ref["fingerprintDigest"].get("sha256")),
                 rat, "fingerprintDigest.sha256 is missing or malformed")
        lineage = ref.get("lineage")
        if lineage is not None:
            _require(isinstance(lineage, dict) and _is_number(lineage.get("score"))
                     and _is_number(lineage.get("threshold")) and isinstance(lineage.get("derived"), bool),
                     rat, "lineage needs numeric score and threshold and a boolean derived")
    reasons = predicate.get("reasons", [])
    _require(isinstance(reasons, list) and all(
        isinstance(r, dict) and isinstance(r.get("code"), str) and r.get("severity") in SEVERITIES
        for r in reasons), at, "reasons must be a list of {code, severity, message}")
    attribution = predicate.get("attribution")
    _require(attribution is None or isinstance(attribution, dict), at, "attribution must be an object")


# ---------------------------------------------------------------------------------------------
# Integrity: files and policy
# ---------------------------------------------------------------------------------------------

def _model_root(model: Path) -> tuple[Path, Artifact | None, str | None]:
    """The directory subject names are relative to, the resolved artifact, and why resolving failed."""
    root = model.parent if model.is_file() else model
    try:
        return root, resolve(model), None
    except ArtifactError as exc:
        return root, None, str(exc)


def _hash_files(root: Path, names: list[str], progress: Callable[[int], None] | None,
                allow_symlinks: bool = False) -> tuple[dict[str, str | None], set[str]]:
    """sha256 of each named file under root (None when it is missing or not a regular file), and the names that
    are reached through a symbolic link although the attestation says none were (`allow_symlinks` false).

    Symbolic links are followed exactly when the attestation records `allowSymlinks: true` (a model read from a
    Hugging Face cache), as the verify run read them; model_signing refuses them otherwise, and so does this.
    """
    present: list[ArtifactFile] = []
    found: dict[str, str | None] = {}
    refused: set[str] = set()
    for name in names:
        path = root / name
        linked = any(p.is_symlink() for p in (path, *path.parents) if p == root or root in p.parents)
        try:
            info = os.stat(path) if allow_symlinks or not linked else os.lstat(path)
        except OSError:
            found[name] = None
            continue
        if linked and not allow_symlinks:
            found[name] = None
            refused.add(name)
            continue
        if not stat.S_ISREG(info.st_mode):
            found[name] = None
            continue
        present.append(ArtifactFile(name, info.st_size, "weights"))
    if present:
        shell = Artifact(root=root, name=root.name, layout="single", files=tuple(present), tensors=())
        found.update(file_digests(shell, progress))
    return found, refused


def recorded_files(predicate: Mapping[str, Any]) -> dict[str, str]:
    """The attested files (relative path -> sha256) from predicate.candidate.files."""
    return {f["name"]: f["digest"]["sha256"] for f in predicate["candidate"]["files"]}


def _roles(predicate: Mapping[str, Any]) -> dict[str, str]:
    return {f["name"]: str(f.get("role") or "") for f in predicate["candidate"]["files"]}


def _check_subjects(statement: Mapping[str, Any], files: Mapping[str, str], root: str,
                    roles: Mapping[str, str]) -> list[Check]:
    """Every subject is an attested file, the model's root digest, or reported as outside the verdict.

    tg-verify's own Statement names files by relative path and adds the root subject; a Statement made by
    actions/attest around our predicate names them by basename, or as written in a subject-checksums file,
    and has no root subject. The predicate says which files are evidence (a role other than `other`) and
    which were hashed for the root digest only. A subject the predicate does not list is signed but not
    covered by the verdict: reported, never fatal. A subject named like an attested file with another digest
    contradicts the predicate: fatal.
    """
    checks: list[Check] = []
    for subject in statement["subject"]:
        name, digest = subject["name"], subject["digest"]["sha256"]
        if (subject.get("annotations") or {}).get(ROOT_ANNOTATION) or (digest == root and name not in files):
            ok = digest == root
            detail = f"whole-model subject {name!r}: sha256 {digest}" + ("" if ok else f", predicate records {root}")
            checks.append(Check(INTEGRITY, "root subject", ok, detail))
            continue
        named = [path for path in files if path == name or PurePosixPath(path).name == name]
        matches = [path for path in named if files[path] == digest]
        if matches:
            role = roles.get(matches[0]) or "unknown"
            what = ("hashed for the root digest only, not read for the verdict" if role == OTHER_ROLE
                    else f"evidence (role {role})")
            checks.append(Check(INTEGRITY, f"subject {name}", True, f"attested file {matches[0]}: {what}"))
        elif named:
            checks.append(Check(INTEGRITY, f"subject {name}", False,
                                f"sha256 {digest} differs from the attested file {named[0]} ({files[named[0]]})"))
        else:
            checks.append(Check(INTEGRITY, f"subject {name}", True,
                                f"not in the predicate's files: signed, but the verdict says nothing about it "
                                f"(sha256 {digest}; reported, not fatal)"))
    return checks


def check_files(statement: Mapping[str, Any], model: Path,
                progress: Callable[[int], None] | None = None) -> list[Check]:
    """Recompute every attested file's digest from disk, name missing/extra/changed files, check the root digest."""
    checks: list[Check] = []
    predicate = statement["predicate"]
    files = recorded_files(predicate)
    recorded_root = root_digest(files)
    predicate_root = predicate["candidate"]["rootDigest"]["sha256"]
    checks.append(Check(INTEGRITY, "root digest (recorded)", predicate_root == recorded_root,
                        f"predicate.candidate.rootDigest {predicate_root}, computed from the attested files "
                        f"{recorded_root}"))
    checks.extend(_check_subjects(statement, files, predicate_root, _roles(predicate)))
    root, artifact, problem = _model_root(model)
    if problem is not None:
        checks.append(Check(INTEGRITY, "artifact resolves", False, problem))
    serialization = predicate["candidate"].get("serialization")
    allow = isinstance(serialization, dict) and serialization.get("allowSymlinks") is True
    on_disk, refused = _hash_files(root, sorted(files), progress, allow)
    for name in sorted(files):
        actual = on_disk.get(name)
        if name in refused:
            checks.append(Check(INTEGRITY, f"file {name}", False,
                                f"{root / name} is reached through a symbolic link, but the attestation records "
                                "allowSymlinks: false (its files were not read through links)"))
        elif actual is None:
            checks.append(Check(INTEGRITY, f"file {name}", False, f"missing: {root / name} is not a regular file"))
        elif actual != files[name]:
            checks.append(Check(INTEGRITY, f"file {name}", False,
                                f"sha256 mismatch: attested {files[name]}, found {actual}"))
        else:
            checks.append(Check(INTEGRITY, f"file {name}", True, f"sha256 {actual}"))
    if artifact is not None:
        for name in sorted(f.path for f in artifact.files if f.path not in files):
            checks.append(Check(INTEGRITY, f"file {name}", False,
                                "extra: part of the model on disk but not attested"))
    if all(on_disk.get(name) for name in files):
        disk_root = root_digest({name: on_disk[name] or "" for name in files})
        checks.append(Check(INTEGRITY, "root digest (disk)", disk_root == predicate_root,
                            f"the attested files as found in {root}: sha256:{disk_root}"))
    checks.extend(_unattested_files(root, files, artifact))
    return checks


def _unattested_files(root: Path, files: Mapping[str, str], artifact: Artifact | None) -> list[Check]:
    """Files model_signing would hash in the directory now that the attestation does not list and tg-verify
    does not read (a README added later): reported, since the directory's model_signing digest moved."""
    if not root.is_dir() or artifact is None:
        return []
    try:
        listed = model_files(root)
    except InputError:
        return []
    read = {f.path for f in artifact.files}
    return [Check(INTEGRITY, f"file {entry.path}", True,
                  "not attested and not read by tg-verify: the directory's model_signing digest now differs from "
                  "the attested root digest (reported, not fatal)")
            for entry in listed if entry.path not in files and entry.path not in read]


def check_base(predicate: Mapping[str, Any], base: Path,
               progress: Callable[[int], None] | None = None) -> list[Check]:
    """An adapter's base model (predicate.candidate.base) against the base directory on disk."""
    recorded = predicate["candidate"].get("base")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), list):
        return [Check(INTEGRITY, "base model", False, "--base was given but the attestation records no base model "
                                                     "(the candidate is not an adapter)")]
    files: dict[str, str] = {}
    for entry in recorded["files"]:
        if not (isinstance(entry, dict) and _safe_relpath(entry.get("name")) and isinstance(entry.get("digest"), dict)
                and _is_hex64(entry["digest"].get("sha256"))):
            raise AttestationError(f"predicate.candidate.base.files: malformed entry {entry!r}")
        files[entry["name"]] = entry["digest"]["sha256"]
    root = base.parent if base.is_file() else base
    serialization = predicate["candidate"].get("serialization")
    on_disk, _ = _hash_files(root, sorted(files), progress,
                             isinstance(serialization, dict) and serialization.get("allowSymlinks") is True)
    checks = []
    for name in sorted(files):
        actual = on_disk.get(name)
        ok = actual == files[name]
        detail = f"sha256 {actual}" if ok else ("missing" if actual is None else
                                                 f"sha256 mismatch: attested {files[name]}, found {actual}")
        checks.append(Check(INTEGRITY, f"base file {name}", ok, detail))
    return checks


def check_policy(statement: Mapping[str, Any], policy: Path) -> Check:
    """The policy file's sha256 against predicate.policy.digest."""
    try:
        actual = hashlib.sha256(policy.read_bytes()).hexdigest()
    except OSError as exc:
        raise InputError(f"{policy}: cannot read the policy ({exc.strerror or exc})") from exc
    recorded = statement["predicate"]["policy"]["digest"]["sha256"]
    if actual == recorded:
        return Check(INTEGRITY, "policy digest", True, f"{policy} sha256 {actual}")
    return Check(INTEGRITY, "policy digest", False,
                 f"{policy} sha256 {actual} differs from the attested policy {recorded}")


# ---------------------------------------------------------------------------------------------
# Evidence: re-derive the verdict from the recorded numbers
# ---------------------------------------------------------------------------------------------

def derive_reasons(predicate: Mapping[str, Any]) -> dict[str, str]:
    """Reason code -> severity that the recorded evidence implies, for the codes evidence determines.

    The same rules as tg_verify.verdict.decide, applied to the numbers and rules the predicate records.
    """
    declared = predicate.get("declaredLineage") or {}
    rules = predicate.get("decisionRules") or {}
    refs = {ref["id"]: ref for ref in predicate.get("references", [])}
    base, family = declared.get("base"), declared.get("family")
    forbidden = list(declared.get("forbidden") or [])
    attribution = predicate.get("attribution") or {}
    lineage_on = bool(rules.get("requireLineage", True))
    derived: dict[str, str] = {}

    def add(code: str, action: str = "fail") -> None:
        severity = _SEVERITY.get(action, "error")
        current = derived.get(code)
        if current is None or _SEVERITY_RANK[severity] < _SEVERITY_RANK[current]:
            derived[code] = severity

    def is_derived(ref: Mapping[str, Any]) -> bool:
        return bool((ref.get("lineage") or {}).get("derived"))

    def established(ref: Mapping[str, Any] | None) -> bool:
        lineage = (ref or {}).get("lineage") or {}
        return bool(lineage.get("derived")) and bool(lineage.get("comparable", True))

    # verdict._lineage_support / _outweighed: established lineage turns a failing statistic into a warning.
    # Attestations written before these rules record none of the keys: every statistic applied, none outweighed.
    distances_ok = bool(rules.get("distancesMeaningful", True))
    attribution_ok = bool(rules.get("attributionMeaningful", True))
    if base is not None:
        support = lineage_on and established(refs.get(base))
    else:
        support = lineage_on and any(r.get("family") == family and r["id"] not in forbidden and established(r)
                                     for r in refs.values())

    def statistic(action: str) -> str:
        return "warn" if support and action == "fail" and rules.get("onStatisticsDisagree", "fail") == "warn" \
            else action

    if base is not None and base in refs:
        ref = refs[base]
        if distances_ok and ref["distance"] > ref["threshold"]:
            add(DISTANCE_ABOVE_THRESHOLD, statistic("fail"))
        root = rules.get("declaredBaseRoot", base)  # a declared derivative is compared with its cluster's base
        if attribution_ok and attribution.get("base") is not None and attribution["base"] != root \
                and attribution.get("family") == ref.get("family"):
            add(NEAREST_BASE_DIFFERS, statistic(rules.get("onBaseMismatch", "warn")))
    if attribution_ok and family is not None and attribution.get("family") is not None \
            and attribution["family"] != family:
        add(FAMILY_MISMATCH, statistic("fail"))
    if distances_ok and attribution.get("outOfCluster"):
        add(OUT_OF_CLUSTER, statistic(rules.get("onOutOfCluster", "fail")))
    if not distances_ok or (not attribution_ok and (family is not None or bool(forbidden))):  # _not_meaningful
        if distances_ok:
            add(STATISTICS_NOT_MEANINGFUL, "info")
        elif lineage_on and (refs.get(base, {}).get("lineage") is not None if base is not None
                             else any(r.get("lineage") is not None for r in refs.values())):
            add(STATISTICS_NOT_MEANINGFUL, "warn")
        else:
            add(STATISTICS_NOT_MEANINGFUL, "fail")
    if attribution_ok and forbidden and attribution.get("base") in forbidden and not attribution.get("outOfCluster"):
        # a comparable lineage test that finds no derivation outweighs the attribution (verdict._forbidden)
        tested = (refs.get(attribution["base"]) or {}).get("lineage")
        refuted = lineage_on and tested is not None and tested.get("comparable", True) and not tested.get("derived")
        add(FORBIDDEN_MATCH, "warn" if refuted else "fail")
    if not lineage_on:
        add(LINEAGE_DISABLED, "info")
        return derived
    unavailable = rules.get("lineageOnUnavailable", "warn")
    if base is not None and base in refs:
        if refs[base].get("lineage") is None:
            add(LINEAGE_UNAVAILABLE, unavailable)
        elif not is_derived(refs[base]):
            add(LINEAGE_NOT_ESTABLISHED)
    for ref_id in forbidden:
        if ref_id not in refs:
            continue
        if refs[ref_id].get("lineage") is None:
            add(LINEAGE_UNAVAILABLE, unavailable)
        elif is_derived(refs[ref_id]):
            add(FORBIDDEN_LINEAGE)
    for ref in refs.values():
        if ref["id"] not in forbidden and is_derived(ref) and family is not None and ref.get("family") != family:
            add(LINEAGE_CONTRADICTS_FAMILY)
    return derived


_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


def _lineage_decision(lineage: Mapping[str, Any]) -> bool | None:
    """What `derived` must be from the recorded numbers (None when the predicate lacks what decides it)."""
    if not lineage.get("comparable", True):
        return False
    if _is_number(lineage.get("alpha")) and _is_number(lineage.get("pValue")):
        return lineage["pValue"] <= lineage["alpha"] and lineage["score"] >= lineage["threshold"]
    return None if lineage["derived"] is False else lineage["score"] >= lineage["threshold"]


def _apply_waivers(predicate: Mapping[str, Any], expected: dict[str, str], recorded: Mapping[str, str]) -> list[Check]:
    """Re-derive with the policy's waivers (decisionRules.waivers) as of timeVerified, as tg_verify.waivers does:
    a reason recorded as a waived note needs a waiver active that day; an expired one must be recorded as
    TGV_WAIVER_EXPIRED. `expected` is updated in place; the waivers themselves are listed for the reader."""
    records = (predicate.get("decisionRules") or {}).get("waivers") or []
    if not records:
        return []
    try:
        waivers = from_records(records if isinstance(records, list) else [records])
        verified = _dt.date.fromisoformat(str(predicate["timeVerified"])[:10])
    except (ValueError, TypeError):
        raise AttestationError("predicate.decisionRules.waivers: malformed waiver records (expected "
                               "[{code, reference?, reason, expires: YYYY-MM-DD}])") from None
    checks = []
    for waiver in waivers:
        state = "active" if waiver.active(verified) else "EXPIRED"
        checks.append(Check(EVIDENCE, f"waiver {waiver.code}", True, f"{waiver.describe()} ({state} on "
                                                                     f"{verified.isoformat()})"))
        if not waiver.active(verified):
            expected[WAIVER_EXPIRED] = "error"
    for reason in predicate.get("reasons", []):
        code = reason["code"]
        if reason["severity"] != "info" or code not in DERIVABLE_CODES or expected.get(code) in (None, "info"):
            continue
        if any(w.matches(code, reason.get("subject")) and w.active(verified) for w in waivers) \
                and recorded.get(code) == "info":
            expected[code] = "info"  # waived that day: recorded as a note, as the verify run did
    return checks


def check_evidence(predicate: Mapping[str, Any]) -> list[Check]:
    """The recorded flags, reasons and result must follow from the recorded numbers."""
    checks: list[Check] = []
    for ref in predicate.get("references", []):
        within = ref["distance"] <= ref["threshold"]
        if ref["withinThreshold"] != within:
            checks.append(Check(EVIDENCE, f"reference {ref['id']}", False,
                                f"withinThreshold={ref['withinThreshold']} but distance {ref['distance']} "
                                f"vs threshold {ref['threshold']}"))
        lineage = ref.get("lineage")
        expected = None if lineage is None else _lineage_decision(lineage)
        if expected is not None and lineage["derived"] != expected:
            checks.append(Check(EVIDENCE, f"lineage {ref['id']}", False,
                                f"derived={lineage['derived']} but score {lineage['score']} vs threshold "
                                f"{lineage['threshold']}, p {lineage.get('pValue')} vs alpha {lineage.get('alpha')}"))
    attribution = predicate.get("attribution") or {}
    rules = predicate.get("decisionRules") or {}
    if not rules.get("distancesMeaningful", True):  # the rule was not applied: nothing may be out of cluster
        if attribution.get("outOfCluster"):
            checks.append(Check(EVIDENCE, "attribution", False,
                                "outOfCluster=true but the distances are recorded as not meaningful"))
    elif _is_number(attribution.get("distance")) and _is_number(attribution.get("threshold")):
        outside = attribution["distance"] > attribution["threshold"]
        if bool(attribution.get("outOfCluster")) != outside:
            checks.append(Check(EVIDENCE, "attribution", False,
                                f"outOfCluster={attribution.get('outOfCluster')} but distance "
                                f"{attribution['distance']} vs threshold {attribution['threshold']}"))
    recorded: dict[str, str] = {}
    for reason in predicate.get("reasons", []):  # the most severe entry of each code
        current = recorded.get(reason["code"])
        if current is None or _SEVERITY_RANK[reason["severity"]] < _SEVERITY_RANK[current]:
            recorded[reason["code"]] = reason["severity"]
    expected = derive_reasons(predicate)
    checks.extend(_apply_waivers(predicate, expected, recorded))
    for code in sorted(DERIVABLE_CODES | {WAIVER_EXPIRED}):
        want, got = expected.get(code), recorded.get(code)
        if want != got:
            checks.append(Check(EVIDENCE, f"reason {code}", False,
                                f"evidence implies {want or 'no such reason'}, attestation records "
                                f"{got or 'none'}"))
    has_error = any(sev == "error" for sev in recorded.values())
    result = predicate["verificationResult"]
    consistent = (result == "FAILED") == has_error
    checks.append(Check(EVIDENCE, "verdict follows from reasons", consistent,
                        f"{result} with {sum(s == 'error' for s in recorded.values())} error reason(s)"))
    if not [c for c in checks if not c.ok]:
        checks.insert(0, Check(EVIDENCE, "evidence", True,
                               f"{len(predicate.get('references', []))} reference(s) and "
                               f"{len(recorded)} reason(s) re-derived"))
    return checks


def verify_attestation(loaded: LoadedStatement, model: str | os.PathLike[str], *,
                       policy: str | os.PathLike[str] | None = None,
                       base: str | os.PathLike[str] | None = None,
                       progress: Callable[[int], None] | None = None) -> AttestationReport:
    """Every check of `loaded` against the model on disk (and the policy when given)."""
    validate_statement(loaded.statement, loaded.source)
    model_path = Path(model)
    if not model_path.exists():
        raise InputError(f"{model_path}: model path does not exist")
    predicate = loaded.statement["predicate"]
    report = AttestationReport(source=loaded.source, wrapper=loaded.wrapper, model=str(model_path),
                               verification_result=predicate["verificationResult"],
                               has_base=isinstance(predicate["candidate"].get("base"), dict))
    report.checks.extend(check_files(loaded.statement, model_path, progress))
    if base is not None:
        report.checks.extend(check_base(predicate, Path(base), progress))
    if policy is not None:
        report.checks.append(check_policy(loaded.statement, Path(policy)))
    report.checks.extend(check_evidence(predicate))
    reasons = ", ".join(r["code"] for r in predicate.get("reasons", []) if r["severity"] == "error")
    report.checks.append(Check(RESULT, "verificationResult", predicate["verificationResult"] == "PASSED",
                               predicate["verificationResult"] + (f" ({reasons})" if reasons else "")))
    return report
