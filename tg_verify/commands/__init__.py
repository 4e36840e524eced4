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


def add_executor_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """`--executor local|ray` and `--ray-address ADDR`: where `what` is computed (docs/scale.md)."""
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help=f"where {what} are computed: local (default: this process, one after another) or "
                             "ray (one Ray task each, placed by memory need, retried if a worker is lost; "
                             "pip install 'tg-verify[ray]')")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="with --executor ray: the cluster to join ('auto', 'ray://HOST:10001', HOST:6379); "
                             "default: RAY_ADDRESS, else a local Ray started for this run")
