"""PEFT adapters (LoRA, DoRA, IA3), header-only half: config, key names, pattern matching, fit checks, merge plan.

This module does not import torch (so `inspect --against` stays light); the merge itself is artifact/merge.py.
Public API (used by the pipeline, the fingerprint command and batch mode):
- `tg_verify.artifact.merge.open_merged(adapter, base) -> MergedReader` (torch): a reader over the BASE's
  tensors that returns the merged weights (what peft's `merge_and_unload()` gives), one tensor at a time.
- `check_adapter(adapter, base_shapes) -> list[AdapterFinding]`: header-only fit check against tensor shapes.
- `check_adapter_against_tensors(adapter, base_tensors) -> list[AdapterFinding]`: the same check against a
  reference fingerprint's structural metadata (`Fingerprint.tensors`), for when the base weights are absent.
- `base_record(base, digests) -> dict`: what a merged adapter's fingerprint records about its base, as
  `Fingerprint.artifact["base"] = {name, layout, files: [{path, size, sha256}], root_digest}`.
- `check_base_name(adapter, declared) -> list[AdapterFinding]`: `base_model_name_or_path` versus the
  declared base's names (a claim only: TGV_ADAPTER_BASE_NAME_MISMATCH is a warning the policy may make fatal).
Malformed or unsupported adapters raise AdapterError subclasses; misfits against a base are findings
(severity "error"), which `open_merged` turns into AdapterMismatchError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from tg_verify.artifact.digest import root_digest
from tg_verify.artifact.errors import about_file
from tg_verify.artifact.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tg_verify.artifact.model import Artifact, TensorInfo
from tg_verify.artifact.patterns import PatternTable, fullmatch
from tg_verify.errors import AdapterError

SUPPORTED_TYPES: tuple[str, ...] = ("LORA", "IA3")
SUPPORTED_TEXT = "LoRA (incl. rsLoRA, DoRA on linear layers, rank/alpha patterns, lora_bias) and IA3"
# Config fields of LoRA variants whose merge is not W + scale*B*A: refused rather than merged wrongly.
LORA_UNSUPPORTED_FIELDS: dict[str, str] = {
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication (it changes the base's layer structure)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "mica": "MiCA",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "Megatron parallel LoRA (megatron_config)",
}
# Initialisations that rewrite the base weights: the saved adapter only fits that rewritten residual base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# transformers architectures built from Conv1D (weights stored [in, out]); peft forces fan_in_fan_out there.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})

# Parameter names of adapter formats that are not PEFT's (kohya/diffusers LoRA, LyCORIS LoHa/LoKr).
_FOREIGN_KINDS = frozenset({"lora_down", "lora_up", "hada_w1_a", "hada_w1_b", "lokr_w1", "lokr_w2", "oft_blocks"})
_PARAM_KINDS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                          "ia3_l"})
_STRIP_PREFIXES = ("base_model.model.", "base_model.")
_WRAPPER_PARTS = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")

Severity = Literal["error", "warning", "info"]


class UnsupportedAdapterError(AdapterError):
    """An adapter type or feature whose merge tg-verify does not implement."""

    code = "TGV_ADAPTER_UNSUPPORTED"


class AdapterFormatError(AdapterError):
    """An adapter whose config or tensor names are malformed or inconsistent with each other."""

    code = "TGV_ADAPTER_FORMAT"


class AdapterMismatchError(AdapterError):
    """An adapter that does not fit the base it is merged onto (missing modules, misfit shapes)."""

    code = "TGV_ADAPTER_MISMATCH"


@dataclass(frozen=True)
class AdapterFinding:
    """One check result: a stable reason code, a severity and a one-line sentence naming what and where."""

    code: str
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


# ----------------------------------------------------------------------------------------------- parsing


@dataclass
class AdapterModule:
    """The adapter tensors that act on one base module (a Linear or Embedding), by saved name."""

    path: str  # module path as peft saw it (adapter key without prefix and parameter kind)
    params: dict[str, TensorInfo] = field(default_factory=dict)  # e.g. 'lora_A.weight', 'ia3_l'


@dataclass
class AdapterSpec:
    """A parsed, validated adapter: its type, merge settings and tensors grouped by module."""

    artifact: Artifact
    peft_type: str
    config: dict[str, Any]
    modules: dict[str, AdapterModule]
    replacements: dict[str, TensorInfo]  # base tensor path -> saved full tensor (modules_to_save, biases)
    ranks: PatternTable  # rank_pattern, matched as peft does (in linear time)
    alphas: PatternTable  # alpha_pattern

    @property
    def base_name(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value.strip() if isinstance(value, str) and value.strip() else None


def _where(adapter: Artifact) -> str:
    return str(adapter.root)


def _split_key(name: str) -> tuple[str, str | None, str]:
    """(module path, parameter kind or None, parameter suffix) of one saved adapter tensor name."""
    for prefix in _STRIP_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = _WRAPPER_PARTS.sub("", name)
    parts = name.split(".")
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in _PARAM_KINDS:
            module = ".".join(parts[:index])
            rest = parts[index + 1:]
            if rest and rest[-1] in ("weight", "bias"):
                suffix = rest[-1]
                rest = rest[:-1]
            else:
                suffix = ""
            if len(rest) > 1 or not module:
                return name, None, ""
            key = parts[index] + (f".{suffix}" if suffix else "")
            return module, key, rest[0] if rest else ""
    return name, None, ""


def _check_type(config: dict[str, Any], where: str) -> str:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise AdapterFormatError(f"{where}: adapter_config.json lacks a 'peft_type' string "
                                 f"(supported: {SUPPORTED_TEXT})", field="peft_type")
    normalised = peft_type.upper().replace("-", "_")
    if normalised not in SUPPORTED_TYPES:
        raise UnsupportedAdapterError(f"{where}: adapter type {peft_type} cannot be merged by tg-verify "
                                      f"(supported: {SUPPORTED_TEXT}); merge it with peft and pass the full weights",
                                      field="peft_type")
    return normalised


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(config: dict[str, Any], peft_type: str, where: str) -> None:
    def expect(key: str, ok: bool, what: str) -> None:
        if key in config and config[key] is not None and not ok:
            raise AdapterFormatError(f"{where}: adapter_config.json field '{key}' must be {what}, "
                                     f"got {config[key]!r}", field=key)

    expect("fan_in_fan_out", isinstance(config.get("fan_in_fan_out"), bool), "true or false")
    expect("modules_to_save", isinstance(config.get("modules_to_save"), list)
           and all(isinstance(m, str) for m in config.get("modules_to_save") or []), "a list of module names")
    target = config.get("target_modules")
    expect("target_modules", isinstance(target, str) or (isinstance(target, list)
                                                          and all(isinstance(t, str) for t in target)),
           "a string or a list of strings")
    if peft_type == "IA3":
        ff = config.get("feedforward_modules")
        expect("feedforward_modules", isinstance(ff, str) or (isinstance(ff, list)
                                                              and all(isinstance(t, str) for t in ff)),
               "a string or a list of strings")
        return
    r = config.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise AdapterFormatError(f"{where}: adapter_config.json field 'r' must be a positive integer, got {r!r}",
                                 field="r")
    if not _is_number(config.get("lora_alpha")):
        raise AdapterFormatError(f"{where}: adapter_config.json field 'lora_alpha' must be a finite number, "
                                 f"got {config.get('lora_alpha')!r}", field="lora_alpha")
    for key in ("use_rslora", "use_dora", "lora_bias"):
        expect(key, isinstance(config.get(key), bool), "true or false")
    checks: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
        ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"))
    for key, check, what in checks:
        pattern = config.get(key)
        expect(key, isinstance(pattern, dict) and all(isinstance(k, str) and check(v) for k, v in pattern.items()),
               f"an object mapping module patterns to {what}")
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only", None):
        raise AdapterFormatError(f"{where}: adapter_config.json field 'bias' must be none, all or lora_only, "
                                 f"got {bias!r}", field="bias")
    for key, what in LORA_UNSUPPORTED_FIELDS.items():
        value = config.get(key)
        if value not in (None, False, [], {}, ""):
            raise UnsupportedAdapterError(f"{where}: {what} is not supported by tg-verify's merge (supported: "
                                          f"{SUPPORTED_TEXT}); merge it with peft and pass the full weights", field=key)


def parse_adapter(adapter: Artifact) -> AdapterSpec:
    """Validate an adapter's config and group its tensors by the base module they act on (header only).

    Errors name their file: adapter_config.json for the config's fields and patterns, the adapter's weights
    file for its tensors."""
    if adapter.layout != "adapter" or adapter.adapter_config is None:
        raise AdapterFormatError(f"{_where(adapter)}: not a PEFT adapter (expected adapter_config.json + "
                                 f"adapter_model.safetensors)")
    with about_file(adapter.root / ADAPTER_WEIGHTS):
        return _parse_adapter(adapter, dict(adapter.adapter_config))


def _parse_adapter(adapter: Artifact, config: dict[str, Any]) -> AdapterSpec:
    """parse_adapter's checks: the config's fields, then the tensors grouped by module and checked against it."""
    where = _where(adapter)
    with about_file(adapter.root / ADAPTER_CONFIG):
        peft_type = _check_type(config, where)
        _check_fields(config, peft_type, where)
    allowed = {"IA3": {"ia3_l"}, "LORA": {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A",
                                          "lora_embedding_B"}}[peft_type]
    if peft_type == "LORA" and config.get("use_dora"):
        allowed = allowed | {"lora_magnitude_vector"}
    modules: dict[str, AdapterModule] = {}
    replacements: dict[str, TensorInfo] = {}
    adapter_names: set[str] = set()
    for info in adapter.tensors:
        if _FOREIGN_KINDS & set(info.name.split(".")):
            raise UnsupportedAdapterError(f"{where}: adapter tensor '{info.name}' is in a kohya/LyCORIS-style "
                                          f"format, not PEFT's; only PEFT adapters are merged "
                                          f"(supported: {SUPPORTED_TEXT})")
        module, kind, adapter_name = _split_key(info.name)
        if kind is None:
            if any(part in _PARAM_KINDS for part in module.split(".")):
                raise AdapterFormatError(f"{where}: adapter tensor '{info.name}' has an unrecognised layout")
            if module in replacements:
                raise AdapterFormatError(f"{where}: adapter tensors '{replacements[module].name}' and "
                                         f"'{info.name}' both replace base tensor '{module}'")
            replacements[module] = info
            continue
        if kind not in allowed:
            raise AdapterFormatError(
                f"{where}: adapter tensor '{info.name}' ({kind}) does not belong to a {peft_type} adapter"
                + (" with use_dora=false" if kind == "lora_magnitude_vector" else ""))
        if adapter_name:
            adapter_names.add(adapter_name)
        if info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise AdapterFormatError(f"{where}: adapter tensor '{info.name}' has dtype {info.dtype}; only "
                                     f"floating-point adapter weights (F32, F16, BF16, F64) can be merged")
        entry = modules.setdefault(module, AdapterModule(module))
        if kind in entry.params:
            raise AdapterFormatError(f"{where}: adapter holds two '{kind}' tensors for module '{module}'")
        entry.params[kind] = info
    if len(adapter_names) > 1:
        raise AdapterFormatError(f"{where}: adapter_model.safetensors mixes several adapters "
                                 f"({', '.join(sorted(adapter_names))}); save one adapter per directory")
    with about_file(adapter.root / ADAPTER_CONFIG):
        ranks = PatternTable(config.get("rank_pattern") or {}, where, "rank_pattern")
        alphas = PatternTable(config.get("alpha_pattern") or {}, where, "alpha_pattern")
    for adapted in modules.values():
        _check_module_params(adapted, peft_type, config, where, ranks)
    if not modules and not replacements:
        raise AdapterFormatError(f"{where}: adapter_model.safetensors holds no adapter tensors")
    return AdapterSpec(adapter, peft_type, config, modules, replacements, ranks, alphas)


def _check_module_params(module: AdapterModule, peft_type: str, config: dict[str, Any], where: str,
                         ranks: PatternTable) -> None:
    params = module.params
    if peft_type == "IA3":
        vector = params["ia3_l"]
        if len(vector.shape) != 2 or 1 not in vector.shape:
            raise AdapterFormatError(f"{where}: ia3_l of '{module.path}' has shape {list(vector.shape)}; "
                                     f"expected [out, 1] or [1, in]")
        return
    embedding = "lora_embedding_A" in params or "lora_embedding_B" in params
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    if embedding and ("lora_A.weight" in params or "lora_B.weight" in params):
        raise AdapterFormatError(f"{where}: module '{module.path}' has both linear and embedding LoRA tensors")
    for key in (a_key, b_key):
        if key not in params:
            other = b_key if key == a_key else a_key
            raise AdapterFormatError(f"{where}: module '{module.path}' has {other} but no {key}")
    a, b = params[a_key], params[b_key]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise UnsupportedAdapterError(f"{where}: LoRA tensors of '{module.path}' are {len(a.shape)}-D/"
                                      f"{len(b.shape)}-D; only linear and embedding layers are merged "
                                      f"(supported: {SUPPORTED_TEXT})")
    rank_a, rank_b = a.shape[0], b.shape[1]
    if rank_a != rank_b:
        raise AdapterFormatError(f"{where}: module '{module.path}': {a_key} has rank {rank_a} but {b_key} "
                                 f"has rank {rank_b}")
    expected = ranks.lookup(module.path, config["r"])
    if rank_a != expected:
        raise AdapterFormatError(f"{where}: module '{module.path}' has rank {rank_a} but adapter_config.json "
                                 f"says {expected} (r / rank_pattern)")
    if embedding and config.get("use_dora"):
        raise UnsupportedAdapterError(f"{where}: DoRA on the embedding '{module.path}' is not supported "
                                      f"(supported: {SUPPORTED_TEXT})")
    if "lora_B.bias" in params and not config.get("lora_bias"):
        raise AdapterFormatError(f"{where}: module '{module.path}' has lora_B.bias but lora_bias is false")
    if config.get("use_dora") and not embedding and "lora_magnitude_vector" not in params:
        raise AdapterFormatError(f"{where}: use_dora is true but module '{module.path}' has no "
                                 f"lora_magnitude_vector")


def _is_feedforward(config: dict[str, Any], key: str, where: str) -> bool:
    """peft's IA3 rule: a string is a full regex match (in linear time here), a list matches by suffix."""
    ff = config.get("feedforward_modules")
    if ff is None:
        return False
    if isinstance(ff, str):
        return fullmatch(ff, key, where, "feedforward_modules")
    return any(key.endswith(target) for target in ff)


