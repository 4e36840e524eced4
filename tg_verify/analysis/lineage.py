"""Lineage test: is a candidate derived from THIS reference? From the two fingerprints' sketches alone.

Per matched unit, the similarity is the Pearson correlation of the off-diagonal entries of the two
normalised probe matrices (fingerprint/sketch.py), each first corrected for its own model's token
geometry at both ends (what its embed and head units explain, which independently trained models
share); layers are matched by a monotone alignment, so a dropped or duplicated layer costs one
unit. The score is the median over matched units. What a score means comes from an empirical null
(analysis/calibration.py): scores of independently trained models of the reference's architecture
class; the threshold is set from it at a target rate, and the rate at the observed score is stated
with its sample size and an exact upper bound. See docs/lineage.md.
"""

from __future__ import annotations

import base64
import binascii
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from tg_verify.analysis.alignment import align_layers
from tg_verify.analysis.blocks import BlockScore, block_score, decode_matrix, parse_blocks
from tg_verify.analysis.calibration import (
    UNCALIBRATED,
    Calibration,
    class_key,
    packaged_calibration,
    parse_architecture,
)
from tg_verify.analysis.lineage_rule import DEFAULT_ALPHA, LINEAGE_METHOD, is_derived
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.fingerprint.sketch import (
    GLOBAL_ROLES,
    KEY_SAMPLE,
    LAYER_ROLES,
    MAX_LAYERS,
    MAX_TOKENS,
    MIN_TOKENS,
    SKETCH_VERSION,
)

# Share of the larger vocabulary that both must hold to be compared: each probe mixture of the larger one is
# then at least half shared tokens (a vocabulary grown past 2x dilutes the evidence past what the test can read).
MIN_SHARED_VOCABULARY = 0.5
# Layers are compared within a band around the proportional diagonal, half-width |Lc - Lr| + slack:
# pure layer deletions or insertions never leave it, and deep models cost Lc x band, not Lc x Lr.
BAND_SLACK = 4
_KEY_KINDS = ("strings", "ids")


@dataclass(frozen=True)
class UnitMatch:
    """One matched unit: its role, the layers it joins (None for embed/head) and their similarity."""

    role: str
    candidate_layer: int | None
    reference_layer: int | None
    similarity: float

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "candidate_layer": self.candidate_layer,
                "reference_layer": self.reference_layer, "similarity": _round(self.similarity)}


