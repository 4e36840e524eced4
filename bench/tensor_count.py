"""CPU amplification by tensor count: how long many tiny tensors take, against a real tiny model, same run.

Writes files of N 2x2 float32 tensors (no config.json) and times, in-process and with one thread:
  - resolve() (header validation, natural sort, loading grammar), which refuses files over the tensor budget,
  - fingerprint_artifact() for the files the budget accepts (the extractor's fixed per-tensor work),
and as the baseline a tiny llama (tg_verify.tiny, 21 tensors, 144 K parameters) fingerprinted the same way.

    python bench/tensor_count.py [--counts 1000,10000,40000,100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from safetensors.numpy import save_file

from tg_verify.artifact import resolve
from tg_verify.errors import TgVerifyError
from tg_verify.fingerprint.extract import fingerprint_artifact
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.tiny import build_model, save_model


def timed(work):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    try:
        result = work()
    except TgVerifyError as exc:
        return time.perf_counter() - start, exc
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000,40000,100000")
    args = parser.parse_args()
    settings = FingerprintSettings(device="cpu", sketch=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llama = save_model(build_model("llama"), root / "llama")
        base, _ = timed(lambda: fingerprint_artifact(resolve(llama), settings, threads=1))
        print(f"baseline: tiny llama fingerprint {base:.2f} s")
        for count in (int(c) for c in args.counts.split(",")):
            path = root / f"n{count}.safetensors"
            rng = np.random.default_rng(0)
            save_file({f"model.layers.{i}.w.weight": rng.random((2, 2), dtype=np.float32) for i in range(count)},
                      str(path))
            seconds, artifact = timed(lambda: resolve(path))  # noqa: B023
            if isinstance(artifact, TgVerifyError):
                print(f"{count:>7} tensors, {path.stat().st_size / 1e6:5.1f} MB: refused by resolve in {seconds:.2f} s "
                      f"({seconds / base:.2f}x baseline): {artifact.code}")
                continue
            fp_seconds, _ = timed(lambda: fingerprint_artifact(artifact, settings, threads=1))  # noqa: B023
            print(f"{count:>7} tensors, {path.stat().st_size / 1e6:5.1f} MB: resolve {seconds:.2f} s, fingerprint "
                  f"{fp_seconds:.2f} s ({(seconds + fp_seconds) / base:.1f}x baseline, "
                  f"{1e3 * fp_seconds / count:.2f} ms per tensor)")


if __name__ == "__main__":
    main()
