"""Lineage test: is a candidate derived from THIS reference? From the two fingerprints' sketches alone.

Per matched unit, the similarity is the Pearson correlation of the off-diagonal entries of the two
normalised token-probe matrices (fingerprint/sketch.py), each first corrected for its own model's
token geometry (which independently trained models share); layers are matched by a monotone
alignment, so a dropped or duplicated layer costs one unit. The score is the median over matched
units. Its null distribution (no token-level correspondence) comes from relabelling the candidate's
probe tokens at random, running the same alignment and median each time. See docs/lineage.md.
"""

from __future__ import annotations

import base64
import binascii
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tg_verify.analysis.lineage_rule import DEFAULT_ALPHA, is_derived
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.fingerprint.sketch import GLOBAL_ROLES, LAYER_ROLES, MAX_LAYERS, MAX_TOKENS, SKETCH_VERSION

# Minimum effect size. Derivatives keep the base's weight geometry almost intact (similarities
# near 1 even after heavy fine-tuning), while independently trained models share only the
# semantic part of it, which the weight-level invariants of HuRef and AWM measure near 0 on
# published checkpoints. 0.5 sits in the middle of that gap, so shared training data cannot
# carry an unrelated model over it while a derivative clears it with a wide margin.
DEFAULT_MIN_SCORE = 0.5
DEFAULT_PERMUTATIONS = 999
MIN_COMMON_TOKENS = 16  # fewer shared probe tokens than this: not comparable
# Layers are compared within a band around the proportional diagonal, half-width |Lc - Lr| + slack:
# pure layer deletions or insertions never leave it, and deep models cost Lc x band, not Lc x Lr.
BAND_SLACK = 4
_CHUNK_ELEMENTS = 8_000_000


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
    """Outcome of one lineage test: score, threshold with its false-positive rate, p-value, decision."""

    score: float
    threshold: float
    p_value: float
    false_positive_rate: float
    derived: bool
    units: list[UnitMatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    comparable: bool = True
    alpha: float = DEFAULT_ALPHA
    min_score: float = DEFAULT_MIN_SCORE
    tokens: int = 0
    permutations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": _round(self.score), "threshold": _round(self.threshold), "p_value": _round(self.p_value),
            "false_positive_rate": _round(self.false_positive_rate), "derived": self.derived,
            "comparable": self.comparable, "alpha": self.alpha, "min_score": self.min_score,
            "tokens": self.tokens, "permutations": self.permutations,
            "units": [u.to_dict() for u in self.units], "notes": list(self.notes),
        }


