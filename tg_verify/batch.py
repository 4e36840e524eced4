"""Fingerprint one model (merging an adapter onto its base) or many, resumably, into a directory.

`fingerprint_model` is the one-model entry point that understands adapters. `run_batch` discovers model
directories, skips those whose fingerprint in OUT is up to date (same settings, same file digests),
continues past broken models and reports every outcome. Where each model's work runs is an executor's
choice (tg_verify/scale/executor.py: this process, or Ray tasks); what is skipped, written and reported
is decided here, once, and only this process writes. Docs: docs/adapters.md, docs/scale.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tg_verify.artifact import Artifact, file_digests, natural_key, resolve
from tg_verify.artifact.gguf import is_gguf_path
from tg_verify.artifact.layout import ADAPTER_CONFIG, INDEX_NAME, PICKLE_SUFFIXES
from tg_verify.artifact.peft import AdapterFinding
from tg_verify.atomic import write_bytes, write_json
from tg_verify.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    ExecutorError,
    InputError,
    TgVerifyError,
    UsageError,
)
from tg_verify.fingerprint.document import FEATURE_VERSION, Fingerprint, load
from tg_verify.fingerprint.settings import FingerprintSettings, semantic
from tg_verify.progress import NullProgress, ProgressSink

if TYPE_CHECKING:
    from tg_verify.scale.executor import Executor, JobResult

STATE_DIR = ".tg-batch"  # inside OUT: per-model state (file stats), never *.json at OUT's top level
MAX_DEPTH = 4  # how deep a folder of models is searched for model directories
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------------------------------ one model


@dataclass(frozen=True)
class ModelFingerprint:
    """A fingerprint and what was learnt making it: adapter findings (warnings) and artifact warnings."""

    fingerprint: Fingerprint
    artifact: Artifact
    base: Artifact | None = None
    findings: tuple[AdapterFinding, ...] = ()

    @property
    def warnings(self) -> list[str]:
        notes = list(self.artifact.warnings) + (list(self.base.warnings) if self.base is not None else [])
        unexpected = (self.fingerprint.extraction or {}).get("unexpected_tensors") or []
        if unexpected:
            notes.append(f"TGV_UNEXPECTED_TENSORS: {len(unexpected)} stored tensor(s) that the runtime does not load "
                         f"were left out of the fingerprint: " + ", ".join(repr(n) for n in unexpected[:5])
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
        return notes + [f.message for f in self.findings if f.severity == "warning"]


def fingerprint_model(path: str | os.PathLike[str] | Artifact, settings: FingerprintSettings, *,
                      base: str | os.PathLike[str] | Artifact | None = None, progress: ProgressSink | None = None,
                      model_name: str | None = None, declared_base_names: Sequence[str] = (),
                      base_digests: dict[str, str] | None = None, threads: int | None = None) -> ModelFingerprint:
    """Fingerprint a model; an adapter is merged onto `base` first and its document records the base files.

    A full model given a `base` ignores it. `declared_base_names` (e.g. the policy's base id and path)
    are compared with the adapter's base_model_name_or_path, a warning finding on mismatch.
    `base_digests` saves re-hashing a base shared by many adapters. `threads`: as `fingerprint_artifact`.
    """
    from tg_verify.artifact.merge import open_model
    from tg_verify.fingerprint.extract import fingerprint_artifact

    artifact = path if isinstance(path, Artifact) else resolve(path)
    base_artifact = None
    if artifact.layout == "adapter" and base is not None:
        base_artifact = base if isinstance(base, Artifact) else resolve(base)
    with open_model(artifact, base_artifact, base_digests=base_digests,
                    declared_base_names=declared_base_names) as opened:
        fp = fingerprint_artifact(opened.artifact, settings, reader=opened.reader, progress=progress,
                                  model_name=model_name, threads=threads)
    if opened.base_record is not None:
        fp = fp.with_base(opened.base_record)
    return ModelFingerprint(fp, artifact, base_artifact, tuple(opened.findings))


# ------------------------------------------------------------------------------------------ discovery


def looks_like_model(directory: Path) -> bool:
    """A directory tg-verify would try to resolve as one model (weights, an index, an adapter, pickles)."""
    try:
        names = [entry.name for entry in os.scandir(directory)]
    except OSError:
        return False
    return any(n in (ADAPTER_CONFIG, INDEX_NAME) or n.endswith(".safetensors") or n.endswith(PICKLE_SUFFIXES)
               for n in names)


def gguf_files(directory: Path) -> list[Path]:
    """The .gguf files of a directory holding no other model: each is a whole model (a repository of GGUF
    quantisations holds one per type), so each is its own batch input."""
    try:
        entries = [e for e in os.scandir(directory) if is_gguf_path(e.name) and not e.name.startswith(".")]
    except OSError:
        return []
    return [Path(e.path) for e in sorted(entries, key=lambda e: natural_key(e.name))]


def discover(inputs: Sequence[str | os.PathLike[str]], *, exclude: Sequence[Path] = ()) -> list[Path]:
    """Model paths named by `inputs`, in order, without duplicates.

    Each input is a model itself (a .safetensors or .gguf file, or a directory holding weights, an index or an
    adapter) or a folder searched up to MAX_DEPTH levels for model directories and .gguf files (hidden directories,
    symbolic links and `exclude` are not entered). Missing inputs are a usage error.
    """
    excluded = {p.resolve() for p in exclude}
    found: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(path)

    def walk(directory: Path, depth: int) -> Iterator[Path]:
        if directory.resolve() in excluded:
            return
        if looks_like_model(directory):
            yield directory
            return
        ggufs = gguf_files(directory)
        if ggufs:
            yield from ggufs
            return
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted((e for e in os.scandir(directory)
                               if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)),
                              key=lambda e: natural_key(e.name))
        except OSError as exc:
            raise UsageError(f"{directory}: cannot list directory ({exc.strerror or exc})") from exc
        for child in children:
            yield from walk(Path(child.path), depth + 1)

    for item in inputs:
        path = Path(item)
        if not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or directory (a --batch input)")
        if path.is_file() or os.path.islink(path):
            add(path)  # resolve() reports what is wrong with it
            continue
        for model in walk(path, 0):
            add(model)
    return found


def output_stem(model: Path) -> str:
    """Stable, collision-free file stem for a model's fingerprint: its name plus a hash of its real path."""
    real = str(model.resolve())
    name = model.resolve().name
    for suffix in (".safetensors", ".gguf", ".GGUF"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    safe = _UNSAFE.sub("_", name).strip("._-")[:80] or "model"
    return f"{safe}-{hashlib.sha256(real.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


# ------------------------------------------------------------------------------------------ resume


def _stats(paths: Sequence[Path]) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for path in paths:
        info = os.stat(path)
        result[str(path.resolve())] = [info.st_size, info.st_mtime_ns, info.st_ino]
    return result


def _files_of(artifact: Artifact) -> list[Path]:
    return [artifact.path_of(f.path) for f in artifact.files]


@dataclass(frozen=True)
class _State:
    """What OUT/.tg-batch/<stem>.state records: the source, its files' stats, the fingerprint's sha256."""

    source: str
    files: dict[str, list[int]]
    fingerprint_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "files": self.files, "fingerprint_sha256": self.fingerprint_sha256}


def _read_state(path: Path) -> _State | None:
    import json

    try:
        document = json.loads(path.read_text("utf-8"))
        return _State(str(document["source"]), {k: list(v) for k, v in document["files"].items()},
                      str(document["fingerprint_sha256"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _record_mismatch(fp: Fingerprint, settings: FingerprintSettings, artifact: Artifact,
                     base: Artifact | None) -> str | None:
    """Why an existing fingerprint cannot stand for these files and settings, from its record alone; None if it can.

    What the record cannot tell (whether the bytes changed under the same names and sizes) is left to
    the file stats (`_stats_unchanged`) or, failing those, the sha256 re-check (`_digest_mismatch`).
    """
    if fp.legacy or fp.feature_version != FEATURE_VERSION:
        return f"feature version {fp.feature_version} is not the current {FEATURE_VERSION}"
    if semantic(fp.settings) != settings.compatibility_key():
        return "made with other settings"
    if settings.sketch and fp.sketch is None:
        return "lineage sketch missing"
    recorded_base = fp.artifact.get("base")
    if (base is None) != (recorded_base is None):
        return "adapter base " + ("added" if base is not None else "dropped")
    for art, record in _sources(fp, artifact, base):
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, list):
            return "records no files"
        recorded = {f.get("path"): f.get("size") for f in files if isinstance(f, dict)}
        if recorded != {f.path: f.size for f in art.files}:
            return "its files changed (names or sizes)"
    return None


def _sources(fp: Fingerprint, artifact: Artifact, base: Artifact | None) -> list[tuple[Artifact, Any]]:
    return [(artifact, fp.artifact)] + ([(base, fp.artifact.get("base"))] if base is not None else [])


def _stats_unchanged(state: _State | None, output_bytes: bytes, paths: Sequence[Path]) -> bool:
    """The fast path: the state names this fingerprint and every file's (size, mtime, inode) is unchanged."""
    return (state is not None and state.fingerprint_sha256 == hashlib.sha256(output_bytes).hexdigest()
            and state.files == _stats(paths))


def _digest_mismatch(fp: Fingerprint, artifact: Artifact, base: Artifact | None,
                     base_digests: dict[str, str]) -> str | None:
    """Hash the files and compare with the digests the fingerprint records; the first difference, or None."""
    for art, record in _sources(fp, artifact, base):
        digests = (base_digests or file_digests(art)) if art is base else file_digests(art)
        recorded_digests = {f["path"]: f.get("sha256") for f in record["files"]}
        if digests != recorded_digests:
            changed = sorted(p for p in digests if digests[p] != recorded_digests.get(p))
            return f"file {changed[0] if changed else '?'} changed (sha256)"
    return None


# ------------------------------------------------------------------------------------------ batch


Status = Literal["computed", "skipped", "failed"]


@dataclass(frozen=True)
class BatchOutcome:
    """What happened to one model: computed, skipped (up to date) or failed, and why."""

    source: Path
    output: Path
    status: Status
    message: str
    code: str | None = None  # the error's TGV_* code when failed
    exit_code: int = EXIT_OK
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()
    attempts: int = 1  # more than one: its worker was lost and the job re-run (distributed executors)
    cpu_seconds: float = 0.0  # CPU time of its job (all threads of the process that ran it)

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "output": str(self.output), "status": self.status,
                "message": self.message, "code": self.code, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "warnings": list(self.warnings),
                "attempts": self.attempts}


@dataclass(frozen=True)
class BatchResult:
    """Every model's outcome, in discovery order."""

    outcomes: tuple[BatchOutcome, ...]

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def exit_code(self) -> int:
        """0 when every model has an up-to-date fingerprint; else the worst failure (2 input, 3 internal)."""
        return max((o.exit_code for o in self.outcomes), default=EXIT_OK)

    def to_dict(self) -> dict[str, Any]:
        return {"computed": self.count("computed"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "exit_code": self.exit_code,
                "models": [o.to_dict() for o in self.outcomes]}


def _size(path: Path) -> int:
    """Bytes of a model's files, cheaply (for progress shares); 0 when unreadable."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


@dataclass(frozen=True)
class _Planned:
    """A model the driver could not settle from its record and file stats, and what its job must do."""

    number: int  # position in discovery order
    model: Path
    output: Path
    state_path: Path
    recheck: Fingerprint | None  # the fingerprint in OUT to re-check by sha256 (None: compute)
    existing_bytes: bytes  # its bytes, for the state written when it proves up to date
    reason: str  # the outcome message when the job computes (the re-check finds its own)


@dataclass(frozen=True)
class _JobValue:
    """What a fingerprint job hands back: its outcome, the bytes to write and the files they stand for.

    Jobs write nothing: the driver writes the fingerprint, then its state, so a job re-run after its
    worker was lost, or on another machine, leaves exactly what a local run leaves.
    """

    status: Status
    message: str
    code: str | None = None
    exit_code: int = EXIT_OK
    data: bytes | None = None  # a new fingerprint for OUT
    files: tuple[str, ...] = ()  # the model's (and base's) files, whose stats the state records
    restate: bool = False  # up to date after a sha256 re-check: record fresh stats
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def run_batch(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              settings: FingerprintSettings, *, base: str | os.PathLike[str] | None = None, force: bool = False,
              progress: ProgressSink | None = None, threads: int | None = None,
              on_outcome: Callable[[BatchOutcome], None] | None = None,
              executor: Executor | None = None) -> BatchResult:
    """Fingerprint every model named by `inputs` into `out_dir`, resuming where a previous run stopped.

    Each fingerprint is written atomically to OUT/<name>-<hash>.json, then its state (file stats) to
    OUT/.tg-batch/, so a killed run leaves only complete fingerprints. Adapters are merged onto `base`.
    This process plans every model (up to date by record and file stats: skipped here) and writes every
    file; the models left to hash or fingerprint become jobs for `executor` (default: this process, in
    order; `tg_verify.scale.executor.make_executor("ray")` for a Ray cluster), each placed by its
    estimated working set. What is skipped, written and reported does not depend on the executor.
    `threads`: per job, as `fingerprint_artifact` (checked here, once); default: the executor's.
    """
    from tg_verify.fingerprint.workers import check_threads, default_threads
    from tg_verify.scale.executor import Job, LocalExecutor
    from tg_verify.scale.memory import working_set

    if threads is not None:
        check_threads(threads)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: --out-dir exists and is not a directory")
    models = discover(inputs, exclude=[out])
    if not models:
        raise UsageError(f"no model directories found under {', '.join(str(i) for i in inputs)}")
    base_artifact: Artifact | None = None
    base_error: TgVerifyError | None = None
    if base is not None:
        try:
            base_artifact = resolve(base)
        except TgVerifyError as exc:
            base_error = exc
    runner = executor or LocalExecutor()
    job_threads = threads if threads is not None else runner.default_threads
    cpus = job_threads or default_threads()
    base_digests: dict[str, str] = {}
    sink = progress or NullProgress()
    shares = [max(_size(m), 1) for m in models]
    base_share = _size(Path(base)) if base is not None else 0
    sink.start(f"batch: {len(models)} models", total=sum(shares))
    outcomes: list[BatchOutcome | None] = [None] * len(models)
    planned: list[_Planned] = []

    def settle(number: int, outcome: BatchOutcome) -> None:
        outcomes[number] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    def jobs() -> Iterator[Job]:
        for number, (model, share) in enumerate(zip(models, shares)):
            stem = output_stem(model)
            output, state_path = out / f"{stem}.json", out / STATE_DIR / f"{stem}.state"
            started = time.perf_counter()
            try:
                plan = _plan(number, model, output, state_path, settings, base_artifact, base_error, force)
                if isinstance(plan, BatchOutcome):
                    sink.advance(share)
                    settle(number, replace(plan, seconds=time.perf_counter() - started))
                    continue
                planned_item, artifact = plan
                adapter_base = base_artifact if artifact.layout == "adapter" else None
                adapter = adapter_base is not None
                if adapter_base is not None and not base_digests:
                    base_digests.update(file_digests(adapter_base))  # once for the batch, on this machine
            except TgVerifyError as exc:
                sink.advance(share)
                settle(number, BatchOutcome(model, output, "failed", str(exc), exc.code, exc.exit_code,
                                            seconds=time.perf_counter() - started))
                continue
            except Exception as exc:  # noqa: BLE001 - one broken model must not stop the batch
                sink.advance(share)
                settle(number, BatchOutcome(model, output, "failed", f"internal error: {type(exc).__name__}: {exc}",
                                            "TGV_INTERNAL", EXIT_INTERNAL, seconds=time.perf_counter() - started))
                continue
            planned.append(planned_item)
            memory = working_set(artifact, cpus, settings.repeats, base=adapter_base)
            yield Job(_fingerprint_job, (model, settings, adapter_base.root if adapter_base is not None else None,
                                         dict(base_digests) if adapter else {}, planned_item.recheck,
                                         planned_item.reason, job_threads),
                      label=f"[{number + 1}/{len(models)}]", memory=memory, cpus=cpus,
                      share=share + (base_share if adapter else 0))

    try:
        for position, result in runner.run(jobs(), sink):
            item = planned[position]
            settle(item.number, _commit(item, result))
    finally:
        if executor is None:
            runner.close()
    return BatchResult(tuple(o for o in outcomes if o is not None))


def _plan(number: int, model: Path, output: Path, state_path: Path, settings: FingerprintSettings,
          base: Artifact | None, base_error: TgVerifyError | None, force: bool
          ) -> BatchOutcome | tuple[_Planned, Artifact]:
    """Settle a model from what this machine can see cheaply (its headers, its record, file stats), or plan its job."""
    artifact = resolve(model)
    if artifact.layout == "adapter":
        if base_error is not None:
            raise base_error
    else:
        base = None
    output_bytes = b""
    if output.exists() and not force:
        existing: Fingerprint | None
        try:
            output_bytes = output.read_bytes()
            existing = load(output)
        except (TgVerifyError, OSError):
            existing, reason = None, "existing fingerprint unreadable"
        if existing is not None:
            mismatch = _record_mismatch(existing, settings, artifact, base)
            if mismatch is None:
                paths = _files_of(artifact) + (_files_of(base) if base is not None else [])
                if _stats_unchanged(_read_state(state_path), output_bytes, paths):
                    return BatchOutcome(model, output, "skipped", "up to date (file stats unchanged)")
                # same names and sizes, other stats: the job hashes the files and says which changed, if any
                return _Planned(number, model, output, state_path, existing, output_bytes, ""), artifact
            reason = mismatch
        recompute = f"recomputed: {reason}"
    else:
        recompute = "computed" if not force else "recomputed (--force)"
    return _Planned(number, model, output, state_path, None, output_bytes, recompute), artifact


def _fingerprint_job(model: Path, settings: FingerprintSettings, base: Path | None, base_digests: dict[str, str],
                     recheck: Fingerprint | None, reason: str, threads: int | None, *,
                     progress: ProgressSink) -> _JobValue:
    """One model's job, wherever it runs: re-check an existing fingerprint by sha256, or fingerprint the model.

    Reads only the model (and base) files; errors come back as a failed value, never as an exception.
    """
    started, cpu = time.perf_counter(), time.process_time()
    try:
        value = _fingerprint_work(model, settings, base, base_digests, recheck, reason, threads, progress)
    except TgVerifyError as exc:
        value = _JobValue("failed", str(exc), exc.code, exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - one broken model must not stop the batch
        value = _JobValue("failed", f"internal error: {type(exc).__name__}: {exc}", "TGV_INTERNAL", EXIT_INTERNAL)
    return replace(value, seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu)


def _fingerprint_work(model: Path, settings: FingerprintSettings, base: Path | None, base_digests: dict[str, str],
                      recheck: Fingerprint | None, reason: str, threads: int | None,
                      progress: ProgressSink) -> _JobValue:
    artifact = resolve(model)
    base_artifact = resolve(base) if base is not None and artifact.layout == "adapter" else None
    paths = _files_of(artifact) + (_files_of(base_artifact) if base_artifact is not None else [])
    files = tuple(str(p) for p in paths)
    if recheck is not None:
        mismatch = _record_mismatch(recheck, settings, artifact, base_artifact)
        if mismatch is None:
            mismatch = _digest_mismatch(recheck, artifact, base_artifact, base_digests)
        if mismatch is None:
            return _JobValue("skipped", "up to date (sha256 re-checked)", files=files, restate=True)
        reason = f"recomputed: {mismatch}"
    if base_artifact is not None and not base_digests:
        base_digests = file_digests(base_artifact)
    result = fingerprint_model(artifact, settings, base=base_artifact, progress=progress,
                               base_digests=base_digests or None, threads=threads)
    return _JobValue("computed", reason, data=result.fingerprint.to_json_bytes(), files=files,
                     warnings=tuple(result.warnings))


def _commit(item: _Planned, result: JobResult) -> BatchOutcome:
    """Write what a finished job produced (fingerprint first, then its state) and say what happened."""
    from tg_verify.scale.executor import JobLost

    if isinstance(result, JobLost):
        code = "TGV_INTERNAL" if result.message.startswith("internal error") else ExecutorError.code
        return BatchOutcome(item.model, item.output, "failed", result.message, code, EXIT_INTERNAL,
                            attempts=result.attempts)
    value: _JobValue = result.value
    outcome = BatchOutcome(item.model, item.output, value.status, value.message, value.code, value.exit_code,
                           seconds=value.seconds, warnings=value.warnings, attempts=result.attempts,
                           cpu_seconds=value.cpu_seconds)
    try:
        if value.data is not None:
            write_bytes(item.output, value.data)
            _write_state(item.state_path, item.model, value.files, value.data)
        elif value.restate:
            _write_state(item.state_path, item.model, value.files, item.existing_bytes)
    except TgVerifyError as exc:
        return replace(outcome, status="failed", message=str(exc), code=exc.code, exit_code=exc.exit_code)
    except OSError as exc:
        return replace(outcome, status="failed", message=f"{item.model}: cannot record its state ({exc})",
                       code=InputError.code, exit_code=InputError.exit_code)
    return outcome


def _write_state(path: Path, model: Path, files: Sequence[str], data: bytes) -> None:
    state = _State(str(model.resolve()), _stats([Path(f) for f in files]), hashlib.sha256(data).hexdigest())
    write_json(path, state.to_dict())


__all__ = ["BatchOutcome", "BatchResult", "ModelFingerprint", "discover", "fingerprint_model", "looks_like_model",
           "output_stem", "run_batch"]
