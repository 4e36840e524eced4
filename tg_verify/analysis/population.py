"""The population scale: per-feature spreads measured once on real models, shipped as versioned data.

A distance is only as meaningful as the scale its features are divided by. The paper's threshold of 7
is a distance in z-scores fitted on the authors' whole model set (58 real checkpoints), so a scale
fitted on the two or three references of a policy is not the scale the threshold was set on. This
module holds two spreads per feature, measured on the authors' published fingerprints of real
models (`data/population.json`, provenance inside) and independent of any policy:

- `spread`: the standard deviation of each feature across the real models (population z-scores,
  what the release's StandardScaler computes over its model set). Distances on this scale are the
  ones the threshold of 7 applies to.
- `lineage_spread`: how far a real derivative typically moves each feature away from its base
  (1.4826 x the median absolute derivative-minus-base difference). Dividing by it gives the
  nearest-centre rule a pooled within-lineage scale (the rule linear discriminant analysis uses):
  features that fine-tuning leaves alone weigh more than features it moves. Attribution ranks on it.

The scale applies to fingerprints inside the population's span (every feature within the
population's range, widened by that range on each side): the spreads of real 1B-8B models say
nothing about how toy models or models of another size class vary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tg_verify.errors import InputError
from tg_verify.fingerprint.document import Fingerprint

SCHEMA = "https://tg-verify.dev/schemas/population"
FORMAT_VERSION = 1
DATA_FILE = Path(__file__).with_name("data") / "population.json"
# The 14 features whose meaning the release and tg-verify share (num_layers is constant in the release,
# 10 tensors analysed, and the model depth in tg-verify: it has no population spread to measure).
POPULATION_FEATURES: tuple[str, ...] = (
    "global_mean", "global_std", "global_norm", "global_skewness", "global_kurtosis",
    "attention_mean", "attention_std", "attention_norm",
    "ffn_mean", "ffn_std", "ffn_norm",
    "embedding_mean", "embedding_std", "embedding_norm",
)
# 1.4826 x median |d| estimates the standard deviation of a normal d (the usual MAD consistency factor).
MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class PopulationModel:
    """One model the population is measured on: id, family, base or derivative (parent if known), features."""

    id: str
    family: str
    base: bool
    vector: tuple[float, ...]
    parent: str | None = None


@dataclass(frozen=True)
class PopulationScale:
    """Per-feature spreads of real models and the span they were measured on, with their provenance."""

    name: str
    applies_to: tuple[str, ...]  # feature versions this scale is used for
    features: tuple[str, ...]
    spread: np.ndarray  # population standard deviation per feature
    lineage_spread: np.ndarray  # typical derivative-minus-base displacement per feature
    low: np.ndarray
    high: np.ndarray
    models: int
    derivatives: int
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def vector(self, fp: Fingerprint) -> np.ndarray:
        """The fingerprint's values of the population features, float64."""
        return np.array([float(fp.features[n]) for n in self.features], dtype=np.float64)

    def population_points(self, fps: Sequence[Fingerprint]) -> np.ndarray:
        """Fingerprints in population z-units (x / spread): Euclidean distances here are on the threshold's scale."""
        return np.array([self.vector(fp) / self.spread for fp in fps]).reshape(len(fps), len(self.features))

    def lineage_points(self, fps: Sequence[Fingerprint]) -> np.ndarray:
        """Fingerprints in lineage units (x / lineage_spread): the scale attribution ranks centres on."""
        return np.array([self.vector(fp) / self.lineage_spread for fp in fps]).reshape(len(fps), len(self.features))

    def outside(self, fp: Fingerprint) -> list[str]:
        """The features of `fp` outside the population's span, each as 'name = value (population lo..hi)'."""
        values = self.vector(fp)
        width = self.high - self.low
        out = []
        for i, name in enumerate(self.features):
            if not self.low[i] - width[i] <= values[i] <= self.high[i] + width[i]:
                out.append(f"{name} = {values[i]:.4g} (real models {self.low[i]:.4g} to {self.high[i]:.4g})")
        return out

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary for reports: which scale, measured on what."""
        return {"name": self.name, "features": list(self.features), "models": self.models,
                "derivatives": self.derivatives, "source": self.provenance.get("source"),
                "data_sha256": self.provenance.get("data_sha256")}


def infer_parents(models: Sequence[PopulationModel], spread: np.ndarray) -> dict[str, str]:
    """Each derivative's base: its labelled parent's root, else the nearest base of its family in population z-units.

    Derivatives of a family without a base are left out (they have no displacement to measure).
    """
    by_id = {m.id: m for m in models}
    bases = [m for m in models if m.base]
    parents: dict[str, str] = {}
    for m in models:
        if m.base:
            continue
        parent = m.parent
        while parent is not None and parent in by_id and not by_id[parent].base:
            parent = by_id[parent].parent
        if parent is not None and parent in by_id:
            parents[m.id] = parent
            continue
        same = [b for b in bases if b.family == m.family]
        if not same:
            continue
        x = np.asarray(m.vector) / spread
        parents[m.id] = min(same, key=lambda b: (float(np.linalg.norm(np.asarray(b.vector) / spread - x)), b.id)).id
    return parents


def fit_population(models: Sequence[PopulationModel], *, name: str, applies_to: Sequence[str],
                   features: Sequence[str] = POPULATION_FEATURES, provenance: Mapping[str, Any] | None = None,
                   notes: Mapping[str, str] | None = None) -> PopulationScale:
    """Measure the population scale on labelled real models (bases and derivatives).

    spread: standard deviation over every model (ddof 0, as StandardScaler); lineage_spread:
    1.4826 x median |derivative - base| over the derivatives whose base is in the set. Raises
    InputError when a feature does not vary or no derivative has a base.
    """
    if len(models) < 3:
        raise InputError(f"a population needs at least three models, got {len(models)}")
    matrix = np.array([m.vector for m in models], dtype=np.float64)
    if matrix.shape[1] != len(features):
        raise InputError(f"population vectors have {matrix.shape[1]} values for {len(features)} features")
    spread = matrix.std(axis=0)
    flat = [n for n, s in zip(features, spread) if not s > 0]
    if flat:
        raise InputError(f"features with no spread across the population: {', '.join(flat)}")
    parents = infer_parents(models, spread)
    if not parents:
        raise InputError("no derivative in the population has a base of its family: no lineage spread to measure")
    by_id = {m.id: np.asarray(m.vector) for m in models}
    displacement = np.array([by_id[d] - by_id[b] for d, b in sorted(parents.items())])
    lineage = MAD_TO_SD * np.median(np.abs(displacement), axis=0)
    if not np.all(lineage > 0):
        zero = [n for n, s in zip(features, lineage) if not s > 0]
        raise InputError(f"features that no derivative moves (zero lineage spread): {', '.join(zero)}")
    return PopulationScale(name=name, applies_to=tuple(applies_to), features=tuple(features), spread=spread,
                           lineage_spread=lineage, low=matrix.min(axis=0), high=matrix.max(axis=0),
                           models=len(models), derivatives=len(parents), provenance=dict(provenance or {}),
                           notes=dict(notes or {}))


def to_document(scale: PopulationScale) -> dict[str, Any]:
    """The JSON document `data/population.json` holds (canonical_json writes it)."""
    def per_feature(values: np.ndarray) -> dict[str, float]:
        return {n: float(v) for n, v in zip(scale.features, values)}

    return {"schema": SCHEMA, "format_version": FORMAT_VERSION, "name": scale.name,
            "applies_to": list(scale.applies_to), "features": list(scale.features),
            "spread": per_feature(scale.spread), "lineage_spread": per_feature(scale.lineage_spread),
            "low": per_feature(scale.low), "high": per_feature(scale.high), "models": scale.models,
            "derivatives": scale.derivatives, "provenance": scale.provenance, "notes": scale.notes}


def _positive_map(document: Mapping[str, Any], key: str, features: Sequence[str], where: str,
                  positive: bool) -> np.ndarray:
    raw = document.get(key)
    if not isinstance(raw, Mapping) or set(raw) != set(features):
        raise InputError(f"{where}: {key}: expected a number for each of {', '.join(features)}")
    values = []
    for n in features:
        v = raw[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or (positive and v <= 0):
            raise InputError(f"{where}: {key}.{n}: expected a finite{' positive' if positive else ''} number")
        values.append(float(v))
    return np.array(values, dtype=np.float64)


def from_document(document: Any, where: str) -> PopulationScale:
    """Validate a population document (the shipped file, or one a user passes)."""
    if not isinstance(document, Mapping) or document.get("schema") != SCHEMA:
        raise InputError(f"{where}: not a tg-verify population document (schema {SCHEMA})")
    if document.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{where}: format_version {document.get('format_version')!r} is not {FORMAT_VERSION}")
    features = document.get("features")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise InputError(f"{where}: features: expected a list of feature names")
    unknown = sorted(set(features) - set(POPULATION_FEATURES))
    if unknown:
        raise InputError(f"{where}: features: not population features: {', '.join(unknown)}")
    applies = document.get("applies_to")
    if not isinstance(applies, list) or not all(isinstance(a, str) for a in applies):
        raise InputError(f"{where}: applies_to: expected a list of feature versions")
    low = _positive_map(document, "low", features, where, positive=False)
    high = _positive_map(document, "high", features, where, positive=False)
    if np.any(high < low):
        raise InputError(f"{where}: high is below low for some feature")
    counts: list[int] = []
    for key in ("models", "derivatives"):
        count = document.get(key)
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise InputError(f"{where}: {key}: expected a positive integer")
        counts.append(count)
    raw_provenance, raw_notes = document.get("provenance"), document.get("notes")
    provenance: dict[str, Any] = dict(raw_provenance) if isinstance(raw_provenance, Mapping) else {}
    notes: dict[str, Any] = dict(raw_notes) if isinstance(raw_notes, Mapping) else {}
    return PopulationScale(
        name=str(document.get("name") or "population"), applies_to=tuple(applies), features=tuple(features),
        spread=_positive_map(document, "spread", features, where, positive=True),
        lineage_spread=_positive_map(document, "lineage_spread", features, where, positive=True),
        low=low, high=high, models=counts[0], derivatives=counts[1],
        provenance=provenance, notes={str(k): str(v) for k, v in notes.items()})


def load_population(path: str | Path | None = None) -> PopulationScale:
    """Read a population document; None reads the shipped one (cached)."""
    if path is None:
        return _shipped()
    return _read(Path(path))


def _read(path: Path) -> PopulationScale:
    import hashlib

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the population scale ({exc.strerror or exc})") from exc
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise InputError(f"{path}: the population scale is not valid JSON ({exc})") from None
    scale = from_document(document, str(path))
    scale.provenance.setdefault("data_sha256", hashlib.sha256(data).hexdigest())
    return scale


@cache
def _shipped() -> PopulationScale:
    return _read(DATA_FILE)


@dataclass(frozen=True)
class PopulationFit:
    """Whether the population scale applies to a set of references, and why not when it does not."""

    scale: PopulationScale | None
    reason: str | None = None


def population_for(references: Sequence[Fingerprint], population: PopulationScale | None = None) -> PopulationFit:
    """The population scale for these references: shipped for their feature version, and spanning each of them.

    The candidate is not required to lie inside: one outside is simply far from every reference on
    this scale (out of cluster), which is what the scale is for.
    """
    scale = population if population is not None else load_population()
    versions = sorted({fp.feature_version for fp in references})
    missing = [v for v in versions if v not in scale.applies_to]
    if missing:
        return PopulationFit(None, f"no population scale is shipped for feature version {', '.join(missing)} "
                                   f"(the scale '{scale.name}' covers {', '.join(scale.applies_to)})")
    for fp in references:
        outside = scale.outside(fp)
        if outside:
            more = f" and {len(outside) - 1} more feature{'s' if len(outside) > 2 else ''}" if len(outside) > 1 else ""
            return PopulationFit(None, f"reference {fp.model_name} lies outside the real models it was measured on "
                                       f"({outside[0]}{more})")
    return PopulationFit(scale)
