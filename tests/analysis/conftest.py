"""Synthetic fingerprints for the analysis tests: families of bases with nearby derivatives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tg_verify.analysis.references import Reference
from tg_verify.fingerprint.document import FEATURE_NAMES, Fingerprint

# Typical magnitudes of each feature (means tiny, norms near 10), so scaling matters.
_SCALES = np.array([1e-6, 1e-3, 10.0, 0.1, 3.0, 1e-6, 1e-3, 8.0, 1e-6, 1e-3, 12.0, 1e-6, 1e-3, 6.0, 1e8, 10.0])


def synthetic_fingerprint(name: str, values: np.ndarray, settings: dict | None = None, legacy: bool = False
                          ) -> Fingerprint:
    """A native (or legacy) fingerprint document with the given 16 feature values."""
    features = {n: float(v) for n, v in zip(FEATURE_NAMES, values)}
    if legacy:
        return Fingerprint(model_name=name, features=features, settings={"legacy": True},
                           feature_version="tensorguard-release", legacy=True, source=f"{name}.json")
    return Fingerprint(model_name=name, features=features, settings=settings or {"seed": 0, "repeats": 30},
                       source=f"{name}.json")


@pytest.fixture
def make_fp() -> Callable[..., Fingerprint]:
    return synthetic_fingerprint


@pytest.fixture
def family_set() -> list[Reference]:
    """Four families of one base each (two bases for 'llama'), five derivatives per base, near the base."""
    rng = np.random.default_rng(7)
    references: list[Reference] = []
    for family, base_names in (("llama", ["llama-a", "llama-b"]), ("qwen", ["qwen-a"]), ("gemma", ["gemma-a"]),
                               ("phi", ["phi-a"])):
        for base_name in base_names:
            centre = _SCALES * (1.0 + rng.normal(0.0, 1.0, len(_SCALES)))
            centre[15] = 10.0  # num_layers constant, as in the release
            references.append(Reference(id=base_name, family=family,
                                        fingerprint=synthetic_fingerprint(base_name, centre)))
            for k in range(5):
                values = centre + _SCALES * rng.normal(0.0, 0.05, len(_SCALES))
                values[15] = 10.0
                name = f"{base_name}-ft{k}"
                references.append(Reference(id=name, family=family, base=False, parent=base_name,
                                            fingerprint=synthetic_fingerprint(name, values)))
    return references


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Fingerprint]:
    """Trained-model tests: save a bench.transforms Checkpoint (with what `tokenizer(directory)` writes beside it)
    and fingerprint it as the CLI does."""
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    root = tmp_path_factory.mktemp("fingerprinted")
    counter = iter(range(10_000))

    def build(ck: Any, layout: str = "single", tokenizer: Callable[[Path], object] | None = None) -> Fingerprint:
        directory = ck.save(root / f"m{next(counter)}", layout)
        if tokenizer is not None:
            tokenizer(directory)
        return fingerprint_artifact(resolve(directory), FingerprintSettings(device="cpu"), model_name=directory.name)
    return build
