"""Fingerprint one model (merging an adapter onto its base) or many, resumably, into a directory.

`fingerprint_model` is the one-model entry point that understands adapters. `run_batch` discovers model
directories, skips those whose fingerprint in OUT is up to date (same settings, same file digests),
continues past broken models and reports every outcome. Docs: docs/adapters.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tg_verify.artifact import Artifact, file_digests, natural_key, resolve
from tg_verify.artifact.layout import ADAPTER_CONFIG, INDEX_NAME, PICKLE_SUFFIXES
from tg_verify.artifact.peft import AdapterFinding
from tg_verify.atomic import write_bytes, write_json
from tg_verify.errors import EXIT_INTERNAL, EXIT_OK, TgVerifyError, UsageError
from tg_verify.fingerprint.document import FEATURE_VERSION, Fingerprint, load
from tg_verify.fingerprint.settings import FingerprintSettings, semantic
from tg_verify.progress import NullProgress, ProgressSink

STATE_DIR = ".tg-batch"  # inside OUT: per-model state (file stats), never *.json at OUT's top level
MAX_DEPTH = 4  # how deep a folder of models is searched for model directories
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------------------------------ one model


@dataclass
class ModelFingerprint:
    """A fingerprint and what was learnt making it: adapter findings (warnings) and artifact warnings."""

    fingerprint: Fingerprint
    artifact: Artifact
    base: Artifact | None = None
    findings: list[AdapterFinding] = field(default_factory=list)

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
        fp.artifact["base"] = opened.base_record
    return ModelFingerprint(fp, artifact, base_artifact, list(opened.findings))


# ------------------------------------------------------------------------------------------ discovery


def looks_like_model(directory: Path) -> bool:
    """A directory tg-verify would try to resolve as one model (weights, an index, an adapter, pickles)."""
    try:
        names = [entry.name for entry in os.scandir(directory)]
    except OSError:
        return False
    return any(n in (ADAPTER_CONFIG, INDEX_NAME) or n.endswith(".safetensors") or n.endswith(PICKLE_SUFFIXES)
               for n in names)


def discover(inputs: Sequence[str | os.PathLike[str]], *, exclude: Sequence[Path] = ()) -> list[Path]:
    """Model paths named by `inputs`, in order, without duplicates.

    Each input is a model itself (a .safetensors file, or a directory holding weights, an index or an
    adapter) or a folder searched up to MAX_DEPTH levels for model directories (hidden directories,
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
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
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


def _up_to_date(fp: Fingerprint, settings: FingerprintSettings, artifact: Artifact, base: Artifact | None,
                state: _State | None, output_bytes: bytes, base_digests: dict[str, str]) -> tuple[bool, str]:
    """Whether an existing fingerprint stands for these files and settings; the reason when not.

    Fast path: the state's (size, mtime, inode) of every file still match. Otherwise the files are
    hashed and compared with the digests the fingerprint records (no re-fingerprinting).
    """
    if fp.legacy or fp.feature_version != FEATURE_VERSION:
        return False, f"feature version {fp.feature_version} is not the current {FEATURE_VERSION}"
    if semantic(fp.settings) != settings.compatibility_key():
        return False, "made with other settings"
    if settings.sketch and fp.sketch is None:
        return False, "lineage sketch missing"
    recorded_base = fp.artifact.get("base")
    if (base is None) != (recorded_base is None):
        return False, "adapter base " + ("added" if base is not None else "dropped")
    sources = [(artifact, fp.artifact)] + ([(base, recorded_base)] if base is not None else [])
    for art, record in sources:
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, list):
            return False, "records no files"
        recorded = {f.get("path"): f.get("size") for f in files if isinstance(f, dict)}
        if recorded != {f.path: f.size for f in art.files}:
            return False, "its files changed (names or sizes)"
    paths = _files_of(artifact) + (_files_of(base) if base is not None else [])
    if state is not None and state.fingerprint_sha256 == hashlib.sha256(output_bytes).hexdigest() \
            and state.files == _stats(paths):
        return True, "up to date (file stats unchanged)"
    for art, record in sources:
        if art is base:
            if not base_digests:
                base_digests.update(file_digests(art))
            digests = base_digests
        else:
            digests = file_digests(art)
        recorded_digests = {f["path"]: f.get("sha256") for f in record["files"]}
        if digests != recorded_digests:
            changed = sorted(p for p in digests if digests[p] != recorded_digests.get(p))
            return False, f"file {changed[0] if changed else '?'} changed (sha256)"
    return True, "up to date (sha256 re-checked)"


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

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "output": str(self.output), "status": self.status,
                "message": self.message, "code": self.code, "seconds": round(self.seconds, 3),
                "warnings": list(self.warnings)}


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


