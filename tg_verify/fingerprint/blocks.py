"""Block evidence: each layer's attention and MLP read in a frame the model's own blocks define.

No token, embedding row or head row enters it, so re-initialising the embedding, relabelling the
vocabulary or withholding the tokenizer leaves it where it was. Per layer l, with every norm gain
absorbed into the weights it feeds and key/value groups shared by their query heads:

    OV_l = Σ_h W_o^h W_v^{g(h)} diag(g_attn)        UD_l = W_down W_up diag(g_mlp)        (d x d)

Both are sums of products that a cancelling pair of units or heads (dead capacity) leaves exactly
unchanged, and both turn as Qᵀ M Q under any rotation, permutation or rescaling of the residual stream.
The frame V (d x r) is the top-r eigenspace of S = Σ_l OV_l OV_lᵀ + OV_lᵀ OV_l, estimated through the
small factors (W_o, W_v) by subspace iteration; each layer stores X_l = W Vᵀ OV_l V W and
Y_l = W Vᵀ UD_l V W (r x r, float16, unit Frobenius norm), W = diag((λ_i / mean λ)^-1/4) flattening the
frame's leading directions as the sketch flattens its probe's (block_units). A derivative shares its
base's residual basis across all blocks, so the rotation that maps its X's onto the base's also maps its
Y's; an independently trained model's does not (analysis/blocks.py scores exactly that). See docs/lineage.md.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol, TypeVar

import torch

from tg_verify.artifact import naming
from tg_verify.artifact.model import Artifact, TensorInfo
from tg_verify.errors import InternalError, WeightValueError
from tg_verify.fingerprint.responses import ResponseEngine
from tg_verify.fingerprint.sketch import (
    architecture_of,
    heads_of,
    joined_experts,
    split_experts,
    split_fused,
    with_experts,
)

BLOCKS_VERSION = "tgb2"
RANK = 32  # r: the frame's width; 2 x r² float16 per layer (4 KiB)
OVERSAMPLE = 16  # extra columns the subspace iteration carries, so the top r converge
ITERATIONS = 4  # subspace iterations when S is not formed (r + OVERSAMPLE columns; trained spectra are steep)
EXACT_WIDTH = 256  # at or below this width S is formed and diagonalised exactly (d³ per layer: cheap only when small)
MAX_LAYERS = 256
ATTENTION_CACHE_BYTES = 512 << 20  # attention factors kept between frame iterations up to this size (float32)
FLATTEN = 0.25  # each unit's rows and columns weighted by (eigenvalue / mean)^-FLATTEN: half-way to whitened
MIN_RELATIVE_EIGENVALUE = 1e-3  # eigenvalues below this share of the mean weigh as if they had it (rank-poor S)
_START_SEED = 0xB10C  # the iteration's start vectors: fixed, so every model starts alike
ROLES: tuple[str, ...] = ("attn_ov", "mlp_ud")
ALL_EXPERTS = -1  # a plan's expert index for a 3-D tensor that holds every expert of its block
# the projections the attention's factors come from (kv_latent, kv_up: latent attention)
_ATTENTION_PARTS = frozenset({"v", "o", "qkv", "qkv_heads", "kv_latent", "kv_up"})
_MLP_PARTS = frozenset({"up", "down", "gate_up"})
_T = TypeVar("_T")


@dataclass
class LayerFactors:
    """One block's factors: OV = ov_left @ ov_right, UD = ud_left @ ud_right (float32, gains absorbed). The MLP's
    are None where only the frame is being estimated, or where `mlp_in_frame` reads Vᵀ UD V from the stored weights
    instead (an artifact's MLP is never held whole in float32)."""

    layer: int
    ov_left: torch.Tensor  # [d, kv * head_dim]: W_o with the heads of each key/value group summed
    ov_right: torch.Tensor  # [kv * head_dim, d]: W_v diag(g_attn)
    ud_left: torch.Tensor | None = None  # [d, m]: W_down
    ud_right: torch.Tensor | None = None  # [m, d]: W_up diag(g_mlp)
    # (W_oᵀ W_o, W_v W_vᵀ) once computed, where the factors are thin enough that they pay (grouped-query attention)
    grams: tuple[torch.Tensor, torch.Tensor] | None = None
    mlp_in_frame: Callable[[torch.Tensor], torch.Tensor] | None = None  # frame V -> Vᵀ UD V

    def frame_product(self, x: torch.Tensor) -> torch.Tensor:
        """(OV OVᵀ + OVᵀ OV) x = A (B Bᵀ) Aᵀ x + Bᵀ (Aᵀ A) B x, through the factors A = ov_left, B = ov_right."""
        a, b = self.ov_left, self.ov_right
        if self.grams is None and 4 * a.shape[1] <= a.shape[0]:
            self.grams = (a.T @ a, b @ b.T)
        if self.grams is not None:
            a_gram, b_gram = self.grams
            return a @ (b_gram @ (a.T @ x)) + b.T @ (a_gram @ (b @ x))
        return a @ (b @ (b.T @ (a.T @ x))) + b.T @ (a.T @ (a @ (b @ x)))

    def units(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vᵀ OV V and Vᵀ UD V."""
        ov = (frame.T @ self.ov_left) @ (self.ov_right @ frame)
        if self.mlp_in_frame is not None:
            return ov, self.mlp_in_frame(frame)
        if self.ud_left is None or self.ud_right is None:
            raise InternalError(f"block evidence: layer {self.layer}'s MLP factors were not loaded")
        return ov, (frame.T @ self.ud_left) @ (self.ud_right @ frame)


class Layers(Protocol):
    """A pass over the model's blocks: fn applied to each layer's factors (with the MLP's or not), loaded as it
    goes, possibly on several threads; the results in layer order."""

    def __call__(self, mlp: bool, fn: Callable[[LayerFactors], _T]) -> list[_T]: ...


def group_heads(o_proj: torch.Tensor, heads: int, kv: int, head_dim: int) -> torch.Tensor:
    """W_o [d, heads * head_dim] with the query heads of each key/value group summed: [d, kv * head_dim].

    Σ_h W_o^h W_v^{g(h)} = Σ_g (Σ_{h in g} W_o^h) W_v^g, so OV never needs the repeated values."""
    d = o_proj.shape[0]
    if heads == kv:
        return o_proj
    return o_proj.reshape(d, kv, heads // kv, head_dim).sum(dim=2).reshape(d, kv * head_dim)


def factors_from_parts(layer: int, parts: Mapping[str, torch.Tensor], gains: tuple[torch.Tensor, torch.Tensor],
                       shape: tuple[int, int, int] | None, width: int, mlp: bool = True) -> LayerFactors | None:
    """A layer's factors from its projections (v/o/up/down, fused ones already split), or None when a part is
    missing or its shape does not fit the config's head counts. `mlp=False`: the attention's only."""
    v, o, up, down = (parts.get(n) for n in ("v", "o", "up", "down"))
    if v is None or o is None or shape is None:
        return None
    heads, kv, head_dim = shape
    if v.shape != (kv * head_dim, width) or o.shape != (width, heads * head_dim):
        return None
    g_attn, g_mlp = gains
    attention = (group_heads(o, heads, kv, head_dim), v * g_attn[None, :])
    if not mlp:
        return LayerFactors(layer, *attention)
    if up is None or down is None or up.shape[1] != width or down.shape != (width, up.shape[0]):
        return None
    return LayerFactors(layer, *attention, down, up * g_mlp[None, :])


def latent_of(config: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """(heads, qk_nope_head_dim, v_head_dim, kv_lora_rank) of multi-head latent attention (DeepSeek-V2/V3, Kimi K2),
    or None for any other attention."""
    values = [config.get(key) for key in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank")]
    numbers = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    if len(numbers) != 4 or 0 in (numbers[0], numbers[2], numbers[3]):
        return None
    heads, nope, value, rank = numbers
    return heads, nope, value, rank


def latent_factors(layer: int, kv_latent: torch.Tensor, kv_up: torch.Tensor,
                   times_o: Callable[[torch.Tensor], torch.Tensor], gains: tuple[torch.Tensor, torch.Tensor],
                   latent: tuple[int, int, int, int]) -> LayerFactors:
    """A latent attention block's factors: values are W_up^h diag(g_latent) norm(W_latent diag(g_attn) x) per head, so
    OV = (Σ_h W_o^h W_up^h diag(g_latent)) (W_latent diag(g_attn)): thin factors of the latent's width, as grouped
    heads give (the latent's norm divides by one number per token, which leaves OV's directions as they are).
    `times_o(X)` is W_o X; `gains` (g_attn, g_latent)."""
    heads, nope, value, rank = latent
    values = kv_up.reshape(heads, nope + value, rank)[:, nope:].reshape(heads * value, rank)
    return LayerFactors(layer, times_o(values * gains[1][None, :]), kv_latent[:rank] * gains[0][None, :])


def split_parts(part: str, weight: torch.Tensor, shape: tuple[int, int, int] | None) -> dict[str, torch.Tensor] | None:
    """A projection as the parts it holds: fused ones split by rows (sketch.split_fused; None when the config does
    not fit)."""
    return split_fused(part, weight, shape) if part in naming.FUSED else {part: weight}


def mlp_pieces(parts: Mapping[str, torch.Tensor], experts: Mapping[tuple[str, int], torch.Tensor]
               ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A block's MLP as (down, up) pairs whose products sum to W_down W_up: its dense (shared-expert) part, then
    each expert in index order, as sketch.with_experts joins them; None when it has no MLP or its experts do not
    pair up."""
    indices = joined_experts(parts, experts)
    if indices is None or ("up" in parts) != ("down" in parts):
        return None
    pieces = [(parts["down"], parts["up"])] if "up" in parts else []
    for expert in indices:
        if ("up", expert) not in experts or ("down", expert) not in experts:
            return None
        pieces.append((experts[("down", expert)], experts[("up", expert)]))
    return pieces or None


def _streamed(engine: ResponseEngine, weight: torch.Tensor, right: torch.Tensor | None = None,
              left: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """weight @ right and left @ weight (float32) by `engine`, in blocks of the stored rows: a transposed view
    (GPT-2's Conv1D) is read as the stored matrix, with the products' roles swapped."""
    if not weight.is_contiguous() and weight.T.is_contiguous():
        engine.load(weight.T)
        right_t, left_t = engine.project(None if left is None else left.T.contiguous(),
                                         None if right is None else right.T.contiguous())
        engine.unload()
        return (None if left_t is None else left_t.T), (None if right_t is None else right_t.T)
    engine.load(weight)
    products = engine.project(right, left)
    engine.unload()
    return products


def frame_of(layers: Layers, width: int, rank: int = RANK, *, exact_width: int = EXACT_WIDTH,
             iterations: int = ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, str]:
    """V [d, r]: the top-r eigenvectors of S = Σ_l OV_l OV_lᵀ + OV_lᵀ OV_l (descending), their eigenvalues [r],
    and how they were found.

    Exactly (S formed) up to `exact_width`; beyond it by subspace iteration through the factors (one pass over
    the attention per iteration) from fixed start vectors, r + OVERSAMPLE wide, then Rayleigh-Ritz. Both turn
    with any rotation of the residual stream (the iteration to within its convergence, which a spectrum as
    steep as trained models' makes fast: tests/fingerprint/test_block_evidence.py)."""
    r = min(rank, width)
    if width <= exact_width:
        def gram(f: LayerFactors) -> torch.Tensor:
            ov = f.ov_left.double() @ f.ov_right.double()
            return ov @ ov.T + ov.T @ ov

        total = torch.zeros((width, width), dtype=torch.float64)
        for part in layers(False, gram):  # summed in layer order, whatever the threads: the same bits every time
            total += part
        values, vectors = torch.linalg.eigh(total)
        top = torch.argsort(values, descending=True)[:r]
        return vectors[:, top].to(torch.float32), values[top].to(torch.float32), "exact"
    columns = min(width, r + OVERSAMPLE)
    generator = torch.Generator().manual_seed(_START_SEED)
    basis = torch.randn((width, columns), generator=generator, dtype=torch.float32)

    def apply(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for part in layers(False, lambda f: f.frame_product(x)):
            out += part
        return out

    for _ in range(iterations):
        basis, _ = torch.linalg.qr(apply(basis))
    projected = basis.T.double() @ apply(basis).double()
    values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
    top = torch.argsort(values, descending=True)[:r]
    return ((basis.double() @ vectors[:, top]).to(torch.float32), values[top].to(torch.float32),
            f"iterated-{iterations}")


def _unit_norm(matrix: torch.Tensor) -> torch.Tensor:
    norm = matrix.norm()
    return matrix / norm if float(norm.detach()) > 0 else matrix


def encode(matrix: torch.Tensor) -> str:
    array = matrix.detach().to(torch.float32).clamp(-60000, 60000).numpy().astype("<f2")
    return base64.b64encode(array.tobytes()).decode("ascii")


def block_units(layers: Layers, width: int, rank: int = RANK, *, exact_width: int = EXACT_WIDTH
                ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], str]:
    """{layer: (X_l, Y_l)} read in the flattened frame, each of unit Frobenius norm, and how the frame was found.

    Flattened: both sides of every unit are weighted by (λ_i / mean λ)^(-FLATTEN), λ the frame's eigenvalues,
    so that the few leading directions, along which the first updates of every training run align a model's
    attention and MLP alike (an unrelated pair of briefly trained models scores 0.1-0.3 without it), weigh
    little more than the rest: the blocks' counterpart of the sketch's flattened probe."""
    frame, values, method = frame_of(layers, width, rank, exact_width=exact_width)
    if not bool(torch.isfinite(values).all()):
        raise WeightValueError("block evidence: the attention's weights hold NaN or infinite values; a fingerprint "
                               "of them would be meaningless")
    scale = values.clamp_min(0).mean().clamp_min(1e-30)
    weights = (values.clamp_min(0) / scale).clamp_min(MIN_RELATIVE_EIGENVALUE).pow(-FLATTEN)
    out = {}
    for layer, x, y in layers(True, lambda f: (f.layer, *f.units(frame))):
        if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise WeightValueError(f"block evidence: layer {layer}'s weights hold NaN or infinite values; a "
                                   f"fingerprint of them would be meaningless")
        out[layer] = (_unit_norm(weights[:, None] * x * weights[None, :]),
                        _unit_norm(weights[:, None] * y * weights[None, :]))
    return out, method


def in_memory(factors: list[LayerFactors]) -> Layers:
    """A pass over factors already at hand, on this thread."""
    def each(mlp: bool, fn: Callable[[LayerFactors], _T]) -> list[_T]:
        return [fn(f) for f in factors]
    return each


def build_blocks(artifact: Artifact, reader: Any, *, rank: int = RANK, exact_width: int = EXACT_WIDTH,
                 note: Callable[[str], None] | None = None, threads: int = 1) -> dict[str, Any] | None:
    """The JSON-safe block evidence of an artifact, read through `reader` (`.raw(info)`, the stored values), or
    None when its blocks do not have the shape it reads (a note says why).

    Weights are read layer by layer and dropped after use: the attention's factors once per frame iteration
    (kept between iterations while they fit ATTENTION_CACHE_BYTES), the MLP's once; `threads` layers at a time
    (torch's own threads are left as the caller set them). The result does not depend on `threads`."""
    def say(text: str) -> None:
        if note is not None:
            note(text)

    config = artifact.config or {}
    embedding = next((i for i in artifact.tensors if len(i.shape) == 2 and naming.global_role(i.name) == "embed"), None)
    by_layer: dict[int, list[TensorInfo]] = {}
    for info in artifact.tensors:
        layer = naming.layer_of(info.name)
        if layer is not None and (info.name.endswith(".weight") or naming.fused_experts(info.name)):
            by_layer.setdefault(layer, []).append(info)
    width = int(embedding.shape[1]) if embedding is not None else _width_from(config)
    shape = heads_of(config, width) if width else None
    if not by_layer or not width or shape is None:
        say("block evidence: no decoder blocks with head counts in config.json")
        return None
    if len(by_layer) > MAX_LAYERS:
        say(f"block evidence: {len(by_layer)} layers, more than {MAX_LAYERS}: left out")
        return None
    source = _BlockSource(artifact, reader, by_layer, shape, width, threads)
    skipped = source.check()
    if len(skipped) == len(by_layer):
        say("block evidence: no layer has the value, output, up and down projections it reads")
        return None
    if skipped:
        say(f"block evidence: layers {skipped} lack a projection it reads, or do not fit the config")
    unknown = _unknown_gains(by_layer, width)
    if unknown:
        say(f"block evidence: 1-D weights it does not know as norms ({', '.join(unknown[:3])}) are not absorbed: "
            f"a function-preserving rescaling through them would move this evidence")
    units, method = block_units(source.map, width, rank, exact_width=exact_width)
    return {
        "version": BLOCKS_VERSION, "rank": int(next(iter(units.values()))[0].shape[0]), "frame": method,
        "architecture": architecture_of(config, width, len(by_layer), int(embedding.shape[0]) if embedding else 0),
        "dtype": "float16",
        "units": [{"layer": layer, "attn_ov": encode(x), "mlp_ud": encode(y)}
                  for layer, (x, y) in sorted(units.items())],
    }


def _unknown_gains(by_layer: Mapping[int, list[TensorInfo]], width: int) -> list[str]:
    """The module leaves of residual-width 1-D weights in the blocks that are no norm naming knows (sorted): gains
    the evidence cannot absorb, so rescaling through them is not an invariance of it."""
    known = set(naming.NORMS + naming.OUTPUT_NORMS)
    return sorted({naming.leaf(info.name) for infos in by_layer.values() for info in infos
                   if len(info.shape) == 1 and info.shape[0] == width and info.name.endswith(".weight")
                   and naming.leaf(info.name) not in known and naming.projection(info.name) is None})


def _width_from(config: Mapping[str, Any]) -> int:
    value = config.get("hidden_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _BlockSource:
    """Reads each layer's factors from the artifact on demand; caches the attention's while they fit."""

    def __init__(self, artifact: Artifact, reader: Any, by_layer: dict[int, list[TensorInfo]],
                 shape: tuple[int, int, int], width: int, threads: int = 1) -> None:
        self.artifact, self.reader, self.shape, self.width, self.threads = artifact, reader, shape, width, threads
        self._lock = threading.Lock()
        offset = 1.0 if str((artifact.config or {}).get("model_type") or "").startswith("gemma") else 0.0
        self.transposed = naming.transposed(artifact.config)
        self.config = artifact.config or {}
        # layer -> (part, expert index or None) -> tensor; a mixture of experts' MLPs are joined (sketch.with_experts)
        self.plan: dict[int, dict[tuple[str, int | None], TensorInfo]] = {}
        # layer -> the stored gains its attention and MLP read through (None: no norm, ones once `width` is confirmed
        # by the weights' shapes in check(): it may come from an untrusted config.json)
        self.stored_gains: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.latent = latent_of(artifact.config or {})
        self.latent_gains: dict[int, torch.Tensor | None] = {}  # latent attention: its latent norm's gain, if any
        for layer, infos in sorted(by_layer.items()):
            parts: dict[tuple[str, int | None], TensorInfo] = {}
            norms: dict[str, TensorInfo] = {}
            for info in infos:
                module = naming.leaf(info.name)
                if len(info.shape) == 1 and module in naming.ATTN_NORMS + naming.MLP_NORMS + naming.LATENT_NORMS:
                    norms[module] = info
                    continue
                part = naming.projection(info.name) or (naming.latent_projection(info.name) if self.latent else None)
                if part in ("v", "o", "up", "down", "kv_latent", "kv_up", *naming.FUSED) and len(info.shape) == 2:
                    parts[(part, naming.expert_of(info.name))] = info
                elif (fused := naming.fused_experts(info.name)) is not None and len(info.shape) == 3:
                    parts[(fused, ALL_EXPERTS)] = info
            self.plan[layer] = parts
            self.stored_gains[layer] = (self._gain(norms, naming.ATTN_NORMS, offset),
                                        self._gain(norms, naming.MLP_INPUT_NORMS, offset))
            if self.latent is not None:  # no norm: ones, made once kv_b_proj's shape has confirmed the config's rank
                latent_norm = naming.input_norm(norms, naming.LATENT_NORMS)
                self.latent_gains[layer] = (None if latent_norm is None else
                                            _finite(self.reader.float32(latent_norm), latent_norm, artifact) + offset)
        self.cache: dict[int, LayerFactors] = {}
        self.cache_bytes = 0
        self._local = threading.local()  # each thread's ResponseEngine (its conversion buffer)
        self.usable: list[int] = []

    def _gain(self, norms: Mapping[str, TensorInfo], leaves: tuple[str, ...], offset: float) -> torch.Tensor | None:
        """The gain a block's attention or MLP reads its input through (None where it has none)."""
        info = naming.input_norm(norms, leaves)
        if info is None:
            return None
        return _finite(self.reader.float32(info), info, self.artifact) + offset

    def gains(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (attention, MLP) input gains, ones where it has no norm (a usable layer's width is real)."""
        attention, mlp = self.stored_gains[layer]
        return (torch.ones(self.width) if attention is None else attention,
                torch.ones(self.width) if mlp is None else mlp)

    def _gather(self, layer: int, wanted: frozenset[str], fetch: Callable[[TensorInfo], torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[tuple[str, int], torch.Tensor], list[TensorInfo]]:
        """The layer's `wanted` projections as views of the `fetch`ed stored weights, oriented as nn.Linear holds
        them ([out, in]), fused ones split, experts apart; and the tensors they came from."""
        parts: dict[str, torch.Tensor] = {}
        experts: dict[tuple[str, int], torch.Tensor] = {}
        used: list[TensorInfo] = []
        for (part, expert), info in self.plan[layer].items():
            if part not in wanted:
                continue
            stored = fetch(info)
            used.append(info)
            weight = stored.T if self.transposed and expert != ALL_EXPERTS else stored  # as nn.Linear's: [out, in]
            pieces = (list(enumerate(split_experts(part, stored, self.config))) if expert == ALL_EXPERTS  # by place
                      else [(expert, split_parts(part, weight, None if expert is not None else self.shape))])
            for number, split in pieces:
                for name, value in (split or {}).items():
                    if number is None and name in wanted:
                        parts[name] = value
                    elif number is not None and name in ("up", "down"):
                        experts[(name, number)] = value
        return parts, experts, used

    def _release(self, infos: list[TensorInfo]) -> None:
        release = getattr(self.reader, "release", None)
        if release is not None:
            for info in infos:
                release(info)

    def _engine(self) -> ResponseEngine:
        """This thread's engine: its conversion buffer is reused from tensor to tensor."""
        engine: ResponseEngine | None = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = ResponseEngine(torch.device("cpu"), 0, whole=False)
        return engine

    def _attention(self, layer: int) -> LayerFactors | None:
        """The layer's attention factors in float32: W_o's key/value groups summed block by block as it is converted
        (no float32 copy of the whole W_o), W_v (of a fused projection only its rows) copied; the stored bytes are
        released after. None when a part is missing (check() has ruled that out for usable layers)."""
        parts, _, used = self._gather(layer, _ATTENTION_PARTS, self.reader.raw)
        if self.latent is not None:
            return self._latent_attention(layer, parts, used)
        v, o = parts.get("v"), parts.get("o")
        if v is None or o is None:
            self._release(used)
            return None
        heads, kv, head_dim = self.shape
        if o.is_contiguous():
            grouped = torch.empty((o.shape[0], kv * head_dim), dtype=torch.float32)

            def group(start: int, stop: int, block: torch.Tensor) -> None:
                grouped[start:stop] = group_heads(block, heads, kv, head_dim)

            engine = self._engine()
            engine.load(o)
            engine.each_block(group)
            engine.unload()
        else:  # a transposed view (GPT-2's Conv1D): its rows are not stored rows
            grouped = group_heads(o.to(torch.float32, copy=True), heads, kv, head_dim)
        value = v.to(torch.float32, copy=True) * self.gains(layer)[0][None, :]
        self._release(used)
        return LayerFactors(layer, grouped, value)

    def _latent_attention(self, layer: int, parts: Mapping[str, torch.Tensor], used: list[TensorInfo]
                          ) -> LayerFactors | None:
        """A latent attention block's factors (latent_factors), W_o read in cached row blocks."""
        kv_latent, kv_up, o = (parts.get(n) for n in ("kv_latent", "kv_up", "o"))
        if kv_latent is None or kv_up is None or o is None or self.latent is None:
            self._release(used)
            return None
        engine = self._engine()

        def times_o(x: torch.Tensor) -> torch.Tensor:
            product = _streamed(engine, o, right=x.contiguous())[0]
            assert product is not None
            return product

        latent_gain = self.latent_gains[layer]
        factors = latent_factors(layer, kv_latent[:self.latent[3]].to(torch.float32, copy=True),
                                 kv_up.to(torch.float32, copy=True), times_o,
                                 (self.gains(layer)[0], torch.ones(self.latent[3]) if latent_gain is None
                                  else latent_gain), self.latent)
        self._release(used)
        return factors

    def _mlp_in_frame(self, layer: int, frame: torch.Tensor) -> torch.Tensor:
        """Vᵀ UD V = Σ over the MLP's pieces (Vᵀ W_down)(W_up diag(g) V), read from the stored weights one cached
        block at a time (no float32 copy of a whole weight)."""
        parts, experts, used = self._gather(layer, _MLP_PARTS, self.reader.raw)
        pieces = mlp_pieces({n: v for n, v in parts.items() if n in ("up", "down")}, experts)
        if pieces is None:
            raise InternalError(f"block evidence: layer {layer}'s MLP passed the shape check but could not be read")
        engine = self._engine()
        right = (self.gains(layer)[1][:, None] * frame).contiguous()  # diag(g) V: the gain absorbed on the small side
        left = frame.T.contiguous()
        total = torch.zeros((frame.shape[1], frame.shape[1]), dtype=torch.float32)
        for down, up in pieces:
            read_down = _streamed(engine, down, left=left)[1]
            read_up = _streamed(engine, up, right=right)[0]
            assert read_down is not None and read_up is not None
            total += read_down @ read_up
        self._release(used)
        return total

    def factors(self, layer: int, mlp: bool) -> LayerFactors | None:
        if layer not in self.usable:
            return None
        factors = self.cache.get(layer)
        if factors is None:
            factors = self._attention(layer)
            if factors is not None and not mlp:
                size = (factors.ov_left.numel() + factors.ov_right.numel()) * 4
                with self._lock:
                    if self.cache_bytes + size <= ATTENTION_CACHE_BYTES:
                        self.cache[layer] = factors
                        self.cache_bytes += size
        if factors is None or not mlp:
            return factors
        return replace(factors, mlp_in_frame=lambda frame: self._mlp_in_frame(layer, frame))

    def _attention_fits(self, layer: int, parts: Mapping[str, torch.Tensor]) -> bool:
        """Whether the layer's attention parts have the shapes the config gives them."""
        def shaped(name: str, *shape: int) -> bool:
            return name in parts and tuple(parts[name].shape) == shape

        if self.latent is not None:
            heads, nope, value, rank = self.latent
            gain = self.latent_gains[layer]
            return (shaped("kv_up", heads * (nope + value), rank) and shaped("o", self.width, heads * value)
                    and "kv_latent" in parts and parts["kv_latent"].shape[0] >= rank
                    and parts["kv_latent"].shape[1] == self.width
                    and (gain is None or tuple(gain.shape) == (rank,)))
        heads, kv, head_dim = self.shape
        return shaped("v", kv * head_dim, self.width) and shaped("o", self.width, heads * head_dim)

    def check(self) -> list[int]:
        """Which layers cannot be read (every layer's shapes are checked, from the headers alone)."""
        skipped = []
        for layer in self.plan:
            parts, experts, _ = self._gather(layer, _ATTENTION_PARTS | _MLP_PARTS,
                                             lambda info: torch.empty(info.shape, device="meta"))
            has_attention = self._attention_fits(layer, parts)
            pieces = mlp_pieces({n: v for n, v in parts.items() if n in ("up", "down")}, experts)
            has_mlp = pieces is not None and all(
                up.dim() == 2 and up.shape[1] == self.width and tuple(down.shape) == (self.width, up.shape[0])
                for down, up in pieces)
            gains_fit = all(g is None or tuple(g.shape) == (self.width,) for g in self.stored_gains[layer])
            if has_attention and has_mlp and gains_fit:
                self.usable.append(layer)
            else:
                skipped.append(layer)
        return skipped

    def map(self, mlp: bool, fn: Callable[[LayerFactors], _T]) -> list[_T]:
        """fn over every usable layer's factors, `threads` layers at a time, results in layer order."""
        def one(layer: int) -> _T:
            factors = self.factors(layer, mlp)
            if factors is None:
                raise InternalError(f"block evidence: layer {layer} passed the shape check but could not be read")
            return fn(factors)

        if self.threads <= 1 or len(self.usable) <= 1:
            return [one(layer) for layer in self.usable]
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="tg-blocks") as pool:
            return list(pool.map(one, self.usable))


def _finite(weight: torch.Tensor, info: TensorInfo, artifact: Artifact) -> torch.Tensor:
    if not bool(torch.isfinite(weight).all()):
        raise WeightValueError(f"{info.file}: tensor '{info.name}' holds NaN or infinite values; "
                               f"a fingerprint of it would be meaningless", file=str(artifact.path_of(info.file)))
    return weight


# -- the same units from live parameters, differentiable -----------------------------------------------

def block_units_of_state(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], rank: int = RANK
                         ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (X_l, Y_l)} as differentiable functions of live parameters (HF names): what build_blocks records
    (exact frame; eigenvectors carry gradients), for an adaptive attacker's penalty and for tests."""
    embed = next(n for n, t in state.items() if t.dim() == 2 and naming.global_role(n) == "embed")
    width = int(state[embed].shape[1])
    shape = heads_of(config, width)
    latent = latent_of(config)
    offset = 1.0 if str(config.get("model_type") or "").startswith("gemma") else 0.0
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    experts: dict[int, dict[tuple[str, int], torch.Tensor]] = {}
    gains: dict[int, dict[str, torch.Tensor]] = {}  # layer -> norm leaf -> gain
    for name, tensor in state.items():
        layer = naming.layer_of(name)
        if layer is None or not (name.endswith(".weight") or naming.fused_experts(name)):
            continue
        module = naming.leaf(name)
        if tensor.dim() == 1 and module in naming.ATTN_NORMS + naming.MLP_NORMS + naming.LATENT_NORMS:
            gains.setdefault(layer, {})[module] = tensor + offset
        fused = naming.fused_experts(name)
        if fused is not None and tensor.dim() == 3:
            for number, pieces in enumerate(split_experts(fused, tensor, config)):
                experts.setdefault(layer, {}).update({(n, number): v for n, v in pieces.items() if n in ("up", "down")})
            continue
        part = naming.projection(name) or (naming.latent_projection(name) if latent else None)
        if part is not None and tensor.dim() == 2:
            split = split_parts(part, tensor.T if naming.transposed(config) else tensor, shape)
            expert = naming.expert_of(name)
            if split is None:
                continue
            if expert is None:
                grouped.setdefault(layer, {}).update(split)
            else:
                experts.setdefault(layer, {}).update({(n, expert): v for n, v in split.items() if n in ("up", "down")})
    layers = []
    for layer in sorted(grouped):
        ones = torch.ones(width, dtype=state[embed].dtype)
        g = gains.get(layer, {})
        attn, mlp = (naming.input_norm(g, leaves) for leaves in (naming.ATTN_NORMS, naming.MLP_INPUT_NORMS))
        parts = with_experts({n: v for n, v in grouped[layer].items() if n != "gate"}, experts.get(layer, {}))
        gain_pair = (ones if attn is None else attn, ones if mlp is None else mlp)
        factors = factors_from_parts(layer, parts, gain_pair, shape, width)
        if latent is not None and factors is None and {"kv_latent", "kv_up", "o", "up", "down"} <= set(parts):
            latent_gain = naming.input_norm(g, naming.LATENT_NORMS)
            attention = latent_factors(layer, parts["kv_latent"], parts["kv_up"], partial(torch.matmul, parts["o"]),
                                       (gain_pair[0], torch.ones(latent[3]) if latent_gain is None else latent_gain),
                                       latent)
            factors = replace(attention, ud_left=parts["down"], ud_right=parts["up"] * gain_pair[1][None, :])
        if factors is not None:
            layers.append(factors)
    return block_units(in_memory(layers), width, rank, exact_width=width)[0]
