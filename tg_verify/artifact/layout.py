"""Resolve a path to an Artifact: single file, indexed shards, shards by name, PEFT adapter.

The rules (what is accepted, what is refused, what is only warned about) are in docs/artifact.md.
Every header is validated before the Artifact exists; no tensor data is read here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path
from typing import Any

from tg_verify.artifact import fp8, intquant, mxfp4
from tg_verify.artifact.errors import (
    AdapterLayoutError,
    AmbiguousLayoutError,
    DuplicateTensorError,
    IncompleteShardSetError,
    IndexFormatError,
    IndexMismatchError,
    MissingShardError,
    NoModelError,
    NotRegularFileError,
    NotSafetensorsError,
    PickleFormatError,
    ShardSetError,
    TooManyTensorsError,
    UnlistedShardError,
    UnreadableFileError,
    shown,
)
from tg_verify.artifact.formats import FOREIGN_WEIGHT_SUFFIXES, format_for_path, other_format_files, resolve_with
from tg_verify.artifact.header import Header, read_header, valid_name
from tg_verify.artifact.loading import classify
from tg_verify.artifact.model import Artifact, ArtifactFile, TensorInfo, natural_key, tensor_budget
from tg_verify.artifact.safeio import MAX_JSON_BYTES, load_json_file, read_json_file, stat_path

INDEX_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG_NAME = "config.json"
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# <prefix>-00001-of-00005.safetensors (Hugging Face, MLX, diffusers) and the rarer `_` / `.` separators.
SHARD_PATTERN = re.compile(r"^(?P<prefix>.+?)[-_.](?P<index>[0-9]+)-of-(?P<total>[0-9]+)\.safetensors$")
# consolidated.00.safetensors: Meta-style tensor-parallel slices (same names, split shapes), not a name split.
TENSOR_PARALLEL_PATTERN = re.compile(r"^consolidated\.[0-9]+\.safetensors$")

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CONFIG_NAME", "INDEX_NAME", "MAX_JSON_BYTES", "PICKLE_SUFFIXES",
           "SHARD_PATTERN", "SINGLE_NAME", "read_json_file", "resolve", "resolve_safetensors_file"]


def _headers(root: Path, relpaths: list[str]) -> dict[str, Header]:
    return {rel: read_header(root / rel) for rel in relpaths}


def _symlink_note(root: Path, relpaths: list[str]) -> list[str]:
    links = [rel for rel in relpaths if os.path.islink(root / rel)]
    if not links:
        return []
    first = links[0]
    return [f"followed symbolic links for {len(links)} file(s) (e.g. {shown(first)} -> "
            f"{shown(os.readlink(root / first))}); digests are of the link targets"]


def _assemble(root: Path, name: str, layout: str, weights: dict[str, Header], extra: list[ArtifactFile],
              config: dict[str, Any] | None, warnings: list[str], adapter_config: dict[str, Any] | None = None,
              expected: dict[str, str] | None = None, index_name: str = INDEX_NAME,
              other_weights: tuple[str, ...] = ()) -> Artifact:
    """Merge validated headers into one Artifact: cross-file duplicate and index checks, canonical order."""
    tensors: list[TensorInfo] = []
    owner: dict[str, str] = {}
    notes = list(warnings)
    too_many = tensor_budget(sum(len(h.tensors) for h in weights.values()),
                             sum(h.file_size - h.data_start for h in weights.values()))
    if too_many is not None:
        raise TooManyTensorsError(f"{shown(root)}: {too_many}; set TG_VERIFY_MAX_TENSORS to a larger count to "
                                  f"accept a model like this")
    for rel, header in weights.items():
        if not header.canonical:
            notes.append(f"{shown(rel)}: header JSON has leading or extra whitespace padding (accepted; the "
                         f"reference writer pads only to 8 bytes)")
        for raw in header.tensors:
            if raw.name in owner:
                raise DuplicateTensorError(f"{shown(root / rel)}: tensor '{shown(raw.name)}' is also stored in "
                                           f"{shown(owner[raw.name])}; each tensor must live in exactly one file",
                                           file=str(root / rel))
            owner[raw.name] = rel
            tensors.append(TensorInfo(raw.name, raw.dtype, raw.shape, rel, header.data_start + raw.start,
                                      header.data_start + raw.stop))
    if expected is not None:
        index_path, index_file = shown(root / index_name), str(root / index_name)
        for tensor_name, shard in expected.items():
            if tensor_name not in owner:
                raise IndexMismatchError(f"{index_path}: weight_map puts '{shown(tensor_name)}' in {shown(shard)}, "
                                         f"which does not contain it", file=index_file)
            if owner[tensor_name] != shard:
                raise IndexMismatchError(f"{index_path}: weight_map puts '{shown(tensor_name)}' in {shown(shard)}, "
                                         f"but it is stored in {shown(owner[tensor_name])}", file=index_file)
        for tensor_name, rel in owner.items():
            if tensor_name not in expected:
                raise IndexMismatchError(f"{index_path}: tensor '{shown(tensor_name)}' stored in {shown(rel)} is "
                                         f"missing from weight_map", file=index_file)
    tensors = mxfp4.pack(tensors, config, root)  # each MXFP4 pair as the float parameter it loads as
    tensors = intquant.pack(tensors, config, root)  # each GPTQ/AWQ layer's parts as the float weight it loads as
    tensors.sort(key=lambda t: natural_key(t.name))
    unexpected: tuple[TensorInfo, ...] = ()
    architecture = None
    components: tuple[str, ...] = ()
    text_config = None
    quantisation = None
    if layout != "adapter":  # an adapter's own tensors are checked against its base when merged (peft.py)
        # an FP8 checkpoint's scales are set apart first: the grammar names weights, and each scale goes where its
        # weight goes (loaded: applied to it when read; unexpected: reported with it)
        scales = fp8.plan(tensors, config, root)
        stored = [t for t in tensors if t.name not in scales.companion_names] if scales is not None else tensors
        loaded = classify(stored, config, shown(root))
        tensors, architecture = list(loaded.loaded), loaded.architecture
        unexpected = intquant.stored(mxfp4.stored(loaded.unexpected))
        components, text_config = loaded.components, loaded.text_config
        notes.extend(loaded.notes)
        if scales is not None:
            unexpected, quantisation = scales.split(tensors, unexpected)
            unexpected = tuple(sorted(unexpected, key=lambda t: natural_key(t.name)))
        else:
            quantisation = intquant.quantisation(tensors)  # GPTQ/AWQ: each weight's parts, companions
    role = "adapter-weights" if layout == "adapter" else "weights"
    files = [ArtifactFile(rel, h.file_size, role) for rel, h in weights.items()] + extra  # type: ignore[arg-type]
    files.sort(key=lambda f: natural_key(f.path))
    notes.extend(_symlink_note(root, [f.path for f in files]))
    return Artifact(root=root, name=name, layout=layout,  # type: ignore[arg-type]
                    files=tuple(files), tensors=tuple(tensors),
                    config=config, adapter_config=adapter_config,
                    metadata={rel: h.metadata for rel, h in weights.items() if h.metadata},
                    warnings=tuple(notes), unexpected=unexpected, architecture=architecture,
                    other_weights=tuple(other_weights), components=components, text_config=text_config,
                    quantisation=quantisation)


def _config(root: Path, entries: set[str], extra: list[ArtifactFile]) -> dict[str, Any] | None:
    """config.json as metadata (model_type, dims): parsed as data, never executed."""
    if CONFIG_NAME not in entries:
        return None
    document, size = load_json_file(root / CONFIG_NAME, "config.json")
    extra.append(ArtifactFile(CONFIG_NAME, size, "config"))
    return document


def _ignored(files: list[str], why: str) -> list[str]:
    if not files:
        return []
    listed = ", ".join(shown(f) for f in files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return [f"ignored {listed}: {why}"]


def _index_entries(index_path: Path, index: dict[str, Any]) -> dict[str, str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise IndexFormatError(f"{shown(index_path)}: 'weight_map' must be a non-empty object of tensor name -> "
                               f"shard file name", file=str(index_path))
    for tensor_name, shard in weight_map.items():
        if not valid_name(tensor_name):
            raise IndexFormatError(f"{shown(index_path)}: weight_map key '{shown(tensor_name)}' is not a valid "
                                   f"tensor name (empty or control characters)", file=str(index_path))
        if (not isinstance(shard, str) or not valid_name(shard) or not shard.endswith(SUFFIX)
                or "/" in shard or "\\" in shard or shard.startswith(".")):
            raise IndexFormatError(f"{shown(index_path)}: weight_map['{shown(tensor_name)}'] must name a "
                                   f".safetensors file in the same directory, got {shown(repr(shard)[:80])}",
                                   file=str(index_path))
    return dict(weight_map)


def _resolve_index(root: Path, name: str, index_name: str, entries: set[str], warnings: list[str]) -> Artifact:
    index_path = root / index_name
    index, index_size = load_json_file(index_path, "shard index")
    weight_map = _index_entries(index_path, index)
    shards = sorted(set(weight_map.values()), key=natural_key)
    for shard in shards:
        if shard not in entries:
            raise MissingShardError(f"{shown(index_path)}: shard {shown(shard)} named in weight_map does not exist",
                                    file=str(index_path))
    present = sorted((e for e in entries if e.endswith(SUFFIX) and e != ADAPTER_WEIGHTS), key=natural_key)
    unlisted = [e for e in present if e not in weight_map.values()]
    stray = [e for e in unlisted if SHARD_PATTERN.match(e) or e == SINGLE_NAME]
    if stray:
        kind = UnlistedShardError if stray[0] != SINGLE_NAME else AmbiguousLayoutError
        raise kind(f"{shown(index_path)}: {shown(stray[0])} is not mentioned in weight_map; remove it or fix the index "
                   f"(a loader might read it instead of the indexed shards)", file=str(index_path))
    warnings += _ignored(unlisted, f"not in {index_name}'s weight_map, so not part of this artifact and not "
                                   f"verified (some runtimes load such files instead)")
    extra = [ArtifactFile(index_name, index_size, "index")]
    config = _config(root, entries, extra)
    headers = _headers(root, shards)
    artifact = _assemble(root, name, "indexed-shards", headers, extra, config, warnings, expected=weight_map,
                         index_name=index_name)
    metadata = index.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if isinstance(total, int) and not isinstance(total, bool):
        actual = sum(t.nbytes for t in artifact.tensors)
        if total != actual:
            artifact = dataclasses.replace(artifact, warnings=artifact.warnings + (
                f"{index_name}: metadata.total_size {total} differs from the tensors' {actual} bytes (informational: "
                f"writers compute it differently)",))
    return artifact


def _shard_sets(root: Path, files: list[str]) -> tuple[str, list[str]]:
    """The one complete `<prefix>-i-of-N` set among `files`: (description, members in order)."""
    groups: dict[tuple[str, int], dict[int, str]] = {}
    for file_name in files:
        match = SHARD_PATTERN.match(file_name)
        assert match is not None
        key = (match["prefix"], int(match["total"]))
        number = int(match["index"])
        if number in groups.setdefault(key, {}):
            raise IncompleteShardSetError(f"{shown(root)}: shard {number} of {key[1]} appears twice "
                                          f"({shown(groups[key][number])} and {shown(file_name)})")
        groups[key][number] = file_name
    if len(groups) != 1:
        sets = sorted(f"{shown(p)}-*-of-{t}" for p, t in groups)
        raise ShardSetError(f"{shown(root)}: several shard sets ({', '.join(sets[:4])}) and no "
                            f"{INDEX_NAME}; keep one set or add an index")
    (prefix, total), members = next(iter(groups.items()))
    described = f"{shown(prefix)}-*-of-{total}"
    out_of_range = sorted(n for n in members if not 1 <= n <= total)
    if total == 0 or out_of_range:
        raise IncompleteShardSetError(f"{shown(root)}: shard set {described} has numbers outside 1..{total} "
                                      f"({', '.join(map(str, out_of_range[:5])) or 'total is 0'})")
    if len(members) != total:
        missing = [n for n in range(1, min(total, len(members) + 6) + 1) if n not in members][:5]
        raise MissingShardError(f"{shown(root)}: shard set {described} is incomplete: {total - len(members)} of "
                                f"{total} missing (first: {', '.join(map(str, missing))})")
    return described, [members[n] for n in range(1, total + 1)]


def _weight_like(name: str) -> bool:
    """A file a runtime could load weights from: safetensors, pickle, or another format's weights."""
    return name.endswith((SUFFIX, *PICKLE_SUFFIXES, *FOREIGN_WEIGHT_SUFFIXES)) or format_for_path(name) is not None


