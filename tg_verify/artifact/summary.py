"""The `inspect` document: what an artifact holds, from its headers alone, as JSON-safe data.

Built here (not in the CLI) so the tensor list and counts are one definition, identical for the
same weights in every layout: per-file details live under `files`, never in `tensors`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from tg_verify.artifact.categories import CATEGORIES, categorize
from tg_verify.artifact.digest import root_digest
from tg_verify.artifact.errors import shown
from tg_verify.artifact.model import DECODABLE_DTYPES, Artifact
from tg_verify.artifact.mxfp4 import DTYPE as MXFP4
from tg_verify.errors import TgVerifyError

SCHEMA = "tg-verify/inspect/v1"
CHECKS = ("header-length", "utf8-json-object", "no-duplicate-keys", "known-dtypes", "shapes", "offsets-contiguous",
          "sizes-match-dtype", "file-fully-covered", "metadata-strings", "layout-complete", "no-duplicate-tensors")
GGUF_CHECKS = ("magic-version", "counts-fit", "strings-and-arrays-bounded", "no-duplicate-keys", "alignment",
               "tensor-names", "shapes", "known-types", "offsets-contiguous-aligned", "zero-padding",
               "file-fully-covered", "architecture-known", "metadata-consistent", "required-tensors",
               "runtime-loaded")
CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
               "tie_word_embeddings", "torch_dtype", "dtype")
ADAPTER_KEYS = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "task_type")


def _json_safe(value: Any) -> Any:
    """A scalar or list of scalars from an untrusted JSON file, or None when it cannot be shown faithfully."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON's 1e400 parses to inf
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return shown(value)
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value) and len(value) <= 64:
        return [item for item in map(_json_safe, value) if item is not None]
    return None


def _excerpt(document: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any] | None:
    if document is None:
        return None
    picked = {key: _json_safe(document[key]) for key in keys if key in document}
    return {k: v for k, v in picked.items() if v is not None}


def describe(artifact: Artifact, digests: dict[str, str] | None = None) -> dict[str, Any]:
    """The inspect document for a resolved (hence valid) artifact; `digests` from file_digests() if hashed."""
    per_file = Counter(t.file for t in artifact.tensors)
    files = []
    for entry in artifact.files:
        item: dict[str, Any] = {"path": shown(entry.path), "role": entry.role, "size": entry.size}
        if entry.role in ("weights", "adapter-weights"):
            item["tensors"] = per_file[entry.path]
        if digests is not None:
            item["sha256"] = digests[entry.path]
        files.append(item)
    dtypes: dict[str, dict[str, int]] = {}
    categories: dict[str, dict[str, int]] = {c: {"tensors": 0, "params": 0} for c in CATEGORIES}
    tensors = []
    for info in artifact.tensors:
        category = categorize(info.name)
        for bucket in (dtypes.setdefault(info.dtype, {"tensors": 0, "params": 0}), categories[category]):
            bucket["tensors"] += 1
            bucket["params"] += info.numel
        tensors.append({"name": info.name, "dtype": info.dtype, "shape": list(info.shape), "params": info.numel,
                        "category": category})
    if artifact.format == "gguf":
        from tg_verify.artifact.gguf import decodable

        undecodable = sorted(d for d in dtypes if not decodable(d))
    else:
        undecodable = sorted(d for d in dtypes if d not in DECODABLE_DTYPES and d != MXFP4)  # MXFP4: artifact/mxfp4.py
    warnings = list(artifact.warnings)
    if artifact.unexpected:
        names = [shown(t.name) for t in artifact.unexpected]
        warnings.append(f"TGV_UNEXPECTED_TENSORS: {len(names)} stored tensor(s) are not loaded by a "
                        f"{artifact.architecture} runtime and are never fingerprinted: "
                        + ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                                                   else ""))
    if undecodable:
        warnings.append(f"dtype(s) {', '.join(undecodable)} cannot be decoded to float32: fingerprinting will refuse")
    matrices = sum(1 for t in artifact.tensors if len(t.shape) == 2)
    if not matrices:
        warnings.append("no 2-D tensors: the TensorGuard fingerprint analyses matrices only and cannot be computed")
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "artifact": {"name": shown(artifact.name), "path": shown(artifact.root), "layout": artifact.layout,
                     "format": artifact.format, "model_type": _json_safe(artifact.model_type),
                     "architecture": artifact.architecture},
        # a multimodal wrapper's dimensions are its language model's (text_config)
        "config": _excerpt(artifact.text_config or artifact.config, CONFIG_KEYS),
        "adapter": _excerpt(artifact.adapter_config, ADAPTER_KEYS),
        "files": files,
        "tensor_count": len(artifact.tensors),
        "total_params": artifact.total_params,
        "total_bytes": sum(t.nbytes for t in artifact.tensors),
        "matrices": matrices,
        "dtypes": dict(sorted(dtypes.items())),
        "categories": categories,
        "tensors": tensors,
        "unexpected_tensors": [{"name": shown(t.name), "file": shown(t.file), "dtype": t.dtype, "shape": list(t.shape)}
                               for t in artifact.unexpected],
        "component_tensors": len(artifact.components),  # a wrapper's towers: bound by digest, not fingerprinted
        # an FP8 checkpoint: its float8 weights are read times these scales, which are bound by digest, not weights
        "quantization": None if artifact.quantisation is None else {
            "method": artifact.quantisation.method, "scaled_weights": len(artifact.quantisation.scaled),
            "scale_tensors": [shown(t.name) for t in artifact.quantisation.companions]},
        "other_weights": [shown(name) for name in artifact.other_weights],
        "metadata": {shown(k): v for k, v in sorted(artifact.metadata.items())},
        "validation": {"status": "valid", "header_only": True,
                       "checks": list(GGUF_CHECKS if artifact.format == "gguf" else CHECKS), "warnings": warnings},
    }
    if digests is not None:
        document["root_digest"] = root_digest(digests)
    return document


def describe_error(path: str, error: TgVerifyError) -> dict[str, Any]:
    """The inspect document for an artifact that failed validation (still machine-readable)."""
    return {"schema": SCHEMA, "artifact": {"path": shown(path)},
            "validation": {"status": "invalid", "error": {"code": error.code, "type": type(error).__name__,
                                                          "message": shown(str(error))}}}
