"""The verify pipeline's statistical evidence with the references a real policy has.

- few references (1, 2, 3) on the population scale: real fingerprints, distances that do not depend on
  which other references are listed, the attribution applied from two families on;
- few references of toy models (outside the population): the paper's distance is not meaningful, the
  lineage test decides; a candidate outside the references' span likewise;
- the lineage test outweighs the statistics: function-preserving changes of a trained tiny base (a
  rotated residual stream, a dropped middle layer) that the paper's statistics attribute to another
  family PASS with a warning giving both figures, and FAIL when the policy asks for both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tg_verify.analysis.population import load_population
from tg_verify.fingerprint.document import FEATURE_NAMES, FEATURE_VERSION, Fingerprint, load
from tg_verify.pipeline import VerificationResult, verify
from tg_verify.policy import load_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.transforms import drop_layer, from_model, rotate_residual  # noqa: E402

REAL = Path(__file__).resolve().parent / "data" / "tensorguard-release"
STATISTICS = {"TGV_DISTANCE_WITHIN_THRESHOLD", "TGV_DISTANCE_ABOVE_THRESHOLD", "TGV_FAMILY_MATCHES",
              "TGV_FAMILY_MISMATCH", "TGV_IN_CLUSTER", "TGV_OUT_OF_CLUSTER", "TGV_NEAREST_BASE_DIFFERS"}


def attested_consistently(result: VerificationResult) -> bool:
    """verify-attestation re-derives the same reasons from what the attestation records."""
    from tg_verify.report.attestation import build_statement
    from tg_verify.report.attestation_check import check_evidence

    failed = [c for c in check_evidence(build_statement(result)["predicate"]) if not c.ok]
    assert not failed, failed
    return True


def codes(result: VerificationResult, severity: str | None = None) -> set[str]:
    return {f.code for f in result.verdict.findings if severity is None or f.severity == severity}


def finding(result: VerificationResult, code: str):
    return next(f for f in result.verdict.findings if f.code == code)


def run(tmp_path: Path, candidate: Path, base: str, refs: list[tuple[str, str, Path]], extra: str = "",
        name: str = "policy.yml") -> VerificationResult:
    rows = "".join(f"  - id: {i}\n    family: {f}\n    fingerprint: {p}\n" for i, f, p in refs)
    key = "fingerprint" if candidate.suffix == ".json" else "path"
    policy = tmp_path / name
    policy.write_text(f"version: 1\ncandidate:\n  {key}: {candidate}\ndeclared:\n  base: {base}\n"
                      f"references:\n{rows}{extra}")
    return verify(load_policy(policy))


# ------------------------------------------------------------------------ real fingerprints


def real_ref(name: str, family: str) -> tuple[str, str, Path]:
    return name, family, REAL / "bases" / f"{name}_features.json"


@pytest.fixture(scope="module")
def gensyn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Qwen2.5-7B fine-tune's published features as a native candidate document (verify takes no legacy
    candidate): the features of a real model, file digests standing in for its files."""
    legacy = load(REAL / "derivatives" / "Gensyn_Qwen2.5-7B-Instruct_features.json")
    files = [{"path": "model.safetensors", "size": 1, "sha256": "ab" * 32}]
    fp = Fingerprint(model_name="gensyn", features={n: legacy.features[n] for n in FEATURE_NAMES},
                     settings={"seed": 0, "repeats": 30}, feature_version=FEATURE_VERSION,
                     artifact={"layout": "single", "files": files, "root_digest": "cd" * 32})
    path = tmp_path_factory.mktemp("real") / "gensyn.json"
    path.write_bytes(fp.to_json_bytes())
    return path


QWEN7, LLAMA8, LLAMA3 = (real_ref("Qwen2.5-7B-Instruct", "qwen"), real_ref("Llama-3.1-8B", "llama"),
                         real_ref("Llama-3.2-3B", "llama"))


