"""File digests: streamed sha256 per file and the model_signing root digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tg_verify.artifact import file_digests, resolve, root_digest
from tg_verify.artifact.errors import FileChangedError


class _Sink:
    def __init__(self) -> None:
        self.total = 0.0

    def start(self, description: str, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1.0) -> None:
        self.total += amount

    def finish(self) -> None:
        pass


def test_digests_match_hashlib_and_report_progress(tiny_models: dict[str, dict[str, Path]]) -> None:
    artifact = resolve(tiny_models["gemma"]["indexed-shards"])
    seen: list[int] = []
    digests = file_digests(artifact, seen.append)
    assert set(digests) == {f.path for f in artifact.files}
    for rel, value in digests.items():
        assert value == hashlib.sha256((artifact.root / rel).read_bytes()).hexdigest()
    assert sum(seen) == sum(f.size for f in artifact.files)
    sink = _Sink()
    assert file_digests(artifact, sink) == digests and sink.total == sum(seen)


def test_root_digest_is_over_sorted_raw_digests() -> None:
    digests = {"b": "00" * 32, "a": "ff" * 32}
    assert root_digest(digests) == hashlib.sha256(bytes.fromhex("ff" * 32 + "00" * 32)).hexdigest()


def test_a_file_that_grew_since_resolve_is_refused(tiny_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes((tiny_models["llama"]["single"] / "model.safetensors").read_bytes())
    artifact = resolve(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "other"}')
    with pytest.raises(FileChangedError, match="config.json"):
        file_digests(artifact)
