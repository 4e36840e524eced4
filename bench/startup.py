"""Start-up time of the light verbs, as a user waits for them: a fresh process each run.

Times, in the same run and interleaved (so machine load affects all alike):
  - `python -c pass` (the floor every command pays) and `python -c "import torch"` (what a heavy import costs),
  - `tg-verify --version`, `tg-verify --help`,
  - `tg-verify inspect MODEL`, `tg-verify inspect ADAPTER --against BASE.json` (the base's fingerprint),
  - `tg-verify verify-attestation ATTESTATION MODEL`,
on a tiny model, adapter and attestation built in a temporary directory. Prints the median of each and its
ratio to `python -c pass`. With --baseline CHECKOUT, also times --help, --version and inspect MODEL from
another checkout of tg-verify (e.g. an older commit: `git worktree add /tmp/old <commit>`), run from
its own directory so that its package is the one imported.

    python bench/startup.py [--repeats 7] [--baseline CHECKOUT]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(root: Path) -> dict[str, Path]:
    """A tiny llama (sharded with an index), a LoRA adapter of a base, the base's fingerprint, and a PASSED
    attestation of the model."""
    from attestation_helpers import make_predicate
    from safetensors.torch import load_file

    from tg_verify.attestation.statement import statement_of, write_statement
    from tg_verify.tiny import build_model, save_lora_adapter, save_model

    model = save_model(build_model("llama", seed=0), root / "model", "indexed-shards")
    base_dir = save_model(build_model("llama", seed=0), root / "base", "single")
    base = build_model("llama", seed=0)
    base.load_state_dict(load_file(str(base_dir / "model.safetensors")), strict=False)
    adapter = save_lora_adapter(base, root / "adapter", seed=3)
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact

    base_fp = root / "base.json"
    base_fp.write_bytes(fingerprint_artifact(resolve(base_dir), model_name="base").to_json_bytes())
    attestation = write_statement(root / "attestation.json", statement_of(make_predicate(model)))
    return {"model": model, "base": base_fp, "adapter": adapter, "attestation": attestation}


def commands(paths: dict[str, Path], baseline: Path | None) -> dict[str, tuple[list[str], Path | None]]:
    """name -> (argv, working directory)."""
    tg = [sys.executable, "-m", "tg_verify"]
    extra: dict[str, tuple[list[str], Path | None]] = {}
    if baseline is not None:
        extra = {f"baseline: tg-verify {a}": ([*tg, *a.split()], baseline) for a in ("--version", "--help")}
        extra["baseline: tg-verify inspect MODEL"] = ([*tg, "inspect", str(paths["model"])], baseline)
    here = Path(__file__).resolve().parents[1]
    return {name: (argv, here) for name, argv in {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "tg-verify --version": [*tg, "--version"],
        "tg-verify --help": [*tg, "--help"],
        "tg-verify inspect MODEL": [*tg, "inspect", str(paths["model"])],
        "tg-verify inspect ADAPTER --against BASE.json": [*tg, "inspect", str(paths["adapter"]), "--against",
                                                     str(paths["base"])],
        "tg-verify verify-attestation": [*tg, "verify-attestation", str(paths["attestation"]), str(paths["model"])],
    }.items()} | extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT", help="another checkout to time beside this one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = commands(build(Path(tmp)), args.baseline.resolve() if args.baseline else None)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for name, (argv, cwd) in runs.items():  # warm the file cache once, check each command works
            done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
            if done.returncode != 0:
                raise SystemExit(f"{name} exited {done.returncode}: {done.stderr.strip()[-400:]}")
        for _ in range(args.repeats):
            for name, (argv, cwd) in runs.items():
                start = time.perf_counter()
                subprocess.run(argv, capture_output=True, check=True, cwd=cwd)
                times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["python -c pass"])
    print(f"start-up, median of {args.repeats} fresh processes (python {sys.version.split()[0]})")
    print(f"{'command':48} {'seconds':>8} {'x python -c pass':>17}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:48} {median:8.3f} {median / floor:17.1f}")


if __name__ == "__main__":
    main()
