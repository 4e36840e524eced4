"""Evasion bench: can a supplier strip the lineage evidence cheaply? Score beside damage, per attack class.

For each tiny architecture, a base is trained through a real byte-level BPE tokenizer (512 ids,
tokenizer.json beside the weights), and a derivative of it is fine-tuned: the model an evader wants
to ship as "not derived". Every attack starts from that derivative, at growing strength:

* probe: the 32 rows sketch tgs1 probed and published (noise of 25% to 200% of each row's norm,
  re-drawn, re-drawn with the untied head's rows too), and the probe vectors themselves moved
  towards random ones by the minimum-norm edit of the embedding (for a mixture probe, an edit of
  every row, computed from the published seed and the shipped tokenizer's keys);
* random rows: a growing fraction of all embedding rows re-drawn from the embedding's own
  statistics, or given 100% noise;
* relabelling: a growing fraction of token ids permuted (embedding and head rows moved), with the
  tokenizer rewritten to match (function-preserving at the text level, checked), with none shipped
  (against a base fingerprinted with or without its tokenizer), or with its token strings re-encoded;
* repair: an attack, then a full fine-tune on the derivative's data (and the fine-tune alone);
* dead capacity: MLP units and key/value groups added to every block, or a whole block inserted after
  every block, in pairs whose outputs cancel exactly (function unchanged, checked; the model grows);
* adaptive: a fine-tune whose loss adds weight x mean squared unit similarity to the base's sketch
  (the library's own differentiable sketch units and per-unit similarity), at the public probe seed or
  averaged over fresh seeds drawn every step; or weight x the squared block score against the base (the
  library's own differentiable block units, rotations fitted as the test fits them), from the derivative
  and from the re-initialised embedding; or both penalties at once.

Each attacked model is also passed through every function-preserving re-parameterisation of
bench/transforms.py at once (checked). Scores come from the public path: the attacked folder is
fingerprinted as `tg-verify fingerprint` does and tested against the base's fingerprint as
`tg-verify compare` does, so a re-run measures the current method; a third score has both sides
sketched at a probe seed no attack aimed at. Beside each, the block score against the base (the block
evidence, which never reads tokens: the fingerprint's own once it carries one, else built from the folder
as the library builds it), plain and re-parameterised. Damage is the held-out perplexity (text no model was
trained on) relative to the un-attacked derivative's.

    nice -n 10 .venv/bin/python bench/evasion.py [--archs llama gemma] [--quick] [--figure docs/evasion.png]
    .venv/bin/python bench/evasion.py --report WORK/<digest>/results.json   # an earlier (or cut) run's table

Prints a Markdown table; writes WORK/<digest>/results.json (after every architecture) and the figure.
Trained models are cached in WORK/<digest>/models (the digest covers every training knob); attacked
models are rebuilt and re-fingerprinted on every run (seconds).
"""

from __future__ import annotations

import os

# numpy's OpenBLAS would start a thread per core for each small SVD of the block score's rotation fits: on a
# busy machine a 64 x 64 SVD then takes 0.1 s instead of 1 ms (set before numpy is first imported)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import attacks as A
from bench import transforms as T
from bench.lineage import load_checkpoint
from bench.zoo import corpus, fine_tune
from tg_verify.analysis.blocks import ParsedBlocks, block_score, parse_blocks
from tg_verify.analysis.lineage import lineage_test
from tg_verify.analysis.lineage_rule import is_derived
from tg_verify.fingerprint.blocks import RANK
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.tiny import ARCHITECTURES, build_model, one_thread

DAMAGE_LIMIT = 1.5  # the target: no attack within 1.5x held-out perplexity may pass as "not derived"
PRIVATE_SEED = 1  # a probe seed the attacker did not aim at (every attack aims at seed 0)
RELABEL_TOLERANCE = 1e-4  # max |logit difference| at the text level for a relabelling to count
PROBE_NOISE = (0.25, 0.5, 1.0, 2.0)
ROW_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
RELABEL_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
PROBE_DIRECTIONS = (0.25, 0.5, 1.0)
DEAD_UNITS = ((1.0, 1.0), (1.0, 4.0), (4.0, 4.0))  # (units added per block, as a share of its own; weight scale)
DEAD_BLOCK_SCALE = 4.0
NAN = float("nan")
WIDE_RANK = 64  # a frame wider than the fingerprint's (r = 32; parse_blocks accepts up to 64): a diagnostic column


@dataclass(frozen=True)
class Recipe:
    """Every knob of the trained models; its digest keys the model cache."""

    corpus_bytes: int = 1_200_000
    heldout_bytes: int = 200_000
    vocab: int = 512
    size: str = "medium"
    batch: int = 16
    context: int = 64
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    derive_steps: int = 30  # the supplier's own fine-tune: the "un-attacked derivative"
    derive_lr: float = 3e-4
    repair_steps: tuple[int, ...] = (50, 200)
    long_repair_steps: int = 500  # the re-initialised embedding gets a longer repair too
    repair_lr: float = 1e-3
    adaptive_steps: int = 100
    adaptive_lr: float = 1e-3
    adaptive_weights: tuple[float, ...] = (0.0, 0.1, 1.0, 10.0, 100.0)
    any_seed_weights: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)  # the penalty averaged over fresh seeds
    reinit_weight: float = 10.0  # the re-initialised embedding repaired with the fresh-seed penalty
    block_weights: tuple[float, ...] = (1.0, 10.0, 100.0)  # the block penalty, from the derivative
    both_weights: tuple[float, ...] = (10.0, 100.0)  # block weights beside the fresh-seed sketch penalty ...
    any_seed_both: float = 10.0  # ... at this weight
    reinit_block_weights: tuple[float, ...] = (10.0,)  # the re-initialised embedding repaired with the block penalty
    wide_weight: float = 10.0  # the block penalty aimed at a frame of WIDE_RANK (from the derivative)
    seeds_per_step: int = 4
    eval_context: int = 128  # evaluation only: not in the digest
    eval_windows: int = 100

    def digest(self) -> str:
        # evaluation knobs change no model; grid values (steps, weights) are in each model's directory name
        training = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_DIGEST}
        return hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:12]


