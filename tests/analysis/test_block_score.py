"""analysis/blocks.py and the either-evidence rule of the lineage test: the block score on trained tiny models (a
fine-tune and a re-initialised-then-repaired embedding detected, independently trained twins not), the thresholds
and rates of the rule on a paired null, and the block evidence as untrusted input."""

from __future__ import annotations

import base64
import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tg_verify.analysis.blocks import block_score, parse_blocks
from tg_verify.analysis.calibration import Calibration, NullSample, class_key
from tg_verify.analysis.lineage import LINEAGE_METHOD, lineage_test
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.fingerprint.sketch import SKETCH_VERSION
from tg_verify.tiny import ARCHITECTURES, one_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.lineage import tokenize, write_tokenizer  # noqa: E402
from bench.transforms import Checkpoint, from_model, redraw_rows  # noqa: E402
from bench.zoo import corpus, fine_tune  # noqa: E402


@pytest.fixture(scope="module")
def reinitialised(trained_zoo: Any) -> Checkpoint:
    """The fine-tune with every embedding row re-drawn (the tied head follows), then repaired by 40 steps of
    fine-tuning at the rate bench/evasion.py's supplier fine-tunes at (3e-4): the attack that takes the sketch to
    chance level at little cost in perplexity. (At 1e-3 after the heavy fine-tune, the blocks of this 150-step base
    lose it too: docs/lineage.md.)"""
    tokens = tokenize(corpus("heavy", 200_000), trained_zoo.table)
    attacked = redraw_rows(trained_zoo.fine_tuned, list(range(512)), seed=5)
    with one_thread():
        return from_model(fine_tune(attacked.model(), tokens, 40, 3e-4, 71, batch=8))


def blocks(fp: Fingerprint) -> Any:
    return parse_blocks(fp.blocks, fp.model_name)


def test_block_score_detects_derivation_and_not_independent_training(make: Callable[..., Fingerprint],
                                                                      trained_zoo: Any, reinitialised: Checkpoint
                                                                      ) -> None:
    base = blocks(make(trained_zoo.bases["llama"]))
    tuned = block_score(blocks(make(trained_zoo.fine_tuned)), base)
    attacked = block_score(blocks(make(reinitialised)), base)
    assert tuned.score is not None and attacked.score is not None and tuned.matched == [(0, 0), (1, 1)]
    twins = []
    for arch in ARCHITECTURES:
        twin = block_score(blocks(make(trained_zoo.twins[arch])), blocks(make(trained_zoo.bases[arch])))
        assert twin.score is not None
        twins.append(abs(twin.score))
    # the calibration null's 99th percentiles are 0.04-0.05 (docs/lineage.md); derivatives sit well above any twin
    assert max(twins) < 0.1 and min(tuned.score, attacked.score) > max(twins) + 0.3, (tuned, attacked, twins)


def test_the_packaged_calibration_calls_the_reinitialised_embedding_derived(
        make: Callable[..., Fingerprint], trained_zoo: Any, reinitialised: Checkpoint) -> None:
    """The attack the sketch alone misses (it scores it near chance) is derived on the block evidence; twins, with
    their tokenizers, are not derived on either."""
    tokenizer = lambda d: write_tokenizer(d, trained_zoo.table)  # noqa: E731
    base = make(trained_zoo.bases["llama"], tokenizer=tokenizer)
    result = lineage_test(make(reinitialised, tokenizer=tokenizer), base)
    assert result.evidence == "sketch+blocks" and result.calibrated
    assert result.score < result.threshold  # the sketch alone misses it
    assert result.block_score > result.block_threshold and result.derived, result.to_dict()
    for arch in ARCHITECTURES:
        twin = lineage_test(make(trained_zoo.twins[arch], tokenizer=tokenizer),
                            make(trained_zoo.bases[arch], tokenizer=tokenizer))
        assert twin.evidence == "sketch+blocks" and not twin.derived, (arch, twin.to_dict())


def paired(fp: Fingerprint, sketch: list[float], block: list[float]) -> Calibration:
    assert fp.sketch is not None
    key = class_key(fp.sketch["architecture"])
    null = NullSample(key, np.asarray(sketch, dtype=float), np.asarray(block, dtype=float))
    return Calibration(method=LINEAGE_METHOD, sketch_version=SKETCH_VERSION, recipe={}, classes={key: null},
                       source="test", blocks_version="tgb2")


