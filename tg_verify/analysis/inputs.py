"""Arguments that may be a model or a fingerprint: load the document, or fingerprint the model on the fly.

A model fingerprinted to be compared with existing fingerprints uses their recorded settings, so
the comparison is never refused for a settings mismatch the user did not choose.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tg_verify.errors import InputError
from tg_verify.fingerprint.document import Fingerprint, load
from tg_verify.fingerprint.settings import FingerprintSettings, assemble_settings
from tg_verify.progress import NullProgress, ProgressSink


def is_fingerprint_path(path: str | os.PathLike[str]) -> bool:
    """A `.json` file that is not a shard index is a fingerprint document; anything else is a model."""
    p = Path(path)
    return p.suffix == ".json" and not p.name.endswith(".index.json") and not p.is_dir()


def settings_like(fingerprints: Sequence[Fingerprint], device: str | None = None) -> FingerprintSettings:
    """The settings of the first native fingerprint (defaults when all are legacy), optionally on `device`."""
    return assemble_settings(recorded=[fp.settings for fp in fingerprints if not fp.legacy], device=device or None)


def load_or_fingerprint(path: str | os.PathLike[str], settings: FingerprintSettings,
                        progress: ProgressSink | None = None, base: str | None = None) -> Fingerprint:
    """Read a fingerprint file, or fingerprint the model at `path` (an adapter needs `base`)."""
    if is_fingerprint_path(path):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such fingerprint file")
        return load(path)
    from tg_verify.batch import fingerprint_model

    return fingerprint_model(path, settings, base=base, progress=progress or NullProgress()).fingerprint