_NOT_IN_DIGEST = {"eval_context", "eval_windows", "repair_steps", "long_repair_steps", "adaptive_weights",
                  "any_seed_weights", "seeds_per_step", "reinit_weight", "block_weights", "both_weights",
                  "any_seed_both", "reinit_block_weights", "wide_weight"}


QUICK = Recipe(corpus_bytes=200_000, heldout_bytes=60_000, pretrain_steps=60, derive_steps=10, repair_steps=(20,),
               long_repair_steps=40,
               adaptive_steps=20, adaptive_weights=(0.0, 10.0), any_seed_weights=(10.0,), eval_windows=40,
               block_weights=(10.0,), both_weights=(10.0,))


@dataclass
class Attacked:
    """One attacked model, ready to save: weights, the tokenizer shipped with it (None: none shipped),
    the tokenizer its perplexity is measured through, and the function check it passed."""

    checkpoint: T.Checkpoint
    shipped: Any
    evaluated: Any
    check: str = ""
    reference: str = "base"  # "bare": test against the base fingerprinted without its tokenizer.json


@dataclass
class Subject:
    """One architecture's trained models and what every attack on its derivative is measured against."""

    arch: str
    base: T.Checkpoint
    twin: T.Checkpoint
    derived: T.Checkpoint
    references: dict[tuple[str, int], Fingerprint]  # (base with tokenizer | "bare" without, probe seed)
    blocks: ParsedBlocks | None  # the base's block evidence (no tokens: the same with or without tokenizer.json)
    wide: ParsedBlocks | None  # the same in a frame of WIDE_RANK
    probe: list[int]  # tgs1's published probe rows
    keys: Any  # token keys of the tokenizer the evader ships
    ppl: float  # the un-attacked derivative's held-out perplexity


@dataclass
class Row:
    arch: str
    group: str
    attack: str
    strength: str
    order: float
    ppl: float = float("nan")
    ppl_ratio: float = float("nan")
    score: float = float("nan")
    threshold: float = float("nan")
    p_value: float = float("nan")
    calibration: str = ""  # the reference's calibration class, or "uncalibrated"
    rate: float = float("nan")  # share of that class's null at or above the score, and its 95% upper bound
    rate_upper: float = float("nan")
    null_size: int = 0
    derived: bool = False
    comparable: bool = True
    reparam_score: float = float("nan")
    reparam_derived: bool = False
    reparam_comparable: bool = True
    private_score: float = float("nan")
    private_derived: bool = False
    private_comparable: bool = True
    block_score: float = float("nan")  # cross-fitted block score against the base (nan: no block evidence)
    block_threshold: float = float("nan")  # the test's block threshold (nan: the test had none)
    sketch_derived: bool = False  # each evidence alone above its threshold, by the library's own rule
    block_derived: bool = False
    reparam_block_score: float = float("nan")
    wide_block_score: float = float("nan")  # the same in a frame of WIDE_RANK, which no attack but one aims at
    check: str = ""
    notes: list[str] = field(default_factory=list)
    roles: dict[str, float] = field(default_factory=dict)  # median similarity per unit role, public seed


# -- the public scoring path ---------------------------------------------------------------------------

def fingerprint(directory: Path, name: str, seed: int = 0) -> Fingerprint:
    """What `tg-verify fingerprint DIR` computes (CPU); `seed` is the sketch's probe seed (0: the public
    default; verify draws another per run for `model:` references when the policy asks for a random one)."""
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    return fingerprint_artifact(resolve(directory), FingerprintSettings(device="cpu", sketch_seed=seed),
                                model_name=name)


def lineage(candidate: Fingerprint, reference: Fingerprint) -> Any:
    """What `tg-verify compare CANDIDATE REFERENCE` reports as lineage."""
    return lineage_test(candidate, reference)


def blocks_of(fp: Fingerprint | None, directory: Path, rank: int | None = None) -> ParsedBlocks | None:
    """The block evidence of a fingerprinted folder: the fingerprint's own `blocks` once it records one, else
    built from the folder as the library builds it (`build_blocks`, in a frame of `rank` when given); None when
    the model has none."""
    blocks = getattr(fp, "blocks", None) if rank is None else None
    if blocks is None:
        from tg_verify.artifact import open_reader, resolve
        from tg_verify.fingerprint.blocks import RANK, build_blocks

        artifact = resolve(directory)
        with open_reader(artifact) as reader:
            blocks = build_blocks(artifact, reader, rank=RANK if rank is None else rank)
    return None if blocks is None else parse_blocks(blocks, str(directory))


def block_score_against(candidate: ParsedBlocks | None, reference: ParsedBlocks | None) -> float:
    """The block score of `candidate` against `reference` (nan when either has no block evidence or the
    two are not comparable)."""
    if candidate is None or reference is None:
        return float("nan")
    score = block_score(candidate, reference).score
    return float("nan") if score is None else score


def save(ck: T.Checkpoint, tokenizer: Any, directory: Path) -> Path:
    if directory.exists():
        shutil.rmtree(directory)
    ck.save(directory)
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
    return directory


