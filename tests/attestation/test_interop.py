"""The attestation meets the tools around it: Statements built as actions/attest builds them, the model_signing
digest of a save_pretrained folder, and a model read from a Hugging Face cache (symbolic links).

`actions_attest_statement` follows actions/attest (src/subject.ts, src/predicate.ts) and @actions/attest
(src/intoto.ts, src/attest.ts): subject-path globs keep files only, name each by its basename, digest it
with sha256 and drop repeated (name, digest) pairs; subject-checksums takes `<hex>  <name>` lines as
written (a leading `*` or space before the name dropped); the predicate is the predicate-path file parsed
as JSON; the Statement is {_type, subject, predicateType, predicate}, JSON.stringify'd into a DSSE
envelope of payloadType application/vnd.in-toto+json inside a Sigstore bundle.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from model_signing import hashing
from model_signing._signing.signing import Payload

from tg_verify.cli import main
from tg_verify.commands import action

POLICY = """version: 1
candidate:
  path: ./{candidate}
declared:
  base: llama-base
  family: llama
references:
  - id: llama-base
    family: llama
    model: ./llama-base
  - id: qwen-base
    family: qwen2
    model: ./qwen-base
forbidden: [qwen-base]
"""


def actions_attest_statement(model: Path, predicate_path: Path, predicate_type: str, *,
                             subject_path: tuple[str, ...] = (), subject_checksums: Path | None = None) -> dict:
    """The in-toto Statement actions/attest signs in custom-predicate mode."""
    subjects: list[dict] = []
    if subject_checksums is not None:
        for record in subject_checksums.read_text().split("\n"):
            if not record or " " not in record:
                continue
            digest, rest = record[:record.index(" ")], record[record.index(" ") + 1:]
            name = rest[1:] if rest.startswith(("*", " ")) else rest
            subject = {"name": name, "digest": {"sha256": digest}}
            if subject not in subjects:
                subjects.append(subject)
    for pattern in subject_path:
        for path in sorted(model.glob(pattern)):
            if path.is_file():
                subject = {"name": path.name, "digest": {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
                if subject not in subjects:
                    subjects.append(subject)
    return {"_type": "https://in-toto.io/Statement/v1", "subject": subjects, "predicateType": predicate_type,
            "predicate": json.loads(predicate_path.read_text(encoding="utf-8"))}


def sigstore_bundle(statement: dict) -> dict:
    payload = json.dumps(statement, separators=(",", ":")).encode()  # JSON.stringify
    return {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"certificate": {"rawBytes": "AAAA"}, "tlogEntries": []},
            "dsseEnvelope": {"payload": base64.b64encode(payload).decode(),
                             "payloadType": "application/vnd.in-toto+json",
                             "signatures": [{"sig": "AAAA", "keyid": ""}]}}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose candidate is a save_pretrained folder (config, generation config, tokenizer files)."""
    from tokenizers import Tokenizer, models
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from tg_verify.tiny import build_model, placeholder_tokens, save_model

    root = tmp_path_factory.mktemp("release")
    base = build_model("llama", seed=0)
    save_model(base, root / "llama-base", vocabulary=True)  # the base ships its vocabulary, as the candidate does
    save_model(build_model("qwen2", seed=1), root / "qwen-base")
    import torch

    with torch.no_grad():
        for parameter in base.parameters():
            parameter.add_(torch.randn_like(parameter) * parameter.std() * 0.02 if parameter.numel() > 1 else 0)
    base.save_pretrained(root / "candidate")
    GenerationConfig(max_new_tokens=8).save_pretrained(root / "candidate")
    tokens = placeholder_tokens(int(base.config.vocab_size))
    vocabulary = {text: i for i, text in enumerate(tokens)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token=tokens[0])),
                            unk_token=tokens[0]).save_pretrained(root / "candidate")
    (root / "release.yml").write_text(POLICY.format(candidate="candidate"))
    return root


@pytest.fixture(scope="module")
def cache(release: Path) -> Path:
    """One reference cache for the module: the references are fingerprinted once, by the first run."""
    return release.parent / f"{release.name}-cache"


