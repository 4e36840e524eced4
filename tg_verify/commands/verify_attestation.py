"""`tg-verify verify-attestation ATTESTATION MODEL [--policy POLICY.yml] [--json]`: the consumer's offline check.

Exit 0 only when every file digest, the root digest, the policy digest (when given) and the verdict
decided again from the recorded rules and evidence match, the features were recomputed from the
attested files, and the attestation says PASSED; 1 when it says FAILED, its evidence contradicts its
verdict, or its features came from a fingerprint file; 2 when it is malformed, or the model (an
unattested weight file next to it included) or the policy differ from what was attested.
Light: imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import argparse
import sys

from tg_verify.atomic import canonical_json
from tg_verify.attestation.check import AttestationReport, verify_attestation
from tg_verify.attestation.envelope import load_attestation
from tg_verify.commands import add_format_option, chosen_format
from tg_verify.escaping import one_line, shown
from tg_verify.progress import progress_sink, wants_progress

VERB = "verify-attestation"
ORDER = 20

SIGNATURE_NOTE = ("signatures are not verified by tg-verify; verify them first with "
                  "`gh attestation verify FILE --predicate-type URI` or `cosign verify-blob-attestation`")


POLICY_NOT_CHECKED = ("the policy was NOT checked: pass --policy POLICY.yml to check that the attested policy is "
                      "the one you trust")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        VERB, help="check a tg-verify attestation against a model directory (offline)",
        description=("Recompute the model's file digests and root digest, compare them with the attestation's "
                     "subjects, name weight files the attestation does not cover, check the policy digest (with "
                     "--policy), and decide the verdict again from the recorded rules and evidence. Accepts a bare "
                     "in-toto Statement, a DSSE envelope, a Sigstore bundle "
                     "or JSON Lines of bundles (as `gh attestation download` writes). " + SIGNATURE_NOTE + "."),
        epilog="Exit codes: 0 all checks hold and PASSED; 1 FAILED, contradicting evidence, or features not "
               "recomputed from the files; 2 malformed attestation, or model/policy differ from what was attested.")
    parser.add_argument("attestation", metavar="ATTESTATION", help="Statement, DSSE envelope or Sigstore bundle")
    parser.add_argument("model", metavar="MODEL", help="the model directory (or single .safetensors or .gguf file)")
    parser.add_argument("--policy", metavar="POLICY.yml", help="also check that this policy is the attested one")
    parser.add_argument("--base", metavar="DIR",
                        help="for an adapter: also check the base model it was merged onto against the attestation")
    parser.add_argument("--allow-fingerprint-evidence", action="store_true",
                        help="accept an attestation whose features were read from a fingerprint file rather than "
                             "recomputed from the attested files (reported, not failed)")
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
    if not report.policy_checked:
        lines.append(f"  note: {POLICY_NOT_CHECKED}")
    verdict = "VERIFIED" if report.ok else "NOT VERIFIED"
    unchecked = "" if report.policy_checked else "; the policy was NOT checked"
    lines.append(f"{verdict}: attested {shown(report.verification_result)}; exit {report.exit_code}{unchecked}")
    lines.append(f"note: {SIGNATURE_NOTE}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    output_format = chosen_format(args)
    loaded = load_attestation(args.attestation)
    with progress_sink(wants_progress(args.progress)) as sink:
        sink.start("hashing model files", None)
        report = verify_attestation(loaded, args.model, policy=args.policy, base=args.base,
                                    allow_fingerprint_evidence=args.allow_fingerprint_evidence,
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
