"""Command line: `tg-verify POLICY.yml` (the main job) and the verbs. The only place that prints and exits.

Exit codes: 0 success/PASS, 1 verdict FAIL, 2 bad input, 3 internal error.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tg_verify.commands import VERBS
from tg_verify.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, TgVerifyError, UsageError
from tg_verify.escaping import CommandGuard, one_line
from tg_verify.versions import VERSION

# The verbs are listed in tg_verify.commands.VERBS; a verb's module is imported only when that verb runs,
# so `--help`, `--version` and the light verbs (inspect, verify-attestation) start without torch.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"tg-verify: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser: with `verb`, that verb's full parser (its module imported alone); else every verb's summary."""
    parser = _Parser(prog="tg-verify", description=(
        "Verify the declared lineage of a model artifact against reference fingerprints. "
        "Run `tg-verify POLICY.yml` for the main job, or one of the verbs below."),
        epilog="Exit codes: 0 success/PASS, 1 verdict FAIL, 2 bad input, 3 internal error.")
    parser.add_argument("--version", action="version", version=f"tg-verify {VERSION}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    if verb in VERBS:
        importlib.import_module(VERBS[verb].module).register(sub)
    else:
        for entry in VERBS.values():
            sub.add_parser(entry.name, help=entry.help, add_help=False)
    return parser


def _verbs() -> list[str]:
    """The verb names, in --help order (from the registry: no command module is imported for them)."""
    return list(VERBS)


def _normalise(argv: list[str]) -> list[str]:
    """`tg-verify POLICY.yml [...]` is shorthand for `tg-verify verify POLICY.yml [...]`.

    A first word that is neither a verb nor a policy file (a mistyped verb) is a usage error that
    names the closest verb, not an "unrecognized arguments" error from the verify parser.
    """
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        if arg in VERBS:
            break
        if not _looks_like_policy(arg):
            raise UsageError(_unknown_verb(arg))
        return argv[:i] + ["verify"] + argv[i:]
    return argv


def _looks_like_policy(arg: str) -> bool:
    """A policy file: an existing path, or a name ending in .yml/.yaml (verify then says it is missing)."""
    return Path(arg).suffix.lower() in (".yml", ".yaml") or os.path.exists(arg)


def _unknown_verb(arg: str) -> str:
    verbs = _verbs()
    close = difflib.get_close_matches(arg, verbs, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"'{one_line(arg)}' is neither a verb nor a policy file (.yml); {hint}"
            f"verbs: {', '.join(verbs)}; `tg-verify POLICY.yml` verifies a policy")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line. Output goes through a CommandGuard when it is not a terminal (a CI log):
    no line that tg-verify prints can be read as a workflow command (tg_verify/escaping.py)."""
    streams = sys.stdout, sys.stderr
    guards = [CommandGuard(stream) if not _isatty(stream) else None for stream in streams]
    if guards[0] is not None:
        sys.stdout = guards[0]
    if guards[1] is not None:
        sys.stderr = guards[1]
    try:
        return _main(argv)
    finally:
        for guard in guards:
            if guard is not None:
                guard.finish()
        sys.stdout, sys.stderr = streams


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def _main(argv: Sequence[str] | None) -> int:
    try:
        args_list = _normalise(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"tg-verify: error: {exc}", file=sys.stderr)
        return exc.exit_code
    verb = next((arg for arg in args_list if not arg.startswith("-")), None)
    parser = build_parser(verb)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(args.handler(args))
    except TgVerifyError as exc:
        if args.debug:
            raise
        print(f"tg-verify: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tg-verify: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one boundary that turns bugs into exit 3
        if args.debug:
            raise
        print(f"tg-verify: internal error: {type(exc).__name__}: {one_line(str(exc))} (run with --debug for a "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL
