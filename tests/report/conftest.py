"""Real verify results for the report tests: the demo's PASS and FAIL, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tg_verify import demo
from tg_verify.pipeline import VerificationResult, verify
from tg_verify.policy import load_policy


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's models, reference fingerprints and policies, built once per session (shared by modules)."""
    tree, _ = demo.ensure(tmp_path_factory.getbasetemp() / "tg-demo")
    return tree


@pytest.fixture(scope="session")
def results(demo_tree: Path) -> dict[str, VerificationResult]:
    return {name: verify(load_policy(demo_tree / "policies" / f"{name}.yml")) for name in ("pass", "fail")}
