"""`tg-verify fingerprint MODEL -o FILE.json`: the TensorGuard fingerprint of one model artifact.

Streams the weights once (features, structural metadata, lineage sketch) while hashing the files,
and writes one deterministic JSON document atomically. `run()` dispatches on the mode, so further
modes (batch) plug in beside `_run_single`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tg_verify.artifact import resolve
from tg_verify.atomic import write_bytes
from tg_verify.commands import add_executor_options, add_threads_option
from tg_verify.errors import EXIT_OK, UsageError
from tg_verify.escaping import one_line
from tg_verify.fingerprint.document import load
from tg_verify.fingerprint.settings import DEVICE_CHOICES, STRATEGY_CHOICES, FingerprintSettings, assemble_settings
from tg_verify.progress import progress_sink, wants_progress

VERB = "fingerprint"
ORDER = 20


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `fingerprint` parser."""
    parser = subparsers.add_parser(
        VERB, help="fingerprint a model artifact (TensorGuard features, file digests, lineage sketch)",
        description=("Compute the TensorGuard fingerprint of MODEL (a .safetensors or .gguf file, a shard index or "
                     "a model directory) in one streamed pass over its weights, hash its files, and write a versioned, "
                     "deterministic JSON document. The method and every choice the paper leaves open are in "
                     "docs/method.md."),
        epilog="Exit codes: 0 written; 2 bad input (unreadable model, NaN weights, bad flags); 3 internal error.")
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="model directory, .safetensors or .gguf file, or index")
    parser.add_argument("-o", "--output", metavar="FILE.json",
                        help="where to write the fingerprint ('-': standard output, the summary line then goes to "
                             "standard error)")
    parser.add_argument("--name", help="model_name recorded in the document (default: the artifact's name)")
    parser.add_argument("--settings-from", metavar="FINGERPRINT.json",
                        help="reuse the extraction settings of an existing fingerprint (so the two compare); "
                             "explicit flags below override them")
    parser.add_argument("--seed", type=int, default=None, help="seed of every random draw (default 0)")
    parser.add_argument("--repeats", type=int, default=None, help="seeded inputs per tensor, averaged (default 30)")
    parser.add_argument("--strategy", choices=STRATEGY_CHOICES, default=None,
                        help="noise strategy; 'random' (default) draws one per tensor from the seed")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=None,
                        help="where the products run; auto (default) uses CUDA when present")
    parser.add_argument("--no-sketch", dest="sketch", action="store_false", default=None,
                        help="leave out the lineage evidence, sketch and blocks (smaller document; lineage tests then "
                             "impossible)")
    add_threads_option(parser)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on a terminal outside CI)")
    adapters = parser.add_argument_group("adapters and batch mode (docs/adapters.md)")
    adapters.add_argument("--base", metavar="PATH",
                          help="base model a PEFT adapter (MODEL, or adapters in --batch) is merged onto before "
                               "fingerprinting; the document records the base's file digests too")
    adapters.add_argument("--batch", metavar="DIR", nargs="+",
                          help="fingerprint every model: each DIR is a model directory, or a folder searched for "
                               "model directories; up-to-date fingerprints in --out-dir are skipped, broken models "
                               "are reported at the end (exit 2 if any failed)")
    adapters.add_argument("--out-dir", metavar="OUT", help="where --batch writes <model>-<hash>.json files")
    adapters.add_argument("--force", action="store_true",
                          help="with --batch: recompute even up-to-date fingerprints")
    add_executor_options(adapters, "--batch's models")
    parser.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> FingerprintSettings:
    """FingerprintSettings from the flags, on top of --settings-from when given."""
    recorded: list[dict[str, Any]] = []
    if getattr(args, "settings_from", None):
        reference = load(args.settings_from)
        if reference.legacy:
            raise UsageError(f"{args.settings_from}: a legacy fingerprint records no settings to reuse")
        recorded.append(reference.settings)
    return assemble_settings(recorded=recorded, **{key: getattr(args, key, None)
                                                   for key in ("seed", "repeats", "strategy", "device", "sketch")})


