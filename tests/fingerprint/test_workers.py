"""WorkerPool: every item runs once, results fold in item order whatever thread ran what, errors surface."""

from __future__ import annotations

import random
import threading
import time

import pytest

from tg_verify.fingerprint.workers import FOLD_WINDOW, WorkerPool


@pytest.mark.parametrize("helpers", [0, 1, 3])
def test_every_block_runs_once_and_folds_in_order(helpers):
    ran: list[tuple[int, int]] = []
    folded: list[int] = []
    lock = threading.Lock()

    def work(index: int, worker: int) -> int:
        time.sleep(random.Random(index).random() * 0.002)  # finish out of order
        with lock:
            ran.append((index, worker))
        return index * index

    def fold(index: int, value: int) -> None:
        assert value == index * index
        folded.append(index)

    with WorkerPool(helpers) as pool:
        assert pool.workers == helpers + 1
        for _ in range(3):  # a pool serves pass after pass
            ran.clear()
            folded.clear()
            pool.run(57, work, fold)
            assert sorted(i for i, _ in ran) == list(range(57))
            assert folded == list(range(57))
            assert {w for _, w in ran} <= set(range(helpers + 1))


def test_helpers_really_share_the_blocks():
    seen: set[int] = set()

    def work(index: int, worker: int) -> None:
        time.sleep(0.003)
        seen.add(worker)

    with WorkerPool(2) as pool:
        pool.run(60, work)
    assert len(seen) >= 2


def test_partial_results_waiting_to_fold_are_bounded():
    """A slow first block holds the fold back; other workers stop FOLD_WINDOW x workers blocks ahead."""
    waiting: list[int] = []
    pending = 0
    lock = threading.Lock()

    def work(index: int, worker: int) -> int:
        nonlocal pending
        if index == 0:
            time.sleep(0.2)
        with lock:
            pending += 1
            waiting.append(pending)
        return index

    def fold(index: int, value: int) -> None:
        nonlocal pending
        pending -= 1

    with WorkerPool(2) as pool:
        pool.run(200, work, fold)
    assert max(waiting) <= FOLD_WINDOW * 3 and pending == 0


@pytest.mark.parametrize("helpers", [0, 2])
def test_an_error_in_a_block_is_raised_by_run_after_the_others_return(helpers):
    running = 0
    lock = threading.Lock()

    def work(index: int, worker: int) -> None:
        nonlocal running
        with lock:
            running += 1
        try:
            time.sleep(0.001)
            if index == 7:
                raise ValueError("block 7 is broken")
        finally:
            with lock:
                running -= 1

    with WorkerPool(helpers) as pool:
        with pytest.raises(ValueError, match="block 7"):
            pool.run(40, work)
        assert running == 0  # nothing still writing into buffers the caller may free
        pool.run(5, lambda i, w: None)  # and the pool still works


def test_prelude_runs_on_a_helper_and_its_result_or_error_comes_back():
    main = threading.get_ident()
    with WorkerPool(1, prelude=lambda: threading.get_ident()) as pool:
        pool.run(10, lambda i, w: None)
        assert pool.prelude_result() != main
    with WorkerPool(1, prelude=lambda: 1 / 0) as pool:
        pool.run(10, lambda i, w: None)  # blocks are still served after a failed prelude
        with pytest.raises(ZeroDivisionError):
            pool.prelude_result()
    with pytest.raises(ValueError):
        WorkerPool(0, prelude=lambda: None)
