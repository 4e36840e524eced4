"""Registry-scale bench: batch throughput on Ray against the local executor, and lineage search at 10,000 references.

1. Batch throughput. The same models fingerprinted by `run_batch` with the local executor (one model
   after another, all cores per model) and with the Ray executor on a local Ray cluster of this
   machine's cores (one task per model), in the same run, outputs compared byte for byte: the bench
   zoo (80 tiny models: per-task overhead dominates) and synthetic TinyLlama-shaped bf16 checkpoints
   (the streamed pass dominates; its CPU-seconds per GB are what a cluster estimate scales from).
2. Search. An index of N references (default 10,000): the zoo's 10 trained bases, one independently
   trained root per zoo shape, and distractors generated from independently trained roots of the
   same shapes (bench/distractors.py says how, and why they are realistic). Candidates: the zoo's 70
   derivatives and 40 evasions or surgeries of its bases (rotation, permutations and rescalings all
   at once, a dropped layer, a grown vocabulary), never indexed. Recall@1 and @10 of retrieval (is the
   true base among the k most similar signatures), the full search's answer (is the first hit by
   lineage evidence the true base, called derived), latency (index open, retrieval, the ten exact
   tests) as median and p95, false bases for independently trained strangers, index size per reference.
3. The working-set estimate (tg_verify/scale/memory.py) beside the measured peak RSS.

    python bench/scale.py [--work bench/out/scale] [--references 10000] [--quick]

Prints Markdown tables; writes WORK/results.json. Models, fingerprints and distractors are cached in WORK
and bench/out/zoo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import transforms as T  # noqa: E402
from bench.distractors import distractors  # noqa: E402
from bench.zoo import DEFAULT_OUT as ZOO_OUT  # noqa: E402
from bench.zoo import SIZES, VOCAB, Recipe, _load, _seed, build_zoo, corpus, fingerprint_zoo, train  # noqa: E402
from tg_verify.atomic import write_bytes  # noqa: E402
from tg_verify.fingerprint.document import load  # noqa: E402
from tg_verify.fingerprint.settings import FingerprintSettings  # noqa: E402
from tg_verify.tiny import ARCHITECTURES, build_model, one_thread  # noqa: E402

DEFAULT_WORK = ROOT / "bench" / "out" / "scale"
ROOTS = 4  # independently trained roots per zoo shape: three mixed into distractors, one a stranger
EVASIONS: dict[str, Callable[[T.Checkpoint], T.Checkpoint]] = {
    "all-evasions": T.all_evasions,
    "rotate-residual": T.rotate_residual,
    "drop-layer": lambda ck: T.drop_layer(ck, ck.layers // 2),
    "vocab+64": lambda ck: T.extend_vocab(ck, 64, seed=1),
}
HWM = "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ models


def zoo_and_candidates(work: Path, quick: bool) -> tuple[list[Any], dict[str, tuple[Path, str]], dict[str, Path]]:
    """The bench zoo (built or reused), its fingerprints, and the search candidates: (fingerprint, true base)."""
    archs = ARCHITECTURES[:2] if quick else ARCHITECTURES
    zoo_out = work / "zoo-quick" if quick else ZOO_OUT  # a zoo of other architectures would replace the cached one
    models = build_zoo(zoo_out, architectures=archs, log=log)
    paths = fingerprint_zoo(models, zoo_out, log=log)
    by_id = dict(zip([m.id for m in models], paths))
    candidates = {m.id: (by_id[m.id], str(m.parent)) for m in models if m.parent is not None}
    bases = {m.id: by_id[m.id] for m in models if m.parent is None}
    with one_thread():
        for model in models:
            if model.parent is not None:
                continue
            checkpoint: T.Checkpoint | None = None
            for name, transform in EVASIONS.items():
                target = work / "candidates" / f"{model.id}-{name}.json"
                if not target.exists():
                    checkpoint = checkpoint or T.from_model(_load(model.path))
                    fingerprint = T.fingerprint_of(transform(checkpoint), work / "evasion-models" / target.stem)
                    write_bytes(target, fingerprint.to_json_bytes())
                candidates[target.stem] = (target, model.id)
    return models, candidates, bases


def roots(work: Path, quick: bool) -> dict[str, list[Path]]:
    """ROOTS independently trained models per zoo shape (same recipe and text as the zoo's bases, other seeds)."""
    recipe = Recipe()
    text = corpus("pretrain", recipe.corpus_bytes)
    found: dict[str, list[Path]] = {}
    archs = ARCHITECTURES[:2] if quick else ARCHITECTURES
    with one_thread():
        for arch in archs:
            for size in SIZES:
                shape = f"{arch}-{size}"
                found[shape] = []
                for n in range(ROOTS):
                    target = work / "roots" / f"{shape}-root{n}.json"
                    if not target.exists():
                        model = build_model(arch, seed=_seed(shape, f"root{n}"), size=size, vocab_size=VOCAB)
                        train(model, text, recipe.pretrain_steps, recipe.pretrain_lr, _seed(shape, f"root{n}", "data"),
                              recipe.batch, recipe.context)
                        fingerprint = T.fingerprint_of(T.from_model(model), work / "root-models" / target.stem)
                        write_bytes(target, replace(fingerprint, **{"model_name": target.stem})
                                    .to_json_bytes())
                        log(f"{target.stem}: trained and fingerprinted")
                    found[shape].append(target)
    return found


def make_references(work: Path, bases: dict[str, Path], shape_roots: dict[str, list[Path]], total: int) -> Path:
    """WORK/references-N: the bases, one root per shape, and distractors up to `total` references."""
    folder = work / f"references-{total}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in bases.values():
        shutil.copy(path, folder)
    for paths in shape_roots.values():
        shutil.copy(paths[0], folder)
    remaining = total - len(bases) - len(shape_roots)
    shapes = sorted(shape_roots)
    for number, shape in enumerate(shapes):
        count = remaining // len(shapes) + (1 if number < remaining % len(shapes) else 0)
        mixed = [load(p) for p in shape_roots[shape][:ROOTS - 1]]
        for fingerprint in distractors(mixed, count, f"{shape}-distractor", seed=number):
            write_bytes(folder / f"{fingerprint.model_name}.json", fingerprint.to_json_bytes())
        log(f"{shape}: {count} distractors")
    marker.write_text("ok\n")
    return folder


# ------------------------------------------------------------------------------------------ search


def bench_search(work: Path, references: Path, candidates: dict[str, tuple[Path, str]],
                 strangers: list[Path], executor_name: str) -> dict[str, Any]:
    from tg_verify.analysis.references import Label
    from tg_verify.index.build import add_references
    from tg_verify.index.search import search
    from tg_verify.index.signature import fingerprint_signature
    from tg_verify.index.store import open_index
    from tg_verify.scale.executor import make_executor

    index_dir = work / f"index-{references.name}"
    build_seconds = None
    if not (index_dir / "index.json").exists():
        shutil.rmtree(index_dir, ignore_errors=True)
        # families: a zoo base's is its architecture; every root and distractor is an unrelated family of its own
        labels = {p.stem: Label(family=_family_of(p.stem) if "-root" not in p.stem and "distractor" not in p.stem
                                else f"unrelated-{p.stem}", base=True) for p in references.glob("*.json")}
        executor = make_executor(executor_name)
        started = time.perf_counter()
        report = add_references(index_dir, [references], labels=labels, create=True, executor=executor)
        build_seconds = time.perf_counter() - started
        executor.close()
        if report.problems:
            raise SystemExit(f"index build reported problems: {report.problems[:3]}")
        log(f"index of {report.count} built in {build_seconds:.0f}s ({executor_name})")
    opens = []
    for _ in range(3):
        started = time.perf_counter()
        index = open_index(index_dir)
        opens.append(time.perf_counter() - started)
    n = len(index.entries)
    position = {e.id: i for i, e in enumerate(index.entries)}
    rows = []
    for name, (path, base) in sorted(candidates.items()):
        candidate = load(path)
        signature = fingerprint_signature(candidate)
        assert signature is not None
        similarities = index.signatures @ signature
        rank = 1 + int(np.count_nonzero(similarities > similarities[position[base]]))
        started = time.perf_counter()
        result = search(index, candidate, 10)
        seconds = time.perf_counter() - started
        first = result.hits[0]
        rows.append({"candidate": name, "base": base, "kind": _kind(name), "rank": rank,
                     "found": first.entry.id == base and first.lineage.derived,
                     "false_bases": [h.entry.id for h in result.hits if h.lineage.derived and h.entry.id != base],
                     "seconds": seconds, "retrieval": result.seconds["retrieval"],
                     "exact": result.seconds["exact_tests"], "attribution": result.seconds["attribution"],
                     "family": result.attribution["family"], "true_family": _family_of(base), "base_score": next(
                         (h.lineage.score for h in result.hits if h.entry.id == base), None)})
    false = []
    for path in strangers:
        result = search(index, load(path), 10)
        false.append({"candidate": path.stem, "derived": [h.entry.id for h in result.hits if h.lineage.derived],
                      "best_similarity": max(h.similarity for h in result.hits),
                      "family": result.attribution["family"]})
    cli = []
    for path, _base in sorted(candidates.values())[:5]:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tg_verify", "search", str(path), "--index", str(index_dir), "--json"],
                       check=True, capture_output=True)
        cli.append(time.perf_counter() - started)
    shard_bytes = sum(p.stat().st_size for p in (index_dir / "shards").iterdir())
    shard_bytes += (index_dir / "index.json").stat().st_size
    blob_bytes = sum(p.stat().st_size for p in (index_dir / "refs").rglob("*.json"))
    return {"references": n, "build_seconds": build_seconds, "build_executor": executor_name,
            "open_seconds": statistics.median(opens), "rows": rows, "strangers": false, "cli_seconds": cli,
            "signature_bytes_per_reference": shard_bytes / n, "stored_bytes_per_reference": blob_bytes / n}


