"""`tg-verify POLICY.yml` (= `tg-verify verify POLICY.yml`): the main job, a lineage verdict for a release gate.

Prints a summary (or the JSON report with --json), writes the report, the attestation, the candidate's
fingerprint and the Markdown summary when asked, and appends the summary to $GITHUB_STEP_SUMMARY.
Exit 0 PASS, 1 FAIL, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tg_verify.atomic import canonical_json, write_bytes
from tg_verify.commands import add_format_option, add_threads_option, chosen_format
from tg_verify.errors import EXIT_FAIL, EXIT_OK, UsageError
from tg_verify.escaping import shown
from tg_verify.fingerprint.settings import DEVICE_CHOICES
from tg_verify.pipeline import VerificationResult, VerifyOptions, default_cache_dir, verify
from tg_verify.policy import Policy, load_policy
from tg_verify.progress import progress_sink, wants_progress

VERB = "verify"
ORDER = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `verify` parser (also reached as `tg-verify POLICY.yml`)."""
    parser = subparsers.add_parser(
        VERB, help="check a model's declared lineage against a policy (the main job: tg-verify POLICY.yml)",
        description=("Fingerprint the candidate named in POLICY.yml, measure it against the policy's reference "
                     "fingerprints (distance, family attribution, lineage test) and decide PASS or FAIL with "
                     "reasons. The policy schema is in docs/policy.md, the reason codes in docs/reasons.md."),
        epilog="Exit codes: 0 PASS, 1 FAIL, 2 bad input (no output written), 3 internal error.")
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
    parser.set_defaults(handler=run)


def _target(flag: str | None, configured: Path | None) -> Path | None:
    return Path(flag) if flag else configured


def render_outputs(result: VerificationResult, *, report: Path | None, attestation: Path | None,
                   summary: Path | None, fingerprint: Path | None, sarif: Path | None = None) -> dict[Path, bytes]:
    """Every output file's bytes, built before any is written (so a failure writes nothing)."""
    from tg_verify.report import json_report, markdown
    from tg_verify.report.sarif import sarif_bytes, verify_sarif

    outputs: dict[Path, bytes] = {}
    if report is not None:
        outputs[report] = json_report.report_bytes(result)
    if attestation is not None:
        from tg_verify.report.attestation import build_statement

        outputs[attestation] = canonical_json(build_statement(result))
    if summary is not None:
        outputs[summary] = markdown.render(result).encode("utf-8")
    if fingerprint is not None:
        outputs[fingerprint] = result.candidate.fingerprint.to_json_bytes()
    if sarif is not None:
        outputs[sarif] = sarif_bytes(verify_sarif(result))
    return outputs


def check_output_paths(policy: Policy, result: VerificationResult | None, targets: dict[str, Path | None]) -> None:
    """Refuse outputs that would overwrite an input (the policy, a fingerprint, a model file) or each other.

    Called before the run (without `result`) to fail fast, and after it with the candidate's files.
    """
    inputs = {policy.path.resolve(): "the policy file"}
    for ref in policy.references:
        if ref.fingerprint is not None:
            inputs[ref.fingerprint.resolve()] = f"{ref.field}.fingerprint"
    if policy.candidate.fingerprint is not None:
        inputs[policy.candidate.fingerprint.resolve()] = "candidate.fingerprint"
    if result is not None and result.candidate.path is not None:
        root = result.candidate.path if result.candidate.path.is_dir() else result.candidate.path.parent
        for entry in result.candidate.files:
            inputs[(root / entry["path"]).resolve()] = f"candidate file {entry['path']}"
    seen: dict[Path, str] = {}
    for kind, path in targets.items():
        if path is None:
            continue
        resolved = path.resolve()
        if resolved in inputs:
            raise UsageError(f"{path}: the {kind} output would overwrite {inputs[resolved]}; choose another path")
        if resolved in seen:
            raise UsageError(f"{path}: the {seen[resolved]} and {kind} outputs name the same file")
        seen[resolved] = kind


def output_targets(args: argparse.Namespace, policy: Policy) -> dict[str, Path | None]:
    """Where each output goes: the flag, else the policy's `outputs:` entry, else nowhere."""
    return {"report": _target(args.report, policy.outputs.report),
            "attestation": _target(args.attestation, policy.outputs.attestation),
            "summary": _target(args.summary, policy.outputs.summary),
            "fingerprint": _target(args.fingerprint_out, policy.outputs.fingerprint),
            "sarif": _target(getattr(args, "sarif", None), None)}


def run_policy(args: argparse.Namespace) -> tuple[Policy, VerificationResult]:
    """Load the policy and run it with the command line's overrides."""
    policy = load_policy(args.policy, candidate_override=args.candidate)
    check_output_paths(policy, None, output_targets(args, policy))
    cache = None if args.no_cache else (Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    with progress_sink(wants_progress(args.progress)) as sink:
        result = verify(policy, VerifyOptions(device=args.device, threads=args.threads, cache_dir=cache, progress=sink))
    return policy, result


def check_only(args: argparse.Namespace) -> int:
    """--check-policy: validate the policy and its fingerprint files, read no weights."""
    from tg_verify.pipeline import check_policy

    policy = load_policy(args.policy, candidate_override=args.candidate)
    check_output_paths(policy, None, output_targets(args, policy))
    notes = check_policy(policy)
    declared = ", ".join(x for x in (f"base {policy.declared.base}" if policy.declared.base else "",
                                     f"family {policy.declared_family}") if x)
    print(f"{policy.path}: valid policy (version {policy.version}; {len(policy.references)} references; "
          f"declares {declared})")
    for note in notes:
        warning = note.startswith("WARNING: ")
        print(f"  {'warning' if warning else 'note'}: {note.removeprefix('WARNING: ')}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Verify, print, write outputs; the exit code is the verdict's."""
    from tg_verify.report import console, json_report, markdown
    from tg_verify.report.github import append_step_summary

    if args.check_policy:
        return check_only(args)
    policy, result = run_policy(args)
    targets = output_targets(args, policy)
    check_output_paths(policy, result, targets)
    outputs = render_outputs(result, **targets)
    for path, data in outputs.items():
        write_bytes(path, data)
    append_step_summary(markdown.render(result))
    output_format = chosen_format(args)
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
        for path in outputs:
            out.print(f"wrote {shown(str(path))}", style="dim", markup=False)
    return report_only_exit(result.exit_code, args.report_only)


def report_only_exit(code: int, report_only: bool) -> int:
    """The exit code: a FAIL verdict exits 0 under --report-only (said on stderr); every other code stands."""
    if report_only and code == EXIT_FAIL:
        print("tg-verify: verdict FAIL reported, not enforced (--report-only): exit 0", file=sys.stderr)
        return EXIT_OK
    return code
