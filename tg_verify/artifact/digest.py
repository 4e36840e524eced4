"""File digests (sha256) of an artifact, and root digests over them as model_signing makes them.

Two root digests, both sha256 over the raw 32-byte file digests in model_signing's path order:

- the **model digest** (`root_digest` of `model_file_digests`): over the files model_signing 1.1
  hashes for the directory with its defaults (`model_signing.hashing.Config().hash(path)`): every
  regular file under it except `.git/`, `.github/`, `.gitattributes` and `.gitignore` at its top,
  tokenizer and generation config included. It is the digest `model_signing` signs as the
  subject of its Statement, so a tg-verify attestation and a model_signing signature of the same
  directory join on it (with files reached through symbolic links, as in a Hugging Face cache, it is
  model_signing's digest with `set_allow_symlinks(True)`);
- the **weights digest** (`root_digest` of `file_digests`): over the artifact's own files only
  (weights, shard index, config, adapter files), the files the fingerprint is computed from.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tg_verify.artifact.errors import FileChangedError, NotRegularFileError, shown
from tg_verify.artifact.model import Artifact, ArtifactFile
from tg_verify.artifact.safeio import drop_pages, open_regular, os_error, stat_path
from tg_verify.progress import ProgressSink

CHUNK = 1 << 24
Progress = Callable[[int], None] | ProgressSink | None


def _advance(progress: Progress) -> Callable[[int], None] | None:
    if progress is None:
        return None
    if hasattr(progress, "advance"):
        return progress.advance
    return progress


def file_digests(artifact: Artifact, progress: Progress = None, threads: int = 1) -> dict[str, str]:
    """sha256 hex of every artifact file, keyed by relative POSIX path, streamed in 16 MiB chunks.

    `progress` is a callable taking the byte count of each chunk, or a ProgressSink (its `advance`), and must be
    thread-safe when `threads` > 1. A file whose size differs from the one validated by `resolve` is a
    FileChangedError. With `threads` > 1, up to that many files are hashed at once: sha256 is sequential within
    a file, so on a many-core runner the shards of a large model are otherwise hashed one after another while
    the cores that computed the fingerprint wait. Errors are raised in file order, as a sequential run would.
    """
    advance = _advance(progress)
    entries = list(artifact.files)
    if threads <= 1 or len(entries) <= 1:
        return {entry.path: _file_digest(artifact, entry, advance) for entry in entries}
    with ThreadPoolExecutor(max_workers=min(threads, len(entries)), thread_name_prefix="tg-verify-hash") as pool:
        futures = [pool.submit(_file_digest, artifact, entry, advance) for entry in entries]
        try:
            return {entry.path: future.result() for entry, future in zip(entries, futures)}
        finally:
            for future in futures:
                future.cancel()  # files not started yet are not hashed after an error


def _file_digest(artifact: Artifact, entry: ArtifactFile, advance: Callable[[int], None] | None) -> str:
    """sha256 of one artifact file, checked against the size resolve() validated, before and after."""
    path = artifact.path_of(entry.path)
    fd, info = open_regular(path, "artifact file")
    try:
        if info.st_size != entry.size:
            raise FileChangedError(f"{shown(path)}: file is {info.st_size} bytes, not the {entry.size} "
                                   f"validated by resolve(); the file changed while being verified", file=str(path))
        digest = _sha256(fd, entry.size, advance)
        if os.fstat(fd).st_size != entry.size:
            raise FileChangedError(f"{shown(path)}: file size changed while it was hashed; "
                                   f"the file changed while being verified", file=str(path))
        return digest
    except OSError as exc:
        raise os_error(path, exc, "artifact file") from None
    finally:
        os.close(fd)


def _sha256(fd: int, size: int, advance: Callable[[int], None] | None) -> str:
    """sha256 of the first `size` bytes of `fd`, hashed from a read-only map (no copy into a buffer).

    Reading into a buffer costs a page-cache copy per byte, a third of the hashing time on the
    2-core runner; each chunk's pages are dropped from the map once hashed, so resident memory
    stays one chunk.
    """
    digest = hashlib.sha256()
    if size == 0:
        return digest.hexdigest()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            for start in range(0, size, CHUNK):
                stop = min(size, start + CHUNK)
                digest.update(view[start:stop])
                drop_pages(mapped, start, stop)
                if advance is not None:
                    advance(stop - start)
        finally:
            view.release()
    return digest.hexdigest()


def path_order(path: str) -> tuple[str, ...]:
    """model_signing's order of manifest entries: by path components (PurePosixPath ordering), not by string."""
    return PurePosixPath(path).parts


