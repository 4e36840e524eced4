"""Resolution of every layout users ship, and refusal of every broken one with its own error."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from make_corpus import CASES, build
from stcraft import tensors_file

from tg_verify.artifact import errors as E
from tg_verify.artifact import resolve
from tg_verify.tiny import ARCHITECTURES

DIR_CASES = {name: code for name, (code, _) in CASES.items() if isinstance(build(name), dict)}


def _write_tree(root: Path, tree: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in tree.items():
        (root / rel).write_bytes(data)
    return root


def _listing(artifact) -> list[tuple]:  # type: ignore[no-untyped-def]
    return [(t.name, t.dtype, t.shape) for t in artifact.tensors]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_three_layouts_give_the_same_tensors(tiny_models: dict[str, dict[str, Path]], arch: str) -> None:
    resolved = {layout: resolve(path) for layout, path in tiny_models[arch].items()}
    assert {a.layout for a in resolved.values()} == {"single", "indexed-shards", "shards"}
    listings = {layout: _listing(a) for layout, a in resolved.items()}
    assert listings["single"] == listings["indexed-shards"] == listings["shards"]
    assert len({a.total_params for a in resolved.values()}) == 1
    assert all(a.model_type == arch for a in resolved.values())
    assert all(not a.warnings for a in resolved.values()), [a.warnings for a in resolved.values()]


@pytest.mark.parametrize("name", sorted(DIR_CASES))
def test_each_broken_layout_raises_its_own_error(tmp_path: Path, name: str) -> None:
    root = _write_tree(tmp_path / name, build(name))  # type: ignore[arg-type]
    with pytest.raises(E.ArtifactError) as caught:
        resolve(root)
    assert caught.value.code == DIR_CASES[name]
    assert "\n" not in str(caught.value)


def test_huge_shard_total_is_reported_without_enumerating(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "m", {"model-00001-of-99999999999999.safetensors": tensors_file({"a": ("F32", [1])})})
    started = time.perf_counter()
    with pytest.raises(E.MissingShardError, match="99999999999998 of 99999999999999 missing"):
        resolve(root)
    assert time.perf_counter() - started < 1.0


def test_a_single_file_a_directory_and_an_index_path(tiny_models: dict[str, dict[str, Path]]) -> None:
    single = tiny_models["llama"]["single"]
    by_file = resolve(single / "model.safetensors")
    assert by_file.layout == "single" and by_file.name == "model" and by_file.config is None
    assert _listing(by_file) == _listing(resolve(single))
    indexed = tiny_models["llama"]["indexed-shards"]
    assert _listing(resolve(indexed / "model.safetensors.index.json")) == _listing(by_file)
    one_shard = resolve(indexed / "model-00002-of-00003.safetensors")
    assert any("shard 2 of 3" in w and "pass the directory" in w for w in one_shard.warnings)


def test_other_file_names_and_extra_copies(tmp_path: Path) -> None:
    data = tensors_file({"a.weight": ("F32", [2, 2])})
    lone = _write_tree(tmp_path / "mistral", {"consolidated.safetensors": data})
    assert resolve(lone).layout == "single"
    extra = _write_tree(tmp_path / "both", {"model.safetensors": data, "consolidated.safetensors": data,
                                            "pytorch_model.bin": b"\x80\x02."})
    artifact = resolve(extra)
    assert [f.path for f in artifact.files] == ["model.safetensors"]
    assert any("consolidated.safetensors" in w and "not verified" in w for w in artifact.warnings)
    assert any("pytorch_model.bin" in w and "never loaded" in w for w in artifact.warnings)
    diffusers = _write_tree(tmp_path / "unet", {
        "diffusion_pytorch_model-00001-of-00002.safetensors": tensors_file({"a": ("F32", [1])}),
        "diffusion_pytorch_model-00002-of-00002.safetensors": tensors_file({"b": ("F32", [1])}),
        "diffusion_pytorch_model.safetensors.index.json":
            b'{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",'
            b' "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}'})
    assert resolve(diffusers).layout == "indexed-shards"
    tp = _write_tree(tmp_path / "tp", {"consolidated.00.safetensors": data, "consolidated.01.safetensors": data})
    with pytest.raises(E.ShardSetError, match="tensor-parallel"):
        resolve(tp)


def test_tensor_order_does_not_depend_on_file_creation_order(tmp_path: Path) -> None:
    names = [f"model.layers.{i}.mlp.weight" for i in (0, 1, 2, 10, 11)]
    listings = []
    for trial, order in enumerate(([1, 2], [2, 1])):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        groups = {1: names[::2], 2: names[1::2]}
        for number in order:
            (root / f"model-{number:05d}-of-00002.safetensors").write_bytes(
                tensors_file({n: ("F32", [2]) for n in reversed(groups[number])}))
        listings.append(_listing(resolve(root)))
    assert listings[0] == listings[1] == [(n, "F32", (2,)) for n in names]


def test_symlinks_are_followed_and_reported(tmp_path: Path) -> None:
    blobs = _write_tree(tmp_path / "blobs", {"abc123": tensors_file({"a": ("F32", [1])})})
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123")
    artifact = resolve(snapshot)
    assert artifact.files[0].path == "model.safetensors"
    assert any("symbolic link" in w for w in artifact.warnings)


def test_special_paths_have_defined_outcomes(tmp_path: Path) -> None:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(tmp_path / "loop.safetensors")
    with pytest.raises(E.SymlinkLoopError):
        resolve(loop)
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "model.safetensors").symlink_to(tmp_path / "missing")
    with pytest.raises(E.NoModelError, match="missing target"):
        resolve(dangling)
    with pytest.raises(E.NoModelError):
        resolve(tmp_path / "nothing-here")
    with pytest.raises(E.NotRegularFileError):
        resolve(os.devnull)
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "model.safetensors")  # nobody writes: opening it for reading would block forever
    with pytest.raises(E.NotRegularFileError, match="FIFO"):
        resolve(fifo_dir)
    with pytest.raises(E.NotRegularFileError, match="FIFO"):
        resolve(fifo_dir / "model.safetensors")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "m", {"model.safetensors": tensors_file({"a": ("F32", [1])})})
    (root / "model.safetensors").chmod(0)
    with pytest.raises(E.UnreadableFileError):
        resolve(root)


def test_resolve_is_deterministic(tiny_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    source = tiny_models["phi3"]["shards"]
    copy = shutil.copytree(source, tmp_path / "copy")
    first, second = resolve(source), resolve(copy)
    assert _listing(first) == _listing(second)
    assert [(f.path, f.size, f.role) for f in first.files] == [(f.path, f.size, f.role) for f in second.files]


def test_every_other_weight_file_beside_the_model_is_named(tmp_path: Path) -> None:
    """Pickles, other safetensors and other formats (GGUF, TF, Flax, ONNX) next to the weights are listed in
    `other_weights` with a warning each: some runtimes load them instead, and they are not verified."""
    data = tensors_file({"a.weight": ("F32", [2, 2])})
    others = {"pytorch_model.bin": b"\x80\x02.", "consolidated.safetensors": data, "model.gguf": b"GGUF",
              "tf_model.h5": b"\x89HDF", "flax_model.msgpack": b"\x80", "model.onnx": b"\x08\x07"}
    artifact = resolve(_write_tree(tmp_path / "m", {"model.safetensors": data, **others}))
    assert [f.path for f in artifact.files] == ["model.safetensors"]
    assert sorted(artifact.other_weights) == sorted(others)
    for name in others:
        assert any(name in w for w in artifact.warnings), name
    alone = resolve(_write_tree(tmp_path / "clean", {"model.safetensors": data}))
    assert alone.other_weights == () and not any("ignored" in w for w in alone.warnings)


def test_only_unsupported_format_files_is_no_model(tmp_path: Path) -> None:
    with pytest.raises(E.NoModelError):
        resolve(_write_tree(tmp_path / "onnx", {"model.onnx": b"\x08\x07"}))


def test_tensor_count_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor costs work: more than the cap is refused before anything else is done with them."""
    data = tensors_file({f"t{i}": ("F32", [2, 2]) for i in range(101)})
    root = _write_tree(tmp_path / "many", {"model.safetensors": data})
    assert len(resolve(root).tensors) == 101
    monkeypatch.setenv("TG_VERIFY_MAX_TENSORS", "100")
    with pytest.raises(E.TooManyTensorsError, match="100"):
        resolve(root)
    with pytest.raises(E.TooManyTensorsError):
        resolve(root / "model.safetensors")


def test_many_tiny_tensors_are_refused_before_per_tensor_work(tmp_path: Path) -> None:
    """Beyond 2,048 tensors the mean tensor must hold 256 KiB: 40,000 2x2 tensors (the CPU-amplification
    file: 22-30 s to fingerprint before) are refused from the header, the same count of big tensors is not."""
    from tg_verify.artifact.header import validate_bytes
    from tg_verify.artifact.model import FREE_TENSORS

    many = tensors_file({f"model.layers.{i}.w.weight": ("F32", [2, 2]) for i in range(40_000)})
    with pytest.raises(E.TooManyTensorsError, match="mean tensor"):
        validate_bytes(many)
    root = _write_tree(tmp_path / "tiny", {"model.safetensors": many})
    with pytest.raises(E.TooManyTensorsError, match="mean tensor"):
        resolve(root)
    assert len(validate_bytes(tensors_file({f"t{i}": ("F32", [2, 2]) for i in range(FREE_TENSORS)}))[0]) == FREE_TENSORS
