"""Does a block penalty aimed at several frame widths at once take every width to chance?

docs/evasion.md's one remaining cheap evasion: every embedding row of the derivative re-drawn, then 500 repair
steps with the block penalty aimed at the stored frame (r = 32, weight 10): block score about 0 at r = 32 within
1.06-1.18x perplexity, but about 0.70 in a frame of 64 columns. It left open "an attacker penalising several
frame widths at once". This script builds the evasion bench's own subjects (bench/evasion.py's Bench: the same
recipe, tokenizer, base, twin and derivative, cached under WORK/<digest>/models) and repairs the same re-drawn
model (bench/evasion.py's `redraw_rows` of every row, the same repair seed and data order) with:

* the bench's cell: the block penalty aimed at r = 32, weight 10 (`A.BlockPenalty(base, 10)`, as `tuned` builds it);
* r = 32 and r = 64 at once (each weight 10, summed: `A.Penalties`);
* r = 16, 32, 48 and 64 at once (each weight 10, summed);
* r = 32 and r = 64 at once, each at weight 100.

Every model (the un-attacked derivative, each attacked one, the twin) is measured by the bench's own `measure`
(the public fingerprint path: sketch score, the block score at r = 32 and 64, held-out perplexity ratio) and its
block score against the base is also built in frames of 16 and 48 columns (`build_blocks(rank=...)`, as
`blocks_of` builds the bench's r64 column), and at full width with the base's weights at hand (no stored frame:
bench/block_lineage.py's procrustes-ou, what a `model:` reference could afford). While training, every gradient
that reaches a parameter is checked finite (total loss: LM + penalty) and, every CHECK_EVERY steps, the gradient
of each width's penalty alone.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/block_widths.py [--archs llama mistral]

Prints a Markdown table; writes WORK/<digest>/block_widths.json after every architecture.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import attacks as A  # noqa: E402
from bench import block_lineage as BL  # noqa: E402
from bench import evasion as E  # noqa: E402
from bench import transforms as T  # noqa: E402
from tg_verify.tiny import one_thread  # noqa: E402

WIDTHS = (16, 32, 48, 64)  # the frames every model is scored in by default (parse_blocks accepts 4..64; 32 and 64
# are always added: the bench measures them)
CHECK_EVERY = 25  # steps between per-width gradient checks (an extra backward of the penalty alone)


def variants(weight: float, heavy: float) -> list[tuple[str, tuple[int, ...], float]]:
    """(label, frame widths penalised at once, weight of each)."""
    return [("r32 (the bench's cell)", (32,), weight),
            ("r32 + r64", (32, 64), weight),
            ("r16 + r32 + r48 + r64", (16, 32, 48, 64), weight),
            ("r32 + r64, heavy", (32, 64), heavy)]


class Watched:
    """The sum of block penalties at several widths, with checks: every parameter gradient of every step finite
    (hooks), every CHECK_EVERY calls each width's penalty gradient alone (norm, finite), and its score logged."""

    def __init__(self, base: T.Checkpoint, widths: tuple[int, ...], weight: float, log: Any) -> None:
        self.penalties = [A.BlockPenalty(base, weight, rank=w) for w in widths]
        self.widths, self.log = widths, log
        self.calls = 0
        self.nonfinite_steps = 0  # steps where some parameter's total gradient was not finite
        self.nonfinite_penalty = 0  # calls where a width's penalty value or its own gradient was not finite
        self.hooked: set[int] = set()
        self.trace: list[dict[str, Any]] = []
        self._flagged_step = -1

    def _hook(self, model: torch.nn.Module) -> None:
        if id(model) in self.hooked:
            return
        self.hooked.add(id(model))

        def check(grad: torch.Tensor) -> None:
            if self._flagged_step != self.calls and not bool(torch.isfinite(grad).all()):
                self._flagged_step = self.calls
                self.nonfinite_steps += 1
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(check)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        self._hook(model)
        values = [p(model) for p in self.penalties]
        if self.calls % CHECK_EVERY == 0:
            params = [p for p in model.parameters() if p.requires_grad]
            entry: dict[str, Any] = {"step": self.calls}
            for w, value in zip(self.widths, values):
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
                finite = math.isfinite(float(value)) and math.isfinite(norm)
                self.nonfinite_penalty += not finite
                entry[f"r{w}"] = {"penalty": float(value), "grad_norm": norm}
            self.trace.append(entry)
            self.log(f"    step {self.calls:4d}  " + "  ".join(
                f"r{w}: penalty {entry[f'r{w}']['penalty']:.4f} |grad| {entry[f'r{w}']['grad_norm']:.3g}"
                for w in self.widths))
        elif not all(math.isfinite(float(v)) for v in values):
            self.nonfinite_penalty += 1
        self.calls += 1
        return torch.stack(values).sum()


