"""The population scale: shipped data, how it is measured, where it applies, attribution on real fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tg_verify.analysis.attribution import ClassifierSettings, classify
from tg_verify.analysis.population import (
    DATA_FILE,
    MAD_TO_SD,
    POPULATION_FEATURES,
    PopulationModel,
    fit_population,
    from_document,
    load_population,
    population_for,
    to_document,
)
from tg_verify.analysis.references import build_references, load_fingerprints, read_labels
from tg_verify.errors import InputError, UsageError
from tg_verify.fingerprint.document import FEATURE_VERSION, LEGACY_FEATURE_VERSION, load

REAL = Path(__file__).resolve().parents[1] / "data" / "tensorguard-release"


@pytest.fixture(scope="module")
def bases():
    references, _ = build_references(load_fingerprints([REAL / "bases"]), read_labels(REAL / "bases.yaml"))
    return references


def derivative(name: str):
    return load(REAL / "derivatives" / f"{name}_features.json")


def test_shipped_scale_is_measured_on_real_models_and_says_where_it_comes_from():
    scale = load_population()
    assert scale.features == POPULATION_FEATURES and "num_layers" not in scale.features
    assert set(scale.applies_to) == {LEGACY_FEATURE_VERSION, FEATURE_VERSION}
    assert scale.models == 32 and scale.derivatives == 24
    assert np.all(scale.spread > 0) and np.all(scale.lineage_spread > 0) and np.all(scale.high > scale.low)
    files = scale.provenance["files"]
    assert len(files) == 32 and all(len(f["sha256"]) == 64 for f in files)
    assert "dd18d1e" in scale.provenance["source"] and "bench/attribution.py" in scale.provenance["generated_by"]
    assert FEATURE_VERSION in scale.notes  # how native fingerprints are scaled is stated in the data
    for path in (REAL / "bases").glob("*.json"):  # the test data are files the scale was measured on
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert {"name": path.name, "sha256": digest} in files


def test_fit_measures_the_population_spread_and_the_lineage_spread():
    rng = np.random.default_rng(0)
    models = []
    for k, family in enumerate(("a", "b", "c")):
        centre = rng.normal(0, 1, 3) * 10
        models.append(PopulationModel(id=f"{family}-base", family=family, base=True, vector=tuple(centre)))
        for j in range(3):
            models.append(PopulationModel(id=f"{family}-{j}", family=family, base=False,
                                          vector=tuple(centre + rng.normal(0, 0.1 * (k + 1), 3))))
    features = POPULATION_FEATURES[:3]
    scale = fit_population(models, name="t", applies_to=["x"], features=features)
    matrix = np.array([m.vector for m in models])
    np.testing.assert_allclose(scale.spread, matrix.std(axis=0))
    by_id = {m.id: np.array(m.vector) for m in models}
    moves = np.array([by_id[m.id] - by_id[f"{m.family}-base"] for m in models if not m.base])
    np.testing.assert_allclose(scale.lineage_spread, MAD_TO_SD * np.median(np.abs(moves), axis=0))
    round_trip = from_document(json.loads(json.dumps(to_document(scale))), "doc")
    np.testing.assert_allclose(round_trip.lineage_spread, scale.lineage_spread)


def test_a_derivative_without_a_parent_is_measured_from_the_nearest_base_of_its_family():
    models = [PopulationModel("a1", "a", True, (0.0, 0.0)), PopulationModel("a2", "a", True, (10.0, 10.0)),
              PopulationModel("b1", "b", True, (9.0, 9.0)),
              PopulationModel("d", "a", False, (9.5, 9.0)),  # nearer b1, but b1 is not of its family
              PopulationModel("e", "a", False, (1.0, 0.0), parent="a2")]  # a labelled parent wins
    scale = fit_population(models, name="t", applies_to=["x"], features=POPULATION_FEATURES[:2])
    moves = np.abs(np.array([[9.5 - 10, 9.0 - 10], [1.0 - 10, 0.0 - 10]]))
    np.testing.assert_allclose(scale.lineage_spread, MAD_TO_SD * np.median(moves, axis=0))


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(schema="x"), "not a tg-verify population document"),
    (lambda d: d["spread"].pop("global_std"), "spread: expected a number for each"),
    (lambda d: d["lineage_spread"].update(global_std=0.0), "lineage_spread.global_std: expected a finite positive"),
    (lambda d: d["features"].append("num_layers"), "not population features: num_layers"),
    (lambda d: d.update(models=True), "models: expected a positive integer"),
])
def test_a_broken_population_document_is_refused(change, message):
    document = json.loads(DATA_FILE.read_text())
    change(document)
    with pytest.raises(InputError, match=message):
        from_document(document, "pop.json")


def test_it_applies_only_to_references_inside_the_real_models_span(bases, make_fp):
    assert population_for([r.fingerprint for r in bases]).scale is not None
    tiny = bases[0].fingerprint.features.copy()
    tiny["global_norm"] = 8.6  # a toy model's input widths
    toy = make_fp("toy", np.array([tiny[n] for n in tiny]))
    fit = population_for([toy])
    assert fit.scale is None and "reference toy lies outside the real models" in fit.reason
    assert "global_norm = 8.6" in fit.reason
    future = make_fp("future", np.array(list(bases[0].fingerprint.features.values())))
    future.feature_version = "tg9"
    assert "no population scale is shipped for feature version tg9" in population_for([future]).reason


@pytest.mark.parametrize(("name", "family", "base"), [
    ("Gensyn_Qwen2.5-7B-Instruct", "qwen", "Qwen2.5-7B-Instruct"),
    ("open-thoughts_OpenThinker2-7B", "qwen", "Qwen2.5-7B-Instruct"),
    ("unsloth_Llama-3.2-1B", "llama", "llama-3.2-1b"),
    ("microsoft_Phi-4-reasoning-plus", "phi", "phi-4"),
    ("zephyr-7b-beta", "mistral", "Mistral-7B-v0.1"),
])
def test_real_derivatives_are_attributed_to_their_family_against_the_eight_bases(bases, name, family, base):
    result = classify(derivative(name), bases)
    assert result.scale == "population" and result.meaningful and result.attribution_meaningful
    assert (result.family, result.base) == (family, base) and not result.out_of_cluster
    assert result.distance < 7 and result.family_margin is not None and result.family_margin > 1


def test_the_scale_fitted_on_the_bases_misattributed_the_qwen_fine_tunes(bases):
    for name in ("Gensyn_Qwen2.5-7B-Instruct", "open-thoughts_OpenThinker2-7B"):
        assert classify(derivative(name), bases, ClassifierSettings(scale="references")).family == "llama"


def test_distances_do_not_depend_on_which_other_references_are_listed(bases):
    """The point of a population scale: a policy's distance to its base is the same with 1, 2, 3 or 8 references."""
    candidate = derivative("unsloth_Llama-3.2-1B")
    base = next(r for r in bases if r.id == "llama-3.2-1b")
    others = [r for r in bases if r.family != "llama"]
    seen = []
    for refs in ([base], [base, others[0]], [base, *others[:2]], bases):
        result = classify(candidate, refs)
        assert result.scale == "population" and result.meaningful
        seen.append(next(r.distance for r in result.references if r.id == "llama-3.2-1b"))
        assert result.attribution_meaningful == (len(refs) > 1)
    assert seen == pytest.approx([seen[0]] * 4, rel=1e-12)
    single = classify(candidate, [base])
    assert single.not_meaningful == ["every reference is of family 'llama', so the attribution cannot disagree with it"]


