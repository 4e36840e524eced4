"""One module per CLI verb; cli.py discovers them. Each turns library results into output."""

from __future__ import annotations

import argparse


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads N`: how many threads fingerprint (results never depend on it)."""
    parser.add_argument("--threads", metavar="N", type=_threads, default=None,
                        help="threads that compute fingerprints (default: the usable cores, container CPU quota "
                             "included, at most 8); the result does not depend on it")


def _threads(text: str) -> int:
    from tg_verify.errors import UsageError
    from tg_verify.fingerprint.workers import check_threads

    try:
        return check_threads(int(text))
    except (ValueError, UsageError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}" if isinstance(exc, UsageError)
                                         else f"{text!r} is not an integer") from None


FORMATS = ("text", "json", "markdown", "sarif")


def add_format_option(parser: argparse.ArgumentParser, text: str) -> None:
    """`--format text|json|markdown|sarif` for the verbs that report a verdict; `--json` is `--format json`."""
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help=f"what to print on stdout: text ({text}, the default), json, markdown, or sarif "
                             "(SARIF 2.1.0 for GitHub code scanning)")
    parser.add_argument("--json", action="store_true", help="the same as --format json")


def chosen_format(args: argparse.Namespace) -> str:
    """The output format of `add_format_option`; --json with another --format is a usage error."""
    from tg_verify.errors import UsageError

    chosen = getattr(args, "format", None)
    if getattr(args, "json", False):
        if chosen not in (None, "json"):
            raise UsageError(f"--json and --format {chosen} disagree; give one of them")
        return "json"
    return chosen or "text"
