"""Offline check of a tg-verify attestation against a model directory (and optionally the policy).

Recomputes every file digest and the model_signing root digest, names weight files on disk that the
attestation does not cover, compares the policy digest, and decides the verdict again with the one
decision procedure (tg_verify.verdict.decide) from the rules and evidence the predicate records: the
recorded reasons and result must be what those rules make of that evidence. Signatures are not
verified here: that is cosign's or `gh attestation verify`'s job.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tg_verify.analysis.lineage_rule import is_derived
from tg_verify.artifact import Artifact, ArtifactFile, file_digests, resolve, root_digest
from tg_verify.artifact.digest import OTHER_ROLE, model_files
from tg_verify.artifact.formats import FOREIGN_WEIGHT_SUFFIXES, format_for_path
from tg_verify.artifact.layout import PICKLE_SUFFIXES, SUFFIX
from tg_verify.attestation.envelope import LoadedStatement
from tg_verify.attestation.record import (
    PREDICATE_TYPE,
    SEVERITY_OUT,
    ParsedStatement,
    Predicate,
    parse_statement,
)
from tg_verify.errors import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, ArtifactError, InputError
from tg_verify.escaping import shown
from tg_verify.verdict import REASON_CODES, Finding, decide

# Check kinds, in order of gravity: integrity (files, policy: tampering -> exit 2), evidence (the
# recorded verdict does not follow from the recorded numbers and rules -> exit 1), result (FAILED -> exit 1).
INTEGRITY, EVIDENCE, RESULT = "integrity", "evidence", "result"
# Files a runtime could load weights from (the artifact layer's names for them). One next to the attested
# model that the attestation does not cover makes the directory something other than what was attested.
WEIGHT_SUFFIXES = (SUFFIX, *PICKLE_SUFFIXES, *FOREIGN_WEIGHT_SUFFIXES)
MAX_SCAN_DEPTH = 4  # subdirectories searched for unattested weight files (e.g. original/consolidated.00.pth)


@dataclass(frozen=True)
class Check:
    """One comparison: what was checked, whether it held, and the detail a reviewer needs."""

    kind: str
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class AttestationReport:
    """All checks of one attestation; `exit_code` is 0 only when every check holds and it PASSED."""

    source: str
    wrapper: str
    model: str
    verification_result: str
    checks: tuple[Check, ...]
    has_base: bool = False  # an adapter whose base model is recorded
    policy_checked: bool = False  # --policy was given (and its digest compared)
    features_recomputed: bool = False  # the attested verdict rests on features recomputed from the attested files

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
            "policyChecked": self.policy_checked, "featuresRecomputed": self.features_recomputed,
            "checks": [c.to_dict() for c in self.checks],
        }


# ------------------------------------------------------------------------------------------ integrity


def _model_root(model: Path) -> tuple[Path, Artifact | None, str | None]:
    """The directory subject names are relative to, the resolved artifact, and why resolving failed."""
    root = model.parent if model.is_file() else model
    try:
        return root, resolve(model), None
    except ArtifactError as exc:
        return root, None, str(exc)


def _linked(root: Path, path: Path) -> bool:
    """Whether `path` (under `root`) is reached through a symbolic link: itself or a directory on its way."""
    return any(p.is_symlink() for p in (path, *path.parents) if p == root or root in p.parents)


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
        linked = _linked(root, path)
        try:
            info = os.stat(path) if allow_symlinks and linked else os.lstat(path)
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


def _weight_files(root: Path, depth: int = 0, prefix: str = "") -> Iterator[str]:
    """Relative POSIX paths of weight-format files under `root` (hidden and symlinked directories not entered)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        name = f"{prefix}{entry.name}"
        weight = entry.name.lower().endswith(WEIGHT_SUFFIXES) or format_for_path(entry.name) is not None
        if weight and not entry.is_dir(follow_symlinks=False):
            yield name
        elif depth < MAX_SCAN_DEPTH and not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
            yield from _weight_files(Path(entry.path), depth + 1, f"{name}/")


