"""Speed and memory of `tg-verify fingerprint` against the I/O floor, sha256 and a paper-style autograd baseline.

Writes a synthetic Llama-shaped bf16 checkpoint (TinyLlama-1.1B shapes by default: hidden 2048, MLP 5632,
32 heads / 4 KV heads, vocab 32000; random values written directly with safetensors, no model built) in
~1 GB shards, warms the page cache, then measures each step in its own child process so that peak RSS
(ru_maxrss) belongs to that step alone:

  read         plain sequential read of every file (the I/O floor)
  sha256sum    coreutils sha256sum over the files; hashlib  the same in Python (what tg-verify runs)
  fingerprint  resolve + fingerprint_artifact as the CLI runs it: features + lineage evidence (sketch and
               blocks), one thread per core, one of them hashing (sha256) the files first
  features     the same without hashing and without the lineage evidence, one thread (the TensorGuard
               computation alone)
  +sketch      features + lineage evidence (sketch and blocks), one thread, no hashing
  blocks       the block evidence alone, as the CLI runs it (fingerprint/blocks.py: its own read of v, o, up, down)
  +sha256      features + sha256, threads as the CLI, no sketch
  baseline     transformers from_pretrained (float32) + literal L.backward() per repeat for the same
               statistics (skewness/kurtosis from 500k sampled entries, as the paper); backward passes
               timed on a subset of tensors and repeats, extrapolated per byte and to 30 repeats

Interpreter + import start-up is reported separately; every ratio uses wall times of one run.

With --cold, a second table times `read` and `fingerprint` with the checkpoint evicted from the page cache
before each (posix_fadvise DONTNEED on every file: no root needed): the I/O floor of a checkpoint read from
this machine's disk, which is what a runner that has just fetched or mounted a model pays.

    python bench/fingerprint_speed.py                 # the full 1.1B model (~2.2 GB on disk)
    python bench/fingerprint_speed.py --params 3e8    # quicker, fewer layers
    python bench/fingerprint_speed.py --skip-baseline --cold   # + the same from disk
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB, FULL_LAYERS = 2048, 5632, 32, 4, 32000, 22
SHARD_BYTES = 1 << 30
# Backward passes per timed tensor; the paper's 30 are extrapolated from these (the baseline is slow).
BASELINE_REPEATS = 5
PAPER_REPEATS = 30
CHUNK = 1 << 24


def layer_shapes(hidden: int = HIDDEN) -> dict[str, tuple[int, ...]]:
    kv = hidden // HEADS * KV_HEADS
    return {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (INTERMEDIATE, hidden), "mlp.up_proj.weight": (INTERMEDIATE, hidden),
            "mlp.down_proj.weight": (hidden, INTERMEDIATE)}


def model_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                                          "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer_shapes().items()})
    return shapes


def layers_for(params: float) -> int:
    per_layer = sum(a * (b if len(s) > 1 else 1) for s in layer_shapes().values() for a, b in [(s[0], s[-1])])
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((params - fixed) / per_layer))


def write_checkpoint(directory: Path, layers: int) -> int:
    """Random bf16 weights (N(0, 0.02²), norms 1) in ~1 GB shards + index + config; returns parameters."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shapes = model_shapes(layers)
    generator = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            shape = shapes[name]
            tensors[name] = (torch.ones(shape) if len(shape) == 1 else
                             torch.randn(shape, generator=generator).mul_(0.02)).to(torch.bfloat16)
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
        del tensors
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def _numel(directory: Path) -> list[int]:
    from math import prod

    shapes = model_shapes(json.loads((directory / "config.json").read_text())["num_hidden_layers"])
    return [prod(s) for s in shapes.values()]


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# ---- measurements, each run in a child process -------------------------------------------------------------
def measure_read(directory: Path) -> dict[str, float]:
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    total = 0
    for path in weight_files(directory):
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return {"wall_s": time.perf_counter() - started, "bytes": total}


def measure_hashlib(directory: Path) -> dict[str, float]:
    import hashlib

    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    started = time.perf_counter()
    for path in weight_files(directory):
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(view[:count])
    return {"wall_s": time.perf_counter() - started}


def measure_fingerprint(directory: Path, hashing: bool, sketch: bool, device: str = "cpu") -> dict[str, float]:
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    started = time.perf_counter()
    artifact = resolve(directory)
    digests = None if hashing else {f.path: "0" * 64 for f in artifact.files}
    # Without hashing, one compute thread: the TensorGuard cost per core, not the machine's current load.
    fingerprint = fingerprint_artifact(artifact, FingerprintSettings(device=device, sketch=sketch), digests=digests,
                                       threads=None if hashing else 1)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "analysed": fingerprint.extraction["analysed_tensors"],
            "global_std": fingerprint.features["global_std"]}


def measure_blocks(directory: Path) -> dict[str, float]:
    """The block evidence alone (fingerprint/blocks.py), as the fingerprint builds it after its stream (a layer per
    computing thread, torch's threads at one)."""
    import torch

    from tg_verify.artifact import open_reader, resolve
    from tg_verify.fingerprint.blocks import build_blocks
    from tg_verify.fingerprint.workers import default_threads

    torch.set_num_threads(1)
    started = time.perf_counter()
    artifact = resolve(directory)
    with open_reader(artifact) as reader:
        blocks = build_blocks(artifact, reader, threads=default_threads())
    assert blocks is not None
    return {"wall_s": time.perf_counter() - started, "layers": float(len(blocks["units"]))}


def measure_baseline(directory: Path, subset: int, repeats: int) -> dict[str, float]:
    """The paper's way: whole model in float32 via transformers, one backward pass per repeat per tensor."""
    import torch
    import transformers

    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    load_s = time.perf_counter() - started
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim == 2]
    picks = sorted({round(i * (len(matrices) - 1) / max(1, subset - 1)) for i in range(subset)})
    torch.manual_seed(0)
    sampler = torch.Generator().manual_seed(0)
    timed_bytes = 0
    backward_s = 0.0
    for index in picks:
        name, param = matrices[index]
        begin = time.perf_counter()
        for _ in range(repeats):
            x = torch.randn(1, param.shape[1]) + 0.1 * torch.randn(1, param.shape[1])
            param.grad = None
            loss = torch.linalg.vector_norm(x @ param.T)
            loss.backward()
            g = param.grad
            mean, std = g.mean(), g.std(unbiased=False)
            # as the paper: skewness and kurtosis from 500,000 seeded sampled entries
            sample = g.flatten()[torch.randint(g.numel(), (min(g.numel(), 500_000),), generator=sampler)]
            z = (sample - mean) / std
            _ = (mean.item(), std.item(), torch.linalg.norm(g).item(), (z ** 3).mean().item(), (z ** 4).mean().item())
        param.grad = None
        backward_s += time.perf_counter() - begin
        timed_bytes += param.numel() * 2  # bytes of the bf16 checkpoint this tensor came from
    total_bytes = sum(p.numel() * 2 for _, p in matrices)
    extrapolated = backward_s * total_bytes / timed_bytes * PAPER_REPEATS / repeats
    return {"wall_s": load_s + extrapolated, "load_s": load_s, "backward_timed_s": backward_s,
            "tensors_timed": len(picks), "tensors_total": len(matrices), "repeats_timed": repeats}


