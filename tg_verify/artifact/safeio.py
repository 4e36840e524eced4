"""Opening untrusted paths safely: regular files only, symlink loops and FIFOs refused before any read.

A FIFO would block a read forever and a device can be endless; both are refused on `stat`, before
`open`, and re-checked on the opened descriptor (O_NONBLOCK) so a swap in between cannot slip through.
Files read through maps (the reader, the hashing) drop the pages they are done with (`drop_pages`).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
from pathlib import Path
from typing import Any

from tg_verify.artifact.errors import (
    JsonFileError,
    NoModelError,
    NotRegularFileError,
    SymlinkLoopError,
    UnreadableFileError,
    shown,
)

MAX_JSON_BYTES = 50_000_000  # config / index / adapter config; real ones are kilobytes to a few MB
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def os_error(path: Path | str, exc: OSError, what: str, *, directory: bool = False) -> Exception:
    """Map an OSError on `path` to the typed error a user should see; `file` is the path unless it is a directory."""
    file = None if directory else str(path)
    if exc.errno == errno.ELOOP:
        return SymlinkLoopError(f"{shown(path)}: {what} is a symbolic link loop (or nests too deep)", file=file)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        dangling = os.path.islink(path)
        return NoModelError(f"{shown(path)}: {what} " + ("is a symbolic link to a missing target" if dangling
                                                         else "does not exist"), file=file)
    return UnreadableFileError(f"{shown(path)}: cannot read {what} ({exc.strerror or exc})", file=file)


def stat_path(path: Path | str, what: str) -> os.stat_result:
    """`os.stat` (symlinks followed) with typed errors for missing paths, loops and permissions."""
    try:
        return os.stat(path)
    except OSError as exc:
        raise os_error(path, exc, what) from None


def stat_regular(path: Path | str, what: str) -> os.stat_result:
    """Stat `path`, following symlinks, and require a regular file."""
    info = stat_path(path, what)
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFileError(f"{shown(path)}: {what} is {_kind(info.st_mode)}; tg-verify reads regular files only",
                                  file=str(path))
    return info


def open_regular(path: Path | str, what: str) -> tuple[int, os.stat_result]:
    """Open a regular file read-only; returns (fd, fstat). The caller closes the fd."""
    stat_regular(path, what)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise os_error(path, exc, what) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # swapped between stat and open
        os.close(fd)
        raise NotRegularFileError(f"{shown(path)}: {what} is {_kind(info.st_mode)}; tg-verify reads regular files only",
                                  file=str(path))
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd, info


def read_exactly(fd: int, count: int) -> bytes:
    """Read up to `count` bytes from the current position (fewer only at end of file)."""
    chunks: list[bytes] = []
    remaining = count
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _no_constants(literal: str) -> None:
    raise ValueError(f"{literal} is not valid JSON")


def strict_json(text: str, **hooks: Any) -> Any:
    """json.loads that refuses NaN/Infinity literals (not JSON, and a parser-differential risk)."""
    return json.loads(text, parse_constant=_no_constants, **hooks)


def load_json_file(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> tuple[dict[str, Any], int]:
    """Read a small side-car JSON object (config, index, adapter config) as untrusted input; (document, size)."""
    fd, info = open_regular(path, what)
    try:
        if info.st_size > max_bytes:
            raise JsonFileError(f"{shown(path)}: {what} is {info.st_size} bytes, over the {max_bytes}-byte limit",
                                file=str(path))
        try:
            data = read_exactly(fd, info.st_size)
        except OSError as exc:
            raise os_error(path, exc, what) from None
    finally:
        os.close(fd)
    try:
        document = strict_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JsonFileError(f"{shown(path)}: {what} is not valid JSON ({shown(str(exc)[:120])})",
                            file=str(path)) from None
    if not isinstance(document, dict):
        raise JsonFileError(f"{shown(path)}: {what} must be a JSON object, got {type(document).__name__}",
                            file=str(path))
    return document, len(data)


def read_json_file(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in `path`, validated as in `load_json_file`."""
    return load_json_file(path, what, max_bytes)[0]


def drop_pages(buffer: mmap.mmap, start: int, stop: int) -> None:
    """Advise the kernel to unmap [start, stop) of a map (page-aligned down): resident memory shrinks, and
    pages touched again are re-read from the file. Advice only: where it fails, memory use is higher and
    results are unchanged."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    aligned = start - start % mmap.PAGESIZE
    try:
        buffer.madvise(advice, aligned, min(len(buffer), stop) - aligned)
    except (OSError, ValueError):
        pass
