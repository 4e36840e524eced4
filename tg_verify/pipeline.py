"""The verify job: policy -> fingerprints -> distances, attribution, lineage -> verdict -> result.

`verify(policy)` gathers the evidence and returns a `VerificationResult` that carries everything the
reports and the attestation record. Library code: it prints nothing and writes nothing except the
fingerprint cache (when given a cache directory).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tg_verify import __version__
from tg_verify.analysis.attribution import Classification, ClassifierSettings, classify
from tg_verify.analysis.compat import comparability
from tg_verify.analysis.references import Reference
from tg_verify.artifact import Artifact, file_digests, resolve, root_digest
from tg_verify.artifact.digest import model_file_digests
from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.errors import DigestMismatchError, IncompatibleFingerprintsError, InputError, TgVerifyError
from tg_verify.fingerprint.document import FEATURE_VERSION, Fingerprint, load
from tg_verify.policy import Policy, ReferenceSpec
from tg_verify.progress import NullProgress, ProgressSink
from tg_verify.verdict import AttributionEvidence, Evidence, ReferenceEvidence, Verdict, decide

CACHE_ENV = "TG_VERIFY_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where on-the-fly reference fingerprints are cached: $TG_VERIFY_CACHE_DIR, else the XDG cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tg-verify" / "fingerprints"


@dataclass(frozen=True)
class VerifyOptions:
    """How to run (not what to check): device override, threads, cache, progress sink."""

    device: str | None = None
    threads: int | None = None  # threads that fingerprint (None: the usable cores, at most 8)
    cache_dir: Path | None = None  # None: fingerprint references on every run
    progress: ProgressSink = field(default_factory=NullProgress)


@dataclass(frozen=True)
class CandidateOutcome:
    """The candidate as measured: where it came from, its files (sha256) and its fingerprint."""

    name: str
    fingerprint: Fingerprint
    fingerprint_digest: str
    source: str  # "model" (fingerprinted now), "fingerprint" (a file), "model+fingerprint" (digests checked)
    path: Path | None
    fingerprint_path: Path | None
    layout: str
    files: tuple[dict[str, Any], ...]  # {path, size, sha256, role}; role "other": hashed, not read for the verdict
    root_digest: str  # model_signing's digest of the model path (artifact/digest.py), over `files`
    files_verified: bool  # digests computed from the files in this run (not only as recorded)
    base: dict[str, Any] | None = None  # adapters: {name, path, files, root_digest} of the base merged onto
    warnings: tuple[str, ...] = ()
    weights_digest: str = ""  # the same construction over the artifact's own files only (the fingerprinted ones)
    symlinks: bool = False  # some file was read through a symbolic link (a Hugging Face cache)
    unexpected: tuple[str, ...] = ()  # stored tensors the runtime does not load (not fingerprinted)


@dataclass(frozen=True)
class ReferenceOutcome:
    """One reference: its fingerprint, distance, threshold and lineage test."""

    spec: ReferenceSpec
    fingerprint: Fingerprint
    fingerprint_digest: str
    source: str  # "fingerprint", "model" (fingerprinted now) or "cache"
    distance: float
    threshold: float
    declared: bool
    forbidden: bool
    lineage: Any | None = None  # tg_verify.analysis.lineage.LineageResult
    lineage_unavailable: str | None = None

    @property
    def within_threshold(self) -> bool:
        return self.distance <= self.threshold

    @property
    def role(self) -> str:
        return "declared-base" if self.declared else "forbidden" if self.forbidden else "reference"


@dataclass(frozen=True)
class VerificationResult:
    """Everything a verify run found: inputs by digest, evidence, verdict, versions and timings."""

    policy: Policy
    candidate: CandidateOutcome
    references: tuple[ReferenceOutcome, ...]
    classification: Classification
    verdict: Verdict
    settings: dict[str, Any]
    feature_version: str
    tool: dict[str, str]
    timings: dict[str, float]
    caveats: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict.passed else 1

    def reference(self, ref_id: str) -> ReferenceOutcome:
        for ref in self.references:
            if ref.spec.id == ref_id:
                return ref
        raise KeyError(ref_id)

    @property
    def declared_reference(self) -> ReferenceOutcome | None:
        return self.reference(self.policy.declared.base) if self.policy.declared.base else None

    def attestation_evidence(self) -> Any:
        """The evidence tg_verify.report.attestation records (its AttestationEvidence)."""
        from tg_verify.report import attestation as at

        severity = {"fail": "error", "warn": "warning", "info": "info"}
        cand = self.candidate

        def finite(value: Any) -> float | None:
            return float(value) if value is not None and math.isfinite(float(value)) else None

        def lineage(result: Any) -> Any:
            # a test whose sketches were not comparable has no score: recorded as comparable=False, not derived
            if result is None:
                return None
            return at.LineageEvidence(score=finite(result.score), threshold=finite(result.threshold),  # type: ignore[arg-type]
                                      derived=bool(result.derived), p_value=finite(result.p_value),
                                      false_positive_rate=finite(result.false_positive_rate),
                                      method=getattr(result, "method", None), alpha=getattr(result, "alpha", None),
                                      comparable=bool(getattr(result, "comparable", True)))

        refs = tuple(at.ReferenceEvidence(id=r.spec.id, family=r.spec.family, fingerprint_sha256=r.fingerprint_digest,
                                          distance=r.distance, threshold=r.threshold, role=r.role,
                                          lineage=lineage(r.lineage))
                     for r in self.references)
        cls = self.classification
        base = cand.base or {}
        return at.AttestationEvidence(
            model_name=cand.name, layout=cand.layout,
            files=tuple(at.SubjectFile(path=f["path"], sha256=f["sha256"], size=f.get("size"), role=f.get("role"))
                        for f in cand.files),
            policy_sha256=self.policy.sha256, policy_name=self.policy.path.name,
            fingerprint_sha256=cand.fingerprint_digest, fingerprint_settings=self.settings,
            feature_version=self.feature_version, verdict=self.verdict.label,
            reasons=tuple(at.Reason(code=f.code, severity=severity[f.severity], message=f.message, subject=f.subject)
                          for f in self.verdict.reasons),
            references=refs,
            attribution=at.AttributionEvidence(family=cls.family, base=cls.base, distance=cls.distance,
                                               margin=cls.margin, threshold=cls.threshold,
                                               out_of_cluster=cls.out_of_cluster),
            declared_base=self.policy.declared.base, declared_family=self.policy.declared_family,
            forbidden=self.policy.forbidden, on_out_of_cluster=self.policy.on_out_of_cluster,
            require_lineage=self.policy.lineage.enabled, features=dict(cand.fingerprint.features),
            distance_space=str(cls.space.get("space")) if cls.space else None,
            base_files=tuple(at.SubjectFile(path=f["path"], sha256=f["sha256"], size=f.get("size"),
                                            role=f.get("role")) for f in base.get("files", ())),
            base_name=base.get("name"),
            allow_symlinks=cand.symlinks,
            decision_rules={**({"declaredBaseRoot": self.policy.root_of(self.policy.declared.base)}
                               if self.policy.declared.base else {}),
                            "onBaseMismatch": self.policy.on_base_mismatch,
                            "onNameMismatch": self.policy.on_name_mismatch,
                            "lineageOnUnavailable": self.policy.lineage.on_unavailable,
                            "onStatisticsDisagree": self.policy.on_statistics_disagree,
                            "distanceScale": cls.scale,
                            "distancesMeaningful": cls.meaningful,
                            "attributionMeaningful": cls.attribution_meaningful,
                            **({"waivers": [w.to_dict() for w in self.policy.waivers]} if self.policy.waivers else {})})


# --------------------------------------------------------------------------------------- helpers


class _Clock:
    """Named wall-clock phases, for the report's timings."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self._start, 4)}


