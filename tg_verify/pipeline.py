"""The verify job: policy -> fingerprints -> distances, attribution, lineage -> verdict -> result.

`verify(policy)` gathers the evidence and returns a `VerificationResult` that carries everything the
reports and the attestation record: the rules and the evidence the verdict was decided from, and
what the candidate and the references were measured from. It knows no report format: the report
and attestation stages read the result. Library code: it prints nothing and writes nothing except
the fingerprint cache (when given a cache directory, see FingerprintCache).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import math
import os
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tg_verify.analysis.attribution import Classification, ClassifierSettings, classify
from tg_verify.analysis.compat import comparability
from tg_verify.analysis.references import Reference
from tg_verify.artifact import Artifact, file_digests, resolve, root_digest
from tg_verify.artifact.digest import OTHER_ROLE, model_file_digests
from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.errors import DigestMismatchError, IncompatibleFingerprintsError, InputError, TgVerifyError
from tg_verify.fingerprint.document import (
    FEATURE_VERSION,
    BaseModelRecord,
    FileDigest,
    Fingerprint,
    from_dict,
    load_with_digest,
)
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.policy import Policy, ReferenceSpec
from tg_verify.progress import NullProgress, ProgressSink
from tg_verify.verdict import (
    AttributionEvidence,
    DecisionRules,
    Evidence,
    LineageEvidence,
    ReferenceEvidence,
    Verdict,
    decide,
)
from tg_verify.versions import VERSION, component_versions

if TYPE_CHECKING:
    from tg_verify.analysis.lineage import LineageResult

CACHE_ENV = "TG_VERIFY_CACHE_DIR"
Source = Literal["model", "fingerprint", "model+fingerprint"]


def default_cache_dir() -> Path:
    """Where on-the-fly reference fingerprints are cached: $TG_VERIFY_CACHE_DIR, else the XDG cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tg-verify" / "fingerprints"


@dataclass(frozen=True)
class VerifyOptions:
    """How to run (not what to check): device override, threads, cache, progress sink, defaults of the caller."""

    device: str | None = None
    threads: int | None = None  # threads that fingerprint (None: the usable cores, at most 8)
    cache_dir: Path | None = None  # None: fingerprint references on every run
    progress: ProgressSink = field(default_factory=NullProgress)
    require_weights: bool = False  # candidate.require_weights when the policy does not set it


@dataclass(frozen=True)
class CandidateOutcome:
    """The candidate as measured: where its features came from, its files (sha256) and its fingerprint.

    `source`: "model" (fingerprinted from the files in this run), "fingerprint" (a fingerprint file
    alone: the digests are as it recorded them) or "model+fingerprint" (a fingerprint file whose
    recorded digests were checked against the files, its features taken as recorded).
    """

    name: str
    fingerprint: Fingerprint
    fingerprint_digest: str
    source: Source
    path: Path | None
    fingerprint_path: Path | None
    layout: str
    files: tuple[FileDigest, ...]  # role "other": hashed for the root digest only, not read for the verdict
    # model_signing's digest of the model path (artifact/digest.py) over `files` when they were hashed in this
    # run; for a candidate known only by a fingerprint file, the weights digest (no directory was listed)
    root_digest: str
    weights_digest: str  # the same construction over the artifact's own files only (the fingerprinted ones)
    base: BaseModelRecord | None = None  # adapters: the base merged onto (its files and root digest)
    warnings: tuple[str, ...] = ()
    symlinks: bool = False  # some file was read through a symbolic link (a Hugging Face cache)
    unexpected: tuple[str, ...] = ()  # stored tensors the runtime does not load (not fingerprinted)

    @property
    def files_hashed(self) -> bool:
        """The file digests were computed from the files in this run (not only as a fingerprint recorded them)."""
        return self.source != "fingerprint"

    @property
    def files_verified(self) -> bool:
        """The features were recomputed from the files hashed in this run: the verdict is about these bytes."""
        return self.source == "model"


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
    lineage: LineageResult | None = None
    lineage_unavailable: str | None = None

    @property
    def within_threshold(self) -> bool:
        return self.distance <= self.threshold

    @property
    def role(self) -> str:
        return "declared-base" if self.declared else "forbidden" if self.forbidden else "reference"