@dataclass(frozen=True)
class LineageResult:
    """Outcome of one lineage test: score, calibrated threshold, the null's rate at the score, decision.

    `rate` is the share of the calibration's null pairs (`null_size` of them, class `calibration`) that
    score at least `score`, `rate_upper` its exact one-sided 95% upper bound; `p_value` = (1 + that
    count) / (n + 1); `false_positive_rate` (with `false_positive_upper`) is the share of the null the
    test calls derived at `threshold`. All are NaN when the reference's class is "uncalibrated".
    `null_scope` says which models the null covers (the rates hold for those).
    """

    score: float
    threshold: float
    p_value: float
    false_positive_rate: float
    derived: bool
    units: list[UnitMatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    comparable: bool = True
    alpha: float = DEFAULT_ALPHA
    min_score: float | None = None
    tokens: int = 0  # probe mixtures compared
    calibration: str = UNCALIBRATED
    null_size: int = 0
    rate: float = math.nan
    rate_upper: float = math.nan
    false_positive_upper: float = math.nan
    keys: str = ""
    method: str = LINEAGE_METHOD
    null_scope: str = ""
    block_score: float = math.nan  # the block evidence's score and threshold (NaN: not available)
    block_threshold: float = math.nan
    block_layers: list[tuple[int, int]] = field(default_factory=list)  # matched (candidate, reference) layers

    @property
    def calibrated(self) -> bool:
        return self.calibration != UNCALIBRATED

    @property
    def evidence(self) -> str:
        """Which evidence decided: "sketch+blocks", "sketch", "blocks" or "" (none comparable)."""
        return "+".join(name for name, value in (("sketch", self.score), ("blocks", self.block_score))
                        if math.isfinite(value))

    def scores_text(self, thresholds: bool = False) -> str:
        """The scores for reports: '0.812, blocks 0.764' (with thresholds: '0.812 / 0.301, blocks 0.764 / 0.081');
        an evidence that was not comparable is left out."""
        parts = []
        for label, score, threshold in (("", self.score, self.threshold),
                                        ("blocks ", self.block_score, self.block_threshold)):
            if math.isfinite(score):
                parts.append(f"{label}{score:.3f}" + (f" / {threshold:.3f}" if thresholds else ""))
        return ", ".join(parts) or "n/a"

    def rate_text(self) -> str:
        """The stated rate in words, for reports: 'rate 0/216 null pairs at or above (95% upper bound 1.4%)'."""
        if not self.comparable:
            return "not comparable"
        if not self.calibrated:
            return "uncalibrated (no null measured for this architecture)"
        count = round(self.rate * self.null_size)
        scope = f"; {self.null_scope}" if self.null_scope else ""
        return (f"{count}/{self.null_size} unrelated pairs score as high "
                f"(95% upper bound {self.rate_upper:.1%}; {self.calibration}{scope})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": _round(self.score), "threshold": _round(self.threshold), "p_value": _round(self.p_value),
            "false_positive_rate": _round(self.false_positive_rate),
            "false_positive_upper": _round(self.false_positive_upper), "derived": self.derived,
            "comparable": self.comparable, "alpha": self.alpha, "min_score": self.min_score,
            "calibration": self.calibration, "null_size": self.null_size, "rate": _round(self.rate),
            "rate_upper": _round(self.rate_upper), "null_scope": self.null_scope, "method": self.method,
            "keys": self.keys, "evidence": self.evidence, "block_score": _round(self.block_score),
            "block_threshold": _round(self.block_threshold), "block_layers": [list(p) for p in self.block_layers],
            "tokens": self.tokens, "units": [u.to_dict() for u in self.units], "notes": list(self.notes),
        }


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


@dataclass(frozen=True)
class ParsedSketch:
    """A validated sketch: probe description, architecture and {(role, layer): k x k matrix}."""

    seed: int
    mixtures: int
    keys: str
    keyed_rows: int
    rows: int
    key_sample: np.ndarray  # uint64, ascending
    architecture: dict[str, Any]
    units: dict[tuple[str, int | None], np.ndarray]


def _integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_sketch(sketch: Any, where: str) -> ParsedSketch:
    """Validate an untrusted sketch object; every problem is a FingerprintFormatError naming the field.

    The one entry point for reading a sketch (the lineage test, the calibration bench, search indexes).
    """
    if not isinstance(sketch, dict):
        raise FingerprintFormatError(f"{where}: sketch must be an object")
    version = sketch.get("version")
    if version != SKETCH_VERSION:
        if isinstance(version, str) and version.startswith("tgs"):
            raise FingerprintFormatError(
                f"{where}: sketch.version {version!r} was made by an older tg-verify (a probe an evader can defeat "
                f"cheaply, docs/lineage.md); re-fingerprint the model with this version "
                f"(sketch {SKETCH_VERSION!r})")
        raise FingerprintFormatError(f"{where}: sketch.version {version!r} is not supported "
                                     f"(expected {SKETCH_VERSION!r})")
    probe = sketch.get("probe")
    if not isinstance(probe, dict):
        raise FingerprintFormatError(f"{where}: sketch.probe must be an object")
    seed, k, keys = probe.get("seed"), probe.get("mixtures"), probe.get("keys")
    keyed, rows, sample = probe.get("keyed_rows"), probe.get("rows"), probe.get("key_sample")
    if not (_integer(seed) and _integer(rows) and _integer(keyed)) or keyed > rows:
        raise FingerprintFormatError(f"{where}: sketch.probe.seed, .rows and .keyed_rows must be non-negative "
                                     f"integers, keyed_rows at most rows")
    if not _integer(k) or not MIN_TOKENS <= k <= MAX_TOKENS:
        raise FingerprintFormatError(f"{where}: sketch.probe.mixtures must be an integer in "
                                     f"[{MIN_TOKENS}, {MAX_TOKENS}]")
    if keys not in _KEY_KINDS:
        raise FingerprintFormatError(f"{where}: sketch.probe.keys must be one of {', '.join(_KEY_KINDS)}")
    try:
        raw_sample = base64.b64decode(sample.encode("ascii"), validate=True) if isinstance(sample, str) else None
    except (binascii.Error, UnicodeEncodeError):
        raw_sample = None
    if raw_sample is None or len(raw_sample) % 8 or len(raw_sample) // 8 != min(KEY_SAMPLE, keyed):
        raise FingerprintFormatError(f"{where}: sketch.probe.key_sample must be base64 of the "
                                     f"{min(KEY_SAMPLE, keyed)} smallest token keys (uint64)")
    key_sample = np.frombuffer(raw_sample, dtype="<u8").astype(np.uint64)
    if np.any(np.diff(key_sample.astype(np.float64)) < 0) or len(np.unique(key_sample)) != len(key_sample):
        raise FingerprintFormatError(f"{where}: sketch.probe.key_sample must be distinct keys in ascending order")
    architecture = parse_architecture(sketch.get("architecture"), f"{where}: sketch.architecture")
    raw_units = sketch.get("units")
    limit = len(GLOBAL_ROLES) + len(LAYER_ROLES) * MAX_LAYERS
    if not isinstance(raw_units, list) or len(raw_units) > limit:
        raise FingerprintFormatError(f"{where}: sketch.units must be a list of at most {limit} units")
    units: dict[tuple[str, int | None], np.ndarray] = {}
    for n, unit in enumerate(raw_units):
        at = f"{where}: sketch.units[{n}]"
        if not isinstance(unit, dict):
            raise FingerprintFormatError(f"{at} must be an object")
        role, layer, data = unit.get("role"), unit.get("layer"), unit.get("data")
        if role in GLOBAL_ROLES:
            if layer is not None:
                raise FingerprintFormatError(f"{at}.layer must be null for role {role!r}")
        elif role in LAYER_ROLES:
            if not _integer(layer):
                raise FingerprintFormatError(f"{at}.layer must be a non-negative integer for role {role!r}")
        else:
            raise FingerprintFormatError(
                f"{at}.role {role!r} is unknown (expected one of {', '.join(GLOBAL_ROLES + LAYER_ROLES)})")
        matrix = decode_matrix(data, k, f"{at}.data", np.float32)
        if (role, layer) in units:
            raise FingerprintFormatError(f"{at} repeats role {role!r} layer {layer}")
        units[(role, layer)] = matrix
    return ParsedSketch(seed=seed, mixtures=k, keys=keys, keyed_rows=keyed, rows=rows, key_sample=key_sample,
                        architecture=architecture, units=units)


def shared_tokens(a: ParsedSketch, b: ParsedSketch) -> float:
    """Estimated number of tokens both keyed vocabularies hold (bottom-k sketch of the union: the Jaccard index
    from the smallest keys, then the intersection from the two sizes)."""
    if not a.keyed_rows or not b.keyed_rows:
        return 0.0
    union = np.union1d(a.key_sample, b.key_sample)[:KEY_SAMPLE]
    both = np.intersect1d(np.intersect1d(union, a.key_sample), b.key_sample)
    jaccard = len(both) / max(len(union), 1)
    return float(min(jaccard * (a.keyed_rows + b.keyed_rows) / (1 + jaccard), a.keyed_rows, b.keyed_rows))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN-slice warnings: unmatched units are NaN on purpose and skipped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _standardised(matrix: np.ndarray) -> np.ndarray:
    """The off-diagonal entries, centred and scaled to unit norm (NaN when constant)."""
    k = matrix.shape[0]
    values = matrix.astype(np.float64)[~np.eye(k, dtype=bool)]
    values = values - values.mean()
    norm = np.linalg.norm(values)
    return values / norm if norm > 0 else np.full_like(values, np.nan)


def _corrected(rows: np.ndarray, geometry: list[np.ndarray]) -> np.ndarray:
    """Remove from each standardised unit what the model's own token geometry (its embed and head units)
    explains by least squares; rows stay centred with unit norm (NaN rows stay NaN).

    Independently trained models learn similar token geometry at the input and the output; every unit
    inherits some of it through the probe. What is left is what a derivative inherits and a twin does not.
    """
    basis = [g for g in geometry if np.isfinite(g).all()]
    out = rows.copy()
    if basis:
        q, _ = np.linalg.qr(np.stack(basis, axis=1))
        out = rows - (rows @ q) @ q.T
    out = out - out.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 1e-6, out / norms, np.nan)


