"""Adapters fingerprint like their merge; batch mode discovers, resumes after a kill, and survives broken models."""

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
import torch

from tg_verify import batch
from tg_verify.batch import discover, fingerprint_model, output_stem, run_batch
from tg_verify.cli import main
from tg_verify.errors import AdapterError, UsageError
from tg_verify.fingerprint.document import load
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.tiny import build_model, save_lora_adapter, save_model

FAST = FingerprintSettings(device="cpu", repeats=4, sketch=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_lora(base: torch.nn.Module, adapter_dir: Path, merged_dir: Path | None = None, *,
              base_name: str | None = None, seed: int = 1) -> Path:
    """A LoRA adapter of `base` with random (trained-like) weights; optionally also its peft merge, saved whole."""
    return save_lora_adapter(base, adapter_dir, targets=("q_proj", "v_proj", "down_proj"), seed=seed, scale=0.05,
                             base_name=base_name, merged_dir=merged_dir)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small registry: two full models in nested folders, an adapter of one of them, and its merge."""
    root = tmp_path_factory.mktemp("zoo")
    base = build_model("llama", seed=11)
    paths = {"base": save_model(base, root / "registry" / "org-a" / "llama-base"),
             "other": save_model(build_model("qwen2", seed=12), root / "registry" / "org-b" / "qwen")}
    paths["adapter"] = save_lora(base, root / "adapters" / "llama-lora", root / "merged" / "llama-lora-merged",
                                 base_name="org-a/llama-base")
    paths["merged"] = root / "merged" / "llama-lora-merged"
    paths["root"] = root
    return paths


# ----------------------------------------------------------------------------------- adapters, done-when


def test_adapter_and_its_peft_merge_give_the_same_fingerprint(zoo: dict[str, Path]) -> None:
    settings = FingerprintSettings(device="cpu")  # the defaults, lineage sketch included
    adapter = fingerprint_model(zoo["adapter"], settings, base=zoo["base"])
    merged = fingerprint_model(zoo["merged"], settings)
    for name, value in merged.fingerprint.features.items():
        assert adapter.fingerprint.features[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert adapter.fingerprint.tensors == merged.fingerprint.tensors
    assert adapter.fingerprint.sketch == merged.fingerprint.sketch
    base = fingerprint_model(zoo["base"], FAST).fingerprint
    assert fingerprint_model(zoo["adapter"], FAST, base=zoo["base"]).fingerprint.features != base.features
    record = adapter.fingerprint.artifact
    assert record["layout"] == "adapter"
    assert {f["path"] for f in record["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
    assert record["base"]["root_digest"] == base.artifact["root_digest"]
    assert record["base"]["files"] == [{k: f[k] for k in ("path", "size", "sha256")} for f in base.artifact["files"]]
    assert adapter.warnings == []  # the adapter names its base as org-a/llama-base: no mismatch


def test_adapter_document_round_trips_and_is_deterministic(zoo: dict[str, Path], tmp_path: Path) -> None:
    first = fingerprint_model(zoo["adapter"], FAST, base=zoo["base"]).fingerprint
    second = fingerprint_model(zoo["adapter"], FAST, base=zoo["base"]).fingerprint
    assert first.to_json_bytes() == second.to_json_bytes()
    path = tmp_path / "fp.json"
    path.write_bytes(first.to_json_bytes())
    assert load(path).artifact["base"] == first.artifact["base"]


def test_adapter_needs_a_base_and_warns_on_a_name_mismatch(zoo: dict[str, Path]) -> None:
    with pytest.raises(AdapterError, match="--base PATH.*org-a/llama-base"):
        fingerprint_model(zoo["adapter"], FAST)
    result = fingerprint_model(zoo["adapter"], FAST, base=zoo["base"], declared_base_names=["mistral-7b"])
    assert [f.code for f in result.findings] == ["TGV_ADAPTER_BASE_NAME_MISMATCH"]
    assert "org-a/llama-base" in result.warnings[0]


def test_cli_fingerprints_an_adapter_with_base(zoo: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adapter.json"
    assert main(["fingerprint", str(zoo["adapter"]), "--base", str(zoo["base"]), "-o", str(out), "--device", "cpu",
                 "--no-sketch", "--repeats", "4"]) == 0
    assert load(out).artifact["base"]["name"] == "llama-base"
    assert main(["fingerprint", str(zoo["adapter"]), "-o", str(tmp_path / "x.json"), "--repeats", "4"]) == 2
    assert "--base PATH" in capsys.readouterr().err
    assert main(["fingerprint", str(zoo["base"]), "--base", str(zoo["base"]), "-o", str(tmp_path / "y.json")]) == 2
    assert "not a PEFT adapter" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


# ------------------------------------------------------------------------------------------ discovery


def test_discovery_of_models_and_folders(zoo: dict[str, Path], tmp_path: Path) -> None:
    registry = zoo["root"] / "registry"
    (registry / ".cache" / "hidden-model").mkdir(parents=True, exist_ok=True)
    (registry / ".cache" / "hidden-model" / "model.safetensors").write_bytes(b"")
    found = discover([registry, zoo["base"], zoo["adapter"]])
    assert found == [zoo["base"], zoo["other"], zoo["adapter"]]  # natural order, no duplicates, no hidden dirs
    assert discover([zoo["base"] / "model.safetensors"]) == [zoo["base"] / "model.safetensors"]
    assert discover([zoo["root"]], exclude=[zoo["root"] / "merged"]) == [zoo["adapter"], zoo["base"], zoo["other"]]
    with pytest.raises(UsageError, match="no such file"):
        discover([tmp_path / "missing"])


def test_output_names_are_stable_and_collision_free(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "model", tmp_path / "b" / "model"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    assert output_stem(one) == output_stem(tmp_path / "a" / ".." / "a" / "model")
    assert output_stem(one) != output_stem(two)
    assert output_stem(one).startswith("model-")
    weird = tmp_path / "We ird: näme!"
    weird.mkdir()
    assert output_stem(weird).startswith("We_ird_n_me-")


# ------------------------------------------------------------------------------------------ resume


def _copy_models(zoo: dict[str, Path], root: Path) -> Path:
    registry = root / "registry"
    shutil.copytree(zoo["root"] / "registry", registry)
    return registry


def test_resume_skips_up_to_date_and_redoes_changed(zoo: dict[str, Path], tmp_path: Path) -> None:
    registry = _copy_models(zoo, tmp_path)
    out = tmp_path / "out"
    first = run_batch([registry], out, FAST)
    assert [o.status for o in first.outcomes] == ["computed", "computed"] and first.exit_code == 0
    written = {o.source.name: o.output for o in first.outcomes}
    stamps = {name: path.stat().st_mtime_ns for name, path in written.items()}
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(p.name for p in written.values())

    again = run_batch([registry], out, FAST)
    assert [(o.status, o.message) for o in again.outcomes] == [("skipped", "up to date (file stats unchanged)")] * 2
    assert {n: p.stat().st_mtime_ns for n, p in written.items()} == stamps

    weights = registry / "org-a" / "llama-base" / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))  # touched, same bytes
    touched = run_batch([registry], out, FAST)
    assert touched.outcomes[0].message == "up to date (sha256 re-checked)"
    assert {n: p.stat().st_mtime_ns for n, p in written.items()} == stamps

    save_model(build_model("llama", seed=99), weights.parent)  # same names and sizes, new values
    changed = run_batch([registry], out, FAST)
    assert changed.outcomes[0].status == "computed" and "changed (sha256)" in changed.outcomes[0].message
    assert changed.outcomes[1].status == "skipped"

    other_settings = run_batch([registry], out, FingerprintSettings(device="cpu", repeats=5, sketch=False))
    assert {o.message for o in other_settings.outcomes} == {"recomputed: made with other settings"}
    forced = run_batch([registry], out, FingerprintSettings(device="cpu", repeats=5, sketch=False), force=True)
    assert {o.status for o in forced.outcomes} == {"computed"}
    qwen = registry / "org-b"
    sketched = run_batch([qwen], out, FingerprintSettings(device="cpu", repeats=5))
    assert [o.message for o in sketched.outcomes] == ["recomputed: lineage sketch missing"]
    assert load(sketched.outcomes[0].output).sketch is not None
    unsketched = run_batch([qwen], out, FingerprintSettings(device="cpu", repeats=5, sketch=False))
    assert [o.status for o in unsketched.outcomes] == ["skipped"]  # a sketch more than asked for is kept


def test_broken_models_are_reported_and_the_rest_done(zoo: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _copy_models(zoo, tmp_path)
    broken = registry / "org-c" / "broken"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"\x01\x00")
    shutil.copytree(zoo["adapter"], registry / "org-c" / "adapter")  # no --base: fails clearly
    result = run_batch([registry], tmp_path / "out", FAST)
    status = {o.source.name: (o.status, o.code) for o in result.outcomes}
    assert status == {"llama-base": ("computed", None), "qwen": ("computed", None),
                      "adapter": ("failed", "TGV_ADAPTER"), "broken": ("failed", "TGV_HEADER_TOO_SMALL")}
    assert result.exit_code == 2
    assert not (tmp_path / "out" / f"{output_stem(broken)}.json").exists()

    with_base = run_batch([registry], tmp_path / "out", FAST, base=zoo["base"])
    status = {o.source.name: o.status for o in with_base.outcomes}
    assert status == {"llama-base": "skipped", "qwen": "skipped", "adapter": "computed", "broken": "failed"}

    real = batch.fingerprint_model

    def explode(artifact, *args, **kwargs):  # type: ignore[no-untyped-def]
        if artifact.name == "qwen":
            raise RuntimeError("boom")
        return real(artifact, *args, **kwargs)

    monkeypatch.setattr(batch, "fingerprint_model", explode)
    internal = run_batch([registry], tmp_path / "out", FAST, force=True)
    assert internal.exit_code == 3
    assert [o.message for o in internal.outcomes if o.source.name == "qwen"] == ["internal error: RuntimeError: boom"]


def test_cli_batch(zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["fingerprint", "--batch", str(zoo["root"] / "registry"), str(zoo["adapter"]), "--out-dir", str(out),
            "--base", str(zoo["base"]), "--device", "cpu", "--repeats", "4", "--no-sketch", "--no-progress"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "3 models: 3 computed, 0 up to date, 0 failed"
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 models: 0 computed, 3 up to date, 0 failed"
    assert main(["fingerprint", "--batch", str(zoo["base"])]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert main(["fingerprint", str(zoo["base"]), "--batch", str(zoo["base"]), "--out-dir", str(out)]) == 2
    assert main(["fingerprint", str(zoo["base"]), "-o", str(tmp_path / "x.json"), "--out-dir", str(out)]) == 2


# ---------------------------------------------------------------------------------------- kill + resume

KILLABLE = textwrap.dedent("""
    import sys
    from tg_verify.batch import run_batch
    from tg_verify.fingerprint.settings import FingerprintSettings
    settings = FingerprintSettings(device="cpu", repeats=4, sketch=False)
    def done(outcome):
        print("DONE", outcome.status, outcome.source, flush=True)
    run_batch(sys.argv[2:], sys.argv[1], settings, on_outcome=done)
    print("FINISHED", flush=True)
""")


def test_batch_killed_half_way_resumes_without_redoing_finished_models(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    for number in range(6):  # enough that the kill lands mid-batch even on a slow, loaded machine
        save_model(build_model("llama", seed=20 + number), registry / f"model-{number}")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(out), str(registry)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the first model's fingerprint and state are written
        assert line.startswith("DONE computed"), line + process.stderr.read()
        os.killpg(process.pid, signal.SIGKILL)  # the second model is being fingerprinted right now
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert 1 <= len(finished) < 6
    for path in finished:
        load(path)  # every fingerprint present is complete and valid
    assert not [p for p in out.iterdir() if p.is_file() and p.suffix == ".json" and p not in finished]

    resumed = run_batch([registry], out, FAST)
    done_before = {o.source.name for o in resumed.outcomes if o.output in finished}
    assert {o.source.name for o in resumed.outcomes if o.status == "skipped"} == done_before
    assert {o.status for o in resumed.outcomes if o.source.name not in done_before} == {"computed"}
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished models were not redone
    assert len(list(out.glob("*.json"))) == 6


def test_a_bug_while_planning_one_model_fails_that_model_only(zoo: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _copy_models(zoo, tmp_path)
    out = tmp_path / "out"
    assert run_batch([registry], out, FAST).exit_code == 0
    real = batch.load

    def explode(path):  # type: ignore[no-untyped-def]
        if "qwen" in str(path):
            raise RuntimeError("planning bug")
        return real(path)

    monkeypatch.setattr(batch, "load", explode)
    result = run_batch([registry], out, FAST)
    assert [(o.source.name, o.status, o.message) for o in result.outcomes] == [
        ("llama-base", "skipped", "up to date (file stats unchanged)"),
        ("qwen", "failed", "internal error: RuntimeError: planning bug")]
    assert result.exit_code == 3
