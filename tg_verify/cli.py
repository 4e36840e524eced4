"""Command line: `tg-verify POLICY.yml` (the main job) and the verbs. The only place that prints and exits.

Exit codes: 0 success/PASS, 1 verdict FAIL, 2 bad input, 3 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tg_verify.commands import VERBS
from tg_verify.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, TgVerifyError
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


def _normalise(argv: list[str]) -> list[str]:
    """`tg-verify POLICY.yml [...]` is shorthand for `tg-verify verify POLICY.yml [...]`."""
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        if arg not in VERBS:
            return argv[:i] + ["verify"] + argv[i:]
        break
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _normalise(list(sys.argv[1:] if argv is None else argv))
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
        print(f"tg-verify: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tg-verify: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one boundary that turns bugs into exit 3
        if args.debug:
            raise
        print(f"tg-verify: internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