def child(kind: str, directory: Path, subset: int, repeats: int, params: float, device: str = "cpu") -> None:
    if kind == "write":  # in a child too, so the parent stays small (fork copies its peak RSS)
        layers = layers_for(params)
        print(json.dumps({"params": write_checkpoint(directory, layers), "layers": layers}))
        return
    t0 = time.perf_counter()
    cpu_at_start = 0.0
    if kind in ("fingerprint", "features", "+sketch", "+sha256", "blocks"):
        import tg_verify.fingerprint.extract  # noqa: F401  (import start-up, reported separately)
    elif kind == "baseline":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    import_s = time.perf_counter() - t0
    start_usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_start = start_usage.ru_utime + start_usage.ru_stime  # CPU seconds of the step, imports excluded
    if kind == "read":
        result = measure_read(directory)
    elif kind == "sha256sum":
        result = measure_sha256sum(directory)
        result["import_s"] = 0.0
        print(json.dumps(result))
        return
    elif kind == "hashlib":
        result = measure_hashlib(directory)
    elif kind == "fingerprint":
        result = measure_fingerprint(directory, hashing=True, sketch=True, device=device)
    elif kind == "features":
        result = measure_fingerprint(directory, hashing=False, sketch=False, device=device)
    elif kind == "+sketch":
        result = measure_fingerprint(directory, hashing=False, sketch=True, device=device)
    elif kind == "+sha256":
        result = measure_fingerprint(directory, hashing=True, sketch=False, device=device)
    elif kind == "blocks":
        result = measure_blocks(directory)
    else:
        result = measure_baseline(directory, subset, repeats)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["import_s"] = import_s
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["cpu_s"] = usage.ru_utime + usage.ru_stime - cpu_at_start
    print(json.dumps(result))


QUICK_STEPS = ("read", "sha256sum", "hashlib", "features", "+sketch", "+sha256", "blocks", "fingerprint")


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median wall time (the run itself, so its other fields stay consistent); RSS is the max over runs."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    chosen["walls"] = [round(r["wall_s"], 2) for r in runs]
    return chosen


def evict(directory: Path) -> None:
    """Drop the checkpoint's pages from the page cache (clean pages of unmapped files go, so written ones are
    flushed first; no root needed)."""
    for path in weight_files(directory):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def cold_rounds(directory: Path, args: argparse.Namespace) -> None:
    """`read` and `fingerprint` from disk, interleaved, each after evicting the files; prints the medians."""
    runs: dict[str, list[dict[str, float]]] = {"read": [], "fingerprint": []}
    for _ in range(args.rounds):
        for kind in runs:
            evict(directory)
            runs[kind].append(run_child(kind, directory, args))
    read, fingerprint = _median(runs["read"]), _median(runs["fingerprint"])
    print(f"\nfrom disk (page cache evicted before each step), median of {args.rounds} interleaved rounds")
    for kind, result in (("read", read), ("fingerprint", fingerprint)):
        print(f"{kind:<12} {result['wall_s']:8.2f} s  x read {result['wall_s'] / read['wall_s']:5.2f}  "
              f"cpu s {result.get('cpu_s', float('nan')):6.2f}  {result['walls']}")
    ratios = sorted(f["wall_s"] / r["wall_s"] for f, r in zip(runs["fingerprint"], runs["read"]))
    print(f"fingerprint / read from disk within each round: {', '.join(f'{x:.2f}' for x in ratios)}")


def _gpu_name() -> str:
    """' (<the GPU's name>)' as torch sees it, in this (parent) process."""
    import torch

    return f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else " (no CUDA device visible)"


