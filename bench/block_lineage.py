"""Feasibility study: lineage evidence from the transformer blocks alone (no token embedding, no head).

The lineage sketch (tg_verify/fingerprint/sketch.py) reads every block through mixtures of the candidate's own
embedding rows; re-initialising the embedding and repairing it (docs/evasion.md) leaves the blocks inherited but
takes the score to the null. This script measures candidate statistics that never touch the embedding: functions
of per-layer d x d matrices that transform as M -> Qᵀ M Q under every residual-stream rotation/permutation Q
(gains absorbed), unchanged by head and MLP-unit permutations and rescalings, q/k and v/o rescaling and fused vs
split projections:

    OV = Σ_h W_o^h W_v^{g(h)} diag(g_attn)      QK = Σ_h (W_q^h diag g_attn)ᵀ (W_k^{g(h)} diag g_attn)
    GG = diag(g_mlp) W_gateᵀ W_gate diag(g_mlp)  UD = W_down W_up diag(g_mlp)

Statistics (each a score for a (candidate, reference) pair, maximised over monotone layer injections so a dropped
or duplicated layer costs only its own evidence):

    spectra     per unit, the normalised singular values (a TensorGuard-like distribution statistic: the control)
    gram        cosines <M_i, M_j>_F between all units of all layers (the cross-layer Gram)
    words       traces of seeded words of 2-4 units (and transposes) within a layer or two adjacent ones, centred
                by their free-probability expectation Π τ(M_i)
    eigframe    each layer's OV, QK, UD read in the frame of its gate Gram's top-k eigenvectors (V_lᵀ M V_l,
                off-diagonal), compared after the best sign flips of the frame (eigenvectors have no sign)
    eigsq       the same entries squared (sign-free, no alignment)
    subspace    all four units read in the top-r eigenframe of Σ_l GG_l; an orthogonal r x r alignment fitted on
                the attention units and scored on the MLP units, and the reverse (cross-fitted)
    robust      the same with only OV and UD (which cancelling dead units and heads leave exactly unchanged), the
                frame from Σ_l Σ_{OV,UD} (M Mᵀ + Mᵀ M) over unnormalised units; fitted on OV, scored on UD, and
                the reverse: what a fingerprint could store (L x 2 x r x r)
    robust-local  the same with one frame and one alignment per layer (survives dropped / inserted layers)
    robust-max  the larger of robust and robust-local (a fingerprint storing both)
    procrustes  (needs the reference's weights) a full-width orthogonal T aligning the candidate's residual basis
                to the reference's, started from the gate-Gram eigenframes, refined by polar iterations on
                Σ_u <T C_u Tᵀ, R_u>; the correlation of the aligned units (identity part removed)
    procrustes-cv  the same fitted on the attention units and scored on the MLP units, and the reverse
    procrustes-ou  (needs the reference's weights) full width, robust frame from the matched layers, fitted on
                OV and scored on UD, and the reverse
    oracle      not invariant: the units' correlation in the stored bases; only meaningful when neither model was
                rotated (every pair here), it bounds what any invariant could read from the blocks

    nice -n 10 .venv/bin/python bench/block_lineage.py --sample 30 [--stats NAME ...] [--calibration DIR]
        [--evasion DIR] [--skip-invariance]     # about 40 minutes on one shared core; findings: NOTES-blocks.md

Reads the calibration zoo (bench/calibrate.py) and the evasion bench's cached models (bench/evasion.py); trains
nothing. Prints Markdown tables.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# bench/calibrate.py's and bench/evasion.py's default work directories; each holds <recipe digest>/models
CALIBRATION = ROOT / "bench" / "out" / "calibrate"
EVASION = ROOT / "bench" / "out" / "evasion"


def models_dir(path: Path, what: str) -> Path:
    """`path` itself when it holds the models, else the one `<digest>/models` under it (a bench's work directory)."""
    if path.name == "models" and path.is_dir():
        return path
    found = sorted(path.glob("*/models"))
    if len(found) != 1:
        raise SystemExit(f"{path}: expected the models directory of {what} or a work directory holding exactly one "
                         f"<digest>/models, found {len(found)}; pass --{what} DIR")
    return found[0]
ROLES = ("OV", "QK", "GG", "UD")
FRAME_K = 16  # eigenframe size
RANK = 32  # the subspace / robust frames' size r (--rank)
WORD_SEED = 12345
PROCRUSTES_ITERATIONS = 20


# -- the block matrices --------------------------------------------------------------------------------

@dataclass
class Blocks:
    """A model's per-layer d x d block matrices (float64), each scaled to unit Frobenius norm."""

    name: str
    d: int
    layers: list[dict[str, np.ndarray]]
    norms: list[dict[str, float]]  # each unit's Frobenius norm before scaling (invariant too)


def _cfg(config: Any) -> dict[str, Any]:
    return config if isinstance(config, dict) else config.to_dict()


def blocks_of(state: Mapping[str, torch.Tensor], config: Any, name: str = "") -> Blocks:
    """The four units of every layer, gains absorbed, fused projections split, heads summed."""
    c = _cfg(config)
    offset = 1.0 if str(c.get("model_type", "")).startswith("gemma") else 0.0
    d = int(c["hidden_size"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or d // heads)
    count = int(c["num_hidden_layers"])
    out, norms = [], []
    for i in range(count):
        p = f"model.layers.{i}."
        s = {k[len(p):]: v.detach().to(torch.float64) for k, v in state.items() if k.startswith(p)}
        g_attn = s["input_layernorm.weight"] + offset
        g_mlp = s.get("pre_feedforward_layernorm.weight", s["post_attention_layernorm.weight"]) + offset
        if "self_attn.qkv_proj.weight" in s:
            w = s["self_attn.qkv_proj.weight"]
            q, k, v = w[:heads * hd], w[heads * hd:(heads + kv) * hd], w[(heads + kv) * hd:]
        else:
            q, k, v = (s[f"self_attn.{n}_proj.weight"] for n in "qkv")
        if "mlp.gate_up_proj.weight" in s:
            w = s["mlp.gate_up_proj.weight"]
            gate, up = w[:w.shape[0] // 2], w[w.shape[0] // 2:]
        else:
            gate, up = s["mlp.gate_proj.weight"], s["mlp.up_proj.weight"]
        o, down = s["self_attn.o_proj.weight"], s["mlp.down_proj.weight"]
        aq, ak, av = q * g_attn, k * g_attn, v * g_attn
        ag, au = gate * g_mlp, up * g_mlp

        def expand(m: torch.Tensor) -> torch.Tensor:  # key/value groups repeated for their query heads
            return m.reshape(kv, hd, d).repeat_interleave(heads // kv, dim=0).reshape(heads * hd, d)

        units = {"OV": o @ expand(av), "QK": aq.T @ expand(ak), "GG": ag.T @ ag, "UD": down @ au}
        out.append({r: (m / m.norm().clamp_min(1e-30)).numpy() for r, m in units.items()})
        norms.append({r: float(m.norm()) for r, m in units.items()})
    return Blocks(name, d, out, norms)


def load_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state, json.loads((path / "config.json").read_text())


def load_blocks(path: Path) -> Blocks:
    state, config = load_folder(path)
    return blocks_of(state, config, path.name)


# -- layer alignment -----------------------------------------------------------------------------------

def injections(lc: int, lr: int) -> Iterator[dict[int, int]]:
    """Every monotone map between the layers of the shorter model and the longer one (candidate -> reference)."""
    if lc <= lr:
        for combo in itertools.combinations(range(lr), lc):
            yield dict(zip(range(lc), combo))
    else:
        for combo in itertools.combinations(range(lc), lr):
            yield dict(zip(combo, range(lr)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def tuple_score(fc: dict[tuple[int, ...], np.ndarray], fr: dict[tuple[int, ...], np.ndarray], lc: int, lr: int
                ) -> float:
    """Pearson correlation of the matched tuples' concatenated features, the best over layer injections."""
    best = -1.0
    for m in injections(lc, lr):
        xs, ys = [], []
        for t, x in fc.items():
            if all(i in m for i in t):
                u = tuple(m[i] for i in t)
                if u in fr:
                    xs.append(x)
                    ys.append(fr[u])
        if xs:
            best = max(best, pearson(np.concatenate(xs), np.concatenate(ys)))
    return best


# -- statistics ----------------------------------------------------------------------------------------

def spectra_features(b: Blocks) -> dict[tuple[int, ...], np.ndarray]:
    top = b.d // 3
    return {(i,): np.concatenate([np.linalg.svd(layer[r], compute_uv=False)[:top] for r in ROLES])
            for i, layer in enumerate(b.layers)}


def gram_features(b: Blocks) -> dict[tuple[int, ...], np.ndarray]:
    out = {}
    for i, j in itertools.combinations_with_replacement(range(len(b.layers)), 2):
        values = [float((b.layers[i][r] * b.layers[j][s]).sum()) for r in ROLES for s in ROLES
                  if i != j or ROLES.index(r) < ROLES.index(s)]
        out[(i, j)] = np.asarray(values)
    return out


def _words(units: int, count: int, rng: np.random.Generator, span: int) -> list[list[tuple[int, bool]]]:
    """Seeded words of distinct units (index, transposed), lengths 2-4; with span 2 each word uses both layers."""
    words = []
    while len(words) < count:
        length = int(rng.integers(2, 5))
        picks = rng.choice(units, size=length, replace=False)
        if span == 2 and len({int(p) // len(ROLES) for p in picks}) < 2:
            continue
        words.append([(int(p), bool(rng.integers(0, 2))) for p in picks])
    return words


WORDS_1 = _words(4, 48, np.random.default_rng(WORD_SEED), 1)
WORDS_2 = _words(8, 96, np.random.default_rng(WORD_SEED + 1), 2)


def _centred_trace(mats: list[np.ndarray], word: list[tuple[int, bool]]) -> float:
    d = mats[0].shape[0]
    scale = np.sqrt(d)  # unit Frobenius -> τ(M Mᵀ) = 1 with τ = tr / d
    prod = np.eye(d)
    free = 1.0
    for index, transposed in word:
        m = mats[index] * scale
        prod = prod @ (m.T if transposed else m)
        free *= np.trace(m) / d
    return float(np.trace(prod) / d - free)


def words_features(b: Blocks) -> dict[tuple[int, ...], np.ndarray]:
    out = {}
    for i, layer in enumerate(b.layers):
        mats = [layer[r] for r in ROLES]
        out[(i,)] = np.asarray([_centred_trace(mats, w) for w in WORDS_1])
        if i + 1 < len(b.layers):
            mats2 = mats + [b.layers[i + 1][r] for r in ROLES]
            out[(i, i + 1)] = np.asarray([_centred_trace(mats2, w) for w in WORDS_2])
    return out


def eigframe_features(b: Blocks, k: int = FRAME_K) -> list[np.ndarray]:
    """Per layer [3, k, k]: OV, QK, UD read in the frame of the gate Gram's top-k eigenvectors."""
    out = []
    for layer in b.layers:
        values, vectors = np.linalg.eigh(layer["GG"])
        v = vectors[:, np.argsort(values)[::-1][:k]]
        out.append(np.stack([v.T @ layer[r] @ v for r in ("OV", "QK", "UD")]))
    return out


def best_signs(kmat: np.ndarray) -> np.ndarray:
    """Signs s maximising sᵀ K s (K symmetric, zero diagonal): the top eigenvector's signs, then single flips."""
    values, vectors = np.linalg.eigh(kmat)
    s = np.where(vectors[:, -1] >= 0, 1.0, -1.0)
    improved = True
    while improved:
        improved = False
        gains = -4 * s * (kmat @ s)  # change of sᵀKs when s_a flips (diagonal is zero)
        a = int(np.argmax(gains))
        if gains[a] > 1e-12:
            s[a] = -s[a]
            improved = True
    return s


def _offdiag(x: np.ndarray) -> np.ndarray:
    k = x.shape[-1]
    mask = ~np.eye(k, dtype=bool)
    return x[..., mask].reshape(-1)


def eigframe_score(fc: list[np.ndarray], fr: list[np.ndarray], squared: bool = False) -> float:
    best = -1.0
    for m in injections(len(fc), len(fr)):
        xs, ys = [], []
        for i, j in m.items():
            c, r = fc[i], fr[j]
            if squared:
                xs.append(_offdiag(c * c))
                ys.append(_offdiag(r * r))
                continue
            kmat = (c * r).sum(axis=0)
            kmat = (kmat + kmat.T) / 2
            np.fill_diagonal(kmat, 0.0)
            s = best_signs(kmat)
            xs.append(_offdiag(c * s[None, :, None] * s[None, None, :]))
            ys.append(_offdiag(r))
        best = max(best, pearson(np.concatenate(xs), np.concatenate(ys)))
    return best


def _centred(m: np.ndarray) -> np.ndarray:
    """A unit without its scalar (identity) part, the part every model shares whatever its basis."""
    return m - np.trace(m) / m.shape[0] * np.eye(m.shape[0])


def _align(cs: np.ndarray, rs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Polar iterations for max_T Σ_u <T C_u Tᵀ, R_u> over orthogonal T, from T."""
    for _ in range(PROCRUSTES_ITERATIONS):
        g = (rs @ t @ cs.transpose(0, 2, 1) + rs.transpose(0, 2, 1) @ t @ cs).sum(axis=0)
        u, _, vt = np.linalg.svd(g)
        t = u @ vt
    return t


def _frame_start(cs: np.ndarray, rs: np.ndarray, vc: np.ndarray, vr: np.ndarray) -> np.ndarray:
    """T = V_r S V_cᵀ: the two eigenframes matched in order, signs chosen to agree on the units."""
    kmat = ((vc.T @ cs @ vc) * (vr.T @ rs @ vr)).sum(axis=0)
    kmat = (kmat + kmat.T) / 2
    np.fill_diagonal(kmat, 0.0)
    return vr @ np.diag(best_signs(kmat)) @ vc.T


def _frame(gates: list[np.ndarray]) -> np.ndarray:
    values, vectors = np.linalg.eigh(sum(gates))
    return vectors[:, np.argsort(values)[::-1]]


SPLITS = ((("QK", "OV"), ("GG", "UD")), (("GG", "UD"), ("QK", "OV")))


def procrustes_score(bc: Blocks, br: Blocks, cross: bool = False) -> float:
    """Align the candidate's residual basis to the reference's from block matrices, then correlate the aligned
    units (identity part removed). cross: fit on the attention units, score on the MLP's, and the reverse (mean)."""
    best = -1.0
    for m in injections(len(bc.layers), len(br.layers)):
        vc = _frame([bc.layers[i]["GG"] for i in m])
        vr = _frame([br.layers[j]["GG"] for j in m.values()])

        def stack(b: Blocks, layers: Any, roles: tuple[str, ...]) -> np.ndarray:
            return np.stack([b.layers[i][r] for i in layers for r in roles])

        if not cross:
            cs, rs = stack(bc, m, ROLES), stack(br, m.values(), ROLES)
            t = _align(cs, rs, _frame_start(cs, rs, vc, vr))
            best = max(best, pearson(np.stack([_centred(x) for x in t @ cs @ t.T]).ravel(),
                                     np.stack([_centred(x) for x in rs]).ravel()))
            continue
        scores = []
        for fit, test in SPLITS:
            cs, rs = stack(bc, m, fit), stack(br, m.values(), fit)
            t = _align(cs, rs, _frame_start(cs, rs, vc, vr))
            tc, tr = stack(bc, m, test), stack(br, m.values(), test)
            scores.append(pearson(np.stack([_centred(x) for x in t @ tc @ t.T]).ravel(),
                                  np.stack([_centred(x) for x in tr]).ravel()))
        best = max(best, float(np.mean(scores)))
    return best


def subspace_features(b: Blocks) -> tuple[list[np.ndarray], np.ndarray]:
    """What a fingerprint could store: every unit read in the top-r eigenframe of the model's summed gate Grams,
    [L, 4, r, r], plus the per-layer gate Grams' r-frames for re-framing after a layer change (not stored: the
    global frame is recomputed from the stored per-layer GG blocks, an approximation, see subspace_score)."""
    v = _frame([layer["GG"] for layer in b.layers])[:, :RANK]
    return [np.stack([v.T @ layer[role] @ v for role in ROLES]) for layer in b.layers], v


ROBUST = ("OV", "UD")  # sums over heads / units of products whose dead (cancelling) pairs add exactly zero


def robust_frame(b: Blocks, layers: Any = None, roles: tuple[str, ...] = ROBUST) -> np.ndarray:
    """Eigenvectors (descending) of Σ_l Σ_{OV, UD} (M Mᵀ + Mᵀ M) over raw (norm-weighted) units: a frame no
    cancelling pair of units or heads moves, to which a dead block adds nothing. `roles`: the units it is
    summed over (("OV",): the frame from the attention alone, cheap to estimate through its small factors)."""
    total = np.zeros((b.d, b.d))
    for i in (range(len(b.layers)) if layers is None else layers):
        for role in roles:
            m = b.layers[i][role] * b.norms[i][role]
            total += m @ m.T + m.T @ m
    values, vectors = np.linalg.eigh(total)
    return vectors[:, np.argsort(values)[::-1]]


def robust_features(b: Blocks, frame_roles: tuple[str, ...] = ROBUST) -> list[np.ndarray]:
    """What a fingerprint would store: per layer [2, r, r], OV and UD read in the top-r robust frame."""
    v = robust_frame(b, roles=frame_roles)[:, :RANK]
    return [np.stack([v.T @ layer[role] @ v for role in ROBUST]) for layer in b.layers]


def local_features(b: Blocks) -> list[np.ndarray]:
    """Per layer [2, r, r]: OV and UD read in the top-r robust frame of that layer alone (survives any change of
    the other layers: drops, duplicates, inserted blocks)."""
    out = []
    for i, layer in enumerate(b.layers):
        v = robust_frame(b, [i])[:, :RANK]
        out.append(np.stack([v.T @ layer[role] @ v for role in ROBUST]))
    return out


def robust_score(uc: list[np.ndarray], ur: list[np.ndarray], per_layer: bool = False) -> float:
    """Orthogonal alignment inside the r-frames fitted on the OV units and scored on the UD units, and the
    reverse (mean); one alignment for all layers (global frame) or one per layer (per-layer frames); the best
    over layer injections."""
    best = -1.0
    for m in injections(len(uc), len(ur)):
        groups = [[(i, j)] for i, j in m.items()] if per_layer else [list(m.items())]
        scores = []
        for fit, test in ((0, 1), (1, 0)):
            xs, ys = [], []
            for pairs in groups:
                cs = np.stack([uc[i][fit] for i, _ in pairs])
                rs = np.stack([ur[j][fit] for _, j in pairs])
                eye = np.eye(cs.shape[-1])
                t = _align(cs, rs, _frame_start(cs, rs, eye, eye))
                xs += [_centred(t @ uc[i][test] @ t.T).ravel() for i, _ in pairs]
                ys += [_centred(ur[j][test]).ravel() for _, j in pairs]
            scores.append(pearson(np.concatenate(xs), np.concatenate(ys)))
        best = max(best, float(np.mean(scores)))
    return best


def procrustes_robust_score(bc: Blocks, br: Blocks) -> float:
    """With both models' weights: the robust frame recomputed from the matched layers only (so a dropped or
    duplicated layer leaves it intact), full-width alignment fitted on OV and scored on UD, and the reverse."""
    best = -1.0
    for m in injections(len(bc.layers), len(br.layers)):
        vc, vr = robust_frame(bc, list(m)), robust_frame(br, list(m.values()))
        scores = []
        for fit, test in (("OV", "UD"), ("UD", "OV")):
            cs = np.stack([bc.layers[i][fit] for i in m])
            rs = np.stack([br.layers[j][fit] for j in m.values()])
            t = _align(cs, rs, _frame_start(cs, rs, vc, vr))
            tc = np.stack([bc.layers[i][test] for i in m])
            tr = np.stack([br.layers[j][test] for j in m.values()])
            scores.append(pearson(np.stack([_centred(x) for x in t @ tc @ t.T]).ravel(),
                                  np.stack([_centred(x) for x in tr]).ravel()))
        best = max(best, float(np.mean(scores)))
    return best


def subspace_score(fc: Any, fr: Any) -> float:
    """Cross-fitted orthogonal alignment inside the stored r-dim frames (robust to eigenvectors mixing inside the
    subspace, where eigframe's per-vector signs are not)."""
    uc, ur = fc[0], fr[0]
    best = -1.0
    index = {role: n for n, role in enumerate(ROLES)}
    for m in injections(len(uc), len(ur)):
        scores = []
        for fit, test in SPLITS:
            cs = np.stack([uc[i][index[x]] for i in m for x in fit])
            rs = np.stack([ur[j][index[x]] for j in m.values() for x in fit])
            eye = np.eye(cs.shape[-1])
            t = _align(cs, rs, _frame_start(cs, rs, eye, eye))
            tc = np.stack([uc[i][index[x]] for i in m for x in test])
            tr = np.stack([ur[j][index[x]] for j in m.values() for x in test])
            scores.append(pearson(np.stack([_centred(x) for x in t @ tc @ t.T]).ravel(),
                                  np.stack([_centred(x) for x in tr]).ravel()))
        best = max(best, float(np.mean(scores)))
    return best


def oracle_score(bc: Blocks, br: Blocks) -> float:
    best = -1.0
    for m in injections(len(bc.layers), len(br.layers)):
        best = max(best, pearson(np.concatenate([bc.layers[i][r].ravel() for i in m for r in ROLES]),
                                 np.concatenate([br.layers[j][r].ravel() for j in m.values() for r in ROLES])))
    return best


@dataclass
class Statistic:
    name: str
    features: Callable[[Blocks], Any]
    score: Callable[[Any, Any, Blocks, Blocks], float]
    invariant: bool = True


STATISTICS = [
    Statistic("spectra", spectra_features, lambda fc, fr, bc, br: tuple_score(fc, fr, len(bc.layers), len(br.layers))),
    Statistic("gram", gram_features, lambda fc, fr, bc, br: tuple_score(fc, fr, len(bc.layers), len(br.layers))),
    Statistic("words", words_features, lambda fc, fr, bc, br: tuple_score(fc, fr, len(bc.layers), len(br.layers))),
    Statistic("eigframe", eigframe_features, lambda fc, fr, bc, br: eigframe_score(fc, fr)),
    Statistic("eigsq", eigframe_features, lambda fc, fr, bc, br: eigframe_score(fc, fr, squared=True)),
    Statistic("subspace", subspace_features, lambda fc, fr, bc, br: subspace_score(fc, fr)),
    Statistic("robust", robust_features, lambda fc, fr, bc, br: robust_score(fc, fr)),
    Statistic("robust-ov", lambda b: robust_features(b, ("OV",)), lambda fc, fr, bc, br: robust_score(fc, fr)),
    Statistic("robust-local", local_features, lambda fc, fr, bc, br: robust_score(fc, fr, per_layer=True)),
    Statistic("robust-max", lambda b: (robust_features(b), local_features(b)),
              lambda fc, fr, bc, br: max(robust_score(fc[0], fr[0]), robust_score(fc[1], fr[1], per_layer=True))),
    Statistic("procrustes-ou", lambda b: None, lambda fc, fr, bc, br: procrustes_robust_score(bc, br)),
    Statistic("procrustes", lambda b: None, lambda fc, fr, bc, br: procrustes_score(bc, br)),
    Statistic("procrustes-cv", lambda b: None, lambda fc, fr, bc, br: procrustes_score(bc, br, cross=True)),
    Statistic("oracle", lambda b: None, lambda fc, fr, bc, br: oracle_score(bc, br), invariant=False),
]


# -- data ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Model:
    id: str
    arch: str
    size: str
    root: str
    relation: str
    length: int
    seed: int  # the root's seed argument (its training seed is seed * 10 + length, bench/calibrate.py)


def calibration_models(directory: Path) -> list[Model]:
    out = []
    for path in sorted(directory.iterdir()):
        root, _, relation = path.name.partition("~")
        arch, size, seed, steps = root.split("-")
        out.append(Model(path.name, arch, size, root, relation or "root", int(steps), int(seed[1:])))
    return out


def quantiles(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{np.median(a):.3f} | {np.quantile(a, 0.99):.3f} | {a.max():.3f}"


# -- invariance check ------------------------------------------------------------------------------------

def invariance(models: dict[str, Blocks], calibration: Path, stats: list[Statistic], log: Callable[[str], None]
               ) -> None:
    """On a trained root of each architecture: every function-preserving re-parameterisation of
    bench/transforms.py at once, and the dead-capacity edits of bench/attacks.py (each checked function-preserving
    first). Per statistic: the transformed root scored against the original (1 = unchanged), and the root's
    heavy fine-tune scored against the transformed root (to compare with the same against the original)."""
    import transformers

    from bench import attacks as A
    from bench import transforms as T

    print("\n## Invariance and dead capacity (function-preserving edits of a trained 600-step root)\n")
    print("Cells: transformed root vs original root / the root's ft-heavy vs the transformed root "
          "(ft-heavy vs the original root in the first row of each architecture).\n")
    print("| model | edit | max logit diff | " + " | ".join(s.name for s in stats) + " |")
    print("|---|---|---|" + "---|" * len(stats))
    edits: list[tuple[str, Callable[[Any], Any]]] = [
        ("none", lambda ck: ck),
        ("all re-parameterisations", T.all_evasions),
        ("dead units+heads +100%, x4", lambda ck: A.dead_units(ck, 1.0, 4.0, 11)),
        ("dead block after every block, x4", lambda ck: A.dead_blocks(ck, 4.0, 12)),
        ("all re-param. on dead units", lambda ck: T.all_evasions(A.dead_units(ck, 1.0, 4.0, 11))),
    ]
    for arch in ("llama", "qwen2", "gemma", "phi3", "mistral"):
        root = next(m for m in sorted(models) if m.startswith(f"{arch}-medium-") and m.endswith("-600"))
        state, config = load_folder(calibration / root)
        ck = T.Checkpoint(transformers.AutoConfig.for_model(**config), state)
        bo, bf = models[root], models[root + "~ft-heavy"]
        for label, edit in edits:
            try:
                edited = edit(ck.clone())
                diff = T.same_function(ck, edited)
            except Exception as error:  # an edit the architecture does not support: say so, go on
                print(f"| {root} | {label} | failed: {type(error).__name__}: {str(error)[:80]} |" + " |" * len(stats))
                continue
            be = blocks_of(edited.state, edited.config, root + "*")
            cells = []
            for stat in stats:
                fo, fe, ff = stat.features(bo), stat.features(be), stat.features(bf)
                cells.append(f"{stat.score(fe, fo, be, bo):.4f} / {stat.score(ff, fe, bf, be):.4f}")
            print(f"| {root} (as {edited.config.model_type}, {len(be.layers)} layers) | {label} | {diff:.1e} | "
                  + " | ".join(cells) + " |")
        log(f"  invariance {arch} done")


# -- main ------------------------------------------------------------------------------------------------

def main() -> None:
    global RANK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, default=CALIBRATION,
                        help="bench/calibrate.py's work directory or its models directory (default: %(default)s)")
    parser.add_argument("--evasion", type=Path, default=EVASION,
                        help="bench/evasion.py's work directory or its models directory (default: %(default)s)")
    parser.add_argument("--stats", nargs="*", default=[s.name for s in STATISTICS])
    parser.add_argument("--skip-invariance", action="store_true")
    parser.add_argument("--rank", type=int, default=RANK, help="size r of the subspace / robust frames")
    parser.add_argument("--cross-arch", action="store_true",
                        help="also score roots against roots of the other architectures of the same size")
    parser.add_argument("--invariance-stats", nargs="*", help="statistics for the invariance table (default: --stats)")
    parser.add_argument("--sample", type=int, default=0,
                        help="for the slow full-width procrustes and procrustes-cv: at most this many null pairs per "
                             "class (roots only, evenly spaced) and derived pairs per relation (0: all)")
    args = parser.parse_args()
    args.calibration = models_dir(args.calibration, "calibration")
    args.evasion = models_dir(args.evasion, "evasion")
    RANK = args.rank
    torch.set_num_threads(1)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {text}", file=sys.stderr, flush=True)

    stats = [s for s in STATISTICS if s.name in args.stats]
    zoo = calibration_models(args.calibration)
    blocks = {m.id: load_blocks(args.calibration / m.id) for m in zoo}
    log(f"loaded {len(blocks)} calibration models")
    evasion: dict[str, dict[str, Blocks]] = {}
    for arch_dir in sorted(args.evasion.iterdir()):
        wanted = [p for p in sorted(arch_dir.iterdir()) if p.name in ("base", "derived", "twin")
                  or p.name.startswith(("repair-e6081bab-", "repair-4f4c6fc3-")) or "reinit" in p.name]
        evasion[arch_dir.name] = {p.name: load_blocks(p) for p in wanted}
    log("loaded evasion models")

    roots = [m for m in zoo if m.relation == "root"]
    derived_pairs = [(m, next(r for r in roots if r.id == m.root)) for m in zoo if m.relation != "root"]
    null_pairs = [(c, r) for r in roots for c in zoo if c.arch == r.arch and c.size == r.size and c.root != r.root]

    summary: list[str] = []
    for stat in stats:
        feats = {k: stat.features(b) for k, b in blocks.items()}
        nulls, derived_subset = null_pairs, derived_pairs
        if stat.name in ("procrustes", "procrustes-cv") and args.sample:
            nulls, derived_subset = [], []
            for key in sorted({(m.arch, m.size) for m in roots}):
                pool = [(c, r) for c, r in null_pairs if (c.arch, c.size) == key and c.relation == "root"]
                nulls += [pool[i] for i in np.linspace(0, len(pool) - 1, min(args.sample, len(pool))).astype(int)]
            for relation in ("ft-light", "ft-heavy", "dropped-layer", "duplicated-layer"):
                pool = [(c, r) for c, r in derived_pairs if c.relation == relation]
                derived_subset += [pool[i] for i in
                                   np.linspace(0, len(pool) - 1, min(args.sample, len(pool))).astype(int)]
        null_scores: dict[str, list[tuple[Model, Model, float]]] = defaultdict(list)
        for c, r in nulls:
            null_scores[f"{r.arch}-{r.size}"].append((c, r, stat.score(feats[c.id], feats[r.id], blocks[c.id],
                                                                        blocks[r.id])))
        log(f"{stat.name}: {len(nulls)} null pairs")
        derived_scores = [(c, r, stat.score(feats[c.id], feats[r.id], blocks[c.id], blocks[r.id]))
                          for c, r in derived_subset]
        p99 = {k: float(np.quantile([s for *_, s in v], 0.99)) for k, v in null_scores.items()}
        top = {k: max(s for *_, s in v) for k, v in null_scores.items()}

        print(f"\n## Statistic `{stat.name}`{'' if stat.invariant else ' (NOT invariant: a bound, not a test)'}\n")
        print("### Null (same architecture and size, other seed; candidates: roots and their derivatives)\n")
        print("| class | pairs | median | 99th pct | max | equal-length pairs: 99th pct / max at 150, 300, 600, "
              "1200 steps |")
        print("|---|---|---|---|---|---|")
        for key in sorted(null_scores):
            entries = null_scores[key]
            by_length = []
            for length in (150, 300, 600, 1200):
                same = [s for c, r, s in entries if c.length == length and r.length == length]
                by_length.append(f"{np.quantile(same, 0.99):.2f}/{max(same):.2f}" if same else "-")
            print(f"| {key} | {len(entries)} | {quantiles([s for *_, s in entries])} | {', '.join(by_length)} |")
        print("\n### Derived pairs (derivative vs its root)\n")
        print("| relation | pairs | median | min | min small / medium | at or below its class's null 99th pct "
              "(small / medium) | at or below its class's null max |")
        print("|---|---|---|---|---|---|---|")
        for relation in ("ft-light", "ft-heavy", "dropped-layer", "duplicated-layer"):
            rows = [(c, r, s) for c, r, s in derived_scores if c.relation == relation]
            below = sum(s <= p99[f"{r.arch}-{r.size}"] for c, r, s in rows)
            below_max = sum(s <= top[f"{r.arch}-{r.size}"] for c, r, s in rows)
            values = np.asarray([s for *_, s in rows])
            by_size = [[s for c, r, s in rows if c.size == size] for size in ("small", "medium")]
            below_size = [sum(s <= p99[f"{r.arch}-{r.size}"] for c, r, s in rows if c.size == size)
                          for size in ("small", "medium")]
            print(f"| {relation} | {len(rows)} | {np.median(values):.3f} | {values.min():.3f} | "
                  f"{' / '.join(f'{min(v):.3f}' if v else '-' for v in by_size)} | {below} "
                  f"({below_size[0]} / {below_size[1]}) | {below_max} |")
        worst = sorted(derived_scores, key=lambda x: x[2])[:3]
        print("\nLowest derived: " + "; ".join(f"{c.id} {s:.3f} (null p99 {p99[f'{r.arch}-{r.size}']:.3f})"
                                               for c, r, s in worst))

        print("\n### Evasion bench (medium models, 800-step roots): each model vs the base\n")
        names = ["derived", "repair-4f4c6fc3-200", "twin", "repair-e6081bab-50", "repair-e6081bab-200",
                 "repair-e6081bab-500", "reinit+penalty (a)", "reinit+penalty (b)"]
        print("| arch | null p99 / max (calibration, medium) | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        caught = total = 0
        for arch, models in evasion.items():
            fb = stat.features(models["base"])
            reinit = sorted(n for n in models if "reinit" in n)
            cells = []
            for n in names:
                key = n if n in models else (reinit[0] if n.endswith("(a)") and reinit else
                                            reinit[1] if n.endswith("(b)") and len(reinit) > 1 else None)
                if key is None:
                    cells.append("-")
                    continue
                score = stat.score(stat.features(models[key]), fb, models[key], models["base"])
                cells.append(f"{score:.3f}")
                if key == "repair-e6081bab-500" or "reinit" in key:
                    total += 1
                    caught += score > p99[f"{arch}-medium"]
            print(f"| {arch} | {p99[f'{arch}-medium']:.3f} / {top[f'{arch}-medium']:.3f} | " + " | ".join(cells)
                  + " |")
        if args.cross_arch:
            cross = [(c, r) for r in roots for c in roots if c.size == r.size and c.arch != r.arch]
            print("\n### Other architectures of the same shape (roots vs roots)\n")
            print("| pairs | n | median | 99th pct | max | min |")
            print("|---|---|---|---|---|---|")
            for label, same_init in (("other seed (independent)", False),
                                     ("same seed and length (bench/calibrate.py excludes these: shared init)", True)):
                chosen = [(c, r) for c, r in cross if ((c.seed, c.length) == (r.seed, r.length)) == same_init]
                values = [stat.score(feats[c.id], feats[r.id], blocks[c.id], blocks[r.id]) for c, r in chosen]
                if values:
                    print(f"| {label} | {len(values)} | {quantiles(values)} | {min(values):.3f} |")
            log(f"{stat.name}: cross-architecture pairs done")
        n_derived = len(derived_scores)
        missed = sum(s <= p99[f"{r.arch}-{r.size}"] for c, r, s in derived_scores)
        summary.append(f"| {stat.name} | {missed}/{n_derived} | {caught}/{total} | "
                       f"{np.median([s for *_, s in derived_scores]):.3f} | "
                       f"{np.median([s for v in null_scores.values() for *_, s in v]):.3f} |")
        log(f"{stat.name} done")

    print("\n## Summary\n")
    print("| statistic | derivatives at or below their class's null 99th pct | re-initialised-embedding attacks "
          "(500-step repair, with and without penalty) above the medium class's null 99th pct | derived median | "
          "null median |")
    print("|---|---|---|---|---|")
    print("\n".join(summary))
    if not args.skip_invariance:
        chosen = args.invariance_stats or [s.name for s in stats]
        invariance(blocks, args.calibration, [s for s in STATISTICS if s.name in chosen and s.invariant], log)
    log("done")


if __name__ == "__main__":
    main()
