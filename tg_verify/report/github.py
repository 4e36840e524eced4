"""GitHub Actions runner protocol: workflow commands, $GITHUB_OUTPUT, $GITHUB_STEP_SUMMARY.

Mirrors what actions/toolkit (packages/core) does so tg-verify needs no Node: random heredoc
delimiters for outputs, the toolkit's escaping for annotations, and a size-bounded step summary.
Functions here build strings or append to the runner's files; only the CLI prints them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from tg_verify.errors import InputError

Level = Literal["error", "warning", "notice"]

# The runner refuses a step summary over 1024 KiB ("upload aborted"); leave room for the runner's
# own framing and for other steps' text in the same file.
SUMMARY_LIMIT_BYTES = 1024 * 1024
SUMMARY_MARGIN_BYTES = 8 * 1024
# Outputs are capped at 1 MB per job; a single value larger than this is a bug on our side.
OUTPUT_VALUE_LIMIT_BYTES = 64 * 1024
TRUNCATION_NOTE = ("\n\n> **Summary truncated** to stay under GitHub's 1 MiB step-summary limit; "
                   "the full report is in the JSON report file.\n")


def escape_data(value: str) -> str:
    """Escape a workflow-command message as the toolkit's `escapeData` does (%, CR, LF)."""
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(value: str) -> str:
    """Escape a workflow-command property value as the toolkit's `escapeProperty` does (adds : and ,)."""
    return escape_data(value).replace(":", "%3A").replace(",", "%2C")


def command(name: str, message: str = "", properties: Mapping[str, object] | None = None) -> str:
    """One workflow command line: `::name key=value,...::message` (None properties are dropped)."""
    props = ",".join(f"{key}={escape_property(str(value))}"
                     for key, value in (properties or {}).items() if value is not None and value != "")
    head = f"::{name} {props}" if props else f"::{name}"
    return f"{head}::{escape_data(message)}"


def annotation(level: Level, message: str, *, file: str | None = None, line: int | None = None,
               end_line: int | None = None, title: str | None = "tg-verify") -> str:
    """An ::error/::warning/::notice annotation, optionally anchored to a file (and line)."""
    if level not in ("error", "warning", "notice"):
        raise ValueError(f"annotation level must be error, warning or notice, not {level!r}")
    return command(level, message, {"file": file, "line": line, "endLine": end_line, "title": title})


def group_start(title: str) -> str:
    """Start a collapsible log group (close it with `group_end()`)."""
    return command("group", title)


def group_end() -> str:
    """Close the current log group."""
    return "::endgroup::"


def workspace_relative(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> str:
    """A path as annotations want it: relative to $GITHUB_WORKSPACE when inside it, POSIX separators."""
    env = os.environ if environ is None else environ
    resolved = Path(path).resolve()
    workspace = env.get("GITHUB_WORKSPACE")
    if workspace:
        try:
            return resolved.relative_to(Path(workspace).resolve()).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


def policy_line(policy: Path, needle: str | None) -> int | None:
    """1-based line of the first policy line that names `needle` (a reference id or a key such as
    `declared:`), comments ignored; where annotations and SARIF results point."""
    if not needle:
        return None
    try:
        lines = policy.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0]
        if needle in text.replace('"', " ").replace("'", " ").replace("[", " ").replace("]", " ").replace(",", " ") \
                .split() or text.strip().endswith(f" {needle}"):
            return number
    return None


