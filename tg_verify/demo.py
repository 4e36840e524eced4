"""The embedded demo: a tiny base, a fine-tune of it and an unrelated model, built offline, then two policies.

Everything is made on the CPU in a cache directory and reused on later runs: the models are trained
for a few dozen steps on bytes of Python's own standard library (no network, no download), the
references are fingerprinted, and two policies are written next to them. The pass policy declares the
fine-tune's true base; the fail policy has an independently trained model of the same architecture
claim that base, a claim the paper's statistics cannot settle in general (same architecture, similar
weight distributions) and the lineage test refutes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tg_verify.atomic import write_bytes, write_text
from tg_verify.errors import InputError
from tg_verify.pipeline import VerificationResult, VerifyOptions, verify
from tg_verify.policy import load_policy
from tg_verify.progress import NullProgress, ProgressSink
from tg_verify.tiny import build_model, one_thread, save_model

DEMO_VERSION = "demo-v5"  # bump when what the demo builds changes: older caches are then rebuilt
BASE_ID = "demo-llama-base"
OTHER_REFERENCES = (("demo-qwen2-base", "qwen2", 2), ("demo-gemma-base", "gemma", 3))  # (id, arch, seed)
STEPS = 30
SEQUENCE = 64
BATCH = 8


@dataclass(frozen=True)
class DemoCase:
    """One policy of the demo and the verdict it must give."""

    name: str
    policy: Path
    expect_pass: bool
    story: str


@dataclass(frozen=True)
class DemoRun:
    """A case and what tg-verify decided."""

    case: DemoCase
    result: VerificationResult

    @property
    def as_expected(self) -> bool:
        return self.result.passed == self.case.expect_pass


def default_demo_dir() -> Path:
    """$XDG_CACHE_HOME/tg-verify/demo (or ~/.cache/tg-verify/demo)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tg-verify" / "demo"


def corpus(part: int) -> np.ndarray:
    """Offline training text as byte tokens (< 256, inside the tiny vocabulary): stdlib sources.

    `part` 0 and 1 are different files, so the base and the fine-tune see different data.
    """
    import json
    import textwrap

    files = [Path(textwrap.__file__), Path(json.__file__).parent / "decoder.py"]
    data = files[part % len(files)].read_bytes()
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def train(model: torch.nn.Module, tokens: np.ndarray, steps: int, seed: int, lr: float = 3e-3) -> torch.nn.Module:
    """A few AdamW steps of next-token prediction on random windows of `tokens` (seeded, in place)."""
    with one_thread():
        return _train(model, tokens, steps, seed, lr)


