"""Derivations and evasions of a checkpoint, for the lineage bench and tests.

A Checkpoint is a transformers config plus a state dict (bench/zoo.py's module-level derivations
apply through `Checkpoint.model()` and `from_model`). Derivations (fine-tunes, adapter merges,
casts, quantisation, vocabulary growth, layer surgery, merges) change the function; evasions
(permutations, rescaling, rotation, re-publication under another architecture) must not, and
`same_function` checks that they do not before they count.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tg_verify.tiny import save_model


@dataclass
class Checkpoint:
    """A model as config + weights; `model()` rebuilds a float32 torch module from them."""

    config: Any
    state: dict[str, torch.Tensor]

    def clone(self) -> Checkpoint:
        return Checkpoint(copy.deepcopy(self.config), {k: v.detach().clone() for k, v in self.state.items()})

    def model(self) -> torch.nn.Module:
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(self.config)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in self.state.items()}, strict=False)
        tied = getattr(self.config, "tie_word_embeddings", False)
        if unexpected or [m for m in missing if not (tied and m == "lm_head.weight")]:
            raise ValueError(f"state does not fit the config: missing {missing}, unexpected {unexpected}")
        model.eval()
        return model

    def save(self, directory: str | Path, layout: str = "single") -> Path:
        """Write it as a Hugging Face directory, keeping the stored dtype of the weights; no tokenizer (the benches
        write the one their models were trained through, or none on purpose)."""
        dtypes = {v.dtype for v in self.state.values()}
        model = self.model()
        if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
            model = model.to(dtype)
        return save_model(model, directory, layout, vocabulary=False)  # type: ignore[arg-type]

    @property
    def heads(self) -> tuple[int, int, int]:
        c = self.config
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return c.num_attention_heads, kv, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def gemma(self) -> bool:
        return str(self.config.model_type).startswith("gemma")


def from_model(model: torch.nn.Module) -> Checkpoint:
    """Snapshot a transformers model in its dtype (lm_head dropped when tied, as on disk)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return Checkpoint(copy.deepcopy(model.config), state)


def fingerprint_of(ck: Checkpoint, directory: str | Path, layout: str = "single") -> Any:
    """Save `ck` and fingerprint it with the product's extractor (features and sketch), on the CPU."""
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    path = ck.save(directory, layout)
    return fingerprint_artifact(resolve(path), FingerprintSettings(device="cpu"), model_name=Path(path).name)


def sketch_fingerprint_of(ck: Checkpoint, directory: str | Path, layout: str = "single") -> Any:
    """Save `ck` and build only its lineage sketch (what the lineage test reads), for fast tests.

    The paper's features are not computed: they are zero here and must not be compared.
    """
    return sketch_fingerprint_of_folder(ck.save(directory, layout))


def sketch_fingerprint_of_folder(directory: str | Path) -> Any:
    """The lineage evidence of a saved model folder (sketch, with the tokenizer when there is one, and blocks), as a
    Fingerprint whose paper features are zero (not to be compared)."""
    from tg_verify.artifact import open_reader, resolve
    from tg_verify.fingerprint.blocks import build_blocks
    from tg_verify.fingerprint.document import FEATURE_NAMES, Fingerprint
    from tg_verify.fingerprint.sketch import SketchBuilder

    artifact = resolve(Path(directory))
    with open_reader(artifact) as reader:
        builder = SketchBuilder(artifact, reader, None)
        for info, weight in reader.stream():
            builder.add(info, weight)
        sketch = builder.finish()
        blocks = build_blocks(artifact, reader, note=sketch["notes"].append)
    return Fingerprint(model_name=artifact.name, features=dict.fromkeys(FEATURE_NAMES, 0.0),
                       settings={"sketch_only": True}, sketch=sketch, blocks=blocks)


def logits(ckpt: Checkpoint, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ckpt.model()(input_ids=inputs).logits


def same_function(a: Checkpoint, b: Checkpoint, seed: int = 0, tolerance: float = 1e-3) -> float:
    """Max |logit difference| on a few random inputs; raises AssertionError above `tolerance`."""
    vocab = min(a.config.vocab_size, b.config.vocab_size)
    inputs = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(seed))
    la, lb = logits(a, inputs), logits(b, inputs)
    scale = float(la.abs().max())
    diff = float((la - lb[..., :la.shape[-1]]).abs().max())
    if diff > tolerance * max(1.0, scale):
        raise AssertionError(f"transform changed the function: max logit difference {diff:.3g} (scale {scale:.3g})")
    return diff


