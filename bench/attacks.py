"""Attacks on the lineage evidence, for bench/evasion.py and tests/bench/test_attacks.py.

An evader holds a derivative of a base and wants `tg-verify compare` to say "not derived" while the
model keeps working. Each attack here takes a `bench.transforms.Checkpoint` (config + weights) and
returns a new one, deterministic for its seed:

* row re-draws: embedding rows (tied head rows follow; untied head rows too when asked) replaced by
  draws from the matrix's own per-column statistics, or given noise of a stated size relative to
  each row's norm ("100% noise": noise as large as the row);
* vocabulary relabelling: token ids permuted (embedding and head rows moved with them) and the
  tokenizer rewritten to match, so text in gives the same probabilities out; partial relabelling
  moves a stated fraction of the ids;
* the differentiable sketch similarity an adaptive attacker fine-tunes against (`SketchPenalty`).

Function preservation is not assumed: `text_level_difference` measures it through the tokenizers
for relabelling, and bench/transforms.py's `same_function` for the re-parameterisations.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bench.transforms import Checkpoint

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def seed_of(*parts: object) -> int:
    """A stable 31-bit seed from names (attack, architecture, strength)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


# -- which rows --------------------------------------------------------------------------------------

def public_probe(fingerprint: Any) -> list[int]:
    """The token ids a published fingerprint's sketch says it probes (sketch tgs1 published 32): what an
    evader reads to aim. A sketch that publishes none (tgs2 mixes every row) gets tgs1's 32 ids.
    """
    sketch = getattr(fingerprint, "sketch", None) or {}
    probe = sketch.get("probe") if isinstance(sketch, dict) else None
    ids = probe.get("ids") if isinstance(probe, dict) else None
    if isinstance(ids, list) and ids:
        return sorted(int(i) for i in ids)
    from tg_verify.fingerprint.sketch import probe_ids

    vocab = int(probe.get("vocab") or probe.get("rows") or 0) if isinstance(probe, dict) else 0
    return [int(i) for i in probe_ids(vocab, 32, 0)]


def probe_coefficients(fingerprint: Any, keys: Any) -> torch.Tensor:
    """The k x V matrix C with probe = C @ unit-normalised embedding rows, as an evader computes it from a
    published fingerprint and the token keys of the tokenizer it ships (`token_keys`).

    A mixture probe (tgs2, tgs3): `sketch.mixture_coefficients` at the published seed and mixture count,
    zero for rows without a key (tgs3 then flattens these mixtures along the embedding's leading
    directions, a fixed linear map for given weights). A row probe (tgs1): its published rows, one-hot.
    """
    from tg_verify.fingerprint.sketch import mixture_coefficients

    probe = (getattr(fingerprint, "sketch", None) or {}).get("probe") or {}
    if "mixtures" in probe:
        c = mixture_coefficients(keys.keys, int(probe["mixtures"]), int(probe.get("seed", 0))) * keys.present[None, :]
        return torch.from_numpy(c).to(torch.float64)
    ids = public_probe(fingerprint)
    onehot = torch.zeros(len(ids), len(keys.keys), dtype=torch.float64)
    onehot[torch.arange(len(ids)), torch.as_tensor(ids)] = 1.0
    return onehot


def token_keys(tokenizer_json: Any, vocab: int) -> Any:
    """The per-row token keys the fingerprint derives from a tokenizer.json beside the weights."""
    from tg_verify.fingerprint.tokens import tokenizer_keys

    return tokenizer_keys(tokenizer_json, vocab)