@dataclass(frozen=True)
class VerificationResult:
    """Everything a verify run found: inputs by digest, the rules and evidence, the verdict, versions, timings."""

    policy: Policy
    candidate: CandidateOutcome
    references: tuple[ReferenceOutcome, ...]
    classification: Classification
    rules: DecisionRules
    evidence: Evidence
    verdict: Verdict
    settings: dict[str, Any]
    feature_version: str
    tool: dict[str, str]
    timings: dict[str, float]
    caveats: tuple[str, ...] = ()
    # when the run gathered its evidence (UTC): the attestation's timeVerified, and the day waivers are judged on
    time_verified: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc))

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
def _context(policy: Policy, field_name: str) -> Iterator[None]:
    """Prefix any tg-verify error raised inside with the policy file and field, keeping its type.

    The error also carries them as attributes (`file`, `field`) unless a deeper layer already named a file.
    """
    prefix = f"{policy.path}: {field_name}"
    try:
        yield
    except TgVerifyError as exc:
        if not str(exc).startswith(prefix):
            exc.args = (f"{prefix}: {exc}", *exc.args[1:])
        if exc.file is None:
            exc.file = str(policy.path)
        if exc.field is None:
            exc.field = field_name
        raise


def settings_from_record(record: dict[str, Any]) -> FingerprintSettings:
    """Rebuild FingerprintSettings from the dict a fingerprint recorded (unknown keys are refused).

    The recorded device is where that fingerprint ran, not a setting: this run picks its own.
    """
    from tg_verify.fingerprint.settings import assemble_settings

    return assemble_settings(recorded=[record])


def settings_dict(settings: FingerprintSettings) -> dict[str, Any]:
    return dict(settings.to_dict())


def _choose_settings(policy: Policy, recorded: list[Fingerprint], device: str | None) -> FingerprintSettings:
    """The settings for fingerprints made in this run: the policy's block, else those already recorded.

    Following the recorded settings lets a policy mix fingerprint files and on-the-fly models without
    repeating the settings; any disagreement surfaces as an incompatibility, never a silent comparison.
    """
    from tg_verify.fingerprint.settings import assemble_settings

    native = [fp for fp in recorded if not fp.legacy]
    if policy.fingerprint:
        return assemble_settings(block=policy.fingerprint, device=device)
    if native:
        with _context(policy, f"settings recorded in {native[0].source}"):
            try:
                return assemble_settings(recorded=[native[0].settings], device=device)
            except (TypeError, ValueError, InputError) as exc:
                raise IncompatibleFingerprintsError(f"cannot reuse its settings ({exc})") from None
    return assemble_settings(device=device)


