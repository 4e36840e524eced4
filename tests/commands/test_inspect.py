"""`tg-verify inspect`: the same document for the same weights in every layout; header-only; clean failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tg_verify.cli import main
from tg_verify.tiny import ARCHITECTURES


def _inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_json_is_identical_across_layouts(tiny_models: dict[str, dict[str, Path]], arch: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    documents = {}
    for layout, path in tiny_models[arch].items():
        code, out, err = _inspect(capsys, str(path), "--json")
        assert code == 0 and err == ""
        documents[layout] = json.loads(out)
        assert documents[layout]["artifact"]["layout"] == layout
    for key in ("tensors", "total_params", "tensor_count", "dtypes", "categories", "matrices", "config"):
        assert documents["single"][key] == documents["indexed-shards"][key] == documents["shards"][key], key
    doc = documents["single"]
    assert doc["artifact"]["model_type"] == arch
    assert doc["total_params"] == sum(t["params"] for t in doc["tensors"]) > 0
    assert sum(c["tensors"] for c in doc["categories"].values()) == doc["tensor_count"] == len(doc["tensors"])
    assert doc["validation"] == {"status": "valid", "header_only": True, "checks": doc["validation"]["checks"],
                                 "warnings": []}


def test_json_output_is_canonical_and_stable(tiny_models: dict[str, dict[str, Path]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tiny_models["qwen2"]["shards"])
    first = _inspect(capsys, path, "--json")[1]
    assert first == _inspect(capsys, path, "--json")[1]
    assert first == json.dumps(json.loads(first), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def test_hash_adds_sha256_and_root_digest(tiny_models: dict[str, dict[str, Path]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = tiny_models["mistral"]["indexed-shards"]
    code, out, _ = _inspect(capsys, str(root), "--json", "--hash", "--no-progress")
    doc = json.loads(out)
    assert code == 0
    digests = {f["path"]: f["sha256"] for f in doc["files"]}
    for rel, value in digests.items():
        assert value == hashlib.sha256((root / rel).read_bytes()).hexdigest()
    expected_root = hashlib.sha256(b"".join(bytes.fromhex(digests[p]) for p in sorted(digests))).hexdigest()
    assert doc["root_digest"] == expected_root
    code, text, _ = _inspect(capsys, str(root), "--hash", "--no-progress")
    assert f"{digests['config.json']}  config.json" in text and expected_root in text


def test_hash_gives_the_model_signing_root_digest_and_the_weights_digest(
        tiny_models: dict[str, dict[str, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model_signing import hashing
    from model_signing._signing.signing import Payload

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"]["indexed-shards"], folder)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "generation_config.json").write_text("{}")
    code, out, _ = _inspect(capsys, str(folder), "--json", "--hash", "--no-progress")
    doc = json.loads(out)
    signed = Payload(hashing.Config().hash(folder)).statement.pb.subject[0].digest["sha256"]
    assert code == 0 and doc["root_digest"] == signed
    assert {f["path"] for f in doc["other_files"]} == {"tokenizer.json", "generation_config.json"}
    weights = {f["path"]: f["sha256"] for f in doc["files"]}
    assert doc["weights_digest"] == hashlib.sha256(b"".join(bytes.fromhex(weights[p]) for p in sorted(weights))
                                                   ).hexdigest() != signed
    code, text, _ = _inspect(capsys, str(folder), "--hash", "--no-progress")
    assert f"root digest sha256:{signed} (model_signing's, over all 7 files)" in text
    assert "tokenizer.json" in text and f"weights digest sha256:{doc['weights_digest']}" in text


def test_human_output_names_the_essentials(tiny_models: dict[str, dict[str, Path]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _inspect(capsys, str(tiny_models["llama"]["shards"]), "--tensors")
    assert code == 0
    for text in ("layout shards", "model_type llama", "model-00003-of-00003.safetensors", "parameters",
                 "attention", "validation valid", "model.layers.1.mlp.down_proj.weight"):
        assert text in out, text


def test_header_only_work_reads_no_tensor_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = json.dumps({"huge": {"dtype": "BF16", "shape": [2**18, 2**18], "data_offsets": [0, 2**37]}}).encode()
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:  # a 128 GiB file that is all hole: reading it would take minutes
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + 2**37)
    code, out, _ = _inspect(capsys, str(path), "--json")
    assert code == 0 and json.loads(out)["total_params"] == 2**36


def test_resolving_and_describing_do_not_import_torch(tiny_models: dict[str, dict[str, Path]]) -> None:
    script = ("import sys; from tg_verify.artifact.layout import resolve; from tg_verify.artifact.summary import "
              f"describe; describe(resolve({str(tiny_models['llama']['single'])!r})); "
              "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_invalid_input_exits_2_with_one_line_and_a_json_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    code, out, err = _inspect(capsys, str(bad), "--json")
    assert code == 2 and err.count("\n") == 1 and err.startswith("tg-verify: ")
    assert json.loads(out)["validation"]["error"]["code"] == "TGV_HEADER_JSON"
    code, out, err = _inspect(capsys, str(bad))
    assert code == 2 and out == "" and err.count("\n") == 1


def test_warnings_are_reported(tmp_path: Path, tiny_models: dict[str, dict[str, Path]],
                               capsys: pytest.CaptureFixture[str]) -> None:
    source = tiny_models["gemma"]["single"]
    (tmp_path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02.")
    code, out, _ = _inspect(capsys, str(tmp_path), "--json")
    assert code == 0 and any("pytorch_model.bin" in w for w in json.loads(out)["validation"]["warnings"])


def test_cli_subprocess_never_prints_a_traceback(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "tg_verify", "inspect", str(fifo)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_hostile_config_values_never_break_the_json(tmp_path: Path, tiny_models: dict[str, dict[str, Path]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.safetensors").write_bytes((tiny_models["llama"]["single"] / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "\\ud800x", "hidden_size": 1e400, "vocab_size": -1e400, '
                                          '"architectures": ["A", 1e999, "\\udfff"], "num_hidden_layers": {"a": 1}}')
    code, out, _ = _inspect(capsys, str(tmp_path), "--json")
    doc = json.loads(out)
    assert code == 0 and "hidden_size" not in doc["config"] and "num_hidden_layers" not in doc["config"]
    assert doc["config"]["architectures"][0] == "A" and len(doc["config"]["architectures"]) == 2
    code, out, err = _inspect(capsys, str(tmp_path))  # the human renderer copes too
    assert code == 0 and err == "" and "model_type" in out


def _lora_adapter(base_arch: str, directory: Path, base_name: str) -> Path:
    """A small LoRA adapter of the tiny `base_arch` model (random adapter weights), saved by peft."""
    from tg_verify.tiny import build_model, save_lora_adapter

    return save_lora_adapter(build_model(base_arch, seed=0), directory, targets=("q_proj", "down_proj"),
                             base_name=base_name)


def _reference(path: Path, out: Path, name: str) -> Path:
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    document = fingerprint_artifact(resolve(path), FingerprintSettings(repeats=2, sketch=False), model_name=name)
    out.write_bytes(document.to_json_bytes())
    return out


def test_against_checks_an_adapters_fit_to_a_reference_fingerprint_without_base_weights(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tg_verify.tiny import build_model, save_model

    adapter = _lora_adapter("llama", tmp_path / "adapter", "tiny-llama")
    same = _reference(save_model(build_model("llama", seed=0), tmp_path / "base"), tmp_path / "base.json",
                      "tiny-llama")
    other = _reference(save_model(build_model("llama", seed=0, size="medium"), tmp_path / "wider"),
                       tmp_path / "wider.json", "wide-llama")

    code, out, _ = _inspect(capsys, str(adapter), "--against", str(same), "--json")
    fit = json.loads(out)["adapter_fit"]
    assert code == 0 and fit["result"] == "pass" and fit["reference"] == "tiny-llama"
    assert not [f for f in fit["findings"] if f["severity"] == "error"]

    code, out, _ = _inspect(capsys, str(adapter), "--against", str(other), "--json")
    fit = json.loads(out)["adapter_fit"]
    assert code == 1 and fit["result"] == "fail"
    codes = {f["code"] for f in fit["findings"]}
    assert any(f["severity"] == "error" for f in fit["findings"]), codes
    assert "TGV_ADAPTER_BASE_NAME_MISMATCH" in codes  # the adapter names tiny-llama, the reference wide-llama


def test_against_refuses_a_full_model(tiny_models: dict[str, dict[str, Path]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    reference = _reference(tiny_models["llama"]["single"], tmp_path / "ref.json", "tiny-llama")
    code, _, err = _inspect(capsys, str(tiny_models["llama"]["single"]), "--against", str(reference))
    assert code == 2 and "--against checks a PEFT adapter" in err and "Traceback" not in err