@contextmanager
def _context(prefix: str) -> Iterator[None]:
    """Prefix any tg-verify error raised inside with `prefix` (the policy file and field), keeping its type."""
    try:
        yield
    except TgVerifyError as exc:
        if not str(exc).startswith(prefix):
            exc.args = (f"{prefix}: {exc}", *exc.args[1:])
        raise


def settings_from_record(record: dict[str, Any]) -> Any:
    """Rebuild FingerprintSettings from the dict a fingerprint recorded (unknown keys are refused).

    The recorded device is where that fingerprint ran, not a setting: this run picks its own.
    """
    from tg_verify.fingerprint.settings import assemble_settings

    return assemble_settings(recorded=[record])


def settings_dict(settings: Any) -> dict[str, Any]:
    return dict(settings.to_dict())


def _choose_settings(policy: Policy, recorded: list[Fingerprint], device: str | None) -> Any:
    """The settings for fingerprints made in this run: the policy's block, else those already recorded.

    Following the recorded settings lets a policy mix fingerprint files and on-the-fly models without
    repeating the settings; any disagreement surfaces as an incompatibility, never a silent comparison.
    """
    from tg_verify.fingerprint.settings import assemble_settings

    native = [fp for fp in recorded if not fp.legacy]
    if policy.fingerprint:
        return assemble_settings(block=policy.fingerprint, device=device)
    if native:
        with _context(f"{policy.path}: settings recorded in {native[0].source}"):
            try:
                return assemble_settings(recorded=[native[0].settings], device=device)
            except (TypeError, ValueError, InputError) as exc:
                raise IncompatibleFingerprintsError(f"cannot reuse its settings ({exc})") from None
    return assemble_settings(device=device)


