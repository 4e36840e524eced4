"""Light verbs stay light: `--help`, `--version`, `inspect` (with and without `--against`) and `verify-attestation`,
run as a user runs them (a fresh process), import neither torch nor scikit-learn.

Each runs in a subprocess whose import system refuses torch and sklearn and records the attempt, so a verb
that reached for either fails here even if it would have coped without it. Their start-up time is measured
by bench/startup.py, never here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from attestation_helpers import make_predicate

from tg_verify.attestation import statement

HEAVY = ("torch", "sklearn")
# Runs the CLI with an import hook in front of every other finder: an import of a heavy package is recorded
# (written to the file named by argv[1]) and refused.
RUNNER = f"""
import importlib.abc, json, sys
HEAVY = {HEAVY!r}
attempts = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempts.append(name)
            raise ModuleNotFoundError(f"{{name}} is not allowed in a light verb", name=name)
        return None

sys.meta_path.insert(0, Refuse())
record, argv = sys.argv[1], sys.argv[2:]
try:
    from tg_verify.cli import main
    code = main(argv)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 2
finally:
    with open(record, "w") as handle:
        json.dump({{"attempts": attempts, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}},
                  handle)
sys.exit(code)
"""


def run_light(tmp_path: Path, *argv: str) -> tuple[int, dict[str, list[str]], str]:
    record = tmp_path / "imports.json"
    done = subprocess.run([sys.executable, "-c", RUNNER, str(record), *argv], capture_output=True, text=True,
                          timeout=120)
    return done.returncode, json.loads(record.read_text()), done.stdout + done.stderr


@pytest.fixture(scope="module")
def adapter_and_base(tiny_models: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory,
                     ) -> tuple[Path, Path]:
    from safetensors.torch import load_file

    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.tiny import build_model, save_lora_adapter

    base_dir = tiny_models["llama"]["single"]
    base = build_model("llama", seed=0)
    base.load_state_dict(load_file(str(base_dir / "model.safetensors")), strict=False)
    work = tmp_path_factory.mktemp("light")
    reference = work / "base.json"  # `inspect --against` reads the base's fingerprint, never its weights
    reference.write_bytes(fingerprint_artifact(resolve(base_dir)).to_json_bytes())
    return save_lora_adapter(base, work / "adapter", seed=3), reference


def test_help_and_version_import_no_heavy_library(tmp_path: Path) -> None:
    code, imports, out = run_light(tmp_path, "--version")
    assert code == 0 and out.startswith("tg-verify ") and imports == {"attempts": [], "loaded": []}
    code, imports, out = run_light(tmp_path, "--help")
    assert code == 0 and "verify-attestation" in out and imports == {"attempts": [], "loaded": []}
    # a mistyped verb is answered from the registry (tg_verify.commands.VERBS), no command module imported
    code, imports, out = run_light(tmp_path, "verify-atestation", "a.json")
    assert code == 2 and "did you mean 'verify-attestation'?" in out and imports == {"attempts": [], "loaded": []}


def test_inspect_imports_no_heavy_library(tmp_path: Path, tiny_models: dict[str, dict[str, Path]]) -> None:
    code, imports, out = run_light(tmp_path, "inspect", str(tiny_models["qwen2"]["indexed-shards"]), "--hash")
    assert code == 0, out
    assert imports == {"attempts": [], "loaded": []}


def test_inspect_against_a_base_imports_no_heavy_library(tmp_path: Path, adapter_and_base: tuple[Path, Path]) -> None:
    adapter, reference = adapter_and_base
    code, imports, out = run_light(tmp_path, "inspect", str(adapter), "--against", str(reference))
    assert code == 0, out
    assert imports == {"attempts": [], "loaded": []}


def test_verify_attestation_imports_no_heavy_library(tmp_path: Path, tiny_models: dict[str, dict[str, Path]]) -> None:
    model = tiny_models["mistral"]["indexed-shards"]
    path = statement.write_statement(tmp_path / "attestation.json", statement.statement_of(make_predicate(model)))
    code, imports, out = run_light(tmp_path, "verify-attestation", str(path), str(model))
    assert code == 0, out
    assert "VERIFIED" in out and imports == {"attempts": [], "loaded": []}
    for output in ("markdown", "sarif"):  # the other formats stay light too
        code, imports, out = run_light(tmp_path, "verify-attestation", str(path), str(model), "--format", output)
        assert code == 0 and "VERIFIED" in out or '"verified": true' in out, out
        assert imports == {"attempts": [], "loaded": []}, output


def test_the_hook_would_see_a_heavy_import(tmp_path: Path, tiny_models: dict[str, dict[str, Path]]) -> None:
    """The same runner on a verb that needs torch records the attempt (so the tests above can fail)."""
    code, imports, _ = run_light(tmp_path, "fingerprint", str(tiny_models["llama"]["single"]), "-o",
                                 str(tmp_path / "fp.json"))
    assert code != 0 and "torch" in imports["attempts"]
