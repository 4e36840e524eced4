"""Batch fingerprinting on a real local Ray cluster: the local run's bytes, retries, resume, clear failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tg_verify.batch import output_stem, run_batch
from tg_verify.cli import main
from tg_verify.fingerprint.document import load
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.scale.executor import Job, JobDone, JobLost
from tg_verify.scale.ray_executor import RayExecutor
from tg_verify.tiny import build_model, save_lora_adapter, save_model

SETTINGS = FingerprintSettings(device="cpu", repeats=8)  # the sketch included: it is part of the bytes compared


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Full models in three layouts and four architectures, an adapter (needs --base), a broken model."""
    root = tmp_path_factory.mktemp("ray-registry")
    models = root / "models"
    base = build_model("llama", seed=31)
    save_model(base, models / "org-a" / "llama")
    save_model(build_model("qwen2", seed=32), models / "org-a" / "qwen2-shards", "shards")
    save_model(build_model("gemma", seed=33), models / "org-b" / "gemma-indexed", "indexed-shards")
    save_model(build_model("phi3", seed=34), models / "org-b" / "phi3")
    save_lora_adapter(base, models / "org-c" / "llama-lora", seed=5, base_name="org-a/llama")
    (models / "org-c" / "broken").mkdir(parents=True)
    (models / "org-c" / "broken" / "model.safetensors").write_bytes(b"\x01\x00")
    return {"models": models, "base": models / "org-a" / "llama", "root": root}


def _copy(registry: dict[str, Path], where: Path) -> Path:
    return Path(shutil.copytree(registry["models"], where / "models"))


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.json"))}


def _summary(result):  # type: ignore[no-untyped-def]
    return [(o.source.name, o.status, o.message, o.code, o.exit_code) for o in result.outcomes]


def test_ray_batch_writes_the_local_bytes_and_resumes_alike(ray_cluster: str, registry: dict[str, Path],
                                                           tmp_path: Path) -> None:
    models = _copy(registry, tmp_path)
    base = models / "org-a" / "llama"
    local = run_batch([models], tmp_path / "local", SETTINGS, base=base)
    on_ray = run_batch([models], tmp_path / "ray", SETTINGS, base=base, executor=RayExecutor())
    assert _summary(on_ray) == _summary(local)
    assert [o.status for o in local.outcomes].count("computed") == 5
    assert local.exit_code == on_ray.exit_code == 2  # the broken model, reported, after all the others
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # byte for byte, adapter merge included
    assert sorted(os.listdir(tmp_path / "ray" / ".tg-batch")) == sorted(os.listdir(tmp_path / "local" / ".tg-batch"))

    again = run_batch([models], tmp_path / "ray", SETTINGS, base=base, executor=RayExecutor())
    assert {o.message for o in again.outcomes if o.status != "failed"} == {"up to date (file stats unchanged)"}
    weights = models / "org-b" / "phi3" / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))  # same bytes, new stats
    touched = run_batch([models], tmp_path / "ray", SETTINGS, base=base, executor=RayExecutor())
    assert {o.source.name: o.message for o in touched.outcomes}["phi3"] == "up to date (sha256 re-checked)"
    save_model(build_model("phi3", seed=99), weights.parent)  # same names and sizes, other values
    changed = run_batch([models], tmp_path / "ray", SETTINGS, base=base, executor=RayExecutor())
    assert {o.source.name: o.message for o in changed.outcomes}["phi3"].startswith("recomputed: file model.safetensors")
    assert _files(tmp_path / "ray") != _files(tmp_path / "local")