def test_either_evidence_rule_splits_the_target_rate_and_states_the_rule_s_rate(
        make: Callable[..., Fingerprint], trained_zoo: Any) -> None:
    """With both evidences, each threshold is its null's level at alpha / 2 and the stated rates are the rule's
    on the paired null; with one, that one's at alpha."""
    base = make(trained_zoo.bases["llama"])
    twin = make(trained_zoo.twins["llama"])
    rng = np.random.default_rng(0)
    sketch, block = list(rng.uniform(-0.2, 0.2, 400)), list(rng.uniform(-0.1, 0.1, 400))
    calibration = paired(base, sketch, block)
    result = lineage_test(twin, base, alpha=0.05, calibration=calibration)
    null = calibration.classes[result.calibration]
    assert result.threshold == null.threshold(0.025) and result.block_threshold == null.blocks().threshold(0.025)  # type: ignore[union-attr]
    assert result.false_positive_rate == null.either_above(result.threshold, result.block_threshold) / 400
    assert result.rate == null.either_at_or_above(result.score, result.block_score) / 400
    assert result.p_value == pytest.approx((1 + result.rate * 400) / 401)
    assert result.derived == (result.score > result.threshold or result.block_score > result.block_threshold)
    # the null's level says derived: a null whose block scores all sit far below the twin's
    low = paired(base, sketch, [result.block_score - 1.0] * 400)
    assert lineage_test(twin, base, alpha=0.05, calibration=low).derived
    # one evidence only (the candidate has no block evidence): the sketch at the whole alpha
    alone = Fingerprint(model_name=twin.model_name, features=twin.features, settings=twin.settings, sketch=twin.sketch)
    single = lineage_test(alone, base, alpha=0.05, calibration=calibration)
    assert single.evidence == "sketch" and single.threshold == null.threshold(0.05)
    assert any("block evidence missing in the candidate" in n for n in single.notes)
    assert math.isnan(single.block_score) and single.rate == null.at_or_above(single.score) / 400


def test_a_calibration_without_block_scores_leaves_the_blocks_out(make: Callable[..., Fingerprint],
                                                                   trained_zoo: Any) -> None:
    base = make(trained_zoo.bases["llama"])
    key = class_key(base.sketch["architecture"])  # type: ignore[index]
    calibration = Calibration(method=LINEAGE_METHOD, sketch_version=SKETCH_VERSION, recipe={}, source="old.json",
                              classes={key: NullSample(key, np.linspace(-0.2, 0.2, 200))})
    result = lineage_test(base, base, calibration=calibration)
    assert result.evidence == "sketch" and result.derived
    assert any("old.json holds no block null for it: not used" in n for n in result.notes)


def _corrupt(fp: Fingerprint, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = copy.deepcopy(fp.blocks)
    assert document is not None
    change(document)
    return document


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(version="tgb0"), "blocks.version 'tgb0' is not supported"),
    (lambda b: b.update(rank=2), "blocks.rank must be an integer in \\[4, 64\\]"),
    (lambda b: b.update(rank=True), "blocks.rank must be an integer"),
    (lambda b: b.update(frame="\x1b[2J"), "blocks.frame must be a short printable string"),
    (lambda b: b.update(dtype="float32"), "blocks.dtype must be 'float16'"),
    (lambda b: b["architecture"].pop("vocab"), "blocks.architecture must be an object with exactly"),
    (lambda b: b["architecture"].update(layers="2"), "blocks.architecture.layers must be a non-negative integer"),
    (lambda b: b.update(units=[]), "blocks.units must be a non-empty list"),
    (lambda b: b["units"][0].update(extra=1), "blocks.units\\[0\\] must be an object with exactly"),
    (lambda b: b["units"][1].update(layer=0), "blocks.units\\[1\\].layer must be a non-negative integer above"),
    (lambda b: b["units"][0].update(attn_ov="not base64!"), "attn_ov is not valid base64"),
    (lambda b: b["units"][0].update(mlp_ud=base64.b64encode(b"\0" * 10).decode()), "mlp_ud holds 10 bytes"),
    (lambda b: b["units"][0].update(attn_ov=base64.b64encode(np.full(1024, np.nan, "<f2").tobytes()).decode()),
     "attn_ov holds non-finite values"),
])
def test_malformed_block_evidence_is_rejected_with_the_field(make: Callable[..., Fingerprint], trained_zoo: Any,
                                                             change: Callable[[dict[str, Any]], None],
                                                             message: str) -> None:
    fp = make(trained_zoo.bases["llama"])
    with pytest.raises(FingerprintFormatError, match=message):
        parse_blocks(_corrupt(fp, change), "fp.json")
    bad = Fingerprint(model_name="bad", features=fp.features, settings=fp.settings, sketch=fp.sketch,
                      blocks=_corrupt(fp, change))
    with pytest.raises(FingerprintFormatError, match=message):
        lineage_test(bad, fp)


def test_a_test_the_blocks_decided_alone_reads_in_every_verb(make: Callable[..., Fingerprint], trained_zoo: Any,
                                                            reinitialised: Checkpoint) -> None:
    """No sketch score (the candidate ships no tokenizer, the base's fingerprint has one): compare's line, classify's
    table and the verdict's text state the block score and never format a missing number."""
    from rich.console import Console

    from tg_verify.commands.classify import lineage_table
    from tg_verify.commands.compare import lineage_summary
    from tg_verify.pipeline import lineage_evidence
    from tg_verify.verdict import _lineage_text

    base = make(trained_zoo.bases["llama"], tokenizer=lambda d: write_tokenizer(d, trained_zoo.table))
    result = lineage_test(make(reinitialised), base)
    assert result.evidence == "blocks" and result.derived, result.to_dict()
    document = {**result.to_dict(), "reference": "base", "family": "llama"}
    assert document["score"] is None and document["block_score"] > document["block_threshold"]
    line = lineage_summary(document)
    assert f"— blocks {result.block_score:.3f} (threshold {result.block_threshold:.3f}), " in line
    console = Console(record=True, width=200)
    console.print(lineage_table([document]))
    assert f"{result.block_score:.3f}" in console.export_text()
    text = _lineage_text(lineage_evidence(result))
    assert text.startswith(f"sketch not comparable; blocks {result.block_score:.3f} vs {result.block_threshold:.3f}")