# ---------------------------------------------------------------- access to blocks (fused or split)

def _p(i: int) -> str:
    return f"model.layers.{i}."


def get_qkv(ck: Checkpoint, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, p = ck.state, _p(i)
    if p + "self_attn.qkv_proj.weight" in s:
        heads, kv, hd = ck.heads
        w = s[p + "self_attn.qkv_proj.weight"]
        return w[:heads * hd], w[heads * hd:(heads + kv) * hd], w[(heads + kv) * hd:]
    return tuple(s[p + f"self_attn.{n}_proj.weight"] for n in "qkv")  # type: ignore[return-value]


def set_qkv(ck: Checkpoint, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    s, p = ck.state, _p(i)
    if p + "self_attn.qkv_proj.weight" in s:
        s[p + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
    else:
        for n, w in zip("qkv", (q, k, v)):
            s[p + f"self_attn.{n}_proj.weight"] = w


def get_gate_up(ck: Checkpoint, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, p = ck.state, _p(i)
    if p + "mlp.gate_up_proj.weight" in s:
        w = s[p + "mlp.gate_up_proj.weight"]
        return w[:w.shape[0] // 2], w[w.shape[0] // 2:]
    return s[p + "mlp.gate_proj.weight"], s[p + "mlp.up_proj.weight"]


def set_gate_up(ck: Checkpoint, i: int, gate: torch.Tensor, up: torch.Tensor) -> None:
    s, p = ck.state, _p(i)
    if p + "mlp.gate_up_proj.weight" in s:
        s[p + "mlp.gate_up_proj.weight"] = torch.cat([gate, up])
    else:
        s[p + "mlp.gate_proj.weight"], s[p + "mlp.up_proj.weight"] = gate, up


def norm_keys(ck: Checkpoint) -> list[tuple[str, list[str]]]:
    """Each RMSNorm gain with the input-side weights it feeds (the head only when untied)."""
    result = []
    for i in range(ck.layers):
        p = _p(i)
        attn = [p + "self_attn.qkv_proj.weight"] if p + "self_attn.qkv_proj.weight" in ck.state else \
            [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        mlp = [p + "mlp.gate_up_proj.weight"] if p + "mlp.gate_up_proj.weight" in ck.state else \
            [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        result += [(p + "input_layernorm.weight", attn), (p + "post_attention_layernorm.weight", mlp)]
    result.append(("model.norm.weight", ["lm_head.weight"] if "lm_head.weight" in ck.state else []))
    return result


def get_gain(ck: Checkpoint, key: str) -> torch.Tensor:
    return ck.state[key] + (1.0 if ck.gemma else 0.0)


def set_gain(ck: Checkpoint, key: str, gain: torch.Tensor) -> None:
    ck.state[key] = gain - (1.0 if ck.gemma else 0.0)


def untie(ck: Checkpoint) -> None:
    """Give a tied model its own lm_head (same values), so the head can change independently."""
    if getattr(ck.config, "tie_word_embeddings", False):
        ck.state["lm_head.weight"] = ck.state["model.embed_tokens.weight"].clone()
        ck.config.tie_word_embeddings = False


# ---------------------------------------------------------------- evasions (function-preserving)

def permute_mlp(ck: Checkpoint, seed: int = 1) -> Checkpoint:
    """Permute every layer's MLP hidden units consistently (gate/up rows, down columns)."""
    out, g = ck.clone(), torch.Generator().manual_seed(seed)
    for i in range(out.layers):
        gate, up = get_gate_up(out, i)
        perm = torch.randperm(gate.shape[0], generator=g)
        set_gate_up(out, i, gate[perm], up[perm])
        key = _p(i) + "mlp.down_proj.weight"
        out.state[key] = out.state[key][:, perm]
    return out


def permute_heads(ck: Checkpoint, seed: int = 2) -> Checkpoint:
    """Permute key/value groups and the query heads inside each group, with o_proj and biases."""
    out, g = ck.clone(), torch.Generator().manual_seed(seed)
    heads, kv, hd = out.heads
    size = heads // kv
    for i in range(out.layers):
        groups = torch.randperm(kv, generator=g)
        q_order = torch.cat([groups[a] * size + torch.randperm(size, generator=g) for a in range(kv)])
        q_rows = (q_order[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_rows = (groups[:, None] * hd + torch.arange(hd)).reshape(-1)
        q, k, v = get_qkv(out, i)
        set_qkv(out, i, q[q_rows], k[kv_rows], v[kv_rows])
        p = _p(i) + "self_attn."
        for n, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            if p + f"{n}_proj.bias" in out.state:
                out.state[p + f"{n}_proj.bias"] = out.state[p + f"{n}_proj.bias"][rows]
        out.state[p + "o_proj.weight"] = out.state[p + "o_proj.weight"][:, q_rows]
    return out


def scale_mlp_units(ck: Checkpoint, seed: int = 6) -> Checkpoint:
    """Scale each MLP unit's up row by s and its down column by 1/s (gated MLPs are linear in up)."""
    out, g = ck.clone(), torch.Generator().manual_seed(seed)
    for i in range(out.layers):
        gate, up = get_gate_up(out, i)
        scale = torch.exp(torch.randn(up.shape[0], generator=g))
        set_gate_up(out, i, gate, up * scale[:, None])
        key = _p(i) + "mlp.down_proj.weight"
        out.state[key] = out.state[key] / scale[None, :]
    return out


def mix_attention(ck: Checkpoint, seed: int = 7) -> Checkpoint:
    """Per key/value group: q *= a, k /= a (scores unchanged), v -> A v, o -> o A^-1 (A invertible)."""
    out, g = ck.clone(), torch.Generator().manual_seed(seed)
    heads, kv, hd = out.heads
    size = heads // kv
    for i in range(out.layers):
        q, k, v = (w.clone() for w in get_qkv(out, i))
        p = _p(i) + "self_attn."
        o = out.state[p + "o_proj.weight"].clone()
        for group in range(kv):
            a = float(torch.exp(torch.randn(1, generator=g)))
            mix = torch.eye(hd, dtype=torch.float64) + 0.5 * torch.randn(hd, hd, generator=g, dtype=torch.float64)
            rows = slice(group * hd, (group + 1) * hd)
            q_rows = slice(group * size * hd, (group + 1) * size * hd)
            q[q_rows] *= a
            k[rows] /= a
            v[rows] = (mix @ v[rows].double()).float()
            for key, sl, factor in (("q", q_rows, a), ("k", rows, 1 / a)):
                if p + f"{key}_proj.bias" in out.state:
                    out.state[p + f"{key}_proj.bias"][sl] *= factor
            if p + "v_proj.bias" in out.state:
                out.state[p + "v_proj.bias"][rows] = (mix @ out.state[p + "v_proj.bias"][rows].double()).float()
            inverse = torch.linalg.inv(mix)
            for head in range(group * size, (group + 1) * size):
                cols = slice(head * hd, (head + 1) * hd)
                o[:, cols] = (o[:, cols].double() @ inverse).float()
        set_qkv(out, i, q, k, v)
        out.state[p + "o_proj.weight"] = o
    return out


def _residual_maps(ck: Checkpoint) -> tuple[list[str], list[str], list[str]]:
    """(weights that read the residual stream: columns, weights that write it: rows, norm gains)."""
    readers = [w for _, ws in norm_keys(ck) for w in ws]
    writers = [_p(i) + n for i in range(ck.layers) for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight")]
    return readers, writers, [n for n, _ in norm_keys(ck)]


def permute_residual(ck: Checkpoint, seed: int = 3) -> Checkpoint:
    """Permute the hidden dimension across every tensor (embedding, readers, writers, gains)."""
    out = ck.clone()
    perm = torch.randperm(out.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    readers, writers, gains = _residual_maps(out)
    out.state["model.embed_tokens.weight"] = out.state["model.embed_tokens.weight"][:, perm]
    for key in readers:
        out.state[key] = out.state[key][:, perm]
    for key in writers:
        out.state[key] = out.state[key][perm]
    for key in gains:
        out.state[key] = out.state[key][perm]
    return out


def rescale_through_norms(ck: Checkpoint, seed: int = 4) -> Checkpoint:
    """Per-channel rescaling: every norm gain g -> g*s, the weights it feeds W -> W diag(1/s)."""
    out, g = ck.clone(), torch.Generator().manual_seed(seed)
    untie(out)
    for gain_key, weights in norm_keys(out):
        scale = torch.exp(torch.randn(out.config.hidden_size, generator=g) * 0.7)
        set_gain(out, gain_key, get_gain(out, gain_key) * scale)
        for key in weights:
            out.state[key] = out.state[key] / scale[None, :]
    return out


def rotate_residual(ck: Checkpoint, seed: int = 5) -> Checkpoint:
    """Orthogonal rotation of the residual stream after absorbing every norm gain into its readers."""
    out = ck.clone()
    untie(out)
    d = out.config.hidden_size
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    for gain_key, weights in norm_keys(out):
        gain = get_gain(out, gain_key).double()
        for key in weights:
            out.state[key] = (out.state[key].double() * gain[None, :]).float()
        set_gain(out, gain_key, torch.ones(d))
    readers, writers, _ = _residual_maps(out)
    for key in ["model.embed_tokens.weight", *readers]:
        out.state[key] = (out.state[key].double() @ q).float()
    for key in writers:
        out.state[key] = (q.T @ out.state[key].double()).float()
    return out


def republish(ck: Checkpoint) -> Checkpoint:
    """The same function under another model_type: phi3 -> llama (fused projections split),
    gemma -> llama (gains and embedding scale made explicit), qwen2 -> llama (biases kept),
    mistral -> llama, llama -> mistral."""
    import transformers

    c = ck.config
    out = ck.clone()
    heads, kv, hd = ck.heads
    common = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                  "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                  "head_dim": hd, "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
                  "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                  "tie_word_embeddings": getattr(c, "tie_word_embeddings", False),
                  "hidden_act": getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", "silu")}
    kind = c.model_type
    if kind == "llama":
        # head_dim only where it is not hidden_size / heads (a model grown by bench/attacks.dead_units)
        out.config = transformers.MistralConfig(**{k: v for k, v in common.items()
                                                   if k != "head_dim" or hd * heads != c.hidden_size},
                                                sliding_window=None)
        return out
    if kind == "qwen2":
        common["attention_bias"] = True
        for i in range(out.layers):
            out.state[_p(i) + "self_attn.o_proj.bias"] = torch.zeros(c.hidden_size)
    if kind == "phi3":
        for i in range(out.layers):
            q, k, v = get_qkv(ck, i)
            gate, up = get_gate_up(ck, i)
            p = _p(i)
            del out.state[p + "self_attn.qkv_proj.weight"], out.state[p + "mlp.gate_up_proj.weight"]
            for n, w in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                         ("mlp.gate_proj", gate), ("mlp.up_proj", up)):
                out.state[p + n + ".weight"] = w.clone()
    if ck.gemma:
        untie(out)
        for key, _ in norm_keys(out):
            out.state[key] = ck.state[key] + 1.0
        normaliser = torch.tensor(c.hidden_size ** 0.5, dtype=torch.float32)
        out.state["model.embed_tokens.weight"] = ck.state["model.embed_tokens.weight"] * normaliser
        common["tie_word_embeddings"] = False
    out.config = transformers.LlamaConfig(**common)
    return out


# ---------------------------------------------------------------- derivations (change the function)
# Fine-tunes, LoRA merges, casts and int8 round trips are bench/zoo.py's (on modules); these add
# what the zoo lacks: IA3 merges, vocabulary growth, layer surgery and weight averaging.

def ia3_merge(model: torch.nn.Module, tokens: torch.Tensor, steps: int, lr: float, seed: int, **kwargs: int
              ) -> torch.nn.Module:
    """IA3 on attention k/v and the MLP down projection of a copy of `model`, trained, then merged."""
    from peft import IA3Config, get_peft_model

    from bench.zoo import train

    torch.manual_seed(seed)
    fused = any(name.endswith("qkv_proj") for name, _ in model.named_modules())
    targets = ["qkv_proj", "down_proj"] if fused else ["k_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(target_modules=targets,
                                                                feedforward_modules=["down_proj"]))
    train(peft_model, tokens, steps, lr, seed, **kwargs)
    return peft_model.merge_and_unload()


def extend_vocab(ck: Checkpoint, extra: int, seed: int) -> Checkpoint:
    """Grow embedding (and head) by `extra` rows initialised around the mean row, as tokenizer
    extensions do."""
    out = ck.clone()
    g = torch.Generator().manual_seed(seed)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in out.state:
            w = out.state[key]
            new = w.mean(0, keepdim=True) + w.std(0, keepdim=True) * 0.1 * torch.randn(extra, w.shape[1], generator=g)
            out.state[key] = torch.cat([w, new])
    out.config.vocab_size = ck.config.vocab_size + extra
    return out


def _renumber(ck: Checkpoint, order: list[int]) -> Checkpoint:
    out = ck.clone()
    kept = {k: v for k, v in out.state.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(order):
        prefix = _p(old)
        kept.update({_p(new) + k[len(prefix):]: v.clone() for k, v in out.state.items() if k.startswith(prefix)})
    out.state = kept
    out.config.num_hidden_layers = len(order)
    if getattr(out.config, "layer_types", None):
        out.config.layer_types = [out.config.layer_types[0]] * len(order)
    return out


def drop_layer(ck: Checkpoint, index: int) -> Checkpoint:
    return _renumber(ck, [i for i in range(ck.layers) if i != index])


def duplicate_layer(ck: Checkpoint, index: int) -> Checkpoint:
    order = list(range(ck.layers))
    return _renumber(ck, order[:index + 1] + [index] + order[index + 1:])


def average(a: Checkpoint, b: Checkpoint) -> Checkpoint:
    """Uniform weight average (model soup) of two checkpoints of one architecture."""
    out = a.clone()
    out.state = {k: (a.state[k].float() + b.state[k].float()) / 2 for k in a.state}
    return out


def redraw_rows(ck: Checkpoint, ids: list[int], seed: int) -> Checkpoint:
    """Re-draw embedding rows `ids` (and an untied head's) from each matrix's own per-column mean and spread: the
    cheap way to strip evidence carried by a few token rows. A tied head follows the embedding."""
    out, g = ck.clone(), torch.Generator().manual_seed(seed)
    index = torch.as_tensor(sorted(set(ids)), dtype=torch.long)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in out.state:
            weight = out.state[key].clone()
            work = weight.float()
            mean, spread = work.mean(0, keepdim=True), work.std(0, keepdim=True)
            weight[index] = (mean + spread * torch.randn(len(index), work.shape[1], generator=g)).to(weight.dtype)
            out.state[key] = weight
    return out


def relabel(ck: Checkpoint, order: torch.Tensor) -> Checkpoint:
    """Renumber the vocabulary: token i's embedding (and head) row moves to id order[i]. With the tokenizer
    rewritten to match (bench/lineage.py's write_tokenizer) the model reads and writes the same text."""
    out = ck.clone()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in out.state:
            moved = torch.empty_like(out.state[key])
            moved[order] = out.state[key]
            out.state[key] = moved
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(out.config, name, None)
        if isinstance(value, int) and 0 <= value < len(order):
            setattr(out.config, name, int(order[value]))
    return out


def same_function_relabelled(a: Checkpoint, b: Checkpoint, order: torch.Tensor, seed: int = 0,
                             tolerance: float = 1e-3) -> float:
    """Like `same_function`, for a relabelled `b`: the same text (ids mapped through `order`) gives the same
    next-token probabilities (logits mapped back)."""
    inputs = torch.randint(0, len(order), (3, 12), generator=torch.Generator().manual_seed(seed))
    la, lb = logits(a, inputs), logits(b, order[inputs])[..., order]
    scale = float(la.abs().max())
    diff = float((la - lb).abs().max())
    if diff > tolerance * max(1.0, scale):
        raise AssertionError(f"relabelling changed the function: max logit difference {diff:.3g} (scale {scale:.3g})")
    return diff


EVASIONS: dict[str, Callable[[Checkpoint], Checkpoint]] = {
    "permute-mlp": permute_mlp,
    "permute-heads": permute_heads,
    "permute-residual": permute_residual,
    "rescale-norms": rescale_through_norms,
    "rotate-residual": rotate_residual,
    "republish": republish,
    # beyond the list: rescalings inside blocks that also leave the function unchanged
    "scale-mlp-units": scale_mlp_units,
    "mix-attention": mix_attention,
}


def all_evasions(ck: Checkpoint) -> Checkpoint:
    """Every evasion at once, in sequence."""
    for transform in (permute_mlp, permute_heads, permute_residual, rescale_through_norms, rotate_residual,
                      scale_mlp_units, mix_attention):
        ck = transform(ck)
    return republish(ck)

