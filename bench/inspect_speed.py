"""Time `tg-verify inspect` (no hashing) on a synthetic ~2.5 GB sharded checkpoint shaped like Llama-3.2-1B.

Writes 3 BF16 shards + model.safetensors.index.json + config.json (147 tensors, 1.24 B parameters)
into a temporary directory, then times, in the same run:
  - tg-verify resolve()+describe() in-process (the header-only work),
  - the full CLI `tg-verify inspect --json` as a fresh process (what a user waits for),
  - baselines: the reference parser (safetensors.safe_open, header + shapes of every tensor),
    a bare Python start, and reading every byte (sha256, what --hash costs).
Prints medians and ratios, then deletes the checkpoint.

    python bench/inspect_speed.py [--repeats 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, VOCAB, KV = 2048, 8192, 16, 128256, 512  # Llama-3.2-1B dimensions (tied embeddings)
CHUNK = 1 << 24


def tensor_specs() -> list[tuple[str, list[int]]]:
    """(name, shape) for every tensor of a Llama-3.2-1B-shaped checkpoint, in HF order."""
    specs = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        specs += [(p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]), (p + "self_attn.k_proj.weight", [KV, HIDDEN]),
                  (p + "self_attn.v_proj.weight", [KV, HIDDEN]), (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
                  (p + "mlp.gate_proj.weight", [INTER, HIDDEN]), (p + "mlp.up_proj.weight", [INTER, HIDDEN]),
                  (p + "mlp.down_proj.weight", [HIDDEN, INTER]), (p + "input_layernorm.weight", [HIDDEN]),
                  (p + "post_attention_layernorm.weight", [HIDDEN])]
    specs.append(("model.norm.weight", [HIDDEN]))
    return specs


def write_shard(path: Path, specs: list[tuple[str, list[int]]], block: bytes) -> int:
    """Stream one BF16 safetensors shard to disk (header, then data in 16 MiB blocks); returns bytes of data."""
    header, cursor = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        remaining = cursor
        while remaining:
            n = min(remaining, len(block))
            handle.write(block[:n])
            remaining -= n
    return cursor


def build(root: Path, shards: int = 3) -> int:
    """Write the checkpoint; returns total bytes on disk."""
    root.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs()
    block = hashlib.shake_256(b"tg-verify bench").digest(CHUNK)  # incompressible, deterministic
    sizes = [2 * eval("*".join(map(str, s)) or "1") for _, s in specs]  # noqa: S307 - our own literals
    target, groups, current, acc = sum(sizes) / shards, [[]], 0, 0.0
    for spec, size in zip(specs, sizes):
        if acc >= target * (current + 1) and current < shards - 1:
            groups.append([])
            current += 1
        groups[-1].append(spec)
        acc += size
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_shard(root / name, group, block)
        weight_map.update({n: name for n, _ in group})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
         "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": VOCAB, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}))
    return sum(p.stat().st_size for p in root.iterdir())


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="tg-inspect-bench-"))
    try:
        started = time.perf_counter()
        total = build(root)
        print(f"checkpoint: {root} ({total / 1e9:.2f} GB, written in {time.perf_counter() - started:.1f} s)")

        from safetensors import safe_open

        from tg_verify.artifact.layout import resolve
        from tg_verify.artifact.summary import describe

        document = describe(resolve(root))
        print(f"  {document['tensor_count']} tensors, {document['total_params']:,} parameters, "
              f"{len(document['files'])} files, layout {document['artifact']['layout']}")

        def reference() -> None:
            for shard in sorted(root.glob("*.safetensors")):
                with safe_open(str(shard), "pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                        handle.get_slice(key).get_shape()

        def read_all() -> None:
            for path in sorted(root.iterdir()):
                with open(path, "rb") as handle:
                    digest = hashlib.sha256()
                    while chunk := handle.read(CHUNK):
                        digest.update(chunk)

        cli = [sys.executable, "-m", "tg_verify", "inspect", "--json", str(root)]
        rows = [
            ("tg-verify resolve+describe (in-process)", median_time(lambda: describe(resolve(root)), args.repeats)),
            ("safetensors safe_open, all shapes (reference parser)", median_time(reference, args.repeats)),
            ("tg-verify inspect --json (full CLI process)",
             median_time(lambda: subprocess.run(cli, check=True, capture_output=True), args.repeats)),
            ("python -c pass (interpreter start)",
             median_time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.repeats)),
            ("sha256 of every byte (what --hash adds, page cache warm)", median_time(read_all, 1)),
        ]
        inspect_cli = rows[2][1]
        print(f"median of {args.repeats} (sha256: 1 run):")
        for label, seconds in rows:
            print(f"  {label:58s} {seconds * 1000:9.1f} ms   {seconds / inspect_cli:7.2f}x the CLI")
        print(f"target: inspect (no hashing) < 2 s -> {'met' if inspect_cli < 2 else 'NOT met'} "
              f"({inspect_cli:.2f} s)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