@pytest.mark.parametrize("refs", [[QWEN7], [QWEN7, LLAMA8], [QWEN7, LLAMA8, LLAMA3]], ids=["1", "2", "3"])
def test_one_two_three_real_references_pass_a_genuine_fine_tune_on_the_population_scale(
        tmp_path: Path, gensyn: Path, refs: list[tuple[str, str, Path]]) -> None:
    """Two references once FAILED a genuine fine-tune at 19.05; on the population scale the distance to the
    declared base is the same whatever else is listed."""
    result = run(tmp_path, gensyn, "Qwen2.5-7B-Instruct", refs)
    assert result.passed, result.verdict.failures
    assert result.classification.scale == "population" and result.classification.meaningful
    population = load_population()  # the distance is the population-scale one, whatever else is listed
    expected = np.linalg.norm((population.vector(load(gensyn)) - population.vector(load(QWEN7[2]))) / population.spread)
    assert result.declared_reference.distance == pytest.approx(expected, rel=1e-12) and expected < 7
    assert "TGV_DISTANCE_WITHIN_THRESHOLD" in codes(result, "pass") and "TGV_IN_CLUSTER" in codes(result, "pass")
    assert "TGV_LINEAGE_UNAVAILABLE" in codes(result, "warn")  # legacy references carry no sketch
    assert attested_consistently(result)
    if len(refs) == 1:  # one family: the family check cannot disagree, so it is a note, not a pass
        assert "TGV_STATISTICS_NOT_MEANINGFUL" in codes(result, "info") and "TGV_FAMILY_MATCHES" not in codes(result)
    else:
        assert "TGV_FAMILY_MATCHES" in codes(result, "pass")


def test_a_wrong_declaration_fails_on_the_population_scale_with_two_references(tmp_path: Path, gensyn: Path) -> None:
    result = run(tmp_path, gensyn, "Llama-3.1-8B", [QWEN7, LLAMA8])
    assert {"TGV_FAMILY_MISMATCH"} <= codes(result, "fail")
    assert "attributed family 'qwen'" in finding(result, "TGV_FAMILY_MISMATCH").message
    assert attested_consistently(result)


def test_check_policy_warns_about_references_that_cannot_support_the_attribution(tmp_path: Path, gensyn: Path,
                                                                                  capsys) -> None:
    from tg_verify.cli import main

    def check(refs: list[tuple[str, str, Path]]) -> str:
        rows = "".join(f"  - id: {i}\n    family: {f}\n    fingerprint: {p}\n" for i, f, p in refs)
        policy = tmp_path / "p.yml"
        policy.write_text(f"version: 1\ncandidate:\n  fingerprint: {gensyn}\ndeclared:\n  base: {refs[0][0]}\n"
                          f"references:\n{rows}")
        assert main([str(policy), "--check-policy"]) == 0
        return " ".join(capsys.readouterr().out.split())

    assert "warning" not in check([QWEN7, LLAMA8])
    single = check([QWEN7])
    assert "warning: the references cannot support the family attribution: every reference is of family 'qwen'" \
        in single and "distance" not in single.split("warning", 1)[1]


# ------------------------------------------------------------------------ trained tiny models


