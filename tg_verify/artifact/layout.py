"""Resolve a path to an Artifact: single file, indexed shards, shards by name, PEFT adapter."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from tg_verify.artifact.header import Header, read_header
from tg_verify.artifact.model import Artifact, ArtifactFile, TensorInfo, natural_key
from tg_verify.errors import ArtifactError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG_NAME = "config.json"
MAX_JSON_BYTES = 50_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# <prefix>-00001-of-00005.safetensors (Hugging Face) and <prefix>.00001-of-00005.safetensors
SHARD_PATTERN = re.compile(r"^(?P<prefix>.+?)[-_.](?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")


class IndexError_(ArtifactError):
    code = "TGV_SHARD_INDEX"


class ShardSetError(ArtifactError):
    code = "TGV_SHARD_SET"


class NoModelError(ArtifactError):
    code = "TGV_NO_MODEL"


class PickleFormatError(ArtifactError):
    code = "TGV_PICKLE_REFUSED"


def _check_regular(path: Path, what: str) -> os.stat_result:
    """Refuse symlinks, FIFOs, devices: only regular files are read."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot access {what} ({exc.strerror or exc})") from exc
    if stat.S_ISLNK(info.st_mode):
        raise ArtifactError(f"{path}: {what} is a symbolic link; tg-verify reads regular files only")
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{path}: {what} is not a regular file")
    return info


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """Read a small JSON object (config, index, adapter config) as untrusted input."""
    info = _check_regular(path, what)
    if info.st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"{path}: {what} is {info.st_size} bytes, over the {MAX_JSON_BYTES}-byte limit")
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(document, dict):
        raise ArtifactError(f"{path}: {what} must be a JSON object")
    return document


def _tensor_infos(header: Header, relpath: str) -> list[TensorInfo]:
    return [TensorInfo(t.name, t.dtype, t.shape, relpath, header.data_start + t.start, header.data_start + t.stop)
            for t in header.tensors]


def _headers(root: Path, relpaths: list[str]) -> dict[str, Header]:
    headers = {}
    for rel in relpaths:
        _check_regular(root / rel, "weights file")
        headers[rel] = read_header(root / rel)
    return headers


def _assemble(root: Path, name: str, layout: str, weights: dict[str, Header], extra: list[ArtifactFile],
              config: dict[str, Any] | None, adapter_config: dict[str, Any] | None = None,
              expected: dict[str, str] | None = None) -> Artifact:
    tensors: list[TensorInfo] = []
    owner: dict[str, str] = {}
    warnings: list[str] = []
    for rel, header in weights.items():
        if not header.canonical:
            warnings.append(f"{rel}: header JSON is whitespace-padded (accepted, non-canonical)")
        for info in _tensor_infos(header, rel):
            if info.name in owner:
                raise ArtifactError(f"{root / rel}: tensor '{info.name}' also appears in {owner[info.name]}")
            owner[info.name] = rel
            tensors.append(info)
    if expected is not None:
        for tensor_name, shard in expected.items():
            if tensor_name not in owner:
                raise IndexError_(f"{root / INDEX_NAME}: weight_map names '{tensor_name}' in {shard}, which lacks it")
            if owner[tensor_name] != shard:
                raise IndexError_(f"{root / INDEX_NAME}: weight_map puts '{tensor_name}' in {shard}, "
                                  f"but it is in {owner[tensor_name]}")
        for tensor_name, rel in owner.items():
            if tensor_name not in expected:
                raise IndexError_(f"{root / INDEX_NAME}: tensor '{tensor_name}' of {rel} is missing from weight_map")
    tensors.sort(key=lambda t: natural_key(t.name))
    files = [ArtifactFile(rel, h.file_size, "adapter-weights" if layout == "adapter" else "weights")
             for rel, h in weights.items()]
    files.extend(extra)
    files.sort(key=lambda f: f.path)
    return Artifact(root=root, name=name, layout=layout, files=tuple(files), tensors=tuple(tensors),  # type: ignore[arg-type]
                    config=config, adapter_config=adapter_config,
                    metadata={rel: h.metadata for rel, h in weights.items() if h.metadata},
                    warnings=tuple(warnings))


def _config(root: Path, extra: list[ArtifactFile]) -> dict[str, Any] | None:
    path = root / CONFIG_NAME
    if not os.path.lexists(path):
        return None
    document = read_json_file(path, "config.json")
    extra.append(ArtifactFile(CONFIG_NAME, path.stat().st_size, "config"))
    return document