class FingerprintCache:
    """On-the-fly reference fingerprints kept by (root digest, settings, feature version, name)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def key(self, digests: dict[str, str], settings: dict[str, Any], model_name: str) -> str:
        semantic = {k: v for k, v in settings.items() if k != "device"}
        material = {"root_digest": root_digest(digests), "settings": semantic, "feature_version": FEATURE_VERSION,
                    "model_name": model_name, "tool": __version__}
        return hashlib.sha256(canonical_json(material)).hexdigest()

    def get(self, key: str, digests: dict[str, str]) -> Fingerprint | None:
        path = self.directory / f"{key}.json"
        if not path.is_file():
            return None
        try:
            fp = load(path)
        except InputError:
            return None  # a damaged cache entry is recomputed, never trusted
        return fp if fp.file_digests == digests else None

    def put(self, key: str, fp: Fingerprint) -> None:
        try:
            write_bytes(self.directory / f"{key}.json", fp.to_json_bytes())
        except InputError:
            pass  # an unwritable cache costs time, not correctness


def _fingerprint(artifact: Artifact, settings: Any, *, name: str, options: VerifyOptions, reader: Any = None,
                 digests: dict[str, str] | None = None) -> Fingerprint:
    from tg_verify.fingerprint.extract import fingerprint_artifact

    return fingerprint_artifact(artifact, settings, reader=reader, progress=options.progress, model_name=name,
                                digests=digests, threads=options.threads)


def _check_digests(recorded: dict[str, str], digests: dict[str, str], where: str, what: str = "model") -> None:
    """Recorded file digests (path -> sha256) must name exactly the files present, with their content."""
    if not recorded:
        raise DigestMismatchError(f"{where}: the fingerprint records no file digests, so it cannot be bound to "
                                  f"the {what} files")
    missing = sorted(set(recorded) - set(digests))
    extra = sorted(set(digests) - set(recorded))
    changed = sorted(p for p in set(recorded) & set(digests) if recorded[p] != digests[p])
    if changed:
        p = changed[0]
        raise DigestMismatchError(f"{where}: {what} file {p} has sha256 {digests[p][:16]}..., the fingerprint "
                                  f"records {recorded[p][:16]}... (the fingerprint was made from other files)")
    if missing:
        raise DigestMismatchError(f"{where}: the fingerprint records {missing[0]}, which the {what} lacks")
    if extra:
        raise DigestMismatchError(f"{where}: the {what} has {extra[0]}, which the fingerprint does not record")


def _check_recorded_base(policy: Policy, adapter: Artifact, recorded_fp: Fingerprint) -> None:
    """An adapter's fingerprint records the base it was merged onto; a base named here must be that one."""
    record = recorded_fp.artifact.get("base")
    if not isinstance(record, dict):
        return
    try:
        base_path, field_name = _adapter_base(policy, adapter)
    except InputError:
        return  # no base at hand: the recorded base stands as recorded
    with _context(f"{policy.path}: {field_name}"):
        digests = file_digests(resolve(base_path))
    recorded = {f["path"]: f["sha256"] for f in record.get("files", []) if isinstance(f, dict) and f.get("sha256")}
    where = f"{policy.path}: {field_name}: candidate.fingerprint {policy.candidate.fingerprint}"
    _check_digests(recorded, digests, where, "base")