class FingerprintCache:
    """On-the-fly reference fingerprints kept by (root digest, settings, feature version, name, tool version).

    Entries are written only by the tool, and each is bound to what it was computed from: an entry is
    a sealed envelope {key, root digest, fingerprint} with an HMAC under a secret that the cache keeps
    in `.secret` (created 0600 on first use). A file put in the directory by anything else (a run's
    output, a copied file) has no valid seal and is recomputed, never trusted; so is an entry whose
    root digest or file digests are not those of the weights read in this run.
    """

    FORMAT = "tg-verify-cache/1"
    SECRET = ".secret"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def key(self, digests: dict[str, str], settings: dict[str, Any], model_name: str) -> str:
        semantic = {k: v for k, v in settings.items() if k != "device"}
        material = {"root_digest": root_digest(digests), "settings": semantic, "feature_version": FEATURE_VERSION,
                    "model_name": model_name, "tool": VERSION}
        return hashlib.sha256(canonical_json(material)).hexdigest()

    def _secret(self, create: bool) -> bytes | None:
        path = self.directory / self.SECRET
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_size != 32:
                return None
            return path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
        except OSError:
            return None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            return self._secret(create=False)  # another run made it first
        except OSError:
            return None
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        return self._secret(create=False)

    @staticmethod
    def _seal(secret: bytes, key: str, root: str, document: dict[str, Any]) -> str:
        material = canonical_json({"format": FingerprintCache.FORMAT, "key": key, "root_digest": root,
                                   "fingerprint": document})
        return hmac.new(secret, material, hashlib.sha256).hexdigest()

    def get(self, key: str, digests: dict[str, str]) -> Fingerprint | None:
        path = self.directory / f"{key}.json"
        secret = self._secret(create=False)
        if secret is None or not path.is_file():
            return None
        try:
            import json

            envelope = json.loads(path.read_bytes())
            root = root_digest(digests)
            if not (isinstance(envelope, dict) and envelope.get("format") == self.FORMAT
                    and envelope.get("key") == key and envelope.get("root_digest") == root
                    and isinstance(envelope.get("fingerprint"), dict) and isinstance(envelope.get("seal"), str)):
                return None
            if not hmac.compare_digest(envelope["seal"], self._seal(secret, key, root, envelope["fingerprint"])):
                return None
            fp = from_dict(envelope["fingerprint"], str(path))
        except (OSError, ValueError, RecursionError, InputError):
            return None  # a damaged or foreign entry is recomputed, never trusted
        if fp.file_digests != digests or fp.artifact.get("root_digest") not in (None, root):
            return None
        return fp

    def put(self, key: str, fp: Fingerprint, digests: dict[str, str]) -> None:
        """Store a fingerprint computed in this run from the files with these digests."""
        secret = self._secret(create=True)
        if secret is None or fp.file_digests != digests:
            return
        root = root_digest(digests)
        document = fp.to_dict()
        envelope = {"format": self.FORMAT, "key": key, "root_digest": root, "fingerprint": document,
                    "seal": self._seal(secret, key, root, document)}
        try:
            write_bytes(self.directory / f"{key}.json", canonical_json(envelope))
        except InputError:
            pass  # an unwritable cache costs time, not correctness


def _fingerprint(artifact: Artifact, settings: FingerprintSettings, *, name: str, options: VerifyOptions,
                 reader: Any = None, digests: dict[str, str] | None = None) -> Fingerprint:
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
    record = recorded_fp.base
    if record is None:
        return
    try:
        base_path, field_name = _adapter_base(policy, adapter)
    except InputError:
        return  # no base at hand: the recorded base stands as recorded
    with _context(policy, field_name):
        digests = file_digests(resolve(base_path))
    where = f"{policy.path}: {field_name}: candidate.fingerprint {policy.candidate.fingerprint}"
    _check_digests(record.digests, digests, where, "base")


# ------------------------------------------------------------------------------------- candidate


@dataclass(frozen=True)
class OpenedCandidate:
    """What the extractor streams for a candidate: its artifact (or, for an adapter, the merged view)."""

    artifact: Artifact  # whose tensors are fingerprinted
    files: tuple[FileDigest, ...]  # the candidate's own files
    digests: dict[str, str]
    reader: Any = None  # None: open_reader(artifact), by the extractor; an adapter: the merged reader
    base: BaseModelRecord | None = None
    name_mismatches: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _files(artifact: Artifact, digests: dict[str, str]) -> tuple[FileDigest, ...]:
    return tuple(FileDigest(path=f.path, sha256=digests[f.path], size=f.size, role=f.role) for f in artifact.files)


def base_model_record(base: Artifact, digests: dict[str, str]) -> BaseModelRecord:
    """What a result records about the base an adapter was merged onto."""
    files = tuple(FileDigest(path=f.path, sha256=digests[f.path], size=f.size) for f in base.files)
    return BaseModelRecord(name=base.name, layout=base.layout, files=files,
                           root_digest=root_digest({f.path: digests[f.path] for f in base.files}))


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
                     f"(or give the declared base a `model:` path) so it can be merged onto its base",
                     file=str(policy.path), field="candidate.base_model")


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
    with _context(policy, field_name):
        base = resolve(base_path)
        base_digests = file_digests(base)
    names = [n for n in (policy.declared.base, str(base_path), base_path.resolve().name) if n]
    opened = open_model(adapter, base, base_digests=base_digests, declared_base_names=names)
    mismatches = tuple(f.message for f in opened.findings if f.code == "TGV_ADAPTER_BASE_NAME_MISMATCH")
    return OpenedCandidate(artifact=opened.artifact, files=_files(adapter, digests), digests=digests,
                           reader=opened.reader, base=base_model_record(base, base_digests),
                           name_mismatches=mismatches, warnings=opened.artifact.warnings)