class _ModelProgress:
    """Maps one model's extraction progress onto the batch bar: its share is its file bytes."""

    def __init__(self, outer: ProgressSink, share: int, prefix: str) -> None:
        self.outer, self.share, self.prefix = outer, share, prefix
        self.total = 0.0
        self.sent = 0.0
        describe = getattr(outer, "describe", None)
        self._describe: Callable[[str], None] | None = describe

    def start(self, description: str, total: float | None) -> None:
        self.total = float(total or 0)
        if self._describe is not None:
            self._describe(f"{self.prefix} {description}")

    def advance(self, amount: float = 1.0) -> None:
        if self.total > 0:
            step = min(self.share - self.sent, amount * self.share / self.total)
            if step > 0:
                self.sent += step
                self.outer.advance(step)

    def describe(self, text: str) -> None:
        if self._describe is not None:
            self._describe(f"{self.prefix} {text}")

    def finish(self) -> None:
        if self.sent < self.share:
            self.outer.advance(self.share - self.sent)
            self.sent = float(self.share)


def _size(path: Path) -> int:
    """Bytes of a model's files, cheaply (for progress shares); 0 when unreadable."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def run_batch(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              settings: FingerprintSettings, *, base: str | os.PathLike[str] | None = None, force: bool = False,
              progress: ProgressSink | None = None, threads: int | None = None,
              on_outcome: Callable[[BatchOutcome], None] | None = None) -> BatchResult:
    """Fingerprint every model named by `inputs` into `out_dir`, resuming where a previous run stopped.

    Each fingerprint is written atomically to OUT/<name>-<hash>.json, then its state (file stats) to
    OUT/.tg-batch/, so a killed run leaves only complete fingerprints. Adapters are merged onto `base`.
    `threads`: as `fingerprint_artifact` (checked here, once, not per model).
    """
    from tg_verify.fingerprint.workers import check_threads

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
    base_digests: dict[str, str] = {}
    sink = progress or NullProgress()
    shares = [max(_size(m), 1) for m in models]
    base_share = _size(Path(base)) if base is not None else 0
    sink.start(f"batch: {len(models)} models", total=sum(shares))
    outcomes: list[BatchOutcome] = []
    for number, (model, share) in enumerate(zip(models, shares), start=1):
        stem = output_stem(model)
        output = out / f"{stem}.json"
        model_sink = _ModelProgress(sink, share, f"[{number}/{len(models)}]")
        started = time.perf_counter()
        try:
            outcome = _one(model, output, out / STATE_DIR / f"{stem}.state", settings, base_artifact, base_error,
                           force, model_sink, base_share, base_digests, threads)
        except TgVerifyError as exc:
            outcome = BatchOutcome(model, output, "failed", str(exc), exc.code, exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - one broken model must not stop the batch
            outcome = BatchOutcome(model, output, "failed", f"internal error: {type(exc).__name__}: {exc}",
                                   "TGV_INTERNAL", EXIT_INTERNAL)
        model_sink.finish()
        outcome = replace(outcome, seconds=time.perf_counter() - started)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return BatchResult(tuple(outcomes))


def _one(model: Path, output: Path, state_path: Path, settings: FingerprintSettings, base: Artifact | None,
         base_error: TgVerifyError | None, force: bool, sink: _ModelProgress, base_share: int,
         base_digests: dict[str, str], threads: int | None) -> BatchOutcome:
    artifact = resolve(model)
    if artifact.layout == "adapter":
        if base_error is not None:
            raise base_error
        if base is not None:
            sink.share += base_share
    else:
        base = None
    if output.exists() and not force:
        existing: Fingerprint | None
        try:
            output_bytes = output.read_bytes()
            existing = load(output)
        except (TgVerifyError, OSError):
            existing, reason = None, "existing fingerprint unreadable"
        if existing is not None:
            fresh, reason = _up_to_date(existing, settings, artifact, base, _read_state(state_path), output_bytes,
                                         base_digests)
            if fresh:
                if "sha256" in reason:  # next time the stats alone will do
                    _write_state(state_path, model, artifact, base, output_bytes)
                return BatchOutcome(model, output, "skipped", reason)
        recompute = f"recomputed: {reason}"
    else:
        recompute = "computed" if not force else "recomputed (--force)"
    if base is not None and not base_digests:
        base_digests.update(file_digests(base))
    result = fingerprint_model(artifact, settings, base=base, progress=sink, base_digests=base_digests or None,
                               threads=threads)
    data = result.fingerprint.to_json_bytes()
    write_bytes(output, data)
    _write_state(state_path, model, artifact, base, data)
    return BatchOutcome(model, output, "computed", recompute, warnings=tuple(result.warnings))


def _write_state(path: Path, model: Path, artifact: Artifact, base: Artifact | None, data: bytes) -> None:
    paths = _files_of(artifact) + (_files_of(base) if base is not None else [])
    state = _State(str(model.resolve()), _stats(paths), hashlib.sha256(data).hexdigest())
    write_json(path, state.to_dict())


__all__ = ["BatchOutcome", "BatchResult", "ModelFingerprint", "discover", "fingerprint_model", "looks_like_model",
           "output_stem", "run_batch"]