@pytest.fixture(scope="module")
def released(release: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The Action's outputs for the release policy, run once (it also writes the candidate's fingerprint)."""
    temp = tmp_path_factory.mktemp("runner-temp")
    env = {"GITHUB_WORKSPACE": str(release), "RUNNER_TEMP": str(temp), "GITHUB_OUTPUT": str(temp / "out"),
           "INPUT_POLICY": str(release / "release.yml"), "INPUT_CACHE": str(cache), "INPUT_SUMMARY": "false",
           "INPUT_ARGS": f"--fingerprint-out {temp / 'candidate.fp.json'}"}
    log = io.StringIO()
    assert action.run(type("Args", (), {"debug": False})(), environ=env, out=log) == 0, log.getvalue()
    text = (temp / "out").read_text()
    outputs = {"fingerprint-path": str(temp / "candidate.fp.json")}
    for match in re.finditer(r"^([^<\n]+)<<(ghadelimiter_[0-9a-f-]{36})\n(.*?)\n\2\n", text, re.S | re.M):
        outputs[match[1]] = match[3]
    return outputs


def test_the_documented_release_workflow_verifies(release: Path, released: dict[str, str], tmp_path: Path, capsys,
                                                  monkeypatch) -> None:
    """subject-path `*.safetensors` and `*.json` (the tokenizer and generation config included), or
    subject-checksums from the Action: the Statement actions/attest makes verifies, and says which subjects
    are evidence."""
    monkeypatch.chdir(release)
    outputs = released
    model = release / "candidate"
    for how in ({"subject_path": ("*.safetensors", "*.json")}, {"subject_checksums": Path(outputs["subjects-path"])}):
        statement = actions_attest_statement(model, Path(outputs["predicate-path"]), outputs["predicate-type"], **how)
        bundle = tmp_path / "bundle.jsonl"
        bundle.write_text(json.dumps(sigstore_bundle(statement)) + "\n")
        capsys.readouterr()
        code = main(["verify-attestation", str(bundle), str(model), "--policy", str(release / "release.yml"),
                     "--json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 0, [c for c in report["checks"] if not c["ok"]]
        details = {c["name"]: c["detail"] for c in report["checks"]}
        assert details["subject tokenizer.json"].endswith("hashed for the root digest only, not read for the verdict")
        assert details["subject model.safetensors"].endswith("evidence (role weights)")
        assert "subject generation_config.json" in details


def test_a_subject_outside_the_predicate_is_reported_not_fatal(release: Path, released: dict[str, str],
                                                               tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(release)
    outputs = released
    model = tmp_path / "delivered"
    shutil.copytree(release / "candidate", model)
    (model / "tg-report.json").write_text("{}")  # written next to the model after the verify step
    statement = actions_attest_statement(model, Path(outputs["predicate-path"]), outputs["predicate-type"],
                                         subject_path=("*.json",))
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps(sigstore_bundle(statement)))
    capsys.readouterr()
    assert main(["verify-attestation", str(bundle), str(model), "--json"]) == 0
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["subject tg-report.json"]["ok"] and "the verdict says nothing about it" in \
        checks["subject tg-report.json"]["detail"]
    assert checks["file tg-report.json"]["ok"] and "model_signing digest now differs" in \
        checks["file tg-report.json"]["detail"]


def test_the_whole_model_subject_is_model_signings_digest(release: Path, cache: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    monkeypatch.chdir(release)
    statement = tmp_path / "att.json"
    assert main(["verify", "release.yml", "--attestation", str(statement), "--cache-dir", str(cache)]) == 0
    document = json.loads(statement.read_text())
    root = next(s for s in document["subject"] if s.get("annotations"))
    signed = Payload(hashing.Config().hash(release / "candidate")).statement.pb.subject[0].digest["sha256"]
    assert root["digest"]["sha256"] == signed == document["predicate"]["candidate"]["rootDigest"]["sha256"]
    candidate = document["predicate"]["candidate"]
    assert candidate["serialization"] == {"method": "files", "hashType": "sha256", "allowSymlinks": False,
                                          "ignorePaths": [".git", ".gitattributes", ".github", ".gitignore"]}
    evidence = {f["name"] for f in candidate["files"] if f["role"] != "other"}
    assert evidence == {"config.json", "model.safetensors"}
    assert {"generation_config.json", "tokenizer.json"} <= {f["name"] for f in candidate["files"]} - evidence
    assert candidate["weightsDigest"]["sha256"] != signed


def test_a_fingerprint_only_candidate_claims_no_model_signing_digest(release: Path, released: dict[str, str],
                                                                    cache: Path, tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    """Known only by its fingerprint file, the candidate's directory was never listed: the attestation's root
    digest is its weights digest, no `serialization` (ignorePaths, allowSymlinks) is claimed, and the files
    outside the fingerprint are reported as never covered, not as a moved model_signing digest."""
    monkeypatch.chdir(release)
    policy = release / "fp-only.yml"
    policy.write_text(POLICY.format(candidate="candidate").replace(
        "  path: ./candidate", f"  fingerprint: {released['fingerprint-path']}\n  require_weights: false"))
    statement = tmp_path / "att.json"
    assert main(["verify", str(policy), "--attestation", str(statement), "--cache-dir", str(cache)]) == 0
    candidate = json.loads(statement.read_text())["predicate"]["candidate"]
    assert "serialization" not in candidate and candidate["evidence"]["fileDigests"] == "recorded"
    assert candidate["rootDigest"] == candidate["weightsDigest"]
    assert {f["name"] for f in candidate["files"]} == {"config.json", "model.safetensors"}
    signed = Payload(hashing.Config().hash(release / "candidate")).statement.pb.subject[0].digest["sha256"]
    assert candidate["rootDigest"]["sha256"] != signed  # it never claims the directory's digest
    capsys.readouterr()
    assert main(["verify-attestation", str(statement), str(release / "candidate"), "--allow-fingerprint-evidence",
                 "--json"]) == 0
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["file tokenizer.json"]["ok"]
    assert "covers only the weight files the fingerprint recorded" in checks["file tokenizer.json"]["detail"]


def hf_cache(source: Path, root: Path) -> Path:
    """`source` laid out as huggingface_hub's cache: snapshots/<rev>/FILE -> ../../blobs/<sha256>."""
    blobs, snapshot = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blobs / digest)
        (snapshot / path.name).symlink_to(Path("../../blobs") / digest)
    return snapshot