def _check_subjects(parsed: ParsedStatement) -> list[Check]:
    """Every subject is an attested file, the model's root digest, or reported as outside the verdict.

    tg-verify's own Statement names files by relative path and adds the root subject; a Statement made by
    actions/attest around our predicate names them by basename, or as written in a subject-checksums file,
    and has no root subject. The predicate says which files are evidence (a role other than `other`) and
    which were hashed for the root digest only. A subject the predicate does not list is signed but not
    covered by the verdict: reported, never fatal. A subject named like an attested file with another digest
    contradicts the predicate: fatal.
    """
    files = {f.path: f.sha256 for f in parsed.predicate.candidate.files}
    roles = {f.path: f.role or "unknown" for f in parsed.predicate.candidate.files}
    root = parsed.predicate.candidate.root_digest
    checks: list[Check] = []
    for subject in parsed.subjects:
        if subject.root or (subject.sha256 == root and subject.name not in files):
            ok = subject.sha256 == root
            detail = f"whole-model subject {shown(subject.name)!r}: sha256 {subject.sha256}" + (
                "" if ok else f", predicate records {root}")
            checks.append(Check(INTEGRITY, "root subject", ok, detail))
            continue
        named = [path for path in files if path == subject.name or PurePosixPath(path).name == subject.name]
        matches = [path for path in named if files[path] == subject.sha256]
        if matches:
            role = roles[matches[0]]
            what = ("hashed for the root digest only, not read for the verdict" if role == OTHER_ROLE
                    else f"evidence (role {shown(role)})")
            checks.append(Check(INTEGRITY, f"subject {subject.name}", True, f"attested file {matches[0]}: {what}"))
        elif named:
            checks.append(Check(INTEGRITY, f"subject {subject.name}", False,
                                f"sha256 {subject.sha256} differs from the attested file {named[0]} "
                                f"({files[named[0]]})"))
        else:
            checks.append(Check(INTEGRITY, f"subject {subject.name}", True,
                                f"not in the predicate's files: signed, but the verdict says nothing about it "
                                f"(sha256 {subject.sha256}; reported, not fatal)"))
    return checks


def check_files(parsed: ParsedStatement, model: Path, progress: Callable[[int], None] | None = None) -> list[Check]:
    """Recompute every attested file's digest from disk, name missing/extra/changed and unattested weight files,
    check the root digest."""
    predicate = parsed.predicate
    files = {f.path: f.sha256 for f in predicate.candidate.files}
    recorded_root = root_digest(files)
    predicate_root = predicate.candidate.root_digest
    checks = [Check(INTEGRITY, "root digest (recorded)", predicate_root == recorded_root,
                    f"predicate.candidate.rootDigest {predicate_root}, computed from the attested files "
                    f"{recorded_root}")]
    candidate = predicate.candidate
    if candidate.weights_digest is not None:
        recorded_weights = candidate.weights_digest_of_files()
        checks.append(Check(INTEGRITY, "weights digest (recorded)", candidate.weights_digest == recorded_weights,
                            f"predicate.candidate.weightsDigest {candidate.weights_digest}, computed from the "
                            f"attested files the fingerprint was made from {recorded_weights}"))
    checks.extend(_check_subjects(parsed))
    root, artifact, problem = _model_root(model)
    if problem is not None:
        checks.append(Check(INTEGRITY, "artifact resolves", False, problem))
    on_disk, refused = _hash_files(root, sorted(files), progress, candidate.allow_symlinks)
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
    extra = sorted(f.path for f in artifact.files if f.path not in files) if artifact is not None else []
    for name in extra:
        checks.append(Check(INTEGRITY, f"file {name}", False, "extra: part of the model on disk but not attested"))
    weights: set[str] = set()
    if model.is_dir():  # a model given as one file is loaded as that file; a directory is loaded by a runtime's rules
        beside = set(artifact.other_weights) if artifact is not None else set()  # the artifact layer's own list
        weights = beside | set(_weight_files(root))
        checks.extend(_unattested(sorted(weights), set(files) | set(extra), "file"))
    if all(on_disk.get(name) for name in files):
        disk_root = root_digest({name: on_disk[name] or "" for name in files})
        checks.append(Check(INTEGRITY, "root digest (disk)", disk_root == predicate_root,
                            f"the attested files as found in {root}: sha256:{disk_root}"))
    if model.is_dir() and artifact is not None:
        covered = set(files) | set(extra) | weights | {f.path for f in artifact.files}
        checks.extend(_unlisted_files(root, covered, candidate.files_hashed))
    return checks


def _unlisted_files(root: Path, covered: set[str], hashed: bool) -> list[Check]:
    """Files model_signing would hash in the directory now that the attestation does not list and tg-verify does
    not read (a README added later): reported, not fatal. With files hashed in the run, the directory's
    model_signing digest now differs from the attested root digest; an attestation made from a fingerprint
    file never claimed the directory's digest (its root digest covers the recorded weight files only)."""
    try:
        listed = model_files(root)
    except (InputError, OSError):
        return []
    why = ("the directory's model_signing digest now differs from the attested root digest" if hashed else
           "the attested root digest covers only the weight files the fingerprint recorded, not the directory")
    return [Check(INTEGRITY, f"file {entry.path}", True, f"not attested and not read by tg-verify: {why} "
                                                         "(reported, not fatal)")
            for entry in listed if entry.path not in covered]


