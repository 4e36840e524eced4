"""The lineage test on trained tiny models (tests/conftest.py's trained_zoo): a fine-tune and its derivatives and
attacked derivatives detected, independently trained models not, at the shipped calibration's threshold; the
calibrated rates' arithmetic on synthetic nulls; "uncalibrated" outside the calibration; honest "not comparable"."""

from __future__ import annotations

import base64
import copy
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tg_verify.analysis.calibration import UNCALIBRATED, Calibration, NullSample, class_key, upper_bound
from tg_verify.analysis.lineage import LINEAGE_METHOD, LineageResult, lineage_test, parse_sketch, unit_similarities
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.fingerprint.sketch import SKETCH_VERSION, probe_ids, sketch_units
from tg_verify.tiny import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.lineage import write_tokenizer  # noqa: E402
from bench.transforms import (  # noqa: E402
    Checkpoint,
    average,
    drop_layer,
    duplicate_layer,
    extend_vocab,
    from_model,
    redraw_rows,
    relabel,
    same_function_relabelled,
    sketch_fingerprint_of,
)
from bench.zoo import cast, int8_roundtrip  # noqa: E402


@pytest.fixture(scope="module")
def base_ck(trained_zoo: Any) -> Checkpoint:
    """A trained llama (small: a class the shipped calibration holds)."""
    return trained_zoo.bases["llama"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tuned_ck(trained_zoo: Any) -> Checkpoint:
    """base_ck fine-tuned on text it never saw."""
    return trained_zoo.fine_tuned  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def twin_ck(trained_zoo: Any) -> Checkpoint:
    """A llama of base_ck's config trained on the same text from another seed: unrelated to it."""
    return trained_zoo.twins["llama"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def base(make: Callable[..., Fingerprint], base_ck: Checkpoint) -> Fingerprint:
    return make(base_ck)


def calibration_for(fp: Fingerprint, scores: list[float]) -> Calibration:
    """A calibration whose only class is `fp`'s architecture, with the given null scores."""
    assert fp.sketch is not None
    key = class_key(fp.sketch["architecture"])
    return Calibration(method=LINEAGE_METHOD, sketch_version=SKETCH_VERSION, recipe={},
                       classes={key: NullSample(key, np.asarray(scores, dtype=float))}, source="test")


NULL = [0.02 * i for i in range(-10, 11)] * 10  # 210 scores in [-0.2, 0.2]


def test_identical_is_derived_with_a_calibrated_threshold_and_rate(base: Fingerprint) -> None:
    result = lineage_test(base, base, calibration=calibration_for(base, NULL))
    assert result.derived and result.comparable and result.score == pytest.approx(1.0, abs=1e-3)
    assert result.calibration == class_key(base.sketch["architecture"]) and result.null_size == 210  # type: ignore[index]
    # alpha 0.01 of 210: at most 2 null scores above the threshold, i.e. the third highest (0.2, ten times)
    assert result.threshold == pytest.approx(0.2) and result.false_positive_rate == 0.0
    assert result.rate == 0.0 and result.rate_upper == pytest.approx(upper_bound(0, 210))
    assert result.p_value == pytest.approx(1 / 211)
    assert {u.role for u in result.units} == {"head", "attn_qk", "attn_ov", "mlp_gate", "mlp_ud"}
    assert all(u.candidate_layer == u.reference_layer for u in result.units)
    assert "0/210 unrelated pairs score as high" in result.rate_text()


def test_rate_at_the_observed_score_is_the_share_of_the_null_at_or_above_it(
        make: Callable[..., Fingerprint], twin_ck: Checkpoint, base: Fingerprint) -> None:
    candidate = make(twin_ck)
    score = lineage_test(candidate, base, calibration=calibration_for(base, NULL)).score
    null = [score - 0.1] * 90 + [score] * 6 + [score + 0.1] * 4  # 10 of 100 at or above the score
    result = lineage_test(candidate, base, calibration=calibration_for(base, null))
    assert result.rate == pytest.approx(0.10) and result.null_size == 100
    assert result.rate_upper == pytest.approx(upper_bound(10, 100)) and 0.15 < result.rate_upper < 0.17
    assert result.p_value == pytest.approx(11 / 101)
    assert result.threshold == pytest.approx(score + 0.1) and not result.derived  # 4 > 1% of 100 above: stricter
    loose = lineage_test(candidate, base, alpha=0.2, calibration=calibration_for(base, null))
    assert loose.threshold == pytest.approx(score - 0.1) and loose.derived  # 10 above it, 20 allowed
    assert loose.false_positive_rate == pytest.approx(0.10)


def test_min_score_raises_the_threshold(base: Fingerprint) -> None:
    result = lineage_test(base, base, min_score=0.9, calibration=calibration_for(base, NULL))
    assert result.threshold == 0.9 and result.derived
    assert lineage_test(base, base, min_score=1.0, calibration=calibration_for(base, NULL)).derived is False


def test_uncalibrated_architecture_says_so_and_takes_the_strictest_threshold(make: Callable[..., Fingerprint],
                                                                             base: Fingerprint) -> None:
    other = make(from_model(build_model("llama", seed=1, num_hidden_layers=4)))
    classes = {"a": NullSample("a", np.full(100, 0.3)), "b": NullSample("b", np.full(100, 0.1))}
    calibration = Calibration(method=LINEAGE_METHOD, sketch_version=SKETCH_VERSION, recipe={}, source="test",
                              classes=classes)
    result = lineage_test(other, base, calibration=calibration)
    assert result.calibration == UNCALIBRATED and not result.calibrated and result.threshold == 0.3
    assert math.isnan(result.rate) and math.isnan(result.p_value) and result.null_size == 0
    assert any(n.startswith("uncalibrated: no null measured for llama:h64:l2") for n in result.notes)
    assert result.rate_text().startswith("uncalibrated")
    assert json.dumps(result.to_dict(), allow_nan=False)


def test_a_calibration_of_another_method_is_not_used(base: Fingerprint) -> None:
    calibration = calibration_for(base, NULL)
    stale = Calibration(method="tgl1", sketch_version=SKETCH_VERSION, recipe={}, classes=calibration.classes,
                        source="old.json")
    result = lineage_test(base, base, calibration=stale)
    assert result.calibration == UNCALIBRATED and any("method 'tgl1'" in n for n in result.notes)


def test_the_packaged_calibration_is_used_by_default(base: Fingerprint) -> None:
    result = lineage_test(base, base)
    assert result.comparable and result.method == LINEAGE_METHOD
    assert result.calibrated == (result.null_size > 0)


# each applied to the fine-tune (tuned_ck), the base at hand (base_ck)
DERIVATIONS: dict[str, Callable[[Checkpoint, Checkpoint], Checkpoint]] = {
    "fine-tune": lambda ck, base: ck,
    "int8": lambda ck, base: from_model(int8_roundtrip(ck.model())),
    "bf16": lambda ck, base: from_model(cast(ck.model(), torch.bfloat16)),
    "fp16": lambda ck, base: from_model(cast(ck.model(), torch.float16)),
    "vocab+64": lambda ck, base: extend_vocab(ck, 64, 1),
    "drop-layer": lambda ck, base: drop_layer(ck, 1),
    "duplicate-layer": lambda ck, base: duplicate_layer(ck, 1),
    "merged-with-base": lambda ck, base: average(ck, base),
    # attacks on the evidence: tgs1's public probe rows re-drawn, and a tenth of every row
    "tgs1-probe-rows-redrawn": lambda ck, base: redraw_rows(ck, probe_ids(512, 32, 0).tolist(), 6),
    "tenth-of-rows-redrawn": lambda ck, base: redraw_rows(ck, list(range(3, 512, 10)), 7),
}


@pytest.mark.parametrize("name", DERIVATIONS)
def test_derivations_and_row_attacks_are_detected(name: str, make: Callable[..., Fingerprint], base_ck: Checkpoint,
                                                  tuned_ck: Checkpoint, base: Fingerprint) -> None:
    """At the shipped calibration's threshold (its fallback while it holds no null for this method)."""
    result = lineage_test(make(DERIVATIONS[name](tuned_ck, base_ck), "shards"), base)
    assert result.derived, result.to_dict()
    if name == "drop-layer":
        assert "reference layers without a match in the candidate: [1]" in result.notes
    if name == "duplicate-layer":
        assert any(n.startswith("candidate layers without a match") for n in result.notes)
    if name == "vocab+64":
        assert any(n.startswith("vocabularies differ (576 vs 512 keyed tokens)") for n in result.notes)


def test_tgs1_probe_rows_redrawn_cost_little(make: Callable[..., Fingerprint], base_ck: Checkpoint,
                                             base: Fingerprint) -> None:
    """The attack that took tgs1's score from 1.00 to 0.01 now moves it a little."""
    attacked = make(redraw_rows(base_ck, probe_ids(512, 32, 0).tolist(), 6))
    assert lineage_test(attacked, base).score > 0.8


def test_relabelled_vocabulary_with_its_tokenizer_is_derived(make: Callable[..., Fingerprint], base_ck: Checkpoint,
                                                            tuned_ck: Checkpoint, trained_zoo: Any) -> None:
    table = trained_zoo.table
    order = torch.randperm(512, generator=torch.Generator().manual_seed(9))
    relabelled = relabel(tuned_ck, order)
    same_function_relabelled(tuned_ck, relabelled, order)  # same text, same probabilities
    base = make(base_ck, tokenizer=lambda d: write_tokenizer(d, table))
    candidate = make(relabelled, tokenizer=lambda d: write_tokenizer(d, table, order=order.numpy()))
    plain = lineage_test(make(tuned_ck, tokenizer=lambda d: write_tokenizer(d, table)), base)
    result = lineage_test(candidate, base)
    assert result.derived and result.keys == "strings", result.to_dict()
    assert result.score == pytest.approx(plain.score, abs=0.02)  # relabelling moves nothing
    # the relabelled weights shipped without their tokenizer cannot be keyed like the base: the sketch is not
    # comparable, and the block evidence, which reads no token, decides alone
    bare = make(relabelled)
    blocks_only = lineage_test(bare, base)
    assert any("keys tokens by token ids (no tokenizer beside the weights)" in n for n in blocks_only.notes)
    assert math.isnan(blocks_only.score) and blocks_only.evidence == "blocks"
    assert blocks_only.comparable and blocks_only.derived, blocks_only.to_dict()


def test_independently_trained_models_are_not_derived(make: Callable[..., Fingerprint], trained_zoo: Any) -> None:
    """Twins (same config and text, another seed) through the extractor, keyed by their tokenizer, in both
    directions; tests/analysis/test_evasion.py checks every architecture's twin from the sketch alone."""
    tokenizer = lambda d: write_tokenizer(d, trained_zoo.table)  # noqa: E731
    for arch in ("llama", "qwen2"):
        a = make(trained_zoo.bases[arch], tokenizer=tokenizer)
        b = make(trained_zoo.twins[arch], tokenizer=tokenizer)
        for result in (lineage_test(a, b), lineage_test(b, a)):
            assert result.comparable and result.keys == "strings" and not result.derived, (arch, result.to_dict())


def _with_sketch(fp: Fingerprint, sketch: dict | None) -> Fingerprint:
    return Fingerprint(model_name=fp.model_name, features=fp.features, settings=fp.settings, sketch=sketch)


def test_missing_sketch_is_not_comparable(base: Fingerprint) -> None:
    result = lineage_test(_with_sketch(base, None), base)
    assert not result.comparable and not result.derived and "sketch missing in the candidate" in result.notes[0]
    assert json.dumps(result.to_dict(), allow_nan=False)
    assert result.rate_text() == "not comparable"


def test_other_probe_seed_is_not_comparable(base: Fingerprint) -> None:
    sketch = copy.deepcopy(base.sketch)
    sketch["probe"]["seed"] = 7
    result = lineage_test(_with_sketch(base, sketch), base)
    assert not result.comparable and any("probes differ" in n for n in result.notes)


def test_another_vocabulary_is_not_comparable(make: Callable[..., Fingerprint], base: Fingerprint) -> None:
    big = make(from_model(build_model("llama", seed=0, vocab_size=70_000)))
    result = lineage_test(big, base)
    assert not result.derived and math.isnan(result.score) and result.evidence == "blocks"  # the blocks still read
    assert result.notes[0].startswith("vocabularies differ (70000 vs 512 keyed tokens)")
    assert any(n.startswith("not comparable: about") for n in result.notes)


def _corrupt(base: Fingerprint, change: Callable[[dict], None]) -> Fingerprint:
    sketch = copy.deepcopy(base.sketch)
    change(sketch)
    return _with_sketch(base, sketch)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(version="tgs1"), "older tg-verify .* re-fingerprint"),
    (lambda s: s.update(version="tgs2"), "older tg-verify .* re-fingerprint"),
    (lambda s: s.update(version="zz"), "sketch.version 'zz' is not supported"),
    (lambda s: s["probe"].update(keys="bytes"), "probe.keys must be one of"),
    (lambda s: s["probe"].update(mixtures=4), "probe.mixtures must be an integer"),
    (lambda s: s["probe"].update(keyed_rows=10**6), "keyed_rows at most rows"),
    (lambda s: s["probe"].update(key_sample="!!"), "key_sample must be base64"),
    (lambda s: s["probe"].update(key_sample=base64.b64encode(np.arange(256, 0, -1, dtype="<u8").tobytes()).decode()),
     "distinct keys in ascending order"),
    (lambda s: s["architecture"].pop("vocab"), "sketch.architecture must be an object with exactly"),
    (lambda s: s["architecture"].update(layers=-1), "architecture.layers must be a non-negative integer"),
    (lambda s: s["units"][0].update(role="mystery"), "role 'mystery' is unknown"),
    (lambda s: s["units"][2].update(layer=None), "layer must be a non-negative integer"),
    (lambda s: s["units"][0].update(data="not base64!"), "not valid base64"),
    (lambda s: s["units"][0].update(data=base64.b64encode(b"\0" * 10).decode()), "expected 2048"),
    (lambda s: s["units"][0].update(data=base64.b64encode(np.full(1024, np.inf, "<f2").tobytes()).decode()),
     "non-finite"),
    (lambda s: s["units"].append(dict(s["units"][0])), "repeats role"),
])
def test_malformed_sketches_are_rejected_with_the_field(base: Fingerprint, change: Callable[[dict], None],
                                                       message: str) -> None:
    with pytest.raises(FingerprintFormatError, match=message):
        lineage_test(_corrupt(base, change), base)
    parse_sketch(base.sketch, "ok")  # the original is untouched and valid


