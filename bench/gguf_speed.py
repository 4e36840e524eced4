"""Cost of fingerprinting a GGUF file against a plain read of it plus dequantisation measured alone.

Writes a synthetic llama-architecture GGUF file (TinyLlama shapes: hidden 2048, MLP 5632, 32 heads / 4 KV
heads, vocab 32000; layers from --params) whose matrices are random blocks of one ggml type (scales set to
a small constant, so every value is finite; norms F32), warms the page cache, then measures each step in
its own child process so that peak RSS belongs to that step alone, in interleaved rounds (median):

  read         plain sequential read of the file (the I/O floor)
  dequant      every quantised tensor dequantised alone by gguf.quants.dequantize, over the validated byte
               ranges, one thread (the package's cost, what any GGUF fingerprint must pay)
  features     tg-verify's TensorGuard features alone: one thread, no hashing, no sketch
  fingerprint  resolve + fingerprint_artifact as the CLI runs it: features + sketch + sha256, default threads

and, once, resolve() of a header as big as published ones (262k tokens, 280k merges) against gguf's GGUFReader.

Target (docs/results.md): fingerprint <= 3 x (read + dequant) in the same run.

    python bench/gguf_speed.py [--params 3e8] [--types Q4_0,Q8_0,Q4_K] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
CHUNK = 1 << 24
SCALE_BYTES = {"Q4_0": (0,), "Q8_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "Q2_K": (80, 82), "Q3_K": (108,)}  # byte offsets of each block's f16 scales (ggml's block structs)


def layers_for(params: float) -> int:
    kv = HIDDEN // HEADS * KV_HEADS
    per_layer = 2 * HIDDEN * HIDDEN + 2 * kv * HIDDEN + 3 * INTERMEDIATE * HIDDEN + 2 * HIDDEN
    return max(1, round((params - 2 * VOCAB * HIDDEN - HIDDEN) / per_layer))


def _blocks(rows: int, row: int, qtype: str, generator: object) -> object:
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    data = generator.integers(0, 256, size=(rows * (row // block), size), dtype=np.uint8)  # type: ignore[attr-defined]
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    for offset in SCALE_BYTES[qtype]:
        data[:, offset:offset + 2] = scale
    return data.reshape(rows, -1)


def write_gguf(path: Path, layers: int, qtype: str) -> int:
    """The synthetic model; returns its parameter count."""
    import gguf
    import numpy as np

    generator = np.random.default_rng(0)
    kv = HIDDEN // HEADS * KV_HEADS
    writer = gguf.GGUFWriter(str(path), "llama", use_temp_file=True)
    for key, value in (("block_count", layers), ("embedding_length", HIDDEN), ("feed_forward_length", INTERMEDIATE),
                       ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS),
                       ("context_length", 2048)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_token_list([f"<{i}>" for i in range(VOCAB)])
    raw = gguf.GGMLQuantizationType[qtype]
    params = 0

    def matrix(name: str, rows: int, row: int) -> None:
        nonlocal params
        writer.add_tensor(name, _blocks(rows, row, qtype, generator), raw_dtype=raw)
        params += rows * row

    def norm(name: str) -> None:
        nonlocal params
        writer.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))
        params += HIDDEN

    matrix("token_embd.weight", VOCAB, HIDDEN)
    norm("output_norm.weight")
    matrix("output.weight", VOCAB, HIDDEN)
    for b in range(layers):
        norm(f"blk.{b}.attn_norm.weight")
        norm(f"blk.{b}.ffn_norm.weight")
        for leaf, rows, row in (("attn_q", HIDDEN, HIDDEN), ("attn_k", kv, HIDDEN), ("attn_v", kv, HIDDEN),
                                ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", INTERMEDIATE, HIDDEN),
                                ("ffn_up", INTERMEDIATE, HIDDEN), ("ffn_down", HIDDEN, INTERMEDIATE)):
            matrix(f"blk.{b}.{leaf}.weight", rows, row)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return params


# ---- measurements, each in a child process ---------------------------------------------------------------
def measure_read(path: Path) -> dict[str, float]:
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    return {"wall_s": time.perf_counter() - started}


def measure_dequant(path: Path) -> dict[str, float]:
    import mmap

    import gguf
    import numpy as np

    from tg_verify.artifact import resolve

    started = time.perf_counter()
    artifact = resolve(path)
    largest = 0
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        for info in artifact.tensors:
            if info.dtype in ("F32", "F16", "BF16"):
                continue
            qtype = gguf.GGMLQuantizationType[info.dtype]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = np.frombuffer(buffer, dtype=np.uint8, count=info.nbytes, offset=info.begin)
            values = gguf.quants.dequantize(data.reshape(-1, info.shape[-1] // block * size), qtype)
            largest = max(largest, values.nbytes)
            del data, values
    return {"wall_s": time.perf_counter() - started, "largest_float32_mb": largest / 2**20}


def measure_fingerprint(path: Path, cli: bool) -> dict[str, float]:
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    started = time.perf_counter()
    artifact = resolve(path)
    digests = None if cli else {f.path: "0" * 64 for f in artifact.files}
    fingerprint = fingerprint_artifact(artifact, FingerprintSettings(device="cpu", sketch=cli), digests=digests,
                                       threads=None if cli else 1)
    return {"wall_s": time.perf_counter() - started, "analysed": fingerprint.extraction["analysed_tensors"]}


def child(kind: str, path: Path) -> None:
    t0 = time.perf_counter()
    if kind in ("features", "fingerprint"):
        import tg_verify.fingerprint.extract  # noqa: F401  (import start-up, reported separately)
    if kind == "dequant":
        import gguf  # noqa: F401
    import_s = time.perf_counter() - t0
    result = {"read": lambda: measure_read(path), "dequant": lambda: measure_dequant(path),
              "features": lambda: measure_fingerprint(path, cli=False),
              "fingerprint": lambda: measure_fingerprint(path, cli=True)}[kind]()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["import_s"] = import_s
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    print(json.dumps(result))


def run_child(kind: str, path: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--file", str(path)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


STEPS = ("read", "dequant", "features", "fingerprint")


def bench_type(path: Path, rounds: int) -> dict[str, dict[str, float]]:
    measure_read(path)  # warm the page cache
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in STEPS}
    for _ in range(rounds):
        for kind in STEPS:
            runs[kind].append(run_child(kind, path))
    results = {}
    for kind, values in runs.items():
        ordered = sorted(values, key=lambda r: r["wall_s"])
        chosen = dict(ordered[len(ordered) // 2])
        chosen["peak_rss_mb"] = max(r["peak_rss_mb"] for r in values)
        chosen["walls"] = [round(r["wall_s"], 2) for r in values]
        results[kind] = chosen
    # each round's own ratio too: a shared machine's load drifts within a minute
    results["ratios"] = {"fingerprint": sorted(f["wall_s"] / (r["wall_s"] + d["wall_s"]) for f, r, d in
                                               zip(runs["fingerprint"], runs["read"], runs["dequant"])),
                         "features": sorted(f["wall_s"] / (r["wall_s"] + d["wall_s"]) for f, r, d in
                                            zip(runs["features"], runs["read"], runs["dequant"]))}
    return results


def header_speed(directory: Path, tokens: int = 262_144, merges: int = 280_000, repeats: int = 5) -> str:
    """resolve() on a header as big as published ones (a Gemma-3-sized vocabulary plus BPE merges) against the
    gguf package's own GGUFReader on the same file (which trusts the file and validates nothing)."""
    import statistics

    import gguf
    import numpy as np

    from tg_verify.artifact import resolve

    path = directory / "big-vocabulary.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("attention.head_count_kv", 2)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_token_list([f"tok{i:06d}" for i in range(tokens)])
    writer.add_array("tokenizer.ggml.merges", [f"t{i % 977} m{i:06d}" for i in range(merges)])
    writer.add_array("tokenizer.ggml.token_type", [1] * tokens)
    generator = np.random.default_rng(0)
    shapes = {"token_embd.weight": (tokens, 64), "output_norm.weight": (64,), "blk.0.attn_norm.weight": (64,),
              "blk.0.ffn_norm.weight": (64,), "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (64, 64),
              "blk.0.attn_v.weight": (64, 64), "blk.0.attn_output.weight": (64, 64),
              "blk.0.ffn_gate.weight": (64, 64), "blk.0.ffn_up.weight": (64, 64), "blk.0.ffn_down.weight": (64, 64)}
    for name, shape in shapes.items():
        writer.add_tensor(name, generator.standard_normal(shape).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = resolve(path).metadata[path.name]
    ours, theirs = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        resolve(path)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        reader = gguf.GGUFReader(str(path))
        theirs.append(time.perf_counter() - started)
        del reader
    mine, reference = statistics.median(ours), statistics.median(theirs)
    return (f"header: {tokens} tokens + {merges} merges ({header['tokenizer.ggml.merges']}), "
            f"{path.stat().st_size / 1e6:.1f} MB file: resolve() (every field validated, mapped, vocabulary kept) "
            f"{mine:.2f} s; gguf.GGUFReader (validates nothing) {reference:.2f} s; ratio {mine / reference:.2f}x "
            f"(medians of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=3e8, help="approximate parameter count (default 3e8)")
    parser.add_argument("--types", default="Q4_0,Q8_0,Q4_K", help="ggml types of the matrices, one file each")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per type (median)")
    parser.add_argument("--header-only", action="store_true", help="only the big-vocabulary header measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.file)
        return
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    layers = layers_for(args.params)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print("| type | file GB | read s | dequant s | features s (1 thread) | fingerprint s (CLI) | fingerprint / "
          "(read + dequant) | features / (read + dequant) | peak RSS MB: dequant, features, fingerprint | "
          "largest tensor f32 MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="gguf-speed-", dir=out) as directory:
        for qtype in [] if args.header_only else args.types.split(","):
            path = Path(directory) / f"llama-{qtype}.gguf"
            params = write_gguf(path, layers, qtype)
            r = bench_type(path, args.rounds)
            floor = r["read"]["wall_s"] + r["dequant"]["wall_s"]
            print(f"| {qtype} ({params / 1e9:.2f}B, {layers} layers) | {path.stat().st_size / 1e9:.2f} | "
                  f"{r['read']['wall_s']:.2f} | {r['dequant']['wall_s']:.2f} | {r['features']['wall_s']:.2f} | "
                  f"{r['fingerprint']['wall_s']:.2f} | {r['fingerprint']['wall_s'] / floor:.2f} "
                  f"(rounds {', '.join(f'{x:.2f}' for x in r['ratios']['fingerprint'])}) | "
                  f"{r['features']['wall_s'] / floor:.2f} | {r['dequant']['peak_rss_mb']:.0f}, "
                  f"{r['features']['peak_rss_mb']:.0f}, {r['fingerprint']['peak_rss_mb']:.0f} | "
                  f"{r['dequant']['largest_float32_mb']:.0f} |", flush=True)
            path.unlink()
        print("\n" + header_speed(Path(directory)))
    print(f"\nmedians of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
