"""One module per CLI verb, and the registry cli.py reads. Each module turns library results into output.

A verb's module (`tg_verify/commands/<name>.py`) holds VERB (its name), ORDER (its place in --help),
register(subparsers), which adds its parser with set_defaults(handler=run), and run(args) -> int.
`VERBS` lists them with their one-line help, so `tg-verify --help`, `--version` and the dispatch of a
verb import no command module but the one that runs (a command may import torch; `inspect` and
`verify-attestation` must not pay for that). tests/commands/test_registry.py keeps VERBS and the
modules in step.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    """One verb of the command line: its name, its place in --help, and its one-line help."""

    name: str
    order: int
    help: str

    @property
    def module(self) -> str:
        return f"tg_verify.commands.{self.name.replace('-', '_')}"


VERBS: dict[str, Verb] = {verb.name: verb for verb in sorted((
    Verb("verify", 10, "check a model's declared lineage against a policy (the main job: tg-verify POLICY.yml)"),
    Verb("fingerprint", 20, "fingerprint a model artifact (TensorGuard features, file digests, lineage sketch)"),
    Verb("verify-attestation", 20, "check a tg-verify attestation against a model directory (offline)"),
    Verb("compare", 30, "distance between two models or fingerprints (and lineage evidence)"),
    Verb("classify", 31, "attribute a model to the family of the nearest reference cluster"),
    Verb("index", 33, "build and maintain a reference index for `tg-verify search`"),
    Verb("search", 34, "lineage search: the indexed references a model most likely derives from"),
    Verb("inspect", 40, "show and validate a model artifact's layout, files and tensors (header-only)"),
    Verb("study", 60, "reproduce the paper's studies on your models (clustering: Table I; perturbation: Fig. 5)"),
    Verb("action", 90, "GitHub Action entrypoint: verify using INPUT_* environment variables"),
    Verb("demo", 90, "see tg-verify work in under a minute: no network, no model needed"),
), key=lambda v: (v.order, v.name))}


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