def _recorded_candidate(policy: Policy, fp: Fingerprint) -> CandidateOutcome:
    """A candidate known only by a fingerprint file: its digests are as recorded, nothing was hashed."""
    spec = policy.candidate
    files = fp.files
    if not files:
        raise DigestMismatchError(f"{policy.path}: candidate.fingerprint: {spec.fingerprint} records no file "
                                  f"digests, so a verdict could not name the files it is about",
                                  file=str(policy.path), field="candidate.fingerprint")
    recorded_root = fp.artifact.get("root_digest")
    computed_root = root_digest({f.path: f.sha256 for f in files})
    if recorded_root is not None and recorded_root != computed_root:
        raise DigestMismatchError(f"{policy.path}: candidate.fingerprint: {spec.fingerprint} records root digest "
                                  f"{str(recorded_root)[:16]}..., but its file digests give {computed_root[:16]}...",
                                  file=str(policy.path), field="candidate.fingerprint")
    return CandidateOutcome(
        name=spec.name or fp.model_name, fingerprint=fp, fingerprint_digest=fp.digest(), source="fingerprint",
        path=None, fingerprint_path=spec.fingerprint, layout=str(fp.artifact.get("layout", "unknown")), files=files,
        root_digest=computed_root, weights_digest=computed_root, base=fp.base, unexpected=_recorded_unexpected(fp))


def _candidate(policy: Policy, settings: FingerprintSettings, recorded_fp: Fingerprint | None,
               options: VerifyOptions, require_weights: bool) -> tuple[CandidateOutcome, tuple[str, ...]]:
    spec = policy.candidate
    if spec.path is None:
        assert recorded_fp is not None
        return _recorded_candidate(policy, recorded_fp), ()
    with _context(policy, "candidate.path"):

        artifact = resolve(spec.path)
        digests = file_digests(artifact)
        # model_signing's file set of the model path: the artifact's files plus tokenizer, generation config...
        model_digests, listed = model_file_digests(spec.path, artifact, digests)
        name = spec.name or artifact.name
        if recorded_fp is not None:
            _check_digests(recorded_fp.file_digests, digests, f"candidate.fingerprint {spec.fingerprint}")
        if recorded_fp is not None and not require_weights:
            mismatches = _name_mismatches(policy, artifact, spec.base_model) if artifact.layout == "adapter" else ()
            opened = OpenedCandidate(artifact=artifact, files=_files(artifact, digests), digests=digests,
                                     base=recorded_fp.base, name_mismatches=mismatches, warnings=artifact.warnings)
            fp, source = recorded_fp, "model+fingerprint"
        else:
            # the features are recomputed from the weights (candidate.require_weights: a fingerprint file given
            # as well only had to record these files' digests)
            opened = open_candidate(policy, artifact, digests)
            try:
                fp = _fingerprint(opened.artifact, settings, name=name, options=options, reader=opened.reader,
                                  digests=digests)
            finally:
                close = getattr(opened.reader, "close", None)
                if close is not None:
                    close()
            if opened.base is not None:
                fp = fp.with_base(opened.base.to_dict())
            source = "model"
    if source == "model+fingerprint" and artifact.layout == "adapter":
        _check_recorded_base(policy, artifact, fp)
    # files model_signing hashes for the model path that tg-verify does not read (tokenizer, generation config)
    others = tuple(FileDigest(path=f.path, sha256=model_digests[f.path], size=f.size, role=OTHER_ROLE)
                   for f in listed if f.path not in digests)
    return CandidateOutcome(
        name=name, fingerprint=fp, fingerprint_digest=fp.digest(), source=source,  # type: ignore[arg-type]
        path=spec.path, fingerprint_path=spec.fingerprint, layout=artifact.layout, files=opened.files + others,
        root_digest=root_digest(model_digests), weights_digest=root_digest(digests), base=opened.base,
        warnings=opened.warnings,
        symlinks=any(f.symlink for f in listed) or any(artifact.path_of(p).is_symlink() for p in digests),
        unexpected=tuple(t.name for t in opened.artifact.unexpected) or _recorded_unexpected(fp),
    ), opened.name_mismatches