def width_scores(bench: E.Bench, references: dict[int, Any], ck: T.Checkpoint, name: str) -> dict[int, float]:
    """Block score against the base in a frame of each width (built from the saved folder as the library does)."""
    directory = E.save(ck, bench.tokenizer, bench.scratch / "widths" / name)
    return {w: E.block_score_against(E.blocks_of(None, directory, w), reference) for w, reference in references.items()}


def run_arch(bench: E.Bench, arch: str, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    r = bench.recipe
    started = time.perf_counter()
    subject = bench._prepare(arch)  # base, twin, derivative (cached), the base's references, perplexities
    log(f"  prepared in {time.perf_counter() - started:.0f}s")
    base_dir = bench.work / "models" / arch / "base"
    references = {w: E.blocks_of(None, base_dir, w) for w in args.widths}
    # the bench's 100% re-draw (bench/evasion.py _row_attacks, fraction 1.0)
    ids = A.random_rows(r.vocab, 1.0, A.seed_of(arch, "rows"))
    reinitialised = A.redraw_rows(subject.derived, ids, A.seed_of(arch, "rows-redraw", 1.0))
    tag = hashlib.sha256(A.block_penalty_id(subject.base, subject.twin).encode()).hexdigest()[:8]
    steps = r.long_repair_steps

    models: list[tuple[str, str, T.Checkpoint, dict[str, Any]]] = [
        ("control", "derivative (un-attacked)", subject.derived, {}),
        ("control", "independent twin", subject.twin, {}),
        ("control", "100% rows re-drawn, no repair", reinitialised, {})]
    for label, widths, weight in variants(args.weight, args.heavy):
        info: dict[str, Any] = {"widths": list(widths), "weight": weight, "steps": steps}

        def make(widths: tuple[int, ...] = widths, weight: float = weight, info: dict[str, Any] = info,
                 label: str = label) -> T.Checkpoint:
            log(f"  training {label}: widths {widths}, weight {weight:g} each, {steps} steps")
            penalty = Watched(subject.base, widths, weight, log)
            t0 = time.perf_counter()
            # the bench's seed parts for its cell (bench/evasion.py _adaptive_blocks, reinit_block_weights): the same
            # data order for every variant, only the penalty differs
            made = bench.fine_tune(arch, reinitialised, steps, r.repair_lr, "repair",
                                   "100% rows re-drawn, block penalty", weight, penalty=penalty)
            info.update(train_seconds=time.perf_counter() - t0, nonfinite_grad_steps=penalty.nonfinite_steps,
                        nonfinite_penalty_calls=penalty.nonfinite_penalty, trace=penalty.trace,
                        finite_weights=all(bool(torch.isfinite(v).all()) for v in made.state.values()))
            (bench.work / "models" / arch / f"train-{name_of(widths, weight)}.json").write_text(
                json.dumps(info, indent=1))
            return made

        def name_of(widths: tuple[int, ...], weight: float) -> str:
            return f"widths-{tag}-reinit-{'-'.join(map(str, widths))}-w{weight:g}-{steps}"

        made = bench.trained(f"{arch}/{name_of(widths, weight)}", make)
        saved = bench.work / "models" / arch / f"train-{name_of(widths, weight)}.json"
        if saved.exists():
            info = json.loads(saved.read_text())
        models.append(("attack", f"re-drawn + {steps} repair steps, block penalty {label}, weight {weight:g} each",
                       made, info))

    rows = []
    base_blocks = BL.blocks_of(subject.base.state, subject.base.config)
    for group, name, ck, info in models:
        row = bench.measure(subject, group, name, "-", 0, bench._plain(ck))
        widths = width_scores(bench, references, ck, "candidate")
        # what a verifier holding the base's weights could read: no stored frame, full width (block_lineage.py)
        full_width = BL.procrustes_robust_score(BL.blocks_of(ck.state, ck.config), base_blocks)
        for w, expected in ((32, row.block_score), (64, row.wide_block_score)):
            if abs(widths[w] - expected) > 1e-6:
                log(f"  note: r{w} built here {widths[w]:.4f} differs from the bench's {expected:.4f}")
        entry = {"arch": arch, "group": group, "model": name, "ppl": row.ppl, "ppl_ratio": row.ppl_ratio,
                 "sketch": row.score, "sketch_threshold": row.threshold, "private_sketch": row.private_score,
                 "block_threshold": row.block_threshold, "derived": row.derived,
                 "reparam_block_score": row.reparam_block_score,
                 "widths": {str(w): widths[w] for w in args.widths}, "full_width": full_width,
                 "train": {k: v for k, v in info.items() if k != "trace"}}
        log(f"  {name}: ppl x{row.ppl_ratio:.3f} sketch {row.score:.3f} "
            + " ".join(f"r{w} {widths[w]:.3f}" for w in args.widths) + f" full width {full_width:.3f}"
            + f" derived {row.derived}" + (f" train {entry['train']}" if info else ""))
        rows.append(entry)
    return rows


def table(rows: list[dict[str, Any]], widths: list[int]) -> str:
    lines = ["| arch | model | ppl ratio | sketch | " + " | ".join(f"blocks r{w}" for w in widths)
             + " | full width, base weights | r32 re-param | derived (tgl4) | non-finite grad steps / penalty checks |",
             "|---|---|---|---|" + "---|" * len(widths) + "---|---|---|---|"]
    for m in rows:
        nonfinite = m["train"].get("nonfinite_grad_steps", "-")
        if m["train"]:
            nonfinite = f"{nonfinite} / {m['train'].get('nonfinite_penalty_calls', '-')}"
        lines.append(f"| {m['arch']} | {m['model']} | {m['ppl_ratio']:.3f} | {m['sketch']:.3f} | "
                     + " | ".join(f"{m['widths'][str(w)]:.3f}" for w in widths)
                     + f" | {m.get('full_width', float('nan')):.3f} | {m['reparam_block_score']:.3f} | "
                     + f"{'yes' if m['derived'] else 'no'} | {nonfinite} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "block_widths")
    parser.add_argument("--archs", nargs="+", default=["llama", "mistral"], choices=list(E.ARCHITECTURES))
    parser.add_argument("--weight", type=float, default=10.0, help="each width's penalty weight (the bench's 10)")
    parser.add_argument("--heavy", type=float, default=100.0, help="each width's weight in the heavy r32 + r64 variant")
    parser.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), help="frames every model is scored in")
    parser.add_argument("--quick", action="store_true", help="the bench's --quick recipe (smoke run)")
    args = parser.parse_args(argv)
    args.widths = sorted(set(args.widths) | {32, 64})

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with one_thread():
        recipe = E.QUICK if args.quick else E.Recipe()
        bench = E.Bench(args.work, recipe, log)
        for arch in args.archs:
            log(f"{arch}: ({time.strftime('%H:%M:%S')})")
            rows += run_arch(bench, arch, args, log)
            (bench.work / "block_widths.json").write_text(json.dumps(
                {"recipe": asdict(recipe), "seconds": time.perf_counter() - started, "rows": rows}, indent=1,
                default=float))
    print(table(rows, args.widths))
    print(f"\nppl ratio: held-out perplexity / the un-attacked derivative's; sketch: tgs3 score at the public seed; "
          f"blocks rN: cross-fitted block score against the base in a frame of N columns (the fingerprint stores "
          f"r32; block threshold {rows[0]['block_threshold']:.3f} at r32); full width: the same cross-fit on the whole "
          f"residual stream with the base's weights at hand (bench/block_lineage.py's procrustes-ou, not shipped); "
          f"non-finite grad steps: steps with a non-finite parameter gradient / penalty checks not finite. Run time "
          f"{(time.perf_counter() - started) / 60:.1f} min; rows: {bench.work / 'block_widths.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
