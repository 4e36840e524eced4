"""Executors: where the jobs of a batch run, behind one small interface.

A job is a module-level function with its arguments (so it pickles by reference onto any worker),
what it needs (memory in bytes for placement, CPUs) and its share of the progress bar. The function
is called as `function(*args, progress=sink)` and reports its own errors in the value it returns,
so batch semantics (skip, resume, continue past broken models) live with the caller, once, and every
executor only decides *where* a job runs. An executor yields `(index, result)` as jobs finish, in
any order: `JobDone` with the return value and how many attempts it took, or `JobLost` when the job
could not be run to the end (its worker or node died more often than the retries allow, no node is
large enough, or an exception escaped the function, which is a bug and reported as one).

`LocalExecutor` runs jobs in this process, one after another, in order (the default everywhere);
`tg_verify.scale.ray_executor.RayExecutor` runs them as Ray tasks (`make_executor("ray")`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from tg_verify.progress import ProgressSink

EXECUTORS: tuple[str, ...] = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """One unit of work: `function(*args, progress=...)`, what it needs, and how it is named and counted."""

    function: Callable[..., Any]
    args: tuple[Any, ...]
    label: str  # how progress names it, e.g. "[3/120]"
    memory: int = 0  # bytes of working set (0: unknown, no reservation)
    cpus: int = 1
    share: float = 1.0  # its part of the caller's progress total


@dataclass(frozen=True)
class JobDone:
    """A job that ran to the end: the function's return value and the attempts it took (>1: retried)."""

    value: Any
    attempts: int = 1


@dataclass(frozen=True)
class JobLost:
    """A job that could not be run to the end, and why."""

    message: str
    attempts: int = 1


JobResult = JobDone | JobLost


class Executor(Protocol):
    """Runs jobs and yields (position in `jobs`, result) as each finishes; `close` releases what it holds."""

    name: str
    default_threads: int | None  # threads per job when the caller gives none (None: the fingerprint's default)

    def run(self, jobs: Iterable[Job], progress: ProgressSink) -> Iterator[tuple[int, JobResult]]: ...

    def close(self) -> None: ...


class ShareProgress:
    """Maps one job's own progress (start with a total, advance) onto its share of the caller's bar."""

    def __init__(self, outer: ProgressSink, share: float, prefix: str) -> None:
        self.outer, self.share, self.prefix = outer, share, prefix
        self.total = 0.0
        self.sent = 0.0
        self._describe: Callable[[str], None] | None = getattr(outer, "describe", None)

    def start(self, description: str, total: float | None) -> None:
        self.total = float(total or 0)
        self.describe(description)

    def advance(self, amount: float = 1.0) -> None:
        if self.total > 0:
            self.advance_to(self.fraction + amount / self.total)

    @property
    def fraction(self) -> float:
        return self.sent / self.share if self.share > 0 else 1.0

    def advance_to(self, fraction: float) -> None:
        """Move this job's part of the bar to `fraction` of its share (never backwards, never past it)."""
        target = min(max(fraction, 0.0), 1.0) * self.share
        if target > self.sent:
            self.outer.advance(target - self.sent)
            self.sent = target

    def describe(self, text: str) -> None:
        if self._describe is not None:
            self._describe(f"{self.prefix} {text}")

    def finish(self) -> None:
        self.advance_to(1.0)


def internal_error(exc: BaseException) -> str:
    """How an exception that escaped a job function is reported (the same wording on every executor): one line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"internal error: {type(exc).__name__}: {first[:300]}"


class LocalExecutor:
    """Runs each job in this process, in order, as soon as the caller produces it."""

    name = "local"
    default_threads: int | None = None

    def run(self, jobs: Iterable[Job], progress: ProgressSink) -> Iterator[tuple[int, JobResult]]:
        for index, job in enumerate(jobs):
            sink = ShareProgress(progress, job.share, job.label)
            result: JobResult
            try:
                result = JobDone(job.function(*job.args, progress=sink))
            except Exception as exc:  # noqa: BLE001 - reported as a lost job, as the Ray executor does
                result = JobLost(internal_error(exc))
            sink.finish()
            yield index, result

    def close(self) -> None:
        pass


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor called `name` ("local" or "ray"); `address` is the Ray cluster to join (ray only).

    Raises UsageError for an unknown name, an address without Ray, or Ray not installed.
    """
    from tg_verify.errors import UsageError

    if name == "local":
        if address is not None:
            raise UsageError("--ray-address goes with --executor ray")
        return LocalExecutor()
    if name == "ray":
        from tg_verify.scale.ray_executor import RayExecutor

        return RayExecutor(address=address)
    raise UsageError(f"unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}")
