"""The Fingerprint document: versioned, deterministic JSON; validated when read.

Also imports the paper's published flat format (Fig. 2) as a legacy document with unknown settings.
Documents are values: `Fingerprint` is frozen and never changed in place (build a new one with
`dataclasses.replace`). `FileDigest` and `BaseModelRecord` are the typed form of the file digests a
fingerprint records, shared by the pipeline, the reports and the attestation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tg_verify.atomic import canonical_json
from tg_verify.errors import FingerprintFormatError

SCHEMA = "https://tg-verify.dev/schemas/fingerprint"
FORMAT_VERSION = 1
# Bumped whenever the meaning of any feature changes; documents of different feature versions
# are never compared.
FEATURE_VERSION = "tg2"  # tg2: float32 Box-Muller inputs (tg1: float64); same distribution, other draws
LEGACY_FEATURE_VERSION = "tensorguard-release"
MAX_DOCUMENT_BYTES = 64_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")

# The paper's feature names (Fig. 2), in its order.
FEATURE_NAMES: tuple[str, ...] = (
    "global_mean", "global_std", "global_norm", "global_skewness", "global_kurtosis",
    "attention_mean", "attention_std", "attention_norm",
    "ffn_mean", "ffn_std", "ffn_norm",
    "embedding_mean", "embedding_std", "embedding_norm",
    "total_params", "num_layers",
)
# The distance/clustering vector: every numeric feature except total_params, as the authors'
# release does (the paper's threshold of 7 is a distance in this standardised space).
VECTOR_FEATURES: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n != "total_params")


@dataclass(frozen=True)
class FileDigest:
    """One file of a model: POSIX path relative to the model root, its sha256, size and role (when known)."""

    path: str
    sha256: str
    size: int | None = None
    role: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "role": self.role, "sha256": self.sha256}


@dataclass(frozen=True)
class BaseModelRecord:
    """The base model an adapter was merged onto to be fingerprinted: its name, files and root digest."""

    name: str
    files: tuple[FileDigest, ...]
    root_digest: str
    layout: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layout": self.layout, "root_digest": self.root_digest,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]}

    @property
    def digests(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.files}

    @classmethod
    def from_record(cls, record: Any) -> BaseModelRecord | None:
        """The typed form of a recorded `artifact.base` object (None when it is not one)."""
        if not isinstance(record, dict):
            return None
        name, layout, root = record.get("name"), record.get("layout"), record.get("root_digest")
        return cls(name=name if isinstance(name, str) else "base", files=file_digests_of(record.get("files")),
                   root_digest=root if isinstance(root, str) and _SHA256.fullmatch(root) else "",
                   layout=layout if isinstance(layout, str) else None)


def file_digests_of(raw: Any) -> tuple[FileDigest, ...]:
    """The files a record lists ({path, sha256, size?, role?} objects): those with a valid sha256, typed."""
    if not isinstance(raw, list):
        return ()
    files = []
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        digest, size, role = entry.get("sha256"), entry.get("size"), entry.get("role")
        if isinstance(digest, str) and _SHA256.fullmatch(digest):
            files.append(FileDigest(path=entry["path"], sha256=digest,
                                    size=size if isinstance(size, int) and not isinstance(size, bool) else None,
                                    role=role if isinstance(role, str) else None))
    return tuple(files)


@dataclass(frozen=True)
class Fingerprint:
    """One model's fingerprint: the paper's 16 features plus provenance and the lineage evidence (sketch, blocks)."""

    model_name: str
    features: dict[str, float]
    settings: dict[str, Any]
    feature_version: str = FEATURE_VERSION
    tool: dict[str, str] = field(default_factory=dict)
    artifact: dict[str, Any] = field(default_factory=dict)  # layout, files [{path,size,sha256}], root_digest
    tensors: list[dict[str, Any]] = field(default_factory=list)  # [{name, shape, size, category}]
    sketch: dict[str, Any] | None = None  # lineage sketch (fingerprint/sketch.py), JSON-safe
    blocks: dict[str, Any] | None = None  # block evidence (fingerprint/blocks.py), JSON-safe
    # Which tensors fed which feature, empty categories, degenerate tensors (docs/method.md).
    extraction: dict[str, Any] | None = None
    legacy: bool = False
    source: str = ""  # where it was read from (not serialised)

    def vector(self, names: tuple[str, ...] = VECTOR_FEATURES) -> list[float]:
        return [float(self.features[n]) for n in names]

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "schema": SCHEMA,
            "format_version": FORMAT_VERSION,
            "feature_version": self.feature_version,
            "model_name": self.model_name,
            "features": {n: self.features[n] for n in FEATURE_NAMES},
            "settings": self.settings,
            "tool": self.tool,
            "artifact": self.artifact,
            "tensors": self.tensors,
            "legacy": self.legacy,
        }
        if self.sketch is not None:
            document["sketch"] = self.sketch
        if self.blocks is not None:
            document["blocks"] = self.blocks
        if self.extraction is not None:
            document["extraction"] = self.extraction
        return document

    def to_json_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        """sha256 of the canonical bytes: how reports and attestations refer to a fingerprint."""
        return hashlib.sha256(self.to_json_bytes()).hexdigest()

    @property
    def file_digests(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.files}

    @property
    def files(self) -> tuple[FileDigest, ...]:
        """The model files this fingerprint records, with their sha256 (files recorded without one are left out)."""
        return file_digests_of(self.artifact.get("files"))

    @property
    def base(self) -> BaseModelRecord | None:
        """For a merged adapter: the base it was merged onto, as recorded (None when there is none)."""
        return BaseModelRecord.from_record(self.artifact.get("base"))

    def with_base(self, record: dict[str, Any]) -> Fingerprint:
        """A new document that also records the base an adapter was merged onto (`artifact.base`)."""
        return replace(self, artifact={**self.artifact, "base": record})


def _finite_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FingerprintFormatError(f"{where}: expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise FingerprintFormatError(f"{where}: expected a finite number, got {str(value)[:40]}")
    return number


def _features(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise FingerprintFormatError(f"{where}: 'features' must be an object")
    missing = [n for n in FEATURE_NAMES if n not in raw]
    extra = sorted(set(raw) - set(FEATURE_NAMES) - {"model_name"})
    if missing:
        raise FingerprintFormatError(f"{where}: features lack {', '.join(missing)}")
    if extra:
        raise FingerprintFormatError(f"{where}: unknown features {', '.join(extra)}")
    return {n: _finite_number(raw[n], f"{where}: features.{n}") for n in FEATURE_NAMES}


def from_dict(document: Any, source: str = "<fingerprint>") -> Fingerprint:
    """Validate a parsed JSON document (native or the paper's flat legacy format)."""
    if not isinstance(document, dict):
        raise FingerprintFormatError(f"{source}: a fingerprint must be a JSON object")
    if "schema" not in document and "global_mean" in document:
        return _from_legacy(document, source)
    if document.get("schema") != SCHEMA:
        raise FingerprintFormatError(f"{source}: 'schema' must be {SCHEMA!r}, got {document.get('schema')!r}")
    if document.get("format_version") != FORMAT_VERSION:
        raise FingerprintFormatError(
            f"{source}: format_version {document.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    known = {"schema", "format_version", "feature_version", "model_name", "features", "settings", "tool",
             "artifact", "tensors", "legacy", "sketch", "blocks", "extraction"}
    extra = sorted(set(document) - known)
    if extra:
        raise FingerprintFormatError(f"{source}: unknown fields {', '.join(extra)}")
    name = document.get("model_name")
    if not isinstance(name, str):
        raise FingerprintFormatError(f"{source}: 'model_name' must be a string")
    feature_version = document.get("feature_version")
    if not isinstance(feature_version, str):
        raise FingerprintFormatError(f"{source}: 'feature_version' must be a string")
    for key in ("settings", "tool", "artifact"):
        if not isinstance(document.get(key), dict):
            raise FingerprintFormatError(f"{source}: '{key}' must be an object")
    files = document["artifact"].get("files", [])
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str)
            and (f.get("sha256") is None or (isinstance(f.get("sha256"), str) and _SHA256.fullmatch(f["sha256"])))
            for f in files):
        raise FingerprintFormatError(f"{source}: artifact.files must be a list of {{path, size, sha256}}")
    tensors = document.get("tensors")
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise FingerprintFormatError(f"{source}: 'tensors' must be a list of objects")
    sketch = document.get("sketch")
    if sketch is not None and not isinstance(sketch, dict):
        raise FingerprintFormatError(f"{source}: 'sketch' must be an object")
    blocks = document.get("blocks")
    if blocks is not None and not isinstance(blocks, dict):
        raise FingerprintFormatError(f"{source}: 'blocks' must be an object")
    extraction = document.get("extraction")
    if extraction is not None and not isinstance(extraction, dict):
        raise FingerprintFormatError(f"{source}: 'extraction' must be an object")
    legacy = document.get("legacy", False)
    if not isinstance(legacy, bool):
        raise FingerprintFormatError(f"{source}: 'legacy' must be true or false")
    return Fingerprint(model_name=name, features=_features(document.get("features"), source),
                       settings=document["settings"], feature_version=feature_version, tool=document["tool"],
                       artifact=document["artifact"], tensors=tensors, sketch=sketch, blocks=blocks,
                       extraction=extraction, legacy=legacy, source=source)


