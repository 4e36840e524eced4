"""`tg-verify action`: the GitHub Action's entrypoint, a thin adapter over `tg-verify verify`.

It maps the INPUT_* variables to the same `VerifyRequest` the command line builds (the inputs become
verify flags, parsed by the verify parser itself) and calls the same `execute`: every verify flag
works the same through `args`, or is refused with a message naming it. What it adds is the Actions
glue: the predicate alone and the attested files as a subject-checksums file for actions/attest, the
SARIF log for code scanning, step outputs to $GITHUB_OUTPUT (random heredoc delimiters), the Markdown
verdict to $GITHUB_STEP_SUMMARY (size-bounded), `::error`/`::warning` annotations on the file an error
or finding is about, and `::group::` around each long phase. Every line it prints passes a CommandGuard
(tg_verify/escaping.py): the only workflow commands in its log are the ones it means. Features must be
recomputed from the weights unless the policy says otherwise (candidate.require_weights defaults to true
here). Exit 0 PASS, 1 FAIL (0 with the report-only input), 2 bad input, like the CLI.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from tg_verify.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, TgVerifyError, UsageError
from tg_verify.escaping import CommandGuard, one_line, shown
from tg_verify.report import github

if TYPE_CHECKING:
    from tg_verify.commands.verify import VerifyOutcome, VerifyRequest
    from tg_verify.pipeline import VerificationResult

VERB = "action"
ORDER = 90

# action.yml input -> the `tg-verify verify` flag it becomes. The entrypoint builds a verify command
# line from the inputs and parses it with the real verify parser, so the Action accepts exactly what
# the CLI accepts; a test keeps action.yml, this table and the verify flags in step.
FLAG_INPUTS: dict[str, str] = {
    "candidate": "--candidate",
    "report": "--report",
    "attestation": "--attestation",
    "device": "--device",
    "cache": "--cache-dir",
    "sarif": "--sarif",
}
# Inputs that are verify flags without a value (true/false).
SWITCH_INPUTS: dict[str, str] = {"report-only": "--report-only"}
# Inputs that are not verify flags: the policy (verify's positional), extra flags, and Actions glue.
OTHER_INPUTS = ("policy", "args", "predicate", "summary")
# Inputs the composite wrapper consumes itself (how to run the image); never seen by this entrypoint.
WRAPPER_INPUTS = ("runner", "image", "gpus")
# verify flags that make no sense in a workflow step, and why.
REFUSED_FLAGS: dict[str, str] = {
    "--json": "the Action writes the JSON report to a file (input 'report') and its path to the report-path output",
    "--format": "the Action writes the JSON report, the SARIF log and the summary to files (inputs report, sarif; "
                "$GITHUB_STEP_SUMMARY) and their paths to its outputs",
    "--progress": "the job log shows progress as log groups",
    "--no-progress": "the job log shows progress as log groups",
}
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        VERB, help="GitHub Action entrypoint: verify using INPUT_* environment variables",
        description=("Run as the tg-verify GitHub Action runs it: read INPUT_POLICY, INPUT_CANDIDATE, INPUT_REPORT, "
                     "INPUT_ATTESTATION, INPUT_PREDICATE, INPUT_DEVICE, INPUT_CACHE, INPUT_ARGS and INPUT_SUMMARY, "
                     "verify as `tg-verify verify` with the matching flags, and write $GITHUB_OUTPUT, "
                     "$GITHUB_STEP_SUMMARY and workflow-command annotations."),
        epilog="Exit codes: 0 PASS, 1 FAIL, 2 bad input, 3 internal error.")
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class ActionInputs:
    """The Action's inputs: the verify command line they make, and the Action-only settings."""

    argv: tuple[str, ...]  # arguments of `tg-verify verify`
    policy: Path
    predicate: Path | None
    summary: bool


