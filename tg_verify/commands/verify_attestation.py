"""`tg-verify verify-attestation ATTESTATION MODEL [--policy POLICY.yml] [--json]`: the consumer's offline check.

Exit 0 only when every file digest, the root digest, the policy digest (when given) and the
re-derived verdict match and the attestation says PASSED; 1 when it says FAILED or its evidence
contradicts its verdict; 2 when it is malformed or the model/policy were changed.
"""

from __future__ import annotations

import argparse
import sys

from tg_verify.atomic import canonical_json
from tg_verify.commands import add_format_option, chosen_format
from tg_verify.escaping import one_line, shown
from tg_verify.progress import progress_sink, wants_progress
from tg_verify.report.attestation import load_attestation
from tg_verify.report.attestation_check import AttestationReport, verify_attestation

VERB = "verify-attestation"
ORDER = 20

SIGNATURE_NOTE = ("signatures are not verified by tg-verify; verify them first with "
                  "`gh attestation verify FILE --predicate-type URI` or `cosign verify-blob-attestation`")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        VERB, help="check a tg-verify attestation against a model directory (offline)",
        description=("Recompute the model's file digests and root digest, compare them with the attestation's "
                     "subjects, check the policy digest (with --policy), and re-derive the verdict from the "
                     "recorded evidence. Accepts a bare in-toto Statement, a DSSE envelope, a Sigstore bundle "
                     "or JSON Lines of bundles (as `gh attestation download` writes). " + SIGNATURE_NOTE + "."),
        epilog="Exit codes: 0 all checks hold and PASSED; 1 FAILED or contradicting evidence; "
               "2 malformed attestation, or model/policy differ from what was attested.")
    parser.add_argument("attestation", metavar="ATTESTATION", help="Statement, DSSE envelope or Sigstore bundle")
    parser.add_argument("model", metavar="MODEL", help="the model directory (or single .safetensors file)")
    parser.add_argument("--policy", metavar="POLICY.yml", help="also check that this policy is the attested one")
    parser.add_argument("--base", metavar="DIR",
                        help="for an adapter: also check the base model it was merged onto against the attestation")
    add_format_option(parser, "one line per check")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar while hashing (default: on a terminal outside CI)")
    parser.set_defaults(handler=run)


def _render(report: AttestationReport) -> str:
    # Names, codes and ids in the checks come from the attestation, which anyone can write: escaped, one line each.
    lines = [f"attestation {shown(report.source)} ({report.wrapper}) for {shown(report.model)}"]
    for check in report.checks:
        mark = "ok  " if check.ok else "FAIL"
        lines.append(f"  {mark} {one_line(check.name)}: {one_line(check.detail)}")
    if report.has_base and not any(c.name.startswith("base file") for c in report.checks):
        lines.append("  note: the candidate is an adapter; pass --base DIR to check the base model it was merged onto")
    verdict = "VERIFIED" if report.ok else "NOT VERIFIED"
    lines.append(f"{verdict}: attested {shown(report.verification_result)}; exit {report.exit_code}")
    lines.append(f"note: {SIGNATURE_NOTE}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    output_format = chosen_format(args)
    loaded = load_attestation(args.attestation)
    with progress_sink(wants_progress(args.progress)) as sink:
        sink.start("hashing model files", None)
        report = verify_attestation(loaded, args.model, policy=args.policy, base=args.base,
                                    progress=sink.advance)
    if output_format == "json":
        sys.stdout.write(canonical_json(report.to_dict()).decode("utf-8"))
    elif output_format == "markdown":
        from tg_verify.report.markdown import render_attestation

        sys.stdout.write(render_attestation(report))
    elif output_format == "sarif":
        from tg_verify.report.sarif import attestation_sarif, sarif_bytes

        sys.stdout.write(sarif_bytes(attestation_sarif(report)).decode("utf-8"))
    else:
        print(_render(report))
    return report.exit_code
