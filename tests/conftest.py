"""Shared fixtures: tiny models of five architectures, built once per session, in three layouts; trained tiny
models (independent twins and a fine-tune) for the tests that claim detection."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tg_verify.tiny import ARCHITECTURES, build_model, save_model

LAYOUTS = ("single", "indexed-shards", "shards")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """{arch: {layout: directory}} for llama, qwen2, gemma, phi3, mistral; the same weights per arch."""
    root = tmp_path_factory.mktemp("tiny-models")
    result: dict[str, dict[str, Path]] = {}
    for number, arch in enumerate(ARCHITECTURES):
        model = build_model(arch, seed=number)
        result[arch] = {layout: save_model(model, root / arch / layout, layout) for layout in LAYOUTS}
    return result


TRAIN_STEPS = 150  # the shortest training length of the lineage calibration's null (bench/calibrate.py)


@dataclass(frozen=True)
class TrainedZoo:
    """Tiny models trained on Python stdlib source through bench/lineage.py's 512-token bigram vocabulary:
    per architecture a base and an independently trained twin (other seed), and the llama base fine-tuned."""

    table: Any  # the vocabulary (bench.lineage.bigram_tokenizer), for write_tokenizer
    bases: dict[str, Any]  # arch -> bench.transforms.Checkpoint
    twins: dict[str, Any]
    fine_tuned: Any  # the llama base after 40 steps at lr 1e-3 on text it never saw


@pytest.fixture(scope="session")
def trained_zoo() -> TrainedZoo:
    """Built once per session (TRAIN_STEPS steps of 8 windows of 64 tokens each, one thread, deterministic):
    detection is claimed on trained models only, never on random initialisations."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.lineage import bigram_tokenizer, tokenize
    from bench.transforms import from_model
    from bench.zoo import corpus, fine_tune
    from tg_verify.tiny import one_thread

    text = {part: corpus(part, 200_000) for part in ("pretrain", "heavy")}
    table = bigram_tokenizer(text["pretrain"])
    tokens = {part: tokenize(t, table) for part, t in text.items()}
    bases, twins = {}, {}
    with one_thread():
        for number, arch in enumerate(ARCHITECTURES):
            for seeds, out in ((500, bases), (600, twins)):
                model = build_model(arch, seed=seeds + number)
                out[arch] = from_model(fine_tune(model, tokens["pretrain"], TRAIN_STEPS, 3e-3, seeds + number, batch=8))
        tuned = fine_tune(bases["llama"].model(), tokens["heavy"], 40, 1e-3, 700, batch=8)
    return TrainedZoo(table=table, bases=bases, twins=twins, fine_tuned=from_model(tuned))


@pytest.fixture(scope="session")
def action_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository checkout for the Action's tests (two bases, a fine-tune, pass.yml and fail.yml), built
    once per session; its reference cache is `.tg-cache`, so the references are fingerprinted once."""
    from attestation_helpers import build_workspace

    return build_workspace(tmp_path_factory.mktemp("action-workspace"))


@pytest.fixture(scope="session")
def tiny_model_objects() -> dict[str, object]:
    """The in-memory torch modules behind `tiny_models` (same seeds), for reference computations."""
    return {arch: build_model(arch, seed=number) for number, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def kill_switch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where a file `<model name>.kill` makes the next Ray worker that fingerprints that model die.

    The worker claims the file (deletes it) and SIGKILLs its own process mid-job, as an out-of-memory
    kill or a lost node would; the retry then finds no file and fingerprints normally.
    """
    return tmp_path_factory.mktemp("kill-switch")


@pytest.fixture(scope="session")
def ray_cluster(kill_switch: Path) -> Iterator[str]:
    """A real local Ray cluster (2 CPUs, no dashboard) for the whole session; yields its address.

    Its workers run `_kill_switch_hook`, which wraps tg_verify.batch.fingerprint_model with the kill switch.
    """
    import ray

    from tg_verify.scale.ray_executor import RayExecutor  # noqa: F401 - the module must import with ray present

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                       runtime_env={"worker_process_setup_hook": _kill_switch_hook(str(kill_switch)),
                                    "env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        yield str(context.address_info["address"])
    finally:
        ray.shutdown()


def _kill_switch_hook(directory: str) -> Callable[[], None]:
    def install() -> None:
        import os
        import signal
        from pathlib import Path

        from tg_verify import batch

        real = batch.fingerprint_model

        def dying(artifact, *args, **kwargs):  # type: ignore[no-untyped-def]
            flag = Path(directory) / f"{artifact.name}.kill"
            try:
                flag.unlink()
            except FileNotFoundError:
                return real(artifact, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        batch.fingerprint_model = dying
    return install