def _resolve_directory(root: Path, name: str) -> Artifact:
    """A model directory: the artifact, with every other weight file beside it named in `other_weights`."""
    try:
        names = sorted(entry.name for entry in os.scandir(root))
    except OSError as exc:
        raise UnreadableFileError(f"{shown(root)}: cannot list directory ({exc.strerror or exc})") from None
    entries = {n for n in names if valid_name(n)}
    warnings = _ignored([n for n in names if n not in entries and (_weight_like(n) or n.endswith(".json"))],
                        "file names that are not valid UTF-8 text are never read")
    artifact = _resolve_entries(root, name, entries, warnings)
    used = {f.path for f in artifact.files}
    others = tuple(sorted((e for e in entries if _weight_like(e) and e not in used and not os.path.isdir(root / e)),
                          key=natural_key))
    return dataclasses.replace(artifact, other_weights=others) if others else artifact


def _resolve_entries(root: Path, name: str, entries: set[str], warnings: list[str]) -> Artifact:
    pickles = sorted((e for e in entries if e.endswith(PICKLE_SUFFIXES)), key=natural_key)
    weights = sorted((e for e in entries if e.endswith(SUFFIX)), key=natural_key)
    by_format = other_format_files(sorted(entries, key=natural_key))
    foreign = sorted({e for e in entries if e.endswith(FOREIGN_WEIGHT_SUFFIXES)}
                     | {f for files in by_format.values() for f in files}, key=natural_key)
    if pickles and (weights or foreign or ADAPTER_CONFIG in entries):
        warnings += _ignored(pickles, "pickle-based weights are never loaded")
    if foreign and (weights or ADAPTER_CONFIG in entries):
        warnings += _ignored(foreign, "weights in another format (GGUF, TF/Keras, Flax, ONNX, ...) are not part of "
                                      "this artifact and not verified, though some runtimes load them instead")
    if ADAPTER_CONFIG in entries:
        return _resolve_adapter(root, name, entries, warnings)
    indexes = sorted(e for e in entries if e.endswith(INDEX_SUFFIX))
    if INDEX_NAME in indexes:
        warnings += _ignored([i for i in indexes if i != INDEX_NAME], f"only {INDEX_NAME} is used")
        return _resolve_index(root, name, INDEX_NAME, entries, warnings)
    if len(indexes) > 1:
        raise AmbiguousLayoutError(f"{shown(root)}: several shard indexes ({', '.join(map(shown, indexes[:4]))}); "
                                   f"keep one")
    if indexes:
        return _resolve_index(root, name, indexes[0], entries, warnings)
    if ADAPTER_WEIGHTS in weights:
        raise AdapterLayoutError(f"{shown(root)}: {ADAPTER_WEIGHTS} without {ADAPTER_CONFIG}; a PEFT adapter "
                                 f"needs both")
    shard_named = [w for w in weights if SHARD_PATTERN.match(w)]
    others = [w for w in weights if w not in shard_named]
    extra: list[ArtifactFile] = []
    if SINGLE_NAME in weights:
        if shard_named:
            raise AmbiguousLayoutError(f"{shown(root)}: both {SINGLE_NAME} and shards ({shown(shard_named[0])}, ...) "
                                       f"without an index; keep one copy of the weights")
        warnings += _ignored([w for w in others if w != SINGLE_NAME], f"{SINGLE_NAME} is the model; other "
                                                                      f"files are not verified")
        config = _config(root, entries, extra)
        return _assemble(root, name, "single", _headers(root, [SINGLE_NAME]), extra, config, warnings)
    if shard_named:
        described, members = _shard_sets(root, shard_named)
        warnings += _ignored(others, f"not part of the shard set {described}, so not verified")
        config = _config(root, entries, extra)
        return _assemble(root, name, "shards", _headers(root, members), extra, config, warnings)
    if len(others) == 1:
        config = _config(root, entries, extra)
        return _assemble(root, name, "single", _headers(root, others), extra, config, warnings)
    if others:
        if all(TENSOR_PARALLEL_PATTERN.match(w) for w in others):
            raise ShardSetError(f"{shown(root)}: {', '.join(others[:3])} are tensor-parallel slices (each holds part "
                                f"of every tensor); convert to Hugging Face format (model-0000i-of-0000N.safetensors)")
        raise ShardSetError(f"{shown(root)}: {len(others)} .safetensors files ({', '.join(map(shown, others[:3]))}"
                            f"{', ...' if len(others) > 3 else ''}) but no index and no <prefix>-0000i-of-0000N "
                            f"naming; pass one file, or add {INDEX_NAME}")
    readable = [f for files in by_format.values() for f in files]
    if len(readable) > 1:
        raise AmbiguousLayoutError(f"{shown(root)}: several weight files ({', '.join(map(shown, readable[:4]))}) "
                                   f"and no safetensors model; pass one file")
    if readable:
        fmt = format_for_path(readable[0])
        assert fmt is not None
        artifact = resolve_with(fmt, root / readable[0])
        return dataclasses.replace(artifact, warnings=tuple(warnings) + artifact.warnings)
    if pickles:
        raise PickleFormatError(f"{shown(root)}: only pickle-based weights ({shown(pickles[0])}); tg-verify reads "
                                f"safetensors only (pickle can execute code): convert them first")
    raise NoModelError(f"{shown(root)}: no model found (expected {SINGLE_NAME}, {INDEX_NAME}, "
                       f"<prefix>-0000i-of-0000N.safetensors shards or {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")