def output_path(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> str:
    """A path as a step output: normalised (no `..`, no `./`), relative to $GITHUB_WORKSPACE when inside it
    (what later steps such as actions/upload-artifact resolve against), else absolute; POSIX separators."""
    env = os.environ if environ is None else environ
    resolved = Path(os.path.abspath(path))
    workspace = env.get("GITHUB_WORKSPACE")
    if workspace:
        try:
            return resolved.relative_to(Path(os.path.abspath(workspace))).as_posix()
        except ValueError:
            pass
    return resolved.as_posix()


def format_output(name: str, value: str, delimiter: str | None = None) -> str:
    """One `name<<DELIM\\nvalue\\nDELIM\\n` record for $GITHUB_OUTPUT, as the toolkit writes it.

    The delimiter is random (`ghadelimiter_<uuid4>`) so a value cannot end the record early; a name
    or value containing the delimiter is refused, exactly as `prepareKeyValueMessage` does.
    """
    if not name or any(ch in name for ch in "\r\n") or "<<" in name:
        raise InputError(f"GitHub output name {name!r} is empty or contains a newline or '<<'")
    if len(value.encode("utf-8")) > OUTPUT_VALUE_LIMIT_BYTES:
        raise InputError(f"GitHub output {name!r} is over {OUTPUT_VALUE_LIMIT_BYTES} bytes")
    delimiter = delimiter or f"ghadelimiter_{uuid.uuid4()}"
    if delimiter in name or delimiter in value:
        raise InputError(f"GitHub output {name!r}: value contains the delimiter {delimiter!r}")
    return f"{name}<<{delimiter}\n{value}\n{delimiter}\n"


def _append(path: str, text: str, what: str) -> None:
    # Runner file commands are append-only by protocol (the runner reads the file after the step);
    # appending is what the toolkit does, and it keeps what earlier writers put there.
    try:
        with open(path, "a", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
    except OSError as exc:
        raise InputError(f"{path}: cannot append to {what} ({exc.strerror or exc})") from exc


def write_outputs(outputs: Mapping[str, str], environ: Mapping[str, str] | None = None) -> bool:
    """Append every output to $GITHUB_OUTPUT; False (nothing written) when not running under Actions."""
    env = os.environ if environ is None else environ
    path = env.get("GITHUB_OUTPUT")
    if not path:
        return False
    _append(path, "".join(format_output(name, value) for name, value in outputs.items()), "$GITHUB_OUTPUT")
    return True


def _close_open_blocks(text: str) -> str:
    """Close a code fence or <details> left open by a cut, so the rest of the page still renders."""
    closing = ""
    if text.count("```") % 2:
        closing += "\n```"
    opened = text.count("<details") - text.count("</details>")
    closing += "\n</details>" * max(opened, 0)
    return text + closing


def trim_summary(markdown: str, budget_bytes: int) -> str:
    """`markdown` cut at a line boundary so that it (plus a truncation note) fits in `budget_bytes`.

    Returned unchanged when it already fits; otherwise the cut keeps whole lines, closes any open
    code fence or <details>, and says it was truncated.
    """
    data = markdown.encode("utf-8")
    if len(data) <= budget_bytes:
        return markdown
    note = TRUNCATION_NOTE.encode("utf-8")
    room = budget_bytes - len(note) - 64  # 64: closing tags added by _close_open_blocks
    if room <= 0:
        return ""
    head = data[:room].decode("utf-8", errors="ignore")
    cut = head.rfind("\n")
    head = head[:cut] if cut > 0 else head
    return _close_open_blocks(head) + TRUNCATION_NOTE


def append_step_summary(markdown: str, environ: Mapping[str, str] | None = None,
                        limit_bytes: int = SUMMARY_LIMIT_BYTES) -> bool:
    """Append `markdown` to $GITHUB_STEP_SUMMARY, trimmed so the file stays under the runner's limit.

    The budget accounts for what the file already holds. False when not running under Actions.
    """
    env = os.environ if environ is None else environ
    path = env.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    try:
        existing = os.path.getsize(path)
    except OSError:
        existing = 0
    budget = limit_bytes - SUMMARY_MARGIN_BYTES - existing
    text = trim_summary(markdown if markdown.endswith("\n") else markdown + "\n", budget)
    if text:
        _append(path, text, "$GITHUB_STEP_SUMMARY")
    return True


def is_actions(environ: Mapping[str, str] | None = None) -> bool:
    """True when running as a GitHub Actions step."""
    env = os.environ if environ is None else environ
    return env.get("GITHUB_ACTIONS") == "true"
