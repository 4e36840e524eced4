"""The verify pipeline on tiny models: true derivatives pass, wrong declarations fail with the right codes,
and every input path (fingerprint files, on-the-fly models, cache, legacy, adapters) behaves."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tg_verify import demo
from tg_verify.artifact import file_digests, resolve, root_digest
from tg_verify.artifact.digest import OTHER_ROLE
from tg_verify.errors import DigestMismatchError, IncompatibleFingerprintsError, InputError
from tg_verify.fingerprint.document import FEATURE_NAMES, BaseModelRecord, load
from tg_verify.pipeline import FingerprintCache, VerificationResult, VerifyOptions, verify
from tg_verify.policy import load_policy

BASE, QWEN, GEMMA = demo.BASE_ID, "demo-qwen2-base", "demo-gemma-base"


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's models, reference fingerprints and policies, built once per session (shared by modules)."""
    tree, _ = demo.ensure(tmp_path_factory.getbasetemp() / "tg-demo")
    return tree


def references(tree: Path, *, model_for: tuple[str, ...] = (), legacy: dict[str, Path] | None = None) -> str:
    rows = []
    for ref_id, family, folder in ((BASE, "llama", "base"), (QWEN, "qwen2", "qwen2"), (GEMMA, "gemma", "gemma")):
        if legacy and ref_id in legacy:
            source = f"fingerprint: {legacy[ref_id]}"
        elif ref_id in model_for:
            source = f"model: {tree / 'models' / folder}"
        else:
            source = f"fingerprint: {tree / 'refs' / f'{ref_id}.json'}"
        rows.append(f"  - id: {ref_id}\n    family: {family}\n    {source}\n")
    return "references:\n" + "".join(rows)


def run(tmp_path: Path, tree: Path, candidate: str, declared: str, extra: str = "", refs: str | None = None,
        options: VerifyOptions | None = None) -> VerificationResult:
    policy = tmp_path / "policy.yml"
    policy.write_text(f"version: 1\ncandidate:\n{candidate}\ndeclared:\n{declared}\n"
                      f"{refs if refs is not None else references(tree)}on_out_of_cluster: warn\n{extra}")
    return verify(load_policy(policy), options)


def fails(result: VerificationResult) -> set[str]:
    return {f.code for f in result.verdict.failures}


def model(tree: Path, name: str) -> str:
    return f"  path: {tree / 'models' / name}"


def test_true_derivative_passes_and_records_the_evidence(demo_tree: Path, tmp_path: Path) -> None:
    result = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}")
    assert result.passed and result.exit_code == 0, result.verdict.findings
    passed = {f.code for f in result.verdict.findings if f.severity == "pass"}
    assert "TGV_LINEAGE_ESTABLISHED" in passed
    # three tiny references: outside the real models' population and too few to scale the paper's distance
    assert not result.classification.meaningful and result.classification.scale == "references"
    warning = next(f for f in result.verdict.warnings if f.code == "TGV_STATISTICS_NOT_MEANINGFUL")
    assert "fitted on 3 references" in warning.message and warning.message.endswith("rests on the lineage test")
    assert not passed & {"TGV_DISTANCE_WITHIN_THRESHOLD", "TGV_FAMILY_MATCHES", "TGV_IN_CLUSTER"}
    artifact = resolve(demo_tree / "models" / "finetune")
    digests = file_digests(artifact)
    # the weights are the artifact's files; the root digest (model_signing's) also covers what ships beside them
    assert {f.path: f.sha256 for f in result.candidate.files if f.role != OTHER_ROLE} == digests
    others = {f.path for f in result.candidate.files if f.role == OTHER_ROLE}
    assert others == {"config.json", "vocab.json"} - set(digests)
    assert result.candidate.weights_digest == root_digest(digests) and result.candidate.files_verified
    assert result.candidate.root_digest == root_digest({f.path: f.sha256 for f in result.candidate.files})
    assert result.evidence.features_from is None and result.rules == result.policy.decision_rules()
    declared = result.declared_reference
    assert declared is not None and declared.lineage is not None and declared.lineage.derived
    assert declared.fingerprint_digest == load(demo_tree / "refs" / f"{BASE}.json").digest()
    assert result.classification.family == "llama"
    assert set(result.timings) >= {"load", "candidate", "references", "analysis", "lineage", "total"}
    assert result.tool["tg-verify"] and result.settings == result.candidate.fingerprint.settings


