"""Atomic output files: write to a temporary sibling, fsync, rename. No half-written reports.

`write_all` extends this to a set of files: every file is staged before the first one is renamed into
place, so a run that cannot write one of its outputs leaves none of them behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tg_verify.errors import InputError


def _stage(target: Path, data: bytes, created: list[Path]) -> str:
    """Write `data` to a new temporary sibling of `target` (fsynced, usual permissions); return its path.

    Parent directories made for it are appended to `created`, so a failed set of writes can remove them.
    """
    parent = target.parent if str(target.parent) else Path(".")
    try:
        missing = [d for d in (parent, *parent.parents) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        created.extend(reversed(missing))
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InputError(f"{target}: cannot write output ({exc.strerror or exc})", file=str(target)) from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        _remove([tmp], [])
        if isinstance(exc, OSError):
            raise InputError(f"{target}: cannot write output ({exc.strerror or exc})", file=str(target)) from exc
        raise
    return tmp


def _remove(temporaries: list[str], directories: list[Path]) -> None:
    for tmp in temporaries:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    for directory in reversed(directories):
        try:
            directory.rmdir()  # only if still empty
        except OSError:
            pass


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (same-directory temp file + os.replace)."""
    return write_all({Path(path): data})[0]


def write_all(files: Mapping[Path, bytes]) -> list[Path]:
    """Write every file or none: all are staged as temporary siblings first, then renamed into place.

    A file that cannot be staged (unwritable directory, full disk) removes the others' temporaries and
    raises, so no output appears; the renames that follow are atomic and do not fail on a sane filesystem.
    """
    staged: list[tuple[str, Path]] = []
    created: list[Path] = []
    try:
        for path, data in files.items():
            staged.append((_stage(Path(path), data, created), Path(path)))
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException as exc:
        _remove([tmp for tmp, _ in staged], created)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write outputs ({exc.strerror or exc})") from exc
        raise
    return [target for _, target in staged]


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def canonical_json(document: Any) -> bytes:
    """Stable JSON bytes: sorted keys, two-space indent, no NaN, trailing newline."""
    return (json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike[str], document: Any) -> Path:
    """Write a JSON document atomically in canonical form."""
    return write_bytes(path, canonical_json(document))
