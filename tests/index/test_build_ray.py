"""An index built by Ray tasks is the index built locally, file for file; verify runs on Ray alike."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tg_verify.cli import main
from tg_verify.index.build import add_references, verify_index
from tg_verify.index.store import open_index
from tg_verify.scale.ray_executor import RayExecutor


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_index_built_on_ray_is_byte_identical_and_verifies(ray_cluster: str, search_zoo: Any,
                                                              tmp_path: Path) -> None:
    references = tmp_path / "references"
    references.mkdir()
    for path in sorted(search_zoo.references.glob("*.json"))[::3]:  # ~100 references: two jobs of 64
        shutil.copy(path, references)
    (references / "broken.json").write_text("[]")
    local = add_references(tmp_path / "local", [references], create=True)
    on_ray = add_references(tmp_path / "ray", [references], create=True, executor=RayExecutor())
    assert local.count == on_ray.count > 64 and local.digest == on_ray.digest
    assert [m for _, m in on_ray.problems] == [m for _, m in local.problems] and len(local.problems) == 1
    assert _tree(tmp_path / "ray") == _tree(tmp_path / "local")
    assert main(["index", "verify", str(tmp_path / "ray"), "--sources", "--executor", "ray",
                 "--ray-address", ray_cluster]) == 0
    signatures = next((tmp_path / "ray" / "shards").glob("*.signatures.npy"))
    signatures.write_bytes(signatures.read_bytes()[:-2] + b"\x00\x3c")  # one value changed: 1.0 in float16
    problems = verify_index(tmp_path / "ray", executor=RayExecutor()).problems
    assert len(problems) == 1 and "does not match the manifest's sha256" in problems[0][1]
    assert len(open_index(tmp_path / "local").entries) == on_ray.count
