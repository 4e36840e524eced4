"""Work items shared between the calling thread and helper threads, with results taken in item order.

The fingerprint's tensors are independent of one another, so they parallelise without torch's
intra-op threads: each item (a tensor) is computed single-threaded by whichever worker is free,
and its result is folded into the document strictly in item order. Which thread ran which item
therefore never changes a bit of the result. A helper may first run a prelude (hashing the
artifact's files) and then join the items, so every core stays busy for the whole pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

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
