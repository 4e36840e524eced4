"""File digests (sha256) of an artifact, and the model_signing-compatible root digest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from tg_verify.artifact.model import Artifact
from tg_verify.errors import ArtifactError

CHUNK = 1 << 24


def file_digests(artifact: Artifact, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """sha256 hex of every artifact file, keyed by relative POSIX path. `progress(nbytes)` per chunk."""
    digests: dict[str, str] = {}
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    for entry in artifact.files:
        path = artifact.path_of(entry.path)
        digest = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as handle:
                while True:
                    count = handle.readinto(buffer)
                    if not count:
                        break
                    digest.update(view[:count])
                    if progress is not None:
                        progress(count)
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read for hashing ({exc.strerror or exc})") from exc
        digests[entry.path] = digest.hexdigest()
    return digests


def root_digest(digests: dict[str, str]) -> str:
    """sha256 over the raw per-file digests sorted by path, as `model_signing digest` defines it."""
    root = hashlib.sha256()
    for path in sorted(digests):
        root.update(bytes.fromhex(digests[path]))
    return root.hexdigest()