# -- the bench -------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, recipe: Recipe, log: Callable[[str], None]) -> None:
        self.recipe, self.log = recipe, log
        self.work = work / recipe.digest()
        self.scratch = self.work / "scratch"
        (self.work / "models").mkdir(parents=True, exist_ok=True)
        text = {part: bytes(corpus(part, recipe.heldout_bytes if part == "lora" else recipe.corpus_bytes)
                            .to(torch.uint8).numpy()).decode("utf-8", errors="replace")
                for part in ("pretrain", "light", "lora")}
        path = self.work / "tokenizer.json"
        if path.exists():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(path))
        else:
            self.tokenizer = A.train_tokenizer(text["pretrain"], recipe.vocab)
            self.tokenizer.save(str(path))
        # pretraining text, the supplier's (and the attacker's) fine-tuning text, held-out text for perplexity
        self.tokens = {part: A.encode(self.tokenizer, t) for part, t in text.items()}
        self.heldout_text = text["lora"]
        self.rows: list[Row] = []
        self.perplexities: dict[str, dict[str, float]] = {}

    # models ------------------------------------------------------------------------------------------

    def trained(self, name: str, make: Callable[[], T.Checkpoint]) -> T.Checkpoint:
        """A cached trained model (with the bench tokenizer beside it)."""
        directory = self.work / "models" / name
        if not (directory / "config.json").exists():
            started = time.perf_counter()
            partial = directory.with_name(directory.name + ".partial")
            save(make(), self.tokenizer, partial)
            partial.rename(directory)
            self.log(f"  trained {name} in {time.perf_counter() - started:.1f}s")
        return load_checkpoint(directory)

    def ppl(self, ck: T.Checkpoint, tokenizer: Any) -> float:
        r = self.recipe
        return A.perplexity(ck.model(), A.encode(tokenizer, self.heldout_text), r.eval_context, r.eval_windows)

    # one architecture --------------------------------------------------------------------------------

    def run_arch(self, arch: str) -> None:
        """Train (or reload) the architecture's models, then measure every attack on its derivative."""
        self.log(f"{arch}:")
        subject = self._prepare(arch)
        self.measure(subject, "control", "none (the derivative)", "-", 0, self._plain(subject.derived))
        self.measure(subject, "control", "independent twin", "-", 0, self._plain(subject.twin))
        redrawn_probe_head = self._probe_attacks(subject)
        redrawn = self._row_attacks(subject)
        self._relabellings(subject)
        self._dead_capacity(subject)
        self._repairs(subject, {
            "fine-tune only": (subject.derived, "none", self.recipe.repair_steps),
            "probe re-draw + head, fine-tune": (redrawn_probe_head, ",".join(map(str, subject.probe)),
                                                self.recipe.repair_steps),
            "25% rows re-drawn, fine-tune": (redrawn[0.25], "0.25", self.recipe.repair_steps),
            "100% rows re-drawn, fine-tune": (redrawn[1.0], "1.0",
                                              (*self.recipe.repair_steps, self.recipe.long_repair_steps)),
        })
        self._adaptive(subject, redrawn[1.0])
        self._adaptive_blocks(subject, redrawn[1.0])
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _prepare(self, arch: str) -> Subject:
        r = self.recipe

        def pretrain(kind: str) -> T.Checkpoint:
            model = build_model(arch, seed=A.seed_of(arch, kind), size=r.size, vocab_size=r.vocab)
            return T.from_model(fine_tune(model, self.tokens["pretrain"], r.pretrain_steps, r.pretrain_lr,
                                          A.seed_of(arch, kind, "data"), batch=r.batch, context=r.context))

        base = self.trained(f"{arch}/base", lambda: pretrain("base"))
        twin = self.trained(f"{arch}/twin", lambda: pretrain("twin"))
        derived = self.trained(f"{arch}/derived",
                               lambda: self.fine_tune(arch, base, r.derive_steps, r.derive_lr, "derive"))
        base_dir = self.work / "models" / arch / "base"
        bare = save(base, None, self.scratch / "base-without-tokenizer")
        reference = fingerprint(base_dir, f"{arch}-base")
        references = {("base", 0): reference,
                      ("bare", 0): fingerprint(bare, f"{arch}-base (no tokenizer.json)"),
                      ("base", PRIVATE_SEED): fingerprint(base_dir, f"{arch}-base", PRIVATE_SEED),
                      ("bare", PRIVATE_SEED): fingerprint(bare, f"{arch}-base (no tokenizer.json)", PRIVATE_SEED)}
        subject = Subject(arch, base, twin, derived, references, blocks_of(reference, base_dir),
                          blocks_of(None, base_dir, WIDE_RANK),
                          probe=A.public_probe(references[("base", 0)]),
                          keys=A.token_keys(self.work / "tokenizer.json", r.vocab),  # the evader ships this one
                          ppl=self.ppl(derived, self.tokenizer))
        untrained = T.from_model(build_model(arch, seed=0, size=r.size, vocab_size=r.vocab))
        self.perplexities[arch] = {"base": self.ppl(base, self.tokenizer), "derivative": subject.ppl,
                                   "twin": self.ppl(twin, self.tokenizer), "untrained": self.ppl(untrained,
                                                                                                 self.tokenizer)}
        self.log(f"  held-out perplexity {self.perplexities[arch]}; {len(subject.probe)} public probe ids")
        return subject

    def fine_tune(self, arch: str, ck: T.Checkpoint, steps: int, lr: float, *parts: object, **extra: Any
                  ) -> T.Checkpoint:
        """A full fine-tune on the derivative's data (the supplier's and the attacker's), seeded by `parts`."""
        r = self.recipe
        return T.from_model(fine_tune(ck.model(), self.tokens["light"], steps, lr, A.seed_of(arch, *parts),
                                      batch=r.batch, context=r.context, **extra))

    def _plain(self, ck: T.Checkpoint) -> Attacked:
        return Attacked(ck, self.tokenizer, self.tokenizer)

    def measure(self, subject: Subject, group: str, attack: str, strength: str, order: float, made: Attacked) -> Row:
        """Score one attacked model three ways (plain, re-parameterised, private seed) beside its perplexity."""
        arch = subject.arch
        row = Row(arch, group, attack, strength, order, check=made.check)
        directory = save(made.checkpoint, made.shipped, self.scratch / "candidate")
        fp = fingerprint(directory, f"{arch} {attack} {strength}")
        result = lineage(fp, subject.references[(made.reference, 0)])
        row.block_score = block_score_against(blocks_of(fp, directory), subject.blocks)
        row.block_threshold = float(getattr(result, "block_threshold", NAN))
        row.sketch_derived = bool(result.comparable) and is_derived(score=result.score, threshold=result.threshold)
        row.block_derived = is_derived(score=NAN, threshold=NAN, block_score=row.block_score,
                                       block_threshold=row.block_threshold)
        row.wide_block_score = block_score_against(blocks_of(None, directory, WIDE_RANK), subject.wide)
        row.score, row.threshold, row.p_value = result.score, result.threshold, result.p_value
        row.calibration, row.rate, row.rate_upper, row.null_size = (result.calibration, result.rate,
                                                                    result.rate_upper, result.null_size)
        row.derived, row.comparable, row.notes = result.derived, result.comparable, list(result.notes)
        by_role: dict[str, list[float]] = {}
        for unit in getattr(result, "units", None) or []:
            by_role.setdefault(str(unit.role), []).append(float(unit.similarity))
        row.roles = {role: statistics.median(values) for role, values in by_role.items()}
        hidden = lineage(fingerprint(directory, f"{arch} {attack} {strength}", PRIVATE_SEED),
                         subject.references[(made.reference, PRIVATE_SEED)])
        row.private_score, row.private_derived, row.private_comparable = hidden.score, hidden.derived, \
            hidden.comparable
        row.ppl = self.ppl(made.checkpoint, made.evaluated)
        row.ppl_ratio = row.ppl / subject.ppl
        # the same attack, then every function-preserving re-parameterisation at once (checked)
        evaded = T.all_evasions(made.checkpoint)
        T.same_function(made.checkpoint, evaded)
        directory = save(evaded, made.shipped, self.scratch / "candidate")
        fp = fingerprint(directory, f"{arch} {attack} {strength} re-parameterised")
        again = lineage(fp, subject.references[(made.reference, 0)])
        row.reparam_block_score = block_score_against(blocks_of(fp, directory), subject.blocks)
        row.reparam_score, row.reparam_derived, row.reparam_comparable = again.score, again.derived, \
            again.comparable
        self.rows.append(row)
        verdict = "derived" if row.derived else "NOT derived" if row.comparable else "NOT COMPARABLE"
        self.log(f"  {group:11s} {attack:33s} {strength:10s} ppl x{row.ppl_ratio:6.3f}  score {row.score:6.3f}"
                 f" {verdict:14s} re-param {row.reparam_score:6.3f} private seed {row.private_score:6.3f}"
                 f" threshold {row.threshold:.3f} blocks {row.block_score:6.3f} re-param {row.reparam_block_score:6.3f}"
                 f" threshold {row.block_threshold:.3f}"
                 f" r{WIDE_RANK} {row.wide_block_score:6.3f}"
                 f" roles "
                 + " ".join(f"{role} {value:.2f}" for role, value in row.roles.items()))
        return row

    # attack classes ----------------------------------------------------------------------------------

    def _probe_attacks(self, subject: Subject) -> T.Checkpoint:
        """tgs1's published probe rows (noise, re-draw, + head) and the probe vectors themselves; returns the
        re-draw + head model (repaired later)."""
        arch, derived, probe = subject.arch, subject.derived, subject.probe
        for s in PROBE_NOISE:
            made = A.redraw_rows(derived, probe, A.seed_of(arch, "probe-noise", s), noise=s)
            self.measure(subject, "probe", "probe rows: noise", f"{100 * s:.0f}%", s, self._plain(made))
        redrawn = A.redraw_rows(derived, probe, A.seed_of(arch, "probe-redraw"))
        self.measure(subject, "probe", "probe rows: re-draw", f"{len(probe)} rows", 1, self._plain(redrawn))
        with_head = A.redraw_rows(derived, probe, A.seed_of(arch, "probe-redraw"), head=True)
        self.measure(subject, "probe", "probe rows: re-draw + head", f"{len(probe)} rows", 1, self._plain(with_head))
        coefficients = A.probe_coefficients(subject.references[("base", 0)], subject.keys)
        for s in PROBE_DIRECTIONS:
            made = A.redraw_directions(derived, coefficients, A.seed_of(arch, "directions", s), strength=s)
            self.measure(subject, "probe", "probe vectors: min-norm re-draw", f"{100 * s:g}%", s, self._plain(made))
        return with_head

    def _row_attacks(self, subject: Subject) -> dict[float, T.Checkpoint]:
        """Random rows re-drawn or given 100% noise; returns the re-drawn models by fraction (repaired later)."""
        arch, derived, vocab = subject.arch, subject.derived, self.recipe.vocab
        redrawn: dict[float, T.Checkpoint] = {}
        for f in ROW_FRACTIONS:
            ids = A.random_rows(vocab, f, A.seed_of(arch, "rows"))
            redrawn[f] = A.redraw_rows(derived, ids, A.seed_of(arch, "rows-redraw", f))
            self.measure(subject, "random rows", "random rows: re-draw", f"{100 * f:g}%", f, self._plain(redrawn[f]))
        for f in ROW_FRACTIONS:
            ids = A.random_rows(vocab, f, A.seed_of(arch, "rows"))
            made = A.redraw_rows(derived, ids, A.seed_of(arch, "rows-noise", f), noise=1.0)
            self.measure(subject, "random rows", "random rows: 100% noise", f"{100 * f:g}%", f, self._plain(made))
        return redrawn

    def _dead_capacity(self, subject: Subject) -> None:
        """Units, key/value groups and whole blocks added in pairs whose outputs cancel (checked function-preserving):
        single-matrix evidence moves, products summed over units do not."""
        arch, derived = subject.arch, subject.derived
        size = sum(v.numel() for v in derived.state.values())

        def checked(made: T.Checkpoint) -> Attacked:
            diff = T.same_function(derived, made)
            grown = sum(v.numel() for v in made.state.values()) / size
            return Attacked(made, self.tokenizer, self.tokenizer, f"max logit diff {diff:.1e}, x{grown:.2f} parameters")

        for share, scale in DEAD_UNITS:
            made = A.dead_units(derived, share, scale, A.seed_of(arch, "dead units", share, scale))
            self.measure(subject, "dead capacity", "dead units + heads (cancelling pairs)",
                         f"+{100 * share:g}%, x{scale:g} weights", share * scale, checked(made))
        made = A.dead_blocks(derived, DEAD_BLOCK_SCALE, A.seed_of(arch, "dead blocks"))
        self.measure(subject, "dead capacity", "dead block after every block", f"x{DEAD_BLOCK_SCALE:g} weights", 1,
                     checked(made))

    def _relabelled(self, subject: Subject, f: float, reencode: bool = False) -> Attacked:
        """The derivative with a share f of its ids permuted, the tokenizer rewritten (and its strings re-encoded),
        checked function-preserving at the text level."""
        from tokenizers import Tokenizer

        arch, derived = subject.arch, subject.derived
        perm = A.relabelling(self.recipe.vocab, f, A.seed_of(arch, "relabel", f))
        rewritten = A.relabel_tokenizer(self.tokenizer.to_str(), perm)
        if reencode:
            rewritten = A.reencode_tokenizer(rewritten, A.seed_of(arch, "reencode"))
        made, tokenizer = A.relabel(derived, perm), Tokenizer.from_str(rewritten)
        diff = A.text_level_difference(derived, self.tokenizer, made, tokenizer, self.heldout_text[:4000], perm)
        if diff > RELABEL_TOLERANCE:
            raise AssertionError(f"{arch}: relabelling {f} changed the function (max logit diff {diff:.3g})")
        return Attacked(made, tokenizer, tokenizer, f"text-level max diff {diff:.1e}")

    def _relabellings(self, subject: Subject) -> None:
        """Ids permuted (rows moved), tokenizer rewritten, withheld (against a base with or without one), or its
        token strings re-encoded."""
        for f in RELABEL_FRACTIONS:
            made = self._relabelled(subject, f)
            self.measure(subject, "relabelling", "relabel + tokenizer", f"{100 * f:g}%", f, made)
        for f in (0.0, *RELABEL_FRACTIONS):  # 0%: the derivative itself, its tokenizer withheld
            made = self._relabelled(subject, f)
            made.shipped = None
            self.measure(subject, "relabelling", "relabel, no tokenizer", f"{100 * f:g}%", f, made)
        for f in (0.0, 0.5, 1.0):
            made = self._relabelled(subject, f)
            made.shipped, made.reference = None, "bare"
            self.measure(subject, "relabelling", "relabel, no tokenizer either side", f"{100 * f:g}%", f, made)
        for f in (0.0, 0.5, 1.0):  # 0%: ids and weights unchanged, only the strings
            made = self._relabelled(subject, f, reencode=True)
            self.measure(subject, "relabelling", "strings re-encoded + relabel", f"{100 * f:g}%", f, made)

    def _repairs(self, subject: Subject, sources: dict[str, tuple[T.Checkpoint, str, tuple[int, ...]]]) -> None:
        """Each source (an attacked model, a key naming the attack, step counts) fine-tuned on the derivative's data."""
        arch, r = subject.arch, self.recipe
        for name, (source, key, grid) in sources.items():
            tag = hashlib.sha256(f"{name}/{key}".encode()).hexdigest()[:8]
            for steps in grid:
                def repair(source: T.Checkpoint = source, steps: int = steps, name: str = name) -> T.Checkpoint:
                    return self.fine_tune(arch, source, steps, r.repair_lr, "repair", name, steps)
                made = self.trained(f"{arch}/repair-{tag}-{steps}", repair)
                self.measure(subject, "repair", name, f"{steps} steps", steps, self._plain(made))

    def _adaptive(self, subject: Subject, reinitialised: T.Checkpoint) -> None:
        """Fine-tunes against the sketch itself: at the public seed, then averaged over fresh seeds every step;
        last, the re-initialised embedding repaired with the fresh-seed penalty (the answer to evidence that does
        not pass through the embedding)."""
        arch, r = subject.arch, self.recipe
        tag = hashlib.sha256(f"{A.penalty_id(subject.base, subject.twin, subject.keys)}".encode()).hexdigest()[:8]
        grid = [(0, w) for w in r.adaptive_weights] + [(r.seeds_per_step, w) for w in r.any_seed_weights]
        for seeds, weight in grid:
            def adapt(weight: float = weight, seeds: int = seeds) -> T.Checkpoint:
                penalty = A.SketchPenalty(subject.base, weight, A.library_units(subject.keys), seeds_per_step=seeds,
                                          seed=A.seed_of(arch, "adaptive seeds"))
                tuned = self.fine_tune(arch, subject.derived, r.adaptive_steps, r.adaptive_lr, "adaptive", weight,
                                       penalty=penalty)
                model = tuned.model()
                self.log(f"  adaptive weight {weight:g}, {seeds or 'public'} seeds: same-layer median similarity "
                         f"{penalty.median(model):.3f} at seed 0, {penalty.median(model, PRIVATE_SEED):.3f} at "
                         f"seed {PRIVATE_SEED}")
                return tuned
            if seeds:
                made = self.trained(f"{arch}/adaptive-{tag}-{seeds}seeds-{weight:g}", adapt)
                self.measure(subject, "adaptive", f"sketch-penalty fine-tune, {seeds} fresh seeds/step",
                             f"weight {weight:g}", weight, self._plain(made))
            else:
                made = self.trained(f"{arch}/adaptive-{tag}-{weight:g}", adapt)
                self.measure(subject, "adaptive", "sketch-penalty fine-tune", f"weight {weight:g}", weight,
                             self._plain(made))

        def repair() -> T.Checkpoint:
            penalty = A.SketchPenalty(subject.base, r.reinit_weight, A.library_units(subject.keys),
                                      seeds_per_step=r.seeds_per_step, seed=A.seed_of(arch, "reinit seeds"))
            return self.fine_tune(arch, reinitialised, r.long_repair_steps, r.repair_lr, "repair",
                                  "100% rows re-drawn, fine-tune", r.long_repair_steps, penalty=penalty)
        made = self.trained(f"{arch}/adaptive-{tag}-reinit-{r.seeds_per_step}seeds-{r.reinit_weight:g}-"
                            f"{r.long_repair_steps}", repair)
        self.measure(subject, "adaptive", "100% rows re-drawn, repair + fresh-seed penalty",
                     f"weight {r.reinit_weight:g}, {r.long_repair_steps} steps", r.long_repair_steps, self._plain(made))


    def _adaptive_blocks(self, subject: Subject, reinitialised: T.Checkpoint) -> None:
        """Fine-tunes against the block evidence: the block penalty alone from the derivative, beside the fresh-seed
        sketch penalty (the decision is an OR of the two), and from the re-initialised embedding (its repair with the
        block penalty: the sketch is already at the null there)."""
        arch, r = subject.arch, self.recipe
        tag = hashlib.sha256(A.block_penalty_id(subject.base, subject.twin).encode()).hexdigest()[:8]
        sketch_id = A.penalty_id(subject.base, subject.twin, subject.keys)
        sketch_tag = hashlib.sha256(f"{sketch_id}".encode()).hexdigest()[:8]  # the sketch-adaptive models' tag

        def sketch_penalty(weight: float, what: str) -> A.SketchPenalty:
            return A.SketchPenalty(subject.base, weight, A.library_units(subject.keys),
                                   seeds_per_step=r.seeds_per_step, seed=A.seed_of(arch, what))

        def tuned(name: str, source: T.Checkpoint, steps: int, lr: float, parts: tuple[object, ...],
                  blocks: A.BlockPenalty, sketch: A.SketchPenalty | None) -> T.Checkpoint:
            def make() -> T.Checkpoint:
                penalty = blocks if sketch is None else A.Penalties(sketch, blocks)
                made = self.fine_tune(arch, source, steps, lr, *parts, penalty=penalty)
                with torch.no_grad():
                    score = float(A.BlockPenalty(subject.base, 1.0).score(made.model()))
                self.log(f"  {name}: block score {score:.3f} (the attacker's own, float32)")
                return made
            return self.trained(f"{arch}/{name}", make)

        for weight in r.block_weights:
            made = tuned(f"adaptive-{tag}-blocks-{weight:g}", subject.derived, r.adaptive_steps, r.adaptive_lr,
                         ("adaptive blocks", weight), A.BlockPenalty(subject.base, weight), None)
            self.measure(subject, "adaptive", "block-penalty fine-tune", f"weight {weight:g}", weight,
                         self._plain(made))
        for weight in r.both_weights:
            made = tuned(f"adaptive-{tag}-{sketch_tag}-both-{r.seeds_per_step}seeds-{r.any_seed_both:g}-{weight:g}",
                         subject.derived, r.adaptive_steps, r.adaptive_lr, ("adaptive both", r.any_seed_both, weight),
                         A.BlockPenalty(subject.base, weight), sketch_penalty(r.any_seed_both, "both seeds"))
            self.measure(subject, "adaptive", f"block + fresh-seed sketch penalty (sketch weight {r.any_seed_both:g})",
                         f"block weight {weight:g}", weight, self._plain(made))
        for weight in r.reinit_block_weights:
            made = tuned(f"adaptive-{tag}-reinit-blocks-{weight:g}-{r.long_repair_steps}", reinitialised,
                         r.long_repair_steps, r.repair_lr, ("repair", "100% rows re-drawn, block penalty", weight),
                         A.BlockPenalty(subject.base, weight), None)
            self.measure(subject, "adaptive", "100% rows re-drawn, repair + block penalty",
                         f"weight {weight:g}, {r.long_repair_steps} steps", weight, self._plain(made))
        # the attacker's answer to a wider frame: aim at it (a frame of r columns nests those of fewer)
        w = r.wide_weight
        made = tuned(f"adaptive-{tag}-blocks-r{WIDE_RANK}-{w:g}", subject.derived, r.adaptive_steps, r.adaptive_lr,
                     ("adaptive blocks", WIDE_RANK, w), A.BlockPenalty(subject.base, w, rank=WIDE_RANK), None)
        self.measure(subject, "adaptive", f"block-penalty fine-tune, aimed at r = {WIDE_RANK}", f"weight {w:g}", w,
                     self._plain(made))


