"""`tg-verify fingerprint`: writes one document atomically, prints one line, maps failures to exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tg_verify.cli import main
from tg_verify.fingerprint.document import load
from tg_verify.tiny import one_thread


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def test_writes_a_loadable_document_and_one_summary_line(tiny_models, tmp_path, capsys):
    out = tmp_path / "sub" / "fp.json"
    assert main(["fingerprint", str(tiny_models["llama"]["indexed-shards"]), "-o", str(out), "--repeats", "4",
                 "--seed", "7", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "analysed" in lines[0]
    fingerprint = load(out)
    assert fingerprint.settings["seed"] == 7 and fingerprint.settings["repeats"] == 4
    assert fingerprint.sketch is not None and fingerprint.model_name == "indexed-shards"
    assert not list(out.parent.glob(".*.tmp"))


def test_dash_writes_the_document_to_standard_output(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fingerprint", str(tiny_models["llama"]["single"]), "-o", "-", "--repeats", "4",
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert not (tmp_path / "-").exists() and list(tmp_path.iterdir()) == []
    document = json.loads(out)
    assert document["settings"]["repeats"] == 4 and out.endswith("\n")
    assert len(err.strip().splitlines()) == 1 and "<stdout>: fingerprint of" in err


def test_settings_from_an_existing_fingerprint_and_flags_override(tiny_models, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    model = str(tiny_models["qwen2"]["single"])
    assert main(["fingerprint", model, "-o", str(first), "--repeats", "3", "--strategy", "gaussian",
                 "--no-sketch", "--name", "q"]) == 0
    assert main(["fingerprint", model, "-o", str(second), "--settings-from", str(first), "--no-sketch",
                 "--name", "q"]) == 0
    assert first.read_bytes() == second.read_bytes()
    third = tmp_path / "c.json"
    assert main(["fingerprint", model, "-o", str(third), "--settings-from", str(first), "--seed", "2",
                 "--no-sketch"]) == 0
    recorded = json.loads(third.read_text())["settings"]
    assert (recorded["repeats"], recorded["strategy"], recorded["seed"]) == (3, "gaussian", 2)


def test_nan_weights_exit_2_with_one_line(tmp_path, capsys):
    weight = torch.randn(8, 16)
    weight[0, 0] = float("nan")
    save_file({"model.layers.0.mlp.up_proj.weight": weight}, str(tmp_path / "model.safetensors"))
    assert main(["fingerprint", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "fp.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "up_proj" in err[0] and "NaN" in err[0]
    assert not (tmp_path / "fp.json").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["fingerprint"], "give MODEL"), (["fingerprint", "MODEL"], "give -o FILE.json"),
    (["fingerprint", "MODEL", "-o", "x.json", "--repeats", "0"], "repeats must be an integer in [1, 10000], got 0"),
    (["fingerprint", "MODEL", "-o", "x.json", "--threads", "0"], "--threads: '0': threads must be"),
    (["fingerprint", "MODEL", "-o", "x.json", "--threads", "two"], "--threads: 'two' is not an integer"),
    (["verify", "p.yml", "--threads", "9999"], "--threads: '9999': threads must be")])  # p.yml is never read
def test_usage_errors_exit_2(argv, message, tiny_models, tmp_path, capsys):
    argv = [str(tiny_models["llama"]["single"]) if a == "MODEL" else a for a in argv]
    argv = [str(tmp_path / a) if a.endswith(".json") else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_thread_count_does_not_change_the_document(tiny_models, tmp_path):
    model = str(tiny_models["phi3"]["shards"])
    outputs = [tmp_path / f"t{n}.json" for n in (1, 3)]
    for n, out in zip((1, 3), outputs):
        assert main(["fingerprint", model, "-o", str(out), "--repeats", "5", "--threads", str(n)]) == 0
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_cuda_without_cuda_is_a_usage_error(tiny_models, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the device check")
    assert main(["fingerprint", str(tiny_models["llama"]["single"]), "-o", str(tmp_path / "x.json"),
                 "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_an_adapter_without_its_base_is_refused(tmp_path, capsys):
    import json as _json

    (tmp_path / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                               "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    assert main(["fingerprint", str(tmp_path), "-o", str(tmp_path / "fp.json")]) == 2
    assert "is a PEFT adapter; give the base model it was trained on (--base PATH)" in capsys.readouterr().err
    assert not (tmp_path / "fp.json").exists()