def _unattested(names: list[str], covered: set[str], label: str) -> list[Check]:
    return [Check(INTEGRITY, f"{label} {name}", False,
                  "unattested weights: a weight file next to the attested model that the attestation does not "
                  "cover (a runtime could load it instead)")
            for name in names if name not in covered]


def check_base(predicate: Predicate, base: Path, progress: Callable[[int], None] | None = None) -> list[Check]:
    """An adapter's base model (predicate.candidate.base) against the base directory on disk."""
    recorded = predicate.candidate.base
    if recorded is None:
        return [Check(INTEGRITY, "base model", False, "--base was given but the attestation records no base model "
                                                     "(the candidate is not an adapter)")]
    files = recorded.digests
    root = base.parent if base.is_file() else base
    on_disk, _ = _hash_files(root, sorted(files), progress, predicate.candidate.allow_symlinks)
    checks = []
    for name in sorted(files):
        actual = on_disk.get(name)
        ok = actual == files[name]
        detail = f"sha256 {actual}" if ok else ("missing" if actual is None else
                                                 f"sha256 mismatch: attested {files[name]}, found {actual}")
        checks.append(Check(INTEGRITY, f"base file {name}", ok, detail))
    checks.extend(_unattested(list(_weight_files(root)), set(files), "base file"))
    return checks


def check_policy(predicate: Predicate, policy: Path) -> Check:
    """The policy file's sha256 against predicate.policy.digest."""
    try:
        actual = hashlib.sha256(policy.read_bytes()).hexdigest()
    except OSError as exc:
        raise InputError(f"{policy}: cannot read the policy ({exc.strerror or exc})", file=str(policy)) from exc
    if actual == predicate.policy_sha256:
        return Check(INTEGRITY, "policy digest", True, f"{policy} sha256 {actual}")
    return Check(INTEGRITY, "policy digest", False,
                 f"{policy} sha256 {actual} differs from the attested policy {predicate.policy_sha256}")


# ------------------------------------------------------------------------------------------- evidence


def _flags(predicate: Predicate) -> list[Check]:
    """The recorded flags (withinThreshold, derived, outOfCluster, matchesDeclared) against their numbers."""
    checks: list[Check] = []
    for ref in predicate.references:
        if ref.within_threshold != (ref.distance <= ref.threshold):
            checks.append(Check(EVIDENCE, f"reference {ref.id}", False,
                                f"withinThreshold={ref.within_threshold} but distance {ref.distance} vs threshold "
                                f"{ref.threshold}"))
        lineage = ref.lineage
        if lineage is None:
            continue
        if lineage.method is not None or lineage.alpha is not None:
            expected = is_derived(score=lineage.score, threshold=lineage.threshold, comparable=lineage.comparable,
                                  method=lineage.method, p_value=lineage.p_value, alpha=lineage.alpha,
                                  block_score=lineage.block_score, block_threshold=lineage.block_threshold)
        else:  # an attestation without alpha: a "derived" call still needs a comparable test above the threshold
            expected = lineage.derived and lineage.comparable and lineage.score >= lineage.threshold
        if lineage.derived != expected:
            checks.append(Check(EVIDENCE, f"lineage {ref.id}", False,
                                f"derived={lineage.derived} but score {lineage.score} vs threshold "
                                f"{lineage.threshold}"
                                + ("" if lineage.block_score is None else
                                   f", blocks {lineage.block_score} vs {lineage.block_threshold}")
                                + ("" if lineage.method is not None else
                                                          f", p {lineage.p_value} vs alpha {lineage.alpha}")
                                + ("" if lineage.comparable else ", not comparable")))
    att = predicate.attribution
    if not att.meaningful:  # the out-of-cluster rule was not applied: nothing may be out of cluster
        if att.out_of_cluster:
            checks.append(Check(EVIDENCE, "attribution", False,
                                "outOfCluster=true but the distances are recorded as not meaningful"))
    elif att.out_of_cluster != (att.distance > att.threshold):
        checks.append(Check(EVIDENCE, "attribution", False,
                            f"outOfCluster={att.out_of_cluster} but distance {att.distance} vs threshold "
                            f"{att.threshold}"))
    family = predicate.rules.declared_family
    if att.matches_declared is not None and family is not None and att.matches_declared != (att.family == family):
        checks.append(Check(EVIDENCE, "attribution", False,
                            f"matchesDeclared={att.matches_declared} but attributed family {att.family!r}, declared "
                            f"{family!r}"))
    return checks


def _tally(findings: tuple[Finding, ...]) -> dict[str, Counter[tuple[str, str]]]:
    tally: dict[str, Counter[tuple[str, str]]] = {}
    for f in findings:
        tally.setdefault(f.code, Counter())[(SEVERITY_OUT[f.severity], f.subject or "")] += 1
    return tally


