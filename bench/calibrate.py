"""Calibration of the lineage test: the empirical null of independently trained models, shipped as package data.

For each tiny architecture and size, independently trained roots (same config, different seeds and data
order, at several training lengths) and derivatives of each: a light fine-tune, a heavy one as long as the
shortest pretraining, and a middle layer dropped or duplicated (then lightly fine-tuned). Every model is
sketched; every pair (candidate, reference root) where the candidate does not descend from that root is
scored with the lineage test's score (no calibration applied): candidates of the reference's own
architecture, and of the other architectures of the same size (but never two models from the same
seed, whose embeddings start alike). The scores of each reference architecture class form its null
sample, written with the recipe, the method version and the pair names to
tg_verify/analysis/data/lineage_calibration.json, from which the test takes its threshold and the rate it
reports (tg_verify/analysis/calibration.py).

The models share nothing with bench/lineage.py's zoo (other seeds), so that bench measures the
calibrated test on models the calibration never saw.

    nice -n 10 python bench/calibrate.py [--work bench/out/calibrate] [--train-only] [--archs llama gemma]
        [--sizes small medium] [--output tg_verify/analysis/data/lineage_calibration.json]
    python bench/calibrate.py --resummarise   # re-derive the trend with training length of the written file

Prints a per-class summary; models and sketches are cached under WORK/<recipe digest>/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import transforms as T
from bench.lineage import bigram_tokenizer, load_checkpoint, tokenize, write_tokenizer
from bench.zoo import corpus, fine_tune
from tg_verify.tiny import ARCHITECTURES, build_model, one_thread

DEFAULT_OUTPUT = ROOT / "tg_verify" / "analysis" / "data" / "lineage_calibration.json"


@dataclass(frozen=True)
class Recipe:
    """Every knob of the calibration zoo; its digest keys the model cache and is recorded in the output."""

    corpus_bytes: int = 600_000
    seeds: tuple[int, ...] = (101, 202, 303)  # bench/lineage.py uses 0..40 and 1000..1040
    # mistral's tiny configs initialise and train exactly like llama's from one seed: its roots take others
    mistral_seeds: tuple[int, ...] = (404, 505, 606)
    lengths: tuple[int, ...] = (150, 300, 600, 1200)  # pretraining steps: each seed trains one root per length
    pretrain_lr: float = 3e-3
    light_steps: int = 20
    light_lr: float = 2e-4
    heavy_steps: int = 150
    heavy_lr: float = 1e-3
    surgery_steps: int = 20  # a middle layer dropped or duplicated, then a light fine-tune (lr light_lr)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def training_digest(self) -> str:
        """What trains each model (not which seeds and lengths there are): the model cache's key, so that adding
        a seed or a length trains only the new models."""
        knobs = {k: v for k, v in asdict(self).items() if k not in ("seeds", "mistral_seeds", "lengths")}
        return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Model:
    """One calibration model: id, class (architecture and size), the root it descends from, relation."""

    id: str
    arch: str
    size: str
    root: str
    relation: str  # "root", "ft-light", "ft-heavy", "dropped-layer" or "duplicated-layer"
    seed: int  # the root's training seed (initialisation and data order)


class Zoo:
    """Builds (or reloads) the calibration models under WORK/<digest>/models."""

    def __init__(self, work: Path, recipe: Recipe, log: Callable[[str], None]) -> None:
        self.work, self.recipe, self.log = work / recipe.training_digest(), recipe, log
        (self.work / "models").mkdir(parents=True, exist_ok=True)
        text = {part: corpus(part, recipe.corpus_bytes) for part in ("pretrain", "light", "heavy")}
        self.table = bigram_tokenizer(text["pretrain"])
        self.tokens = {part: tokenize(t, self.table) for part, t in text.items()}
        self.models: list[Model] = []

    def path(self, model_id: str) -> Path:
        return self.work / "models" / model_id

    def _model(self, model: Model, make: Callable[[], T.Checkpoint]) -> None:
        directory = self.path(model.id)
        if not (directory / "config.json").exists():
            started = time.perf_counter()
            make().save(directory)
            self.log(f"  built {model.id} in {time.perf_counter() - started:.1f}s")
        write_tokenizer(directory, self.table)
        self.models.append(model)

    def build(self, archs: tuple[str, ...], sizes: tuple[str, ...]) -> list[Model]:
        r = self.recipe
        with one_thread():
            for size in sizes:
                for arch in archs:
                    for seed in (r.mistral_seeds if arch == "mistral" else r.seeds):
                        for steps in r.lengths:
                            root_id = f"{arch}-{size}-s{seed}-{steps}"
                            run_seed = seed * 10 + steps

                            def pretrain(arch: str = arch, size: str = size, seed: int = run_seed,
                                         steps: int = steps) -> T.Checkpoint:
                                model = build_model(arch, seed=seed, size=size)
                                return T.from_model(fine_tune(model, self.tokens["pretrain"], steps, r.pretrain_lr,
                                                              seed))
                            self._model(Model(root_id, arch, size, root_id, "root", run_seed), pretrain)
                            root = load_checkpoint(self.path(root_id))
                            for relation, start, part, n, lr, offset in (
                                    ("ft-light", None, "light", r.light_steps, r.light_lr, 1),
                                    ("ft-heavy", None, "heavy", r.heavy_steps, r.heavy_lr, 2),
                                    ("dropped-layer", T.drop_layer, "light", r.surgery_steps, r.light_lr, 3),
                                    ("duplicated-layer", T.duplicate_layer, "light", r.surgery_steps, r.light_lr, 4)):
                                def derive(root: T.Checkpoint = root, start: Any = start, part: str = part, n: int = n,
                                           lr: float = lr, seed: int = run_seed + offset) -> T.Checkpoint:
                                    model = (root if start is None else start(root, root.layers // 2)).model()
                                    return T.from_model(fine_tune(model, self.tokens[part], n, lr, seed))
                                self._model(Model(f"{root_id}~{relation}", arch, size, root_id, relation, run_seed),
                                            derive)
        return self.models


# -- scoring ----------------------------------------------------------------------------------------

def sketches(zoo: Zoo) -> dict[str, Any]:
    """Every model's fingerprint with its lineage evidence only (sketch and blocks, what the lineage test reads),
    cached per sketch and block version."""
    from tg_verify.fingerprint.blocks import BLOCKS_VERSION
    from tg_verify.fingerprint.document import load
    from tg_verify.fingerprint.sketch import SKETCH_VERSION

    out: dict[str, Any] = {}
    cache = zoo.work / "sketches" / f"{SKETCH_VERSION}-{BLOCKS_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    for model in zoo.models:
        path = cache / f"{model.id}.json"
        if not path.exists():
            fp = T.sketch_fingerprint_of_folder(zoo.path(model.id))
            path.write_bytes(fp.to_json_bytes())
        out[model.id] = load(path)
    return out


def null_pairs(models: list[Model]) -> list[tuple[Model, Model]]:
    """(candidate, reference root) for every candidate of the reference's size that does not descend from it:
    of its own architecture, or of another one trained from another seed (same-seed models of different
    architectures start from the same embedding, so they are not independent)."""
    roots = [m for m in models if m.relation == "root"]
    return [(c, r) for r in roots for c in models
            if c.size == r.size and c.root != r.root and (c.arch == r.arch or c.seed != r.seed)]


def score_pairs(zoo: Zoo, models: list[Model]) -> dict[str, dict[str, Any]]:
    """Per reference class: its key, the null scores of the sketch and, paired with them, of the blocks, and each
    pair's (candidate, reference) as indices into the sorted model list."""
    from tg_verify.analysis.blocks import block_score, parse_blocks
    from tg_verify.analysis.calibration import class_key
    from tg_verify.analysis.lineage import lineage_score

    fps = sketches(zoo)
    blocks = {model_id: parse_blocks(fp.blocks, model_id) for model_id, fp in fps.items()}
    index = {model_id: n for n, model_id in enumerate(sorted(m.id for m in models))}
    classes: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for n, (candidate, reference) in enumerate(null_pairs(models)):
        result = lineage_score(fps[candidate.id], fps[reference.id])
        block = block_score(blocks[candidate.id], blocks[reference.id])
        if result.score is None or block.score is None:
            raise RuntimeError(f"{candidate.id} vs {reference.id}: not comparable ({result.notes + block.notes})")
        if n % 2000 == 0:
            zoo.log(f"  scored {n} pairs in {time.perf_counter() - started:.0f}s")
        architecture = fps[reference.id].sketch["architecture"]  # type: ignore[index]
        key = class_key(architecture)
        entry = classes.setdefault(key, {"key": key, "architecture": architecture, "scores": [], "block_scores": [],
                                         "pairs": [], "same_architecture": []})
        entry["scores"].append(round(float(result.score), 6))
        entry["block_scores"].append(round(float(block.score), 6))
        entry["pairs"].append([index[candidate.id], index[reference.id]])
        entry["same_architecture"].append(candidate.arch == reference.arch)
    return classes


