"""An FP8 re-publication of a model is fingerprinted as the runtime computes it (float8 values times their scales):
its lineage evidence stays the original's, and an edit to a scale reaches the fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fp8_helpers import save_fp8
from lineage_helpers import blocks

from tg_verify.analysis.lineage import lineage_score, lineage_test
from tg_verify.artifact import resolve
from tg_verify.fingerprint.extract import fingerprint_artifact
from tg_verify.tiny import one_thread

# (method, block): DeepSeek-V3-style blocks that tile the tiny matrices, blocks with partial edges, one scale per
# tensor (weight_block_size null), and the two per-channel formats
CASES = [("fp8", (16, 16)), ("fp8", (24, 40)), ("fp8", None), ("compressed-tensors", None), ("fbgemm_fp8", None)]


@pytest.mark.parametrize("method, block", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_fp8_republication_keeps_the_originals_lineage(originals: dict[str, Any], method: str,
                                                       block: tuple[int, int] | None, tmp_path: Path) -> None:
    with one_thread():
        fp8 = fingerprint_artifact(resolve(save_fp8(originals["model"], tmp_path / "fp8", method, block)))
    original, other = originals["original"], originals["other"]
    sketch = lineage_score(fp8, original).score
    assert sketch is not None and sketch > 0.99, sketch
    assert blocks(fp8, original) > 0.99 and blocks(other, original) < 0.3
    assert lineage_test(fp8, original).derived
    # the scales are bound by digest and listed, never fingerprinted as weights of their own
    scales = fp8.extraction["scale_tensors"]
    assert len(scales) >= 14 and all(".layers." in name for name in scales)
    assert not {r["name"] for r in fp8.tensors} & set(scales)
    assert fp8.features["total_params"] == original.features["total_params"]
    assert fp8.features["num_layers"] == original.features["num_layers"]
    assert "unexpected_tensors" not in fp8.extraction


def test_an_edited_scale_moves_the_fingerprint(originals: dict[str, Any], tmp_path: Path) -> None:
    """Doubling one block scale of one layer's down projection changes what runs, and so the fingerprint: that
    layer's block evidence and the features move, nothing else."""
    def double(state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        state["model.layers.1.mlp.down_proj.weight_scale_inv"][0, 0] *= 2

    with one_thread():
        honest = fingerprint_artifact(resolve(save_fp8(originals["model"], tmp_path / "honest")))
        edited = fingerprint_artifact(resolve(save_fp8(originals["model"], tmp_path / "edited", edit=double)))
    assert honest.blocks["units"][0] == edited.blocks["units"][0]
    assert honest.blocks["units"][1]["mlp_ud"] != edited.blocks["units"][1]["mlp_ud"]
    assert honest.features != edited.features
    down = next(r for r in edited.tensors if r["name"] == "model.layers.1.mlp.down_proj.weight")
    assert down["scale"] == "model.layers.1.mlp.down_proj.weight_scale_inv"
    assert down["stats"] != next(r for r in honest.tensors if r["name"] == down["name"])["stats"]
