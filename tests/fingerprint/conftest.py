"""Fingerprint tests run torch single-threaded: tiny products gain nothing from a second thread, and on
a loaded shared runner each OpenMP barrier waits for a descheduled thread. Thread-count independence
is tested explicitly (test_extract.py) with 1 and 2 threads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tg_verify.tiny import one_thread


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    with one_thread():
        yield
