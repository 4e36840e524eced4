"""Untrusted text made safe to print: one line, no terminal controls, no CI workflow commands, no markup.

Model files, policies, fingerprints and attestations come from people a pipeline does not trust, and
what tg-verify prints lands in a CI job log, where a line that starts with `::` after leading
whitespace, or that holds `##[` anywhere, is a workflow command (actions/runner
`ActionCommand.TryParseV2`/`TryParse`; Azure Pipelines reads `##vso[`): `::add-mask::FAIL` would hide
every later "FAIL", `::stop-commands::` would silence the real annotations. Two layers:

- `shown()` escapes one untrusted value (a file, tensor or model name, a JSON value, a reference
  id) before it is put into a message: control and invisible characters as `\\n`/`\\xNN`/`\\uNNNN`,
  backslashes doubled when anything is escaped, and the command markers broken up (`:\\u003a`,
  `#\\u0023[`), so the value stays on one line and can never start or hold a command;
- `CommandGuard` wraps stdout/stderr at the CLI (and the Action's log stream): any line that would
  still read as a command (a rich table wrapping a value onto a new line, a message that slipped
  past `shown()`) is neutralised the same way. Lines tg-verify means as commands (annotations,
  groups) are written past the guard, through `CommandGuard.command()`.

`markdown_text()` and `markdown_code()` do the same for the Markdown step summary, where HTML and
Markdown from an input must render as text.
"""

from __future__ import annotations

import io
import re
from typing import IO, Any

# Sequences that make the runner read a line as a command: `::` at the start (after whitespace, which
# .NET's TrimStart and Python's lstrip both drop), `##[` anywhere (the legacy syntax), `##vso[` (Azure).
_MARKER = re.compile(r"::|##\[|##vso\[")
_MARKER_ESCAPES = {"::": ":\\u003a", "##[": "#\\u0023[", "##vso[": "#\\u0023vso["}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")
DEFAULT_LIMIT = 400


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _break_markers(text: str) -> str:
    return _MARKER.sub(lambda m: _MARKER_ESCAPES[m.group(0)], text)


def is_plain(text: str) -> bool:
    """True when `text` prints as itself on one line: printable characters only and no command marker."""
    return text.isprintable() and _MARKER.search(text) is None


def shown(value: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """An untrusted value as one safe line: unchanged when plain, else escaped (see the module docstring).

    Longer than `limit` characters, it is cut and says how much was left out.
    """
    text = str(value)
    cut = ""
    if limit is not None and len(text) > limit:
        text, cut = text[:limit], f"...({len(text) - limit} more characters)"
    if is_plain(text):
        return text + cut
    escaped = "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else _escape_char(ch) for ch in text)
    return _break_markers(escaped) + cut


def one_line(text: str) -> str:
    """A composed message (trusted words around values already `shown()`) made one safe line.

    Unlike `shown()` it leaves backslashes alone, so text that was escaped once is not escaped again.
    """
    if is_plain(text):
        return text
    return _break_markers("".join(ch if ch.isprintable() else _escape_char(ch) for ch in text))


def neutralise_line(line: str) -> str:
    """One output line (no line break in it) that the runner cannot read as a workflow command."""
    stripped = line.lstrip()
    if stripped.startswith("::"):
        start = len(line) - len(stripped)
        line = line[:start] + ":\\u003a" + stripped[2:]
    if "##" in line:
        line = re.sub(r"##\[|##vso\[", lambda m: _MARKER_ESCAPES[m.group(0)], line)
    return line


def neutralise(text: str) -> str:
    """`text` with every line neutralised (line breaks kept as they are)."""
    parts = _LINE_BREAK.split(text)
    return "".join(part if index % 2 else neutralise_line(part) for index, part in enumerate(parts))


class CommandGuard(io.TextIOBase):
    """A text stream that passes everything through to `raw` but never a line the runner reads as a command.

    Whole lines are neutralised as they complete; a partial line is held until its line break (or
    `close()`), because a command marker can be split across two writes. `command()` writes a line
    tg-verify means as a workflow command straight to `raw`.
    """

    def __init__(self, raw: IO[str]) -> None:
        super().__init__()
        self._raw = raw
        self._pending = ""

    @property
    def raw(self) -> IO[str]:
        return self._raw

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return bool(getattr(self._raw, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self._raw.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._raw, "encoding", None) or "utf-8"

    @property
    def buffer(self) -> _BinaryGuard:
        """Bytes written here (e.g. a JSON report on stdout) go through the same guard, decoded as UTF-8."""
        return _BinaryGuard(self)

    def write(self, text: str) -> int:
        data = self._pending + text
        parts = _LINE_BREAK.split(data)
        # parts: line, break, line, break, ..., tail; a tail ending in "\r" may be the start of "\r\n"
        self._pending = parts.pop()
        if self._pending.endswith("\r") and not parts:
            return len(text)
        out = "".join(part if index % 2 else neutralise_line(part) for index, part in enumerate(parts))
        if out:
            self._raw.write(out)
        return len(text)

    def command(self, line: str) -> None:
        """Write one line that is meant as a workflow command (built by tg_verify.report.github), on a line
        of its own: a partial line before it is ended first."""
        if self._pending:
            self._raw.write(neutralise_line(self._pending) + "\n")
            self._pending = ""
        self._raw.write(line + "\n")
        self._raw.flush()

    def _flush_pending(self) -> None:
        if self._pending:
            self._raw.write(neutralise_line(self._pending))
            self._pending = ""

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._flush_pending()
        self._raw.flush()
        super().close()

    def finish(self) -> None:
        """Write any partial last line (neutralised) without closing `raw`."""
        self._flush_pending()
        self._raw.flush()


class _BinaryGuard:
    """`CommandGuard.buffer`: bytes decoded as UTF-8 and written through the guard."""

    def __init__(self, guard: CommandGuard) -> None:
        self._guard = guard

    def write(self, data: bytes) -> int:
        self._guard.write(data.decode("utf-8", errors="replace"))
        return len(data)

    def flush(self) -> None:
        self._guard.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._guard, name)


# ---------------------------------------------------------------------------------------------
# Markdown (GitHub step summary, pull-request comments)
# ---------------------------------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()!#~|{}])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}


def markdown_text(value: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """An input value as inert Markdown text on one line (safe in a table cell): HTML characters as
    entities, Markdown punctuation backslash-escaped, so `</details><h1>PASS</h1>` and `![x](url)` show
    as the characters they are."""
    text = " ".join(shown(value, limit).split())
    text = "".join(_HTML.get(ch, ch) for ch in text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def markdown_code(value: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """An input value as inline code on one line (safe in a table cell): nothing inside a code span
    renders, backticks cannot close it (they become '), and pipes are escaped for GFM tables."""
    text = " ".join(shown(value, limit).split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`" if text else "` `"