def test_unrelated_model_claiming_the_base_fails_on_lineage(demo_tree: Path, tmp_path: Path) -> None:
    result = run(tmp_path, demo_tree, model(demo_tree, "unrelated"), f"  base: {BASE}")
    assert not result.passed and result.exit_code == 1
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in fails(result)


def test_wrong_declared_base_fails(demo_tree: Path, tmp_path: Path) -> None:
    result = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {QWEN}")
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in fails(result)
    assert "TGV_LINEAGE_CONTRADICTS_FAMILY" in fails(result)  # it derives from the llama base


def test_wrong_declared_family_fails(demo_tree: Path, tmp_path: Path) -> None:
    result = run(tmp_path, demo_tree, model(demo_tree, "finetune"), "  family: gemma")
    assert fails(result) == {"TGV_LINEAGE_CONTRADICTS_FAMILY"}  # the attribution is not meaningful on 3 tiny refs


def test_forbidden_base_is_caught_by_the_lineage_test(demo_tree: Path, tmp_path: Path) -> None:
    result = run(tmp_path, demo_tree, model(demo_tree, "finetune"), "  family: llama",
                 extra=f"forbidden: [{BASE}]\n")
    assert fails(result) == {"TGV_FORBIDDEN_LINEAGE"}  # the attribution is not meaningful on 3 tiny refs
    clean = run(tmp_path, demo_tree, model(demo_tree, "unrelated"), "  family: llama", extra=f"forbidden: [{BASE}]\n")
    assert "TGV_FORBIDDEN_LINEAGE" not in fails(clean)


@pytest.fixture(scope="module")
def finetune_fp(demo_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tg_verify.fingerprint.extract import fingerprint_artifact

    path = tmp_path_factory.mktemp("fp") / "finetune.json"
    fp = fingerprint_artifact(resolve(demo_tree / "models" / "finetune"), model_name="finetune")
    path.write_bytes(fp.to_json_bytes())
    return path


def test_candidate_given_as_a_fingerprint_file(demo_tree: Path, tmp_path: Path, finetune_fp: Path) -> None:
    result = run(tmp_path, demo_tree, f"  fingerprint: {finetune_fp}", f"  base: {BASE}")
    assert result.passed and result.candidate.source == "fingerprint" and not result.candidate.files_verified
    assert not result.candidate.files_hashed
    assert result.candidate.fingerprint_digest == load(finetune_fp).digest()
    assert {f.path for f in result.candidate.files} == {"config.json", "model.safetensors"}
    # The verdict says where the features came from; the policy (or the Action's default) can forbid it.
    assert "TGV_FEATURES_FROM_FINGERPRINT" in {f.code for f in result.verdict.warnings}
    strict = run(tmp_path, demo_tree, f"  fingerprint: {finetune_fp}\n  require_weights: true", f"  base: {BASE}")
    assert fails(strict) == {"TGV_FEATURES_FROM_FINGERPRINT"}
    default_on = run(tmp_path, demo_tree, f"  fingerprint: {finetune_fp}", f"  base: {BASE}",
                     options=VerifyOptions(require_weights=True))
    assert fails(default_on) == {"TGV_FEATURES_FROM_FINGERPRINT"}


def test_path_and_fingerprint_must_agree(demo_tree: Path, tmp_path: Path, finetune_fp: Path) -> None:
    both = f"{model(demo_tree, 'finetune')}\n  fingerprint: {finetune_fp}"
    result = run(tmp_path, demo_tree, both, f"  base: {BASE}")
    assert result.passed and result.candidate.source == "model+fingerprint" and result.candidate.files_hashed
    # the digests were checked, but the features were taken from the file: not "files verified"
    assert not result.candidate.files_verified
    assert "TGV_FEATURES_FROM_FINGERPRINT" in {f.code for f in result.verdict.warnings}
    # With require_weights the features are recomputed from the files (the fingerprint file still has to match).
    recomputed = run(tmp_path, demo_tree, f"{both}\n  require_weights: true", f"  base: {BASE}")
    assert recomputed.passed and recomputed.candidate.source == "model" and recomputed.candidate.files_verified
    assert "TGV_FEATURES_FROM_FINGERPRINT" not in {f.code for f in recomputed.verdict.findings}
    tampered = tmp_path / "tampered"
    shutil.copytree(demo_tree / "models" / "finetune", tampered)
    config = json.loads((tampered / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (tampered / "config.json").write_text(json.dumps(config))
    with pytest.raises(DigestMismatchError, match=r"policy.yml: candidate.path: .*model file config.json has sha256"):
        run(tmp_path, demo_tree, f"  path: {tampered}\n  fingerprint: {finetune_fp}", f"  base: {BASE}")


def test_a_pinned_reference_must_be_exactly_the_pinned_file_or_model(demo_tree: Path, tmp_path: Path) -> None:
    import hashlib

    ref_file = demo_tree / "refs" / f"{BASE}.json"
    good = hashlib.sha256(ref_file.read_bytes()).hexdigest()
    pinned = references(demo_tree).replace(f"fingerprint: {ref_file}\n",
                                           f"fingerprint: {ref_file}\n    sha256: {good}\n")
    assert run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=pinned).passed
    swapped = pinned.replace(good, "f" * 64)
    with pytest.raises(DigestMismatchError, match=r"references\[0\]\.sha256: fingerprint file .* has sha256"):
        run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=swapped)
    on_the_fly = references(demo_tree, model_for=(QWEN,))
    wrong_model_pin = on_the_fly.replace(f"model: {demo_tree / 'models' / 'qwen2'}\n",
                                         f"model: {demo_tree / 'models' / 'qwen2'}\n    sha256: {'e' * 64}\n")
    assert wrong_model_pin != on_the_fly
    with pytest.raises(DigestMismatchError, match=r"references\[1\]\.sha256: model .* \(root digest\)"):
        run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=wrong_model_pin,
            options=VerifyOptions(cache_dir=None))


