"""`tg-verify inspect PATH [--json] [--hash] [--against FP]`: what a model artifact holds, from its headers alone.

Validates every safetensors header and the layout without reading tensor data; `--hash` adds the
sha256 of every file (streamed, with a progress bar on a terminal); `--against` checks an adapter's fit to
a reference fingerprint's tensor list (exit 1 when it does not fit). Invalid input exits 2 with one
line on stderr, and with `--json` also prints a machine-readable error document on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tg_verify.artifact.digest import ModelFile, file_digests, model_file_digests, root_digest
from tg_verify.artifact.errors import shown
from tg_verify.artifact.layout import resolve
from tg_verify.artifact.model import Artifact
from tg_verify.artifact.peft import check_adapter_against_tensors, check_base_name
from tg_verify.artifact.summary import describe, describe_error
from tg_verify.atomic import canonical_json
from tg_verify.errors import EXIT_FAIL, EXIT_OK, InputError, UsageError
from tg_verify.fingerprint.document import load as load_fingerprint
from tg_verify.progress import progress_sink, wants_progress

VERB = "inspect"
ORDER = 40


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `inspect` parser."""
    parser = subparsers.add_parser(
        VERB, help="show and validate a model artifact's layout, files and tensors (header-only)",
        description=("Resolve PATH (a .safetensors or .gguf file, a shard index, or a model directory: single file, "
                     "indexed shards, <prefix>-0000i-of-0000N shards, or a PEFT adapter), validate every "
                     "safetensors header or GGUF file as untrusted input, and report layout, files, tensor and "
                     "parameter counts, dtypes, model_type and tensors per category. Reads no tensor data unless "
                     "--hash."),
        epilog="Exit codes: 0 valid; 2 bad input (invalid or unreadable artifact); 3 internal error.")
    parser.add_argument("path", metavar="PATH",
                        help="model directory, .safetensors or .gguf file, or *.safetensors.index.json")
    parser.add_argument("--json", action="store_true", help="print the canonical JSON document on stdout")
    parser.add_argument("--hash", action="store_true",
                        help="also compute the sha256 of every file, the weights digest (the artifact's files) and "
                             "the root digest (model_signing's, over every file of the model directory)")
    parser.add_argument("--tensors", action="store_true", help="list every tensor in the human-readable output")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar while hashing (default: on a terminal outside CI)")
    parser.add_argument("--against", metavar="FP.json",
                        help="for a PEFT adapter: check that its targets and shapes exist in the base this "
                             "reference fingerprint describes (no base weights needed); exit 1 when they do not")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Resolve, optionally hash, then print the document (JSON) or tables (human)."""
    try:
        artifact = resolve(args.path)
        digests = everything = None
        listed: tuple[ModelFile, ...] = ()
        if args.hash:
            with progress_sink(wants_progress(args.progress)) as sink:
                sink.start("sha256", None)
                digests = file_digests(artifact, sink)
                everything, listed = model_file_digests(Path(args.path), artifact, digests, sink)
    except InputError as error:
        if args.json:
            sys.stdout.write(canonical_json(describe_error(args.path, error)).decode("utf-8"))
        raise
    document = describe(artifact, digests)
    if digests is not None and everything is not None:
        # weights digest: the artifact's files; root digest: model_signing's, over the model path's files
        document["weights_digest"] = root_digest(digests)
        document["root_digest"] = root_digest(everything)
        document["other_files"] = [{"path": shown(f.path), "size": f.size, "sha256": everything[f.path]}
                                   for f in listed if f.path not in digests]
        document["read_through_symlinks"] = any(f.symlink for f in listed)
    status = EXIT_OK
    if args.against:
        document["adapter_fit"] = _adapter_fit(artifact, args.against)
        status = EXIT_FAIL if document["adapter_fit"]["result"] == "fail" else EXIT_OK
    if args.json:
        sys.stdout.write(canonical_json(document).decode("utf-8"))
    else:
        _render(document, args.tensors)
    return status


def _adapter_fit(artifact: Artifact, fingerprint_path: str) -> dict[str, Any]:
    """Header-only fit of an adapter to a reference fingerprint's structural metadata."""
    if artifact.layout != "adapter":
        raise UsageError(f"{artifact.root}: --against checks a PEFT adapter, but this is a {artifact.layout} model")
    reference = load_fingerprint(fingerprint_path)
    findings = check_adapter_against_tensors(artifact, reference.tensors,
                                             base_label=f"{reference.model_name} ({fingerprint_path})")
    findings += check_base_name(artifact, [reference.model_name])
    failed = any(f.severity == "error" for f in findings)
    return {"reference": reference.model_name, "fingerprint": fingerprint_path,
            "result": "fail" if failed else "pass", "findings": [f.to_dict() for f in findings]}


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def _count(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{suffix})"
    return f"{n:,}"


