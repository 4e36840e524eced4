"""The retrieval signature: a unit vector whose dot products follow the lineage test's unit similarities."""

from __future__ import annotations

import numpy as np
import pytest

from tg_verify.analysis.lineage import ParsedSketch
from tg_verify.fingerprint.sketch import LAYER_ROLES, SYMMETRIC_ROLES
from tg_verify.index.signature import DIMS, parameters, signature_of


def _sketch(rng: np.random.Generator, layers: int = 6, k: int = 32, vocab: int = 4096,
            ids: np.ndarray | None = None) -> ParsedSketch:
    ids = np.sort(rng.choice(vocab, k, replace=False)) if ids is None else ids
    units = {}
    for role, layer in [("embed", None), ("head", None)] + [(r, n) for n in range(layers) for r in LAYER_ROLES]:
        m = rng.normal(size=(len(ids), len(ids))).astype(np.float32)
        units[(role, layer)] = (m + m.T) / 2 if role in SYMMETRIC_ROLES else m
    return ParsedSketch(seed=0, vocab=vocab, ids=ids, units=units)


def _similarity(a: ParsedSketch, b: ParsedSketch) -> float:
    x, y = signature_of(a), signature_of(b)
    assert x is not None and y is not None
    return float(x @ y)


def _restricted(sketch: ParsedSketch, keep: np.ndarray) -> ParsedSketch:
    return ParsedSketch(sketch.seed, sketch.vocab, sketch.ids[keep],
                        {key: m[np.ix_(keep, keep)] for key, m in sketch.units.items()})


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
    noisy = ParsedSketch(base.seed, base.vocab, base.ids,
                         {key: m + 0.5 * m.std() * rng.normal(size=m.shape).astype(np.float32)
                          for key, m in base.units.items()})
    dropped = ParsedSketch(base.seed, base.vocab, base.ids,
                           {key: m for key, m in base.units.items() if key[1] != 3})
    shared = _restricted(base, np.arange(4, 32))  # a probe that lost 4 tokens (another vocabulary size)
    independent = [_sketch(np.random.default_rng(100 + n)) for n in range(20)]
    assert _similarity(base, noisy) > 0.7
    assert _similarity(base, dropped) > 0.7  # a dropped layer moves weight between depth bins only
    assert _similarity(base, shared) > 0.6  # entries are keyed by token ids, not probe positions
    assert max(abs(_similarity(base, other)) for other in independent) < 0.25


def test_the_models_own_token_geometry_is_removed() -> None:
    rng = np.random.default_rng(2)
    a, b = _sketch(rng), _sketch(rng)
    shared = a.units[("embed", None)]
    plain = _similarity(a, b)
    # both models' units carry the same token geometry (as independently trained models' do): corrected away
    tinted = [ParsedSketch(s.seed, s.vocab, s.ids, {**{key: m + 3 * shared for key, m in s.units.items()},
                                                    ("embed", None): shared}) for s in (a, b)]
    assert abs(_similarity(*tinted) - plain) < 0.1


def test_a_sketch_without_units_has_no_signature() -> None:
    empty = ParsedSketch(seed=0, vocab=10, ids=np.arange(8), units={})
    only_embed = ParsedSketch(seed=0, vocab=10, ids=np.arange(8), units={("embed", None): np.eye(8, dtype=np.float32)})
    assert signature_of(empty) is None and signature_of(only_embed) is None


class _MixtureSketch:
    """A stand-in for a sketch whose probe is k seeded mixtures of embedding rows: no token ids, a seed, keys."""

    def __init__(self, units: dict, seed: int, keys: str = "strings") -> None:
        self.units, self.seed, self.keys = units, seed, keys
        self.mixtures = next(iter(units.values())).shape[0]


def test_a_probe_of_mixtures_aligns_by_position_only_under_the_same_seed_and_keys() -> None:
    rng = np.random.default_rng(3)
    units = _sketch(rng).units
    same = signature_of(_MixtureSketch(units, seed=0))  # type: ignore[arg-type]
    again = signature_of(_MixtureSketch(units, seed=0))  # type: ignore[arg-type]
    other_seed = signature_of(_MixtureSketch(units, seed=1))  # type: ignore[arg-type]
    other_keys = signature_of(_MixtureSketch(units, seed=0, keys="ids"))  # type: ignore[arg-type]
    assert same is not None and again is not None and other_seed is not None and other_keys is not None
    assert float(same @ again) == pytest.approx(1.0)
    assert abs(float(same @ other_seed)) < 0.25 and abs(float(same @ other_keys)) < 0.25  # other probes: unrelated
