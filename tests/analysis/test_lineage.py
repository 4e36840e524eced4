"""The lineage test: derivatives detected, unrelated models not, calibrated null, honest 'not comparable'."""

from __future__ import annotations

import base64
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tg_verify.analysis.lineage import LineageResult, lineage_test, parse_sketch
from tg_verify.errors import FingerprintFormatError
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.tiny import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.transforms import Checkpoint, average, drop_layer, duplicate_layer, extend_vocab, fingerprint_of, from_model  # noqa: E402
from bench.zoo import cast, int8_roundtrip  # noqa: E402

FAST = {"permutations": 199}


def perturbed(ck: Checkpoint, fraction: float, seed: int) -> Checkpoint:
    """Every tensor moved by `fraction` of its own spread: a stand-in for a fine-tune's update."""
    out, g = ck.clone(), torch.Generator().manual_seed(seed)
    for key, value in out.state.items():
        out.state[key] = value + fraction * value.std() * torch.randn(value.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Fingerprint]:
    root = tmp_path_factory.mktemp("lineage")
    counter = iter(range(10_000))

    def build(ck: Checkpoint, layout: str = "single") -> Fingerprint:
        return fingerprint_of(ck, root / f"m{next(counter)}", layout)
    return build


@pytest.fixture(scope="module")
def base_ck() -> Checkpoint:
    return from_model(build_model("llama", seed=0, size="medium"))


@pytest.fixture(scope="module")
def base(make: Callable[..., Fingerprint], base_ck: Checkpoint) -> Fingerprint:
    return make(base_ck)


def test_identical_is_derived_with_a_stated_threshold_and_rate(base: Fingerprint) -> None:
    result = lineage_test(base, base)
    assert result.derived and result.comparable and result.score == pytest.approx(1.0, abs=1e-3)
    assert result.p_value == pytest.approx(1 / 1000) and result.permutations == 999
    assert result.threshold >= result.min_score == 0.5
    assert 1 / 1000 <= result.false_positive_rate <= result.alpha
    assert {u.role for u in result.units} == {"embed", "head", "attn_qk", "attn_ov", "mlp_gate", "mlp_ud"}
    assert all(u.candidate_layer == u.reference_layer for u in result.units)


DERIVATIONS: dict[str, Callable[[Checkpoint], Checkpoint]] = {
    "int8": lambda ck: from_model(int8_roundtrip(ck.model())),
    "bf16": lambda ck: from_model(cast(ck.model(), torch.bfloat16)),
    "fp16": lambda ck: from_model(cast(ck.model(), torch.float16)),
    "perturbed-20%": lambda ck: perturbed(ck, 0.2, 1),
    "vocab+64": lambda ck: extend_vocab(ck, 64, 1),
    "drop-layer": lambda ck: drop_layer(ck, 1),
    "duplicate-layer": lambda ck: duplicate_layer(ck, 1),
    "average": lambda ck: average(perturbed(ck, 0.2, 2), perturbed(ck, 0.2, 3)),
}


@pytest.mark.parametrize("name", DERIVATIONS)
def test_derivations_are_detected(name: str, make: Callable[..., Fingerprint], base_ck: Checkpoint,
                                  base: Fingerprint) -> None:
    result = lineage_test(make(DERIVATIONS[name](base_ck), "shards"), base, **FAST)
    assert result.derived, result.to_dict()
    if name == "drop-layer":
        assert "reference layers without a match in the candidate: [1]" in result.notes
    if name == "duplicate-layer":
        assert any(n.startswith("candidate layers without a match") for n in result.notes)
    if name == "vocab+64":
        assert any(n.startswith("probe tokens differ (vocab 576 vs 512)") for n in result.notes)


def test_unrelated_models_are_not_derived_and_their_p_values_spread(make: Callable[..., Fingerprint]) -> None:
    """Null calibration: independent models have no token-level correspondence, so p is ~uniform."""
    fingerprints = [make(from_model(build_model(arch, seed=seed))) for seed in (11, 12, 13)
                    for arch in ("llama", "qwen2", "mistral")]
    results = [lineage_test(a, b, **FAST) for a, b in zip(fingerprints[:-3], fingerprints[3:])]
    results += [lineage_test(a, b, **FAST) for a, b in zip(fingerprints[:-6], fingerprints[6:])]
    p_values = np.array([r.p_value for r in results])
    assert not any(r.derived for r in results)
    assert all(abs(r.score) < 0.3 for r in results)
    assert np.median(p_values) > 0.15 and np.mean(p_values <= 0.05) <= 0.35, p_values


