"""`tg-verify index build|add|remove|verify`: a reference index for lineage search over many references.

The index is a directory (tg_verify/index/store.py): each reference's retrieval signature, its paper
features and its fingerprint, stored by digest. `build` makes one from fingerprint files, `add` adds
references without rebuilding (or replaces stale ones), `remove` drops them, `verify` re-derives every
claim the index makes. Signatures can be computed by Ray tasks (`--executor ray`). Docs: docs/scale.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tg_verify.commands import add_executor_options
from tg_verify.escaping import one_line, shown

VERB = "index"
ORDER = 33


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `index` parser and its actions."""
    parser = subparsers.add_parser(
        VERB, help="build and maintain a reference index for `tg-verify search`",
        description=("A reference index holds many reference fingerprints for lineage search: a compact signature "
                     "per reference for retrieval, its features, and the fingerprint itself for the exact test. "
                     "It is a directory of versioned files, validated when read. Docs: docs/scale.md."),
        epilog="Exit codes: 0 done; 2 bad input (unreadable fingerprints, problems found by verify); 3 internal.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="make a new index from fingerprint files",
                               description="Make a new index at -o INDEX from fingerprint files (or directories of "
                                           "*.json). Fingerprints that cannot be indexed are reported; the others "
                                           "are indexed all the same (exit 2 if any was reported).")
    build.add_argument("fingerprints", metavar="FP", nargs="+", help="fingerprint files or directories of *.json")
    build.add_argument("-o", "--output", metavar="INDEX", required=True, help="the index directory to create")
    _reference_options(build)

    add = actions.add_parser("add", help="add references to an index (no rebuild)",
                             description="Add fingerprints to an existing index. A reference indexed already with "
                                         "the same content is left alone; with other content it is stale and "
                                         "replaced only with --replace.")
    add.add_argument("index", metavar="INDEX", help="the index directory")
    add.add_argument("fingerprints", metavar="FP", nargs="+", help="fingerprint files or directories of *.json")
    add.add_argument("--replace", action="store_true", help="replace references indexed with other content")
    _reference_options(add)

    remove = actions.add_parser("remove", help="remove references from an index",
                                description="Remove references (by id) from an index.")
    remove.add_argument("index", metavar="INDEX", help="the index directory")
    remove.add_argument("ids", metavar="ID", nargs="+", help="reference ids to remove")
    _output_options(remove)

    verify = actions.add_parser("verify", help="check an index: digests, signatures, features (and sources)",
                                description="Re-derive what the index claims: every shard against the manifest, "
                                            "every stored fingerprint against its digest, every signature and "
                                            "feature vector against its stored fingerprint; with --sources, every "
                                            "source fingerprint file against what was indexed (stale entries).")
    verify.add_argument("index", metavar="INDEX", help="the index directory")
    verify.add_argument("--sources", action="store_true",
                        help="also re-read each reference's source file and report stale or missing ones")
    add_executor_options(verify, "the checks")
    _output_options(verify)
    parser.set_defaults(handler=run)


def _reference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", metavar="FILE",
                        help="families of the references (YAML/JSON: id -> family, or id -> {family, base, parent}); "
                             "default: each reference is a base of its own family, named by its id")
    parser.add_argument("--id-from", choices=("name", "file"), default="name",
                        help="reference ids: the fingerprint's model name (default) or its file name without .json "
                             "(unique when the fingerprints come from `fingerprint --batch`)")
    add_executor_options(parser, "signatures")
    _output_options(parser)


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the canonical JSON report")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on a terminal outside CI)")


def run(args: argparse.Namespace) -> int:
    """Run one index action and print what it did."""
    from tg_verify.index import build
    from tg_verify.progress import progress_sink, wants_progress

    report: Any
    if args.action == "remove":
        report = build.remove_references(args.index, args.ids)
    else:
        from tg_verify.scale.executor import make_executor

        executor = make_executor(args.executor, args.ray_address)
        try:
            with progress_sink(wants_progress(args.progress)) as sink:
                if args.action == "verify":
                    report = build.verify_index(args.index, sources=args.sources, executor=executor, progress=sink)
                else:
                    from tg_verify.analysis.references import read_labels

                    labels = read_labels(args.labels) if args.labels else None
                    target = args.output if args.action == "build" else args.index
                    report = build.add_references(target, args.fingerprints, labels=labels, id_from=args.id_from,
                                                  replace=getattr(args, "replace", False),
                                                  create=args.action == "build", executor=executor, progress=sink)
        finally:
            executor.close()
    return _print(report, args)


def _print(report: Any, args: argparse.Namespace) -> int:
    if args.json:
        from tg_verify.atomic import canonical_json

        sys.stdout.buffer.write(canonical_json(report.to_dict()))
        sys.stdout.flush()
    else:
        parts = [f"{len(getattr(report, name))} {name}" for name in ("added", "replaced", "unchanged", "removed")
                 if getattr(report, name)]
        checked = "checked, " if args.action == "verify" else ""
        print(f"{shown(report.index)}: {report.count} references, {checked}{', '.join(parts) or 'no change'}"
              + (f"; index sha256 {report.digest}" if report.digest else ""))
        for note in report.notes:  # notes and problems name fingerprint files and reference ids: one line each
            print(f"note: {one_line(note)}")
    for what, message in report.problems:
        print(f"tg-verify: problem: {shown(what)}: {one_line(message)}", file=sys.stderr)
    if report.problems:
        print(f"tg-verify: {len(report.problems)} problem(s)", file=sys.stderr)
    return int(report.exit_code)