def random_rows(vocab: int, fraction: float, seed: int) -> list[int]:
    """round(fraction * vocab) distinct ids, seeded; nested (a larger fraction keeps the smaller's ids)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:round(fraction * vocab)].tolist())


# -- row re-draws --------------------------------------------------------------------------------------

def redraw_rows(ck: Checkpoint, ids: Sequence[int], seed: int, *, noise: float | None = None,
                head: bool = False) -> Checkpoint:
    """Replace embedding rows `ids` (and, with `head`, an untied head's rows) in a copy of `ck`.

    noise=None: each row re-drawn from the matrix's own statistics (Gaussian with its per-column mean
    and standard deviation over all rows). noise=s: the row kept plus Gaussian noise whose expected
    norm is s times the row's norm (s=1: "100% noise"). A tied head follows the embedding.
    """
    out = ck.clone()
    index = torch.as_tensor(sorted({int(i) for i in ids}), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    keys = [EMBED] + ([HEAD] if head and HEAD in out.state else [])
    for key in keys:
        weight = out.state[key]
        work = weight.float()
        rows = work[index]
        if noise is None:
            mean, std = work.mean(0, keepdim=True), work.std(0, keepdim=True)
            new = mean + std * torch.randn(rows.shape, generator=generator)
        else:
            scale = noise * rows.norm(dim=1, keepdim=True) / math.sqrt(rows.shape[1])
            new = rows + scale * torch.randn(rows.shape, generator=generator)
        updated = weight.clone()
        updated[index] = new.to(weight.dtype)
        out.state[key] = updated
    return out


def redraw_directions(ck: Checkpoint, coefficients: torch.Tensor, seed: int, strength: float = 1.0,
                      iterations: int = 4) -> Checkpoint:
    """Move the probe VECTORS of a mixture probe (probe = C @ unit-normalised embedding rows) towards
    random ones with the minimum-norm edit of the embedding: an evader who can compute C.

    target = P + strength * (R - P), R Gaussian with P's row norms; each iteration adds C+ (target -
    C @ rows) to the unit rows (pseudo-inverse: the smallest change) and normalises them again, as the
    sketch does. Row norms are kept. A tied head follows. With one-hot C (a row probe) only the probe
    rows move, each towards a random direction.
    """
    out = ck.clone()
    weight = out.state[EMBED]
    work = weight.double()
    norms = work.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit = work / norms
    c = coefficients.double()
    if c.shape[1] != unit.shape[0]:
        raise ValueError(f"coefficients cover {c.shape[1]} tokens, the embedding has {unit.shape[0]} rows")
    probe = c @ unit
    noise = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = noise / noise.norm(dim=1, keepdim=True) * probe.norm(dim=1, keepdim=True)
    target = probe + strength * (noise - probe)
    pinv = torch.linalg.pinv(c)
    current = unit
    for _ in range(iterations):  # step towards the target, back onto unit rows (what the sketch reads)
        current = current + pinv @ (target - c @ current)
        current = current / current.norm(dim=1, keepdim=True).clamp_min(1e-12)
    edited = current * norms
    out.state[EMBED] = edited.to(weight.dtype)
    return out


# -- dead capacity: units and blocks whose contributions cancel ----------------------------------------
# Function-preserving edits that no re-parameterisation of bench/transforms.py covers: they add weights
# that read the residual stream but whose outputs cancel in pairs, so any evidence read from one matrix
# alone (a Gram of the gate, the heads' query-key forms, top singular directions of an input projection)
# moves, while evidence read from products that sum over units (down @ up, o @ v) does not.

def _random_rotations(hd: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`count` invertible hd x hd maps that commute with rotary position embeddings (a scaled 2-D rotation
    on each rotary pair (i, i + hd/2)), well conditioned (scales in [0.5, 2])."""
    half = hd // 2
    out = []
    for _ in range(count):
        angle = 2 * math.pi * torch.rand(half, generator=generator, dtype=torch.float64)
        scale = torch.exp((torch.rand(half, generator=generator, dtype=torch.float64) - 0.5) * 2 * math.log(2))
        m = torch.zeros(hd, hd, dtype=torch.float64)
        idx = torch.arange(half)
        m[idx, idx] = scale * torch.cos(angle)
        m[idx, idx + half] = -scale * torch.sin(angle)
        m[idx + half, idx] = scale * torch.sin(angle)
        m[idx + half, idx + half] = scale * torch.cos(angle)
        out.append(m)
    return out