def root_digest(digests: Mapping[str, str]) -> str:
    """sha256 over the raw per-file digests in model_signing's path order (its Statement subject's digest)."""
    root = hashlib.sha256()
    for path in sorted(digests, key=path_order):
        root.update(bytes.fromhex(digests[path]))
    return root.hexdigest()


# ---------------------------------------------------------------------------------------------
# The model_signing file set
# ---------------------------------------------------------------------------------------------

# model_signing.hashing.Config's default ignore_git_paths, relative to the model's top directory.
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
# The role of a file in the model_signing file set that is not one of the artifact's own files (a tokenizer, a
# generation config, a README): hashed for the root digest, never read for the verdict.
OTHER_ROLE = "other"


@dataclass(frozen=True)
class ModelFile:
    """One file of the model_signing file set: relative POSIX path, size, and whether it was reached
    through a symbolic link (the file or a directory on its way)."""

    path: str
    size: int
    symlink: bool


def model_files(root: Path) -> tuple[ModelFile, ...]:
    """The files model_signing hashes for `root`, in its order.

    A directory: every regular file under it, symbolic links to files followed, symbolic links to
    directories not entered (as pathlib's glob, which model_signing uses, does not), the git paths at
    the top left out. A file: itself. Anything else (a FIFO, a socket, a dangling link) is an error, as
    in model_signing, and is never opened.
    """
    info = stat_path(root, "model path")
    if not stat.S_ISDIR(info.st_mode):
        return (ModelFile(root.name, stat_regular_size(root), root.is_symlink()),)
    found: list[ModelFile] = []
    ignored = {root / name for name in GIT_PATHS}
    linked_root = root.is_symlink()
    for directory, dirnames, filenames in os.walk(root, followlinks=False, onerror=_walk_error):
        base = Path(directory)
        dirnames[:] = [d for d in dirnames if base / d not in ignored]  # links to directories are not entered
        for name in filenames:
            path = base / name
            if path not in ignored:
                found.append(ModelFile(path.relative_to(root).as_posix(), stat_regular_size(path),
                                       linked_root or path.is_symlink()))
    return tuple(sorted(found, key=lambda f: path_order(f.path)))


def _walk_error(exc: OSError) -> None:
    raise os_error(exc.filename or "?", exc, "model directory", directory=True) from None


def stat_regular_size(path: Path) -> int:
    """Size of a regular file (symlinks followed); anything else is refused without being opened."""
    info = stat_path(path, "model file")
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFileError(f"{shown(path)}: model file is not a regular file (a FIFO, device, socket or "
                                  "directory); model_signing and tg-verify hash regular files only", file=str(path))
    return info.st_size


def model_path_of(path: Path, artifact: Artifact) -> Path:
    """What model_signing would be pointed at for a model path: a lone .safetensors file itself, else the
    artifact's directory (an index file stands for its directory)."""
    return path if artifact.layout == "single" and path.is_file() else artifact.root


def model_file_digests(path: Path, artifact: Artifact, digests: Mapping[str, str], progress: Progress = None,
                       ) -> tuple[dict[str, str], tuple[ModelFile, ...]]:
    """sha256 of every file in the model_signing file set of `path` (the model path given), and the set.

    `digests` (from `file_digests(artifact)`) are reused for the artifact's own files; the other files
    (tokenizer, generation config, README, ...) are hashed here. The artifact's files are always in
    the result, so its root digest covers what the verdict was computed from.
    """
    advance = _advance(progress)
    listed = model_files(model_path_of(path, artifact))
    result = dict(digests)
    for entry in listed:
        if entry.path in result:
            continue
        file_path = artifact.root / entry.path
        fd, info = open_regular(file_path, "model file")
        try:
            result[entry.path] = _sha256(fd, info.st_size, advance)
            if os.fstat(fd).st_size != info.st_size:
                raise FileChangedError(f"{shown(file_path)}: file size changed while it was hashed; "
                                       f"the file changed while being verified", file=str(file_path))
        except OSError as exc:
            raise os_error(file_path, exc, "model file") from None
        finally:
            os.close(fd)
    return result, listed