def test_settings_that_differ_from_the_references_are_an_input_error(demo_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(IncompatibleFingerprintsError, match=r"policy.yml: references\[0\].fingerprint: .*repeats"):
        run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}",
            extra="fingerprint: {repeats: 3, sketch: false}\n")


def test_model_references_are_fingerprinted_and_cached(demo_tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    options = VerifyOptions(cache_dir=cache)
    refs = references(demo_tree, model_for=(BASE,))
    first = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=refs, options=options)
    assert first.passed and first.reference(BASE).source == "model"
    entries = list(cache.glob("*.json"))
    assert len(entries) == 1
    second = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=refs, options=options)
    assert second.reference(BASE).source == "cache"
    assert second.reference(BASE).fingerprint_digest == first.reference(BASE).fingerprint_digest
    entries[0].write_text("{ damaged")
    third = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=refs, options=options)
    assert third.reference(BASE).source == "model" and third.passed


def test_legacy_reference_has_no_lineage_and_the_policy_decides(demo_tree: Path, tmp_path: Path) -> None:
    fp = load(demo_tree / "refs" / f"{BASE}.json")
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({**{n: fp.features[n] for n in FEATURE_NAMES}, "model_name": BASE}))
    refs = references(demo_tree, legacy={BASE: legacy})
    result = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=refs)
    # no sketch for the declared base and three tiny references that cannot scale a distance: nothing supports
    # the declared lineage
    assert fails(result) == {"TGV_STATISTICS_NOT_MEANINGFUL"}
    warned = {f.code for f in result.verdict.warnings}
    assert "TGV_LINEAGE_UNAVAILABLE" in warned
    assert result.reference(BASE).lineage is None and "legacy" in str(result.reference(BASE).lineage_unavailable)
    strict = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}", refs=refs,
                 extra="lineage: {on_unavailable: fail}\n")
    assert "TGV_LINEAGE_UNAVAILABLE" in fails(strict)


def test_candidate_that_resolves_to_nothing(demo_tree: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"policy.yml: candidate.path: .*empty: no model found"):
        run(tmp_path, demo_tree, f"  path: {tmp_path / 'empty'}", f"  base: {BASE}")