def _recorded_unexpected(fp: Fingerprint) -> tuple[str, ...]:
    """The unexpected tensors a fingerprint recorded when it was made (names only)."""
    names = (fp.extraction or {}).get("unexpected_tensors")
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


def _features_from(candidate: CandidateOutcome) -> str | None:
    """Evidence.features_from: where the candidate's features came from, when not from its weights."""
    if candidate.source == "model":
        return None
    checked = ("its recorded file digests match the files" if candidate.source == "model+fingerprint"
               else "the files were not read")
    return f"the fingerprint file {candidate.fingerprint_path} ({checked})"


# ------------------------------------------------------------------------------------ references


def _reference_fingerprint(policy: Policy, ref: ReferenceSpec, settings: FingerprintSettings,
                           options: VerifyOptions, loaded: dict[str, Fingerprint]) -> tuple[Fingerprint, str]:
    if ref.fingerprint is not None:
        return loaded[ref.id], "fingerprint"
    assert ref.model is not None
    with _context(policy, f"{ref.field}.model"):
        artifact = resolve(ref.model)
        if artifact.layout == "adapter":
            raise InputError(f"{ref.model} is a PEFT adapter; a reference must be a full model (fingerprint the "
                             f"merged model and use `fingerprint:`)")
        digests = file_digests(artifact)
        _check_pin(policy, ref, root_digest(digests), f"model {ref.model} (root digest)")
        cache = FingerprintCache(options.cache_dir) if options.cache_dir is not None else None
        key = cache.key(digests, settings_dict(settings), ref.id) if cache else ""
        cached = cache.get(key, digests) if cache else None
        if cached is not None:
            return cached, "cache"
        fp = _fingerprint(artifact, settings, name=ref.id, options=options, digests=digests)
        if cache:
            cache.put(key, fp, digests)
        return fp, "model"


def _check_compatible(policy: Policy, candidate: Fingerprint, fp: Fingerprint, where: str) -> None:
    """Fingerprints made differently are never compared: an input error naming the policy field."""
    try:
        comparability([candidate, fp])
    except IncompatibleFingerprintsError as exc:
        raise IncompatibleFingerprintsError(f"{policy.path}: {where}: {exc}", file=str(policy.path),
                                            field=where) from None


def _lineage(policy: Policy, candidate: Fingerprint, fp: Fingerprint) -> tuple[LineageResult | None, str | None]:
    if not policy.lineage.enabled:
        return None, None
    if candidate.sketch is None:
        return None, "the candidate fingerprint has no lineage sketch"
    if fp.sketch is None:
        why = "a legacy (paper-format) fingerprint" if fp.legacy else "made without the lineage sketch"
        return None, f"the reference fingerprint has no lineage sketch ({why})"
    from tg_verify.analysis.lineage import lineage_test

    return lineage_test(candidate, fp, alpha=policy.lineage.alpha, min_score=policy.lineage.min_score), None


def lineage_evidence(result: LineageResult) -> LineageEvidence:
    """What the verdict (and the attestation) keep of a lineage test: the decision's numbers, the method and the
    calibrated rate at the score (None where uncalibrated)."""
    def finite(value: float) -> float | None:
        return float(value) if math.isfinite(value) else None

    calibrated = result.comparable and result.calibrated
    return LineageEvidence(score=float(result.score), threshold=float(result.threshold),
                           p_value=float(result.p_value), false_positive_rate=float(result.false_positive_rate),
                           derived=bool(result.derived), comparable=bool(result.comparable),
                           alpha=float(result.alpha), notes=tuple(result.notes), method=result.method,
                           calibration=result.calibration if calibrated else None,
                           null_size=result.null_size if calibrated else None,
                           rate=finite(result.rate) if calibrated else None,
                           rate_upper=finite(result.rate_upper) if calibrated else None,
                           null_scope=(result.null_scope or None) if calibrated else None,
                           block_score=finite(result.block_score), block_threshold=finite(result.block_threshold))