def read_input(name: str, environ: Mapping[str, str]) -> str:
    """An input as the runner passes it: INPUT_<NAME> uppercased; hyphens kept (Docker) or as underscores."""
    upper = name.upper()
    for key in (f"INPUT_{upper}", f"INPUT_{upper.replace('-', '_')}"):
        if key in environ:
            return environ[key].strip()
    return ""


def parse_inputs(environ: Mapping[str, str]) -> ActionInputs:
    """Validate INPUT_* values and turn them into a verify command line; raise UsageError naming the input."""
    policy = read_input("policy", environ)
    if not policy:
        raise UsageError("input 'policy' is required (the policy YAML file)")
    argv: list[str] = [policy]
    for name in ("policy", *FLAG_INPUTS, "predicate"):
        value = read_input(name, environ)
        if value.startswith("-"):
            raise UsageError(f"input '{name}' looks like a flag ({value!r}); give a path or value")
        if "\n" in value:
            raise UsageError(f"input '{name}' must be a single line")
        if name in FLAG_INPUTS and value:
            argv += [FLAG_INPUTS[name], value]
    try:
        extra = shlex.split(read_input("args", environ))
    except ValueError as exc:
        raise UsageError(f"input 'args' cannot be split into flags ({exc})") from None
    for token in extra:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or len(flag) < 3:
            continue
        # argparse accepts unambiguous prefixes (--rep for --report), so match prefixes too.
        for name, full in FLAG_INPUTS.items():
            if full.startswith(flag):
                raise UsageError(f"input 'args' sets {full}; use the input '{name}' instead")
        for full, why in REFUSED_FLAGS.items():
            if full.startswith(flag):
                raise UsageError(f"input 'args': {full} is not available in the Action ({why})")
    if extra and not extra[0].startswith("-"):
        raise UsageError(f"input 'args' must hold flags, not {extra[0]!r}")
    for name, flag in SWITCH_INPUTS.items():
        value = read_input(name, environ).lower()
        if value not in TRUE + FALSE:
            raise UsageError(f"input '{name}' must be true or false, not {value!r}")
        if any(flag.startswith(token.split("=", 1)[0]) and token.startswith("--") and len(token) > 2
               for token in extra):
            raise UsageError(f"input 'args' sets {flag}; use the input '{name}' instead")
        if value in TRUE:
            argv.append(flag)
    summary = read_input("summary", environ).lower() or "true"
    if summary not in TRUE + FALSE:
        raise UsageError(f"input 'summary' must be true or false, not {summary!r}")
    predicate = read_input("predicate", environ)
    return ActionInputs(argv=tuple(argv + extra), policy=Path(policy), predicate=Path(predicate) if predicate else None,
                        summary=summary in TRUE)