def test_effect_size_floor_blocks_a_significant_but_weak_match(make: Callable[..., Fingerprint],
                                                               base_ck: Checkpoint, base: Fingerprint) -> None:
    candidate = make(perturbed(base_ck, 1.0, 4))
    loose = lineage_test(candidate, base, min_score=0.0, **FAST)
    strict = lineage_test(candidate, base, min_score=0.95, **FAST)
    assert loose.p_value <= 0.01 and loose.derived
    assert strict.p_value == loose.p_value and strict.threshold == 0.95 and not strict.derived


def _with_sketch(fp: Fingerprint, sketch: dict | None) -> Fingerprint:
    return Fingerprint(model_name=fp.model_name, features=fp.features, settings=fp.settings, sketch=sketch)


def test_missing_sketch_is_not_comparable(base: Fingerprint) -> None:
    result = lineage_test(_with_sketch(base, None), base)
    assert not result.comparable and not result.derived and "sketch missing in the candidate" in result.notes[0]
    assert json.dumps(result.to_dict(), allow_nan=False)


def test_other_probe_seed_is_not_comparable(base: Fingerprint) -> None:
    sketch = copy.deepcopy(base.sketch)
    sketch["probe"]["seed"] = 7
    result = lineage_test(_with_sketch(base, sketch), base)
    assert not result.comparable and "probe seeds differ" in result.notes[-1]


def test_another_vocabulary_is_not_comparable(make: Callable[..., Fingerprint], base: Fingerprint) -> None:
    big = make(from_model(build_model("llama", seed=0, size="medium", vocab_size=70_000)))
    result = lineage_test(big, base)
    assert not result.comparable and not result.derived
    assert result.notes[0].startswith("probe tokens differ (vocab 70000 vs 512)")
    assert "not comparable" in result.notes[-1]


def _corrupt(base: Fingerprint, change: Callable[[dict], None]) -> Fingerprint:
    sketch = copy.deepcopy(base.sketch)
    change(sketch)
    return _with_sketch(base, sketch)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(version="tgs0"), "sketch.version"),
    (lambda s: s["probe"].update(ids=s["probe"]["ids"][::-1]), "ascending"),
    (lambda s: s["probe"].update(ids=[*s["probe"]["ids"][:-1], 10**6]), "below vocab"),
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


def test_result_is_deterministic_and_json_safe(make: Callable[..., Fingerprint], base_ck: Checkpoint,
                                               base: Fingerprint) -> None:
    candidate = make(perturbed(base_ck, 0.3, 5))
    first, second = lineage_test(candidate, base), lineage_test(candidate, base)
    assert first == second and isinstance(first, LineageResult)
    document = json.loads(json.dumps(first.to_dict(), allow_nan=False))
    assert document["derived"] is True and len(document["units"]) == len(first.units)
    assert set(document) >= {"score", "threshold", "p_value", "false_positive_rate", "derived", "units", "notes"}


def test_bad_arguments_raise(base: Fingerprint) -> None:
    with pytest.raises(ValueError, match="alpha"):
        lineage_test(base, base, alpha=0)
    with pytest.raises(ValueError, match="permutations"):
        lineage_test(base, base, permutations=0)


def test_shared_token_geometry_alone_is_not_lineage(make: Callable[..., Fingerprint], base_ck: Checkpoint,
                                                    base: Fingerprint) -> None:
    """An independent model given the base's token geometry (its embedding, rotated) is not derived:
    every unit is corrected for the model's own geometry, and the embed unit is reported, not scored."""
    other = from_model(build_model("llama", seed=77, size="medium"))
    rotation, _ = torch.linalg.qr(torch.randn(96, 96, generator=torch.Generator().manual_seed(0)))
    other.state["model.embed_tokens.weight"] = base_ck.state["model.embed_tokens.weight"] @ rotation
    result = lineage_test(make(other), base, **FAST)
    assert next(u.similarity for u in result.units if u.role == "embed") > 0.99
    # uncorrected, the random head and gate Grams mirror the shared geometry (similarity about 0.7 to 1)
    assert all(abs(u.similarity) < 0.3 for u in result.units if u.role != "embed"), result.to_dict()
    assert not result.derived and abs(result.score) < 0.2
