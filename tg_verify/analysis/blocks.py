"""Block lineage score: does one rotation map a candidate's blocks onto a reference's, attention and MLP alike?

Each fingerprint's block evidence (fingerprint/blocks.py) holds per layer X_l (attention OV) and Y_l (MLP
down-up) in the model's own r-dimensional frame. A derivative's frame is its base's turned by some r x r
rotation T; a model trained from another seed has an unrelated frame. The score is cross-fitted: T is fitted
to map the candidate's X's onto the reference's (sign matching, then polar iterations), and scored by the
correlation of the *Y's* it maps (identity part removed); then the reverse (fit on Y, score X), and the mean.
Fitting and scoring on the same units would let a rotation fit an unrelated model too; across units, only a
shared residual basis transfers. Layers are matched by the lineage test's monotone alignment, chosen from the
fitted units only. See docs/lineage.md.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from tg_verify.analysis.alignment import align_layers
from tg_verify.analysis.calibration import parse_architecture
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.blocks import BLOCKS_VERSION, MAX_LAYERS, ROLES

MIN_RANK, MAX_RANK = 4, 64
POLAR_ITERATIONS = 20
CONVERGED = 1e-6  # polar iterations stop once no entry of T moves more than this


@dataclass(frozen=True)
class ParsedBlocks:
    """Validated block evidence: the frame's width, the architecture, and [L, r, r] X and Y stacks by layer."""

    rank: int
    architecture: dict[str, Any]
    layers: list[int]
    ov: np.ndarray
    ud: np.ndarray


@dataclass(frozen=True)
class BlockScore:
    """The block score (None when not comparable), the matched layers (candidate, reference), and notes."""

    score: float | None
    matched: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    directions: tuple[float, float] | None = None  # (fit OV score UD, fit UD score OV)


def _integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_blocks(blocks: Any, where: str) -> ParsedBlocks:
    """Validate an untrusted `blocks` object; every problem is a FingerprintFormatError naming the field."""
    if not isinstance(blocks, dict):
        raise FingerprintFormatError(f"{where}: blocks must be an object")
    if blocks.get("version") != BLOCKS_VERSION:
        raise FingerprintFormatError(f"{where}: blocks.version {blocks.get('version')!r} is not supported "
                                     f"(expected {BLOCKS_VERSION!r})")
    rank = blocks.get("rank")
    if not _integer(rank) or not MIN_RANK <= rank <= MAX_RANK:
        raise FingerprintFormatError(f"{where}: blocks.rank must be an integer in [{MIN_RANK}, {MAX_RANK}]")
    frame = blocks.get("frame")
    if not isinstance(frame, str) or not 0 < len(frame) <= 40 or not frame.isprintable():
        raise FingerprintFormatError(f"{where}: blocks.frame must be a short printable string")
    if blocks.get("dtype") != "float16":
        raise FingerprintFormatError(f"{where}: blocks.dtype must be 'float16'")
    architecture = parse_architecture(blocks.get("architecture"), f"{where}: blocks.architecture")
    units = blocks.get("units")
    if not isinstance(units, list) or not 0 < len(units) <= MAX_LAYERS:
        raise FingerprintFormatError(f"{where}: blocks.units must be a non-empty list of at most {MAX_LAYERS} layers")
    layers: list[int] = []
    stacks: dict[str, list[np.ndarray]] = {role: [] for role in ROLES}
    for n, unit in enumerate(units):
        at = f"{where}: blocks.units[{n}]"
        if not isinstance(unit, dict) or set(unit) != {"layer", *ROLES}:
            raise FingerprintFormatError(f"{at} must be an object with exactly layer, {', '.join(ROLES)}")
        layer = unit["layer"]
        if not _integer(layer) or (layers and layer <= layers[-1]):
            raise FingerprintFormatError(f"{at}.layer must be a non-negative integer above the previous unit's")
        layers.append(layer)
        for role in ROLES:
            stacks[role].append(decode_matrix(unit[role], rank, f"{at}.{role}", np.float64))
    return ParsedBlocks(rank=rank, architecture=architecture, layers=layers,
                        ov=np.stack(stacks["attn_ov"]), ud=np.stack(stacks["mlp_ud"]))


def decode_matrix(data: Any, rank: int, at: str, dtype: type[np.floating[Any]]) -> np.ndarray:
    """An untrusted base64 field holding a rank x rank float16 matrix (row-major), as `dtype`; every problem is a
    FingerprintFormatError naming the field `at` (the sketch's units are read with it too)."""
    if not isinstance(data, str):
        raise FingerprintFormatError(f"{at} must be a base64 string")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FingerprintFormatError(f"{at} is not valid base64") from None
    if len(raw) != 2 * rank * rank:
        raise FingerprintFormatError(f"{at} holds {len(raw)} bytes, expected {2 * rank * rank} "
                                     f"({rank}x{rank} float16)")
    matrix = np.frombuffer(raw, dtype="<f2").astype(dtype).reshape(rank, rank)
    if not np.isfinite(matrix).all():
        raise FingerprintFormatError(f"{at} holds non-finite values")
    return matrix