# ------------------------------------------------------------------------------------- candidate


@dataclass(frozen=True)
class OpenedCandidate:
    """What the extractor streams for a candidate: its artifact (or, for an adapter, the merged view)."""

    artifact: Artifact  # whose tensors are fingerprinted
    files: tuple[dict[str, Any], ...]  # the candidate's own files {path, size, role, sha256}
    digests: dict[str, str]
    reader: Any = None  # None: open_reader(artifact), by the extractor
    base: dict[str, Any] | None = None
    name_mismatches: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _files(artifact: Artifact, digests: dict[str, str]) -> tuple[dict[str, Any], ...]:
    return tuple({"path": f.path, "size": f.size, "role": f.role, "sha256": digests[f.path]} for f in artifact.files)


def open_candidate(policy: Policy, artifact: Artifact, digests: dict[str, str]) -> OpenedCandidate:
    """The seam for candidate kinds: a full model streams as-is; an adapter streams merged onto its base.

    The base of an adapter is `candidate.base_model`, else the declared base reference's `model:`.
    """
    if artifact.layout != "adapter":
        return OpenedCandidate(artifact=artifact, files=_files(artifact, digests), digests=digests,
                               warnings=artifact.warnings)
    return _open_adapter(policy, artifact, digests)


def _adapter_base(policy: Policy, adapter: Artifact) -> tuple[Path, str]:
    """Where an adapter candidate's base weights are, and the policy field that says so."""
    if policy.candidate.base_model is not None:
        return policy.candidate.base_model, "candidate.base_model"
    if policy.declared.base is not None:
        declared = policy.reference(policy.declared.base)
        if declared.model is not None:
            return declared.model, f"{declared.field}.model"
    raise InputError(f"{policy.path}: candidate.path: {adapter.root} is a PEFT adapter; set candidate.base_model "
                     f"(or give the declared base a `model:` path) so it can be merged onto its base")


def _name_mismatches(policy: Policy, adapter: Artifact, base_path: Path | None) -> tuple[str, ...]:
    """base_model_name_or_path of the adapter against the declared base's id and the base's path."""
    from tg_verify.artifact.peft import check_base_name

    names = [n for n in (policy.declared.base, str(base_path) if base_path else None,
                         base_path.resolve().name if base_path else None) if n]
    if not names:
        return ()
    return tuple(f.message for f in check_base_name(adapter, names) if f.code == "TGV_ADAPTER_BASE_NAME_MISMATCH")


def _open_adapter(policy: Policy, adapter: Artifact, digests: dict[str, str]) -> OpenedCandidate:
    from tg_verify.artifact.merge import open_model

    base_path, field_name = _adapter_base(policy, adapter)
    with _context(f"{policy.path}: {field_name}"):
        base = resolve(base_path)
        base_digests = file_digests(base)
    names = [n for n in (policy.declared.base, str(base_path), base_path.resolve().name) if n]
    opened = open_model(adapter, base, base_digests=base_digests, declared_base_names=names)
    mismatches = tuple(f.message for f in opened.findings if f.code == "TGV_ADAPTER_BASE_NAME_MISMATCH")
    return OpenedCandidate(artifact=opened.artifact, files=_files(adapter, digests), digests=digests,
                           reader=opened.reader, base=opened.base_record, name_mismatches=mismatches,
                           warnings=opened.artifact.warnings)