def test_the_references_scale_says_why_it_cannot_carry_a_decision(bases):
    candidate = derivative("unsloth_Llama-3.2-1B")
    two = [r for r in bases if r.id in ("llama-3.2-1b", "Qwen2.5-3B")]
    result = classify(candidate, two, ClassifierSettings(scale="references"))
    assert not result.meaningful and not result.attribution_meaningful and not result.out_of_cluster
    assert "fitted on 2 references (it takes 8" in result.not_meaningful[0]
    with pytest.raises(UsageError, match="needs --scale references"):
        classify(candidate, two, ClassifierSettings(scale="population", space="pca"))


def test_derivative_references_move_their_base_s_centre(bases):
    from tg_verify.analysis.references import Reference

    tuned = derivative("open-thoughts_OpenThinker2-7B")
    with_derivative = [*bases, Reference(id="ot2", family="qwen", fingerprint=tuned, base=False,
                                         parent="Qwen2.5-7B-Instruct")]
    result = classify(derivative("Gensyn_Qwen2.5-7B-Instruct"), with_derivative)
    centre = next(c for c in result.centroids if c.base == "Qwen2.5-7B-Instruct")
    alone = next(c for c in classify(derivative("Gensyn_Qwen2.5-7B-Instruct"), bases).centroids
                 if c.base == "Qwen2.5-7B-Instruct")
    assert centre.members == ["Qwen2.5-7B-Instruct", "ot2"] and centre.distance < alone.distance
    assert result.family == "qwen"


def test_native_fingerprints_of_real_models_use_the_population_scale_with_a_caveat(bases, make_fp):
    """tg2 fingerprints share the release's definitions on the 14 features: the same spreads, said so."""
    from tg_verify.analysis.references import Reference
    from tg_verify.fingerprint.document import FEATURE_NAMES

    def native(fp, depth: float):
        values = np.array([fp.features[n] for n in FEATURE_NAMES])
        values[FEATURE_NAMES.index("num_layers")] = depth  # tg-verify's num_layers is the model depth
        return make_fp(fp.model_name, values)

    refs = [Reference(id=r.id, family=r.family, fingerprint=native(r.fingerprint, 28.0)) for r in bases]
    candidate = native(derivative("zephyr-7b-beta"), 32.0)
    result = classify(candidate, refs)
    assert result.scale == "population" and result.meaningful and result.family == "mistral"
    assert "num_layers" not in result.space["features"]
    assert any("feature version tg2: the population scale was measured on" in c for c in result.caveats)
    legacy = classify(derivative("zephyr-7b-beta"), bases)
    assert result.distance == pytest.approx(legacy.distance, rel=1e-12)  # same features, same scale