def write(output: Path, recipe: Recipe, classes: dict[str, dict[str, Any]], models: list[Model]) -> dict[str, Any]:
    from tg_verify.analysis.calibration import CALIBRATION_FORMAT
    from tg_verify.analysis.lineage import LINEAGE_METHOD
    from tg_verify.fingerprint.blocks import BLOCKS_VERSION
    from tg_verify.fingerprint.sketch import SKETCH_VERSION

    document = {
        "format": CALIBRATION_FORMAT,
        "method": LINEAGE_METHOD,
        "sketch_version": SKETCH_VERSION,
        "blocks_version": BLOCKS_VERSION,
        "built_by": "bench/calibrate.py",
        "recipe": {**asdict(recipe), "digest": recipe.digest(),
                   "models": "tiny transformers configs (tg_verify/tiny.py), trained on Python stdlib source "
                             "through bench/lineage.py's 512-token bigram vocabulary",
                   "pairs": "per reference root: every model of its size that does not descend from it, of its own "
                            "architecture or of another trained from another seed (models: sorted ids; pairs: "
                            "[candidate, reference] indices)"},
        "models": sorted(m.id for m in models),
        "classes": [classes[key] for key in sorted(classes)],
    }
    return save(output, document)


def save(output: Path, document: dict[str, Any]) -> dict[str, Any]:
    """Write the document with its measured trend with training length at the default target rate and the scope
    it implies (recipe.trend, recipe.scope), and read it back through the validator."""
    from tg_verify.analysis.calibration import load_calibration
    from tg_verify.analysis.lineage_rule import DEFAULT_ALPHA

    trend = length_trend(document, DEFAULT_ALPHA)
    document["recipe"] = {**document["recipe"], "trend": trend, "scope": scope(trend)}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n")
    load_calibration(output)  # what was written must read back through the validator
    return document