class _InputParser(argparse.ArgumentParser):
    """The verify parser, raising UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"the inputs do not make a valid `tg-verify verify` command line: {message}")


def verify_request(inputs: ActionInputs, environ: Mapping[str, str]) -> VerifyRequest:
    """The VerifyRequest the inputs describe: the verify flags parsed by the verify parser, plus the Action's
    defaults (outputs under $RUNNER_TEMP/tg-verify, the predicate, the SARIF log, candidate.require_weights on)
    and the subject-checksums file for actions/attest, next to the predicate."""
    from tg_verify.commands import verify

    parser = _InputParser(prog="tg-verify verify", add_help=False)
    verify.add_arguments(parser)
    args = parser.parse_args(list(inputs.argv))
    default = _default_dir(environ)
    predicate = inputs.predicate or default / "predicate.json"
    return verify.request_from_args(
        args, predicate=inputs.predicate, require_weights=True, subjects=predicate.with_name("subjects.sha256"),
        defaults={"report": default / "report.json", "attestation": default / "attestation.json",
                  "predicate": predicate, "sarif": default / "tg-verify.sarif"})


def _default_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("RUNNER_TEMP") or ".") / "tg-verify"


class GroupProgress:
    """A progress sink for the job log: one `::group::` per phase holding a progress line every
    `interval` seconds (so a long GPU phase shows it is alive) and a closing line with size and time."""

    def __init__(self, out: CommandGuard, interval: float = 15.0) -> None:
        self._out = out
        self._interval = interval
        self._open = False
        self._title = ""
        self._total: float | None = None
        self._done = 0.0
        self._last_text = ""
        self._started = self._printed = 0.0

    def _write(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()

    def start(self, description: str, total: float | None) -> None:
        self._close()
        self._out.command(github.group_start(shown(description)))
        self._open, self._title, self._total, self._done, self._last_text = True, description, total, 0.0, ""
        self._started = self._printed = time.monotonic()

    def advance(self, amount: float = 1.0) -> None:
        self._done += amount

    def describe(self, text: str) -> None:
        self._last_text = text
        now = time.monotonic()
        if now - self._printed >= self._interval:
            self._printed = now
            self._write(f"{shown(text)} ({now - self._started:.0f} s)")

    def finish(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._open:
            return
        elapsed = time.monotonic() - self._started
        size = f", {self._done / 1e6:.1f} MB read" if self._total else ""
        self._write(f"{shown(self._last_text or self._title)}{size} in {elapsed:.1f} s")
        self._out.command(github.group_end())
        self._open = False


def _policy_line(policy: Path, needle: str | None) -> int | None:
    """1-based line of the first policy line mentioning `needle` (a reference id), for annotations."""
    return github.policy_line(policy, needle)


def _error_file(exc: TgVerifyError, policy: Path | None, environ: Mapping[str, str]) -> str | None:
    """The file an error is about, workspace-relative: the one it names (`exc.file`), else the policy."""
    for candidate in (exc.file, str(policy) if policy is not None else None):
        if candidate and Path(candidate).is_file():
            return github.workspace_relative(candidate, environ)
    return None


def _finding_file(message: str, policy: Path, environ: Mapping[str, str]) -> str:
    """The file a finding is about: an artifact warning names the weights file first; else the policy."""
    head = message.split(": ", 1)[0]
    for candidate in (Path(head), policy.parent / head):
        if head and head != message and candidate.is_file():
            return github.workspace_relative(candidate, environ)
    return github.workspace_relative(policy, environ)


def _fmt(value: Any) -> str:
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))


def outputs_for(outcome: VerifyOutcome, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The step outputs of a verify run (see action.yml `outputs`); paths normalised and workspace-relative."""
    from tg_verify.attestation.record import PREDICATE_TYPE

    written = {kind: github.output_path(path, environ) for kind, path in outcome.written.items()}
    paths = {"report-path": written.get("report", ""), "attestation-path": written.get("attestation", ""),
             "predicate-path": written.get("predicate", ""), "sarif-path": written.get("sarif", ""),
             "subjects-path": written.get("subjects", ""), "predicate-type": PREDICATE_TYPE}
    result = outcome.result
    if result is None:  # --check-policy: no verdict
        return {"verdict": "", **paths, "predicate-type": ""}
    declared = result.declared_reference
    lineage = declared.lineage if declared is not None else None
    reasons = [f.code for f in result.verdict.reasons if f.severity in ("fail", "warn")]
    return {
        "verdict": result.verdict.label,
        "distance": _fmt(declared.distance) if declared is not None else "",
        "family": _fmt(result.classification.family),
        "lineage-score": _fmt(lineage.score) if lineage is not None and lineage.comparable else "",
        "reasons": ",".join(dict.fromkeys(reasons)),
        **paths,
        "fingerprint-digest": f"sha256:{result.candidate.fingerprint_digest}",
        "root-digest": f"sha256:{result.candidate.root_digest}",
    }


def annotations_for(result: VerificationResult, policy: Path, environ: Mapping[str, str]) -> list[str]:
    """One ::error per failing reason and one ::warning per warning, anchored in the policy (or the file named)."""
    lines = []
    policy_file = github.workspace_relative(policy, environ)
    levels: dict[str, github.Level] = {"fail": "error", "warn": "warning"}
    for finding in result.verdict.reasons:
        level = levels.get(finding.severity)
        if level is None:
            continue
        file = _finding_file(finding.message, policy, environ)  # e.g. an artifact warning names its file
        line = None
        if file == policy_file:
            line = _policy_line(policy, finding.subject) or _policy_line(policy, "declared:")
        lines.append(github.annotation(level, one_line(f"{finding.code}: {finding.message}"), file=file, line=line,
                                       title=f"tg-verify {'FAIL' if level == 'error' else 'warning'}"))
    return lines