def _render(doc: dict[str, Any], list_tensors: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def text(value: object) -> str:  # untrusted strings: control characters escaped, markup escaped
        return escape(shown(value))

    console = Console(highlight=False, soft_wrap=True)
    art = doc["artifact"]
    console.print(f"[bold]{text(art['name'])}[/]  layout [bold]{art['layout']}[/]  format [bold]{art['format']}[/]  "
                  f"model_type [bold]{text(art['model_type'] or '-')}[/]  ({text(art['path'])})")
    files = Table(title="files", title_justify="left", show_edge=False)
    for column in ("path", "role", "size", "tensors"):
        files.add_column(column, justify="right" if column in ("size", "tensors") else "left", overflow="fold")
    for item in doc["files"]:
        files.add_row(text(item["path"]), item["role"], _size(item["size"]), str(item.get("tensors", "")))
    console.print(files)
    if "root_digest" in doc:  # sha256sum format, so `sha256sum -c` can re-check the files
        console.print("sha256 (sha256sum -c format)")
        for item in [*doc["files"], *doc.get("other_files", [])]:
            console.print(f"{item['sha256']}  {text(item['path'])}", overflow="ignore", crop=False)
        count = len(doc["files"]) + len(doc.get("other_files", []))
        links = "; read through symbolic links" if doc.get("read_through_symlinks") else ""
        console.print(f"root digest sha256:{doc['root_digest']} (model_signing's, over all {count} files{links})")
        console.print(f"weights digest sha256:{doc['weights_digest']} (over the {len(doc['files'])} files tg-verify "
                      "reads: weights, index, configs)")
    console.print(f"tensors {doc['tensor_count']:,} (2-D {doc['matrices']:,})   parameters "
                  f"{_count(doc['total_params'])}   tensor bytes {_size(doc['total_bytes'])}")
    console.print("dtypes  " + ", ".join(f"{d} {v['tensors']} tensors / {_count(v['params'])}"
                                         for d, v in doc["dtypes"].items()))
    cats = Table(title="categories", title_justify="left", show_edge=False)
    for column in ("category", "tensors", "params"):
        cats.add_column(column, justify="left" if column == "category" else "right")
    for name, value in doc["categories"].items():
        cats.add_row(name, f"{value['tensors']:,}", f"{value['params']:,}")
    console.print(cats)
    if doc.get("unexpected_tensors"):
        console.print(f"not loaded by the runtime, never fingerprinted ({len(doc['unexpected_tensors'])}): "
                      + ", ".join(text(u["name"]) for u in doc["unexpected_tensors"][:5]))
    if doc["adapter"]:
        console.print("adapter " + ", ".join(f"{k}={text(v)}" for k, v in doc["adapter"].items()))
    if list_tensors:
        table = Table(title="tensors (canonical order)", title_justify="left", show_edge=False)
        for column in ("name", "dtype", "shape", "params", "category"):
            table.add_column(column, justify="right" if column == "params" else "left", overflow="fold")
        for t in doc["tensors"]:
            table.add_row(text(t["name"]), t["dtype"], "x".join(map(str, t["shape"])) or "scalar",
                          f"{t['params']:,}", t["category"])
        console.print(table)
    validation = doc["validation"]
    console.print(f"validation [bold green]{validation['status']}[/] ({len(validation['checks'])} checks, "
                  f"header-only)")
    for warning in validation["warnings"]:
        console.print(f"[yellow]warning[/] {text(warning)}")
    fit = doc.get("adapter_fit")
    if fit:
        style = "bold green" if fit["result"] == "pass" else "bold red"
        console.print(f"adapter fit against {text(fit['reference'])}: [{style}]{fit['result'].upper()}[/]")
        for finding in fit["findings"]:
            console.print(f"  {finding['severity']} {finding['code']}: {text(finding['message'])}")
