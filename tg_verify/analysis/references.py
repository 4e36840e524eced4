"""Reference sets: fingerprint files from directories or lists, and the family labels that go with them.

A labels file (YAML or JSON) maps a fingerprint id to its family: `id: family`, or
`id: {family: F, base: true|false, parent: ID}`. A fingerprint's id is its model_name, or its file
name without `.json` when the labels use that. Without a labels file every reference is a base of
its own family, named by its id: a model's config `model_type` names its architecture, not its
lineage (many unrelated models are `llama`), so it is never used as a family.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tg_verify.artifact import natural_key
from tg_verify.errors import InputError
from tg_verify.fingerprint.document import Fingerprint, load

MAX_LABELS_BYTES = 4_000_000


@dataclass(frozen=True)
class Label:
    """What a labels file says about one model: its family, whether it is a base, and its parent."""

    family: str
    base: bool
    parent: str | None = None


@dataclass(frozen=True)
class Reference:
    """A labelled reference fingerprint: bases initialise clusters, derivatives move them."""

    id: str
    family: str
    fingerprint: Fingerprint
    base: bool = True
    parent: str | None = None


def fingerprint_paths(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand directories to the `*.json` files directly inside them (natural order); keep files as given."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted((p for p in path.iterdir() if p.suffix == ".json" and p.is_file()),
                           key=lambda p: natural_key(p.name))
            if not found:
                raise InputError(f"{path}: no fingerprint files (*.json) in this directory")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such fingerprint file or directory")
    return paths


def load_fingerprints(inputs: Sequence[str | os.PathLike[str]]) -> list[Fingerprint]:
    """Read every fingerprint named by `inputs` (files or directories of `*.json`)."""
    return [load(path) for path in fingerprint_paths(inputs)]


def fingerprint_id(fp: Fingerprint) -> str:
    """How a fingerprint is named in labels and reports: its model_name, else its file stem."""
    return fp.model_name or Path(fp.source).stem


def _label(value: Any, key: str, where: str) -> Label:
    if isinstance(value, str) and value.strip():
        return Label(family=value.strip(), base=True)
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: {key}: expected a family name or {{family, base, parent}}, "
                         f"got {type(value).__name__}")
    unknown = sorted(set(value) - {"family", "base", "parent"})
    if unknown:
        raise InputError(f"{where}: {key}: unknown fields {', '.join(map(str, unknown))} "
                         "(expected family, base, parent)")
    family = value.get("family")
    if not isinstance(family, str) or not family.strip():
        raise InputError(f"{where}: {key}.family: expected a non-empty string")
    parent = value.get("parent")
    if parent is not None and (not isinstance(parent, str) or not parent.strip()):
        raise InputError(f"{where}: {key}.parent: expected a model id")
    base = value.get("base", parent is None)
    if not isinstance(base, bool):
        raise InputError(f"{where}: {key}.base: expected true or false")
    if base and parent is not None:
        raise InputError(f"{where}: {key}: a base model cannot have a parent")
    return Label(family=family.strip(), base=base, parent=parent.strip() if parent else None)


def read_labels(path: str | os.PathLike[str]) -> dict[str, Label]:
    """Read and validate a labels file (YAML or JSON): id -> family, or id -> {family, base, parent}."""
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read labels ({exc.strerror or exc})") from exc
    if len(data) > MAX_LABELS_BYTES:
        raise InputError(f"{where}: {len(data)} bytes is over the {MAX_LABELS_BYTES}-byte limit for a labels file")
    try:
        text = data.decode("utf-8")
        document = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise InputError(f"{where}: labels are not UTF-8 text") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise InputError(f"{where}: labels are not valid {'JSON' if where.endswith('.json') else 'YAML'} "
                         f"({str(exc).splitlines()[0][:120]})") from None
    if isinstance(document, Mapping) and set(document) == {"models"}:
        document = document["models"]
    if not isinstance(document, Mapping) or not document:
        raise InputError(f"{where}: labels must be a non-empty mapping of model id to family")
    labels = {str(key): _label(value, str(key), where) for key, value in document.items()}
    for key, label in labels.items():
        if label.parent is not None:
            parent = labels.get(label.parent)
            if parent is None:
                raise InputError(f"{where}: {key}.parent: {label.parent!r} is not a labelled model")
            if parent.family != label.family:
                raise InputError(f"{where}: {key}: family {label.family!r} differs from its parent's "
                                 f"({label.parent}: {parent.family!r})")
    return labels


def build_references(fingerprints: Sequence[Fingerprint], labels: Mapping[str, Label] | None = None
                     ) -> tuple[list[Reference], list[str]]:
    """Attach labels to fingerprints; return the references and caveats (labels that matched nothing).

    Without labels every fingerprint is a base of its own family. With labels every fingerprint
    must be labelled, by model_name or by file stem.
    """
    references: list[Reference] = []
    used: set[str] = set()
    seen: dict[str, str] = {}
    for fp in fingerprints:
        ident = fingerprint_id(fp)
        if ident in seen:
            raise InputError(f"{fp.source or ident}: model id {ident!r} is also the id of {seen[ident]}; "
                             "ids must be unique within a reference set")
        seen[ident] = fp.source or ident
        if labels is None:
            references.append(Reference(id=ident, family=ident, fingerprint=fp))
            continue
        key = next((k for k in (ident, Path(fp.source).stem if fp.source else None) if k and k in labels), None)
        if key is None:
            raise InputError(f"{fp.source or ident}: model {ident!r} has no entry in the labels file")
        used.add(key)
        label = labels[key]
        references.append(Reference(id=ident, family=label.family, fingerprint=fp, base=label.base,
                                    parent=label.parent))
    caveats: list[str] = []
    if labels is not None:
        unused = sorted(set(labels) - used)
        if unused:
            caveats.append(f"labels without a fingerprint: {', '.join(unused[:8])}"
                           + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    return references, caveats
