"""The lineage calibration: exact bounds, the threshold rule, the file as untrusted input, the shipped file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from tg_verify.analysis.calibration import (
    CALIBRATION_FORMAT,
    NullSample,
    class_key,
    load_calibration,
    packaged_calibration,
    parse_calibration,
    upper_bound,
)
from tg_verify.analysis.lineage import LINEAGE_METHOD
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.blocks import BLOCKS_VERSION
from tg_verify.fingerprint.sketch import SKETCH_VERSION
from tg_verify.tiny import ARCHITECTURES

ARCH = {"model_type": "llama", "hidden_size": 64, "layers": 2, "vocab": 512, "heads": 4, "kv_heads": 2,
        "intermediate_size": 128}


def test_exact_upper_bounds() -> None:
    assert upper_bound(0, 216) == pytest.approx(1 - 0.05 ** (1 / 216))  # the "rule of three" case, exactly
    assert upper_bound(0, 10) == pytest.approx(1 - 0.05 ** 0.1)
    assert upper_bound(10, 10) == 1.0
    assert 0.1 < upper_bound(10, 100) < 0.17 and upper_bound(10, 100) > upper_bound(10, 1000)
    assert np.isnan(upper_bound(0, 0))


def test_threshold_allows_at_most_alpha_n_null_pairs_above() -> None:
    null = NullSample("x", np.arange(1000) / 1000.0)
    for alpha in (0.001, 0.01, 0.05, 0.2):
        threshold = null.threshold(alpha)
        assert null.above(threshold) <= alpha * 1000 < null.above(threshold) + 1 + 1e-9
    small = NullSample("y", np.array([0.1, 0.3, 0.2]))
    assert small.threshold(0.01) == 0.3 and small.above(0.3) == 0  # n < 1/alpha: the highest null score
    assert small.at_or_above(0.2) == 2


def test_either_evidence_rule_is_counted_on_the_pairs_as_they_are() -> None:
    """The rule "sketch above t or blocks above u" counts each null pair once, whichever evidence calls it; and a
    pair is as extreme as the observed one when its smaller tail share is at most the observed one's."""
    sketch = np.array([0.9, 0.1, 0.2, 0.3, 0.0])
    blocks = np.array([0.8, 0.7, 0.0, 0.1, 0.05])
    null = NullSample("z", sketch, blocks)
    assert null.either_above(0.5, 0.5) == 2  # pair 0 (both) and pair 1 (blocks alone)
    assert null.either_above(0.95, 0.75) == 1
    assert null.blocks() is not None and null.blocks().at_or_above(0.7) == 2  # type: ignore[union-attr]
    # observed (0.25, 0.75): tail shares 2 (sketch >= 0.25: 0.9, 0.3) and 1 (blocks >= 0.75: 0.8) -> 1;
    # null pairs' smaller tails: pair0 min(1,1)=1, pair1 min(4,2)=2, pair2 3/5 -> 3, pair3 min(2,3)=2, pair4 min(5,4)=4
    assert null.either_at_or_above(0.25, 0.75) == 1
    assert null.either_at_or_above(0.3, 0.0) == 3  # observed tail min(2, 5) = 2: pairs 0, 1, 3
    with pytest.raises(ValueError, match="no block scores"):
        NullSample("w", sketch).either_above(0.5, 0.5)


def document() -> dict:
    return {"format": CALIBRATION_FORMAT, "method": "tgl4", "sketch_version": "tgs3", "blocks_version": "tgb2",
            "recipe": {"seeds": [1]},
            "classes": [{"key": class_key(ARCH), "architecture": ARCH, "scores": [0.1, -0.05, 0.2],
                         "block_scores": [0.02, 0.07, -0.01]}]}


def test_a_valid_document_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(document()))
    calibration = load_calibration(path)
    assert calibration.null_for(ARCH) is not None and calibration.null_for({**ARCH, "layers": 3}) is None
    assert calibration.conservative_threshold(0.01) == 0.2
    assert calibration.conservative_threshold(0.01, blocks=True) == 0.07
    assert calibration.scope == ""  # no recipe.scope: nothing said about which models the null covers
    scoped = document()
    scoped["recipe"]["scope"] = "null: models trained 150-1200 steps"
    assert parse_calibration(scoped, "c.json").scope == "null: models trained 150-1200 steps"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format=1), "format 1 is not supported"),
    (lambda d: d.update(method=3), "'method', 'sketch_version' and 'blocks_version' must be strings"),
    (lambda d: d.pop("blocks_version"), "'blocks_version' must be strings"),
    (lambda d: d["classes"][0].pop("block_scores"), "block_scores must be a list"),
    (lambda d: d["classes"][0].update(block_scores=[0.1, 0.2]), "one per score \\(3\\)"),
    (lambda d: d["classes"][0].update(block_scores=[0.1, 0.2, float("inf")]), "block_scores must be a list"),
    (lambda d: d.update(recipe=[]), "'recipe' must be an object"),
    (lambda d: d.update(classes=[]), "'classes' must be a non-empty list"),
    (lambda d: d["classes"][0].update(key="other"), "does not match its architecture"),
    (lambda d: d["classes"][0].update(scores=[0.1, float("nan")]), "finite numbers in \\[-1, 1\\]"),
    (lambda d: d["classes"][0].update(scores=[2.0]), "finite numbers in \\[-1, 1\\]"),
    (lambda d: d["classes"][0].update(scores=[True]), "finite numbers"),
    (lambda d: d["classes"].append(copy.deepcopy(d["classes"][0])), "repeats class"),
    (lambda d: d["classes"][0].update(architecture=None), "architecture must be an object"),
    (lambda d: d["recipe"].update(scope=["a"]), "recipe.scope must be a printable string"),
    (lambda d: d["recipe"].update(scope="\x1b]8;;evil\x07"), "recipe.scope must be a printable string"),
    (lambda d: d["recipe"].update(scope="x" * 401), "recipe.scope must be a printable string"),
])
def test_malformed_calibrations_name_the_field(change, message: str) -> None:  # type: ignore[no-untyped-def]
    doc = document()
    change(doc)
    with pytest.raises(FingerprintFormatError, match=message):
        parse_calibration(doc, "c.json")


def test_the_shipped_calibration_matches_this_method_and_covers_the_tiny_models() -> None:
    calibration = packaged_calibration()
    assert calibration.method == LINEAGE_METHOD and calibration.sketch_version == SKETCH_VERSION
    assert calibration.blocks_version == BLOCKS_VERSION
    assert calibration.recipe["digest"] and calibration.source.endswith("lineage_calibration.json")
    covered = {(key.split(":")[0], key.split(":")[1]) for key in calibration.classes}
    assert covered == {(arch, width) for arch in ARCHITECTURES for width in ("h64", "h96")}  # tiny small, medium
    for null in calibration.classes.values():
        assert null.size >= 1000  # enough pairs that a 1% target is a quantile, not the maximum alone
        assert null.block_scores is not None and len(null.block_scores) == null.size


def test_the_tiny_demo_shapes_are_calibrated() -> None:
    """The demo's llama and the test fixtures' shapes (tg_verify/tiny.py) get a calibrated rate, not 'uncalibrated'."""
    from tg_verify.fingerprint.sketch import architecture_of
    from tg_verify.tiny import tiny_config

    for size in ("small", "medium"):
        config = tiny_config("llama", size).to_dict()
        architecture = architecture_of(config, config["hidden_size"], config["num_hidden_layers"], 512)
        assert packaged_calibration().null_for(architecture) is not None, size
