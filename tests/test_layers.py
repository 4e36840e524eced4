"""The package's layers, in one place, and a walk over every import that keeps them: no module imports a module
of a higher layer. Imports inside functions and under TYPE_CHECKING count too (a lazy import up the layers is
still a dependency up the layers).

    core          errors, atomic (output files), progress, versions, tiny (test models), escaping
    artifact      resolve a model path, validate headers, read tensors, digests
    scale         where batch work runs (local or Ray executors) and how much memory a job needs
    fingerprint   the fingerprint document, extraction, the lineage sketch; batch (many models)
    analysis      distances, attribution, lineage test, the paper's studies
    index         the reference index and lineage search over it
    decision      policy (the rules a file states), verdict (decide(rules, evidence)), waivers
    pipeline      verify(policy): the run that gathers the evidence; demo
    attestation   the in-toto Statement of a result, and its offline check
    report        console, JSON, Markdown, GitHub runner protocol, plots
    commands      one module per verb
    cli           argument parsing, the one place that prints and exits
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tg_verify"

# Lowest first. A name ending in "." is a package prefix; any other is one module.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("tg_verify", "tg_verify.errors", "tg_verify.atomic", "tg_verify.progress", "tg_verify.versions",
              "tg_verify.tiny", "tg_verify.escaping")),
    ("artifact", ("tg_verify.artifact", "tg_verify.artifact.")),
    ("scale", ("tg_verify.scale", "tg_verify.scale.")),
    ("fingerprint", ("tg_verify.fingerprint", "tg_verify.fingerprint.", "tg_verify.batch")),
    ("analysis", ("tg_verify.analysis", "tg_verify.analysis.")),
    ("index", ("tg_verify.index", "tg_verify.index.")),
    ("decision", ("tg_verify.policy", "tg_verify.verdict", "tg_verify.waivers")),
    ("pipeline", ("tg_verify.pipeline", "tg_verify.demo")),
    ("attestation", ("tg_verify.attestation", "tg_verify.attestation.")),
    ("report", ("tg_verify.report", "tg_verify.report.")),
    ("commands", ("tg_verify.commands", "tg_verify.commands.")),
    ("cli", ("tg_verify.cli", "tg_verify.__main__")),
)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a tg_verify module (None when no layer names it)."""
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".") and module.startswith(name)):
                return index
    return None


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tg_verify modules `name` imports anywhere in its source (`from a import b` counts a.b when b is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
        else:
            continue
        found.update(t for t in targets if t == "tg_verify" or t.startswith("tg_verify."))
    return found


def graph() -> dict[str, set[str]]:
    """Layer -> the layers its modules import (itself included)."""
    known = set(modules())
    edges: dict[str, set[str]] = {name: set() for name, _ in LAYERS}
    for name, path in modules().items():
        source = layer_of(name)
        assert source is not None
        for target in imports(name, path, known):
            index = layer_of(target)
            if index is not None:
                edges[LAYERS[source][0]].add(LAYERS[index][0])
    return edges


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(name for name in modules() if layer_of(name) is None)
    assert not unplaced, f"add these modules to LAYERS in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    known = set(modules())
    upward = []
    for name, path in modules().items():
        source = layer_of(name)
        if source is None:
            continue
        for target in sorted(imports(name, path, known)):
            index = layer_of(target)
            if index is not None and index > source:
                upward.append(f"{name} ({LAYERS[source][0]}) imports {target} ({LAYERS[index][0]})")
    assert not upward, "\n".join(upward)


def test_the_walk_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "tg_verify" / "verdict.py"
    source.parent.mkdir()
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tg_verify.pipeline import X\n"
                      "def f():\n    import tg_verify.report.console\n    from tg_verify.attestation import record\n")
    known = {"tg_verify.attestation.record"}
    found = imports("tg_verify.verdict", source, known)
    assert found == {"tg_verify.pipeline", "tg_verify.report.console", "tg_verify.attestation",
                     "tg_verify.attestation.record"}
    assert all(layer_of(t) > layer_of("tg_verify.verdict") for t in found)  # the test above would name each


@pytest.mark.parametrize("lower, higher", [("artifact", "fingerprint"), ("analysis", "decision"),
                                           ("pipeline", "attestation"), ("attestation", "report")])
def test_the_order_is_the_pipeline_order(lower: str, higher: str) -> None:
    names = [name for name, _ in LAYERS]
    assert names.index(lower) < names.index(higher)
