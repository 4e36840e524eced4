"""The executor seam: the local executor, progress shares, choosing an executor, and what light verbs import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tg_verify.errors import UsageError
from tg_verify.scale.executor import Job, JobDone, JobLost, LocalExecutor, ShareProgress, make_executor


class Recorder:
    def __init__(self) -> None:
        self.advanced = 0.0
        self.texts: list[str] = []

    def start(self, description: str, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1.0) -> None:
        self.advanced += amount

    def describe(self, text: str) -> None:
        self.texts.append(text)

    def finish(self) -> None:
        pass


def _work(value: int, *, progress) -> int:  # type: ignore[no-untyped-def]
    progress.start(f"job {value}", 4)
    progress.advance(3)
    if value < 0:
        raise RuntimeError("negative\nsecond line")
    return value * 10


def test_local_executor_runs_lazily_in_order_and_reports_lost_jobs() -> None:
    produced: list[int] = []

    def jobs():  # type: ignore[no-untyped-def]
        for value in (1, -1, 2):
            produced.append(value)
            yield Job(_work, (value,), label=f"[{value}]", share=10.0)

    sink = Recorder()
    results = []
    for index, result in LocalExecutor().run(jobs(), sink):
        results.append((index, result, list(produced)))
    assert [(i, r) for i, r, _ in results] == [(0, JobDone(10)), (1, JobLost("internal error: RuntimeError: negative")),
                                               (2, JobDone(20))]
    assert [seen for *_, seen in results] == [[1], [1, -1], [1, -1, 2]]  # a job is made only when it can run
    assert sink.advanced == pytest.approx(30.0) and sink.texts[0] == "[1] job 1"


def test_share_progress_never_overshoots_or_goes_back() -> None:
    outer = Recorder()
    share = ShareProgress(outer, 5.0, "[1/2]")
    share.start("x", 10)
    for _ in range(30):
        share.advance(1)
    share.advance_to(0.1)
    share.finish()
    assert outer.advanced == pytest.approx(5.0)


def test_make_executor_refuses_what_does_not_fit() -> None:
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(UsageError, match="unknown executor 'dask'"):
        make_executor("dask")
    with pytest.raises(UsageError, match="--ray-address goes with --executor ray"):
        make_executor("local", "auto")


def _imported_after(calls: str) -> list[str]:
    script = ("import sys, io, contextlib\nfrom tg_verify.cli import main\n"
              f"for args in {calls}:\n"
              "    with contextlib.redirect_stdout(io.StringIO()):\n"
              "        try:\n            main(args)\n        except SystemExit:\n            pass\n"
              "import json\nprint(json.dumps(sorted(m for m in ('ray', 'torch', 'sklearn') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    imported: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return imported


def test_help_and_the_new_verbs_help_import_neither_ray_nor_torch_nor_sklearn() -> None:
    assert _imported_after("(['--help'], ['--version'], ['index', '--help'], ['index', 'build', '--help'], "
                           "['search', '--help'], ['fingerprint', '--help'])") == []
