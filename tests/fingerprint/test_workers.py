"""WorkerPool: every item runs once, results fold in item order whatever thread ran what, errors surface;
and how many threads there are by default."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from tg_verify.errors import UsageError
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


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None),
    ({"cpu.max": "100 0"}, None),
    ({}, None),
])
def test_container_cpu_quota_narrows_the_default_threads(tmp_path, files, quota):
    from tg_verify.fingerprint.workers import cgroup_cpu_quota, usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota
    cores = usable_cores(tmp_path / "none")
    expected = cores if quota is None else max(1, min(cores, -(-quota // 1)))
    assert usable_cores(tmp_path) == expected


def test_thread_counts_are_checked():
    from tg_verify.fingerprint.workers import MAX_AUTO_THREADS, check_threads, default_threads

    assert 1 <= default_threads() <= MAX_AUTO_THREADS
    assert check_threads(3) == 3
    for bad in (0, -1, 257, True, 2.0, "2"):
        with pytest.raises(UsageError):
            check_threads(bad)


def test_helper_threads_follow_the_cores_and_the_hashing():
    from tg_verify.fingerprint.workers import helper_threads, usable_cores

    assert helper_threads(1, hashing=False) == 0  # one core, nothing to hash: no thread at all
    assert helper_threads(1, hashing=True) == 1  # the files are hashed on a helper even then
    assert helper_threads(2, hashing=True) == helper_threads(2, hashing=False) == 1
    assert helper_threads(8, hashing=True) == 7
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_hash_threads_use_only_the_cores_the_computation_leaves():
    from tg_verify.fingerprint.workers import MAX_AUTO_THREADS, hash_threads

    assert hash_threads(2, cores=2) == 1  # the 2-core runner: one hashing thread, which then computes
    assert hash_threads(1, cores=2) == 1  # a GPU-driving thread + one hashing thread
    assert hash_threads(6, cores=10) == 5  # 6 computing (one of them hashing first) + 4 idle cores
    assert hash_threads(1, cores=6) == 5  # one thread drives the GPU: the other cores may hash
    assert hash_threads(1, cores=64) == hash_threads(8, cores=64) == MAX_AUTO_THREADS  # capped
    assert hash_threads(16, cores=4) == 1  # more threads than cores asked for: still one hashes
