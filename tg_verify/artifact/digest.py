"""File digests (sha256) of an artifact, and the model_signing-compatible root digest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Union

from tg_verify.artifact.errors import FileChangedError, shown
from tg_verify.artifact.model import Artifact
from tg_verify.artifact.safeio import open_regular, os_error
from tg_verify.progress import ProgressSink

CHUNK = 1 << 24
Progress = Union[Callable[[int], None], ProgressSink, None]


def _advance(progress: Progress) -> Callable[[int], None] | None:
    if progress is None:
        return None
    if hasattr(progress, "advance"):
        return progress.advance  # type: ignore[union-attr]
    return progress  # type: ignore[return-value]


def file_digests(artifact: Artifact, progress: Progress = None) -> dict[str, str]:
    """sha256 hex of every artifact file, keyed by relative POSIX path, streamed in 16 MiB chunks.

    `progress` is a callable taking the byte count of each chunk, or a ProgressSink (its `advance`).
    A file whose size differs from the one validated by `resolve` is a FileChangedError.
    """
    advance = _advance(progress)
    digests: dict[str, str] = {}
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    for entry in artifact.files:
        path = artifact.path_of(entry.path)
        fd, info = open_regular(path, "artifact file")
        digest = hashlib.sha256()
        total = 0
        try:
            with os.fdopen(fd, "rb", buffering=0, closefd=True) as handle:
                while True:
                    count = handle.readinto(buffer)
                    if not count:
                        break
                    digest.update(view[:count])
                    total += count
                    if advance is not None:
                        advance(count)
        except OSError as exc:
            raise os_error(path, exc, "artifact file") from None
        if total != entry.size or info.st_size != entry.size:
            raise FileChangedError(f"{shown(path)}: read {total} bytes, not the {entry.size} validated by resolve(); "
                                   f"the file changed while being verified")
        digests[entry.path] = digest.hexdigest()
    return digests


def root_digest(digests: dict[str, str]) -> str:
    """sha256 over the raw per-file digests sorted by path, as `model_signing digest` defines it."""
    root = hashlib.sha256()
    for path in sorted(digests):
        root.update(bytes.fromhex(digests[path]))
    return root.hexdigest()
