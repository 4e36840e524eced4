"""File digests: streamed sha256 per file, and root digests measured against the model_signing package itself."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from model_signing import hashing
from model_signing._signing.signing import Payload  # the Statement model_signing signs: its subject is the root

from tg_verify.artifact import file_digests, resolve, root_digest
from tg_verify.artifact.digest import model_file_digests, model_files
from tg_verify.artifact.errors import FileChangedError, NotRegularFileError


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


def test_files_hashed_in_parallel_give_the_same_digests_and_the_first_error_in_file_order(
        tiny_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    import shutil
    import threading

    source = tiny_models["gemma"]["indexed-shards"]
    artifact = resolve(source)
    assert len(artifact.files) >= 3
    together = threading.Barrier(2, timeout=30)  # passed only when two files are being hashed at the same time
    waited: set[str] = set()

    def advance(count: int) -> None:
        name = threading.current_thread().name
        if name not in waited and len(waited) < 2:
            waited.add(name)
            together.wait()

    assert file_digests(artifact, advance, threads=2) == file_digests(artifact)
    assert len(waited) == 2 and not together.broken
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    artifact = resolve(copy)
    later, sooner = artifact.files[-1], artifact.files[1]
    for entry in (later, sooner):  # both change after resolve(): the error is the one a sequential run meets first
        with open(artifact.path_of(entry.path), "ab") as handle:
            handle.write(b" ")
    with pytest.raises(FileChangedError, match=sooner.path):
        file_digests(artifact, threads=4)


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


def model_signing_root(path: Path, allow_symlinks: bool = False) -> str:
    """The digest model_signing 1.1 signs for `path` (its Statement's one subject), with its defaults."""
    manifest = hashing.Config().set_allow_symlinks(allow_symlinks).hash(path)
    return str(Payload(manifest).statement.pb.subject[0].digest["sha256"])


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as `save_pretrained` writes one (weights, config, generation config, tokenizer files), checked out
    of git (.git/, .gitattributes), with a README, a subdirectory, and names whose string order differs from
    model_signing's path order ("a.b" < "a/b" as strings, "a/b" first by path)."""
    from tokenizers import Tokenizer, models
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from tg_verify.tiny import build_model

    folder = tmp_path_factory.mktemp("pretrained") / "acme-llama"
    build_model("llama", seed=0).save_pretrained(folder)
    GenerationConfig(max_new_tokens=8).save_pretrained(folder)
    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(folder)
    (folder / "README.md").write_text("# acme-llama\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".github" / "workflows").mkdir(parents=True)
    (folder / ".github" / "workflows" / "gate.yml").write_text("on: push\n")
    (folder / "a.b").write_text("x")
    (folder / "a").mkdir()
    (folder / "a" / "b").write_text("y")
    (folder / "a" / ".gitignore").write_text("*.tmp\n")  # below the top: model_signing hashes it
    return folder


def test_model_digest_is_model_signings_digest_of_a_save_pretrained_folder(pretrained_folder: Path) -> None:
    artifact = resolve(pretrained_folder)
    weights = file_digests(artifact)
    everything, listed = model_file_digests(pretrained_folder, artifact, weights)
    assert root_digest(everything) == model_signing_root(pretrained_folder)
    names = {f.path for f in listed}
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "a/.gitignore"} <= names
    assert not any(n.startswith((".git/", ".github/")) or n == ".gitattributes" for n in names)
    assert set(weights) <= names and not any(f.symlink for f in listed)
    # the weights-only digest, under its own name, is a different value here
    assert root_digest(weights) != root_digest(everything)


def test_root_digest_follows_model_signings_path_order() -> None:
    digests = {"a.b": "00" * 32, "a/b": "ff" * 32}  # by string "a.b" < "a/b"; by path ("a", "b") < ("a.b",)
    assert root_digest(digests) == hashlib.sha256(bytes.fromhex("ff" * 32 + "00" * 32)).hexdigest()


def test_single_file_model_digest_is_model_signings_digest_of_that_file(pretrained_folder: Path) -> None:
    path = pretrained_folder / "model.safetensors"
    artifact = resolve(path)
    everything, listed = model_file_digests(path, artifact, file_digests(artifact))
    assert [f.path for f in listed] == ["model.safetensors"]
    assert root_digest(everything) == model_signing_root(path)


def test_hugging_face_cache_layout_is_hashed_through_its_symlinks(pretrained_folder: Path, tmp_path: Path) -> None:
    """snapshots/<rev>/FILE -> ../../blobs/<sha>: model_signing refuses it by default and, with symlinks
    allowed, hashes the targets; tg-verify records that it read through symlinks and gets the same digest."""
    blobs = tmp_path / "models--acme--llama" / "blobs"
    snapshot = tmp_path / "models--acme--llama" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for source in pretrained_folder.iterdir():
        if source.is_file() and not source.name.startswith("."):
            blob = blobs / hashlib.sha256(source.read_bytes()).hexdigest()
            blob.write_bytes(source.read_bytes())
            (snapshot / source.name).symlink_to(Path("../../blobs") / blob.name)
    artifact = resolve(snapshot)
    everything, listed = model_file_digests(snapshot, artifact, file_digests(artifact))
    assert all(f.symlink for f in listed)
    assert root_digest(everything) == model_signing_root(snapshot, allow_symlinks=True)
    with pytest.raises(ValueError, match="symlink"):
        model_signing_root(snapshot)  # what `allowSymlinks: false` would have claimed


def test_special_files_in_the_model_directory_are_refused_unopened(tmp_path: Path,
                                                                   tiny_models: dict[str, dict[str, Path]]) -> None:
    import os

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"]["single"], folder)
    os.mkfifo(folder / "pipe")
    with pytest.raises(NotRegularFileError, match="pipe"):
        model_files(folder)