def _candidate(policy: Policy, settings: Any, recorded_fp: Fingerprint | None, options: VerifyOptions,
               ) -> tuple[CandidateOutcome, tuple[str, ...]]:
    spec = policy.candidate
    if spec.path is None:
        assert recorded_fp is not None
        fp = recorded_fp
        art = fp.artifact
        files = tuple({"path": f["path"], "size": f.get("size"), "role": f.get("role"), "sha256": f["sha256"]}
                      for f in art.get("files", []) if f.get("sha256"))
        if not files:
            raise DigestMismatchError(f"{policy.path}: candidate.fingerprint: {spec.fingerprint} records no file "
                                      f"digests, so a verdict could not name the files it is about")
        weights = root_digest({f["path"]: f["sha256"] for f in files})
        return CandidateOutcome(
            name=spec.name or fp.model_name, fingerprint=fp, fingerprint_digest=fp.digest(), source="fingerprint",
            path=None, fingerprint_path=spec.fingerprint, layout=str(art.get("layout", "unknown")), files=files,
            root_digest=weights, weights_digest=weights, files_verified=False, base=art.get("base"),
            unexpected=_recorded_unexpected(fp)), ()
    with _context(f"{policy.path}: candidate.path"):
        artifact = resolve(spec.path)
        digests = file_digests(artifact)
        # model_signing's file set of the model path: the artifact's files plus tokenizer, generation config...
        model_digests, listed = model_file_digests(spec.path, artifact, digests)
        name = spec.name or artifact.name
        if recorded_fp is not None:
            _check_digests(recorded_fp.file_digests, digests, f"candidate.fingerprint {spec.fingerprint}")
            mismatches = _name_mismatches(policy, artifact, spec.base_model) if artifact.layout == "adapter" else ()
            opened = OpenedCandidate(artifact=artifact, files=_files(artifact, digests), digests=digests,
                                     base=recorded_fp.artifact.get("base"), name_mismatches=mismatches,
                                     warnings=artifact.warnings)
            fp, source = recorded_fp, "model+fingerprint"
        else:
            opened = open_candidate(policy, artifact, digests)
            try:
                fp = _fingerprint(opened.artifact, settings, name=name, options=options, reader=opened.reader,
                                  digests=digests)
            finally:
                close = getattr(opened.reader, "close", None)
                if close is not None:
                    close()
            if opened.base is not None:
                fp = replace(fp, artifact={**fp.artifact, "base": opened.base})
            source = "model"
    if recorded_fp is not None and artifact.layout == "adapter":
        _check_recorded_base(policy, artifact, recorded_fp)
    others = tuple({"path": f.path, "size": f.size, "role": "other", "sha256": model_digests[f.path]}
                   for f in listed if f.path not in digests)
    return CandidateOutcome(
        name=name, fingerprint=fp, fingerprint_digest=fp.digest(), source=source, path=spec.path,
        fingerprint_path=spec.fingerprint, layout=artifact.layout, files=opened.files + others,
        root_digest=root_digest(model_digests), weights_digest=root_digest(digests), files_verified=True,
        base=opened.base, warnings=opened.warnings,
        symlinks=any(f.symlink for f in listed) or any(artifact.path_of(p).is_symlink() for p in digests),
        unexpected=tuple(t.name for t in opened.artifact.unexpected) or _recorded_unexpected(fp),
    ), opened.name_mismatches


def _recorded_unexpected(fp: Fingerprint) -> tuple[str, ...]:
    """The unexpected tensors a fingerprint recorded when it was made (names only)."""
    names = (fp.extraction or {}).get("unexpected_tensors")
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


# ------------------------------------------------------------------------------------ references


def _reference_fingerprint(policy: Policy, ref: ReferenceSpec, settings: Any, options: VerifyOptions,
                           loaded: dict[str, Fingerprint]) -> tuple[Fingerprint, str]:
    if ref.fingerprint is not None:
        return loaded[ref.id], "fingerprint"
    assert ref.model is not None
    with _context(f"{policy.path}: {ref.field}.model"):
        artifact = resolve(ref.model)
        digests = file_digests(artifact)
        _check_pin(policy, ref, root_digest(digests), f"model {ref.model} (root digest)")
        cache = FingerprintCache(options.cache_dir) if options.cache_dir is not None else None
        key = cache.key(digests, settings_dict(settings), ref.id) if cache else ""
        cached = cache.get(key, digests) if cache else None
        if cached is not None:
            return cached, "cache"
        if artifact.layout == "adapter":
            raise InputError(f"{ref.model} is a PEFT adapter; a reference must be a full model (fingerprint the "
                             f"merged model and use `fingerprint:`)")
        fp = _fingerprint(artifact, settings, name=ref.id, options=options, digests=digests)
        if cache:
            cache.put(key, fp)
        return fp, "model"


