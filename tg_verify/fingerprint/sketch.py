"""Lineage sketch: per-block token-probe matrices that survive derivation and re-parameterisation.

The vocabulary is the one coordinate system a base shares with its derivatives. The sketch takes
the embedding rows of k seeded token ids (the probe) and, per transformer block, evaluates the
block's weights as bilinear forms on those tokens: k x k matrices that do not change under
permutation or rotation of the residual stream, heads or MLP units, per-channel rescaling through
norm gains, q/k and v/o rescaling, or fused-vs-split projections. See docs/lineage.md.
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
from tg_verify.artifact.reader import TensorReader
from tg_verify.errors import InternalError, UsageError

SKETCH_VERSION = "tgs1"
DEFAULT_TOKENS = 32  # probe size k: k(k-1)=992 compared entries per unit, 2 KiB per unit in fp16
DEFAULT_SEED = 0
MAX_LAYERS = 256  # at k=32: 4 units x 2 KiB x 256 layers, base64: 2.8 MB
MIN_TOKENS, MAX_TOKENS = 8, 64
HEAD_ROWS = 4096  # output-head rows (tokens) summed in the head unit: a seeded nested sample, for cost
SIZE_BUDGET = 3_500_000  # base64 bytes of unit data; with ids and field names the sketch stays under 4 MB

# Roles of the per-layer units, in stored order, and whether their matrix is symmetric (a Gram).
LAYER_ROLES: tuple[str, ...] = ("attn_qk", "attn_ov", "mlp_gate", "mlp_ud")
GLOBAL_ROLES: tuple[str, ...] = ("embed", "head")
SYMMETRIC_ROLES: frozenset[str] = frozenset({"embed", "head", "mlp_gate"})

# Tensor-name rules live in the artifact layer (one module for every reader of names).
_PARTS = naming.PROJECTIONS
_EMBEDDINGS, _HEADS = naming.EMBEDDINGS, naming.HEADS
_ATTN_NORMS, _MLP_NORMS, _FINAL_NORMS = naming.ATTN_NORMS, naming.MLP_NORMS, naming.FINAL_NORMS
_leaf, _layer_of = naming.leaf, naming.layer_of


def probe_ids(vocab: int, k: int, seed: int) -> np.ndarray:
    """The k token ids with the smallest seeded hash among [0, vocab), ascending (a bottom-k sample).

    Nested by construction: a grown vocabulary keeps every old probe id that still ranks in its
    bottom k, so a base and its vocabulary-extended derivative share most of their probe.
    """
    ids = np.arange(vocab, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = ids + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    chosen = np.argsort(x, kind="stable")[:min(k, vocab)]
    return np.sort(chosen).astype(np.int64)


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
    """Remove per-token scale: cosine normalisation for Grams, row/column RMS for the others.

    Token norms carry frequency effects that independent models share, so only the pattern of
    the off-diagonal entries is compared.
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