def _resolve_adapter(root: Path, name: str, entries: set[str], warnings: list[str]) -> Artifact:
    adapter_config, config_size = load_json_file(root / ADAPTER_CONFIG, "adapter config")
    if ADAPTER_WEIGHTS not in entries:
        if any(f"adapter_model{s}" in entries for s in PICKLE_SUFFIXES):
            raise PickleFormatError(f"{shown(root)}: adapter weights are in a pickle format; only "
                                    f"{ADAPTER_WEIGHTS} is read")
        raise AdapterLayoutError(f"{shown(root)}: {ADAPTER_CONFIG} present but {ADAPTER_WEIGHTS} is missing")
    extra = [ArtifactFile(ADAPTER_CONFIG, config_size, "adapter-config")]
    others = sorted((e for e in entries if e.endswith(SUFFIX) and e != ADAPTER_WEIGHTS), key=natural_key)
    warnings += _ignored(others, "a PEFT adapter directory is read as the adapter only")
    headers = _headers(root, [ADAPTER_WEIGHTS])
    return _assemble(root, name, "adapter", headers, extra, None, warnings, adapter_config=adapter_config)


def resolve(path: str | os.PathLike[str]) -> Artifact:
    """Resolve `path` (a .safetensors file, a shard index, or a model directory) to a validated Artifact.

    Symbolic links are followed (Hugging Face cache snapshots are links into blobs/) and reported in
    `warnings`; loops, FIFOs and devices are refused before any read. No tensor data is touched.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise NoModelError(f"{shown(path)}: no such file or directory", file=str(path))
    info = stat_path(path, "model path")
    if stat.S_ISDIR(info.st_mode):
        return _resolve_directory(path, path.resolve().name or shown(path))
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFileError(f"{shown(path)}: not a regular file or directory (a FIFO, device or socket is "
                                  f"never read)", file=str(path))
    file_name = path.name
    if file_name.endswith(INDEX_SUFFIX):
        root = path.parent
        try:
            entries = {entry.name for entry in os.scandir(root)}
        except OSError as exc:
            raise UnreadableFileError(f"{shown(root)}: cannot list directory ({exc.strerror or exc})") from None
        return _resolve_index(root, path.resolve().parent.name, file_name, entries, [])
    if file_name.endswith(PICKLE_SUFFIXES):
        raise PickleFormatError(f"{shown(path)}: pickle-based weights are refused (loading them can execute code); "
                                f"convert to safetensors", file=str(path))
    fmt = format_for_path(path)
    if fmt is None:
        hint = " (pass the model directory)" if file_name.endswith(".json") else ""
        raise NotSafetensorsError(f"{shown(path)}: not a .safetensors or .gguf file{hint}", file=str(path))
    return resolve_with(fmt, path)


def resolve_safetensors_file(path: Path) -> Artifact:
    """One .safetensors file passed directly: a `single` artifact without config.json."""
    file_name = path.name
    header = read_header(path)
    match = SHARD_PATTERN.match(file_name)
    notes = [f"{shown(file_name)} is shard {int(match['index'])} of {int(match['total'])}: only its tensors are "
             f"included; pass the directory to check the whole model"] if match else []
    return _assemble(path.parent, file_name[: -len(SUFFIX)] or file_name, "single", {file_name: header}, [], None,
                     notes)