def _from_legacy(document: dict[str, Any], source: str) -> Fingerprint:
    """The authors' release format: a flat object of the 16 features plus model_name."""
    extra = sorted(set(document) - set(FEATURE_NAMES) - {"model_name"})
    if extra:
        raise FingerprintFormatError(f"{source}: legacy fingerprint has unknown keys {', '.join(extra)}")
    name = document.get("model_name", Path(source).stem)
    if not isinstance(name, str):
        raise FingerprintFormatError(f"{source}: 'model_name' must be a string")
    return Fingerprint(model_name=name, features=_features(document, source), settings={"legacy": True},
                       feature_version=LEGACY_FEATURE_VERSION, tool={"name": "tensorguard-release"},
                       legacy=True, source=source)


def load(path: str | os.PathLike[str]) -> Fingerprint:
    """Read and validate a fingerprint file."""
    return load_with_digest(path)[0]


def load_with_digest(path: str | os.PathLike[str]) -> tuple[Fingerprint, str]:
    """Read and validate a fingerprint file; also the sha256 of exactly the bytes that were parsed.

    A pin (`sha256:` in a policy) is checked against this digest, so the file cannot change between
    being hashed and being read.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise FingerprintFormatError(f"{path}: not a regular file")
        size = info.st_size
        if size > MAX_DOCUMENT_BYTES:
            raise FingerprintFormatError(f"{path}: {size} bytes is over the {MAX_DOCUMENT_BYTES}-byte limit")
        data = path.read_bytes()
        text = data.decode("utf-8")
    except FingerprintFormatError:
        raise
    except UnicodeDecodeError:
        raise FingerprintFormatError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise FingerprintFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc

    def reject_constant(value: str) -> Any:
        raise FingerprintFormatError(f"{path}: non-finite number {value} is not allowed")

    def finite_float(value: str) -> float:
        number = float(value)
        if not math.isfinite(number):
            raise FingerprintFormatError(f"{path}: number {value[:40]} overflows to infinity")
        return number

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            if key in document:
                raise FingerprintFormatError(f"{path}: duplicate key {key[:80]!r}")
            document[key] = value
        return document

    try:
        document = json.loads(text, parse_constant=reject_constant, parse_float=finite_float,
                              object_pairs_hook=unique_keys)
    except FingerprintFormatError:
        raise
    except (ValueError, RecursionError) as exc:
        raise FingerprintFormatError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    return from_dict(document, str(path)), hashlib.sha256(data).hexdigest()
