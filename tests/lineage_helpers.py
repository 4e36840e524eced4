"""Scores the quantised-checkpoint tests share: the block score between two fingerprints."""

from __future__ import annotations

from typing import Any

from tg_verify.analysis.blocks import block_score, parse_blocks


def blocks(a: Any, b: Any) -> float:
    """The block score of fingerprint `a` against `b` (both must have block evidence)."""
    result = block_score(parse_blocks(a.blocks, "a"), parse_blocks(b.blocks, "b"))
    assert result.score is not None
    return result.score