def _family_of(ident: str) -> str:
    """A zoo base's id names its architecture first (the zoo's families are its architectures)."""
    return ident.split("-")[0]


def _kind(name: str) -> str:
    for kind in (*EVASIONS, "ft-light", "ft-heavy", "lora", "fp16", "bf16", "int8", "resharded"):
        if name.endswith(kind):
            return kind
    return "other"


# ------------------------------------------------------------------------------------------ batch


def synthetic_models(work: Path, count: int, params: float) -> list[Path]:
    from bench.fingerprint_speed import layers_for, write_checkpoint

    folder = work / "synthetic"
    layers = layers_for(params)
    paths = []
    for n in range(count):
        target = folder / f"tinyllama-{layers}l-{n}"
        if not (target / "config.json").exists():
            write_checkpoint(target, layers)
            log(f"{target.name}: written")
        paths.append(target)
    return paths


def bench_batch(work: Path, name: str, models: list[Path], rounds: int) -> dict[str, Any]:
    """Local and Ray runs of the same batch, interleaved `rounds` times (the machine's load drifts)."""
    from tg_verify.batch import run_batch
    from tg_verify.scale.ray_executor import RayExecutor

    settings = FingerprintSettings(device="cpu")
    results: dict[str, Any] = {"models": len(models),
                               "gigabytes": sum(f.stat().st_size for m in models for f in Path(m).iterdir()) / 1e9,
                               "local": [], "ray": []}
    for _ in range(rounds):
        for label in ("local", "ray"):
            out = work / f"batch-{name}-{label}"
            shutil.rmtree(out, ignore_errors=True)
            executor = RayExecutor() if label == "ray" else None
            started = time.perf_counter()
            result = run_batch(models, out, settings, force=True, executor=executor)
            seconds = time.perf_counter() - started
            failed = [o.message for o in result.outcomes if o.status == "failed"]
            assert result.count("computed") == len(models), failed
            results[label].append({"seconds": seconds, "job_cpu_seconds": sum(o.cpu_seconds for o in result.outcomes)})
            log(f"batch {name} {label}: {seconds:.1f}s")
        local = {p.name: p.read_bytes() for p in (work / f"batch-{name}-local").glob("*.json")}
        remote = {p.name: p.read_bytes() for p in (work / f"batch-{name}-ray").glob("*.json")}
        results["identical"] = results.get("identical", True) and local == remote and len(local) == len(models)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(results["local"], results["ray"])]
    results["ratios"] = ratios
    return results