def _describe(counter: Counter[tuple[str, str]] | None) -> str:
    if not counter:
        return "none"
    return ", ".join(f"{severity}{f' ({subject})' if subject else ''}" + (f" x{n}" if n > 1 else "")
                     for (severity, subject), n in sorted(counter.items()))


def check_evidence(predicate: Predicate) -> list[Check]:
    """Decide again from the recorded rules and evidence; the recorded reasons and result must be that decision.

    Reasons compare by code, severity and subject (the sentences may be worded differently by another
    version). A recorded code this version does not know is taken as recorded: it can only add a reason.
    """
    checks = _flags(predicate)
    evidence = predicate.evidence()
    verdict = decide(predicate.rules, evidence)
    unknown = tuple(r for r in predicate.reasons if r.code not in REASON_CODES)
    expected = _tally(verdict.reasons + unknown)
    recorded = _tally(predicate.reasons)
    for code in sorted(set(expected) | set(recorded)):
        if expected.get(code) != recorded.get(code):
            checks.append(Check(EVIDENCE, f"reason {code}", False,
                                f"the recorded rules and evidence imply {_describe(expected.get(code))}, the "
                                f"attestation records {_describe(recorded.get(code))}"))
    failing = any(f.severity == "fail" for f in verdict.reasons + unknown)
    consistent = failing == (predicate.result == "FAILED")
    checks.append(Check(EVIDENCE, "verdict follows from reasons", consistent,
                        f"{predicate.result}; deciding again from the recorded evidence gives "
                        f"{'FAILED' if failing else 'PASSED'}"))
    if all(c.ok for c in checks):
        checks.insert(0, Check(EVIDENCE, "evidence", True,
                               f"{len(predicate.references)} reference(s) and {len(predicate.reasons)} reason(s) "
                               f"decided again from the recorded rules"))
    day = evidence.verified_on
    for waiver in predicate.rules.waivers:  # listed for the reader: what the recorded verdict waived, and until when
        state = "active" if day is not None and waiver.active(day) else "EXPIRED"
        checks.append(Check(EVIDENCE, f"waiver {waiver.code}", True,
                            f"{waiver.describe()} ({state} on {day.isoformat() if day else 'an unrecorded day'})"))
    return checks


def check_features(predicate: Predicate, allow_fingerprint: bool) -> Check:
    """Whether the attested verdict rests on features recomputed from the attested files."""
    if predicate.candidate.features_recomputed:
        return Check(EVIDENCE, "features recomputed", True, "the features were recomputed from the attested files")
    how = ("read from a fingerprint file" if predicate.candidate.features == "fingerprint"
           else "of unrecorded origin (the attestation does not say they were recomputed)")
    detail = (f"the candidate's features were {how}, not recomputed from the attested files: the file digests bind "
              "the attestation to these bytes, not the verdict")
    if allow_fingerprint:
        return Check(EVIDENCE, "features recomputed", True, detail + " (accepted: --allow-fingerprint-evidence)")
    return Check(EVIDENCE, "features recomputed", False, detail + " (--allow-fingerprint-evidence accepts it)")


def verify_attestation(loaded: LoadedStatement, model: str | os.PathLike[str], *,
                       policy: str | os.PathLike[str] | None = None,
                       base: str | os.PathLike[str] | None = None, allow_fingerprint_evidence: bool = False,
                       progress: Callable[[int], None] | None = None) -> AttestationReport:
    """Every check of `loaded` against the model on disk (and the policy when given)."""
    parsed = parse_statement(loaded.statement, loaded.source)
    model_path = Path(model)
    if not model_path.exists():
        raise InputError(f"{model_path}: model path does not exist", file=str(model_path))
    predicate = parsed.predicate
    checks = check_files(parsed, model_path, progress)
    if base is not None:
        checks.extend(check_base(predicate, Path(base), progress))
    if policy is not None:
        checks.append(check_policy(predicate, Path(policy)))
    checks.extend(check_evidence(predicate))
    checks.append(check_features(predicate, allow_fingerprint_evidence))
    errors = ", ".join(dict.fromkeys(r.code for r in predicate.reasons if r.severity == "fail"))
    checks.append(Check(RESULT, "verificationResult", predicate.passed,
                        predicate.result + (f" ({errors})" if errors else "")))
    return AttestationReport(source=loaded.source, wrapper=loaded.wrapper, model=str(model_path),
                             verification_result=predicate.result, checks=tuple(checks),
                             has_base=predicate.candidate.base is not None, policy_checked=policy is not None,
                             features_recomputed=predicate.candidate.features_recomputed)
