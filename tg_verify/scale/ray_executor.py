"""The Ray executor: each job a Ray task, placed by its memory need, retried when its worker is lost.

The driver (this process) keeps a bounded window of tasks in flight, so a batch of 100,000 models
never holds 100,000 task references; each task declares the memory its job estimated (Ray places it
on a node with that much unreserved, and never starts more on a node than fit) and its CPUs. A task
whose worker process or node dies (killed, out of memory, node lost) is re-run by Ray up to
`max_retries` times; a job function's own exceptions are not retried (they are bugs, reported once).
Workers report progress to a small actor on the driver's node, throttled, which the driver folds into
its one progress bar with the count of tasks running and the nodes they run on.

Workers import the job functions by module path, so every node needs tg-verify installed (the same
version) and the models under the same paths (shared storage). Results come back through Ray's object
store; only the driver writes output files. Install with `pip install 'tg-verify[ray]'`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tg_verify.errors import UsageError
from tg_verify.progress import ProgressSink
from tg_verify.scale.executor import Job, JobDone, JobLost, JobResult, ShareProgress, internal_error

INSTALL_HINT = "--executor ray needs Ray, an optional extra: pip install 'tg-verify[ray]'"
MAX_RETRIES = 3  # re-runs of a task whose worker or node died (Ray's own default)
REPORT_SECONDS = 0.5  # a worker reports its progress at most this often
POLL_SECONDS = 0.2


def import_ray() -> Any:
    """The ray module, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


class _Board:
    """A Ray actor on the driver's node: workers post task starts and progress; the driver takes them."""

    def __init__(self) -> None:
        self.fractions: dict[int, float] = {}
        self.starts: list[tuple[int, str, int]] = []

    def started(self, index: int, node: str, pid: int) -> None:
        self.starts.append((index, node, pid))

    def report(self, index: int, fraction: float) -> None:
        self.fractions[index] = fraction

    def take(self) -> tuple[dict[int, float], list[tuple[int, str, int]]]:
        fractions, starts = self.fractions, self.starts
        self.fractions, self.starts = {}, []
        return fractions, starts


class _BoardProgress:
    """A worker-side ProgressSink that posts the job's fraction done to the board, at most twice a second."""

    def __init__(self, board: Any, index: int) -> None:
        self.board, self.index = board, index
        self.total = 0.0
        self.done = 0.0
        self.posted = 0.0

    def start(self, description: str, total: float | None) -> None:
        self.total, self.done = float(total or 0), 0.0

    def advance(self, amount: float = 1.0) -> None:
        self.done += amount
        now = time.monotonic()
        if self.total > 0 and now - self.posted >= REPORT_SECONDS:
            self.posted = now
            self.board.report.remote(self.index, min(self.done / self.total, 1.0))

    def describe(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


def _call(function: Callable[..., Any], args: tuple[Any, ...], index: int, board: Any) -> Any:
    """What a Ray task runs: announce the attempt (node, pid), then the job with a progress sink."""
    import ray

    ray.get(board.started.remote(index, ray.get_runtime_context().get_node_id(), os.getpid()))
    return function(*args, progress=_BoardProgress(board, index))


class RayExecutor:
    """Runs jobs as Ray tasks on the cluster at `address` (None: RAY_ADDRESS, else a local one for this run).

    A Ray session already started in this process (ray.init) is used as it is and left running.
    """

    name = "ray"
    default_threads: int | None = 1  # parallelism comes from many tasks, not threads inside one

    def __init__(self, address: str | None = None, max_retries: int = MAX_RETRIES,
                 max_in_flight: int | None = None) -> None:
        self._ray = import_ray()
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self._owns = False
        if not self._ray.is_initialized():
            try:
                self._ray.init(address=address, include_dashboard=False, log_to_driver=False,
                               logging_level=logging.ERROR)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = address or os.environ.get("RAY_ADDRESS") or "a local cluster"
                raise UsageError(f"--executor ray: cannot start or join {where} ({str(exc).splitlines()[0]})"
                                 ) from None
            self._owns = True

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False

    def _capacity(self) -> tuple[float, float, float]:
        """The largest memory and CPU count one alive node offers, and the cluster's CPUs in all."""
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        if not nodes:
            raise UsageError("--executor ray: the Ray cluster has no alive node")
        return (max(float(n.get("memory", 0)) for n in nodes), max(float(n.get("CPU", 0)) for n in nodes),
                sum(float(n.get("CPU", 0)) for n in nodes))

    def run(self, jobs: Iterable[Job], progress: ProgressSink) -> Iterator[tuple[int, JobResult]]:
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        max_memory, max_cpus, cluster_cpus = self._capacity()
        window = self.max_in_flight or max(4, int(2 * cluster_cpus))
        here = ray.get_runtime_context().get_node_id()
        board = ray.remote(_Board).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        task = ray.remote(_call)
        describe: Callable[[str], None] | None = getattr(progress, "describe", None)
        sinks: dict[int, ShareProgress] = {}
        pending: dict[Any, int] = {}
        attempts: Counter[int] = Counter()
        running: dict[int, str] = {}
        source = enumerate(jobs)
        exhausted = False
        finished = 0

        def drain() -> None:
            fractions, starts = ray.get(board.take.remote())
            for index, node, _pid in starts:
                attempts[index] += 1
                running[index] = node
            for index, fraction in fractions.items():
                if index in sinks:
                    sinks[index].advance_to(fraction)
            if describe is not None:
                retried = sum(1 for count in attempts.values() if count > 1)
                describe(f"ray: {finished} done, {len(running)} running on {len(set(running.values()))} node(s)"
                         + (f", {retried} retried" if retried else ""))

        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        index, job = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    sinks[index] = ShareProgress(progress, job.share, job.label)
                    if job.memory > max_memory:
                        sinks.pop(index).finish()
                        finished += 1
                        yield index, JobLost(f"needs {_gib(job.memory)} of memory for its working set; the largest "
                                             f"node of the Ray cluster offers {_gib(max_memory)}", attempts=0)
                        continue
                    options: dict[str, Any] = {"num_cpus": max(min(job.cpus, max_cpus), 1 if max_cpus >= 1 else 0),
                                               "max_retries": self.max_retries, "retry_exceptions": False}
                    if job.memory > 0:
                        options["memory"] = int(job.memory)
                    pending[task.options(**options).remote(job.function, job.args, index, board)] = index
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS, fetch_local=False)
                if ready and len(pending) > 1:  # take every result that is in, with one progress update
                    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0, fetch_local=False)
                drain()
                for ref in ready:
                    index = pending.pop(ref)
                    result: JobResult
                    try:
                        result = JobDone(ray.get(ref), attempts=max(attempts[index], 1))
                    except ray.exceptions.RayTaskError as exc:  # the function raised: a bug, not retried
                        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                        result = JobLost(internal_error(cause), attempts=max(attempts[index], 1))
                    except ray.exceptions.RayError as exc:
                        tries = max(attempts[index], 1)
                        first = (str(exc).strip().splitlines() or [""])[0][:200]
                        result = JobLost(f"lost on the Ray cluster after {tries} attempt(s), retries exhausted "
                                         f"({type(exc).__name__}: {first})", attempts=tries)
                    running.pop(index, None)
                    sinks.pop(index).finish()
                    finished += 1
                    yield index, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.kill(board)