def test_a_model_from_a_hugging_face_cache_is_attested_as_read_and_verifies(release: Path, cache: Path,
                                                                            tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:
    snapshot = hf_cache(release / "candidate", tmp_path / "models--acme--llama")
    monkeypatch.chdir(release)
    statement = tmp_path / "att.json"
    assert main(["verify", "release.yml", "--candidate", str(snapshot), "--attestation", str(statement),
                 "--cache-dir", str(cache)]) == 0
    document = json.loads(statement.read_text())
    assert document["predicate"]["candidate"]["serialization"]["allowSymlinks"] is True  # recorded as read
    signed = Payload(hashing.Config().set_allow_symlinks(True).hash(snapshot)).statement.pb.subject[0].digest
    assert document["predicate"]["candidate"]["rootDigest"]["sha256"] == signed["sha256"]
    capsys.readouterr()
    assert main(["verify-attestation", str(statement), str(snapshot), "--policy", "release.yml"]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    # an attestation that says its files were not read through links does not verify against links
    document["predicate"]["candidate"]["serialization"]["allowSymlinks"] = False
    statement.write_text(json.dumps(document))
    assert main(["verify-attestation", str(statement), str(snapshot)]) == 2
    assert "reached through a symbolic link, but the attestation records allowSymlinks: false" in \
        capsys.readouterr().out


def test_the_helper_follows_actions_attests_subject_rules(tmp_path: Path) -> None:
    """A guard on the test helper itself: checksum lines as written (flag dropped), globs to basenames, pairs
    deduplicated, directories dropped, the Statement's four keys in actions/attest's order."""
    (tmp_path / "sums").write_text("ab" * 32 + "  model-00001-of-00002.safetensors\n" + "cd" * 32 + " *config.json\n"
                                   + "ab" * 32 + "  model-00001-of-00002.safetensors\n")
    (tmp_path / "predicate.json").write_text("{}")
    statement = actions_attest_statement(tmp_path, tmp_path / "predicate.json", "t",
                                         subject_checksums=tmp_path / "sums")
    assert statement["subject"] == [{"name": "model-00001-of-00002.safetensors", "digest": {"sha256": "ab" * 32}},
                                    {"name": "config.json", "digest": {"sha256": "cd" * 32}}]
    assert list(statement) == ["_type", "subject", "predicateType", "predicate"]
    (tmp_path / "sub.json").mkdir()
    globbed = actions_attest_statement(tmp_path, tmp_path / "predicate.json", "t", subject_path=("*.json",))
    assert [s["name"] for s in globbed["subject"]] == ["predicate.json"]