def _train(model: torch.nn.Module, tokens: np.ndarray, steps: int, seed: int, lr: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(tokens)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQUENCE - 1, (BATCH,), generator=generator)
        batch = torch.stack([data[s:s + SEQUENCE] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    model.eval()
    return model


def _policy(candidate: str, name: str, declared: str) -> str:
    others = "".join(f"""\
  - id: {ref_id}
    family: {arch}
    fingerprint: ../refs/{ref_id}.json
""" for ref_id, arch, _ in OTHER_REFERENCES)
    return f"""\
# tg-verify demo policy: is `{candidate}` what it claims to be? (docs/policy.md explains every key)
version: 1
candidate:
  path: ../models/{candidate}
  name: {name}
declared:
  base: {declared}
  relation: finetune
references:
  - id: {BASE_ID}
    family: llama
    fingerprint: ../refs/{BASE_ID}.json
{others}thresholds:
  max_distance: 7.0
# three tiny references: the paper's distance has no scale here (reported as not meaningful); the lineage
# test decides
on_out_of_cluster: warn
"""


def build(directory: Path, progress: ProgressSink | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Build the demo's models, reference fingerprints and policies under `directory` (atomically)."""
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    say = log or (lambda _message: None)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    try:
        say(f"training a tiny llama base ({STEPS} steps on stdlib text)")
        base = train(build_model("llama", seed=0), corpus(0), steps=STEPS, seed=0)
        save_model(base, staging / "models" / "base", vocabulary=True)
        say(f"fine-tuning it on other text ({STEPS // 2} steps)")
        save_model(train(base, corpus(1), steps=STEPS // 2, seed=1, lr=1e-3), staging / "models" / "finetune",
                   vocabulary=True)
        say(f"training an unrelated llama of the same shape (other seed and data order, {STEPS} steps)")
        unrelated = train(build_model("llama", seed=1), corpus(0), steps=STEPS, seed=2)
        save_model(unrelated, staging / "models" / "unrelated", vocabulary=True)
        folders = [(BASE_ID, "base")]
        for ref_id, arch, seed in OTHER_REFERENCES:
            say(f"training a tiny {arch} base as another family ({STEPS} steps)")
            other = train(build_model(arch, seed=seed), corpus(0), steps=STEPS, seed=seed)
            save_model(other, staging / "models" / arch, vocabulary=True)
            folders.append((ref_id, arch))
        settings = FingerprintSettings(device="cpu")
        for ref_id, folder in folders:
            say(f"fingerprinting reference {ref_id}")
            fp = fingerprint_artifact(resolve(staging / "models" / folder), settings, model_name=ref_id,
                                      progress=progress)
            write_bytes(staging / "refs" / f"{ref_id}.json", fp.to_json_bytes())
        write_text(staging / "policies" / "pass.yml", _policy("finetune", "acme/llama-legal-ft", BASE_ID))
        write_text(staging / "policies" / "fail.yml", _policy("unrelated", "acme/llama-legal-ft-v2", BASE_ID))
        target = directory / DEMO_VERSION
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def ensure(directory: Path, progress: ProgressSink | None = None, log: Callable[[str], None] | None = None
           ) -> tuple[Path, bool]:
    """The demo tree under `directory`, built when missing; returns (tree, built_now)."""
    tree = directory / DEMO_VERSION
    if (tree / "policies" / "fail.yml").is_file():
        return tree, False
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: demo directory is not a directory")
    return build(directory, progress, log), True


def cases(tree: Path) -> tuple[DemoCase, DemoCase]:
    """The two policies and the verdict each must give."""
    return (DemoCase("fine-tune of the declared base", tree / "policies" / "pass.yml", True,
                     "a fine-tune declares its true base: the distance and the lineage test agree"),
            DemoCase("unrelated model claiming the same base", tree / "policies" / "fail.yml", False,
                     "an independently trained model of the same architecture claims that base: the lineage "
                     "test refutes the claim"))


def attribution_note(item: DemoRun) -> str | None:
    """Why the attribution names a family that is not the candidate's architecture (the unrelated model), or None.

    Attribution is the paper's nearest cluster centre over 16 weight statistics; it never reads the
    architecture, so a model that belongs to no reference family is given the nearest one.
    """
    result = item.result
    cls = result.classification
    path = result.candidate.path
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return None
    architecture = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(architecture, str) or cls.family == architecture:
        return None
    declared = result.declared_reference
    lineage = declared.lineage if declared is not None else None
    refuted = (f" What refutes its claim is the lineage test against {declared.spec.id}: no derivation "
               f"(p = {lineage.p_value:.3g})." if declared is not None and lineage is not None and not lineage.derived
               else "")
    return (f"why family {cls.family}? Attribution names the reference family whose cluster centre is nearest in "
            f"the paper's 16 weight statistics ({cls.base}, distance {cls.distance:.3f}); it does not read the "
            f"architecture. This model is a {architecture} by architecture but was trained from its own random "
            f"start, so it belongs to none of the reference families, and with three tiny references the nearest "
            f"centre is close to arbitrary.{refuted}")


def run(directory: Path, progress: ProgressSink | None = None, log: Callable[[str], None] | None = None
        ) -> list[DemoRun]:
    """Build (or reuse) the demo and run both policies."""
    tree, _ = ensure(directory, progress, log)
    options = VerifyOptions(device="cpu", progress=progress or NullProgress())
    return [DemoRun(case, verify(load_policy(case.policy), options)) for case in cases(tree)]
