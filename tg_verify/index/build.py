"""Building and updating a reference index: signatures computed in parallel jobs, written by this process.

`add_references` (which `index build` runs on an empty index) splits the fingerprint files into chunks,
one executor job each (tg_verify/scale/executor.py: in this process, or Ray tasks): a job reads and
validates its fingerprints, computes their signatures and returns them with the canonical bytes to
store; only this process writes, under the index's lock, and the manifest last. References already
indexed with the same content are left alone; with other content they are stale, replaced only when
asked. `remove_references` rewrites the shards that held them; `verify_index` re-derives everything
the index claims (stored fingerprints against their digests, signatures and features against the
stored fingerprints, and optionally the source files against what was indexed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tg_verify.analysis.references import Label, fingerprint_paths
from tg_verify.errors import EXIT_OK, IndexFormatError, InputError, TgVerifyError, UsageError
from tg_verify.escaping import shown
from tg_verify.fingerprint.document import load
from tg_verify.fingerprint.settings import semantic
from tg_verify.index.signature import fingerprint_signature
from tg_verify.index.store import (
    MANIFEST,
    SHARD_SIZE,
    Entry,
    ReferenceIndex,
    Shard,
    collect_garbage,
    commit,
    feature_vector,
    locked,
    open_index,
    stored_fingerprint,
    write_blob,
    write_shard,
)
from tg_verify.progress import NullProgress, ProgressSink
from tg_verify.scale.executor import Executor, Job, JobLost, LocalExecutor

CHUNK = 64  # fingerprints per job: enough to amortise a task, small enough to spread over a cluster
IdFrom = Literal["name", "file"]


@dataclass(frozen=True)
class Prepared:
    """One fingerprint made ready for the index by a job: its signature, features and canonical bytes."""

    path: str
    model_name: str
    sha256: str
    data: bytes
    signature: np.ndarray  # float16 [DIMS]
    features: np.ndarray  # float64 [16]
    feature_version: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    """A fingerprint a job could not index, and why."""

    path: str
    message: str
    code: str


def prepare(path: str) -> Prepared:
    """Read one fingerprint file (validated) and compute what the index stores about it."""
    fingerprint = load(path)
    if fingerprint.legacy:
        raise InputError(f"{path}: a legacy fingerprint (the paper's release format) has no lineage sketch to "
                         "index; re-fingerprint the model with tg-verify")
    signature = fingerprint_signature(fingerprint)
    if signature is None:
        reason = "no lineage sketch" if fingerprint.sketch is None else "a lineage sketch without usable units"
        raise InputError(f"{path}: {reason}; the index retrieves references by their sketch "
                         "(fingerprint without --no-sketch)")
    data = fingerprint.to_json_bytes()
    return Prepared(path=path, model_name=fingerprint.model_name, sha256=hashlib.sha256(data).hexdigest(),
                    data=data, signature=signature.astype(np.float16), features=feature_vector(fingerprint),
                    feature_version=fingerprint.feature_version, settings=semantic(fingerprint.settings))


def prepare_job(paths: tuple[str, ...], *, progress: ProgressSink) -> list[Prepared | Rejected]:
    """An executor job: `prepare` each path; problems come back as Rejected, never as exceptions."""
    progress.start("index: signatures", len(paths))
    out: list[Prepared | Rejected] = []
    for path in paths:
        try:
            out.append(prepare(path))
        except TgVerifyError as exc:
            out.append(Rejected(path, str(exc), exc.code))
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the build
            out.append(Rejected(path, f"internal error: {type(exc).__name__}: {exc}", "TGV_INTERNAL"))
        progress.advance(1)
    return out


@dataclass
class IndexReport:
    """What an index operation did: references added, replaced, unchanged, removed, and every problem."""

    index: Path
    digest: str = ""
    count: int = 0
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what, message)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if not self.problems else InputError.exit_code

    def to_dict(self) -> dict[str, Any]:
        return {"index": str(self.index), "digest": self.digest, "count": self.count, "added": self.added,
                "replaced": self.replaced, "unchanged": self.unchanged, "removed": self.removed,
                "problems": [{"what": w, "message": m} for w, m in self.problems], "notes": self.notes}


def _chunks(paths: Sequence[Path]) -> Iterator[Job]:
    for start in range(0, len(paths), CHUNK):
        part = tuple(str(p) for p in paths[start:start + CHUNK])
        yield Job(prepare_job, (part,), label=f"[{start // CHUNK + 1}/{-(-len(paths) // CHUNK)}]",
                  memory=256 * 2**20 + 8 * 2**20 * len(part), share=float(len(part)))


def _identify(item: Prepared, id_from: IdFrom, labels: Mapping[str, Label] | None) -> tuple[str, str, bool, str | None]:
    """(id, family, base, parent) of a prepared fingerprint, from its name or file and the labels."""
    stem = Path(item.path).name.removesuffix(".json")
    ident = item.model_name if id_from == "name" and item.model_name else stem
    for what, text in (("model name", item.model_name), ("reference id", ident)):
        if text and not text.isprintable():  # the index stores printable names only (store._text refuses others)
            raise InputError(f"{what} '{shown(text)}' holds control characters; an index stores printable names "
                             "only")
    if labels is None:
        return ident, ident, True, None
    label = labels.get(ident) or labels.get(stem)
    if label is None:
        raise InputError(f"{item.path}: reference {ident!r} has no entry in the labels file")
    return ident, label.family, label.base, label.parent


def add_references(index_dir: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *,
                   labels: Mapping[str, Label] | None = None, id_from: IdFrom = "name", replace: bool = False,
                   create: bool = False, executor: Executor | None = None,
                   progress: ProgressSink | None = None) -> IndexReport:
    """Index the fingerprints named by `inputs` (files, or directories of *.json) into `index_dir`.

    `create`: the index must not exist yet (`index build`); otherwise it must (`index add`). A reference
    whose id is indexed already with the same content is unchanged; with other content it is stale:
    replaced with `replace`, else a problem. Unreadable or sketch-less fingerprints are problems too;
    the others are indexed all the same (exit 2 when any problem was reported).
    """
    root = Path(index_dir)
    if create and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root}: exists and is not empty; `tg-verify index add {root} FP...` adds to an index")
    if not create and not (root / MANIFEST).exists():
        raise IndexFormatError(f"{root}: not a tg-verify reference index (no {MANIFEST}); make one with "
                               "`tg-verify index build FP... -o INDEX`")
    paths = fingerprint_paths(inputs)
    if not paths:
        raise UsageError("no fingerprint files given")
    report = IndexReport(root)
    runner = executor or LocalExecutor()
    sink = progress or NullProgress()
    with locked(root):
        index = open_index(root) if not create else None
        if create:
            commit(root, [], {})  # an empty, valid index: the first commit point
            index = open_index(root)
        assert index is not None
        sink.start(f"index: {len(paths)} fingerprints", total=float(len(paths)))
        prepared: list[Prepared] = []
        try:
            for _position, result in runner.run(_chunks(paths), sink):
                if isinstance(result, JobLost):
                    report.problems.append(("job", result.message))
                    continue
                for item in result.value:
                    if isinstance(item, Rejected):
                        report.problems.append((item.path, item.message))
                    else:
                        prepared.append(item)
        finally:
            if executor is None:
                runner.close()
        _merge(index, prepared, labels, id_from, replace, report)
    return report


def _merge(index: ReferenceIndex, prepared: list[Prepared], labels: Mapping[str, Label] | None, id_from: IdFrom,
           replace: bool, report: IndexReport) -> None:
    """Check ids, settings and staleness, then write the new shards and commit (under the caller's lock)."""
    references = dict(index.references)
    existing = {entry.id: entry for entry in index.entries}
    order = sorted(prepared, key=lambda item: item.path)  # the same index whatever order jobs finished in
    new: dict[str, tuple[Entry, Prepared]] = {}
    for item in order:
        try:
            ident, family, base, parent = _identify(item, id_from, labels)
        except InputError as exc:
            report.problems.append((item.path, str(exc)))
            continue
        key = {"feature_version": item.feature_version, "settings": item.settings}
        if not references:
            references = key
        elif key != references:
            report.problems.append((item.path, f"fingerprinted with feature version {item.feature_version} and other "
                                               "settings than the index's references; re-fingerprint it alike"))
            continue
        if ident in new:
            report.problems.append((item.path, f"reference id {ident!r} is also the id of {new[ident][1].path}; ids "
                                               "must be unique (--id-from file, or model names that differ)"))
            continue
        entry = Entry(ident, family, base, parent, item.model_name, item.sha256, str(Path(item.path).resolve()))
        old = existing.get(ident)
        if old is not None and replace_key(old) == replace_key(entry):
            report.unchanged.append(ident)
            continue
        if old is not None and not replace:
            report.problems.append((item.path, f"reference {ident!r} is indexed already with other content or labels "
                                               "(stale?): `tg-verify index add --replace` updates it"))
            continue
        new[ident] = (entry, item)
        (report.replaced if old is not None else report.added).append(ident)
    if not new:
        report.digest, report.count = index.digest, len(index.entries)
        return
    for entry, item in new.values():
        write_blob(index.root, entry.fingerprint_sha256, item.data)
    kept = [s for s in index.shards if not any(e.id in new for e in s.entries)]
    rewritten = [_without(s, set(new)) for s in index.shards if any(e.id in new for e in s.entries)]
    items = list(new.values())
    added = []
    for start in range(0, len(items), SHARD_SIZE):
        part = items[start:start + SHARD_SIZE]
        added.append(Shard(tuple(e for e, _ in part), np.stack([p.signature for _, p in part]),
                           np.stack([p.features for _, p in part])))
    _rewrite(index, kept, [s for s in rewritten if s.entries] + added, references, report)


def replace_key(entry: Entry) -> tuple[Any, ...]:
    """What makes two entries the same reference (the path it was read from does not)."""
    return entry.id, entry.family, entry.base, entry.parent, entry.model_name, entry.fingerprint_sha256


def _without(shard: Shard, ids: set[str]) -> Shard:
    keep = [n for n, e in enumerate(shard.entries) if e.id not in ids]
    return Shard(tuple(shard.entries[n] for n in keep), shard.signatures[keep], shard.features[keep])


def _rewrite(index: ReferenceIndex, kept: list[Shard], written: list[Shard], references: dict[str, Any],
             report: IndexReport) -> None:
    records = [r for r, s in zip(index.manifest["shards"], index.shards) if any(s is k for k in kept)]
    records += [write_shard(index.root, shard) for shard in written]
    shards = kept + written
    report.digest = commit(index.root, records, references if any(s.entries for s in shards) else {})
    report.count = sum(len(s.entries) for s in shards)
    collect_garbage(index.root, shards, records)


def remove_references(index_dir: str | os.PathLike[str], ids: Sequence[str]) -> IndexReport:
    """Remove the references called `ids` (all must be indexed), rewriting only the shards that held them."""
    root = Path(index_dir)
    report = IndexReport(root)
    with locked(root):
        index = open_index(root)
        known = {e.id for e in index.entries}
        if unknown := [i for i in ids if i not in known]:
            raise UsageError(f"{root}: no reference called {', '.join(repr(i) for i in unknown[:5])} in this index")
        gone = set(ids)
        kept = [s for s in index.shards if not any(e.id in gone for e in s.entries)]
        rewritten = [_without(s, gone) for s in index.shards if any(e.id in gone for e in s.entries)]
        report.removed = [e.id for e in index.entries if e.id in gone]
        _rewrite(index, kept, [s for s in rewritten if s.entries], index.references, report)
    return report


def verify_job(root: str, rows: tuple[tuple[dict[str, Any], list[float], list[float]], ...], sources: bool, *,
               progress: ProgressSink) -> list[tuple[str, str]]:
    """An executor job: re-derive each entry's signature and features from its stored fingerprint (and source)."""
    progress.start("index: verify", len(rows))
    problems: list[tuple[str, str]] = []
    for raw, signature, features in rows:
        entry = Entry(**raw)
        try:
            fingerprint = stored_fingerprint(Path(root), entry)
            again = fingerprint_signature(fingerprint)
            if again is None or not np.array_equal(again.astype(np.float16), np.asarray(signature, np.float16)):
                problems.append((entry.id, "its signature does not match its stored fingerprint (tampered with)"))
            if not np.array_equal(feature_vector(fingerprint), np.asarray(features, np.float64)):
                problems.append((entry.id, "its features do not match its stored fingerprint (tampered with)"))
            if fingerprint.model_name != entry.model_name:
                problems.append((entry.id, "its model name does not match its stored fingerprint"))
        except TgVerifyError as exc:
            problems.append((entry.id, str(exc)))
        if sources:
            problems.extend(_source_problem(entry))
        progress.advance(1)
    return problems


def _source_problem(entry: Entry) -> list[tuple[str, str]]:
    try:
        current = load(entry.source)
    except TgVerifyError as exc:
        return [(entry.id, f"stale: its source {entry.source} cannot be read now ({exc})")]
    if hashlib.sha256(current.to_json_bytes()).hexdigest() != entry.fingerprint_sha256:
        return [(entry.id, f"stale: its source {entry.source} changed since it was indexed "
                           "(`tg-verify index add --replace` updates it)")]
    return []


def verify_index(index_dir: str | os.PathLike[str], *, sources: bool = False, executor: Executor | None = None,
                 progress: ProgressSink | None = None) -> IndexReport:
    """Check everything the index claims; every problem is listed (none: exit 0)."""
    root = Path(index_dir)
    report = IndexReport(root)
    try:
        index = open_index(root)
    except IndexFormatError as exc:
        report.problems.append((MANIFEST, str(exc)))
        return report
    report.digest, report.count = index.digest, len(index.entries)
    rows = [(entry.to_dict(), s.signatures[n].astype(float).tolist(), s.features[n].tolist())
            for s in index.shards for n, entry in enumerate(s.entries)]
    jobs = [Job(verify_job, (str(root), tuple(rows[i:i + CHUNK]), sources), label=f"[{i // CHUNK + 1}]",
                memory=256 * 2**20, share=float(len(rows[i:i + CHUNK]))) for i in range(0, len(rows), CHUNK)]
    runner = executor or LocalExecutor()
    sink = progress or NullProgress()
    sink.start(f"index: verify {len(rows)} references", total=float(max(len(rows), 1)))
    try:
        for _position, result in runner.run(jobs, sink):
            if isinstance(result, JobLost):
                report.problems.append(("job", result.message))
            else:
                report.problems.extend(result.value)
    finally:
        if executor is None:
            runner.close()
    named = {e.fingerprint_sha256 for e in index.entries}
    stray = [p for p in (root / "refs").rglob("*.json") if p.stem not in named] if (root / "refs").is_dir() else []
    if stray:
        report.notes.append(f"{len(stray)} stored fingerprint(s) no entry names (left by an interrupted change; "
                            "the next add or remove deletes them)")
    return report
