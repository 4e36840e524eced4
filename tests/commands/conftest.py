"""Fixtures for the analysis verbs (compare, classify, study): fingerprints of the tiny models and a derivative."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tg_verify.artifact import resolve
from tg_verify.fingerprint.extract import fingerprint_artifact
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.tiny import save_model


@pytest.fixture(scope="session")
def tiny_fingerprints(tiny_models, tiny_model_objects, tmp_path_factory) -> dict[str, Path]:
    """{arch: fingerprint file} of the five tiny models, plus '<arch>-ft' (and '<arch>-ft-model', its directory)
    for llama and qwen2: lightly perturbed copies."""
    root = tmp_path_factory.mktemp("analysis-fingerprints")
    settings = FingerprintSettings(device="cpu")
    paths: dict[str, Path] = {}
    for arch, layouts in tiny_models.items():
        fp = fingerprint_artifact(resolve(layouts["single"]), settings, model_name=arch)
        paths[arch] = root / "refs" / f"{arch}.json"
        paths[arch].parent.mkdir(parents=True, exist_ok=True)
        paths[arch].write_bytes(fp.to_json_bytes())
    for arch in ("llama", "qwen2"):
        name = f"{arch}-ft"
        directory = save_model(_perturbed(tiny_model_objects[arch], 0.02), root / "models" / name)
        fp = fingerprint_artifact(resolve(directory), settings, model_name=name)
        paths[name] = root / "derivatives" / f"{name}.json"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_bytes(fp.to_json_bytes())
        paths[f"{name}-model"] = directory
    return paths


def _perturbed(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """A copy with every matrix nudged by `scale` of its own spread: a stand-in for a light fine-tune."""
    import copy

    torch.manual_seed(1234)
    result = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in result.parameters():
            if parameter.ndim >= 2:
                parameter.add_(torch.randn_like(parameter) * parameter.std() * scale)
    return result