def run(args: argparse.Namespace) -> int:
    """Dispatch: one model to one file, or --batch many models into --out-dir."""
    if getattr(args, "batch", None):
        return _run_batch(args)
    if getattr(args, "out_dir", None) or getattr(args, "force", False):
        raise UsageError("fingerprint: --out-dir and --force go with --batch DIR [DIR ...]")
    if getattr(args, "executor", "local") != "local" or getattr(args, "ray_address", None):
        raise UsageError("fingerprint: --executor and --ray-address go with --batch DIR [DIR ...]")
    return _run_single(args)


def _run_batch(args: argparse.Namespace) -> int:
    from tg_verify.batch import BatchOutcome, run_batch
    from tg_verify.scale.executor import make_executor

    if args.model or args.output or args.name:
        raise UsageError("fingerprint: --batch takes model directories itself; drop MODEL, -o and --name")
    if not args.out_dir:
        raise UsageError("fingerprint: --batch needs --out-dir OUT, where the fingerprints go")
    settings = settings_from_args(args)

    def report(outcome: BatchOutcome) -> None:
        if outcome.status == "failed":
            print(one_line(f"tg-verify: FAILED {outcome.source}: {outcome.message}"), file=sys.stderr)
            return
        retried = f", {outcome.attempts} attempts" if outcome.attempts > 1 else ""
        print(one_line(f"{outcome.status:8} {outcome.source} -> {outcome.output} ({outcome.message}, "
                       f"{outcome.seconds:.1f}s{retried})"))
        for warning in outcome.warnings:
            print(one_line(f"tg-verify: warning: {outcome.source}: {warning}"), file=sys.stderr)

    executor = make_executor(args.executor, args.ray_address)
    try:
        with progress_sink(wants_progress(args.progress)) as sink:
            result = run_batch(args.batch, args.out_dir, settings, base=args.base, force=args.force, progress=sink,
                               threads=args.threads, on_outcome=report, executor=executor)
    finally:
        executor.close()
    failed = [o for o in result.outcomes if o.status == "failed"]
    print(f"{len(result.outcomes)} models: {result.count('computed')} computed, {result.count('skipped')} "
          f"up to date, {len(failed)} failed")
    for outcome in failed:
        print(one_line(f"tg-verify: failed: {outcome.source}: [{outcome.code}] {outcome.message}"), file=sys.stderr)
    return result.exit_code


def _run_single(args: argparse.Namespace) -> int:
    from tg_verify.batch import fingerprint_model

    if not args.model:
        raise UsageError("fingerprint: give MODEL (a model directory, .safetensors or .gguf file, or index)")
    if not args.output:
        raise UsageError("fingerprint: give -o FILE.json, where to write the fingerprint")
    settings = settings_from_args(args)
    started = time.perf_counter()
    artifact = resolve(args.model)
    if args.base and artifact.layout != "adapter":
        raise UsageError(f"fingerprint: {args.model} is a full model, not a PEFT adapter; --base is for adapters")
    with progress_sink(wants_progress(args.progress)) as sink:
        result = fingerprint_model(artifact, settings, base=args.base, progress=sink, model_name=args.name,
                                   threads=args.threads)
    fingerprint = result.fingerprint
    if args.output == "-":
        sys.stdout.buffer.write(fingerprint.to_json_bytes())
        sys.stdout.flush()
        print(one_line(summary_line(Path("<stdout>"), fingerprint, time.perf_counter() - started)), file=sys.stderr)
    else:
        path = write_bytes(args.output, fingerprint.to_json_bytes())
        print(one_line(summary_line(path, fingerprint, time.perf_counter() - started)))
    for warning in result.warnings:
        print(one_line(f"tg-verify: warning: {warning}"), file=sys.stderr)
    return EXIT_OK


def summary_line(path: Path, fingerprint: Any, seconds: float) -> str:
    """One line: what was fingerprinted, how much of it, where the document went."""
    extraction = fingerprint.extraction or {}
    params = int(fingerprint.features["total_params"])
    files = len(fingerprint.artifact.get("files", []))
    sketch = ("with sketch" if fingerprint.sketch is not None else "no sketch") + (
        " and block evidence" if fingerprint.blocks is not None else "")
    return (f"{path}: fingerprint of {fingerprint.model_name} ({len(fingerprint.tensors)} tensors, "
            f"{extraction.get('analysed_tensors', 0)} analysed, {params:,} parameters, {files} files bound by "
            f"sha256, {sketch}, device {fingerprint.settings.get('device')}) in {seconds:.1f}s")