def _length(model_id: str) -> int:
    """A model's pretraining length, from its root's id (`arch-size-sSEED-STEPS`)."""
    return int(model_id.split("~")[0].rsplit("-", 1)[1])


def _rule(entry: dict[str, Any], alpha: float) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The shipped decision rule on one class's null: per pair, called derived by the sketch and by the blocks
    (either-evidence rule: each threshold at alpha / 2), and the two thresholds."""
    from tg_verify.analysis.calibration import NullSample

    null = NullSample(key=entry["key"], scores=np.asarray(entry["scores"], dtype=np.float64),
                      block_scores=np.asarray(entry["block_scores"], dtype=np.float64))
    blocks = null.blocks()
    assert blocks is not None
    thresholds = {"sketch": null.threshold(alpha / 2), "blocks": blocks.threshold(alpha / 2)}
    return null.scores > thresholds["sketch"], blocks.scores > thresholds["blocks"], thresholds


def length_trend(document: dict[str, Any], alpha: float) -> dict[str, Any]:
    """The null's upper tail against training length: per length L, over the pairs whose two roots were both
    trained L steps, how many the decision rule at `alpha` calls derived (thresholds set from the whole null of
    the class, every length pooled), with the exact 95% upper bound, and how many of those the sketch and the
    blocks each call; per class the sketch's and the blocks' 99th percentile and maximum at each L."""
    from tg_verify.analysis.calibration import upper_bound

    models = document["models"]
    lengths = sorted({_length(m) for m in models})
    pooled = {n: [0, 0, 0, 0] for n in lengths}  # rule, pairs, sketch, blocks
    per_class: dict[str, dict[str, Any]] = {}
    for entry in document["classes"]:
        scores = np.asarray(entry["scores"], dtype=np.float64)
        block_scores = np.asarray(entry["block_scores"], dtype=np.float64)
        by_sketch, by_blocks, thresholds = _rule(entry, alpha)
        pair_lengths = np.asarray([(_length(models[c]), _length(models[r])) for c, r in entry["pairs"]])
        rows = {}
        for n in lengths:
            at = (pair_lengths[:, 0] == n) & (pair_lengths[:, 1] == n)
            if not at.any():
                continue
            counts = [int(np.count_nonzero((by_sketch | by_blocks)[at])), int(at.sum()),
                      int(np.count_nonzero(by_sketch[at])), int(np.count_nonzero(by_blocks[at]))]
            pooled[n] = [a + b for a, b in zip(pooled[n], counts)]
            rows[str(n)] = {"pairs": counts[1], "above": counts[0], "sketch_above": counts[2],
                            "blocks_above": counts[3], "p99": round(float(np.quantile(scores[at], 0.99)), 4),
                            "max": round(float(scores[at].max()), 4),
                            "blocks_p99": round(float(np.quantile(block_scores[at], 0.99)), 4),
                            "blocks_max": round(float(block_scores[at].max()), 4)}
        per_class[entry["key"]] = {"threshold": round(thresholds["sketch"], 4),
                                   "block_threshold": round(thresholds["blocks"], 4), "by_length": rows}
    return {"alpha": alpha, "lengths": lengths,
            "pairs": "both roots trained the same number of steps; thresholds from the whole null of the class; "
                     "above: called derived by the either-evidence rule (sketch or blocks, each at alpha / 2)",
            "by_length": {str(n): {"pairs": total, "above": above, "share": round(above / total, 5),
                                   "upper95": round(upper_bound(above, total), 5), "sketch_above": sketch,
                                   "blocks_above": blocks}
                          for n, (above, total, sketch, blocks) in pooled.items() if total},
            "classes": per_class}


def scope(trend: dict[str, Any]) -> str:
    """Which models the stated rates cover, in words, from the measured trend (no constant of ours in it)."""
    lengths, rows, alpha = trend["lengths"], trend["by_length"], trend["alpha"]
    shares = [rows[str(n)]["share"] for n in lengths if str(n) in rows]
    text = f"null: tiny models trained {lengths[0]}-{lengths[-1]} steps"
    longest = rows.get(str(lengths[-1]))
    if longest is None or len(shares) < 2:
        return text
    if shares[-1] > shares[0] and shares[-1] > alpha:
        first = rows[str(lengths[0])]
        return (f"{text}, pooled; its tail grows with training length: pairs both trained {lengths[-1]} steps score "
                f"above the threshold {longest['share']:.1%} of the time (95% upper bound {longest['upper95']:.1%}; "
                f"{first['share']:.1%} at {lengths[0]}), and for models trained longer the rate is not known")
    worst = max((n for n in lengths if str(n) in rows), key=lambda n: rows[str(n)]["share"])
    if rows[str(worst)]["share"] > alpha:
        row = rows[str(worst)]
        return (f"{text}, pooled; no growth of its tail with training length measured there, but pairs trained "
                f"equally long are called derived more often: up to {row['share']:.1%} (95% upper bound "
                f"{row['upper95']:.1%}) at {worst} steps")
    return f"{text}; no growth of its tail with training length measured there"


def summary(document: dict[str, Any], alpha: float) -> str:
    from tg_verify.analysis.calibration import NullSample, upper_bound

    lines = [f"### Lineage calibration ({document['method']}, target rate {alpha:g}: sketch or blocks, "
             f"each at {alpha / 2:g})", "",
             "| class | null pairs (same architecture) | sketch: median | p99 | max (same architecture) | threshold "
             "| blocks: median | p99 | max (same architecture) | threshold "
             "| rule's rate at the thresholds (95% upper) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in document["classes"]:
        null = NullSample(key=entry["key"], scores=np.asarray(entry["scores"]),
                          block_scores=np.asarray(entry["block_scores"]))
        blocks = null.blocks()
        assert blocks is not None
        same = np.asarray(entry["same_architecture"], dtype=bool)
        by_sketch, by_blocks, thresholds = _rule(entry, alpha)
        above, n = int(np.count_nonzero(by_sketch | by_blocks)), null.size
        cells = []
        for sample, threshold in ((null, thresholds["sketch"]), (blocks, thresholds["blocks"])):
            cells.append(f"{np.median(sample.scores):.3f} | {np.quantile(sample.scores, 0.99):.3f} | "
                         f"{sample.scores.max():.3f} ({sample.scores[same].max():.3f}) | {threshold:.3f}")
        lines.append(f"| {entry['key']} | {n} ({int(same.sum())}) | {cells[0]} | {cells[1]} | "
                     f"{above}/{n} ({upper_bound(above, n):.2%}) |")
    trend = document["recipe"].get("trend")
    if trend:
        lengths = trend["lengths"]
        lines += ["", f"Null tail against training length (pairs whose roots both trained L steps; thresholds at "
                      f"{trend['alpha'] / 2:g} each from the class's whole null): called derived by the rule (by the "
                      f"sketch / by the blocks), and the sketch's and the blocks' 99th percentile",
                  "", "| class | " + " | ".join(f"{n} steps" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for key, row in trend["classes"].items():
            cells = [f"{c['above']}/{c['pairs']} ({c['sketch_above']}/{c['blocks_above']}), p99 {c['p99']:.3f} / "
                     f"{c['blocks_p99']:.3f}" if (c := row["by_length"].get(str(n))) else "-" for n in lengths]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        cells = [f"{r['above']}/{r['pairs']} ({r['share']:.2%}, 95% upper {r['upper95']:.2%}; sketch "
                 f"{r['sketch_above']}, blocks {r['blocks_above']})"
                 if (r := trend["by_length"].get(str(n))) else "-" for n in lengths]
        lines += ["| all classes | " + " | ".join(cells) + " |", "", f"scope: {document['recipe']['scope']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "calibrate")
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--train-only", action="store_true", help="build the models, score nothing")
    parser.add_argument("--alpha", type=float, default=0.01, help="target rate for the printed thresholds")
    parser.add_argument("--resummarise", action="store_true",
                        help="re-derive the trend and scope of the written OUTPUT and print its summary; train nothing")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.resummarise:
        print(summary(save(args.output, json.loads(args.output.read_text())), args.alpha))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    zoo = Zoo(args.work, Recipe(), log)
    models = zoo.build(tuple(args.archs), tuple(args.sizes))
    if args.train_only:
        return 0
    document = write(args.output, zoo.recipe, score_pairs(zoo, models), models)
    print(summary(document, args.alpha))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