def test_a_worker_killed_mid_job_is_retried_and_the_bytes_do_not_change(
        ray_cluster: str, kill_switch: Path, registry: dict[str, Path], tmp_path: Path) -> None:
    models = _copy(registry, tmp_path)
    reference = run_batch([models], tmp_path / "local", SETTINGS)
    (kill_switch / "qwen2-shards.kill").touch()
    result = run_batch([models], tmp_path / "ray", SETTINGS, executor=RayExecutor())
    assert not (kill_switch / "qwen2-shards.kill").exists()  # the first attempt took the switch and died
    attempts = {o.source.name: (o.status, o.attempts) for o in result.outcomes}
    assert attempts["qwen2-shards"] == ("computed", 2)
    assert {v for k, v in attempts.items() if k not in ("qwen2-shards", "broken", "llama-lora")} == {("computed", 1)}
    assert _summary(result) == _summary(reference)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_a_job_lost_beyond_its_retries_fails_alone(ray_cluster: str, kill_switch: Path, registry: dict[str, Path],
                                                   tmp_path: Path) -> None:
    models = _copy(registry, tmp_path)
    (kill_switch / "gemma-indexed.kill").touch()
    result = run_batch([models], tmp_path / "out", SETTINGS, executor=RayExecutor(max_retries=0))
    lost = {o.source.name: o for o in result.outcomes}["gemma-indexed"]
    assert (lost.status, lost.code, lost.exit_code, lost.attempts) == ("failed", "TGV_EXECUTOR", 3, 1)
    assert "retries exhausted" in lost.message and "WorkerCrashedError" in lost.message
    assert not (tmp_path / "out" / f"{output_stem(lost.source)}.json").exists()
    assert {o.source.name for o in result.outcomes if o.status == "computed"} == {"llama", "qwen2-shards", "phi3"}
    assert result.exit_code == 3


def test_jobs_are_placed_by_memory_and_refused_when_no_node_fits(ray_cluster: str) -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    executor = RayExecutor()
    jobs = [Job(_echo, (n,), label=f"[{n}]", memory=200 * 2**20) for n in range(3)]
    jobs.append(Job(_echo, (3,), label="[3]", memory=2**50))  # a petabyte: no node offers it
    jobs.append(Job(_raise, (), label="[4]"))
    results = dict(executor.run(jobs, _Sink()))
    assert [results[n] for n in range(3)] == [JobDone(n) for n in range(3)]
    assert isinstance(results[3], JobLost) and "needs 1048576.0 GiB of memory" in results[3].message
    assert results[4] == JobLost("internal error: ValueError: a bug", attempts=1)


def _echo(value: int, *, progress) -> int:  # type: ignore[no-untyped-def]
    progress.start("echo", 2)
    progress.advance(2)
    return value


def _raise(*, progress) -> None:  # type: ignore[no-untyped-def]
    raise ValueError("a bug")


class _Sink:
    def start(self, description: str, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1.0) -> None:
        pass

    def finish(self) -> None:
        pass


DRIVER = textwrap.dedent("""
    import sys
    from tg_verify.batch import run_batch
    from tg_verify.fingerprint.settings import FingerprintSettings
    from tg_verify.scale.ray_executor import RayExecutor
    def done(outcome):
        print("DONE", outcome.status, outcome.source, flush=True)
    executor = RayExecutor(address=sys.argv[1], max_in_flight=1)
    run_batch(sys.argv[3:], sys.argv[2], FingerprintSettings(device="cpu", repeats=8), on_outcome=done,
              executor=executor)
    print("FINISHED", flush=True)
""")


def test_a_killed_ray_driver_resumes_without_redoing_finished_models(ray_cluster: str, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    for number in range(5):
        save_model(build_model("mistral", seed=40 + number), registry / f"model-{number}")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-c", DRIVER, ray_cluster, str(out), str(registry)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the first model is written; the next one is in flight
        assert line.startswith("DONE computed"), line + process.stderr.read()
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert 1 <= len(finished) < 5
    for path in finished:
        load(path)
    resumed = run_batch([registry], out, SETTINGS, executor=RayExecutor())
    assert {o.output for o in resumed.outcomes if o.status == "skipped"} == set(finished)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert len(list(out.glob("*.json"))) == 5


def test_cli_runs_a_batch_on_ray_and_says_how_to_get_ray(ray_cluster: str, registry: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    models = _copy(registry, tmp_path)
    args = ["fingerprint", "--batch", str(models / "org-a"), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
            "--repeats", "8", "--no-progress", "--executor", "ray"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 models: 2 computed, 0 up to date, 0 failed"
    assert main([*args, "--ray-address", ray_cluster]) == 0  # the running session is used as it is
    assert capsys.readouterr().out.splitlines()[-1] == "2 models: 0 computed, 2 up to date, 0 failed"
    single = ["fingerprint", str(models / "org-a" / "llama"), "-o", str(tmp_path / "x.json"), "--executor", "ray"]
    assert main(single) == 2
    assert "go with --batch" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "tg-verify: --executor ray needs Ray, an optional extra: pip install 'tg-verify[ray]'\n"