def _check_compatible(policy: Policy, candidate: Fingerprint, fp: Fingerprint, where: str) -> None:
    """Fingerprints made differently are never compared: an input error naming the policy field."""
    try:
        comparability([candidate, fp])
    except IncompatibleFingerprintsError as exc:
        raise IncompatibleFingerprintsError(f"{policy.path}: {where}: {exc}") from None


def _lineage(policy: Policy, candidate: Fingerprint, fp: Fingerprint) -> tuple[Any | None, str | None]:
    if not policy.lineage.enabled:
        return None, None
    if candidate.sketch is None:
        return None, "the candidate fingerprint has no lineage sketch"
    if fp.sketch is None:
        why = "a legacy (paper-format) fingerprint" if fp.legacy else "made without the lineage sketch"
        return None, f"the reference fingerprint has no lineage sketch ({why})"
    from tg_verify.analysis.lineage import lineage_test

    extra = {} if policy.lineage.min_score is None else {"min_score": policy.lineage.min_score}
    return lineage_test(candidate, fp, alpha=policy.lineage.alpha, **extra), None


# ------------------------------------------------------------------------------------------ verify


def _load_recorded(policy: Policy) -> tuple[Fingerprint | None, dict[str, Fingerprint]]:
    candidate = None
    if policy.candidate.fingerprint is not None:
        with _context(f"{policy.path}: candidate.fingerprint"):
            candidate = load(policy.candidate.fingerprint)
        if candidate.legacy:
            raise InputError(f"{policy.path}: candidate.fingerprint: {policy.candidate.fingerprint} is in the "
                             f"paper's legacy format (no settings, no file digests); re-fingerprint the candidate")
    refs: dict[str, Fingerprint] = {}
    for ref in policy.references:
        if ref.fingerprint is not None:
            with _context(f"{policy.path}: {ref.field}.fingerprint"):
                refs[ref.id] = load(ref.fingerprint)
            if ref.sha256 is not None:
                actual = hashlib.sha256(ref.fingerprint.read_bytes()).hexdigest()
                _check_pin(policy, ref, actual, f"fingerprint file {ref.fingerprint}")
    return candidate, refs


def _check_pin(policy: Policy, ref: ReferenceSpec, actual: str, what: str) -> None:
    """A reference pinned by `sha256:` must be exactly that file (or model): a swapped reference is bad input."""
    if ref.sha256 is not None and actual != ref.sha256:
        raise DigestMismatchError(f"{policy.path}: {ref.field}.sha256: {what} has sha256 {actual[:16]}..., the "
                                  f"policy pins {ref.sha256[:16]}...")


def check_policy(policy: Policy) -> list[str]:
    """Validate what can be checked without reading weights: fingerprint files load and compare.

    Returns notes (e.g. references that will be fingerprinted on the fly, legacy references).
    Raises the same input errors a full run would for these files.
    """
    candidate, refs = _load_recorded(policy)
    notes: list[str] = []
    anchor = candidate or next((fp for fp in refs.values() if not fp.legacy), None)
    for ref in policy.references:
        if ref.fingerprint is None:
            notes.append(f"{ref.field} ({ref.id}) will be fingerprinted from {ref.model}")
            continue
        fp = refs[ref.id]
        if fp.legacy:
            notes.append(f"{ref.field} ({ref.id}) is a legacy fingerprint: no lineage test against it")
        elif fp.sketch is None:
            notes.append(f"{ref.field} ({ref.id}) has no lineage sketch: no lineage test against it")
        if anchor is not None and fp is not anchor:
            _check_compatible(policy, anchor, fp, ref.source_field)
    notes.extend(_support_warnings(policy, refs))
    if policy.fingerprint and anchor is not None and not anchor.legacy:
        settings = settings_dict(_choose_settings(policy, [], None))
        recorded = {k: v for k, v in anchor.settings.items() if k != "device"}
        wanted = {k: v for k, v in settings.items() if k != "device"}
        if recorded != wanted:
            raise IncompatibleFingerprintsError(
                f"{policy.path}: fingerprint: the settings block differs from the settings recorded in "
                f"{anchor.source}; fingerprints made with it would not compare")
    return notes


