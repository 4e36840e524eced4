"""Table I on the bench zoo: build (or reuse) the zoo, fingerprint it, run every clustering strategy.

    python bench/accuracy.py [--out bench/out/zoo] [--plots]

Prints the accuracy of each strategy in both distance spaces beside the paper's numbers, the
attribution accuracy by derivative kind, and how far derivatives sit from their base compared with
the nearest other base (the margin the attribution lives on). Figures for docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.zoo import (  # noqa: E402
    DEFAULT_OUT,
    DERIVATIVES,
    Recipe,
    ZooModel,
    _load,
    _seed,
    build_zoo,
    corpus,
    fingerprint_zoo,
    train,
)
from tg_verify.analysis.attribution import classify  # noqa: E402
from tg_verify.analysis.clustering import StudySettings, clustering_study  # noqa: E402
from tg_verify.analysis.compat import comparability  # noqa: E402
from tg_verify.analysis.references import build_references, load_fingerprints, read_labels  # noqa: E402
from tg_verify.analysis.space import FeatureSpace, euclidean  # noqa: E402


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


STRESS_STEPS: tuple[int, ...] = (100, 200, 400)


def stress(models: list[ZooModel], references: list, out: Path) -> None:
    """Fine-tune each small base along one trajectory (heavy recipe's data and rate) and classify checkpoints."""
    import torch

    recipe = Recipe()
    text = corpus("heavy", recipe.corpus_bytes)
    bases = [m for m in models if m.parent is None and m.id.endswith("-small")]
    results: dict[int, list[tuple[bool, bool, float, str]]] = defaultdict(list)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for base in bases:
            model = _load(base.path)
            done = 0
            for steps in STRESS_STEPS:
                name = f"{base.id}-stress{steps}"
                checkpoint = ZooModel(name, base.family, base.id, out / "stress" / recipe.digest() / name, "stress")
                if not (checkpoint.path / "model.safetensors").exists():
                    from tg_verify.tiny import save_model

                    if done < steps:
                        train(model, text, steps - done, recipe.heavy_lr, _seed(base.id, "stress", str(steps)),
                              recipe.batch, recipe.context)
                    done = steps
                    save_model(model, checkpoint.path)
                else:
                    model = _load(checkpoint.path)
                    done = steps
                [path] = fingerprint_zoo([checkpoint], out / "stress" / recipe.digest())
                from tg_verify.fingerprint.document import load

                result = classify(load(path), references)
                own = next(r.distance for r in result.references if r.id == base.id)
                placed = (f"{name} -> {result.family} cluster (base {result.base}, {result.distance:.2f}"
                          f"{', out of cluster' if result.out_of_cluster else ''}; own base at {own:.2f})")
                results[steps].append((result.family == base.family, result.base == base.id, own, placed))
    finally:
        torch.set_num_threads(threads)
    print(f"\nstress: small bases fine-tuned longer (lr {recipe.heavy_lr:g}; the zoo's heavy fine-tune is "
          f"{recipe.heavy_steps} steps), each checkpoint classified against the 80-model zoo")
    for steps in STRESS_STEPS:
        rows = results[steps]
        print(f"  {steps:4d} steps: family {sum(r[0] for r in rows)}/{len(rows)}, own base {sum(r[1] for r in rows)}/"
              f"{len(rows)}, distance to own base median {np.median([r[2] for r in rows]):.2f} "
              f"max {max(r[2] for r in rows):.2f}")
        for row in rows:
            if not (row[0] and row[1]):
                print(f"         {row[3]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plots", action="store_true", help="also write the study's PNGs under OUT/study-*")
    parser.add_argument("--stress", action="store_true",
                        help="also fine-tune the small bases much longer (checkpoints at STRESS_STEPS) and classify "
                             "each checkpoint against the zoo: where does attribution break? (a few minutes more)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    models = build_zoo(args.out)
    built = time.perf_counter()
    fingerprint_zoo(models, args.out)
    fingerprinted = time.perf_counter()
    fingerprints = load_fingerprints([args.out / "fingerprints"])
    references, _ = build_references(fingerprints, read_labels(args.out / "labels.yml"))
    kinds = {m.id: m.kind for m in models}
    print(f"zoo: {len(references)} models, {sum(r.base for r in references)} bases, "
          f"{sum(not r.base for r in references)} derivatives, {len({r.family for r in references})} families "
          f"(build {built - started:.1f}s, fingerprints {fingerprinted - built:.1f}s)")

    studies = {}
    for space in ("standardized", "pca"):
        t0 = time.perf_counter()
        studies[space] = clustering_study(references, StudySettings(space=space))
        print(f"clustering study in the {space} space: {time.perf_counter() - t0:.1f}s")
        if args.plots:
            from tg_verify.report.plots import write_clustering_plots

            write_clustering_plots(studies[space], args.out / f"study-{space}")

    widths = [22, 8, 8, 10, 10, 9, 20]
    print()
    print(_row(["strategy", "paper", "ours", "ours(pca)", "Hungarian", "ARI", "over 10 seeds"], widths))
    for result in studies["standardized"].results:
        pca = studies["pca"].result(result.strategy)
        seeds = ""
        if result.seed_accuracies:
            s = result.seed_accuracies
            seeds = f"{min(s):.0%}-{max(s):.0%} mean {np.mean(s):.0%}"
        print(_row([result.title, f"{result.paper_accuracy:.0%}", f"{result.accuracy:.1%}", f"{pca.accuracy:.1%}",
                    f"{result.hungarian_accuracy:.1%}", f"{result.adjusted_rand:.3f}", seeds], widths))

    centroid = studies["standardized"].result("centroid-kmeans")
    print(f"\ncentroid K-Means: {centroid.correct}/{centroid.evaluated} derivatives in their family's cluster, "
          f"{centroid.parent_accuracy:.1%} in their own parent's; misclassified: {centroid.misclassified or 'none'}")
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for index, reference in enumerate(references):
        if not reference.base:
            by_kind[kinds[reference.id]].append(centroid.assigned[index] == reference.family)
    print("by derivative kind: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(by_kind.items())))

    # The margin: each derivative's distance to its own base vs to the nearest other base.
    fps = [r.fingerprint for r in references]
    space = FeatureSpace.fit(fps, comparability(fps).features)
    points = space.transform(fps)
    distances = euclidean(points, points)
    base_index = {r.id: i for i, r in enumerate(references) if r.base}
    own: dict[str, list[float]] = defaultdict(list)
    nearest_other = []
    for index, reference in enumerate(references):
        if reference.base:
            continue
        parent = base_index[str(reference.parent)]
        own[kinds[reference.id]].append(float(distances[index, parent]))
        nearest_other.append(min(float(distances[index, j]) for b, j in base_index.items() if j != parent))
    bases = list(base_index.values())
    between = [float(distances[i, j]) for i in bases for j in bases if i < j]
    print("\nstandardised distance of derivatives to their own base (max by kind): "
          + ", ".join(f"{k} {max(own[k]):.2f}" for k in DERIVATIVES if k in own))
    print(f"derivatives to the nearest other base: min {min(nearest_other):.2f}, "
          f"median {np.median(nearest_other):.2f}; "
          f"between bases: min {min(between):.2f}, median {np.median(between):.2f}; threshold 7 "
          f"{'never' if max(max(v) for v in own.values()) <= 7 else 'sometimes'} exceeded by a derivative")
    if args.stress:
        stress(models, references, args.out)
    print(f"\ntotal {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
