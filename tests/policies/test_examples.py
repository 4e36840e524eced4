"""Every example policy in policies/ runs as shipped, on tiny stand-ins for the models it names.

Each policy is copied unchanged into a workspace whose relative paths are populated with the demo's tiny
models and fingerprints (llama-3.2-1b -> the demo's llama base, and so on); a scenario that must PASS and
one that must FAIL with its reason code are run through the CLI.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tg_verify import demo
from tg_verify.artifact import resolve
from tg_verify.cli import main
from tg_verify.policy import load_policy

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's models, reference fingerprints and policies, built once per session (shared by modules)."""
    tree, _ = demo.ensure(tmp_path_factory.getbasetemp() / "tg-demo")
    return tree


@pytest.fixture(scope="module")
def extras(demo_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-ins the demo lacks: fingerprints of the unrelated llama and the fine-tune, a qwen2 fine-tune,
    and a LoRA adapter on the llama base."""
    from safetensors.torch import load_file

    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.tiny import build_model, save_lora_adapter, save_model

    root = tmp_path_factory.mktemp("extras")
    made: dict[str, Path] = {}
    for name in ("unrelated", "finetune"):
        fp = fingerprint_artifact(resolve(demo_tree / "models" / name), model_name=name)
        made[f"{name}.json"] = root / f"{name}.json"
        made[f"{name}.json"].write_bytes(fp.to_json_bytes())
    qwen = build_model("qwen2", seed=2)
    qwen.load_state_dict(load_file(str(demo_tree / "models" / "qwen2" / "model.safetensors")), strict=False)
    # a delivery ships its vocabulary, as the demo's bases do: without it the sketches are not comparable
    made["qwen2-finetune"] = save_model(demo.train(qwen, demo.corpus(1), steps=8, seed=9, lr=1e-3),
                                        root / "qwen2-finetune", vocabulary=True)
    llama = build_model("llama", seed=0)
    llama.load_state_dict(load_file(str(demo_tree / "models" / "base" / "model.safetensors")), strict=False)
    made["adapter"] = save_lora_adapter(llama, root / "adapter", seed=3)
    return made


@dataclass(frozen=True)
class Scenario:
    """Files to place at the policy's relative paths, and the verdict they must give."""

    files: dict[str, str]  # path relative to the workspace -> source key (see _source)
    exit_code: int
    codes: frozenset[str] = frozenset()  # failing codes that must be present
    adapter_base_name: str | None = None


REF_FILES = {"refs/llama-3.2-1b.json": "ref:demo-llama-base", "refs/llama-3.2-3b.json": "extra:unrelated.json",
             "refs/qwen2.5-3b.json": "ref:demo-qwen2-base", "refs/gemma-3-4b.json": "ref:demo-gemma-base"}
VENDOR_BASES = {"base-models/qwen2.5-7b": "model:qwen2", "base-models/llama-3.1-8b": "model:base",
                "base-models/gemma-3-4b": "model:gemma"}

SCENARIOS: dict[str, dict[str, Scenario]] = {
    "release-gate.yml": {
        "pass": Scenario({"model": "model:finetune", **REF_FILES}, 0),
        "fail": Scenario({"model": "model:unrelated", **REF_FILES}, 1, frozenset({"TGV_LINEAGE_NOT_ESTABLISHED"})),
    },
    "vendor-delivery.yml": {
        "pass": Scenario({"delivery/model": "extra:qwen2-finetune", **VENDOR_BASES}, 0),
        "fail": Scenario({"delivery/model": "model:finetune", **VENDOR_BASES}, 1,
                         frozenset({"TGV_FORBIDDEN_LINEAGE"})),
    },
    "adapter-release.yml": {
        "pass": Scenario({"adapter": "extra:adapter", "base-models/llama-3.2-1b": "model:base", **REF_FILES}, 0,
                         adapter_base_name="meta-llama/Llama-3.2-1B"),
        "fail": Scenario({"adapter": "extra:adapter", "base-models/llama-3.2-1b": "model:base", **REF_FILES}, 1,
                         frozenset({"TGV_ADAPTER_BASE_NAME_MISMATCH"}), adapter_base_name="Qwen/Qwen2.5-3B"),
    },
    "fingerprint-first.yml": {
        "pass": Scenario({"tg-fingerprint.json": "extra:finetune.json", **REF_FILES}, 0),
        "fail": Scenario({"tg-fingerprint.json": "extra:unrelated.json", **REF_FILES}, 1,
                         frozenset({"TGV_LINEAGE_NOT_ESTABLISHED"})),
    },
}


def test_every_example_policy_has_scenarios() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yml")) == sorted(SCENARIOS)


def _source(key: str, tree: Path, extras: dict[str, Path]) -> Path:
    kind, name = key.split(":", 1)
    return {"ref": lambda: tree / "refs" / f"{name}.json", "model": lambda: tree / "models" / name,
            "extra": lambda: extras[name]}[kind]()


def populate(workspace: Path, scenario: Scenario, tree: Path, extras: dict[str, Path]) -> None:
    """refs/ beside the policy (policies/refs), everything else at the repository root (the policies' ../)."""
    for relative, key in scenario.files.items():
        target = workspace / "policies" / relative if relative.startswith("refs/") else workspace / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        source = _source(key, tree, extras)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
    if scenario.adapter_base_name is not None:
        config_path = workspace / "adapter" / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = scenario.adapter_base_name
        config_path.write_text(json.dumps(config))


@pytest.mark.parametrize(("example", "outcome"), [(e, o) for e in sorted(SCENARIOS) for o in ("pass", "fail")])
def test_example_policy(example: str, outcome: str, demo_tree: Path, extras: dict[str, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_VERIFY_CACHE_DIR", str(tmp_path.parent / "example-cache"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    scenario = SCENARIOS[example][outcome]
    workspace = tmp_path / "repo"
    (workspace / "policies").mkdir(parents=True)
    policy = workspace / "policies" / example
    shutil.copyfile(EXAMPLES / example, policy)  # unchanged: the shipped file is what runs
    populate(workspace, scenario, demo_tree, extras)
    loaded = load_policy(policy)
    code = main([str(policy), "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == scenario.exit_code, captured.err or captured.out[:2000]
    report = json.loads(captured.out)
    failing = {r["code"] for r in report["reasons"] if r["severity"] == "fail"}
    assert scenario.codes <= failing, failing
    assert (code == 0) == (not failing)
    if loaded.outputs.report is not None:
        assert json.loads(loaded.outputs.report.read_text())["verdict"] == report["verdict"]
    if loaded.outputs.attestation is not None:
        statement = json.loads(loaded.outputs.attestation.read_text())
        assert statement["predicate"]["verificationResult"] == ("PASSED" if code == 0 else "FAILED")