# -- the score ---------------------------------------------------------------------------------------------

def centred(m: np.ndarray) -> np.ndarray:
    """Units without their identity part (the part any two models share whatever their bases), flattened."""
    r = m.shape[-1]
    eye = np.eye(r)
    trace = np.trace(m, axis1=-2, axis2=-1)[..., None, None]
    out: np.ndarray = (m - trace / r * eye).reshape(*m.shape[:-2], r * r)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = float(np.sqrt((a @ a) * (b @ b)))
    return min(1.0, max(-1.0, float(a @ b / den))) if den > 0 else 0.0  # rounding can pass 1 by an ulp


def best_signs(kmat: np.ndarray) -> np.ndarray:
    """Signs s maximising sᵀ K s (K symmetric, zero diagonal): the top eigenvector's signs, then single flips."""
    _, vectors = np.linalg.eigh(kmat)
    s = np.where(vectors[:, -1] >= 0, 1.0, -1.0)
    for _ in range(4 * len(s)):
        gains = -4 * s * (kmat @ s)  # change of sᵀKs when s_a flips
        a = int(np.argmax(gains))
        if gains[a] <= 1e-12:
            break
        s[a] = -s[a]
    return s


def fit_rotation(cs: np.ndarray, rs: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Orthogonal T (r x r) maximising Σ_u <T C_u Tᵀ, R_u>: from the sign matching of the two frames taken in
    order (or `start`), by polar iterations T <- polar(Σ_u R_u T C_uᵀ + R_uᵀ T C_u)."""
    if start is None:
        kmat = (cs * rs).sum(axis=0)
        kmat = (kmat + kmat.T) / 2
        np.fill_diagonal(kmat, 0.0)
        t = np.diag(best_signs(kmat))
    else:
        t = start
    for _ in range(POLAR_ITERATIONS):
        g = (rs @ t @ cs.transpose(0, 2, 1) + rs.transpose(0, 2, 1) @ t @ cs).sum(axis=0)
        u, _, vt = np.linalg.svd(g)
        t, previous = u @ vt, t
        if np.abs(t - previous).max() < CONVERGED:
            break
    return t


def _proportional(lc: int, lr: int) -> list[tuple[int, int]]:
    if lc == 1 or lr == 1:
        return [(0, 0)]
    return sorted({(c, round(c * (lr - 1) / (lc - 1))) for c in range(lc)})


def _monotone(sims: np.ndarray) -> list[tuple[int, int]]:
    mask = align_layers(sims)
    return [(int(c), int(r)) for c, r in zip(*np.nonzero(mask))]


def _direction(fit_c: np.ndarray, fit_r: np.ndarray, test_c: np.ndarray, test_r: np.ndarray
               ) -> tuple[float, list[tuple[int, int]]]:
    """Fit T on one kind of unit (proportional layer map, then the monotone alignment of the fitted units),
    score the other kind; returns the score and the matched layer pairs."""
    pairs = _proportional(len(fit_c), len(fit_r))
    t = fit_rotation(np.stack([fit_c[c] for c, _ in pairs]), np.stack([fit_r[r] for _, r in pairs]))
    if len(fit_c) > 1 and len(fit_r) > 1:
        mapped = centred(t @ fit_c @ t.T)
        reference = centred(fit_r)
        sims = np.array([[pearson(a, b) for b in reference] for a in mapped])
        pairs = _monotone(sims) or pairs
        t = fit_rotation(np.stack([fit_c[c] for c, _ in pairs]), np.stack([fit_r[r] for _, r in pairs]), t)
    mapped = np.concatenate([centred(t @ test_c[c] @ t.T) for c, _ in pairs])
    return pearson(mapped, np.concatenate([centred(test_r[r]) for _, r in pairs])), pairs


def block_score(candidate: ParsedBlocks, reference: ParsedBlocks) -> BlockScore:
    """The cross-fitted block score of a candidate against a reference (None, with a note, when the two frames
    differ in width)."""
    if candidate.rank != reference.rank:
        return BlockScore(None, notes=[f"block evidence not comparable: frames of width {candidate.rank} and "
                                       f"{reference.rank}"])
    forward, pairs = _direction(candidate.ov, reference.ov, candidate.ud, reference.ud)
    backward, _ = _direction(candidate.ud, reference.ud, candidate.ov, reference.ov)
    score = (forward + backward) / 2
    if not math.isfinite(score):
        return BlockScore(None, notes=["block evidence not comparable: a unit is constant"])
    notes = []
    if len(candidate.layers) != len(reference.layers):
        notes.append(f"block evidence: {len(candidate.layers)} candidate layers against {len(reference.layers)}")
    matched = [(candidate.layers[c], reference.layers[r]) for c, r in pairs]
    return BlockScore(score, matched, notes, (forward, backward))