SPECS = (("llama-small", "llama", "small", 0), ("llama-medium", "llama", "medium", 1),
         ("qwen2-small", "qwen2", "small", 2), ("qwen2-medium", "qwen2", "medium", 3),
         ("gemma-small", "gemma", "small", 4), ("phi3-small", "phi3", "small", 5),
         ("mistral-small", "mistral", "small", 6), ("llama-twin", "llama-twin", "small", 7))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Eight trained tiny models (five architectures, two depths, an independently trained llama twin) and
    derivatives of the llama bases: a fine-tune, a rotated residual stream, a dropped middle layer, a dropped
    layer of the two-block base. {name: model directory}, and {name + '.json': reference fingerprint}."""
    from tg_verify.artifact import resolve
    from tg_verify.demo import corpus, train
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings
    from tg_verify.tiny import build_model, save_model

    root = tmp_path_factory.mktemp("tiny-population")
    paths: dict[str, Path] = {}
    trained = {}
    for ident, family, size, seed in SPECS:
        arch = family.removesuffix("-twin")
        trained[ident] = train(build_model(arch, seed=seed, size=size), corpus(0), steps=30, seed=seed)
        paths[ident] = save_model(trained[ident], root / "models" / ident)
        fp = fingerprint_artifact(resolve(paths[ident]), FingerprintSettings(device="cpu"), model_name=ident)
        paths[f"{ident}.json"] = root / "refs" / f"{ident}.json"
        paths[f"{ident}.json"].parent.mkdir(parents=True, exist_ok=True)
        paths[f"{ident}.json"].write_bytes(fp.to_json_bytes())
    import copy

    tuned = train(copy.deepcopy(trained["llama-small"]), corpus(1), steps=15, seed=11, lr=1e-3)
    paths["finetune"] = save_model(tuned, root / "models" / "finetune")
    paths["rotated"] = rotate_residual(from_model(trained["llama-small"])).save(root / "models" / "rotated")
    paths["dropped-middle"] = drop_layer(from_model(trained["llama-medium"]), 1).save(root / "models" / "dropped-m")
    paths["dropped"] = drop_layer(from_model(trained["llama-small"]), 1).save(root / "models" / "dropped")
    return paths


def tiny_refs(tiny: dict[str, Path], names: tuple[str, ...]) -> list[tuple[str, str, Path]]:
    families = {ident: family for ident, family, _, _ in SPECS}
    return [(n, families[n], tiny[f"{n}.json"]) for n in names]


@pytest.mark.parametrize("names", [("llama-small",), ("llama-small", "qwen2-small"),
                                   ("llama-small", "qwen2-small", "gemma-small")], ids=["1", "2", "3"])
def test_few_toy_references_make_the_statistics_not_meaningful_and_the_lineage_decides(
        tmp_path: Path, tiny: dict[str, Path], names: tuple[str, ...]) -> None:
    refs = tiny_refs(tiny, names)
    genuine = run(tmp_path, tiny["finetune"], "llama-small", refs)
    assert genuine.passed, genuine.verdict.failures
    assert not codes(genuine) & STATISTICS
    warning = finding(genuine, "TGV_STATISTICS_NOT_MEANINGFUL")
    assert warning.severity == "warn" and f"the scale was fitted on {len(names)} reference" in warning.message
    assert "lies outside the real models" in warning.message and warning.message.endswith("rests on the lineage test")
    assert "TGV_LINEAGE_ESTABLISHED" in codes(genuine, "pass")
    unrelated = run(tmp_path, tiny["llama-twin"], "llama-small", refs)
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in codes(unrelated, "fail") and not codes(unrelated) & STATISTICS
    strict = run(tmp_path, tiny["finetune"], "llama-small", refs, extra="lineage: {enabled: false}\n")
    assert codes(strict, "fail") == {"TGV_STATISTICS_NOT_MEANINGFUL"}  # no evidence at all is no PASS
    assert all(attested_consistently(r) for r in (genuine, unrelated, strict))


def test_a_candidate_outside_the_references_span_is_not_measured_on_their_scale(tmp_path: Path,
                                                                                   tiny: dict[str, Path]) -> None:
    """Eight references of one depth: a candidate with a layer removed differs on a feature they do not vary on."""
    from tg_verify.fingerprint.document import load as load_fp

    small = ("llama-small", "qwen2-small", "gemma-small", "phi3-small", "mistral-small", "llama-twin")
    refs = tiny_refs(tiny, small)
    for ident in ("llama-small", "qwen2-small"):  # two more references of depth 2: exact copies under other ids
        copy_path = tmp_path / f"{ident}-copy.json"
        document = json.loads(tiny[f"{ident}.json"].read_text())
        document["model_name"] = f"{ident}-copy"
        copy_path.write_text(json.dumps(document))
        refs.append((f"{ident}-copy", {i: f for i, f, _, _ in SPECS}[ident], copy_path))
    assert {load_fp(p).features["num_layers"] for _, _, p in refs} == {2.0} and len(refs) == 8
    result = run(tmp_path, tiny["dropped"], "llama-small", refs)
    assert result.passed, result.verdict.failures
    assert not result.classification.meaningful and not codes(result) & STATISTICS
    message = finding(result, "TGV_STATISTICS_NOT_MEANINGFUL").message
    assert "the references do not span the candidate: they do not vary on num_layers" in message


@pytest.mark.parametrize(("candidate", "base"), [("rotated", "llama-small"), ("dropped-middle", "llama-medium")])
def test_established_lineage_outweighs_a_disagreeing_attribution(tmp_path: Path, tiny: dict[str, Path],
                                                                 candidate: str, base: str) -> None:
    """Function-preserving changes move the paper's statistics to another family; the lineage test is not fooled."""
    refs = tiny_refs(tiny, tuple(s[0] for s in SPECS))
    result = run(tmp_path, tiny[candidate], base, refs)
    assert result.classification.scale == "references" and result.classification.meaningful  # 8 references
    assert result.passed, result.verdict.failures
    assert "TGV_LINEAGE_ESTABLISHED" in codes(result, "pass")
    mismatch = finding(result, "TGV_FAMILY_MISMATCH")
    assert mismatch.severity == "warn" and result.classification.family != "llama"
    assert f"attributed family '{result.classification.family}'" in mismatch.message
    assert f"the lineage test establishes derivation from declared base '{base}' (score" in mismatch.message
    both = run(tmp_path, tiny[candidate], base, refs, extra="on_statistics_disagree: fail\n", name="strict.yml")
    assert codes(both, "fail") == {"TGV_FAMILY_MISMATCH"}
    assert attested_consistently(result) and attested_consistently(both)
