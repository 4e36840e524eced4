"""Progress reporting: a rich bar on a terminal, silence in CI logs unless asked for.

Library code takes a `Progress`-like callback object; only the CLI decides whether it draws.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.progress import TaskID


class ProgressSink(Protocol):
    """What long-running library code reports to: a task with a total, advanced in steps."""

    def start(self, description: str, total: float | None) -> None: ...

    def advance(self, amount: float = 1.0) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    """Reports nowhere (the default for library calls and CI)."""

    def start(self, description: str, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1.0) -> None:
        pass

    def finish(self) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class RichProgress:
    """A rich progress bar on stderr: task description, done/total, rate, elapsed time."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TransferSpeedColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=True)
        self._task: TaskID | None = None

    def start(self, description: str, total: float | None) -> None:
        if self._task is None:
            self._progress.start()
        else:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: float = 1.0) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def describe(self, text: str) -> None:
        """Replace the task's description (e.g. "model: 12/201 tensors"); optional beyond the protocol."""
        if self._task is not None:
            self._progress.update(self._task, description=text)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None


def wants_progress(flag: bool | None = None) -> bool:
    """Draw progress on an interactive terminal outside CI, or when explicitly asked."""
    if flag is not None:
        return flag
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_sink(enabled: bool) -> Iterator[ProgressSink]:
    sink: ProgressSink = RichProgress() if enabled else NullProgress()
    try:
        yield sink
    finally:
        sink.finish()
