"""GGUF fidelity: how far a model's GGUF quantisations fingerprint from its safetensors original.

For each tiny architecture (llama, qwen2, gemma, phi3, mistral; "medium" size, trained with bench/zoo.py's
`train` on Python stdlib text) a base and an independently trained twin (other seed, other data order).
The base is written to GGUF in-process with the gguf package's writer, as llama.cpp's converter plus
llama-quantize would (tg_verify.tiny.save_gguf), at every type gguf.quants can quantise; each file is
fingerprinted like any model and compared with the safetensors original:

  relative    scale-free feature distance (mean Canberra term, 0 = equal; `tg-verify compare` without refs)
  paper       the paper's Euclidean distance in the 15-feature space standardised on the ten originals
              (bases and twins); "same model" when <= 7
  lineage     lineage_test(GGUF, original): score, threshold, derived, p-value (defaults, as `compare`)
  twin        lineage_test(GGUF, twin): the same file against a model it does NOT derive from

    python bench/gguf_fidelity.py [--work bench/out/gguf_fidelity] [--steps 150]

Prints one Markdown table; writes WORK/results.json. Trained models are cached in WORK.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.zoo import VOCAB, _load, _seed, corpus, train  # noqa: E402
from tg_verify.analysis.lineage import lineage_test  # noqa: E402
from tg_verify.analysis.space import FeatureSpace, euclidean, relative_distance  # noqa: E402
from tg_verify.artifact import resolve  # noqa: E402
from tg_verify.fingerprint.document import VECTOR_FEATURES, Fingerprint  # noqa: E402
from tg_verify.fingerprint.extract import fingerprint_artifact  # noqa: E402
from tg_verify.fingerprint.settings import FingerprintSettings  # noqa: E402
from tg_verify.tiny import ARCHITECTURES, build_model, one_thread, save_gguf, save_model  # noqa: E402

DEFAULT_WORK = ROOT / "bench" / "out" / "gguf_fidelity"
PAPER_THRESHOLD = 7.0
SIZE = "medium"  # hidden 96, MLP 192: rows are whole 32-element blocks (Q8_0, Q4_*, Q5_*, MXFP4)


def quantisable_types() -> list[str]:
    """Every ggml type gguf.quants can write, best first (asked of the package, not assumed)."""
    import gguf
    import numpy as np

    sample = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    found = []
    for qtype in gguf.GGMLQuantizationType:
        try:
            gguf.quants.quantize(sample, qtype)
        except (NotImplementedError, ValueError, gguf.quants.QuantError):
            continue
        found.append(qtype.name)
    order = ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4", "TQ2_0", "TQ1_0"]
    return sorted(found, key=lambda name: order.index(name) if name in order else len(order))


def trained(arch: str, role: str, steps: int, work: Path, log: Any) -> Path:
    """A trained medium model (base or twin) saved as safetensors under WORK/models, reused when present."""
    directory = work / "models" / f"{arch}-{role}-{steps}"
    if (directory / "model.safetensors").exists():
        return directory
    started = time.perf_counter()
    model = build_model(arch, seed=_seed(arch, role), size=SIZE, vocab_size=VOCAB)
    loss = train(model, corpus("pretrain", 400_000), steps, 3e-3, _seed(arch, role, "pretrain"), 8, 64)
    save_model(model, directory)
    log(f"{arch}-{role}: trained {steps} steps, loss {loss:.2f} ({time.perf_counter() - started:.0f}s)")
    return directory


def fingerprint(path: Path, name: str, settings: FingerprintSettings) -> Fingerprint:
    return fingerprint_artifact(resolve(path), settings, model_name=name)


def lineage(candidate: Fingerprint, reference: Fingerprint) -> dict[str, Any]:
    result = lineage_test(candidate, reference)
    return {"score": result.score, "threshold": result.threshold, "derived": bool(result.derived),
            "p_value": result.p_value}


def usable(types: list[str], width: int, log: Any) -> list[str]:
    """The types whose block fits the model's rows (llama-quantize would store the others as F16)."""
    import gguf

    kept = []
    for qtype in types:
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
        if width % block:
            log(f"{qtype}: blocks of {block} do not divide rows of {width}: skipped (it would be stored as F16)")
        else:
            kept.append(qtype)
    return kept


def run(work: Path, steps: int, log: Any) -> list[dict[str, Any]]:
    settings = FingerprintSettings(device="cpu")
    types = quantisable_types()
    log(f"gguf.quants can quantise: {', '.join(types)}; it dequantises but cannot quantise the K-quants and IQ types")
    types = usable(types, 96, log)
    originals: dict[str, Fingerprint] = {}
    twins: dict[str, Fingerprint] = {}
    files: dict[tuple[str, str], Path] = {}
    with one_thread():
        for arch in ARCHITECTURES:
            base_dir = trained(arch, "base", steps, work, log)
            twin_dir = trained(arch, "twin", steps, work, log)
            originals[arch] = fingerprint(base_dir, f"{arch}-base", settings)
            twins[arch] = fingerprint(twin_dir, f"{arch}-twin", settings)
            model = _load(base_dir)
            for qtype in types:
                files[(arch, qtype)] = save_gguf(model, work / "gguf" / f"{arch}-{qtype}.gguf", qtype)
    space = FeatureSpace.fit([*originals.values(), *twins.values()], VECTOR_FEATURES)
    rows = []
    for (arch, qtype), path in files.items():
        started = time.perf_counter()
        fp = fingerprint(path, f"{arch}-{qtype}", settings)
        seconds = time.perf_counter() - started
        original = originals[arch]
        points = space.transform([fp, original])
        rows.append({"arch": arch, "type": qtype, "bytes": path.stat().st_size, "seconds": seconds,
                     "relative": relative_distance(fp.vector(VECTOR_FEATURES), original.vector(VECTOR_FEATURES)),
                     "paper": float(euclidean(points[:1], points[1:])[0, 0]),
                     "lineage": lineage(fp, original), "twin": lineage(fp, twins[arch]),
                     "quantisation": fp.artifact.get("quantisation")})
        log(f"{arch} {qtype}: fingerprinted in {seconds:.1f}s")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| arch | type | file KiB | relative distance | paper distance (<= 7) | lineage score / threshold "
             "| derived (p) | vs twin: score, derived |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        lin, twin = r["lineage"], r["twin"]
        lines.append(f"| {r['arch']} | {r['type']} | {r['bytes'] / 1024:.0f} | {r['relative']:.4f} | "
                     f"{r['paper']:.3f} | {lin['score']:.3f} / {lin['threshold']:.3f} | "
                     f"{'yes' if lin['derived'] else 'NO'} ({lin['p_value']:.1e}) | "
                     f"{twin['score']:.3f}, {'YES' if twin['derived'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and output directory")
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps per model (bench/lineage.py: 150)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = run(args.work, args.steps, lambda message: print(message, file=sys.stderr, flush=True))
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    derived = sum(r["lineage"]["derived"] for r in rows)
    false = sum(r["twin"]["derived"] for r in rows)
    print(f"\n{derived}/{len(rows)} GGUF files derived from their original; {false}/{len(rows)} from the twin.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