# ------------------------------------------------------------------------------------- planning (header)


@dataclass(frozen=True)
class LoraOp:
    """W <- W + scaling * (B @ A) (transposed for fan_in_fan_out or embeddings); DoRA rescales rows."""

    a: TensorInfo
    b: TensorInfo
    scaling: float
    transpose: bool
    magnitude: TensorInfo | None = None


@dataclass(frozen=True)
class LoraBiasOp:
    """bias <- bias + scaling * lora_B.bias (lora_bias=True)."""

    b_bias: TensorInfo
    scaling: float


@dataclass(frozen=True)
class Ia3Op:
    """W <- W * l, l broadcast over rows ([out, 1]) or columns ([1, in]); biases of non-feedforward layers too."""

    vector: TensorInfo
    transpose: bool
    bias: bool = False


@dataclass(frozen=True)
class TensorPlan:
    """How one base tensor becomes the merged one: an optional wholesale replacement, then the ops in order."""

    name: str
    replacement: TensorInfo | None = None
    ops: tuple[LoraOp | LoraBiasOp | Ia3Op, ...] = ()


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge needs, worked out from headers: per-tensor plans, the merged shapes, findings."""

    spec: AdapterSpec
    tensors: dict[str, TensorPlan]
    shapes: dict[str, tuple[int, ...]]  # merged shape of every tensor with a plan
    findings: tuple[AdapterFinding, ...]
    rewrite: tuple[int, str]  # (leading adapter path components dropped, base prefix added)

    @property
    def errors(self) -> list[AdapterFinding]:
        return [f for f in self.findings if f.severity == "error"]


# The path components a renaming may drop from adapter paths or add to them: base-model prefixes of causal LMs and
# of multimodal wrappers' language models (artifact/loading.py's LANGUAGE_ROOTS), as peft and transformers add them.
STRUCTURAL_PREFIXES: frozenset[str] = frozenset({"model", "transformer", "gpt_neox", "language_model", "base_model",
                                                 "backbone", "decoder", "text_model", "llm"})


def _rewrites(paths: Sequence[str], base_names: Iterable[str]) -> list[tuple[int, str]]:
    """Candidate (drop k leading components, add prefix P) rewrites from adapter module paths to base names."""
    names = list(base_names)
    candidates: list[tuple[int, str]] = [(0, "")]
    for path in sorted(paths)[:8]:
        parts = path.split(".")
        for k in range(len(parts)):
            tail = ".".join(parts[k:])
            for name in names:
                for suffix in (".weight", ""):
                    full = tail + suffix
                    if name == full or name.endswith("." + full):
                        candidate = (k, name[: len(name) - len(full)])
                        # only structural prefixes move ('model.', 'transformer.', a wrapper's 'language_model.'),
                        # never layer indices, nor a tower's ('vision_tower.encoder.' has layers of the same names)
                        moved = [p for p in parts[:k] + candidate[1].split(".") if p]
                        if candidate not in candidates and all(p in STRUCTURAL_PREFIXES for p in moved):
                            candidates.append(candidate)
    return candidates


def _apply_rewrite(path: str, rewrite: tuple[int, str]) -> str:
    drop, prefix = rewrite
    parts = path.split(".")
    return prefix + ".".join(parts[drop:]) if drop < len(parts) else path


def _choose_rewrite(spec: AdapterSpec, base_names: set[str]) -> tuple[int, str]:
    """The rewrite under which most adapter modules find their base weight; identity wins ties."""
    module_paths = list(spec.modules)
    replacement_paths = list(spec.replacements)
    if not module_paths and not replacement_paths:
        return (0, "")

    def score(rewrite: tuple[int, str]) -> int:
        targets = [f"{_apply_rewrite(p, rewrite)}.weight" for p in module_paths]
        targets += [_apply_rewrite(p, rewrite) for p in replacement_paths]
        if len(set(targets)) != len(targets):
            return -1  # two adapter entries onto one base tensor: not a renaming
        return sum(t in base_names for t in targets)

    best, best_score = (0, ""), score((0, ""))
    for candidate in _rewrites(module_paths + replacement_paths, base_names):
        value = score(candidate)
        if value > best_score:
            best, best_score = candidate, value
    return best


class _Planner:
    """The state of one merge plan while its steps run: base shapes, per-tensor plans, findings."""

    def __init__(self, spec: AdapterSpec, base_shapes: Mapping[str, Sequence[int]],
                 base_config: Mapping[str, Any] | None, base_label: str) -> None:
        self.spec = spec
        self.config = spec.config
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in base_shapes.items()}
        self.where = _where(spec.artifact)
        self.label = base_label
        self.tied = bool((base_config or {}).get("tie_word_embeddings"))
        self.conv1d = (base_config or {}).get("model_type") in CONV1D_MODEL_TYPES
        self.findings: list[AdapterFinding] = []
        self.plans: dict[str, TensorPlan] = {}
        self.merged_shapes: dict[str, tuple[int, ...]] = {}
        self.rewrite = _choose_rewrite(spec, set(self.shapes))

    def finding(self, code: str, severity: Severity, text: str) -> None:
        self.findings.append(AdapterFinding(code, severity, f"{self.where}: {text}"))

    def missing(self, what: str, target: str) -> None:
        hint = ""
        if self.tied and target.split(".")[-2:-1] == ["lm_head"]:
            hint = " (the base ties lm_head to the input embeddings; merge such an adapter with peft)"
        self.finding("TGV_ADAPTER_MODULE_MISSING", "error", f"{what}, but {self.label} has no tensor '{target}'{hint}")

    def add(self, name: str, *, replacement: TensorInfo | None = None,
            op: LoraOp | LoraBiasOp | Ia3Op | None = None) -> None:
        plan = self.plans.get(name, TensorPlan(name))
        if replacement is not None:
            plan = replace(plan, replacement=replacement)
        if op is not None:
            plan = replace(plan, ops=plan.ops + (op,))
        self.plans[name] = plan

    def renaming(self) -> None:
        """Step 1: say when adapter module names had to be mapped onto the base's names."""
        if self.rewrite != (0, ""):
            drop, prefix = self.rewrite
            self.finding("TGV_ADAPTER_NAME_REMAPPED", "info",
                         f"adapter module names were mapped onto {self.label}'s tensor names by dropping {drop} "
                         f"leading component(s) and adding prefix '{prefix}'")

    def replacements(self) -> None:
        """Step 2: saved whole tensors (modules_to_save, biases) replace base tensors; resized rows are allowed."""
        for path, info in sorted(self.spec.replacements.items()):
            target = _apply_rewrite(path, self.rewrite)
            if target not in self.shapes:
                self.missing(f"adapter tensor '{info.name}' replaces '{path}'", target)
                continue
            base_shape = self.shapes[target]
            if info.shape != base_shape:
                if not (len(info.shape) == len(base_shape) == 2 and info.shape[1:] == base_shape[1:]):
                    self.finding("TGV_ADAPTER_SHAPE_MISMATCH", "error",
                                 f"adapter tensor '{info.name}' has shape {list(info.shape)} but {self.label}'s "
                                 f"'{target}' is {list(base_shape)}")
                    continue
                self.finding("TGV_ADAPTER_RESIZED_TENSOR", "warning",
                             f"adapter tensor '{info.name}' resizes '{target}' from {list(base_shape)} to "
                             f"{list(info.shape)} (vocabulary resized)")
            self.merged_shapes[target] = info.shape
            self.add(target, replacement=info)

    def modules(self) -> None:
        """Step 3: every adapted module onto its 2-D base weight, as IA3 or LoRA."""
        for path, module in sorted(self.spec.modules.items()):
            weight_name = f"{_apply_rewrite(path, self.rewrite)}.weight"
            if weight_name not in self.shapes:
                self.missing(f"adapter targets module '{path}'", weight_name)
                continue
            shape = self.merged_shapes.get(weight_name, self.shapes[weight_name])
            if len(shape) != 2:
                self.finding("TGV_ADAPTER_SHAPE_MISMATCH", "error",
                             f"adapter targets '{path}', whose weight '{weight_name}' is {len(shape)}-D {list(shape)}; "
                             f"only 2-D weights can be merged")
            elif self.spec.peft_type == "IA3":
                self.ia3(path, module, weight_name, shape)
            else:
                self.lora(path, module, weight_name, shape)

    def ia3(self, path: str, module: AdapterModule, weight_name: str, shape: tuple[int, ...]) -> None:
        vector = module.params["ia3_l"]
        feedforward = _is_feedforward(self.config, path, self.where)
        fifo = bool(self.config.get("fan_in_fan_out")) or self.conv1d
        out_dim, in_dim = (shape[1], shape[0]) if fifo else (shape[0], shape[1])
        expected = (1, in_dim) if feedforward else (out_dim, 1)
        if vector.shape != expected:
            role = "feedforward (scales input columns)" if feedforward else "non-feedforward (scales output rows)"
            self.finding("TGV_ADAPTER_SHAPE_MISMATCH", "error",
                         f"ia3_l of '{path}' has shape {list(vector.shape)} but a {role} module of {self.label}'s "
                         f"{list(shape)} weight needs {list(expected)}")
            return
        self.add(weight_name, op=Ia3Op(vector, fifo))
        bias_name = f"{_apply_rewrite(path, self.rewrite)}.bias"
        if not feedforward and bias_name in self.shapes:
            self.add(bias_name, op=Ia3Op(vector, False, bias=True))

    def _transpose(self, path: str, embedding: bool, delta: tuple[int, int], shape: tuple[int, ...]) -> bool:
        if embedding or self.conv1d or self.config.get("fan_in_fan_out"):
            return True  # lora_embedding_B @ lora_embedding_A is [dim, vocab]; Conv1D stores [in, out]
        if delta != shape and delta[::-1] == shape:
            self.finding("TGV_ADAPTER_FAN_IN_FAN_OUT_INFERRED", "warning",
                         f"LoRA of '{path}' fits {self.label}'s {list(shape)} weight only transposed; merged as "
                         f"fan_in_fan_out (a Conv1D-style layer)")
            return True
        return False

    def lora(self, path: str, module: AdapterModule, weight_name: str, shape: tuple[int, ...]) -> None:
        embedding = "lora_embedding_A" in module.params
        a = module.params["lora_embedding_A" if embedding else "lora_A.weight"]
        b = module.params["lora_embedding_B" if embedding else "lora_B.weight"]
        rank = a.shape[0]
        alpha = self.spec.alphas.lookup(path, self.config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        delta = (b.shape[0], a.shape[1])
        transpose = self._transpose(path, embedding, delta, shape)
        merged_delta = delta[::-1] if transpose else delta
        if merged_delta != shape:
            self.finding("TGV_ADAPTER_SHAPE_MISMATCH", "error",
                         f"LoRA of '{path}' ({'B' if not embedding else 'embedding_B'} {list(b.shape)} x A "
                         f"{list(a.shape)}) gives a {list(merged_delta)} update but {self.label}'s '{weight_name}' is "
                         f"{list(shape)}")
            return
        magnitude = module.params.get("lora_magnitude_vector")
        if magnitude is not None:
            out_features = shape[1] if transpose else shape[0]
            if magnitude.shape != (out_features,):
                self.finding("TGV_ADAPTER_SHAPE_MISMATCH", "error",
                             f"DoRA magnitude of '{path}' has shape {list(magnitude.shape)} but '{weight_name}' has "
                             f"{out_features} output features")
                return
        self.add(weight_name, op=LoraOp(a, b, scaling, transpose, magnitude))
        if "lora_B.bias" in module.params:
            self.lora_bias(path, module.params["lora_B.bias"], scaling)

    def lora_bias(self, path: str, b_bias: TensorInfo, scaling: float) -> None:
        bias_name = f"{_apply_rewrite(path, self.rewrite)}.bias"
        if bias_name not in self.shapes:
            self.missing(f"lora_bias of '{path}' updates a bias", bias_name)
        elif self.shapes[bias_name] != b_bias.shape:
            self.finding("TGV_ADAPTER_SHAPE_MISMATCH", "error",
                         f"lora_B.bias of '{path}' has shape {list(b_bias.shape)} but '{bias_name}' is "
                         f"{list(self.shapes[bias_name])}")
        else:
            self.add(bias_name, op=LoraBiasOp(b_bias, scaling))

    def summary(self) -> None:
        """Step 4: the initialisation warning, and the one-line summary when nothing is an error."""
        init = self.config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            self.finding("TGV_ADAPTER_INIT_MODIFIES_BASE", "warning",
                         f"init_lora_weights={init!r} rewrites the base weights during training; unless the adapter "
                         f"was converted on save, merging it onto the original base does not reproduce the trained "
                         f"model")
        if all(f.severity != "error" for f in self.findings):
            self.finding("TGV_ADAPTER_FITS", "info",
                         f"{self.spec.peft_type} adapter fits {self.label}: {len(self.spec.modules)} module(s) "
                         f"adapted, {len(self.spec.replacements)} tensor(s) replaced")

    def plan(self) -> MergePlan:
        for name in self.plans:
            self.merged_shapes.setdefault(name, self.shapes[name])
        return MergePlan(self.spec, self.plans, self.merged_shapes, tuple(self.findings), self.rewrite)


def plan_merge(spec: AdapterSpec, base_shapes: Mapping[str, Sequence[int]], *,
               base_config: Mapping[str, Any] | None = None, base_label: str = "the base") -> MergePlan:
    """Map every adapter tensor onto a base tensor and check shapes, from headers alone.

    Misfits become findings of severity "error" (so a header-only check can report them all);
    `open_merged` refuses to merge when there is any.
    """
    planner = _Planner(spec, base_shapes, base_config, base_label)
    planner.renaming()
    planner.replacements()
    planner.modules()
    planner.summary()
    return planner.plan()


def check_adapter(adapter: Artifact, base_shapes: Mapping[str, Sequence[int]], *,
                  base_config: Mapping[str, Any] | None = None, base_label: str = "the base") -> list[AdapterFinding]:
    """Header-only check that `adapter` fits a base with these tensor shapes (errors, warnings, a summary)."""
    return list(plan_merge(parse_adapter(adapter), base_shapes, base_config=base_config,
                           base_label=base_label).findings)


def check_adapter_against_tensors(adapter: Artifact, base_tensors: Sequence[Mapping[str, Any]], *,
                                  base_label: str = "the declared base") -> list[AdapterFinding]:
    """Check an adapter against a reference fingerprint's structural metadata (`Fingerprint.tensors`).

    For when the base weights are not at hand: the adapter's targets and shapes must exist in the base.
    """
    spec = parse_adapter(adapter)
    if not base_tensors:
        return [AdapterFinding("TGV_ADAPTER_NO_STRUCTURE", "warning",
                               f"{_where(adapter)}: {base_label}'s fingerprint records no tensor list (a legacy "
                               f"fingerprint?), so the adapter's fit cannot be checked")]
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in base_tensors:
        name, shape = entry.get("name"), entry.get("shape")
        if not isinstance(name, str) or not isinstance(shape, (list, tuple)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise AdapterFormatError(f"{base_label}: fingerprint tensor entry {entry!r:.80} lacks a name and "
                                     f"an integer shape")
        shapes[name] = tuple(shape)
    return list(plan_merge(spec, shapes, base_label=base_label).findings)


def _name_forms(name: str) -> set[str]:
    text = name.strip().rstrip("/\\").lower()
    if not text:
        return set()
    return {text, re.split(r"[/\\]", text)[-1]}


def check_base_name(adapter: Artifact, declared: Sequence[str]) -> list[AdapterFinding]:
    """Compare adapter_config's base_model_name_or_path with the declared base's names (id, path, model name).

    Names are claims, not evidence: a mismatch is a warning (TGV_ADAPTER_BASE_NAME_MISMATCH) that a policy
    can make fatal. Matching is case-insensitive on the full name or its last path component.
    """
    where = _where(adapter)
    claim = (adapter.adapter_config or {}).get("base_model_name_or_path")
    if not isinstance(claim, str) or not claim.strip():
        return [AdapterFinding("TGV_ADAPTER_BASE_NAME_MISSING", "info",
                               f"{where}: adapter_config.json does not name its base (base_model_name_or_path)")]
    wanted = {form for name in declared if name for form in _name_forms(str(name))}
    if _name_forms(claim) & wanted:
        return []
    listed = ", ".join(sorted({str(n) for n in declared if n})) or "(none given)"
    return [AdapterFinding("TGV_ADAPTER_BASE_NAME_MISMATCH", "warning",
                           f"{where}: adapter_config.json names base_model_name_or_path '{claim}', "
                           f"which matches none of the declared base's names ({listed})")]


def base_record(base: Artifact, digests: Mapping[str, str]) -> dict[str, Any]:
    """The base's identity for a merged adapter's fingerprint (`artifact.base`): name, layout, file digests.

    No absolute paths, so the same adapter and base give the same document on every machine.
    """
    missing = [f.path for f in base.files if f.path not in digests]
    if missing:
        raise AdapterFormatError(f"{base.root}: no digest given for base file {missing[0]}")
    return {"name": base.name, "layout": base.layout,
            "files": [{"path": f.path, "size": f.size, "sha256": digests[f.path]} for f in base.files],
            "root_digest": root_digest({f.path: digests[f.path] for f in base.files})}
