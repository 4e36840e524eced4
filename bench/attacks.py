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

    vocab = int(probe.get("vocab", probe.get("rows", 0))) if isinstance(probe, dict) else 0
    return [int(i) for i in probe_ids(vocab, 32, 0)]


def probe_coefficients(fingerprint: Any, keys: Any) -> torch.Tensor:
    """The k x V matrix C with probe = C @ unit-normalised embedding rows, as an evader computes it from a
    published fingerprint and the token keys of the tokenizer it ships (`token_keys`).

    A mixture probe (tgs2): `sketch.mixture_coefficients` at the published seed and mixture count, zero
    for rows without a key. A row probe (tgs1): its published rows, one-hot.
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
    for chunk in data.split(batch):
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


def penalty_id() -> str:
    """Names the sketch the adaptive models were trained against (in their cache key)."""
    from tg_verify.fingerprint.sketch import SKETCH_VERSION

    return f"library-{SKETCH_VERSION}"


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
