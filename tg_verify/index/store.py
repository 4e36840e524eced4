"""The reference index on disk: a directory of files, versioned, validated as untrusted input when read.

    INDEX/index.json                     the manifest: versions, the references' settings, every shard's
                                         digests; replaced atomically, last, so it is the commit point
    INDEX/shards/<name>.entries.json     one shard's references: id, family, base, parent, model name,
                                         the sha256 of the stored fingerprint, the source path
    INDEX/shards/<name>.signatures.npy   their retrieval signatures, float16 [n, DIMS] (index/signature.py)
    INDEX/shards/<name>.features.npy     their 16 paper features, float64 [n, 16] (a population scale)
    INDEX/refs/<ab>/<sha256>.json        each reference's fingerprint, canonical bytes, named by their sha256

Shards are named by the digest of their content and never change: adding references writes new
shards, removing rewrites the shards that held them, and only then is the manifest replaced, after
which files no manifest names are deleted. A reader checks every shard file against the manifest's
sha256 and every stored fingerprint against its name before use, so a file edited behind the index's
back is refused, never silently searched. The manifest's own sha256 is the index's identity (reports
carry it); pin it to detect a rewritten manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tg_verify import __version__
from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.errors import IndexFormatError, UsageError
from tg_verify.fingerprint.document import FEATURE_NAMES, Fingerprint, load
from tg_verify.index.signature import DIMS, parameters

SCHEMA = "https://tg-verify.dev/schemas/reference-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
SHARD_SIZE = 1024  # references per shard written at once
MAX_MANIFEST_BYTES = 16_000_000
MAX_SHARD_FILE_BYTES = 512_000_000
MAX_TEXT = 512  # longest id, family, model name or source path accepted
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"[0-9a-f]{16}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHARD_FILES = ("entries.json", "signatures.npy", "features.npy")


@dataclass(frozen=True)
class Entry:
    """One reference of the index: how it is named and labelled, and which stored fingerprint it is."""

    id: str
    family: str
    base: bool
    parent: str | None
    model_name: str
    fingerprint_sha256: str
    source: str  # the path it was indexed from (for staleness checks; never read by search)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "base": self.base, "parent": self.parent,
                "model_name": self.model_name, "fingerprint_sha256": self.fingerprint_sha256, "source": self.source}


@dataclass(frozen=True)
class Shard:
    """References written together: entries with their signatures and feature vectors, row for row."""

    entries: tuple[Entry, ...]
    signatures: np.ndarray  # float16 [n, DIMS]
    features: np.ndarray  # float64 [n, len(FEATURE_NAMES)]


@dataclass
class ReferenceIndex:
    """An index read from disk and validated: every entry, its signature and features, row for row."""

    root: Path
    manifest: dict[str, Any]
    digest: str  # sha256 of index.json: the index's identity
    entries: list[Entry]
    signatures: np.ndarray  # float32 [n, DIMS], unit rows
    features: np.ndarray  # float64 [n, 16]
    shards: list[Shard] = field(default_factory=list)

    @property
    def references(self) -> dict[str, Any]:
        """The feature version and semantic settings every reference was fingerprinted with (empty: none yet)."""
        value = self.manifest.get("references")
        return value if isinstance(value, dict) else {}

    def position(self, ident: str) -> int | None:
        for n, entry in enumerate(self.entries):
            if entry.id == ident:
                return n
        return None

    def fingerprint(self, entry: Entry) -> Fingerprint:
        """The stored fingerprint of `entry`, checked against its sha256 (tampering is an IndexFormatError)."""
        return stored_fingerprint(self.root, entry)


def stored_fingerprint(root: Path, entry: Entry) -> Fingerprint:
    """Read the fingerprint stored for `entry` and check it against the sha256 the entry records."""
    path = blob_path(root, entry.fingerprint_sha256)
    try:
        fingerprint = load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable stored fingerprint is a broken index
        raise IndexFormatError(f"{root}: reference {entry.id!r}: stored fingerprint {path.name} is missing or "
                               f"unreadable ({str(exc)[:200]})") from None
    if hashlib.sha256(fingerprint.to_json_bytes()).hexdigest() != entry.fingerprint_sha256:
        raise IndexFormatError(f"{root}: reference {entry.id!r}: stored fingerprint {path.name} does not match its "
                               "sha256 (tampered with or corrupted); run `tg-verify index verify`")
    return fingerprint


def blob_path(root: Path, sha256: str) -> Path:
    return root / "refs" / sha256[:2] / f"{sha256}.json"


def shard_path(root: Path, name: str, part: str) -> Path:
    return root / "shards" / f"{name}.{part}"


# ------------------------------------------------------------------------------------------ reading


def _fail(root: Path, what: str) -> IndexFormatError:
    return IndexFormatError(f"{root}: {what}")


def _read_regular(path: Path, limit: int, root: Path) -> bytes:
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise _fail(root, f"{path.relative_to(root)} is not a regular file")
        if info.st_size > limit:
            raise _fail(root, f"{path.relative_to(root)} holds {info.st_size} bytes, over the {limit}-byte limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(root, f"{path.relative_to(root)} is missing") from None
    except OSError as exc:
        raise _fail(root, f"{path.relative_to(root)}: cannot read ({exc.strerror or exc})") from None


def _strict_json(data: bytes, where: str) -> Any:
    def reject(value: str) -> Any:
        raise IndexFormatError(f"{where}: non-finite number {value} is not allowed")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            if key in document:
                raise IndexFormatError(f"{where}: duplicate key {key[:80]!r}")
            document[key] = value
        return document

    try:
        return json.loads(data.decode("utf-8"), parse_constant=reject, object_pairs_hook=unique)
    except IndexFormatError:
        raise
    except (ValueError, RecursionError) as exc:
        raise IndexFormatError(f"{where}: not valid UTF-8 JSON ({str(exc)[:120]})") from None


def _text(value: Any, where: str, *, optional: bool = False, path: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > (4 * MAX_TEXT if path else MAX_TEXT) \
            or _CONTROL.search(value):
        raise IndexFormatError(f"{where}: expected a non-empty string of printable characters"
                               f"{' or null' if optional else ''}")
    return value


def _entry(raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise IndexFormatError(f"{where}: expected an object")
    expected = {"id", "family", "base", "parent", "model_name", "fingerprint_sha256", "source"}
    if set(raw) != expected:
        raise IndexFormatError(f"{where}: fields must be exactly {', '.join(sorted(expected))}")
    if not isinstance(raw["base"], bool):
        raise IndexFormatError(f"{where}.base: expected true or false")
    sha = raw["fingerprint_sha256"]
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise IndexFormatError(f"{where}.fingerprint_sha256: expected 64 lowercase hex digits")
    return Entry(id=str(_text(raw["id"], f"{where}.id")), family=str(_text(raw["family"], f"{where}.family")),
                 base=raw["base"], parent=_text(raw["parent"], f"{where}.parent", optional=True),
                 model_name=str(_text(raw["model_name"], f"{where}.model_name")), fingerprint_sha256=sha,
                 source=str(_text(raw["source"], f"{where}.source", path=True)))


def _array(data: bytes, where: str, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    if not data.startswith(b"\x93NUMPY"):
        raise IndexFormatError(f"{where}: not a .npy array (bad magic)")
    try:
        loaded: Any = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise IndexFormatError(f"{where}: not a .npy array ({str(exc)[:120]})") from None
    if not isinstance(loaded, np.ndarray):
        raise IndexFormatError(f"{where}: not a .npy array")
    array: np.ndarray = loaded
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise IndexFormatError(f"{where}: expected {dtype} {list(shape)}, got {array.dtype} {list(array.shape)}")
    if not np.isfinite(array).all():
        raise IndexFormatError(f"{where}: holds non-finite values")
    return array


def _manifest(root: Path) -> tuple[dict[str, Any], str]:
    data = _read_regular(root / MANIFEST, MAX_MANIFEST_BYTES, root)
    where = str(root / MANIFEST)
    manifest = _strict_json(data, where)
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{where}: must be a JSON object")
    if manifest.get("schema") != SCHEMA:
        raise IndexFormatError(f"{where}: 'schema' must be {SCHEMA!r}, got {str(manifest.get('schema'))[:80]!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(f"{where}: format_version {manifest.get('format_version')!r} is not supported "
                               f"(expected {FORMAT_VERSION})")
    known = {"schema", "format_version", "signature", "references", "count", "shards", "tool"}
    if extra := sorted(set(manifest) - known):
        raise IndexFormatError(f"{where}: unknown fields {', '.join(extra[:5])}")
    if manifest.get("signature") != parameters():
        raise IndexFormatError(f"{where}: built with signature {manifest.get('signature')!r}; this tg-verify uses "
                               f"{parameters()!r}: rebuild it with `tg-verify index build`")
    references = manifest.get("references")
    if not isinstance(references, dict) or (references and (
            set(references) != {"feature_version", "settings"} or not isinstance(references["settings"], dict)
            or not isinstance(references["feature_version"], str))):
        raise IndexFormatError(f"{where}: 'references' must be {{}} or {{feature_version, settings}}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise IndexFormatError(f"{where}: 'shards' must be a list")
    count = manifest.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise IndexFormatError(f"{where}: 'count' must be a non-negative integer")
    for n, record in enumerate(shards):
        at = f"{where}: shards[{n}]"
        fields = {"name", "count"} | {f"{part.split('.')[0]}_sha256" for part in _SHARD_FILES}
        if not isinstance(record, dict) or set(record) != fields:
            raise IndexFormatError(f"{at}: fields must be exactly {', '.join(sorted(fields))}")
        if not isinstance(record["name"], str) or not _SHARD_NAME.fullmatch(record["name"]):
            raise IndexFormatError(f"{at}.name: expected 16 lowercase hex digits")
        if not isinstance(record["count"], int) or isinstance(record["count"], bool) or not \
                0 < record["count"] <= 1_000_000:
            raise IndexFormatError(f"{at}.count: expected a positive integer")
        for part in _SHARD_FILES:
            digest = record[f"{part.split('.')[0]}_sha256"]
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise IndexFormatError(f"{at}: {part.split('.')[0]}_sha256 must be 64 lowercase hex digits")
    if len({r["name"] for r in shards}) != len(shards):
        raise IndexFormatError(f"{where}: a shard is listed twice")
    if sum(r["count"] for r in shards) != count:
        raise IndexFormatError(f"{where}: 'count' {count} differs from the shards' total")
    return manifest, hashlib.sha256(data).hexdigest()


def read_shard(root: Path, record: dict[str, Any]) -> Shard:
    """One shard's files, each checked against the manifest's sha256 and validated."""
    name, count = record["name"], record["count"]
    data: dict[str, bytes] = {}
    for part in _SHARD_FILES:
        path = shard_path(root, name, part)
        raw = _read_regular(path, MAX_SHARD_FILE_BYTES, root)
        if hashlib.sha256(raw).hexdigest() != record[f"{part.split('.')[0]}_sha256"]:
            raise _fail(root, f"shards/{path.name} does not match the manifest's sha256 (tampered with or "
                              "corrupted); run `tg-verify index verify`")
        data[part] = raw
    where = f"{root}/shards/{name}"
    raw_entries = _strict_json(data["entries.json"], f"{where}.entries.json")
    if not isinstance(raw_entries, list) or len(raw_entries) != count:
        raise IndexFormatError(f"{where}.entries.json: expected a list of {count} entries")
    entries = tuple(_entry(e, f"{where}.entries.json[{n}]") for n, e in enumerate(raw_entries))
    signatures = _array(data["signatures.npy"], f"{where}.signatures.npy", "float16", (count, DIMS))
    features = _array(data["features.npy"], f"{where}.features.npy", "float64", (count, len(FEATURE_NAMES)))
    return Shard(entries, signatures, features)


def open_index(path: str | os.PathLike[str]) -> ReferenceIndex:
    """Read and validate the index at `path` (IndexFormatError naming the file and field on any problem)."""
    root = Path(path)
    if not (root / MANIFEST).exists():
        raise IndexFormatError(f"{root}: not a tg-verify reference index (no {MANIFEST}); make one with "
                               "`tg-verify index build FP... -o INDEX`")
    manifest, digest = _manifest(root)
    shards = [read_shard(root, record) for record in manifest["shards"]]
    entries = [entry for shard in shards for entry in shard.entries]
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise _fail(root, f"reference id {entry.id!r} appears twice")
        seen.add(entry.id)
    signatures = (np.concatenate([s.signatures for s in shards]).astype(np.float32) if shards
                  else np.zeros((0, DIMS), dtype=np.float32))
    features = (np.concatenate([s.features for s in shards]) if shards
                else np.zeros((0, len(FEATURE_NAMES)), dtype=np.float64))
    return ReferenceIndex(root, manifest, digest, entries, signatures, features, shards)


# ------------------------------------------------------------------------------------------ writing


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_shard(root: Path, shard: Shard) -> dict[str, Any]:
    """Write a shard's three files (named by their content) and return its manifest record."""
    parts = {"entries.json": canonical_json([e.to_dict() for e in shard.entries]),
             "signatures.npy": _npy(np.ascontiguousarray(shard.signatures, dtype=np.float16)),
             "features.npy": _npy(np.ascontiguousarray(shard.features, dtype=np.float64))}
    digests = {part: hashlib.sha256(data).hexdigest() for part, data in parts.items()}
    name = hashlib.sha256("".join(digests[p] for p in _SHARD_FILES).encode()).hexdigest()[:16]
    for part, data in parts.items():
        write_bytes(shard_path(root, name, part), data)
    record: dict[str, Any] = {"name": name, "count": len(shard.entries)}
    record.update({f"{part.split('.')[0]}_sha256": digests[part] for part in _SHARD_FILES})
    return record