def _resolve_index(root: Path, name: str) -> Artifact:
    index_path = root / INDEX_NAME
    index = read_json_file(index_path, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise IndexError_(f"{index_path}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    shards: set[str] = set()
    for tensor_name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or "/" in shard or "\\" in shard \
                or shard in (".", ".."):
            raise IndexError_(f"{index_path}: weight_map['{tensor_name}'] must be a .safetensors file name "
                              f"in the same directory, got {shard!r}")
        shards.add(shard)
    for shard in sorted(shards):
        if not os.path.lexists(root / shard):
            raise IndexError_(f"{index_path}: shard {shard} named in weight_map does not exist")
    present = {p.name for p in root.iterdir() if p.name.endswith(".safetensors") and p.name != ADAPTER_WEIGHTS}
    unlisted = sorted(present - shards)
    if unlisted:
        raise IndexError_(f"{index_path}: shard file {unlisted[0]} is not mentioned in weight_map")
    extra = [ArtifactFile(INDEX_NAME, index_path.stat().st_size, "index")]
    config = _config(root, extra)
    headers = _headers(root, sorted(shards, key=natural_key))
    total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    artifact = _assemble(root, name, "indexed-shards", headers, extra, config, expected=dict(weight_map))
    if isinstance(total, int) and not isinstance(total, bool):
        actual = sum(t.nbytes for t in artifact.tensors)
        if total != actual:
            artifact = Artifact(**{**artifact.__dict__, "warnings": artifact.warnings + (
                f"{INDEX_NAME}: metadata.total_size {total} differs from the tensors' {actual} bytes",)})
    return artifact


def _resolve_pattern(root: Path, name: str, candidates: list[str]) -> Artifact:
    groups: dict[tuple[str, int], dict[int, str]] = {}
    loose: list[str] = []
    for file_name in candidates:
        match = SHARD_PATTERN.match(file_name)
        if not match:
            loose.append(file_name)
            continue
        key = (match["prefix"], int(match["total"]))
        index = int(match["index"])
        if index in groups.setdefault(key, {}):
            raise ShardSetError(f"{root}: shard number {index} of {key[1]} appears twice")
        groups[key][index] = file_name
    if loose or len(groups) != 1:
        raise ShardSetError(f"{root}: {len(candidates)} .safetensors files but no {INDEX_NAME} and no single "
                            f"complete <prefix>-NNNNN-of-NNNNN.safetensors set "
                            f"(found: {', '.join(sorted(candidates)[:5])}{' ...' if len(candidates) > 5 else ''})")
    (prefix, total), members = next(iter(groups.items()))
    missing = [i for i in range(1, total + 1) if i not in members]
    if missing or len(members) != total:
        raise ShardSetError(f"{root}: shard set {prefix}-*-of-{total} is incomplete "
                            f"(missing {', '.join(str(i) for i in missing[:5]) or 'numbers out of range'})")
    extra: list[ArtifactFile] = []
    config = _config(root, extra)
    headers = _headers(root, [members[i] for i in range(1, total + 1)])
    return _assemble(root, name, "shards", headers, extra, config)


def _resolve_adapter(root: Path, name: str) -> Artifact:
    config_path = root / ADAPTER_CONFIG
    adapter_config = read_json_file(config_path, "adapter config")
    weights = root / ADAPTER_WEIGHTS
    if not os.path.lexists(weights):
        if any(os.path.lexists(root / f"adapter_model{s}") for s in PICKLE_SUFFIXES):
            raise PickleFormatError(f"{root}: adapter weights are in a pickle format; only {ADAPTER_WEIGHTS} is read")
        raise ArtifactError(f"{root}: {ADAPTER_CONFIG} present but {ADAPTER_WEIGHTS} is missing")
    extra = [ArtifactFile(ADAPTER_CONFIG, config_path.stat().st_size, "adapter-config")]
    headers = _headers(root, [ADAPTER_WEIGHTS])
    return _assemble(root, name, "adapter", headers, extra, None, adapter_config=adapter_config)


def resolve(path: str | os.PathLike[str]) -> Artifact:
    """Resolve `path` (a .safetensors file or a model directory) to a validated Artifact.

    Every header is read and validated; no tensor data is touched.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise NoModelError(f"{path}: no such file or directory")
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise ArtifactError(f"{path}: is a symbolic link; pass the real path")
    if stat.S_ISREG(info.st_mode):
        if not path.name.endswith(".safetensors"):
            if path.name.endswith(PICKLE_SUFFIXES):
                raise PickleFormatError(f"{path}: pickle-based weights are refused (code execution risk); "
                                        f"convert to safetensors")
            raise ArtifactError(f"{path}: not a .safetensors file")
        root = path.parent
        header = read_header(path)
        return _assemble(root, path.stem, "single", {path.name: header}, [], None)
    if not stat.S_ISDIR(info.st_mode):
        raise ArtifactError(f"{path}: not a regular file or directory")
    name = path.resolve().name
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot list directory ({exc.strerror or exc})") from exc
    if ADAPTER_CONFIG in entries:
        return _resolve_adapter(path, name)
    if INDEX_NAME in entries:
        return _resolve_index(path, name)
    weights = [e for e in entries if e.endswith(".safetensors")]
    if SINGLE_NAME in weights and len(weights) == 1:
        extra: list[ArtifactFile] = []
        config = _config(path, extra)
        return _assemble(path, name, "single", _headers(path, [SINGLE_NAME]), extra, config)
    if weights:
        return _resolve_pattern(path, name, weights)
    if any(e.endswith(PICKLE_SUFFIXES) for e in entries):
        raise PickleFormatError(f"{path}: only pickle-based weights found; tg-verify reads safetensors only")
    raise NoModelError(f"{path}: no model found (expected {SINGLE_NAME}, {INDEX_NAME}, shards or {ADAPTER_CONFIG})")
