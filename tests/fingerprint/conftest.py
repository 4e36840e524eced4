"""Fingerprint tests run torch single-threaded: tiny products gain nothing from a second thread, and on
a loaded shared runner each OpenMP barrier waits for a descheduled thread. Thread-count independence
is tested explicitly (test_extract.py) with 1 and 2 threads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tg_verify.artifact import resolve
from tg_verify.fingerprint.extract import fingerprint_artifact
from tg_verify.tiny import build_model, one_thread, save_model


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny llama, its float32 fingerprint, and another seed's (what unrelated scores look like): what the
    quantised re-publications (FP8, GPTQ, AWQ) are measured against."""
    root = tmp_path_factory.mktemp("originals")
    with one_thread():
        model, other = build_model("llama", seed=0), build_model("llama", seed=1)
        return {"model": model, "root": root,
                "original": fingerprint_artifact(resolve(save_model(model, root / "original"))),
                "other": fingerprint_artifact(resolve(save_model(other, root / "other")))}
