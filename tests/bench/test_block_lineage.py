"""bench/block_lineage.py: the OV/UD block statistics are unchanged by every function-preserving edit the study
claims they survive (re-parameterisations, dead units and heads, dead blocks), and still tell two models apart."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import attacks as A  # noqa: E402
from bench import block_lineage as B  # noqa: E402
from bench import transforms as T  # noqa: E402
from tg_verify.tiny import ARCHITECTURES, build_model, one_thread  # noqa: E402


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def blocks(ck: T.Checkpoint) -> B.Blocks:
    return B.blocks_of(ck.state, ck.config)


def robust_max(a: B.Blocks, b: B.Blocks) -> float:
    stat = next(s for s in B.STATISTICS if s.name == "robust-max")
    return stat.score(stat.features(a), stat.features(b), a, b)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_statistics_survive_function_preserving_edits(arch):
    ck = T.from_model(build_model(arch, seed=0))
    original = blocks(ck)
    for edit in (T.all_evasions, lambda c: A.dead_units(c, 1.0, 4.0, 11), lambda c: A.dead_blocks(c, 4.0, 12)):
        edited = edit(ck.clone())
        T.same_function(ck, edited)
        assert robust_max(blocks(edited), original) > 0.999
        assert B.procrustes_robust_score(blocks(edited), original) > 0.999
    other = blocks(T.from_model(build_model(arch, seed=1)))
    assert robust_max(other, original) < 0.3
    assert B.procrustes_robust_score(other, original) < 0.3


def test_dead_units_move_the_gate_gram_statistics():
    """Why the recommended statistics read only OV and UD: cancelling pairs change QK and the gate Gram."""
    ck = T.from_model(build_model("llama", seed=0))
    original, dead = blocks(ck), blocks(A.dead_units(ck.clone(), 1.0, 4.0, 11))
    stat = next(s for s in B.STATISTICS if s.name == "subspace")
    assert stat.score(stat.features(dead), stat.features(original), dead, original) < 0.5
