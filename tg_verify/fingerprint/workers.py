"""Work items shared between the calling thread and helper threads, with results taken in item order.

The fingerprint's tensors are independent of one another, so they parallelise without torch's
intra-op threads: each item (a tensor) is computed single-threaded by whichever worker is free,
and its result is folded into the document strictly in item order. Which thread ran which item
therefore never changes a bit of the result. A helper may first run a prelude (hashing the
artifact's files) and then join the items, so every core stays busy for the whole pass. How many
threads to start (`default_threads`: the usable cores, a container's CPU quota included) is here too.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tg_verify.errors import UsageError

T = TypeVar("T")

# Default thread cap: the streamed pass is bound by memory bandwidth well before 8 cores, and each
# thread holds one tensor's products (an adapter's merged tensor too). `threads=` lifts it.
MAX_AUTO_THREADS = 8
MAX_THREADS = 256
# Items done out of order wait to be folded; a worker does not start an item more than this many
# (per worker) past the next one to fold, so at most that many results wait at a time.
FOLD_WINDOW = 4


@dataclass
class _Job:
    count: int
    work: Callable[[int, int], Any]
    fold: Callable[[int, Any], None] | None
    window: int
    next: int = 0  # next item to hand out
    folded: int = 0  # items folded so far (all of 0..folded-1)
    finished: int = 0  # items whose work returned (or failed)
    pending: dict[int, Any] = field(default_factory=dict)
    error: BaseException | None = None
    error_at: int = -1  # the failing item with the lowest index: the error a sequential run would raise

    def fail(self, index: int, exc: BaseException) -> None:
        if self.error is None or index < self.error_at:
            self.error, self.error_at = exc, index

    def can_start(self) -> bool:
        return self.error is None and self.next < self.count and self.next < self.folded + self.window


class _Prelude(Generic[T]):
    def __init__(self, task: Callable[[], T]) -> None:
        self.task = task
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.task()
        except BaseException as exc:  # re-raised in the calling thread by `prelude_result`
            self.error = exc
        finally:
            self.done.set()


class WorkerPool:
    """The calling thread (worker 0) and `helpers` daemon threads (workers 1..n) that share each `run`.

    `prelude`, when given, runs first on worker 1 (so `helpers` must be >= 1) and its value is
    collected with `prelude_result`; with `prelude_joins=False` that helper stops after it (the
    calling thread and the other helpers do the items). Use as a context manager; `close` stops
    the helpers.
    """

    def __init__(self, helpers: int, prelude: Callable[[], Any] | None = None, prelude_joins: bool = True) -> None:
        if prelude is not None and helpers < 1:
            raise ValueError("a prelude needs at least one helper thread")
        self.workers = 1 + helpers
        self._prelude_joins = prelude_joins
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._closing = False
        self._prelude = _Prelude(prelude) if prelude is not None else None
        self._threads = [threading.Thread(target=self._serve, args=(n,), name=f"tg-verify-worker-{n}", daemon=True)
                         for n in range(1, helpers + 1)]
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the helpers once their current item (or the prelude) returns."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def prelude_result(self) -> Any:
        """Wait for the prelude and return its value (or raise its error)."""
        if self._prelude is None:
            raise ValueError("this pool has no prelude")
        self._prelude.done.wait()
        if self._prelude.error is not None:
            raise self._prelude.error
        return self._prelude.result

    def run(self, count: int, work: Callable[[int, int], T], fold: Callable[[int, T], None] | None = None) -> None:
        """Call work(item, worker) for items 0..count-1 on any free worker, then fold(item, value) in order.

        `fold` runs under the pool's lock, one item at a time, strictly in item order. An error
        raised by `work` or `fold` stops the hand-out and is re-raised here once every started
        item has returned; of several, the one of the lowest item (as a sequential run would).
        """
        if count <= 0:
            return
        job = _Job(count, work, fold, FOLD_WINDOW * self.workers if fold is not None else count)
        with self._cond:
            self._job = job
            self._cond.notify_all()
        try:
            self._take(job, 0)
            with self._cond:
                while job.finished < job.next:
                    self._cond.wait()
        finally:
            with self._cond:
                self._job = None
        if job.error is not None:
            raise job.error

    # -- workers -------------------------------------------------------------------------------------
    def _serve(self, worker: int) -> None:
        if worker == 1 and self._prelude is not None:
            self._prelude.run()
            if not self._prelude_joins:
                return
        while True:
            with self._cond:
                while not self._closing and (self._job is None or not self._job.can_start()):
                    self._cond.wait()
                if self._closing:
                    return
                job = self._job
            assert job is not None
            self._take(job, worker)

    def _take(self, job: _Job, worker: int) -> None:
        """Run items of `job` while there are some this worker may start."""
        while True:
            with self._cond:
                while job.error is None and job.next < job.count and not job.can_start():
                    self._cond.wait()  # too far ahead of the fold: wait for the slow item
                if not job.can_start():
                    return
                index = job.next
                job.next += 1
            try:
                value = job.work(index, worker)
            except BaseException as exc:
                with self._cond:
                    job.fail(index, exc)
                    job.finished += 1
                    self._cond.notify_all()
                return
            with self._cond:
                job.finished += 1
                if job.fold is None:
                    job.folded += 1
                else:
                    job.pending[index] = value
                    try:
                        while job.error is None and job.folded in job.pending:
                            job.fold(job.folded, job.pending.pop(job.folded))
                            job.folded += 1
                    except BaseException as exc:
                        job.fail(job.folded, exc)
                self._cond.notify_all()


# -- how many threads ------------------------------------------------------------------------------

def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask (or the CPU count), narrowed by a cgroup CPU quota.

    A container started with `--cpus 2` on a 64-core host still sees 64 CPUs in its affinity mask;
    only the cgroup's quota says 2, and 64 threads sharing a quota of 2 would mostly wait.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of the cgroup at `root` in CPUs (v2 `cpu.max`, or v1 CFS quota / period); None if unlimited."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None  # unreadable or malformed: no quota known
    return None


def default_threads() -> int:
    """Threads the fingerprint uses unless told: the usable cores, at most MAX_AUTO_THREADS."""
    return min(usable_cores(), MAX_AUTO_THREADS)


def check_threads(threads: object) -> int:
    """A thread count given by a user: an integer in [1, MAX_THREADS], else a UsageError."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    return threads


def helper_threads(workers: int, hashing: bool) -> int:
    """Helper threads beside the calling one: `workers` computing in all, and always one to hash the files.

    With two or more workers the hashing helper is one of them: it takes tensors once the files are
    done, so on a 2-core runner both cores compute after hashing instead of one idling.
    """
    return max(workers - 1, 1 if hashing else 0)


def hash_threads(compute: int, cores: int | None = None) -> int:
    """Threads that may hash files at once beside `compute` computing threads without oversubscribing the cores.

    The hashing helper is one of the compute threads when there are two or more (helper_threads), an extra one
    otherwise (one thread driving a GPU, or `threads=1`); the cores left over hash further files in parallel.
    """
    cores = usable_cores() if cores is None else cores
    return max(1, min(MAX_AUTO_THREADS, cores - compute + (1 if compute > 1 else 0)))