def _round(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


@dataclass(frozen=True)
class ParsedSketch:
    """A validated sketch: probe ids, vocabulary size, seed and {(role, layer): k x k matrix}."""

    seed: int
    vocab: int
    ids: np.ndarray
    units: dict[tuple[str, int | None], np.ndarray]


def parse_sketch(sketch: Any, where: str) -> ParsedSketch:
    """Validate an untrusted sketch object; every problem is a FingerprintFormatError naming the field."""
    if not isinstance(sketch, dict):
        raise FingerprintFormatError(f"{where}: sketch must be an object")
    if sketch.get("version") != SKETCH_VERSION:
        raise FingerprintFormatError(
            f"{where}: sketch.version {sketch.get('version')!r} is not supported (expected {SKETCH_VERSION!r})")
    probe = sketch.get("probe")
    if not isinstance(probe, dict):
        raise FingerprintFormatError(f"{where}: sketch.probe must be an object")
    seed, vocab, ids = probe.get("seed"), probe.get("vocab"), probe.get("ids")
    if not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(vocab, int) or vocab < 0:
        raise FingerprintFormatError(f"{where}: sketch.probe.seed and .vocab must be non-negative integers")
    if (not isinstance(ids, list) or len(ids) > MAX_TOKENS
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids)
            or any(a >= b for a, b in zip(ids, ids[1:]))):
        raise FingerprintFormatError(
            f"{where}: sketch.probe.ids must be at most {MAX_TOKENS} ascending token ids below vocab {vocab}")
    k = len(ids)
    raw_units = sketch.get("units")
    if not isinstance(raw_units, list) or len(raw_units) > len(GLOBAL_ROLES) + len(LAYER_ROLES) * MAX_LAYERS:
        raise FingerprintFormatError(f"{where}: sketch.units must be a list of at most "
                                     f"{len(GLOBAL_ROLES) + len(LAYER_ROLES) * MAX_LAYERS} units")
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
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise FingerprintFormatError(f"{at}.layer must be a non-negative integer for role {role!r}")
        else:
            raise FingerprintFormatError(
                f"{at}.role {role!r} is unknown (expected one of {', '.join(GLOBAL_ROLES + LAYER_ROLES)})")
        if not isinstance(data, str):
            raise FingerprintFormatError(f"{at}.data must be a base64 string")
        try:
            raw = base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise FingerprintFormatError(f"{at}.data is not valid base64") from None
        if len(raw) != 2 * k * k:
            raise FingerprintFormatError(f"{at}.data holds {len(raw)} bytes, expected {2 * k * k} ({k}x{k} float16)")
        matrix = np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(k, k)
        if not np.isfinite(matrix).all():
            raise FingerprintFormatError(f"{at}.data holds non-finite values")
        if (role, layer) in units:
            raise FingerprintFormatError(f"{at} repeats role {role!r} layer {layer}")
        units[(role, layer)] = matrix
    return ParsedSketch(seed=seed, vocab=vocab, ids=np.asarray(ids, dtype=np.int64), units=units)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN-slice warnings: unmatched units are NaN on purpose and skipped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _standardised(matrix: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The sub-matrix on `keep`, off-diagonal entries centred and scaled to unit norm, diagonal 0."""
    sub = matrix[np.ix_(keep, keep)].astype(np.float64)
    off = ~np.eye(len(keep), dtype=bool)
    values = sub[off]
    values = values - values.mean()
    norm = np.linalg.norm(values)
    out = np.zeros_like(sub)
    if norm > 0:
        out[off] = values / norm
    else:
        out[:] = np.nan
    return out.reshape(-1)


def _residualised(rows: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """Remove from each standardised unit what the model's own token geometry (its embed unit) explains.

    Independently trained models learn similar token geometry; every unit inherits some of it
    through the probe. What is left is the part of the block a derivative inherits and a twin
    does not. Rows stay centred with unit norm (NaN rows stay NaN).
    """
    out = rows - (rows @ geometry)[:, None] * geometry[None, :]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 1e-6, out / norms, np.nan)


def _not_comparable(note: str, alpha: float, min_score: float, notes: list[str] | None = None) -> LineageResult:
    return LineageResult(score=math.nan, threshold=math.nan, p_value=1.0, false_positive_rate=math.nan,
                         derived=False, notes=[*(notes or []), note], comparable=False, alpha=alpha,
                         min_score=min_score)


def _band(lc: int, lr: int) -> list[tuple[int, int]]:
    """Per candidate layer, the [lo, hi) range of reference layers it is compared with."""
    width = min(lr, 2 * (abs(lc - lr) + BAND_SLACK) + 1)
    windows = []
    for c in range(lc):
        centre = round(c * (lr - 1) / (lc - 1)) if lc > 1 else 0
        lo = min(max(centre - width // 2, 0), lr - width)
        windows.append((lo, lo + width))
    return windows


def _align(sims: np.ndarray) -> np.ndarray:
    """Monotone layer alignment maximising the summed similarity (gaps free), for a batch at once.

    sims: (B, Lc, Lr) layer-pair similarities. Returns a boolean (B, Lc, Lr) mask of matched pairs.
    Row by row: best[i, j] = max(best[i-1, j], best[i-1, j-1] + s[i-1, j-1], best[i, j-1]); the last
    term is a running maximum along j, so each row is three vector operations over (B, Lr).
    """
    batch, lc, lr = sims.shape
    gain = np.nan_to_num(sims, nan=0.0).astype(np.float64)
    best = np.zeros((batch, lc + 1, lr + 1))
    for i in range(1, lc + 1):
        candidate = best[:, i - 1, :].copy()
        candidate[:, 1:] = np.maximum(candidate[:, 1:], best[:, i - 1, :-1] + gain[:, i - 1, :])
        best[:, i, :] = np.maximum.accumulate(candidate, axis=1)
    mask = np.zeros((batch, lc, lr), dtype=bool)
    rows = np.arange(batch)
    i, j = np.full(batch, lc), np.full(batch, lr)
    for _ in range(lc + lr):
        active = (i > 0) & (j > 0)
        if not active.any():
            break
        here = best[rows, i, j]
        diagonal = best[rows, i - 1, j - 1] + gain[rows, np.maximum(i - 1, 0), np.maximum(j - 1, 0)]
        match = active & (diagonal >= here)
        up = active & ~match & (best[rows, i - 1, j] >= here)
        mask[rows[match], i[match] - 1, j[match] - 1] = True
        i = np.where(match | up, i - 1, i)
        j = np.where(active & ~up, j - 1, j)
    return mask


def lineage_test(candidate: Fingerprint, reference: Fingerprint, *, alpha: float = DEFAULT_ALPHA,
                 min_score: float = DEFAULT_MIN_SCORE, permutations: int = DEFAULT_PERMUTATIONS,
                 seed: int = 0) -> LineageResult:
    """Test "candidate derives from reference" from the fingerprints' sketches.

    derived iff the permutation p-value is <= alpha AND the score reaches min_score. A missing
    sketch or too few shared probe tokens gives comparable=False, derived=False and a note.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    for who, fingerprint in (("candidate", candidate), ("reference", reference)):
        if fingerprint.sketch is None:
            return _not_comparable(f"sketch missing in the {who} fingerprint ({fingerprint.model_name})",
                                   alpha, min_score)
    cand = parse_sketch(candidate.sketch, candidate.source or candidate.model_name)
    ref = parse_sketch(reference.sketch, reference.source or reference.model_name)
    if cand.seed != ref.seed:
        return _not_comparable(f"probe seeds differ ({cand.seed} vs {ref.seed}): no common probe tokens",
                               alpha, min_score)
    common, cand_keep, ref_keep = np.intersect1d(cand.ids, ref.ids, return_indices=True)
    notes: list[str] = []
    if len(common) < max(len(cand.ids), len(ref.ids)):
        notes.append(f"probe tokens differ (vocab {cand.vocab} vs {ref.vocab}): {len(common)} of "
                     f"{max(len(cand.ids), len(ref.ids))} shared")
    if len(common) < MIN_COMMON_TOKENS:
        return _not_comparable(f"not comparable: {len(common)} shared probe tokens, {MIN_COMMON_TOKENS} needed "
                               f"(different tokenizer or vocabulary)", alpha, min_score, notes)
    roles = [r for r in GLOBAL_ROLES + LAYER_ROLES
             if any(key[0] == r for key in cand.units) and any(key[0] == r for key in ref.units)]
    if not roles:
        return _not_comparable("not comparable: the sketches share no unit role", alpha, min_score, notes)
    cand_layers = sorted({layer for (_, layer) in cand.units if layer is not None})
    ref_layers = sorted({layer for (_, layer) in ref.units if layer is not None})

    geometry = ("embed", None) in cand.units and ("embed", None) in ref.units
    if not geometry:
        notes.append("no embedding unit in both sketches: units not corrected for shared token geometry")

    def stack(parsed: ParsedSketch, role: str, layers: list[int | None], keep: np.ndarray) -> np.ndarray:
        n2 = len(keep) ** 2
        rows = np.stack([_standardised(parsed.units[(role, layer)], keep) if (role, layer) in parsed.units
                         else np.full(n2, np.nan) for layer in layers])
        if geometry and role != "embed":
            rows = _residualised(rows, _standardised(parsed.units[("embed", None)], keep))
        return rows.astype(np.float32)

    n = len(common)
    stacks = []
    for role in roles:
        layers_c: list[int | None] = [None] if role in GLOBAL_ROLES else list(cand_layers)
        layers_r: list[int | None] = [None] if role in GLOBAL_ROLES else list(ref_layers)
        ref_stack = np.nan_to_num(stack(ref, role, layers_r, ref_keep))
        ref_missing = np.array([(role, layer) not in ref.units for layer in layers_r])
        cand_stack = stack(cand, role, layers_c, cand_keep)
        stacks.append((role, np.nan_to_num(cand_stack), np.isnan(cand_stack[:, 0]), ref_stack, ref_missing))

    rng = np.random.default_rng(seed)
    orders = np.stack([np.arange(n)] + [rng.permutation(n) for _ in range(permutations)])
    gather = (orders[:, :, None] * n + orders[:, None, :]).reshape(len(orders), n * n)
    lc, lr = max(len(cand_layers), 1), max(len(ref_layers), 1)
    windows = _band(lc, lr)
    per_perm = n * n + 2 * len(stacks) * lc * lr
    chunk = max(1, _CHUNK_ELEMENTS // max(per_perm, 1))
    scores = np.empty(len(orders))
    observed: tuple[np.ndarray, list[np.ndarray]] | None = None
    for start in range(0, len(orders), chunk):
        index = gather[start:start + chunk]
        role_sims = []
        batch = len(index)
        for role, cand_stack, cand_missing, ref_stack, ref_missing in stacks:
            sims = np.full((batch, cand_stack.shape[0], ref_stack.shape[0]), np.nan, dtype=np.float32)
            for c, (lo, hi) in enumerate(windows if role in LAYER_ROLES else [(0, 1)]):
                # one candidate unit under every permutation at once, against its band of reference units
                sims[:, c, lo:hi] = cand_stack[c][index] @ ref_stack[lo:hi].T
            sims[:, cand_missing, :] = np.nan
            sims[:, :, ref_missing] = np.nan
            role_sims.append(sims)
        layer_roles = [s for (role, *_), s in zip(stacks, role_sims) if role in LAYER_ROLES]
        if layer_roles and cand_layers and ref_layers:
            with _quiet():
                layer_sims = np.nanmean(np.stack(layer_roles), axis=0)
            mask = _align(layer_sims)
        else:
            mask = np.zeros((len(index), lc, lr), dtype=bool)
        pooled = [np.where(mask, s, np.nan).reshape(len(index), -1) for s in layer_roles]
        pooled += [s.reshape(len(index), -1) for (role, *_), s in zip(stacks, role_sims)
                   if role in GLOBAL_ROLES and (role != "embed" or not geometry)]
        with _quiet():
            scores[start:start + len(index)] = np.nanmedian(np.concatenate(pooled, axis=1), axis=1)
        if start == 0:
            observed = (mask[0], [s[0] for s in role_sims])
    score = float(scores[0])
    null = scores[1:]
    if not math.isfinite(score):
        return _not_comparable("not comparable: no unit could be matched", alpha, min_score, notes)
    null = np.nan_to_num(null, nan=-1.0)
    p_value = float((1 + np.count_nonzero(null >= score)) / (permutations + 1))
    threshold = max(min_score, float(np.quantile(null, 1 - alpha, method="higher")))
    fpr = float((1 + np.count_nonzero(null >= threshold)) / (permutations + 1))
    derived = is_derived(score=score, threshold=threshold, p_value=p_value, alpha=alpha)
    assert observed is not None
    units = _matched_units(stacks, observed, cand_layers, ref_layers)
    matched_c = {u.candidate_layer for u in units if u.candidate_layer is not None}
    matched_r = {u.reference_layer for u in units if u.reference_layer is not None}
    if cand_layers and ref_layers:
        if extra := [x for x in cand_layers if x not in matched_c]:
            notes.append(f"candidate layers without a match in the reference: {extra}")
        if missing := [x for x in ref_layers if x not in matched_r]:
            notes.append(f"reference layers without a match in the candidate: {missing}")
    return LineageResult(score=score, threshold=threshold, p_value=p_value, false_positive_rate=fpr,
                         derived=derived, units=units, notes=notes, alpha=alpha, min_score=min_score,
                         tokens=n, permutations=permutations)


def _matched_units(stacks: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                   observed: tuple[np.ndarray, list[np.ndarray]], cand_layers: list[int],
                   ref_layers: list[int]) -> list[UnitMatch]:
    mask, sims = observed
    units: list[UnitMatch] = []
    for (role, *_), sim in zip(stacks, sims):
        if role in GLOBAL_ROLES:
            if math.isfinite(sim[0, 0]):
                units.append(UnitMatch(role, None, None, float(sim[0, 0])))
            continue
        for ci, cj in zip(*np.nonzero(mask)):
            if math.isfinite(sim[ci, cj]):
                units.append(UnitMatch(role, cand_layers[ci], ref_layers[cj], float(sim[ci, cj])))
    order = {role: n for n, role in enumerate(GLOBAL_ROLES + LAYER_ROLES)}
    units.sort(key=lambda u: (-1 if u.candidate_layer is None else u.candidate_layer, order[u.role]))
    return units
