"""The retrieval signature: a unit vector whose dot products follow the lineage test's unit similarities."""

from __future__ import annotations

import numpy as np
import pytest

from tg_verify.analysis.lineage import ParsedSketch
from tg_verify.fingerprint.sketch import LAYER_ROLES, SYMMETRIC_ROLES
from tg_verify.index.signature import DIMS, parameters, signature_of


def _sketch(rng: np.random.Generator, layers: int = 6, k: int = 32, vocab: int = 4096, seed: int = 0,
            keys: str = "strings") -> ParsedSketch:
    """A sketch of random units whose probe is k seeded mixtures (sketch formats tgs2 and later)."""
    units = {}
    for role, layer in [("embed", None), ("head", None)] + [(r, n) for n in range(layers) for r in LAYER_ROLES]:
        m = rng.normal(size=(k, k)).astype(np.float32)
        units[(role, layer)] = (m + m.T) / 2 if role in SYMMETRIC_ROLES else m
    return _with(units, seed=seed, keys=keys, vocab=vocab)


def _with(units: dict, seed: int = 0, keys: str = "strings", vocab: int = 4096) -> ParsedSketch:
    architecture = {"model_type": "llama", "hidden_size": 64, "layers": 6, "vocab": vocab, "heads": 4,
                    "kv_heads": 2, "intermediate_size": 128}
    return ParsedSketch(seed=seed, mixtures=next(iter(units.values())).shape[0] if units else 32, keys=keys,
                        keyed_rows=vocab, rows=vocab, key_sample=np.arange(min(vocab, 256), dtype=np.uint64),
                        architecture=architecture, units=units)


def _similarity(a: ParsedSketch, b: ParsedSketch) -> float:
    x, y = signature_of(a), signature_of(b)
    assert x is not None and y is not None
    return float(x @ y)


def test_signature_is_a_deterministic_unit_vector() -> None:
    sketch = _sketch(np.random.default_rng(0))
    first, again = signature_of(sketch), signature_of(sketch)
    assert first is not None and again is not None
    assert first.shape == (DIMS,) and first.dtype == np.float32
    assert np.array_equal(first, again) and np.linalg.norm(first) == pytest.approx(1.0, abs=1e-6)
    assert parameters()["dims"] == DIMS


def test_related_sketches_point_the_same_way_and_independent_ones_do_not() -> None:
    rng = np.random.default_rng(1)
    base = _sketch(rng)
    noisy = _with({key: m + 0.5 * m.std() * rng.normal(size=m.shape).astype(np.float32)
                   for key, m in base.units.items()})
    dropped = _with({key: m for key, m in base.units.items() if key[1] != 3})
    independent = [_sketch(np.random.default_rng(100 + n)) for n in range(20)]
    assert _similarity(base, noisy) > 0.7
    assert _similarity(base, dropped) > 0.7  # a dropped layer moves weight between depth bins only
    assert max(abs(_similarity(base, other)) for other in independent) < 0.25


def test_the_models_own_token_geometry_is_removed() -> None:
    rng = np.random.default_rng(2)
    a, b = _sketch(rng), _sketch(rng)
    shared = a.units[("embed", None)]
    plain = _similarity(a, b)
    # both models' units carry the same token geometry (as independently trained models' do): corrected away
    tinted = [_with({**{key: m + 3 * shared for key, m in s.units.items()}, ("embed", None): shared})
              for s in (a, b)]
    assert abs(_similarity(*tinted) - plain) < 0.1


def test_a_sketch_without_units_has_no_signature() -> None:
    empty = _with({}, vocab=10)
    only_embed = _with({("embed", None): np.eye(8, dtype=np.float32)}, vocab=10)
    assert signature_of(empty) is None and signature_of(only_embed) is None


def test_a_probe_of_mixtures_aligns_by_position_only_under_the_same_seed_and_keys() -> None:
    units = _sketch(np.random.default_rng(3)).units
    same, again = signature_of(_with(units, seed=0)), signature_of(_with(units, seed=0))
    other_seed = signature_of(_with(units, seed=1))
    other_keys = signature_of(_with(units, seed=0, keys="ids"))
    assert same is not None and again is not None and other_seed is not None and other_keys is not None
    assert float(same @ again) == pytest.approx(1.0)
    assert abs(float(same @ other_seed)) < 0.25 and abs(float(same @ other_keys)) < 0.25  # other probes: unrelated
