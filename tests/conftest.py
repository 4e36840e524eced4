"""Shared fixtures: tiny models of five architectures, built once per session, in three layouts."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_model_objects() -> dict[str, object]:
    """The in-memory torch modules behind `tiny_models` (same seeds), for reference computations."""
    return {arch: build_model(arch, seed=number) for number, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param
