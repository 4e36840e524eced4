"""Lineage sketch: per-block probe matrices that survive derivation, re-parameterisation and relabelling.

The probe is k seeded random mixtures of *every* embedding row (rows unit-normalised), each token
weighted by a random sign drawn from its key (tokens.py: a hash of its text when the tokenizer is at
hand, of its id otherwise), then flattened along the embedding's few leading principal directions so
that it spreads over the whole residual stream (flatten_probe). Per transformer block, the block's
weights are evaluated as bilinear forms on the k probe vectors: k x k matrices unchanged by permutation
or rotation of the residual stream, head or MLP-unit permutation, per-channel rescaling through norm
gains, q/k and v/o rescaling, fused-vs-split projections, and (with a tokenizer) any renumbering of the
vocabulary. No small set of rows carries the probe: re-drawing a fraction f of the rows moves each
mixture by about sqrt(f). See docs/lineage.md.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tg_verify.artifact import naming
from tg_verify.artifact.model import Artifact, TensorInfo
from tg_verify.errors import InternalError, UsageError, WeightValueError
from tg_verify.fingerprint.tokens import TokenKeys, artifact_keys, id_keys

# tgs3: the mixture probe with the embedding's dominant directions flattened; tgs2: plain mixtures keyed by token
# text or id; tgs1: 32 individual token rows
SKETCH_VERSION = "tgs3"
DEFAULT_TOKENS = 32  # probe size k: k(k-1)=992 compared entries per unit, 2 KiB per unit in fp16
DEFAULT_SEED = 0
MAX_LAYERS = 256  # at k=32: 4 units x 2 KiB x 256 layers, base64: 2.8 MB
MIN_TOKENS, MAX_TOKENS = 8, 64
HEAD_ROWS = 4096  # output-head rows (tokens) summed in the head unit: those with the smallest keys, for cost
# The probe is flattened along the embedding's FLATTEN_DIRECTIONS leading principal directions (estimated from the
# same HEAD_ROWS sampled rows by FLATTEN_ITERATIONS subspace iterations on FLATTEN_DIRECTIONS + FLATTEN_OVERSAMPLE
# token-keyed start vectors): see flatten_probe.
FLATTEN_DIRECTIONS = 32
FLATTEN_OVERSAMPLE = 16
FLATTEN_ITERATIONS = 8
_FLATTEN_STREAM = 0xF1A7  # the start vectors' seed: fixed, so that every sketch flattens alike whatever its probe seed
KEY_SAMPLE = 256  # smallest keys recorded, so two sketches can estimate how much of their vocabularies they share
SIZE_BUDGET = 3_500_000  # base64 bytes of unit data; with the rest the sketch stays under 4 MB
_BLOCK_ELEMENTS = 1 << 20  # embedding rows are mixed in blocks of this many float32 values (4 MB)

# Roles of the per-layer units, in stored order, and whether their matrix is symmetric (a Gram).
LAYER_ROLES: tuple[str, ...] = ("attn_qk", "attn_ov", "mlp_gate", "mlp_ud")
GLOBAL_ROLES: tuple[str, ...] = ("embed", "head")
SYMMETRIC_ROLES: frozenset[str] = frozenset({"embed", "head", "mlp_gate"})

# Tensor-name rules live in the artifact layer (one module for every reader of names).
_EMBEDDINGS, _HEADS = naming.EMBEDDINGS, naming.HEADS
_ATTN_NORMS, _MLP_NORMS, _FINAL_NORMS = naming.ATTN_NORMS, naming.MLP_NORMS, naming.FINAL_NORMS
_leaf, _layer_of = naming.leaf, naming.layer_of


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        out: np.ndarray = z ^ (z >> np.uint64(31))
        return out


def mixture_coefficients(keys: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[k, n] random signs (+1 or -1, float64), each a function of (token key, mixture index, seed) alone.

    So a token weighs the same in every model that keys it the same, wherever its row sits. Signs serve a
    random projection as well as normals do (same mean and variance, Johnson-Lindenstrauss alike), come
    64 to one hash of the key, and are exact on every machine.
    """
    out = np.empty((k, keys.shape[0]), dtype=np.float64)
    shifts = np.arange(64, dtype=np.uint64)[:, None]
    for word in range(-(-k // 64)):
        stream = _splitmix(np.asarray([(seed % 2**32) * 2**16 + word], dtype=np.uint64))
        bits = (_splitmix(keys ^ stream)[None, :] >> shifts) & np.uint64(1)
        rows = min(64, k - 64 * word)
        out[64 * word:64 * word + rows] = 1.0 - 2.0 * bits[:rows].astype(np.float64)
    return out


def flatten_probe(probe: torch.Tensor, sample: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The probe rows with the embedding's leading principal directions flattened, then unit-normalised.

    `sample`: unit-normalised embedding rows [m, d] (a keyed sample), `start`: token-keyed start vectors
    [m, c] (`flatten_start`). The sample's covariance C = sampleᵀ sample / m is estimated in its leading r
    directions U (eigenvalues λ) by subspace iteration from sampleᵀ start; every probe row p becomes
    p (U diag(λ^-1/2) Uᵀ + σ⁻¹ (I - U Uᵀ)), σ² the mean eigenvalue of the rest: the probe weighs the leading
    directions no more than the bulk. Plain mixtures of embedding rows lie mostly along those few directions,
    which independently trained models share and which a fine-tune can rewrite at little cost to what the
    model does on text; flattened, the probe spreads over the whole residual stream. Every step is a
    polynomial in the sample applied to token-keyed vectors, so the result turns with any rotation of the
    residual stream and ignores the rows' order (differentiable). Float32 inside: the iteration is most of the
    sketch's set-up cost, and its rounding stays far below the float16 the units are stored in.
    """
    x = sample.to(torch.float32)
    m, d = x.shape
    r = min(FLATTEN_DIRECTIONS, d // 2, m // 2)
    if r < 1:
        return unit_rows(probe)
    basis = x.T @ start.to(torch.float32)[:, :min(start.shape[1], d)]
    for _ in range(FLATTEN_ITERATIONS):
        basis, _ = torch.linalg.qr(basis)
        basis = x.T @ (x @ basis)
    basis, _ = torch.linalg.qr(basis)
    projected = x @ basis
    values, vectors = torch.linalg.eigh(projected.T @ projected / m)
    top = torch.argsort(values, descending=True)[:r]
    lam = values[top].clamp_min(1e-12)
    directions = basis @ vectors[:, top]
    total = x.pow(2).sum() / m  # trace of C (1 for unit rows; zero rows count as nothing)
    bulk = ((total - lam.sum()) / max(d - r, 1)).clamp_min(1e-12)
    p = probe.to(torch.float32)
    flat = p / bulk.sqrt() + ((p @ directions) * (lam.rsqrt() - bulk.rsqrt())) @ directions.T
    return unit_rows(flat).to(probe.dtype)


def flatten_start(sample_keys: np.ndarray, width: int) -> torch.Tensor:
    """[m, c] token-keyed random signs for flatten_probe's subspace iteration (c = directions + oversampling)."""
    columns = min(FLATTEN_DIRECTIONS + FLATTEN_OVERSAMPLE, max(width, 1))
    return torch.from_numpy(mixture_coefficients(sample_keys, columns, _FLATTEN_STREAM).T.copy())


def probe_ids(vocab: int, k: int, seed: int) -> np.ndarray:
    """The k token ids with the smallest seeded hash among [0, vocab), ascending (a nested bottom-k sample).

    tgs1's probe (32 public rows); kept for the attack benches and tests, which re-draw exactly these rows.
    """
    ids = np.arange(vocab, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = ids + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    chosen = np.argsort(x, kind="stable")[:min(k, vocab)]
    return np.sort(chosen).astype(np.int64)


def smallest_keys(keys: TokenKeys, count: int) -> np.ndarray:
    """The rows (ascending) whose keys are among the `count` smallest keyed ones: nested as a vocabulary grows,
    and the same tokens whatever their ids when keys are texts."""
    rows = np.flatnonzero(keys.present)
    order = np.argsort(keys.keys[rows], kind="stable")[:count]
    return np.sort(rows[order]).astype(np.int64)


def layer_budget(k: int) -> int:
    """How many layers a sketch with probe size k may hold and stay inside SIZE_BUDGET."""
    unit = 4 * -(-2 * k * k // 3)  # base64 length of one k x k float16 matrix
    return max(1, min(MAX_LAYERS, (SIZE_BUDGET // unit - len(GLOBAL_ROLES)) // len(LAYER_ROLES)))


def _setting(settings: Any, name: str, default: Any) -> Any:
    if isinstance(settings, Mapping):
        return settings.get(name, default)
    return getattr(settings, name, default)


def encode_matrix(matrix: torch.Tensor) -> str:
    """base64 of the matrix as little-endian float16, row-major."""
    array = matrix.detach().to(torch.float32).clamp(-60000, 60000).numpy().astype("<f2")
    return base64.b64encode(array.tobytes()).decode("ascii")


def normalise(matrix: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Remove per-probe scale: cosine normalisation for Grams, row/column RMS for the others.

    Only the pattern of the off-diagonal entries is compared.
    """
    m = matrix.to(torch.float64)
    tiny = 1e-30
    if symmetric:
        d = m.diagonal().clamp_min(tiny).sqrt()
        return (m / d[:, None] / d[None, :]).to(torch.float32)
    rows = m.pow(2).mean(dim=1).sqrt().clamp_min(tiny)
    m = m / rows[:, None]
    cols = m.pow(2).mean(dim=0).sqrt().clamp_min(tiny)
    return (m / cols[None, :]).to(torch.float32)


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit norm (zero rows stay zero): what the first RMSNorm passes on of a token."""
    out: torch.Tensor = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return out


def heads_of(config: Mapping[str, Any], width: int) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head dim) from a config, or None when it does not say."""
    heads = config.get("num_attention_heads") or config.get("n_head") or config.get("n_heads")  # GPT-2's, MPT's
    if not isinstance(heads, int) or heads <= 0:
        return None
    # Falcon (and GPT-BigCode's multi_query): num_kv_heads counts only with new_decoder_architecture, else a
    # multi-query model has one key/value head
    if config.get("new_decoder_architecture") is True:
        kv = config.get("num_kv_heads") or heads
    elif config.get("multi_query") is True:
        kv = 1
    else:
        kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (width // heads)
    if not isinstance(kv, int) or not isinstance(head_dim, int) or kv <= 0 or heads % kv:
        return None
    return heads, kv, head_dim


def split_fused(part: str, product: torch.Tensor, shape: tuple[int, int, int] | None) -> dict[str, torch.Tensor] | None:
    """A fused projection (or its product) split into its parts by rows, or None when the config does not fit it:
    gate_up as [gate; up], qkv as [q; k; v], qkv_heads per key/value group (GPT-NeoX, Bloom: [q; k; v] within each
    head; Falcon: a group's query heads, then its key and value, multi-query a single group)."""
    if part == "gate_up":
        half = product.shape[0] // 2
        return {"gate": product[:half], "up": product[half:]}
    if part == "qkv_heads":  # per key/value group: its query heads, then its key, then its value
        if shape is None or product.shape[0] != (shape[0] + 2 * shape[1]) * shape[2]:
            return None
        heads, kv, head_dim = shape
        grouped = product.reshape(kv, heads // kv + 2, head_dim, product.shape[-1])
        return {"q": grouped[:, :-2].reshape(heads * head_dim, -1), "k": grouped[:, -2].reshape(kv * head_dim, -1),
                "v": grouped[:, -1].reshape(kv * head_dim, -1)}
    if shape is None or product.shape[0] != (shape[0] + 2 * shape[1]) * shape[2]:
        return None
    q_rows, kv_rows = shape[0] * shape[2], shape[1] * shape[2]
    return {"q": product[:q_rows], "k": product[q_rows:q_rows + kv_rows], "v": product[q_rows + kv_rows:]}


def split_experts(part: str, stored: torch.Tensor, config: Mapping[str, Any] | None) -> list[dict[str, torch.Tensor]]:
    """An all-experts 3-D tensor (naming.fused_experts names its `part`) as each expert's parts, in stored order,
    each as nn.Linear holds it ([out, in], views): GPT-OSS's [experts, in, out] transposed with its gate and up
    de-interleaved (naming.interleaved_experts); every other family's [experts, out, in] split as split_fused does."""
    if naming.interleaved_experts(config):
        experts = [one.T for one in stored.unbind(0)]
        return [{"gate": one[0::2], "up": one[1::2]} if part == "gate_up" else {part: one} for one in experts]
    return [(split_fused(part, one, None) or {}) if part in naming.FUSED else {part: one} for one in stored.unbind(0)]


MLP_AXES: dict[str, int] = {"gate": 0, "up": 0, "down": 1}  # the axis a projection's hidden units run along


def joined_experts(parts: Mapping[str, torch.Tensor], experts: Mapping[tuple[str, int], torch.Tensor]
                   ) -> list[int] | None:
    """The expert indices a block's MLP joins, in order ([] without experts), or None when its experts do not all
    have the same parts, or the dense (shared-expert) part is there for some of those parts only: such an MLP is
    left out (no unit pairs one expert's up with another's down)."""
    indices = {part: sorted(e for p, e in experts if p == part) for part in MLP_AXES}
    present = [part for part in MLP_AXES if indices[part]]
    if not present:
        return []
    if any(indices[part] != indices[present[0]] for part in present) or any(
            (part in parts) != (present[0] in parts) for part in present):
        return None
    return indices[present[0]]


def with_experts(parts: Mapping[str, torch.Tensor], experts: Mapping[tuple[str, int], torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """A block's parts with a mixture of experts' MLPs joined into one: each of gate, up and down is the dense (or
    shared-expert) part followed by every expert's in index order (joined_experts), along its hidden units. Then
    down @ up and gateᵀ gate are sums over the experts, the same whatever order the experts are stored or numbered
    in."""
    if not experts:
        return dict(parts)
    out = {k: v for k, v in parts.items() if k not in MLP_AXES}
    indices = joined_experts(parts, experts)
    if indices is None:
        return out
    for part in MLP_AXES:
        if (part, indices[0]) in experts:
            pieces = ([parts[part]] if part in parts else []) + [experts[(part, e)] for e in indices]
            out[part] = torch.cat(pieces, dim=MLP_AXES[part])
    return out


def layer_units(parts: Mapping[str, torch.Tensor], shape: tuple[int, int, int] | None,
                note: Any = None) -> dict[str, torch.Tensor]:
    """A block's unnormalised units from its probe products: right ones ([out, k]) for q/k/v/gate/up, left ones
    ([k, in]) for o/down. `note(text)` is told why a unit is skipped."""
    def say(text: str) -> None:
        if note is not None:
            note(text)

    units: dict[str, torch.Tensor] = {}
    q, k, v, o = (parts.get(n) for n in ("q", "k", "v", "o"))
    if q is not None and k is not None and shape is not None:
        heads, kv, head_dim = shape
        if q.shape[0] == heads * head_dim and k.shape[0] == kv * head_dim:
            qh = q.reshape(heads, head_dim, -1)
            kh = k.reshape(kv, head_dim, -1).repeat_interleave(heads // kv, dim=0)
            units["attn_qk"] = torch.einsum("hdi,hdj->ij", qh, kh)
            if v is not None and o is not None and v.shape[0] == kv * head_dim and o.shape[1] == heads * head_dim:
                vh = v.reshape(kv, head_dim, -1).repeat_interleave(heads // kv, dim=0)
                oh = o.reshape(o.shape[0], heads, head_dim)
                units["attn_ov"] = torch.einsum("ihd,hdj->ij", oh, vh)
        else:
            say("attention shapes do not match the config's head counts: attention units skipped")
    elif q is not None:
        say("no usable head counts in config.json: attention units skipped")
    gate, up, down = parts.get("gate"), parts.get("up"), parts.get("down")
    if gate is not None:
        units["mlp_gate"] = gate.T @ gate
    if up is not None and down is not None and down.shape[1] == up.shape[0]:
        units["mlp_ud"] = down @ up
    return units


def architecture_of(config: Mapping[str, Any], width: int, layers: int, vocab: int) -> dict[str, Any]:
    """The shape a sketch records: what the calibration classes are keyed by (analysis/calibration.py)."""
    def number(name: str) -> int | None:
        value = config.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    model_type = config.get("model_type")
    heads = number("num_attention_heads") or number("n_head") or number("n_heads")
    return {"model_type": model_type if isinstance(model_type, str) else None, "hidden_size": width,
            "layers": layers, "vocab": vocab, "heads": heads, "kv_heads": number("num_key_value_heads") or heads,
            "intermediate_size": number("intermediate_size") or number("n_inner")}


@dataclass
class _Block:
    """Per-layer probe products, kept until the layer's units can be formed."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (part, expert index) -> product


class SketchBuilder:
    """Builds the lineage sketch from the tensor stream the fingerprint extractor already reads.

    The probe is mixed from the embedding up front (one blocked pass). Per tensor in canonical order the
    extractor asks for `right_probe` / `left_probe`, computes the products in its own block-wise pass over
    the weight and hands them to `add_products` (`add` does the same from a whole float32 weight);
    `finish` returns the JSON-safe sketch.
    """

    def __init__(self, artifact: Artifact, reader: Any, settings: Any = None) -> None:
        # The probe seed is not the fingerprint's noise seed: any two sketches must share a probe.
        self.k = int(_setting(settings, "sketch_tokens", default=DEFAULT_TOKENS))
        self.seed = int(_setting(settings, "sketch_seed", default=DEFAULT_SEED))
        if not MIN_TOKENS <= self.k <= MAX_TOKENS:
            raise UsageError(f"sketch settings: sketch_tokens must be in [{MIN_TOKENS}, {MAX_TOKENS}], got {self.k}")
        self.notes: list[str] = []
        self.config = artifact.config or {}
        model_type = str(self.config.get("model_type") or "")
        self._gain_offset = 1.0 if model_type.startswith("gemma") else 0.0
        self._blocks: dict[int, _Block] = {}
        self._units: dict[tuple[str, int], torch.Tensor] = {}
        self._head_from_lm: torch.Tensor | None = None
        self._head_from_embedding: torch.Tensor | None = None
        self._head_rows = torch.zeros(0, dtype=torch.int64)
        self._members = {t.name for t in artifact.tensors}  # the stream may hold more (a wrapper's towers)
        self._transposed = naming.transposed(self.config)
        self._layer_ids = sorted({i for t in artifact.tensors if (i := _layer_of(t.name)) is not None})
        # layers with experts close when the stream ends: only then are all of their experts in
        self._moe_layers = {_layer_of(t.name) for t in artifact.tensors
                            if naming.expert_of(t.name) is not None or naming.fused_experts(t.name) is not None}
        self._interleaved = naming.interleaved_experts(self.config)  # GPT-OSS: experts stored [in, out]
        self._stored_layers = set(self._select_layers(self._layer_ids, layer_budget(self.k)))
        self._gains: dict[tuple[int | None, str], torch.Tensor] = {}
        for info in artifact.tensors:
            if len(info.shape) == 1 and info.name.endswith(".weight"):
                leaf = _leaf(info.name)
                if leaf in _ATTN_NORMS + _MLP_NORMS + _FINAL_NORMS:
                    self._gains[(_layer_of(info.name), leaf)] = reader.float32(info) + self._gain_offset
        self.embedding = self._find(artifact, _EMBEDDINGS)
        self._tied = self._find(artifact, _HEADS) is None  # then the embedding is also the output head
        self.vocab = 0
        self.width = 0
        self.keys: TokenKeys = id_keys(0)
        self.probe: torch.Tensor | None = None
        if self.embedding is None:
            self.notes.append("no token embedding found: sketch has no units")
            return
        self.vocab, self.width = self.embedding.shape[0], self.embedding.shape[1]
        # an adapter merged onto its base (artifact/merge.py's reader) is keyed by the base's tokenizer unless it
        # ships its own
        self.keys = artifact_keys(artifact, self.vocab, base=getattr(reader, "base", None))
        if not self.keys.present.any():
            self.notes.append(f"{self.keys.source} names none of the {self.vocab} embedding rows: sketch has no units")
            self.embedding = None
            return
        # the head unit sums over output tokens; those with the smallest keys keep it cheap on big vocabularies
        self._head_rows = torch.from_numpy(smallest_keys(self.keys, HEAD_ROWS))
        mixed, sample = self._mix(reader, self.embedding, str(artifact.path_of(self.embedding.file)))
        start = flatten_start(self.keys.keys[self._head_rows.numpy()], self.width)
        self.probe = flatten_probe(mixed, sample, start).to(torch.float32)
        self._units[("embed", -1)] = self.probe @ self.probe.T

    def _mix(self, reader: Any, info: TensorInfo, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The k probe mixtures Σ_t c_j(key_t) ê_t over every keyed embedding row, unit-normalised, and the
        unit-normalised sampled rows (`_head_rows`) that flatten_probe estimates the leading directions from.

        One pass in row blocks converted into one reused float32 buffer; dividing the coefficients by the row
        norms stands for normalising the rows (ê_t = e_t / |e_t|) without a second pass over the block.
        """
        rows, width = info.shape[0], info.shape[1]
        pick = getattr(reader, "rows", None)  # a reader that decodes selected rows (GGUF) instead of viewing them
        raw = None if pick is not None else reader.raw(info)
        step = max(1, _BLOCK_ELEMENTS // max(width, 1))
        buffer = torch.empty(min(rows, step) * width, dtype=torch.float32)
        total = torch.zeros((self.k, width), dtype=torch.float64)
        sampled = self._head_rows[self._head_rows < rows]
        sample = torch.zeros((len(sampled), width), dtype=torch.float32)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            present = self.keys.present[start:stop]
            if not present.any():
                continue
            block = buffer[:(stop - start) * width].view(stop - start, width)
            block.copy_(pick(info, torch.arange(start, stop)) if pick is not None else raw[start:stop])  # type: ignore[index]
            norms = torch.linalg.vector_norm(block, dim=1).clamp_min(1e-30)
            lo, hi = np.searchsorted(sampled.numpy(), [start, stop])
            if hi > lo:
                picked = sampled[lo:hi] - start
                sample[lo:hi] = block[picked] / norms[picked, None]
            coefficients = torch.from_numpy(
                (mixture_coefficients(self.keys.keys[start:stop], self.k, self.seed) * present[None, :])
                .astype(np.float32)) / norms[None, :]
            total += (coefficients @ block).double()
        if not bool(torch.isfinite(total).all()):
            raise WeightValueError(f"{info.file}: tensor '{info.name}' holds NaN or infinite values; "
                                   f"a fingerprint of it would be meaningless", file=path)
        return unit_rows(total).to(torch.float32), sample

    @staticmethod
    def _select_layers(layers: list[int], budget: int) -> list[int]:
        if len(layers) <= budget:
            return layers
        picks = np.linspace(0, len(layers) - 1, budget).round().astype(int)
        return [layers[i] for i in sorted(set(picks.tolist()))]

    @staticmethod
    def _find(artifact: Artifact, leaves: tuple[str, ...]) -> TensorInfo | None:
        for info in artifact.tensors:
            if (len(info.shape) == 2 and info.name.endswith(".weight") and _layer_of(info.name) is None
                    and _leaf(info.name) in leaves):
                return info
        return None

    def _gain(self, layer: int | None, leaves: tuple[str, ...]) -> torch.Tensor | None:
        for leaf in leaves:
            gain = self._gains.get((layer, leaf))
            if gain is not None and gain.shape[0] == self.width:
                return gain
        return None

    def _input_probe(self, gain: torch.Tensor | None) -> torch.Tensor:
        assert self.probe is not None
        return self.probe if gain is None else self.probe * gain[None, :]

    def _role(self, info: TensorInfo) -> tuple[str, int | None, str | None] | None:
        """How a tensor feeds the sketch: ("right" | "left", layer, part), or None when it does not. The side is
        the product of the projection as nn.Linear holds it (W [out, in]): input-side ones right, o and down left;
        a transposed architecture's weight is Wᵀ, so its product is taken on the other side (`_stored_side`)."""
        if self.probe is None or info.name not in self._members:
            return None
        if len(info.shape) == 3:
            return self._experts_role(info)
        if len(info.shape) != 2 or not info.name.endswith(".weight"):
            return None
        layer = _layer_of(info.name)
        leaf = _leaf(info.name)
        out, width = info.shape
        if layer is None:
            if info == self.embedding and self._tied:
                return "right", None, "head"
            if leaf in _HEADS and width == self.width:
                return "right", None, "head"
            return None
        part = naming.projection(info.name)
        if part is None or layer not in self._stored_layers:
            return None
        if self._transposed:
            out, width = width, out
        if part in ("o", "down"):
            return ("left", layer, part) if out == self.width else None
        return ("right", layer, part) if width == self.width else None

    def _experts_role(self, info: TensorInfo) -> tuple[str, int | None, str | None] | None:
        """The role of a 3-D all-experts tensor (naming.fused_experts): each expert's slice is a projection of its
        part, [out, in] as stored ([in, out] where the experts are interleaved: GPT-OSS)."""
        part, layer = naming.fused_experts(info.name), _layer_of(info.name)
        if part is None or layer is None or layer not in self._stored_layers:
            return None
        _, rows, columns = info.shape
        out, width = (columns, rows) if self._interleaved else (rows, columns)
        if part == "down":
            return ("left", layer, part) if out == self.width else None
        return ("right", layer, part) if width == self.width else None

    def _stored_side(self, info: TensorInfo, role: tuple[str, int | None, str | None]) -> str:
        """The side of the stored weight the extractor multiplies for this role: the other one where the stored
        matrix is the transpose of nn.Linear's (GPT-2's Conv1D, GPT-OSS's experts)."""
        side, layer, _ = role
        flipped = self._interleaved if len(info.shape) == 3 else self._transposed and layer is not None
        if flipped:
            return "left" if side == "right" else "right"
        return side

    def _probe_for(self, role: tuple[str, int | None, str | None]) -> torch.Tensor:
        """P diag(g) for what reads the residual stream (through its norm's gain), P for what writes it."""
        side, layer, part = role
        if part == "head":
            return self._input_probe(self._gain(None, _FINAL_NORMS))
        if side == "left":
            assert self.probe is not None
            return self.probe
        return self._input_probe(self._gain(layer, _ATTN_NORMS if part in naming.ATTENTION_INPUTS
                                            else naming.MLP_INPUT_NORMS))

    def right_probe(self, info: TensorInfo) -> torch.Tensor | None:
        """The [k, in] matrix whose product W (probe)ᵀ the sketch needs of the stored weight, or None: P diag(g) for
        input-side projections (q, k, v, gate, up, fused ones) and the output head, which read the residual stream
        through their norm's gain; P for a transposed o or down. The extractor returns it to `add_products`."""
        role = self._role(info)
        return self._probe_for(role) if role is not None and self._stored_side(info, role) == "right" else None

    def left_probe(self, info: TensorInfo) -> torch.Tensor | None:
        """The [k, out] probe whose product (probe) W the sketch needs of the stored weight, or None: P for o_proj
        and down_proj, P diag(g) for a transposed input-side projection."""
        role = self._role(info)
        return self._probe_for(role) if role is not None and self._stored_side(info, role) == "left" else None

    def left_groups(self, info: TensorInfo) -> int:
        """How many experts the left probe multiplies one at a time: a 3-D all-experts tensor's count, else 1."""
        return info.shape[0] if len(info.shape) == 3 and self.left_probe(info) is not None else 1

    def right_rows(self, info: TensorInfo) -> torch.Tensor | None:
        """The rows of W (ascending) whose right product the sketch uses, when not all: the head's sample."""
        role = self._role(info)
        if role is None or role[2] != "head":
            return None
        return self._head_rows[self._head_rows < info.shape[0]]

    def add(self, info: TensorInfo, weight: torch.Tensor) -> None:
        """Take one tensor of the stream as a whole float32 weight: form its products and add them."""
        right, left, rows = self.right_probe(info), self.left_probe(info), self.right_rows(info)
        rows_of = weight if rows is None else weight[rows]
        self.add_products(info, right=None if right is None else rows_of @ right.T,
                          left=None if left is None else left @ weight)

    def add_products(self, info: TensorInfo, right: torch.Tensor | None = None,
                     left: torch.Tensor | None = None) -> None:
        """Take one tensor's products, as its probes ask: W (right_probe)ᵀ [out, k] over `right_rows`
        (all rows when None) and/or left_probe W [k, in]."""
        role = self._role(info)
        if role is None:
            return
        side, layer, part = role
        stored_side = self._stored_side(info, role)
        product = right if stored_side == "right" else left
        if product is None:
            raise InternalError(f"sketch: tensor '{info.name}' needs its {stored_side} probe product, none was given")
        if len(info.shape) == 3:
            self._add_experts(info, stored_side, product)
            return
        if stored_side != side:
            product = product.T  # of a transposed weight: the product nn.Linear's W would have given
        if layer is None:
            rows = self.right_rows(info)
            if rows is None or product.shape[0] != len(rows):
                raise InternalError(f"sketch: head tensor '{info.name}' needs its product over the sampled rows")
            unit = product.T @ product
            if info == self.embedding and self._tied:
                self._head_from_embedding = unit
            else:
                self._head_from_lm = unit
            return
        assert part is not None
        block = self._blocks.setdefault(layer, _Block())
        split: dict[str, torch.Tensor] | None = {part: product}
        if part in naming.FUSED:
            split = split_fused(part, product, heads_of(self.config, self.width))
            if split is None:
                self._note_once("fused qkv projection does not match the config's head counts: attention units skipped")
                return
        expert = naming.expert_of(info.name)
        assert split is not None
        if expert is not None:
            block.experts.update({(name, expert): value for name, value in split.items() if name in MLP_AXES})
        else:
            block.parts.update(split)
        if {"q", "k", "v", "o", "gate", "up", "down"} <= set(block.parts) and layer not in self._moe_layers:
            self._close(layer)

    def _add_experts(self, info: TensorInfo, stored_side: str, product: torch.Tensor) -> None:
        """An all-experts tensor's products: the stored tensor with its multiplied axis replaced by the probe's k
        ([experts, rows, k] on the right, [experts, k, columns] on the left), which split_experts reads like the
        tensor itself into each expert's products as nn.Linear's weight would give them."""
        part, layer = naming.fused_experts(info.name), _layer_of(info.name)
        assert part is not None and layer is not None
        experts = info.shape[0]
        stacked = product.reshape(experts, -1, product.shape[-1]) if stored_side == "right" else product
        if stacked.shape[0] != experts:
            raise InternalError(f"sketch: tensor '{info.name}' needs a product per expert, got {tuple(product.shape)}")
        block = self._blocks.setdefault(layer, _Block())
        for number, split in enumerate(split_experts(part, stacked, self.config)):
            block.experts.update({(name, number): value for name, value in split.items() if name in MLP_AXES})

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _close(self, layer: int) -> None:
        """Form the layer's units from its probe products and drop the buffers."""
        block = self._blocks.pop(layer)
        parts = with_experts(block.parts, block.experts)
        for role, unit in layer_units(parts, heads_of(self.config, self.width), self._note_once).items():
            self._units[(role, layer)] = unit

    def finish(self) -> dict[str, Any]:
        """The JSON-safe sketch: probe description, architecture and one normalised k x k matrix per unit."""
        for layer in sorted(self._blocks):
            self._close(layer)
        head = self._head_from_lm if self._head_from_lm is not None else self._head_from_embedding
        if head is not None:
            self._units[("head", -1)] = head
        order = {role: n for n, role in enumerate(GLOBAL_ROLES + LAYER_ROLES)}
        units = []
        for (role, layer), matrix in sorted(self._units.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
            units.append({"role": role, "layer": None if layer < 0 else layer,
                          "data": encode_matrix(normalise(matrix, role in SYMMETRIC_ROLES))})
        if len(self._stored_layers) < len(self._layer_ids):
            self.notes.append(f"{len(self._layer_ids)} layers: {len(self._stored_layers)} evenly spaced ones sketched")
        sample = np.sort(self.keys.keys[self.keys.present])[:KEY_SAMPLE].astype("<u8")
        return {
            "version": SKETCH_VERSION,
            "probe": {"seed": self.seed, "mixtures": self.k, "keys": self.keys.kind,
                      "keyed_rows": int(self.keys.present.sum()), "rows": int(self.vocab),
                      "key_sample": base64.b64encode(sample.tobytes()).decode("ascii"),
                      "head_rows": int(len(self._head_rows))},
            "architecture": architecture_of(self.config, self.width, len(self._layer_ids), self.vocab),
            "dtype": "float16",
            "layers": sorted({u["layer"] for u in units if u["layer"] is not None}),
            "units": units,
            "notes": list(self.notes),
        }


# -- the same units from live parameters, differentiable -----------------------------------------------

def _named(state: Mapping[str, torch.Tensor], leaves: tuple[str, ...]) -> str | None:
    for name, tensor in state.items():
        if tensor.dim() == 2 and name.endswith(".weight") and _layer_of(name) is None and _leaf(name) in leaves:
            return name
    return None


def sketch_units(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], keys: TokenKeys | None = None, *,
                 tokens: int = DEFAULT_TOKENS, seed: int = DEFAULT_SEED) -> dict[tuple[str, int | None], torch.Tensor]:
    """The sketch's normalised k x k units as differentiable functions of a model's parameters.

    `state` maps Hugging Face parameter names to live tensors (gradients flow through every unit),
    `config` is the config.json dict, `keys` the token keys (tokens.tokenizer_keys, or None for ids).
    Equal, up to float rounding, to what `SketchBuilder` records from the same weights (every layer is
    returned, whatever the layer budget); for an adaptive attacker's penalty and for tests.
    """
    embed_name = _named(state, _EMBEDDINGS)
    if embed_name is None:
        raise UsageError("sketch_units: no token embedding among the parameters")
    embedding = state[embed_name]
    rows, width = embedding.shape
    keys = keys if keys is not None else id_keys(rows)
    if len(keys.keys) != rows:
        raise UsageError(f"sketch_units: {len(keys.keys)} token keys for {rows} embedding rows")
    offset = 1.0 if str(config.get("model_type") or "").startswith("gemma") else 0.0
    gains: dict[tuple[int | None, str], torch.Tensor] = {
        (_layer_of(name), _leaf(name)): tensor + offset for name, tensor in state.items()
        if tensor.dim() == 1 and name.endswith(".weight") and _leaf(name) in _ATTN_NORMS + _MLP_NORMS + _FINAL_NORMS}

    def gain(layer: int | None, leaves: tuple[str, ...]) -> torch.Tensor:
        for leaf in leaves:
            g = gains.get((layer, leaf))
            if g is not None and g.shape[0] == width:
                return g
        return torch.ones(width, dtype=embedding.dtype, device=embedding.device)

    coefficients = mixture_coefficients(keys.keys, tokens, seed) * keys.present[None, :]
    rows_unit = unit_rows(embedding)
    head_rows = torch.from_numpy(smallest_keys(keys, HEAD_ROWS))
    probe = flatten_probe(unit_rows(torch.from_numpy(coefficients).to(embedding) @ rows_unit), rows_unit[head_rows],
                          flatten_start(keys.keys[head_rows.numpy()], width).to(embedding))
    units: dict[tuple[str, int | None], torch.Tensor] = {("embed", None): probe @ probe.T}
    head_name = _named(state, _HEADS)
    head = state[head_name] if head_name is not None else embedding
    product = head[head_rows[head_rows < head.shape[0]]] @ (probe * gain(None, _FINAL_NORMS)).T
    units[("head", None)] = product.T @ product
    shape = heads_of(config, width)
    blocks: dict[int, _Block] = {}
    transposed = naming.transposed(config)
    for name, weight in state.items():
        fused = naming.fused_experts(name)
        if fused is not None and weight.dim() == 3 and (layer := _layer_of(name)) is not None:
            mlp_probe = probe * gain(layer, naming.MLP_INPUT_NORMS)
            block = blocks.setdefault(layer, _Block())
            for number, expert_parts in enumerate(split_experts(fused, weight, config)):
                for n, w in expert_parts.items():
                    if n == "down" and w.shape[0] == width:
                        block.experts[(n, number)] = probe @ w
                    elif n in ("gate", "up") and w.shape[1] == width:
                        block.experts[(n, number)] = w @ mlp_probe.T
            continue
        layer, part = _layer_of(name), naming.projection(name)
        if layer is None or part is None or weight.dim() != 2 or not name.endswith(".weight"):
            continue
        if transposed:
            weight = weight.T
        if part in ("o", "down"):
            if weight.shape[0] != width:
                continue
            split: dict[str, torch.Tensor] | None = {part: probe @ weight}
        else:
            if weight.shape[1] != width:
                continue
            norms = _ATTN_NORMS if part in naming.ATTENTION_INPUTS else naming.MLP_INPUT_NORMS
            right = weight @ (probe * gain(layer, norms)).T
            split = split_fused(part, right, shape) if part in naming.FUSED else {part: right}
        if split is None:
            continue
        block, expert = blocks.setdefault(layer, _Block()), naming.expert_of(name)
        if expert is None:
            block.parts.update(split)
        else:
            block.experts.update({(n, expert): value for n, value in split.items() if n in MLP_AXES})
    for layer in sorted(blocks):
        for role, unit in layer_units(with_experts(blocks[layer].parts, blocks[layer].experts), shape).items():
            units[(role, layer)] = unit
    return {key: normalise(unit, key[0] in SYMMETRIC_ROLES) for key, unit in units.items()}