def _geometry(parsed: ParsedSketch, role: str) -> list[np.ndarray]:
    """The regressors a role is corrected with: the embed unit for the head, embed and head for the layers."""
    names = [] if role == "embed" else ["embed"] if role == "head" else ["embed", "head"]
    return [_standardised(parsed.units[(n, None)]) for n in names if (n, None) in parsed.units]


def _band(lc: int, lr: int) -> list[tuple[int, int]]:
    """Per candidate layer, the [lo, hi) range of reference layers it is compared with."""
    width = min(lr, 2 * (abs(lc - lr) + BAND_SLACK) + 1)
    windows = []
    for c in range(lc):
        centre = round(c * (lr - 1) / (lc - 1)) if lc > 1 else 0
        lo = min(max(centre - width // 2, 0), lr - width)
        windows.append((lo, lo + width))
    return windows


@dataclass(frozen=True)
class Score:
    """The uncalibrated part of a lineage test: the score (None when not comparable), matched units, notes."""

    score: float | None
    units: list[UnitMatch]
    notes: list[str]
    tokens: int = 0
    keys: str = ""
    reference_architecture: dict[str, Any] = field(default_factory=dict)


def lineage_score(candidate: Fingerprint, reference: Fingerprint) -> Score:
    """The lineage score of a candidate against a reference, without calibration (what bench/calibrate.py
    records for unrelated pairs). score=None with a note when the sketches cannot be compared."""
    for who, fingerprint in (("candidate", candidate), ("reference", reference)):
        if fingerprint.sketch is None:
            return Score(None, [], [f"sketch missing in the {who} fingerprint ({fingerprint.model_name})"])
    cand = parse_sketch(candidate.sketch, candidate.source or candidate.model_name)
    ref = parse_sketch(reference.sketch, reference.source or reference.model_name)
    arch = ref.architecture
    if cand.seed != ref.seed or cand.mixtures != ref.mixtures:
        return Score(None, [], [f"not comparable: probes differ (seed {cand.seed} vs {ref.seed}, "
                                f"{cand.mixtures} vs {ref.mixtures} mixtures)"], reference_architecture=arch)
    if cand.keys != ref.keys:
        kinds = {"strings": "token texts (its tokenizer was beside the weights)",
                 "ids": "token ids (no tokenizer beside the weights)"}
        return Score(None, [], [f"not comparable: the candidate's sketch keys tokens by {kinds[cand.keys]}, the "
                                f"reference's by {kinds[ref.keys]}; fingerprint both with their tokenizers"],
                     reference_architecture=arch)
    notes: list[str] = []
    larger = max(cand.keyed_rows, ref.keyed_rows)
    shared = shared_tokens(cand, ref) / larger if larger else 0.0
    if cand.keyed_rows != ref.keyed_rows or shared < 0.999:
        notes.append(f"vocabularies differ ({cand.keyed_rows} vs {ref.keyed_rows} keyed tokens): about "
                     f"{shared:.0%} of the larger one is shared")
    if shared < MIN_SHARED_VOCABULARY:
        return Score(None, [], [*notes, f"not comparable: about {shared:.0%} of the larger vocabulary is shared, "
                                        f"{MIN_SHARED_VOCABULARY:.0%} needed (another tokenizer, or a vocabulary "
                                        f"grown past 2x)"], reference_architecture=arch)
    roles = [r for r in GLOBAL_ROLES + LAYER_ROLES if r != "embed"
             and any(key[0] == r for key in cand.units) and any(key[0] == r for key in ref.units)]
    if not roles:
        return Score(None, [], [*notes, "not comparable: the sketches share no unit role"], reference_architecture=arch)
    if ("embed", None) not in cand.units or ("embed", None) not in ref.units:
        notes.append("no embedding unit in both sketches: units not corrected for shared token geometry")
    cand_layers = sorted({layer for (_, layer) in cand.units if layer is not None})
    ref_layers = sorted({layer for (_, layer) in ref.units if layer is not None})

    def stack(parsed: ParsedSketch, role: str, layers: list[int | None]) -> np.ndarray:
        k = parsed.mixtures
        rows = np.stack([_standardised(parsed.units[(role, layer)]) if (role, layer) in parsed.units
                         else np.full(k * (k - 1), np.nan) for layer in layers])
        return _corrected(rows, _geometry(parsed, role))

    sims: dict[str, np.ndarray] = {}
    lc, lr = max(len(cand_layers), 1), max(len(ref_layers), 1)
    for role in roles:
        layers_c: list[int | None] = [None] if role in GLOBAL_ROLES else list(cand_layers)
        layers_r: list[int | None] = [None] if role in GLOBAL_ROLES else list(ref_layers)
        a, b = stack(cand, role, layers_c), stack(ref, role, layers_r)
        sim = np.full((len(layers_c), len(layers_r)), np.nan)
        for c, (lo, hi) in enumerate(_band(lc, lr) if role in LAYER_ROLES else [(0, 1)]):
            sim[c, lo:hi] = b[lo:hi] @ a[c]  # NaN where either unit is missing
        sims[role] = sim
    layer_sims = [sims[r] for r in roles if r in LAYER_ROLES]
    if layer_sims and cand_layers and ref_layers:
        with _quiet():
            mask = align_layers(np.nanmean(np.stack(layer_sims), axis=0))
    else:
        mask = np.zeros((lc, lr), dtype=bool)
    units: list[UnitMatch] = []
    for role in roles:
        sim = sims[role]
        if role in GLOBAL_ROLES:
            if math.isfinite(sim[0, 0]):
                units.append(UnitMatch(role, None, None, float(sim[0, 0])))
            continue
        for ci, cj in zip(*np.nonzero(mask)):
            if math.isfinite(sim[ci, cj]):
                units.append(UnitMatch(role, cand_layers[ci], ref_layers[cj], float(sim[ci, cj])))
    order = {role: n for n, role in enumerate(GLOBAL_ROLES + LAYER_ROLES)}
    units.sort(key=lambda u: (-1 if u.candidate_layer is None else u.candidate_layer, order[u.role]))
    if not units:
        return Score(None, [], [*notes, "not comparable: no unit could be matched"], reference_architecture=arch)
    matched_c = {u.candidate_layer for u in units if u.candidate_layer is not None}
    matched_r = {u.reference_layer for u in units if u.reference_layer is not None}
    if cand_layers and ref_layers:
        if extra := [x for x in cand_layers if x not in matched_c]:
            notes.append(f"candidate layers without a match in the reference: {extra}")
        if missing := [x for x in ref_layers if x not in matched_r]:
            notes.append(f"reference layers without a match in the candidate: {missing}")
    score = float(np.median([u.similarity for u in units]))
    return Score(score, units, notes, tokens=cand.mixtures, keys=cand.keys, reference_architecture=arch)


def block_evidence(candidate: Fingerprint, reference: Fingerprint) -> tuple[BlockScore, dict[str, Any]]:
    """The block score of a candidate against a reference (score None, with a note, when either fingerprint has
    no block evidence or the two cannot be compared) and the reference's recorded architecture."""
    for who, fingerprint in (("candidate", candidate), ("reference", reference)):
        if fingerprint.blocks is None:
            return BlockScore(None, notes=[f"block evidence missing in the {who} fingerprint "
                                           f"({fingerprint.model_name})"]), {}
    cand = parse_blocks(candidate.blocks, candidate.source or candidate.model_name)
    ref = parse_blocks(reference.blocks, reference.source or reference.model_name)
    return block_score(cand, ref), ref.architecture


def _blocks_calibrated(calibration: Calibration, architecture: dict[str, Any]) -> bool:
    """Whether the calibration can set a block threshold for this architecture: its class's null has block scores,
    or (an uncalibrated class) some class's has."""
    null = calibration.null_for(architecture)
    if null is not None:
        return null.block_scores is not None
    return any(n.block_scores is not None for n in calibration.classes.values())


def lineage_test(candidate: Fingerprint, reference: Fingerprint, *, alpha: float = DEFAULT_ALPHA,
                 min_score: float | None = None, calibration: Calibration | None = None) -> LineageResult:
    """Test "candidate derives from reference" from the fingerprints' lineage evidence: the sketch and the blocks.

    derived iff either evidence scores above its threshold. Each threshold is its calibration null's level for
    the reference's architecture class (the most conservative calibrated class's when it has none) at `alpha`
    when it is the only evidence both fingerprints hold, at alpha / 2 when both are (the rule's rate on the null,
    measured on the pairs as they are, is stated beside). `min_score` raises the sketch's threshold only. No
    comparable evidence gives comparable=False, derived=False and notes.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    calibration = calibration if calibration is not None else packaged_calibration()
    sketch = lineage_score(candidate, reference)
    blocks, block_architecture = block_evidence(candidate, reference)
    notes = list(sketch.notes) + list(blocks.notes)
    architecture = sketch.reference_architecture or block_architecture
    if blocks.score is not None and not _blocks_calibrated(calibration, architecture):
        notes.append(f"block evidence scored {blocks.score:.3f} but {calibration.source} holds no block null for "
                     f"it: not used")
        blocks = BlockScore(None, blocks.matched, blocks.notes)
    if sketch.score is None and blocks.score is None:
        return LineageResult(score=math.nan, threshold=math.nan, p_value=math.nan, false_positive_rate=math.nan,
                             derived=False, notes=notes, comparable=False, alpha=alpha, min_score=min_score)
    if calibration.method != LINEAGE_METHOD:
        notes.append(f"{calibration.source} was measured with lineage method {calibration.method!r}, not "
                     f"{LINEAGE_METHOD!r}: uncalibrated")
    null = calibration.null_for(architecture) if calibration.method == LINEAGE_METHOD else None
    level = alpha / 2 if sketch.score is not None and blocks.score is not None else alpha
    block_null = null.blocks() if null is not None else None
    threshold = block_threshold = math.nan
    if null is None:
        if sketch.score is not None:
            threshold = calibration.conservative_threshold(level)
        if blocks.score is not None:
            block_threshold = calibration.conservative_threshold(level, blocks=True)
        notes.append(f"uncalibrated: no null measured for {class_key(architecture)}; the thresholds are the highest "
                     f"of the calibrated classes' (sketch {threshold:.3f}, blocks {block_threshold:.3f}), their error "
                     f"rate on this architecture is unknown")
    else:
        threshold = null.threshold(level) if sketch.score is not None else math.nan
        if blocks.score is not None and block_null is not None:
            block_threshold = block_null.threshold(level)
    if sketch.score is not None and min_score is not None and min_score > threshold:
        threshold = min_score
    score = sketch.score if sketch.score is not None else math.nan
    block = blocks.score if blocks.score is not None else math.nan
    fields: dict[str, Any] = {}
    if null is not None:
        if sketch.score is not None and blocks.score is not None:
            count, above = null.either_at_or_above(score, block), null.either_above(threshold, block_threshold)
        elif sketch.score is not None:
            count, above = null.at_or_above(score), null.above(threshold)
        else:
            assert block_null is not None
            count, above = block_null.at_or_above(block), block_null.above(block_threshold)
        fields = {"calibration": null.key, "null_size": null.size, "null_scope": calibration.scope,
                  "rate": count / null.size,
                  "rate_upper": null.upper_bound(count), "p_value": (1 + count) / (null.size + 1),
                  "false_positive_rate": above / null.size, "false_positive_upper": null.upper_bound(above)}
    derived = is_derived(score=score, threshold=threshold, block_score=block, block_threshold=block_threshold)
    return LineageResult(score=score, threshold=threshold, p_value=fields.pop("p_value", math.nan),
                         false_positive_rate=fields.pop("false_positive_rate", math.nan),
                         derived=derived, units=sketch.units, notes=notes, alpha=alpha, min_score=min_score,
                         tokens=sketch.tokens, keys=sketch.keys, block_score=block, block_threshold=block_threshold,
                         block_layers=list(blocks.matched), **fields)


# -- the per-unit similarity on live units, differentiable -------------------------------------------

def unit_similarities(candidate: Mapping[tuple[str, int | None], Any], reference: Mapping[tuple[str, int | None], Any]
                      ) -> dict[tuple[str, int | None], Any]:
    """The similarity the test computes for each unit both hold at the same layer, from normalised units
    (torch tensors from `sketch.sketch_units`, gradients flow; the embed unit is not scored). The test
    itself also aligns layers and takes the median; this is the per-unit part an adaptive attacker pushes."""
    import torch

    def standardised(matrix: torch.Tensor) -> torch.Tensor:
        k = matrix.shape[0]
        values = matrix.to(torch.float64)[~torch.eye(k, dtype=torch.bool, device=matrix.device)]
        values = values - values.mean()
        out: torch.Tensor = values / values.norm().clamp_min(1e-30)
        return out

    def corrected(units: Mapping[tuple[str, int | None], torch.Tensor], key: tuple[str, int | None]) -> torch.Tensor:
        row = standardised(units[key])
        names = ["embed"] if key[0] == "head" else ["embed", "head"]
        basis = [standardised(units[(n, None)]) for n in names if (n, None) in units]
        if basis:
            q, _ = torch.linalg.qr(torch.stack(basis, dim=1))
            row = row - q @ (q.T @ row)
        row = row - row.mean()
        out: torch.Tensor = row / row.norm().clamp_min(1e-30)
        return out

    return {key: corrected(candidate, key) @ corrected(reference, key)
            for key in reference if key in candidate and key[0] != "embed"}