def bench_memory(models: list[Path]) -> list[dict[str, Any]]:
    from tg_verify.artifact import resolve
    from tg_verify.scale.memory import working_set

    rows = []
    for model in models:
        for threads in (1, 2):
            script = ("import sys\nfrom tg_verify.batch import fingerprint_model\n"
                      "from tg_verify.fingerprint.settings import FingerprintSettings\n"
                      f"fingerprint_model(sys.argv[1], FingerprintSettings(device='cpu'), threads={threads})\n" + HWM)
            done = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True,
                                  check=True)
            artifact = resolve(model)
            rows.append({"model": model.name, "gigabytes": sum(f.size for f in artifact.files) / 1e9,
                         "threads": threads, "estimate": working_set(artifact, threads),
                         "peak": int(done.stdout.strip().splitlines()[-1])})
    return rows


# ------------------------------------------------------------------------------------------ report


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def report(results: dict[str, Any]) -> None:
    print("### Batch throughput: local executor vs Ray executor, same models, same run\n")
    load = ", ".join(f"{v:.1f}" for v in results["load_average"])
    print(f"Machine: {os.cpu_count()} cores, shared (load average {load} when Ray started); Ray: a local cluster of "
          f"{results['ray_cpus']} CPUs, one task per model (1 compute thread each); local: one model at a time with "
          "the default threads. Job CPU-s: CPU time inside each model's job, all its threads.\n")
    print(f"Medians of {len(next(iter(results['batch'].values()))['ratios'])} interleaved rounds; the ratio's range "
          "in brackets.\n")
    print("| models | count | GB | local s | Ray s | throughput Ray / local | job CPU-s per model (local / Ray) | "
          "job CPU-s per GB (local / Ray) | outputs identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, row in results["batch"].items():
        local = {k: statistics.median(r[k] for r in row["local"]) for k in ("seconds", "job_cpu_seconds")}
        ray = {k: statistics.median(r[k] for r in row["ray"]) for k in ("seconds", "job_cpu_seconds")}
        ratios = row["ratios"]
        ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        per_model = f"{local['job_cpu_seconds'] / row['models']:.2f} / {ray['job_cpu_seconds'] / row['models']:.2f}"
        per_gb = f"{local['job_cpu_seconds'] / row['gigabytes']:.2f} / {ray['job_cpu_seconds'] / row['gigabytes']:.2f}"
        print(f"| {name} | {row['models']} | {row['gigabytes']:.2f} | {local['seconds']:.1f} | {ray['seconds']:.1f} | "
              f"{ratio} | {per_model} | {per_gb} | {'yes' if row['identical'] else 'NO'} |")
    print(f"\nRay cluster start-up (not in the times above): {results['ray_start_seconds']:.1f} s; "
          f"warm-up batch (workers importing torch): {results['ray_warmup_seconds']:.1f} s.\n")

    s = results["search"]
    rows = s["rows"]
    print(f"### Lineage search at {s['references']:,} references\n")
    print("| candidates | count | retrieval recall@1 | retrieval recall@10 | search finds the base (first hit, "
          "derived) | family attributed | lowest base score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    kinds = sorted({r["kind"] for r in rows})
    for kind in [*kinds, "all"]:
        chosen = [r for r in rows if kind == "all" or r["kind"] == kind]
        label = f"**{kind}**" if kind == "all" else kind
        scores = [r["base_score"] for r in chosen if r["base_score"] is not None]
        print(f"| {label} | {len(chosen)} | {_share(chosen, lambda r: r['rank'] <= 1)} | "
              f"{_share(chosen, lambda r: r['rank'] <= 10)} | {_share(chosen, lambda r: r['found'])} | "
              f"{_share(chosen, lambda r: r['family'] == r['true_family'])} | {min(scores):.3f} |")
    false_derived = sum(len(r["false_bases"]) for r in rows)
    strangers = s["strangers"]
    by_family: dict[str, int] = {}
    for r in rows:
        if r["false_bases"]:
            by_family[r["true_family"]] = by_family.get(r["true_family"], 0) + len(r["false_bases"])
    where = ", ".join(f"{n} for {f} candidates" for f, n in sorted(by_family.items()))
    print(f"\nOther references the lineage test called derived in the candidates' top 10: {false_derived} of "
          f"{9 * len(rows)} unrelated pairs tested{f' ({where})' if where else ''}. Independently trained strangers "
          f"(never indexed, not mixed into distractors): {sum(1 for r in strangers if r['derived'])} of "
          f"{len(strangers)} got a base by the lineage test, {sum(1 for r in strangers if r['family'])} a family; "
          f"highest retrieval similarity {max(r['best_similarity'] for r in strangers):.3f}.\n")
    seconds = [r["seconds"] for r in rows]
    retrieval = [r["retrieval"] for r in rows]
    exact = [r["exact"] for r in rows]
    print("| latency (index loaded once) | median | p95 |")
    print("|---|---:|---:|")
    print(f"| retrieval (signature of the candidate, {s['references']:,} dot products, top 10) | "
          f"{1000 * statistics.median(retrieval):.1f} ms | {1000 * _p95(retrieval):.1f} ms |")
    print(f"| the ten exact lineage tests | {statistics.median(exact):.3f} s | {_p95(exact):.3f} s |")
    attribution = [r["attribution"] for r in rows]
    print(f"| the statistical attribution over the short list | {1000 * statistics.median(attribution):.1f} ms | "
          f"{1000 * _p95(attribution):.1f} ms |")
    print(f"| **whole search** (`search()`: retrieval, tests, attribution) | **{statistics.median(seconds):.3f} s** | "
          f"**{_p95(seconds):.3f} s** |")
    print(f"\nOpening the index (read, digests checked, validated): {s['open_seconds']:.3f} s; the whole CLI "
          f"(`tg-verify search ... --json`, Python start-up and imports included), median of "
          f"{len(s['cli_seconds'])}: {statistics.median(s['cli_seconds']):.2f} s.")
    build = (f"built in {s['build_seconds']:.0f} s with the {s['build_executor']} executor"
             if s["build_seconds"] is not None else "reused from an earlier run")
    print(f"Index size per reference: {s['signature_bytes_per_reference']:.0f} bytes of signature, features and "
          f"entry (what search reads), plus {s['stored_bytes_per_reference'] / 1e3:.1f} kB of stored fingerprint "
          f"(read only for the short list); {build}.\n")

    print("### Working set: estimate (scheduling) vs measured peak RSS\n")
    print("| model | GB | threads | estimate MB | peak RSS MB | peak / estimate |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in results["memory"]:
        print(f"| {row['model']} | {row['gigabytes']:.2f} | {row['threads']} | {row['estimate'] / 2**20:.0f} | "
              f"{row['peak'] / 2**20:.0f} | {row['peak'] / row['estimate']:.2f} |")


def _share(rows: list[dict[str, Any]], test: Callable[[dict[str, Any]], bool]) -> str:
    hits = sum(1 for r in rows if test(r))
    return f"{hits}/{len(rows)} ({100 * hits / max(len(rows), 1):.0f}%)"


def _invalidate_stale_caches(work: Path) -> None:
    """Fingerprints, distractors and indexes made by another feature, sketch or signature version are remade."""
    from tg_verify.fingerprint.document import FEATURE_VERSION
    from tg_verify.fingerprint.sketch import SKETCH_VERSION
    from tg_verify.index.signature import parameters

    key = json.dumps({"features": FEATURE_VERSION, "sketch": SKETCH_VERSION, "signature": parameters()},
                     sort_keys=True)
    marker = work / "versions.json"
    if marker.exists() and marker.read_text() == key:
        return
    for name in ("candidates", "roots", "evasion-models", "root-models"):
        shutil.rmtree(work / name, ignore_errors=True)
    for path in work.glob("references-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in work.glob("index-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (ZOO_OUT / "fingerprints", work / "zoo-quick" / "fingerprints"):
        shutil.rmtree(path, ignore_errors=True)
    marker.write_text(key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and output directory")
    parser.add_argument("--references", type=int, default=10_000, help="references in the search index")
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic bf16 checkpoints for the batch bench")
    parser.add_argument("--synthetic-params", type=float, default=3e8, help="parameters of each synthetic checkpoint")
    parser.add_argument("--index-executor", choices=("local", "ray"), default="ray",
                        help="executor that builds the search index")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved local/Ray rounds of each batch")
    parser.add_argument("--quick", action="store_true", help="two architectures, 2,000 references")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work
    total = 2_000 if args.quick else args.references
    work.mkdir(parents=True, exist_ok=True)

    _invalidate_stale_caches(work)
    models, candidates, bases = zoo_and_candidates(work, args.quick)
    shape_roots = roots(work, args.quick)
    references = make_references(work, bases, shape_roots, total)

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start = time.perf_counter() - started
    results: dict[str, Any] = {"ray_cpus": int(ray.cluster_resources().get("CPU", 0)), "ray_start_seconds": ray_start,
                               "load_average": os.getloadavg()}
    from tg_verify.batch import run_batch
    from tg_verify.scale.ray_executor import RayExecutor

    started = time.perf_counter()  # the first tasks start Ray workers, which import torch once each
    run_batch([m.path for m in models[:4]], work / "batch-warmup", FingerprintSettings(device="cpu"), force=True,
              executor=RayExecutor())
    results["ray_warmup_seconds"] = time.perf_counter() - started

    strangers = [paths[ROOTS - 1] for paths in shape_roots.values()]
    results["search"] = bench_search(work, references, candidates, strangers, args.index_executor)
    synthetic = synthetic_models(work, args.synthetic, args.synthetic_params)
    results["batch"] = {
        "bench zoo (tiny trained models)": bench_batch(work, "zoo", [m.path for m in models], args.rounds),
        f"synthetic {args.synthetic_params / 1e9:.1f}B bf16": bench_batch(work, "synthetic", synthetic, args.rounds),
    }
    ray.shutdown()
    results["memory"] = bench_memory([synthetic[0], models[0].path])
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
