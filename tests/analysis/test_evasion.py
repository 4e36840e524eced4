"""Evasions on trained tiny models: each transform is proven function-preserving, changes the model, and leaves
the lineage score at 1 (still derived); an independently trained twin is not derived.

Sketch-only fingerprints keep this fast; tests/analysis/test_lineage.py goes through the extractor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tg_verify.analysis.lineage import lineage_test
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.tiny import ARCHITECTURES

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.transforms import EVASIONS, Checkpoint, all_evasions, same_function, sketch_fingerprint_of  # noqa: E402

CASES = {**EVASIONS, "all-at-once": all_evasions}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, trained_zoo: Any
        ) -> dict[str, tuple[Checkpoint, Fingerprint, Fingerprint]]:
    """Per architecture: the trained base checkpoint, its fingerprint, and its independently trained twin's."""
    root = tmp_path_factory.mktemp("evasion")
    result = {}
    for arch in ARCHITECTURES:
        base, twin = trained_zoo.bases[arch], trained_zoo.twins[arch]
        result[arch] = (base, sketch_fingerprint_of(base, root / arch),
                        sketch_fingerprint_of(twin, root / f"{arch}-twin"))
    return result


def _changed(a: Checkpoint, b: Checkpoint) -> bool:
    if set(a.state) != set(b.state) or a.config.model_type != b.config.model_type:
        return True
    return any(not torch.equal(a.state[k], b.state[k]) for k in a.state)


@pytest.mark.parametrize("name", CASES)
def test_evasion_is_function_preserving_and_still_detected(arch: str, name: str, tmp_path: Path,
                                                           zoo: dict[str, tuple[Checkpoint, Fingerprint, Fingerprint]]
                                                           ) -> None:
    base, base_fp, _ = zoo[arch]
    evaded = CASES[name](base)
    assert _changed(base, evaded), "the transform left the model as it was"
    same_function(base, evaded)  # raises when the logits differ
    result = lineage_test(sketch_fingerprint_of(evaded, tmp_path / "evaded"), base_fp)
    assert result.derived and result.score > 0.99, result.to_dict()


def test_republished_model_type_really_changes(zoo: dict[str, tuple[Checkpoint, Fingerprint, Fingerprint]]) -> None:
    for arch, (base, _, _) in zoo.items():
        moved = CASES["republish"](base)
        assert moved.config.model_type != base.config.model_type
        if arch == "phi3":
            assert "model.layers.0.self_attn.q_proj.weight" in moved.state
            assert "model.layers.0.self_attn.qkv_proj.weight" not in moved.state


def test_independent_twins_are_not_derived(zoo: dict[str, tuple[Checkpoint, Fingerprint, Fingerprint]]) -> None:
    """Same config, same data, another seed, trained as long as the calibration's shortest null models: not derived
    at the shipped calibration's threshold (or the fallback's, for a class it does not hold)."""
    results = {arch: lineage_test(twin_fp, base_fp) for arch, (_, base_fp, twin_fp) in zoo.items()}
    assert not any(r.derived for r in results.values()), {a: (r.score, r.threshold) for a, r in results.items()}