def execute(inputs: ActionInputs, environ: Mapping[str, str], out: CommandGuard) -> int:
    """Verify exactly as `tg-verify verify` does (same request, same function), then add the Actions glue."""
    from rich.console import Console

    from tg_verify.commands import verify
    from tg_verify.report import console, markdown

    request = verify_request(inputs, environ)
    progress = GroupProgress(out)
    try:
        outcome = verify.execute(request, progress)
    finally:
        progress.finish()
    if outcome.result is None:
        for line in verify.describe_policy(outcome):
            out.write(line + "\n")
        github.write_outputs(outputs_for(outcome, environ), environ)
        out.flush()
        return outcome.exit_code
    result = outcome.result
    console.render(result, Console(file=cast(TextIO, out), force_terminal=False, width=120, soft_wrap=True,
                                   highlight=False))
    for line in annotations_for(result, outcome.policy.path, environ):
        out.command(line)
    if inputs.summary:
        github.append_step_summary(markdown.render(result), environ)
    github.write_outputs(outputs_for(outcome, environ), environ)
    if outcome.fail_not_enforced:
        # report-only: the FAIL is in the log, the summary, the outputs and the files, but does not fail the job
        out.command(github.annotation("warning", "verdict FAIL reported, not enforced (input report-only: true)",
                                      file=github.workspace_relative(outcome.policy.path, environ),
                                      title="tg-verify report-only"))
    out.flush()
    return outcome.exit_code


def _bad_input_summary(message: str) -> str:
    fenced = message.replace("`" * 3, "'" * 3)
    return f"### ❌ tg-verify could not verify\n\n```\n{fenced}\n```\n"


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None, out: TextIO | None = None) -> int:
    """Entrypoint: an error becomes one ::error annotation, an `error` output and a summary note."""
    env = os.environ if environ is None else environ
    raw = sys.stdout if out is None else out
    # Every line goes through a guard, so nothing from a model file or the policy can be read as a workflow
    # command; the annotations and groups this entrypoint means as commands go past it (CommandGuard.command).
    stream = raw if isinstance(raw, CommandGuard) else CommandGuard(raw)
    try:
        return _run(args, env, stream)
    finally:
        stream.finish()


def _run(args: argparse.Namespace, env: Mapping[str, str], stream: CommandGuard) -> int:
    inputs: ActionInputs | None = None
    try:
        inputs = parse_inputs(env)
        return execute(inputs, env, stream)
    except Exception as exc:  # noqa: BLE001 - the Action's boundary: every failure must reach the run page
        known = isinstance(exc, TgVerifyError)
        code = exc.exit_code if isinstance(exc, TgVerifyError) else EXIT_INTERNAL
        message = str(exc) if known else (f"internal error: {type(exc).__name__}: {exc} "
                                          "(re-run with debug logging for a traceback)")
        title = "tg-verify: bad input" if code == EXIT_BAD_INPUT else "tg-verify: internal error"
        file = _error_file(exc, inputs.policy if inputs else None, env) \
            if isinstance(exc, TgVerifyError) and code == EXIT_BAD_INPUT else None
        stream.command(github.annotation("error", one_line(message), file=file, title=title))
        github.write_outputs({"verdict": "", "error": message.splitlines()[0][:1000]}, env)
        if inputs is None or inputs.summary:
            github.append_step_summary(_bad_input_summary(message), env)
        if env.get("RUNNER_DEBUG") == "1":  # "Enable debug logging" on a re-run
            stream.write(traceback.format_exc())
        if getattr(args, "debug", False):
            raise
        return code
