"""A .gguf file everywhere a safetensors model goes: verify (candidate and `model:` reference), fingerprint,
fingerprint --batch, compare, classify, inspect; the attestation names the .gguf file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf_helpers import gguf_from_directory, with_extra_tensors

from tg_verify import demo
from tg_verify.cli import main
from tg_verify.fingerprint.document import load

BASE = demo.BASE_ID


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's models (trained a few dozen steps) as GGUF files, plus the demo tree."""
    tree, _ = demo.ensure(tmp_path_factory.getbasetemp() / "tg-demo")
    root = tmp_path_factory.mktemp("gguf-demo")
    files = {"tree": tree}
    for model, qtype in (("finetune", "Q8_0"), ("unrelated", "Q8_0"), ("base", "F16")):
        files[model] = gguf_from_directory(tree / "models" / model, root / f"{model}-{qtype}.gguf", qtype)
    return files


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TG_VERIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def _policy(tmp_path: Path, tree: Path, candidate: Path, base_ref: str) -> Path:
    refs = "".join(f"  - id: {ref_id}\n    family: {family}\n    fingerprint: {tree / 'refs' / f'{ref_id}.json'}\n"
                   for ref_id, family in (("demo-qwen2-base", "qwen2"), ("demo-gemma-base", "gemma")))
    text = (f"version: 1\ncandidate:\n  path: {candidate}\ndeclared:\n  base: {BASE}\n"
            f"references:\n  - id: {BASE}\n    family: llama\n{base_ref}{refs}on_out_of_cluster: warn\n")
    path = tmp_path / "policy.yml"
    path.write_text(text)
    return path


def test_a_gguf_candidate_passes_and_the_attestation_names_the_gguf_file(
        ggufs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = ggufs["tree"]
    policy = _policy(tmp_path, tree, ggufs["finetune"], f"    fingerprint: {tree / 'refs' / f'{BASE}.json'}\n")
    code = main([str(policy), "--attestation", str(tmp_path / "att.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "TGV_LINEAGE_ESTABLISHED" in out
    statement = json.loads((tmp_path / "att.json").read_text())
    names = [s["name"] for s in statement["subject"]]
    assert ggufs["finetune"].name in names
    assert statement["predicate"]["candidate"]["format"] == "gguf"


def test_a_gguf_model_reference_is_fingerprinted_on_the_fly(
        ggufs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = _policy(tmp_path, ggufs["tree"], ggufs["finetune"], f"    model: {ggufs['base']}\n")
    assert main([str(policy), "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "pass"


def test_an_unrelated_gguf_claiming_the_base_fails(ggufs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tree = ggufs["tree"]
    policy = _policy(tmp_path, tree, ggufs["unrelated"], f"    fingerprint: {tree / 'refs' / f'{BASE}.json'}\n")
    assert main([str(policy), "--no-progress"]) == 1
    capsys.readouterr()


def test_fingerprint_batch_takes_each_gguf_of_a_folder(ggufs: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["fingerprint", "--batch", str(ggufs["finetune"].parent), "--out-dir", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 models: 3 computed, 0 up to date, 0 failed"
    documents = sorted(out.glob("*.json"))
    assert [load(p).artifact["format"] for p in documents] == ["gguf"] * 3
    assert sorted(load(p).artifact["files"][0]["path"] for p in documents) == sorted(
        ggufs[m].name for m in ("finetune", "unrelated", "base"))


def test_fingerprint_compare_classify_and_inspect_take_a_gguf(ggufs: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    tree = ggufs["tree"]
    assert main(["fingerprint", str(ggufs["finetune"]), "-o", str(tmp_path / "fp.json"), "--device", "cpu",
                 "--no-progress"]) == 0
    fingerprint = load(tmp_path / "fp.json")
    assert fingerprint.artifact["quantisation"]["Q8_0"] > 0
    capsys.readouterr()
    assert main(["compare", str(ggufs["finetune"]), str(tree / "models" / "base"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["comparison"]["lineage"]["derived"] is True
    assert main(["classify", str(ggufs["finetune"]), "--refs", str(tree / "refs"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["classification"]["base"] == BASE
    assert main(["inspect", str(ggufs["finetune"]), "--json", "--hash"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["artifact"]["format"] == "gguf" and document["config"]["model_type"] == "llama"
    assert document["files"][0]["sha256"] == fingerprint.artifact["files"][0]["sha256"]


def test_a_tensor_llama_cpp_would_not_load_fails_verify(ggufs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The decoy attack on GGUF: the declared base's file plus a tensor no runtime loads still fails."""
    tree = ggufs["tree"]
    decoy = with_extra_tensors(ggufs["finetune"], tmp_path / "decoy.gguf",
                               {"blk.0.attn_q_backup.weight": np.zeros((64, 64), np.float32)})
    policy = _policy(tmp_path, tree, decoy, f"    fingerprint: {tree / 'refs' / f'{BASE}.json'}\n")
    assert main([str(policy), "--no-progress"]) == 1
    assert "TGV_UNEXPECTED_TENSORS" in capsys.readouterr().out
