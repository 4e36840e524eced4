"""`tg-verify POLICY.yml` (= `tg-verify verify POLICY.yml`): the main job, a lineage verdict for a release gate.

Prints a summary (or, with --format json|markdown|sarif, that document), writes the report, the
attestation, the candidate's fingerprint, the Markdown summary and the SARIF log when asked, and appends
the summary to $GITHUB_STEP_SUMMARY. Exit 0 PASS, 1 FAIL (0 with --report-only), 2 bad input (nothing
written).

The one verify path: the command line and the GitHub Action (commands/action.py) both build a
`VerifyRequest` and call `execute`, which checks every output path before any work, runs the policy
and writes all outputs or none. Only the presentation differs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tg_verify.commands import add_format_option, add_threads_option, chosen_format
from tg_verify.errors import EXIT_FAIL, EXIT_OK, UsageError
from tg_verify.escaping import one_line, shown
from tg_verify.fingerprint.settings import DEVICE_CHOICES

if TYPE_CHECKING:
    from tg_verify.pipeline import VerificationResult
    from tg_verify.policy import Policy
    from tg_verify.progress import ProgressSink

VERB = "verify"
ORDER = 10
# "subjects": the attested files in sha256sum format (actions/attest subject-checksums), written by the Action
OUTPUT_KINDS = ("report", "attestation", "predicate", "summary", "fingerprint", "sarif", "subjects")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The verify flags: shared by `tg-verify verify` and the Action's `args` input."""
    parser.add_argument("policy", metavar="POLICY.yml", help="the policy file")
    parser.add_argument("--report", metavar="FILE", help="write the JSON report here (overrides outputs.report)")
    add_format_option(parser, "the summary")
    parser.add_argument("--sarif", metavar="FILE",
                        help="write SARIF 2.1.0 here (FAIL and warning findings as alerts on the policy file, for "
                             "GitHub code scanning)")
    parser.add_argument("--attestation", metavar="FILE",
                        help="write an in-toto attestation here (overrides outputs.attestation)")
    parser.add_argument("--summary", metavar="FILE", help="write the Markdown summary here (overrides outputs.summary)")
    parser.add_argument("--fingerprint-out", metavar="FILE",
                        help="write the candidate's fingerprint here (overrides outputs.fingerprint)")
    parser.add_argument("--candidate", metavar="PATH", help="verify this model instead of the policy's candidate.path")
    parser.add_argument("--device", choices=DEVICE_CHOICES, help="where fingerprints are computed (default: the "
                                                                 "policy's fingerprint.device, else auto)")
    add_threads_option(parser)
    parser.add_argument("--cache-dir", metavar="DIR", help="cache of reference fingerprints made from `model:` paths "
                                                           "(default $TG_VERIFY_CACHE_DIR or ~/.cache/tg-verify)")
    parser.add_argument("--no-cache", action="store_true", help="fingerprint `model:` references on every run")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on a terminal outside CI)")
    parser.add_argument("--report-only", action="store_true",
                        help="report the verdict and write every output, but exit 0 on FAIL (a job that must not "
                             "fail yet); bad input still exits 2")
    parser.add_argument("--check-policy", action="store_true",
                        help="only validate the policy and the fingerprint files it names (no model is read); "
                             "exit 0 when valid, 2 otherwise")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `verify` parser (also reached as `tg-verify POLICY.yml`)."""
    parser = subparsers.add_parser(
        VERB, help="check a model's declared lineage against a policy (the main job: tg-verify POLICY.yml)",
        description=("Fingerprint the candidate named in POLICY.yml, measure it against the policy's reference "
                     "fingerprints (distance, family attribution, lineage test) and decide PASS or FAIL with "
                     "reasons. The policy schema is in docs/policy.md, the reason codes in docs/reasons.md."),
        epilog="Exit codes: 0 PASS, 1 FAIL, 2 bad input (no output written), 3 internal error.")
    add_arguments(parser)
    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class VerifyRequest:
    """A verify run, however it was asked for (the command line, or the Action's inputs).

    Output paths given here override the policy's `outputs:`; `defaults` name outputs to write when
    neither says (the Action's files under $RUNNER_TEMP). `require_weights` is the default of the
    policy's candidate.require_weights. `report_only`: a FAIL verdict is reported in full but exits 0.
    """

    policy: Path
    candidate: Path | None = None
    report: Path | None = None
    attestation: Path | None = None
    predicate: Path | None = None  # the predicate alone (actions/attest predicate-path)
    summary: Path | None = None
    fingerprint_out: Path | None = None
    sarif: Path | None = None  # SARIF 2.1.0 for GitHub code scanning
    subjects: Path | None = None  # the attested files in sha256sum format (actions/attest subject-checksums)
    device: str | None = None
    threads: int | None = None
    cache_dir: Path | None = None
    no_cache: bool = False
    check_policy: bool = False
    require_weights: bool = False
    report_only: bool = False
    defaults: Mapping[str, Path] = field(default_factory=dict)

    def cache(self) -> Path | None:
        """The reference cache directory, or None with --no-cache."""
        if self.no_cache:
            return None
        if self.cache_dir is not None:
            return self.cache_dir
        from tg_verify.pipeline import default_cache_dir

        return default_cache_dir()


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def request_from_args(args: argparse.Namespace, **overrides: object) -> VerifyRequest:
    """The request the verify flags describe (`overrides`: what the caller adds, e.g. the Action's defaults)."""
    request = VerifyRequest(
        policy=Path(args.policy), candidate=_path(args.candidate), report=_path(args.report),
        attestation=_path(args.attestation), summary=_path(args.summary), fingerprint_out=_path(args.fingerprint_out),
        sarif=_path(args.sarif), device=args.device, threads=args.threads, cache_dir=_path(args.cache_dir),
        no_cache=args.no_cache, check_policy=args.check_policy, report_only=args.report_only)
    from dataclasses import replace

    return replace(request, **overrides)  # type: ignore[arg-type]


def output_targets(request: VerifyRequest, policy: Policy) -> dict[str, Path | None]:
    """Where each output goes: the request, else the policy's `outputs:` entry, else the request's default."""
    configured = {"report": policy.outputs.report, "attestation": policy.outputs.attestation,
                  "summary": policy.outputs.summary, "fingerprint": policy.outputs.fingerprint}
    given = {"report": request.report, "attestation": request.attestation, "summary": request.summary,
             "fingerprint": request.fingerprint_out, "predicate": request.predicate, "sarif": request.sarif,
             "subjects": request.subjects}
    return {kind: given.get(kind) or configured.get(kind) or request.defaults.get(kind) for kind in OUTPUT_KINDS}


# ---------------------------------------------------------------------------------------- the guard


def _inputs(policy: Policy) -> tuple[dict[Path, str], dict[Path, str]]:
    """Input files (path -> what it is) and input model directories that no output may touch."""
    files = {policy.path.resolve(): "the policy file"}
    trees: dict[Path, str] = {}
    if policy.candidate.fingerprint is not None:
        files[policy.candidate.fingerprint.resolve()] = "candidate.fingerprint"
    models: list[tuple[Path, str]] = []
    if policy.candidate.path is not None:
        models.append((policy.candidate.path, "the candidate model (candidate.path)"))
    if policy.candidate.base_model is not None:
        models.append((policy.candidate.base_model, "the adapter's base model (candidate.base_model)"))
    for ref in policy.references:
        if ref.fingerprint is not None:
            files[ref.fingerprint.resolve()] = f"{ref.field}.fingerprint"
        if ref.model is not None:
            models.append((ref.model, f"the reference model {ref.field}.model"))
    for path, what in models:
        resolved = path.resolve()
        if resolved.is_dir():
            trees[resolved] = what
        elif resolved.name.endswith(".json"):  # a shard index: the shards are its siblings
            trees[resolved.parent] = what
        else:
            files[resolved] = what
    return files, trees


def check_output_paths(policy: Policy, targets: Mapping[str, Path | None], cache_dir: Path | None,
                       *, other_caches: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, every output that could not be written or would write where it must not.

    An output may not overwrite an input (the policy, a fingerprint file, a model file), land inside an
    input model's directory or the reference cache (where a forged document would be read back as a
    reference), name the same file as another output, be a directory, or sit where nothing can be
    written. Raises UsageError naming the output.
    """
    files, trees = _inputs(policy)
    for cache in (cache_dir, *other_caches):
        if cache is not None:
            trees[cache.resolve()] = "the reference cache (outputs never land there)"
    seen: dict[Path, str] = {}
    for kind, path in targets.items():
        if path is None:
            continue
        resolved = path.resolve()
        where = f"{path}: the {kind} output"
        if resolved in files:
            raise UsageError(f"{where} would overwrite {files[resolved]}; choose another path", file=str(path))
        for tree, what in trees.items():
            if resolved == tree or tree in resolved.parents:
                raise UsageError(f"{where} would write into {what} ({tree}); choose a path outside it",
                                 file=str(path))
        if resolved in seen:
            raise UsageError(f"{path}: the {seen[resolved]} and {kind} outputs name the same file", file=str(path))
        seen[resolved] = kind
        _check_writable(path, resolved, where)


def _check_writable(path: Path, resolved: Path, where: str) -> None:
    if resolved.exists() and not resolved.is_file():
        raise UsageError(f"{where} is {'a directory' if resolved.is_dir() else 'not a regular file'}; expected a "
                         f"file path", file=str(path))
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{where}: {ancestor} is not a directory", file=str(path))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: cannot write in {ancestor} (permission denied)", file=str(path))


# ---------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class VerifyOutcome:
    """What a verify run did: the policy, the result (None with --check-policy), its notes and the files written."""

    policy: Policy
    result: VerificationResult | None
    notes: tuple[str, ...] = ()
    written: Mapping[str, Path] = field(default_factory=dict)
    report_only: bool = False

    @property
    def exit_code(self) -> int:
        """0 for --check-policy; else the verdict's, but a FAIL exits 0 when the request is report-only."""
        if self.result is None:
            return EXIT_OK
        return EXIT_OK if self.report_only and self.result.exit_code == EXIT_FAIL else self.result.exit_code

    @property
    def fail_not_enforced(self) -> bool:
        """A FAIL verdict that report-only turned into exit 0 (said in the log by the caller)."""
        return self.result is not None and self.result.exit_code == EXIT_FAIL and self.exit_code == EXIT_OK


def render_outputs(result: VerificationResult, targets: Mapping[str, Path | None]) -> dict[str, bytes]:
    """Every output's bytes by kind, built before any is written (so a failure writes nothing)."""
    from tg_verify.atomic import canonical_json
    from tg_verify.report import json_report, markdown

    outputs: dict[str, bytes] = {}
    if targets.get("report") is not None:
        outputs["report"] = json_report.report_bytes(result)
    if targets.get("attestation") is not None or targets.get("predicate") is not None:
        from tg_verify.attestation.statement import build_statement

        statement = build_statement(result)
        if targets.get("attestation") is not None:
            outputs["attestation"] = canonical_json(statement)
        if targets.get("predicate") is not None:
            outputs["predicate"] = canonical_json(statement["predicate"])
    if targets.get("summary") is not None:
        outputs["summary"] = markdown.render(result).encode("utf-8")
    if targets.get("fingerprint") is not None:
        outputs["fingerprint"] = result.candidate.fingerprint.to_json_bytes()
    if targets.get("sarif") is not None:
        from tg_verify.report.sarif import sarif_bytes, verify_sarif

        outputs["sarif"] = sarif_bytes(verify_sarif(result))
    if targets.get("subjects") is not None:
        outputs["subjects"] = subject_checksums(result)
    return outputs


def subject_checksums(result: VerificationResult) -> bytes:
    """The attested files in sha256sum format, for actions/attest `subject-checksums`: its subjects are then
    exactly the predicate's files, named by their path in the model. A name with a line break is left out:
    the format cannot carry it; it stays in the predicate, and verify-attestation needs no subject for it."""
    files = sorted(result.candidate.files, key=lambda f: f.path)
    lines = [f"{f.sha256}  {f.path}\n" for f in files if "\n" not in f.path and "\r" not in f.path]
    return "".join(lines).encode("utf-8")


def execute(request: VerifyRequest, progress: ProgressSink | None = None) -> VerifyOutcome:
    """Run a verify request: load the policy, check every output path, verify (or only check the policy),
    write all outputs or none. Raises typed errors on bad input; prints nothing."""
    from tg_verify.atomic import write_all
    from tg_verify.pipeline import VerifyOptions, check_policy, verify
    from tg_verify.policy import load_policy
    from tg_verify.progress import NullProgress

    policy = load_policy(request.policy, candidate_override=request.candidate)
    targets = output_targets(request, policy)
    cache = request.cache()
    from tg_verify.pipeline import default_cache_dir

    # the default cache too: a run with --no-cache or --cache-dir must not plant a document where others read
    check_output_paths(policy, targets, cache, other_caches=(default_cache_dir(),))
    if request.check_policy:
        return VerifyOutcome(policy=policy, result=None, notes=tuple(check_policy(policy)))
    options = VerifyOptions(device=request.device, threads=request.threads, cache_dir=cache,
                            progress=progress or NullProgress(), require_weights=request.require_weights)
    result = verify(policy, options)
    outputs = render_outputs(result, targets)
    paths = {kind: path for kind, path in targets.items() if path is not None and kind in outputs}
    write_all({paths[kind]: data for kind, data in outputs.items()})
    return VerifyOutcome(policy=policy, result=result, written=paths, report_only=request.report_only)


def describe_policy(outcome: VerifyOutcome) -> list[str]:
    """--check-policy's output: one line for the valid policy, one per note."""
    policy = outcome.policy
    declared = ", ".join(x for x in (f"base {policy.declared.base}" if policy.declared.base else "",
                                     f"family {policy.declared_family}") if x)
    lines = [f"{shown(policy.path)}: valid policy (version {policy.version}; {len(policy.references)} references; "
             f"declares {declared})"]
    for note in outcome.notes:  # notes name paths from the policy: one safe line each
        warning = note.startswith("WARNING: ")
        lines.append(f"  {'warning' if warning else 'note'}: {one_line(note.removeprefix('WARNING: '))}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Verify, print, write outputs; the exit code is the verdict's (a FAIL exits 0 with --report-only)."""
    from tg_verify.progress import progress_sink, wants_progress

    output_format = chosen_format(args)  # a --json/--format clash is refused before any work
    request = request_from_args(args)
    with progress_sink(wants_progress(args.progress) and not request.check_policy) as sink:
        outcome = execute(request, sink)
    if outcome.result is None:
        print("\n".join(describe_policy(outcome)))
        return outcome.exit_code
    result = outcome.result
    from tg_verify.report import console, json_report, markdown
    from tg_verify.report.github import append_step_summary

    append_step_summary(markdown.render(result))
    if output_format != "text":
        from tg_verify.report.sarif import sarif_bytes, verify_sarif

        data = {"json": lambda: json_report.report_bytes(result),
                "markdown": lambda: markdown.render(result).encode("utf-8"),
                "sarif": lambda: sarif_bytes(verify_sarif(result))}[output_format]()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        out = console.make_console()
        console.render(result, out)
        for path in outcome.written.values():
            out.print(f"wrote {shown(str(path))}", style="dim", markup=False)
    if outcome.fail_not_enforced:
        print("tg-verify: verdict FAIL reported, not enforced (--report-only): exit 0", file=sys.stderr)
    return outcome.exit_code