# ------------------------------------------------------------------------------------------ verify


def _load_recorded(policy: Policy) -> tuple[Fingerprint | None, dict[str, Fingerprint]]:
    candidate = None
    if policy.candidate.fingerprint is not None:
        with _context(policy, "candidate.fingerprint"):
            candidate, _ = load_with_digest(policy.candidate.fingerprint)
        if candidate.legacy:
            raise InputError(f"{policy.path}: candidate.fingerprint: {policy.candidate.fingerprint} is in the "
                             f"paper's legacy format (no settings, no file digests); re-fingerprint the candidate",
                             file=str(policy.path), field="candidate.fingerprint")
    refs: dict[str, Fingerprint] = {}
    for ref in policy.references:
        if ref.fingerprint is not None:
            with _context(policy, f"{ref.field}.fingerprint"):
                refs[ref.id], actual = load_with_digest(ref.fingerprint)
            _check_pin(policy, ref, actual, f"fingerprint file {ref.fingerprint}")
    return candidate, refs


def _check_pin(policy: Policy, ref: ReferenceSpec, actual: str, what: str) -> None:
    """A reference pinned by `sha256:` must be exactly that file (or model): a swapped reference is bad input.

    `actual` is the digest of what was read (the fingerprint file's bytes as parsed, the weights as hashed).
    """
    if ref.sha256 is not None and actual != ref.sha256:
        raise DigestMismatchError(f"{policy.path}: {ref.field}.sha256: {what} has sha256 {actual[:16]}..., the "
                                  f"policy pins {ref.sha256[:16]}...", file=str(policy.path),
                                  field=f"{ref.field}.sha256")


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
                f"{anchor.source}; fingerprints made with it would not compare", file=str(policy.path),
                field="fingerprint")
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


def _evidence(candidate: CandidateOutcome, outcomes: list[ReferenceOutcome], classification: Classification,
              name_mismatches: tuple[str, ...], verified_on: _dt.date) -> Evidence:
    return Evidence(
        references=tuple(ReferenceEvidence(id=o.spec.id, family=o.spec.family, distance=o.distance,
                                           threshold=o.threshold,
                                           lineage=lineage_evidence(o.lineage) if o.lineage is not None else None,
                                           lineage_unavailable=o.lineage_unavailable) for o in outcomes),
        attribution=AttributionEvidence(family=classification.family, base=classification.base,
                                        distance=classification.distance,
                                        out_of_cluster=classification.out_of_cluster,
                                        threshold=classification.threshold, meaningful=classification.meaningful,
                                        attribution_meaningful=classification.attribution_meaningful,
                                        not_meaningful=tuple(classification.not_meaningful)),
        adapter_name_mismatches=name_mismatches, artifact_warnings=candidate.warnings,
        unexpected_tensors=candidate.unexpected, caveats=tuple(classification.caveats),
        features_from=_features_from(candidate), verified_on=verified_on)


def verify(policy: Policy, options: VerifyOptions | None = None) -> VerificationResult:
    """Run the policy: fingerprint what needs it, measure, test lineage, decide. Raises on bad input."""
    options = options or VerifyOptions()
    rules = policy.decision_rules(require_weights_default=options.require_weights)
    started = _dt.datetime.now(_dt.timezone.utc)
    clock = _Clock()
    with clock.phase("load"):
        recorded_candidate, recorded_refs = _load_recorded(policy)
        recorded = [fp for fp in (recorded_candidate, *recorded_refs.values()) if fp is not None]
        settings = _choose_settings(policy, recorded, options.device)
    with clock.phase("candidate"):
        candidate, name_mismatches = _candidate(policy, settings, recorded_candidate, options, rules.require_weights)
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
    evidence = _evidence(candidate, outcomes, classification, name_mismatches, started.date())
    return VerificationResult(
        policy=policy, candidate=candidate, references=tuple(outcomes), classification=classification, rules=rules,
        evidence=evidence, verdict=decide(rules, evidence), settings=dict(candidate.fingerprint.settings),
        feature_version=candidate.fingerprint.feature_version, tool=component_versions(), timings=clock.total(),
        caveats=tuple(classification.caveats), time_verified=started)