@pytest.fixture(scope="module")
def lora_adapter(demo_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (peft) trained-looking on the demo base, saved the way peft saves it."""
    from safetensors.torch import load_file

    from tg_verify.tiny import build_model, save_lora_adapter

    base = build_model("llama", seed=0)
    base.load_state_dict(load_file(str(demo_tree / "models" / "base" / "model.safetensors")), strict=False)
    return save_lora_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", seed=5)


def test_adapter_candidate_is_merged_onto_its_base(demo_tree: Path, tmp_path: Path, lora_adapter: Path) -> None:
    candidate = f"  path: {lora_adapter}\n  base_model: {demo_tree / 'models' / 'base'}"
    result = run(tmp_path, demo_tree, candidate, f"  base: {BASE}\n  relation: adapter")
    assert result.passed, result.verdict.findings
    assert result.candidate.layout == "adapter"
    read = {f.path for f in result.candidate.files if f.role != "other"}
    assert read == {"adapter_config.json", "adapter_model.safetensors"}
    # the rest of what peft wrote is hashed for the model_signing root digest, not read for the verdict
    assert {f.path for f in result.candidate.files if f.role == "other"} == {"README.md"}
    assert result.candidate.base is not None
    assert {f.path for f in result.candidate.base.files} == {"config.json", "model.safetensors"}
    assert result.candidate.fingerprint.artifact["base"]["root_digest"] == result.candidate.base.root_digest
    assert result.candidate.fingerprint.base == result.candidate.base


def test_adapter_base_name_mismatch_is_a_warning_the_policy_can_make_fatal(
        demo_tree: Path, tmp_path: Path, lora_adapter: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    candidate = f"  path: {adapter}\n  base_model: {demo_tree / 'models' / 'base'}"
    warned = run(tmp_path, demo_tree, candidate, f"  base: {BASE}")
    assert warned.passed and "TGV_ADAPTER_BASE_NAME_MISMATCH" in {f.code for f in warned.verdict.warnings}
    strict = run(tmp_path, demo_tree, candidate, f"  base: {BASE}", extra="on_name_mismatch: fail\n")
    assert "TGV_ADAPTER_BASE_NAME_MISMATCH" in fails(strict)


def test_adapter_without_a_base_is_an_input_error(demo_tree: Path, tmp_path: Path, lora_adapter: Path) -> None:
    with pytest.raises(InputError, match="is a PEFT adapter; set candidate.base_model"):
        run(tmp_path, demo_tree, f"  path: {lora_adapter}", f"  base: {BASE}")


def test_attestation_evidence_carries_the_result(demo_tree: Path, tmp_path: Path) -> None:
    from tg_verify.attestation.statement import build_statement

    result = run(tmp_path, demo_tree, model(demo_tree, "unrelated"), f"  base: {BASE}")
    statement = build_statement(result)
    predicate = statement["predicate"]
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["model.safetensors"] == next(f.sha256 for f in result.candidate.files
                                                 if f.path == "model.safetensors")
    assert predicate["verificationResult"] == "FAILED"
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in {r["code"] for r in predicate["reasons"]}
    assert predicate["policy"]["digest"]["sha256"] == result.policy.sha256
    refs = {r["id"]: r for r in predicate["references"]}
    assert refs[BASE]["fingerprintDigest"]["sha256"] == result.reference(BASE).fingerprint_digest
    assert refs[BASE]["lineage"]["derived"] is False


def test_legacy_candidate_fingerprint_is_refused(demo_tree: Path, tmp_path: Path) -> None:
    fp = load(demo_tree / "refs" / f"{BASE}.json")
    legacy = tmp_path / "legacy-candidate.json"
    legacy.write_text(json.dumps({n: fp.features[n] for n in FEATURE_NAMES}))
    with pytest.raises(InputError, match=r"candidate.fingerprint: .* legacy format"):
        run(tmp_path, demo_tree, f"  fingerprint: {legacy}", f"  base: {BASE}")


def test_derivative_reference_moves_its_base_cluster_and_can_be_declared(demo_tree: Path, tmp_path: Path,
                                                                         finetune_fp: Path) -> None:
    refs = references(demo_tree) + (f"  - id: known-finetune\n    family: llama\n    parent: {BASE}\n"
                                    f"    fingerprint: {finetune_fp}\n")
    result = run(tmp_path, demo_tree, model(demo_tree, "finetune"), "  base: known-finetune", refs=refs)
    assert result.passed, result.verdict.findings
    assert result.classification.base == BASE  # clusters are named by their base
    cluster = next(c for c in result.classification.centroids if c.base == BASE)
    assert sorted(cluster.members) == sorted([BASE, "known-finetune"])
    assert result.reference("known-finetune").distance == pytest.approx(0.0, abs=1e-9)


def test_adapter_fingerprint_must_match_the_base_it_is_checked_with(demo_tree: Path, tmp_path: Path,
                                                                   lora_adapter: Path) -> None:
    from tg_verify.artifact.merge import open_merged
    from tg_verify.artifact.peft import base_record
    from tg_verify.fingerprint.extract import fingerprint_artifact

    adapter, base = resolve(lora_adapter), resolve(demo_tree / "models" / "base")
    with open_merged(adapter, base) as merged:
        fp = fingerprint_artifact(merged.artifact, reader=merged, model_name="adapter")
    record = base_record(base, file_digests(base))
    fp_path = tmp_path / "adapter-fp.json"
    fp_path.write_bytes(replace(fp, artifact={**fp.artifact, "base": record}).to_json_bytes())
    ok = f"  path: {lora_adapter}\n  fingerprint: {fp_path}\n  base_model: {demo_tree / 'models' / 'base'}"
    result = run(tmp_path, demo_tree, ok, f"  base: {BASE}")
    assert result.passed and result.candidate.base == BaseModelRecord.from_record(record)
    wrong = f"  path: {lora_adapter}\n  fingerprint: {fp_path}\n  base_model: {demo_tree / 'models' / 'finetune'}"
    with pytest.raises(DigestMismatchError, match=r"candidate.base_model: .* base file model.safetensors has sha256"):
        run(tmp_path, demo_tree, wrong, f"  base: {BASE}")


def test_attestation_evidence_re_derives_for_a_forbidden_reference_and_a_declared_derivative(
        demo_tree: Path, tmp_path: Path, finetune_fp: Path) -> None:
    """A refuted attribution to a forbidden base needs a meaningful attribution, which three tiny references
    cannot give: test_pipeline_attribution.py covers it on eight trained ones."""
    from tg_verify.attestation.check import check_evidence
    from tg_verify.attestation.record import parse_predicate
    from tg_verify.attestation.statement import build_statement

    refuted = run(tmp_path, demo_tree, model(demo_tree, "unrelated"), "  family: llama", extra=f"forbidden: [{BASE}]\n")
    assert "TGV_NO_FORBIDDEN_LINEAGE" in {f.code for f in refuted.verdict.findings if f.severity == "pass"}
    refs = references(demo_tree) + (f"  - id: known-finetune\n    family: llama\n    parent: {BASE}\n"
                                    f"    fingerprint: {finetune_fp}\n")
    derivative = run(tmp_path, demo_tree, model(demo_tree, "finetune"), "  base: known-finetune", refs=refs)
    for result in (refuted, derivative):
        failed = [c for c in check_evidence(parse_predicate(build_statement(result)["predicate"])) if not c.ok]
        assert not failed, failed


def test_not_comparable_lineage_is_recorded_without_numbers(demo_tree: Path, tmp_path: Path) -> None:
    import math

    from tg_verify.attestation.record import parse_predicate
    from tg_verify.attestation.statement import build_statement
    from tg_verify.verdict import LineageEvidence

    result = run(tmp_path, demo_tree, model(demo_tree, "finetune"), f"  base: {BASE}")
    blank = LineageEvidence(score=math.nan, threshold=math.nan, p_value=1.0, false_positive_rate=math.nan,
                            derived=False, comparable=False, alpha=0.01, notes=("probe seeds differ",))
    refs = tuple(replace(r, lineage=blank) if r.id == BASE else r for r in result.evidence.references)
    predicate = build_statement(replace(result, evidence=replace(result.evidence, references=refs)))["predicate"]
    recorded = next(r for r in predicate["references"] if r["id"] == BASE)["lineage"]
    assert recorded["comparable"] is False and recorded["derived"] is False and "score" not in recorded
    assert recorded["notes"] == ["probe seeds differ"]
    read = next(r for r in parse_predicate(predicate).references if r.id == BASE).lineage
    assert read is not None and not read.comparable and math.isnan(read.score) and read.notes == blank.notes


def test_the_verdict_does_not_depend_on_the_order_of_the_references(demo_tree: Path, tmp_path: Path) -> None:
    rows = references(demo_tree).split("  - id: ")
    reordered = rows[0] + "".join("  - id: " + row for row in reversed(rows[1:]))
    assert reordered != references(demo_tree)
    for candidate in ("finetune", "unrelated"):
        forward = run(tmp_path, demo_tree, model(demo_tree, candidate), f"  base: {BASE}")
        backward = run(tmp_path, demo_tree, model(demo_tree, candidate), f"  base: {BASE}", refs=reordered)
        assert backward.passed == forward.passed and fails(backward) == fails(forward)
        assert {r.spec.id: r.distance for r in backward.references} == pytest.approx(
            {r.spec.id: r.distance for r in forward.references}, rel=1e-9)
        assert backward.classification.family == forward.classification.family


def test_a_forged_document_in_the_reference_cache_is_never_read_as_the_reference(demo_tree: Path,
                                                                                 tmp_path: Path) -> None:
    """Reference-cache poisoning: an unrelated model's fingerprint, relabelled as the base and claiming the base's
    file digests, put where the cache keeps the base's `model:` fingerprint (a key computed from public values),
    must not make the unrelated model pass, even with the base pinned by its root digest."""
    import hashlib

    from tg_verify.fingerprint.extract import fingerprint_artifact

    cache = tmp_path / "cache"
    options = VerifyOptions(cache_dir=cache)
    base_dir = demo_tree / "models" / "base"
    pin = root_digest(file_digests(resolve(base_dir)))
    refs = references(demo_tree, model_for=(BASE,)).replace(f"model: {base_dir}\n", f"model: {base_dir}\n"
                                                            f"    sha256: sha256:{pin}\n")
    honest = run(tmp_path, demo_tree, model(demo_tree, "unrelated"), f"  base: {BASE}", refs=refs, options=options)
    assert not honest.passed and honest.reference(BASE).source == "model"
    (entry,) = cache.glob("*.json")  # the key the protected policy reads: an attacker computes it from public values
    genuine_base = load(demo_tree / "refs" / f"{BASE}.json")
    unrelated = fingerprint_artifact(resolve(demo_tree / "models" / "unrelated"), model_name=BASE)
    forged = replace(unrelated, artifact=genuine_base.artifact)  # the unrelated model's features, the base's digests
    assert forged.file_digests == file_digests(resolve(base_dir))
    resealed = {**json.loads(entry.read_text()), "fingerprint": forged.to_dict()}  # the honest entry's seal kept
    for document in (forged.to_json_bytes(), json.dumps(resealed).encode()):  # bare, as an output would write it
        entry.write_bytes(document)
        again = run(tmp_path, demo_tree, model(demo_tree, "unrelated"), f"  base: {BASE}", refs=refs, options=options)
        assert not again.passed and again.reference(BASE).source == "model"  # recomputed, the forgery ignored
        assert again.reference(BASE).fingerprint_digest == honest.reference(BASE).fingerprint_digest
    # The honest entry is served from the cache; a copy of it under another key is not.
    assert run(tmp_path, demo_tree, model(demo_tree, "unrelated"), f"  base: {BASE}", refs=refs,
               options=options).reference(BASE).source == "cache"
    other = cache / f"{hashlib.sha256(b'other').hexdigest()}.json"
    other.write_bytes(entry.read_bytes())
    assert FingerprintCache(cache).get(other.stem, file_digests(resolve(base_dir))) is None


def test_a_multimodal_candidate_is_verified_as_its_language_model(tmp_path: Path) -> None:
    """A LLaVA whose language model is the declared base's passes on the lineage test, with a warning that its
    towers are not fingerprinted; another LLaVA claiming the same base fails. The plumbing end to end (policy,
    `model:` reference, report and attestation inputs), on untrained tiny models: identity, not detection."""
    import transformers

    from tg_verify.tiny import build_wrapper, save_model

    wrapper = build_wrapper("llava", seed=0)
    wrapper.save_pretrained(tmp_path / "candidate")
    build_wrapper("llava", seed=1).save_pretrained(tmp_path / "impostor")
    alone = transformers.AutoModelForCausalLM.from_config(wrapper.config.text_config)
    alone.load_state_dict({k.replace("model.language_model.", "model."): v for k, v in wrapper.state_dict().items()
                           if k.startswith(("model.language_model.", "lm_head."))})
    save_model(alone, tmp_path / "base")
    refs = f"references:\n  - id: text-base\n    family: llama\n    model: {tmp_path / 'base'}\n"
    passed = run(tmp_path, tmp_path, f"  path: {tmp_path / 'candidate'}", "  base: text-base", refs=refs)
    assert passed.passed and "TGV_LINEAGE_ESTABLISHED" in {f.code for f in passed.verdict.findings}
    assert any(f.code == "TGV_ARTIFACT_WARNING" and "not fingerprinted" in f.message
               for f in passed.verdict.findings)
    failed = run(tmp_path, tmp_path, f"  path: {tmp_path / 'impostor'}", "  base: text-base", refs=refs)
    assert "TGV_LINEAGE_NOT_ESTABLISHED" in fails(failed)