@dataclass
class _Block:
    """Per-layer probe projections, kept until the layer's units can be formed."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class SketchBuilder:
    """Builds the lineage sketch from the tensor stream the fingerprint extractor already reads.

    Per tensor in canonical order the extractor asks for `right_probe` / `left_probe`, computes
    the products in its own block-wise pass over the weight and hands them to `add_products`
    (`add` does the same from a whole float32 weight); `finish` returns the JSON-safe sketch.
    """

    def __init__(self, artifact: Artifact, reader: TensorReader, settings: Any = None) -> None:
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
        self._layer_ids = sorted({i for t in artifact.tensors if (i := _layer_of(t.name)) is not None})
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
        self.ids = np.zeros(0, dtype=np.int64)
        self.probe: torch.Tensor | None = None
        if self.embedding is None:
            self.notes.append("no token embedding found: sketch has no units")
            return
        self.vocab = self.embedding.shape[0]
        self.ids = probe_ids(self.vocab, self.k, self.seed)
        # the head unit sums over output tokens; a nested sample of them keeps it cheap on big vocabularies
        self._head_rows = torch.from_numpy(probe_ids(self.vocab, HEAD_ROWS, self.seed + 1))
        rows = reader.raw(self.embedding)[torch.from_numpy(self.ids)].to(torch.float32)
        self.probe = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)  # what RMSNorm feeds forward
        self._units[("embed", -1)] = self.probe @ self.probe.T
        self.width = self.probe.shape[1]

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
        """How a tensor feeds the sketch: ("right" | "left", layer, part), or None when it does not."""
        if self.probe is None or len(info.shape) != 2 or not info.name.endswith(".weight"):
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
        part = _PARTS.get(leaf)
        if part is None or layer not in self._stored_layers:
            return None
        if part in ("o", "down"):
            return ("left", layer, part) if out == self.width else None
        return ("right", layer, part) if width == self.width else None

    def right_probe(self, info: TensorInfo) -> torch.Tensor | None:
        """The [k, in] matrix Ê diag(g) whose product W (Ê diag(g))ᵀ the sketch needs, or None.

        Input-side projections (q, k, v, gate, up, fused ones) and the output head read the
        residual stream through their norm's gain; the extractor returns the product to `add_products`.
        """
        role = self._role(info)
        if role is None or role[0] != "right":
            return None
        _, layer, part = role
        if part == "head":
            return self._input_probe(self._gain(None, _FINAL_NORMS))
        return self._input_probe(self._gain(layer, _ATTN_NORMS if part in ("q", "k", "v", "qkv") else _MLP_NORMS))

    def left_probe(self, info: TensorInfo) -> torch.Tensor | None:
        """The [k, out] probe Ê whose product Ê W the sketch needs (o_proj, down_proj), or None."""
        role = self._role(info)
        return self.probe if role is not None and role[0] == "left" else None

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
        product = right if side == "right" else left
        if product is None:
            raise InternalError(f"sketch: tensor '{info.name}' needs its {side} probe product, none was given")
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
        block = self._blocks.setdefault(layer, _Block())
        if part == "qkv":
            self._split_qkv(block, product)
        elif part == "gate_up":
            half = product.shape[0] // 2
            block.parts["gate"], block.parts["up"] = product[:half], product[half:]
        else:
            block.parts[part] = product
        if self._complete(block):
            self._close(layer)

    def _heads(self) -> tuple[int, int, int] | None:
        heads = self.config.get("num_attention_heads")
        if not isinstance(heads, int) or heads <= 0:
            return None
        kv = self.config.get("num_key_value_heads") or heads
        head_dim = self.config.get("head_dim") or (self.width // heads)
        if not isinstance(kv, int) or not isinstance(head_dim, int) or kv <= 0 or heads % kv:
            return None
        return heads, kv, head_dim

    def _split_qkv(self, block: _Block, projected: torch.Tensor) -> None:
        shape = self._heads()
        if shape is None or projected.shape[0] != (shape[0] + 2 * shape[1]) * shape[2]:
            self._note_once("fused qkv projection does not match the config's head counts: attention units skipped")
            return
        q_rows, kv_rows = shape[0] * shape[2], shape[1] * shape[2]
        block.parts["q"] = projected[:q_rows]
        block.parts["k"] = projected[q_rows:q_rows + kv_rows]
        block.parts["v"] = projected[q_rows + kv_rows:]

    @staticmethod
    def _complete(block: _Block) -> bool:
        return {"q", "k", "v", "o", "gate", "up", "down"} <= set(block.parts)

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _close(self, layer: int) -> None:
        """Form the layer's units from its probe projections and drop the buffers."""
        parts = self._blocks.pop(layer).parts
        shape = self._heads()
        q, k, v, o = (parts.get(n) for n in ("q", "k", "v", "o"))
        if q is not None and k is not None and shape is not None:
            heads, kv, head_dim = shape
            if q.shape[0] == heads * head_dim and k.shape[0] == kv * head_dim:
                qh = q.reshape(heads, head_dim, -1)
                kh = k.reshape(kv, head_dim, -1).repeat_interleave(heads // kv, dim=0)
                self._units[("attn_qk", layer)] = torch.einsum("hdi,hdj->ij", qh, kh)
                if v is not None and o is not None and v.shape[0] == kv * head_dim and o.shape[1] == heads * head_dim:
                    vh = v.reshape(kv, head_dim, -1).repeat_interleave(heads // kv, dim=0)
                    oh = o.reshape(o.shape[0], heads, head_dim)
                    self._units[("attn_ov", layer)] = torch.einsum("ihd,hdj->ij", oh, vh)
            else:
                self._note_once("attention shapes do not match the config's head counts: attention units skipped")
        elif q is not None:
            self._note_once("no usable head counts in config.json: attention units skipped")
        if parts.get("gate") is not None:
            self._units[("mlp_gate", layer)] = parts["gate"].T @ parts["gate"]
        if parts.get("up") is not None and parts.get("down") is not None \
                and parts["down"].shape[1] == parts["up"].shape[0]:
            self._units[("mlp_ud", layer)] = parts["down"] @ parts["up"]

    def finish(self) -> dict[str, Any]:
        """The JSON-safe sketch: probe ids, vocabulary size and one normalised k x k matrix per unit."""
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
        return {
            "version": SKETCH_VERSION,
            "probe": {"seed": self.seed, "tokens": int(len(self.ids)), "vocab": int(self.vocab),
                      "ids": [int(i) for i in self.ids], "head_rows": int(len(self._head_rows))},
            "dtype": "float16",
            "layers": sorted({u["layer"] for u in units if u["layer"] is not None}),
            "units": units,
            "notes": list(self.notes),
        }