def write_blob(root: Path, sha256: str, data: bytes) -> None:
    """Store a reference's canonical fingerprint bytes under their sha256 (kept when already intact)."""
    path = blob_path(root, sha256)
    try:
        if path.stat().st_size == len(data) and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return
    except OSError:
        pass
    write_bytes(path, data)


def commit(root: Path, shards: Sequence[dict[str, Any]], references: dict[str, Any]) -> str:
    """Replace the manifest (the commit point), then delete files it no longer names; return its sha256."""
    manifest = {"schema": SCHEMA, "format_version": FORMAT_VERSION, "signature": parameters(),
                "references": references, "count": sum(r["count"] for r in shards), "shards": list(shards),
                "tool": {"name": "tg-verify", "version": __version__}}
    data = canonical_json(manifest)
    write_bytes(root / MANIFEST, data)
    return hashlib.sha256(data).hexdigest()


def collect_garbage(root: Path, shards: Sequence[Shard], records: Sequence[dict[str, Any]]) -> int:
    """Delete shard and fingerprint files the manifest does not name (left by removals or killed writers)."""
    keep_shards = {f"{r['name']}.{part}" for r in records for part in _SHARD_FILES}
    keep_blobs = {f"{e.fingerprint_sha256}.json" for s in shards for e in s.entries}
    removed = 0
    for directory, keep in ((root / "shards", keep_shards), (root / "refs", keep_blobs)):
        if not directory.is_dir():
            continue
        for path in directory.rglob("*"):
            if path.is_file() and path.name not in keep and (path.suffix in (".json", ".npy", ".tmp")):
                path.unlink()
                removed += 1
    return removed


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold INDEX/.lock exclusively while the index changes (one writer at a time; readers are not blocked)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{root}: another tg-verify is changing this index; try again when it is done"
                             ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def feature_vector(fingerprint: Fingerprint) -> np.ndarray:
    """The 16 paper features of a fingerprint, float64, in FEATURE_NAMES order (all finite by validation)."""
    vector = np.array([float(fingerprint.features[n]) for n in FEATURE_NAMES], dtype=np.float64)
    if not all(math.isfinite(v) for v in vector):
        raise IndexFormatError(f"{fingerprint.source}: features must be finite")
    return vector