def _rows_like(weight: torch.Tensor, count: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """`count` Gaussian rows whose expected norm is `scale` x the matrix's mean row norm."""
    norm = float(weight.float().norm(dim=1).mean())
    return torch.randn(count, weight.shape[1], generator=generator, dtype=torch.float64) * scale * norm \
        / math.sqrt(weight.shape[1])


def _cancelling_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, pairs: int, scale: float,
                    generator: torch.Generator, *, keep: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, up and down with `pairs` pairs of new units appended (or, keep=False, only the new units):
    unit one (g, u, d), unit two (g, u / a, -a d) for a random a, so their outputs and their share of
    down @ up cancel exactly."""
    g = _rows_like(gate, pairs, scale, generator)
    u = _rows_like(up, pairs, scale, generator)
    d = _rows_like(down.T, pairs, scale, generator).T
    a = torch.exp((torch.rand(pairs, generator=generator, dtype=torch.float64) - 0.5) * 2 * math.log(3))
    a = a * torch.where(torch.rand(pairs, generator=generator) < 0.5, -1.0, 1.0).double()
    new_gate, new_up, new_down = torch.cat([g, g]), torch.cat([u, u / a[:, None]]), torch.cat([d, -d * a[None, :]], 1)
    if not keep:
        return new_gate.to(gate.dtype), new_up.to(up.dtype), new_down.to(down.dtype)
    return (torch.cat([gate, new_gate.to(gate.dtype)]), torch.cat([up, new_up.to(up.dtype)]),
            torch.cat([down, new_down.to(down.dtype)], 1))


def _cancelling_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      biases: dict[str, torch.Tensor], shape: tuple[int, int, int], pairs: int, scale: float,
                      generator: torch.Generator, *, keep: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """q, k, v, o (and q/k/v biases) with `pairs` pairs of new key/value groups appended (or, keep=False,
    only the new ones): group two is group one with q -> A q, k -> A^-T k (same scores; A commutes with
    rotary embeddings), v -> B v and o -> -o B^-1, so the pair's outputs and its share of o @ v cancel."""
    heads, kv, hd = shape
    size = heads // kv
    new_q, new_k, new_v, new_o = [], [], [], []
    new_b: dict[str, list[torch.Tensor]] = {n: [] for n in biases}
    def per_head(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # m applied to each head's slice of x
        return torch.cat([m @ x[h * hd:(h + 1) * hd] for h in range(x.shape[0] // hd)])

    for a, b in zip(_random_rotations(hd, pairs, generator), _random_rotations(hd, pairs, generator)):
        qg = _rows_like(q, size * hd, scale, generator)
        kg, vg = _rows_like(k, hd, scale, generator), _rows_like(v, hd, scale, generator)
        og = _rows_like(o.T, size * hd, scale, generator).T
        a_inv_t, b_inv = torch.linalg.inv(a).T, torch.linalg.inv(b)
        qg2 = per_head(a, qg)
        og2 = torch.cat([-og[:, h * hd:(h + 1) * hd] @ b_inv for h in range(size)], 1)
        new_q += [qg, qg2]
        new_k += [kg, a_inv_t @ kg]
        new_v += [vg, b @ vg]
        new_o += [og, og2]
        for n, bias in biases.items():
            bg = torch.randn(size * hd if n == "q" else hd, generator=generator, dtype=torch.float64) \
                * float(bias.float().std())
            mapped = per_head({"q": a, "k": a_inv_t, "v": b}[n], bg)
            new_b[n] += [bg, mapped]
    parts = [torch.cat(new_q), torch.cat(new_k), torch.cat(new_v), torch.cat(new_o, 1)]
    olds = [q, k, v, o]
    if keep:
        parts = [torch.cat([old, new.to(old.dtype)], 1 if i == 3 else 0)
                 for i, (old, new) in enumerate(zip(olds, parts))]
        extra = {n: torch.cat([biases[n], torch.cat(new_b[n]).to(biases[n].dtype)]) for n in biases}
    else:
        parts = [new.to(old.dtype) for old, new in zip(olds, parts)]
        extra = {n: torch.cat(new_b[n]).to(biases[n].dtype) for n in biases}
    return parts[0], parts[1], parts[2], parts[3], extra


def _layer_biases(ck: Checkpoint, i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}.self_attn."
    return {n: ck.state[p + f"{n}_proj.bias"] for n in "qkv" if p + f"{n}_proj.bias" in ck.state}


def dead_units(ck: Checkpoint, fraction: float, scale: float, seed: int) -> Checkpoint:
    """Every block grows by `fraction` of its MLP units and of its key/value groups, added in cancelling
    pairs (`_cancelling_mlp`, `_cancelling_heads`) with weights `scale` x the block's own row norms:
    the function is unchanged (checked by the bench), the model is larger."""
    from bench.transforms import get_gate_up, get_qkv, set_gate_up, set_qkv

    out = ck.clone()
    generator = torch.Generator().manual_seed(seed)
    heads, kv, hd = out.heads
    unit_pairs = max(1, round(fraction * out.config.intermediate_size / 2))
    group_pairs = max(1, round(fraction * kv / 2))
    while group_pairs > 1 and out.config.hidden_size % (heads + 2 * group_pairs * (heads // kv)):
        group_pairs -= 1  # transformers' configs insist that the width be a multiple of the head count
    for i in range(out.layers):
        p = f"model.layers.{i}."
        gate, up = get_gate_up(out, i)
        gate, up, down = _cancelling_mlp(gate, up, out.state[p + "mlp.down_proj.weight"], unit_pairs, scale, generator)
        set_gate_up(out, i, gate, up)
        out.state[p + "mlp.down_proj.weight"] = down
        q, k, v = get_qkv(out, i)  # split with the old head counts (phi3 fuses them)
        q, k, v, o, biases = _cancelling_heads(q, k, v, out.state[p + "self_attn.o_proj.weight"], _layer_biases(out, i),
                                               (heads, kv, hd), group_pairs, scale, generator)
        set_qkv(out, i, q, k, v)
        out.state[p + "self_attn.o_proj.weight"] = o
        out.state.update({p + f"self_attn.{n}_proj.bias": b for n, b in biases.items()})
    size = heads // kv
    out.config.intermediate_size += 2 * unit_pairs
    out.config.num_key_value_heads = kv + 2 * group_pairs
    out.config.num_attention_heads = heads + 2 * group_pairs * size
    out.config.head_dim = hd
    return out


def dead_blocks(ck: Checkpoint, scale: float, seed: int) -> Checkpoint:
    """A block inserted after every block, every one of its attention groups and MLP units in cancelling
    pairs (random norm gains too): each inserted block adds exactly nothing to the residual stream, and
    no two of the original blocks are adjacent any more."""
    from bench.transforms import get_gate_up, get_qkv, set_gate_up, set_qkv

    out = ck.clone()
    generator = torch.Generator().manual_seed(seed)
    heads, kv, hd = out.heads
    if kv % 2 or out.config.intermediate_size % 2:
        raise ValueError("dead_blocks pairs up key/value groups and MLP units: both counts must be even")
    layers = out.layers
    state = {k: v for k, v in out.state.items() if not k.startswith("model.layers.")}
    for i in range(layers):
        old, new, dead = f"model.layers.{i}.", f"model.layers.{2 * i}.", f"model.layers.{2 * i + 1}."
        block = {k[len(old):]: v for k, v in out.state.items() if k.startswith(old)}
        state.update({new + k: v.clone() for k, v in block.items()})
        gate, up = get_gate_up(out, i)
        gate, up, down = _cancelling_mlp(gate, up, out.state[old + "mlp.down_proj.weight"],
                                         out.config.intermediate_size // 2, scale, generator, keep=False)
        q, k, v = get_qkv(out, i)
        q, k, v, o, biases = _cancelling_heads(q, k, v, out.state[old + "self_attn.o_proj.weight"],
                                               _layer_biases(out, i), (heads, kv, hd), kv // 2, scale, generator,
                                               keep=False)
        shell = Checkpoint(out.config, {})
        if "mlp.gate_up_proj.weight" in block:
            shell.state["model.layers.0.mlp.gate_up_proj.weight"] = torch.cat([gate, up])
        else:
            set_gate_up(shell, 0, gate, up)
        if "self_attn.qkv_proj.weight" in block:
            shell.state["model.layers.0.self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
        else:
            set_qkv(shell, 0, q, k, v)
        shell.state["model.layers.0.mlp.down_proj.weight"] = down
        shell.state["model.layers.0.self_attn.o_proj.weight"] = o
        shell.state.update({f"model.layers.0.self_attn.{n}_proj.bias": b for n, b in biases.items()})
        for name, tensor in block.items():  # norm gains (and any other vector): random, positive
            if tensor.dim() == 1 and name.endswith("norm.weight"):
                gains = torch.exp(torch.randn(tensor.shape, generator=generator) * 0.5).to(tensor.dtype)
                shell.state["model.layers.0." + name] = gains - (1.0 if ck.gemma else 0.0)
        state.update({dead + k[len("model.layers.0."):]: v for k, v in shell.state.items()})
    out.state = state
    out.config.num_hidden_layers = 2 * layers
    if getattr(out.config, "layer_types", None):
        out.config.layer_types = [out.config.layer_types[0]] * (2 * layers)
    out.config.head_dim = hd
    return out


# -- vocabulary relabelling ---------------------------------------------------------------------------

def relabelling(vocab: int, fraction: float, seed: int) -> torch.Tensor:
    """A permutation p (old id -> new id) that moves exactly round(fraction * vocab) ids (none stays put
    among them): the chosen ids, in seeded random order, each take the next one's id (one cycle)."""
    moved = random_rows(vocab, fraction, seed)
    perm = torch.arange(vocab)
    if len(moved) < 2:
        return perm
    order = torch.as_tensor(moved)[torch.randperm(len(moved), generator=torch.Generator().manual_seed(seed + 1))]
    perm[order] = torch.roll(order, -1)
    return perm


def relabel(ck: Checkpoint, perm: torch.Tensor) -> Checkpoint:
    """Move token i's embedding (and head) row to id perm[i]; special-token ids in the config follow."""
    out = ck.clone()
    for key in (EMBED, HEAD):
        if key in out.state:
            weight = out.state[key]
            moved = torch.empty_like(weight)
            moved[perm] = weight
            out.state[key] = moved
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(out.config, name, None)
        if isinstance(value, int) and 0 <= value < len(perm):
            setattr(out.config, name, int(perm[value]))
    return out


def relabel_tokenizer(tokenizer_json: str, perm: torch.Tensor) -> str:
    """tokenizer.json rewritten so every token string maps to its new id (vocab and added tokens)."""
    document = json.loads(tokenizer_json)
    model = document["model"]
    if model.get("type") not in (None, "BPE", "WordPiece", "WordLevel") or not isinstance(model.get("vocab"), dict):
        raise ValueError("relabel_tokenizer handles tokenizers whose model holds a {token: id} vocab")
    mapping = perm.tolist()
    model["vocab"] = {token: mapping[i] for token, i in model["vocab"].items()}
    for added in document.get("added_tokens") or []:
        added["id"] = mapping[added["id"]]
    if document.get("post_processor") is not None:
        raise ValueError("relabel_tokenizer does not rewrite post-processor ids")
    return json.dumps(document, ensure_ascii=False)


def reencode_tokenizer(tokenizer_json: str, seed: int) -> str:
    """The same tokenizer with every token STRING re-encoded and the same ids: text -> ids -> text unchanged.

    A seeded substitution of characters within their pre-tokenizer class (upper-case letters, lower-case
    letters outside the contractions' s t r e v m l d, digits, punctuation other than the apostrophe) is
    applied to the text by a normalizer and to every vocab and merge string; the decoder undoes it. The
    byte-level regex splits substituted text at the same places, so the ids are those of the original.
    """
    import string

    from tokenizers import Tokenizer, decoders, normalizers

    classes = [list(string.ascii_uppercase), [c for c in string.ascii_lowercase if c not in "strevmld"],
               list(string.digits), [c for c in string.punctuation if c != "'"]]
    generator = torch.Generator().manual_seed(seed)
    sigma: dict[str, str] = {}
    for chars in classes:
        order = [chars[i] for i in torch.randperm(len(chars), generator=generator).tolist()]
        sigma.update(zip(order, order[1:] + order[:1]))  # one cycle: no character keeps its place
    hold = {c: chr(0xE000 + n) for n, c in enumerate(sigma)}  # private-use stand-ins: no chained replacements
    tokenizer = Tokenizer.from_str(tokenizer_json)
    if tokenizer.normalizer is not None:
        raise ValueError("reencode_tokenizer expects a tokenizer without a normalizer")
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(c, hold[c]) for c in sigma] + [normalizers.Replace(hold[c], sigma[c]) for c in sigma])
    tokenizer.decoder = decoders.Sequence(
        [tokenizer.decoder] + [decoders.Replace(sigma[c], hold[c]) for c in sigma]
        + [decoders.Replace(hold[c], c) for c in sigma])
    document = json.loads(tokenizer.to_str())

    def encoded(token: str) -> str:
        return "".join(sigma.get(ch, ch) for ch in token)

    special = {t["content"] for t in document.get("added_tokens") or [] if t.get("special")}
    model = document["model"]
    model["vocab"] = {token if token in special else encoded(token): i for token, i in model["vocab"].items()}
    model["merges"] = [[encoded(a) for a in m] if isinstance(m, list) else " ".join(encoded(a) for a in m.split(" "))
                       for m in model.get("merges", [])]
    for added in document.get("added_tokens") or []:
        if not added.get("special"):
            added["content"] = encoded(added["content"])
    return json.dumps(document, ensure_ascii=False)


def text_level_difference(a: Checkpoint, tokenizer_a: Any, b: Checkpoint, tokenizer_b: Any, text: str,
                          mapping: torch.Tensor) -> float:
    """Max |logit difference| between two (model, tokenizer) pairs on `text`, under a claimed token
    correspondence `mapping` (a's id -> b's id), which is checked rather than trusted.

    Raises AssertionError unless: b's tokenizer turns the text into the mapped ids of a's, both give the
    text back, and every token of a decodes to the same text as its image in b.
    """
    vocab = tokenizer_a.get_vocab_size()
    if sorted(mapping.tolist()) != list(range(vocab)) or tokenizer_b.get_vocab_size() != vocab:
        raise AssertionError("the claimed correspondence is not a permutation of the vocabulary")
    ids_a = torch.tensor(tokenizer_a.encode(text).ids)
    ids_b = torch.tensor(tokenizer_b.encode(text).ids)
    if ids_a.shape != ids_b.shape or not torch.equal(mapping[ids_a], ids_b):
        raise AssertionError("the second tokenizer does not turn the text into the corresponding ids")
    if tokenizer_b.decode(ids_b.tolist()) != tokenizer_a.decode(ids_a.tolist()):
        raise AssertionError("the two tokenizers do not decode the text alike")
    for i in range(vocab):
        if tokenizer_b.decode([int(mapping[i])]) != tokenizer_a.decode([i]):
            raise AssertionError(f"token {i} does not stand for the same text on both sides")
    with torch.no_grad():
        logits_a = a.model()(input_ids=ids_a[None]).logits
        logits_b = b.model()(input_ids=ids_b[None]).logits
    return float((logits_b[..., mapping] - logits_a).abs().max())


# -- tokenizer and perplexity -------------------------------------------------------------------------

def train_tokenizer(text: str, vocab: int) -> Any:
    """A byte-level BPE tokenizer with `vocab` ids (one special `<unk>`), trained on `text` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return tokenizer


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, context: int = 128, windows: int = 200,
               batch: int = 25) -> float:
    """exp(mean next-token NLL) over the first `windows` non-overlapping windows of `context` tokens."""
    count = min(windows, (len(tokens)) // context)
    if count < 1:
        raise ValueError(f"too few tokens ({len(tokens)}) for one window of {context}")
    data = tokens[:count * context].reshape(count, context)
    model.eval()
    total, n = 0.0, 0
    for chunk in torch.split(data, batch):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        targets = chunk[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                         reduction="sum"))
        n += targets.numel()
    return math.exp(total / n)


# -- the adaptive attacker's view of the sketch -------------------------------------------------------
# The library's own differentiable sketch units (tg_verify.fingerprint.sketch.sketch_units) and per-unit
# similarity (tg_verify.analysis.lineage.unit_similarities): the attacker optimises against exactly what
# `tg-verify compare` computes, with the public seed and the keys of the tokenizer it ships.

def library_units(keys: Any) -> Callable[[Checkpoint, int], dict[tuple[str, int | None], torch.Tensor]]:
    """units(checkpoint, probe seed): the library's differentiable sketch units, with the shipped keys."""
    from tg_verify.fingerprint.sketch import sketch_units

    def units(ck: Checkpoint, seed: int) -> dict[tuple[str, int | None], torch.Tensor]:
        return sketch_units(ck.state, ck.config.to_dict(), keys, seed=seed)
    return units


def penalty_id(base: Checkpoint, other: Checkpoint, keys: Any) -> str:
    """Names what the adaptive models were trained against (in their cache key): the sketch version and a
    digest of what the library's units and similarities compute on two models at seeds 0 and 2, so a
    change of the method's numbers (not only of its version string) retrains them."""
    from tg_verify.analysis.lineage import unit_similarities
    from tg_verify.fingerprint.sketch import SKETCH_VERSION

    units = library_units(keys)
    digest = hashlib.sha256(SKETCH_VERSION.encode())
    with torch.no_grad():
        for seed in (0, 2):
            mine, theirs = units(base, seed), units(other, seed)
            for key in sorted(mine, key=str):
                digest.update(f"{key}".encode() + np.round(mine[key].double().numpy(), 3).tobytes())
            sims = unit_similarities(theirs, mine)
            for key in sorted(sims, key=str):
                digest.update(f"{key}:{float(sims[key]):.3f}".encode())
    return f"library-{SKETCH_VERSION}-{digest.hexdigest()[:10]}"


class SketchPenalty:
    """weight x mean over units of similarity² to the base's sketch: pushes every unit towards "unrelated".

    `seeds_per_step=0` aims at the public probe seed 0; n > 0 draws n fresh probe seeds (>= 2) at every
    call and averages over them, the attacker's answer to a probe seed drawn at verify time. Called on
    the model being fine-tuned (bench/zoo.train's `penalty`); the base's units are computed once per seed.
    """

    def __init__(self, base: Checkpoint, weight: float,
                 units: Callable[[Checkpoint, int], dict[tuple[str, int | None], torch.Tensor]],
                 seeds_per_step: int = 0, seed: int = 0) -> None:
        from tg_verify.analysis.lineage import unit_similarities

        self.base, self.weight, self.units, self.similarities = base, weight, units, unit_similarities
        self.seeds_per_step = seeds_per_step
        self.generator = torch.Generator().manual_seed(seed)
        self.config = base.config
        self._references: dict[int, dict[tuple[str, int | None], torch.Tensor]] = {}

    def reference(self, seed: int) -> dict[tuple[str, int | None], torch.Tensor]:
        if seed not in self._references:
            with torch.no_grad():
                self._references[seed] = {k: v.detach() for k, v in self.units(self.base, seed).items()}
        return self._references[seed]

    def similarity(self, model: torch.nn.Module, seed: int = 0) -> dict[tuple[str, int | None], torch.Tensor]:
        live = Checkpoint(self.config, dict(model.named_parameters()))
        return self.similarities(self.units(live, seed), self.reference(seed))

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        seeds = [0] if self.seeds_per_step == 0 else \
            torch.randint(2, 2**31, (self.seeds_per_step,), generator=self.generator).tolist()
        sims = torch.stack([v for seed in seeds for v in self.similarity(model, seed).values()])
        return self.weight * sims.pow(2).mean()

    def median(self, model: torch.nn.Module, seed: int = 0) -> float:
        """The median same-layer similarity of `model` at a probe seed (close to the test's score), for logs."""
        with torch.no_grad():
            return float(np.median([float(v) for v in self.similarity(model, seed).values()]))


# -- the adaptive attacker's view of the block evidence ------------------------------------------------
# The library's own differentiable block units (tg_verify.fingerprint.blocks.block_units_of_state: the exact
# frame, eigenvectors carrying gradients) and its score's pieces (tg_verify.analysis.blocks: fit_rotation,
# centred, pearson): the attacker fits the rotations as the test does, without gradient, and pushes the
# correlation of the units they map towards 0, what an unrelated model scores.

BlockStacks = tuple[torch.Tensor, torch.Tensor]  # [L, r, r] attention OV units, [L, r, r] MLP down-up units


def block_stacks(ck: Checkpoint, rank: int | None = None) -> BlockStacks:
    """A checkpoint's block units (X_l, Y_l) stacked in layer order, differentiable in its live parameters, in a
    frame of `rank` columns (None: the library's)."""
    from tg_verify.fingerprint.blocks import RANK, block_units_of_state

    units = block_units_of_state(ck.state, ck.config.to_dict(), RANK if rank is None else rank)
    layers = sorted(units)
    return torch.stack([units[n][0] for n in layers]), torch.stack([units[n][1] for n in layers])


def _centred(m: torch.Tensor) -> torch.Tensor:
    """analysis.blocks.centred in torch: the units without their identity part, flattened."""
    r = m.shape[-1]
    trace = m.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    return (m - trace / r * torch.eye(r, dtype=m.dtype)).reshape(*m.shape[:-2], r * r)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """analysis.blocks.pearson in torch."""
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return (a @ b) / torch.sqrt((a @ a) * (b @ b)).clamp_min(1e-30)


def fit_direction(fit_c: np.ndarray, fit_r: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The rotation T (r x r) and the matched layers with which the block score maps a candidate's units of one
    kind onto a reference's: a proportional layer map, a first fit, the monotone alignment of the fitted units,
    a refit (analysis.blocks, numpy, no gradient)."""
    from tg_verify.analysis.alignment import align_layers
    from tg_verify.analysis.blocks import centred, fit_rotation, pearson

    lc, lr = len(fit_c), len(fit_r)
    pairs = [(0, 0)] if lc == 1 or lr == 1 else sorted({(c, round(c * (lr - 1) / (lc - 1))) for c in range(lc)})
    t = fit_rotation(np.stack([fit_c[c] for c, _ in pairs]), np.stack([fit_r[r] for _, r in pairs]))
    if lc > 1 and lr > 1:
        mapped, reference = centred(t @ fit_c @ t.T), centred(fit_r)
        sims = np.array([[pearson(a, b) for b in reference] for a in mapped])
        mask = align_layers(sims)
        pairs = [(int(c), int(r)) for c, r in zip(*np.nonzero(mask))] or pairs
        t = fit_rotation(np.stack([fit_c[c] for c, _ in pairs]), np.stack([fit_r[r] for _, r in pairs]), t)
    return t, pairs


class BlockPenalty:
    """weight x mean over the block score's two directions of its correlation²: pushes the cross-fitted
    block score against the base towards 0.

    Each direction fits its rotation on one kind of unit (attention OV, then MLP down-up) as
    analysis.blocks.block_score does, detached (numpy), every `refit_every` calls; the correlation of the
    other kind's mapped units with the base's (identity part removed) is differentiable in the live
    parameters, through the frame's eigenvectors (`block_units_of_state`). `score(model)` is the block
    score itself (the two directions' mean), as the test computes it from float16-stored units. `rank`: the
    frame's width the attacker aims at (None: the one the fingerprint stores).
    """

    def __init__(self, base: Checkpoint, weight: float, refit_every: int = 1, rank: int | None = None) -> None:
        self.rank = rank
        with torch.no_grad():
            ov, ud = block_stacks(base, rank)
        self.reference = (ov.double().numpy(), ud.double().numpy())
        self.targets = (_centred(ov.double()), _centred(ud.double()))
        self.weight, self.refit_every, self.config = weight, refit_every, base.config
        self.calls = 0
        self._fits: tuple[tuple[np.ndarray, list[tuple[int, int]]], ...] | None = None

    def directions(self, model: torch.nn.Module, refit: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit on OV, score MLP down-up; fit on down-up, score OV): each a differentiable correlation."""
        ov, ud = block_stacks(Checkpoint(self.config, dict(model.named_parameters())), self.rank)
        live = (ov.double(), ud.double())
        if refit or self._fits is None:
            mine = tuple(m.detach().numpy() for m in live)
            self._fits = tuple(fit_direction(mine[k], self.reference[k]) for k in (0, 1))
        out = []
        for fit, test in ((0, 1), (1, 0)):
            t, pairs = self._fits[fit]
            rotation = torch.from_numpy(t)
            mapped = torch.cat([_centred(rotation @ live[test][c] @ rotation.T) for c, _ in pairs])
            out.append(_pearson(mapped, torch.cat([self.targets[test][r] for _, r in pairs])))
        return out[0], out[1]

    def score(self, model: torch.nn.Module) -> torch.Tensor:
        forward, backward = self.directions(model)
        return (forward + backward) / 2

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        refit = self.calls % self.refit_every == 0
        self.calls += 1
        forward, backward = self.directions(model, refit)
        return self.weight * (forward.pow(2) + backward.pow(2)).float() / 2


class Penalties:
    """The sum of several penalties (the sketch's and the blocks' at once: the decision is an OR of both)."""

    def __init__(self, *penalties: Callable[[torch.nn.Module], torch.Tensor]) -> None:
        self.penalties = penalties

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        return torch.stack([p(model) for p in self.penalties]).sum()


def block_penalty_id(base: Checkpoint, other: Checkpoint) -> str:
    """Names what the block-adaptive models were trained against (in their cache key): the block evidence's
    version and a digest of what the library's block units and the penalty compute on two models."""
    from tg_verify.fingerprint.blocks import BLOCKS_VERSION

    digest = hashlib.sha256(BLOCKS_VERSION.encode())
    with torch.no_grad():
        for ck in (base, other):
            for stack in block_stacks(ck):
                digest.update(np.round(stack.double().numpy(), 3).tobytes())
        digest.update(f"{float(BlockPenalty(base, 1.0).score(other.model())):.3f}".encode())
    return f"blocks-{BLOCKS_VERSION}-{digest.hexdigest()[:10]}"
