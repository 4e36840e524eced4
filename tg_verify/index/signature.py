"""The retrieval signature: one short unit vector per lineage sketch, whose dot products rank references.

The lineage test (analysis/lineage.py) is exact but too costly to run against thousands of references.
The signature keeps what the test scores, in a form that compares in one dot product: every sketch
unit is standardised and corrected for its model's own token geometry as the lineage test corrects it
(what its embed unit, or its embed and head units, explain, by least squares), layer units are pooled
into a few relative-depth bins (so a dropped or duplicated layer shifts weight between neighbouring
bins instead of breaking the comparison), and each entry,
keyed by (role, bin, probe coordinate, probe coordinate), is feature-hashed with a seeded sign into
DIMS buckets (`_coordinates`: token ids for a probe of tokens, so a grown vocabulary still aligns on
the tokens it shares; mixture positions salted with the probe's seed for a probe of mixtures).
Derivatives keep their base's units, so their signatures point the same way; independent models
share only what every model of the data shares, which the geometry correction removes to first order.

`signature_of` (with `_coordinates`) is the only code that reads a sketch's structure: a new sketch
version needs changes there (and a new SIGNATURE_VERSION), nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from tg_verify.analysis.lineage import ParsedSketch, parse_sketch
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.fingerprint.sketch import LAYER_ROLES, SKETCH_VERSION

SIGNATURE_VERSION = "tgsig1"
DIMS = 512  # float16 buckets: 1 KiB per reference; hashing noise on a dot product ~ 1/sqrt(DIMS)
BINS = 4  # relative-depth bins per layer role
SEED = 0x7467736967  # fixed: every index and every candidate must hash alike
_ROLE_CODES: dict[str, int] = {role: n for n, role in enumerate(("head", *LAYER_ROLES))}
_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def parameters() -> dict[str, Any]:
    """What an index records about its signatures; a candidate is only compared under equal parameters."""
    return {"version": SIGNATURE_VERSION, "dims": DIMS, "bins": BINS, "sketch_version": SKETCH_VERSION}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _C2
        x = (x ^ (x >> np.uint64(27))) * _C3
        mixed: np.ndarray = x ^ (x >> np.uint64(31))
        return mixed


def _standardised(matrix: np.ndarray, off: np.ndarray) -> np.ndarray | None:
    values = matrix[off].astype(np.float64)
    values -= values.mean()
    norm = float(np.linalg.norm(values))
    return values / norm if norm > 0 else None


def _coordinates(sketch: ParsedSketch) -> tuple[np.ndarray, int, tuple[str, ...]]:
    """What each probe position stands for (comparable across sketches), a salt for the hash, and the units
    the lineage test corrects layer units with, for this kind of sketch.

    A sketch whose probe is a set of token ids (tgs1) is keyed by those ids, so sketches of vocabularies of
    different sizes align on the tokens they share; its test corrects for the embed unit. A sketch whose
    probe is k seeded mixtures of embedding rows (tgs2) is keyed by the mixture's position, salted with the
    seed and the kind of keys (token text or ids), since sketches made with other seeds or keys do not
    share a probe and must not align; its test corrects for the embed and head units.
    """
    ids = getattr(sketch, "ids", None)
    if ids is not None:
        return np.asarray(ids).astype(np.uint64), 0, ("embed",)
    mixtures = int(getattr(sketch, "mixtures", 0))
    salt = f"{getattr(sketch, 'seed', 0)}:{getattr(sketch, 'keys', '')}".encode()
    return (np.arange(mixtures, dtype=np.uint64), int.from_bytes(hashlib.sha256(salt).digest()[:8], "little"),
            ("embed", "head"))


def signature_of(sketch: ParsedSketch) -> np.ndarray | None:
    """The unit signature vector (float32, DIMS) of a parsed sketch; None when it has no unit to sign."""
    coordinates, salt, layer_regressors = _coordinates(sketch)
    k = len(coordinates)
    if k < 2:
        return None
    off = ~np.eye(k, dtype=bool)
    rows, cols = np.nonzero(off)
    geometry = {role: _standardised(sketch.units[(role, None)], off) for role in ("embed", "head")
                if (role, None) in sketch.units}

    def corrected(matrix: np.ndarray, regressors: list[np.ndarray | None]) -> np.ndarray | None:
        """Standardised, minus what the model's own token geometry explains (least squares), renormalised."""
        values = _standardised(matrix, off)
        basis = [g for g in regressors if g is not None]
        if values is None:
            return None
        if basis:
            q, _ = np.linalg.qr(np.stack(basis, axis=1))
            values = values - q @ (q.T @ values)
            values -= values.mean()
        norm = float(np.linalg.norm(values))
        return values / norm if norm > 1e-6 else None

    blocks: dict[tuple[str, int], np.ndarray] = {}
    head = sketch.units.get(("head", None))
    if head is not None and (vector := corrected(head, [geometry.get("embed")])) is not None:
        blocks[("head", 0)] = vector
    layer_geometry = [geometry.get(role) for role in layer_regressors]
    layers = sorted({layer for (_, layer) in sketch.units if layer is not None})
    span = max(len(layers) - 1, 1)
    for role in LAYER_ROLES:
        for rank, layer in enumerate(layers):
            matrix = sketch.units.get((role, layer))
            if matrix is None or (vector := corrected(matrix, layer_geometry)) is None:
                continue
            position = rank * (BINS - 1) / span
            low = int(np.floor(position))
            for bin_, weight in ((low, 1.0 - (position - low)), (low + 1, position - low)):
                if weight > 0 and bin_ < BINS:
                    blocks[(role, bin_)] = blocks.get((role, bin_), 0.0) + weight * vector
    if not blocks:
        return None
    out = np.zeros(DIMS, dtype=np.float64)
    a, b = coordinates[rows], coordinates[cols]
    with np.errstate(over="ignore"):
        pair = _mix(a * _C1 + b + np.uint64(SEED) + np.uint64(salt))
    for (role, bin_), vector in blocks.items():
        norm = float(np.linalg.norm(vector))
        if norm <= 0:
            continue
        with np.errstate(over="ignore"):
            keys = _mix(pair ^ (np.uint64(_ROLE_CODES[role] * BINS + bin_ + 1) * _C3))
        buckets = (keys % np.uint64(DIMS)).astype(np.int64)
        signs = np.where((keys >> np.uint64(63)) == 1, -1.0, 1.0)
        np.add.at(out, buckets, signs * vector / norm)
    norm = float(np.linalg.norm(out))
    return (out / norm).astype(np.float32) if norm > 0 else None


def fingerprint_signature(fingerprint: Fingerprint) -> np.ndarray | None:
    """`signature_of` a fingerprint's sketch (validated as untrusted input); None without a sketch."""
    if fingerprint.sketch is None:
        return None
    return signature_of(parse_sketch(fingerprint.sketch, fingerprint.source or fingerprint.model_name))


def sketch_version(fingerprint: Fingerprint) -> str | None:
    """The sketch version a fingerprint carries, if any (for messages about incompatible sketches)."""
    sketch = fingerprint.sketch
    version = sketch.get("version") if isinstance(sketch, Mapping) else None
    return version if isinstance(version, str) else None