def _support_warnings(policy: Policy, refs: dict[str, Fingerprint]) -> list[str]:
    """--check-policy: statistics the references cannot support (as "WARNING: ..." notes)."""
    from tg_verify.analysis.attribution import reference_support

    if len(refs) < len(policy.references):
        return ["whether the references can support the family attribution is known once every reference is "
                "fingerprinted (model: references are fingerprinted at run time)"]
    problems = reference_support([Reference(id=r.id, family=r.family, fingerprint=refs[r.id], base=r.parent is None,
                                            parent=r.parent) for r in policy.references])
    warnings = [f"WARNING: the references cannot support {p}; it will be reported as not meaningful and the verdict "
                "will rest on the lineage test" for p in problems]
    base = policy.declared.base
    scale_problem = any(p.startswith("the paper's distance") for p in problems)
    if scale_problem and base is not None and (refs[base].sketch is None or not policy.lineage.enabled):
        warnings.append(f"WARNING: and no lineage test can run against the declared base '{base}' (it has no sketch, "
                        "or the test is off): nothing would support the declared lineage, so every run will FAIL "
                        "(TGV_STATISTICS_NOT_MEANINGFUL)")
    return warnings


def verify(policy: Policy, options: VerifyOptions | None = None) -> VerificationResult:
    """Run the policy: fingerprint what needs it, measure, test lineage, decide. Raises on bad input."""
    options = options or VerifyOptions()
    clock = _Clock()
    with clock.phase("load"):
        recorded_candidate, recorded_refs = _load_recorded(policy)
        recorded = [fp for fp in (recorded_candidate, *recorded_refs.values()) if fp is not None]
        settings = _choose_settings(policy, recorded, options.device)
    with clock.phase("candidate"):
        candidate, name_mismatches = _candidate(policy, settings, recorded_candidate, options)
    fingerprints: dict[str, tuple[Fingerprint, str]] = {}
    with clock.phase("references"):
        for ref in policy.references:
            fp, source = _reference_fingerprint(policy, ref, settings, options, recorded_refs)
            _check_compatible(policy, candidate.fingerprint, fp,
                              ref.source_field if ref.fingerprint is not None else f"{ref.field}.model")
            fingerprints[ref.id] = (fp, source)
    with clock.phase("analysis"):
        references = [Reference(id=r.id, family=r.family, fingerprint=fingerprints[r.id][0], base=r.parent is None,
                                parent=r.parent) for r in policy.references]
        classification = classify(candidate.fingerprint, references,
                                  ClassifierSettings(threshold=policy.thresholds.out_of_cluster))
    distances = {row.id: row.distance for row in classification.references}
    outcomes: list[ReferenceOutcome] = []
    with clock.phase("lineage"):
        for ref in policy.references:
            fp, source = fingerprints[ref.id]
            lineage, unavailable = _lineage(policy, candidate.fingerprint, fp)
            outcomes.append(ReferenceOutcome(
                spec=ref, fingerprint=fp, fingerprint_digest=fp.digest(), source=source, distance=distances[ref.id],
                threshold=policy.threshold_for(ref), declared=ref.id == policy.declared.base,
                forbidden=ref.id in policy.forbidden, lineage=lineage, lineage_unavailable=unavailable))
    evidence = Evidence(
        references=tuple(ReferenceEvidence(id=o.spec.id, family=o.spec.family, distance=o.distance,
                                           threshold=o.threshold, lineage=o.lineage,
                                           lineage_unavailable=o.lineage_unavailable) for o in outcomes),
        attribution=AttributionEvidence(family=classification.family, base=classification.base,
                                        distance=classification.distance,
                                        out_of_cluster=classification.out_of_cluster,
                                        threshold=classification.threshold, meaningful=classification.meaningful,
                                        attribution_meaningful=classification.attribution_meaningful,
                                        not_meaningful=tuple(classification.not_meaningful)),
        adapter_name_mismatches=name_mismatches, artifact_warnings=candidate.warnings,
        unexpected_tensors=candidate.unexpected,
        caveats=tuple(classification.caveats))
    verdict = decide(policy, evidence)
    from tg_verify.report.attestation import component_versions

    return VerificationResult(
        policy=policy, candidate=candidate, references=tuple(outcomes), classification=classification,
        verdict=verdict, settings=dict(candidate.fingerprint.settings),
        feature_version=candidate.fingerprint.feature_version, tool=component_versions(), timings=clock.total(),
        caveats=tuple(classification.caveats))