def test_result_is_deterministic_and_json_safe(make: Callable[..., Fingerprint], tuned_ck: Checkpoint,
                                               base: Fingerprint) -> None:
    candidate = make(tuned_ck)
    first, second = lineage_test(candidate, base), lineage_test(candidate, base)
    assert first == second and isinstance(first, LineageResult)
    document = json.loads(json.dumps(first.to_dict(), allow_nan=False))
    assert document["derived"] is True and len(document["units"]) == len(first.units)
    assert set(document) >= {"score", "threshold", "p_value", "false_positive_rate", "derived", "units", "notes",
                             "calibration", "null_size", "rate", "rate_upper", "method", "keys"}


def test_bad_arguments_raise(base: Fingerprint) -> None:
    with pytest.raises(ValueError, match="alpha"):
        lineage_test(base, base, alpha=0)


def test_shared_token_geometry_alone_is_not_lineage(make: Callable[..., Fingerprint], base_ck: Checkpoint,
                                                    twin_ck: Checkpoint, base: Fingerprint) -> None:
    """An independently trained model given the base's token geometry (its trained embedding, rotated) is not
    derived: every unit is corrected for the model's own geometry at both ends, and the embed unit is not scored."""
    other = twin_ck.clone()
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    other.state["model.embed_tokens.weight"] = base_ck.state["model.embed_tokens.weight"] @ rotation
    result = lineage_test(make(other), base)
    assert not result.derived, result.to_dict()


def test_unit_similarities_on_live_units_match_the_test(base_ck: Checkpoint, tuned_ck: Checkpoint,
                                                        base: Fingerprint, tmp_path: Path) -> None:
    """The differentiable per-unit similarity an adaptive attacker pushes equals the test's on the same units."""
    tuned = tuned_ck
    model = tuned.model()
    live = sketch_units(dict(model.named_parameters()), model.config.to_dict())
    reference = sketch_units(dict(base_ck.model().named_parameters()), base_ck.config.to_dict())
    sims = unit_similarities(live, reference)
    recorded = lineage_test(sketch_fingerprint_of(tuned, tmp_path / "m"), base, calibration=calibration_for(base, NULL))
    assert recorded.units and all(u.candidate_layer == u.reference_layer for u in recorded.units)
    for unit in recorded.units:
        key = (unit.role, unit.candidate_layer)
        assert float(sims[key].detach()) == pytest.approx(unit.similarity, abs=5e-3), key
    sum(sims.values()).backward()  # type: ignore[union-attr]
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