# -- reporting -------------------------------------------------------------------------------------------

def _span(values: list[float], digits: int = 2) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "n/c"
    if len(finite) == 1:
        text = f"{finite[0]:.{digits}f}"
    else:
        text = f"{statistics.median(finite):.{digits}f} ({min(finite):.{digits}f}-{max(finite):.{digits}f})"
    return text + (f", {len(values) - len(finite)} n/c" if len(finite) < len(values) else "")


def evades(row: dict[str, Any]) -> bool:
    """Within the damage limit and not called derived at the public seed, plain or re-parameterised
    ("not comparable" included: it is no "derived")."""
    return bool(row["ppl_ratio"] <= DAMAGE_LIMIT and not (row["derived"] and row["reparam_derived"]))


def evades_private(row: dict[str, Any]) -> bool:
    """Within the damage limit and not called derived when both sides are sketched at a seed the attack
    did not aim at."""
    return bool(row["ppl_ratio"] <= DAMAGE_LIMIT and not row.get("private_derived", row["derived"]))


def grouped(rows: list[dict[str, Any]]) -> list[tuple[tuple[str, str, str], list[dict[str, Any]]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["group"], row["attack"], row["strength"]), []).append(row)
    return list(groups.items())


def _count(members: list[dict[str, Any]], prefix: str) -> str:
    n = len(members)
    text = f"{sum(m[prefix + 'derived'] for m in members)}/{n}"
    not_comparable = sum(not m.get(prefix + "comparable", True) for m in members)
    return text + (f" ({not_comparable} n/c)" if not_comparable else "")


