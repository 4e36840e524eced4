"""The nasty-file corpus through the real CLI: exit 2, one line on stderr, the expected error code."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from make_corpus import CASES, FILES, write

import tg_verify.errors
from tg_verify.artifact import resolve
from tg_verify.cli import main
from tg_verify.errors import ArtifactError


def test_committed_corpus_matches_its_generator(tmp_path: Path) -> None:
    write(tmp_path / "files")
    comparison = filecmp.dircmp(FILES, tmp_path / "files")
    stack = [comparison]
    while stack:
        current = stack.pop()
        assert not current.left_only and not current.right_only, (current.left_only, current.right_only)
        _, mismatch, errors = filecmp.cmpfiles(current.left, current.right, current.common_files, shallow=False)
        assert not mismatch and not errors, (mismatch, errors)
        stack.extend(current.subdirs.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case_exits_2_with_its_code(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", "--json", str(FILES / name)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("tg-verify: ") and err.count("\n") == 1 and "Traceback" not in err
    assert json.loads(out)["validation"]["error"]["code"] == CASES[name][0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_error_names_its_file_as_an_attribute(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The raiser sets `file` itself (the Action annotates it): with ArtifactError's fallback, which reads the
    file back out of the message, switched off, `file` is still the file the message names; None for a directory."""
    monkeypatch.setattr(tg_verify.errors, "os", SimpleNamespace(path=SimpleNamespace(isfile=lambda _: False)))
    with pytest.raises(ArtifactError) as raised:
        resolve(FILES / name)
    head = str(raised.value).split(": ", 1)[0]
    assert raised.value.file == (head if os.path.isfile(head) else None)
    assert raised.value.file is not None or os.path.isdir(head)


def _special_paths(tmp_path: Path) -> dict[str, Path]:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    fifo_dir = tmp_path / "fifo-dir"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "model.safetensors")
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    return {"symlink loop": loop, "fifo": fifo, "fifo in a model dir": fifo_dir, "device": Path(os.devnull),
            "empty dir": empty_dir, "missing": tmp_path / "missing", "empty file": FILES / "empty.safetensors"}


def test_special_paths_through_a_real_process(tmp_path: Path) -> None:
    for label, path in _special_paths(tmp_path).items():
        result = subprocess.run([sys.executable, "-m", "tg_verify", "inspect", str(path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2, (label, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, (label, result.stderr)