def run_child(kind: str, directory: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", kind, "--dir", str(directory), "--subset", str(args.subset),
               "--params", str(args.params), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_sha256sum(directory: Path) -> dict[str, float]:
    """coreutils sha256sum as a grandchild, so RUSAGE_CHILDREN is its peak RSS alone."""
    if not shutil.which("sha256sum"):
        return {"wall_s": float("nan"), "peak_rss_mb": float("nan")}
    started = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, weight_files(directory))], capture_output=True, check=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=1.1e9, help="approximate parameter count (default 1.1e9)")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temp dir under bench/out)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--subset", type=int, default=6, help="tensors the autograd baseline times (extrapolated)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the quick steps (median)")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the transformers baseline")
    parser.add_argument("--cold", action="store_true", help="also time read and fingerprint from disk (cache evicted)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the fingerprint steps compute (`tg-verify fingerprint --device`); the block "
                             "evidence and the hashing stay on the CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.subset, BASELINE_REPEATS, args.params, args.device)
        return
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="fingerprint-speed-", dir=out))
    try:
        started = time.perf_counter()
        written = run_child("write", directory, args) if not (directory / "config.json").exists() else None
        params = written["params"] if written else sum(_numel(directory))
        layers = written["layers"] if written else json.loads((directory / "config.json").read_text())[
            "num_hidden_layers"]
        size = sum(p.stat().st_size for p in weight_files(directory))
        print(f"checkpoint: {params / 1e9:.3f}B parameters, {layers} layers, bf16, {len(weight_files(directory))} "
              f"shards, {size / 1e9:.2f} GB, written in {time.perf_counter() - started:.1f}s  ({directory})")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; fingerprint steps on "
              f"{args.device}{_gpu_name() if args.device == 'cuda' else ''}")
        measure_read(directory)  # warm the page cache
        # Interleaved rounds, median per step: a shared machine's load drifts within a minute.
        rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in QUICK_STEPS}
        for _ in range(args.rounds):
            for kind in QUICK_STEPS:
                rounds[kind].append(run_child(kind, directory, args))
        results = {kind: _median(runs) for kind, runs in rounds.items()}
        if not args.skip_baseline:
            results["baseline"] = run_child("baseline", directory, args)
        read = results["read"]["wall_s"]
        print(f"\nmedian of {args.rounds} interleaved rounds (all walls in brackets); baseline once")
        print(f"{'step':<12} {'wall s':>8} {'GB/s':>7} {'x read':>7} {'x hashlib':>9} {'peak RSS MB':>12} "
              f"{'import s':>9} {'cpu s':>7}")
        for kind, result in results.items():
            wall = result["wall_s"]
            print(f"{kind:<12} {wall:8.2f} {size / wall / 1e9:7.2f} {wall / read:7.2f} "
                  f"{wall / results['hashlib']['wall_s']:9.2f} {result['peak_rss_mb']:12.0f} {result['import_s']:9.2f}"
                  f" {result.get('cpu_s', float('nan')):7.2f}  {result.get('walls', '')}")
        if "baseline" in results:
            b = results["baseline"]
            print(f"\nbaseline: from_pretrained float32 {b['load_s']:.1f}s + backward passes timed on "
                  f"{b['tensors_timed']} of {b['tensors_total']} matrices x {b['repeats_timed']} repeats "
                  f"({b['backward_timed_s']:.1f}s), extrapolated per byte to all matrices and to 30 repeats")
            print(f"speed-up of fingerprint over the autograd baseline: "
                  f"{b['wall_s'] / results['fingerprint']['wall_s']:.1f}x "
                  f"(features alone: {b['wall_s'] / results['features']['wall_s']:.1f}x)")
        for kind in ("features", "+sha256", "fingerprint"):  # each round's own read: the load drifts
            ratios = sorted(f["wall_s"] / r["wall_s"] for f, r in zip(rounds[kind], rounds["read"]))
            print(f"{kind} / read within each round: {', '.join(f'{x:.2f}' for x in ratios)}; "
                  f"median {ratios[len(ratios) // 2]:.2f}x")
        print(f"targets: fingerprint <= 3x read (medians): without the sketch, features + sha256 digests "
              f"(--no-sketch) {results['+sha256']['wall_s'] / read:.2f}x; the default command, + lineage sketch "
              f"{results['fingerprint']['wall_s'] / read:.2f}x; features alone on 1 thread "
              f"{results['features']['wall_s'] / read:.2f}x; peak RSS <= 2500 MB: "
              f"{results['fingerprint']['peak_rss_mb']:.0f} MB")
        cpus = os.cpu_count() or 1
        floor = results["fingerprint"]["cpu_s"] / cpus
        print(f"arithmetic floor of the default command on {cpus} cores: its CPU seconds / cores = {floor:.2f} s = "
              f"{floor / read:.2f}x read")
        if args.cold:
            cold_rounds(directory, args)
        print(f"machine load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