def report(results: dict[str, Any]) -> str:
    rows = results["rows"]
    archs = sorted({r["arch"] for r in rows})
    lines = [f"Architectures: {', '.join(archs)}; per cell the median over them (min-max). Threshold: "
             f"{_span([r['threshold'] for r in rows if r['threshold'] == r['threshold']], 3)}. "
             f"n/c = not comparable (no score). "
             f"'evades' = held-out perplexity within {DAMAGE_LIMIT}x of the un-attacked derivative and not "
             f"called derived (plain or re-parameterised). 'score' = the sketch's, 'blocks' = the block score "
             f"against the base (seed-free; threshold {_span([r.get('block_threshold', NAN) for r in rows], 3)}), "
             f"'r{WIDE_RANK}' the same in a frame of {WIDE_RANK} columns (the fingerprint's has {RANK}); 'derived' "
             f"is lineage_test's decision (either evidence above its threshold), 'sketch / blocks alone' each "
             f"evidence's own.", "",
             f"| class | attack | strength | perplexity ratio | score | blocks | r{WIDE_RANK} | derived | "
             "sketch / blocks alone | re-parameterised: score | blocks | derived | private seed: score | derived | "
             "evades | evades, private seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (group, attack, strength), members in grouped(rows):
        n = len(members)

        def span(key: str, members: list[dict[str, Any]] = members) -> str:
            return _span([m.get(key, NAN) for m in members])
        cells = [group, attack, strength, span("ppl_ratio"), span("score"), span("block_score"),
                 span("wide_block_score"), _count(members, ""),
                 f"{sum(m.get('sketch_derived', False) for m in members)} / "
                 f"{sum(m.get('block_derived', False) for m in members)}",
                 span("reparam_score"), span("reparam_block_score"),
                 _count(members, "reparam_"), span("private_score"), _count(members, "private_"),
                 f"{sum(evades(m) for m in members if m['group'] != 'control')}/{n}",
                 f"{sum(evades_private(m) for m in members if m['group'] != 'control')}/{n}"]
        lines.append("| " + " | ".join(cells) + " |")
    attacked = [m for m in rows if m["group"] != "control"]
    broken = [m for m in attacked if evades(m)]
    unscored = [m for m in broken if not (m.get("comparable", True) and m.get("reparam_comparable", True))]
    lines += ["", f"Attacks within {DAMAGE_LIMIT}x perplexity that the test does not call derived: {len(broken)} of "
              f"{len(attacked)} (architecture x attack x strength), {len(unscored)} of them not comparable."]
    hidden = [m for m in attacked if evades_private(m)]
    lines.append(f"With a private probe seed (both sides sketched at seed {PRIVATE_SEED}, which no attack aimed at): "
                 f"{len(hidden)} of {len(attacked)}, "
                 f"{sum(not m.get('private_comparable', True) for m in hidden)} of them not comparable.")
    scored = [m for m in broken if m not in unscored]
    if scored:
        lowest = min(scored, key=lambda m: min(m["score"], m["reparam_score"]))
        lines.append(f"Lowest such score: {min(lowest['score'], lowest['reparam_score']):.3f} "
                     f"({lowest['arch']}, {lowest['attack']}, {lowest['strength']}, perplexity "
                     f"x{lowest['ppl_ratio']:.3f}).")
    twins = [m.get("block_score", NAN) for m in rows if m["attack"] == "independent twin"]
    lines.append(f"Block score of the independent twins: {_span(twins, 3)}; of the cheap evasions above: "
                 f"{_span([m.get('block_score', NAN) for m in broken], 3) if broken else '-'}.")
    lines.append("Held-out perplexity (untrained / base / un-attacked derivative / twin): " + "; ".join(
        f"{arch} {p['untrained']:.0f} / {p['base']:.2f} / {p['derivative']:.2f} / {p['twin']:.2f}"
        for arch, p in results["perplexities"].items()) + ".")
    lines.append(f"Run time {results['seconds'] / 60:.1f} min ({results['trained']} models trained this run).")
    return "\n".join(lines + roles_table(rows))


def roles_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per unit role, the median (over architectures) of each attacked model's median unit similarity at the
    public seed: which parts of the evidence an attack moves."""
    roles = sorted({role for r in rows for role in r.get("roles", {})})
    if not roles:
        return []
    lines = ["", "Median unit similarity per role (public seed; median over architectures):", "",
             "| class | attack | strength | " + " | ".join(roles) + " |", "|---|---|---|" + "---|" * len(roles)]
    for (group, attack, strength), members in grouped(rows):
        cells = []
        for role in roles:
            values = [m["roles"][role] for m in members if role in m.get("roles", {})]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        lines.append(f"| {group} | {attack} | {strength} | " + " | ".join(cells) + " |")
    return lines


COLOURS = {"probe": "tab:red", "random rows": "tab:orange", "relabelling": "tab:purple", "repair": "tab:blue",
           "adaptive": "tab:green", "dead capacity": "tab:brown", "control": "black"}
X_MAX = 20.0  # perplexity ratios beyond are drawn at the edge
NOT_COMPARABLE_Y = -0.1  # where "not comparable" results are drawn


def figure(results: dict[str, Any], path: Path) -> None:
    """Score vs perplexity ratio per attack (median over architectures; faint: each architecture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5), sharey=True)
    thresholds = [r["threshold"] for r in rows if r["threshold"] == r["threshold"]]
    threshold = statistics.median(thresholds) if thresholds else 0.5
    block_thresholds = [r["block_threshold"] for r in rows if r.get("block_threshold", NAN) == r.get("block_threshold")]
    block_threshold = statistics.median(block_thresholds) if block_thresholds else NAN
    markers = "osD^vP*X<>"

    def x(value: float) -> float:
        return min(value, X_MAX * 0.97)

    def y(value: float) -> float:
        return value if value == value else NOT_COMPARABLE_Y

    for ax, key, title in ((axes[0], "score", "attack alone"),
                           (axes[1], "reparam_score", "attack + every re-parameterisation"),
                           (axes[2], "private_score", f"attack alone, scored at a private seed ({PRIVATE_SEED})"),
                           (axes[3], "block_score", "attack alone: block score")):
        attacks: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for (group, attack, _), members in grouped(rows):
            ratio = statistics.median(m["ppl_ratio"] for m in members)
            score = statistics.median(y(m.get(key, float("nan"))) for m in members)
            attacks.setdefault((group, attack), []).append((members[0]["order"], x(ratio), score))
            ax.scatter([x(m["ppl_ratio"]) for m in members], [y(m.get(key, float("nan"))) for m in members], s=8,
                       alpha=0.25,
                       color=COLOURS[group])
        per_group: dict[str, int] = {}
        for (group, attack), points in attacks.items():
            n = per_group[group] = per_group.get(group, -1) + 1
            points.sort()
            ax.plot([p[1] for p in points], [p[2] for p in points], marker=markers[n % len(markers)],
                    color=COLOURS[group], label=attack, linewidth=1.2, markersize=5,
                    linestyle="-" if n % 2 == 0 else "--")
        line = block_threshold if key == "block_score" else threshold
        if line == line:
            ax.axhline(line, color="grey", linestyle="--", linewidth=1)
        ax.axhline((NOT_COMPARABLE_Y + min(0.0, threshold)) / 2, color="lightgrey", linewidth=0.8)
        ax.text(X_MAX * 0.9, NOT_COMPARABLE_Y, "not comparable", fontsize=7, ha="right", va="center", color="grey")
        ax.axvline(DAMAGE_LIMIT, color="grey", linestyle=":", linewidth=1)
        if line == line:
            ax.fill_between([0.9, DAMAGE_LIMIT], -0.2, line, color="red", alpha=0.06, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlim(0.9, X_MAX)
        ax.set_ylim(-0.17, 1.05)
        ticks = [1, 1.5, 2, 3, 5, 10, 20]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + [f">={X_MAX:g}"])
        ax.minorticks_off()
        ax.set_xlabel("held-out perplexity / un-attacked derivative's (log)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score against the base (lineage test; right: block score)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Evasion bench ({', '.join(sorted({r['arch'] for r in rows}))}): dashed = the evidence's threshold "
                 f"(sketch {threshold:.2f}, blocks {block_threshold:.2f}: medians), dotted = {DAMAGE_LIMIT}x "
                 f"perplexity; shaded = cheap evasion of that evidence alone", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "evasion")
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--quick", action="store_true", help="short training, for a smoke run")
    parser.add_argument("--figure", type=Path, help="where the PNG goes (default WORK/<digest>/evasion.png)")
    parser.add_argument("--report", type=Path, metavar="RESULTS", help="only print the table (and draw the figure) "
                        "of a results.json an earlier run wrote")
    args = parser.parse_args(argv)
    if args.report is not None:
        results = json.loads(args.report.read_text())
        figure(results, args.figure or args.report.with_name("evasion.png"))
        print(report(results))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    with one_thread():
        bench = Bench(args.work, QUICK if args.quick else Recipe(), log)
        before = set((bench.work / "models").rglob("config.json"))
        for n, arch in enumerate(args.archs):
            bench.run_arch(arch)
            trained = len(set((bench.work / "models").rglob("config.json")) - before)
            results = {"recipe": asdict(bench.recipe), "archs": args.archs[:n + 1],
                       "seconds": time.perf_counter() - started, "trained": trained,
                       "perplexities": bench.perplexities, "rows": [asdict(r) for r in bench.rows]}
            # after every architecture, so an interrupted run leaves what it measured (report it with --report)
            (bench.work / "results.json").write_text(json.dumps(results, indent=1, default=float))
    figure_path = args.figure or bench.work / "evasion.png"
    figure(results, figure_path)
    print(report(results))
    print(f"\nFigure: {figure_path}; rows: {bench.work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
