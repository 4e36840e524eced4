"""Which stored tensors a runtime loads: the tensor-name grammar of each supported architecture.

transformers builds the model class that config.json names (`model_type`, `architectures`) and copies
in exactly the checkpoint keys that are its parameters, adding or stripping the base-model prefix
(`model.`, `transformer.`, `gpt_neox.`) key by key. Anything else in the files is never loaded, so
it must never be fingerprinted: it is reported as unexpected (TGV_UNEXPECTED_TENSORS). Two stored
tensors that land on the same parameter make the loaded model depend on load order: that is an error
(TGV_AMBIGUOUS_TENSOR). docs/artifact.md documents each grammar; tests/artifact/test_loading.py checks
them against transformers' own model classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tg_verify.artifact import naming
from tg_verify.artifact.errors import AmbiguousTensorError, shown
from tg_verify.artifact.model import TensorInfo

MAX_LISTED = 5  # names quoted in one message
MAX_ENUMERATED_LAYERS = 4096  # missing-tensor check only for configs with at most this many layers

Config = Mapping[str, Any]

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _w(*modules: str) -> list[str]:
    return [f"{m}.weight" for m in modules]


def _b(*modules: str) -> list[str]:
    return [f"{m}.bias" for m in modules]


def _flag(config: Config, key: str, default: bool) -> bool:
    value = config.get(key, default)
    return value if isinstance(value, bool) else default


@dataclass(frozen=True)
class Grammar:
    """The parameters of one family's causal-LM class, as transformers names them in a state dict.

    Names in `globals` and `block` are relative to `prefix` (the base model); `heads` are outside it.
    `block(config)` lists one block's parameters; `ignored` are per-block buffers older checkpoints
    store that transformers skips on load (not weights; excluded silently).
    """

    family: str
    model_types: tuple[str, ...]
    causal_classes: tuple[str, ...]
    base_classes: tuple[str, ...]
    prefix: str
    stack: str
    globals: Callable[[Config], list[str]]
    block: Callable[[Config], list[str]]
    heads: tuple[str, ...] = ("lm_head.weight",)
    layers_key: str = "num_hidden_layers"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)  # stored key -> parameter (transformers' renamings)

    def layers(self, config: Config) -> int | None:
        value = config.get(self.layers_key, self.defaults.get(self.layers_key))
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    def tied(self, config: Config) -> bool:
        return _flag(config, "tie_word_embeddings", bool(self.defaults.get("tie_word_embeddings", False)))


def _llama_block(config: Config, *, attn_bias: str | None = "attention_bias", mlp_bias: str | None = "mlp_bias",
                 qkv_bias: bool = False, qk_norm: bool = False,
                 norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")) -> list[str]:
    names = _w(*_ATTN, *_MLP, *norms)
    if attn_bias is not None and _flag(config, attn_bias, False):
        names += _b(*_ATTN)
    elif qkv_bias:
        names += _b(*_ATTN[:3])
    if mlp_bias is not None and _flag(config, mlp_bias, False):
        names += _b(*_MLP)
    if qk_norm:
        names += _w("self_attn.q_norm", "self_attn.k_norm")
    return names


def _decoder_globals(config: Config) -> list[str]:
    return ["embed_tokens.weight", "norm.weight"]


_GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")


_OLMO2_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def _starcoder2_block(config: Config) -> list[str]:
    attn, mlp = _ATTN, ("mlp.c_fc", "mlp.c_proj")
    norms = ("input_layernorm", "post_attention_layernorm")
    names = _w(*attn, *mlp, *norms) + _b(*norms)
    if _flag(config, "use_bias", True):
        names += _b(*attn, *mlp)
    return names


def _phi_block(config: Config) -> list[str]:
    modules: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                                "mlp.fc1", "mlp.fc2", "input_layernorm")
    if _flag(config, "qk_layernorm", False):
        modules += ("self_attn.q_layernorm", "self_attn.k_layernorm")
    return _w(*modules) + _b(*modules)


def _cohere_block(config: Config) -> list[str]:
    names = _llama_block(config, mlp_bias=None, norms=("input_layernorm",))
    if _flag(config, "use_qk_norm", False):
        names += _w("self_attn.q_norm", "self_attn.k_norm")
    return names


def _gpt2_block(config: Config) -> list[str]:
    modules = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    return _w(*modules) + _b(*modules)


def _neox_block(config: Config) -> list[str]:
    norms = ("input_layernorm", "post_attention_layernorm")
    attn, mlp = ("attention.query_key_value", "attention.dense"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    names = _w(*norms, *attn, *mlp) + _b(*norms, *mlp)
    if _flag(config, "attention_bias", True):
        names += _b(*attn)
    return names


def _gpt_oss_block(config: Config) -> list[str]:
    """GPT-OSS: attention with biases and per-head sinks, a router, and every expert of the block in two 3-D
    parameters with their biases (naming.INTERLEAVED_EXPERTS: [experts, in, out], gate and up interleaved). An MXFP4
    checkpoint stores each as a `_blocks` + `_scales` pair that artifact/mxfp4.py presents under this name."""
    experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    names = _w(*_ATTN, "mlp.router", "input_layernorm", "post_attention_layernorm") + _b("mlp.router")
    names += ["self_attn.sinks", *experts, *(f"{e}_bias" for e in experts)]
    if _flag(config, "attention_bias", True):
        names += _b(*_ATTN)
    return names


def _decoder(family: str, cls: str, block: Callable[[Config], list[str]], layers: int, *,
             model_types: tuple[str, ...] = (), tied: bool = False,
             globals_: Callable[[Config], list[str]] = _decoder_globals,
             heads: tuple[str, ...] = ("lm_head.weight",), base: str | None = None) -> Grammar:
    return Grammar(family=family, model_types=model_types or (family,), causal_classes=(f"{cls}ForCausalLM",),
                   base_classes=(base or f"{cls}Model",), prefix="model", stack="layers", globals=globals_,
                   block=block, heads=heads, defaults={"tie_word_embeddings": tied, "num_hidden_layers": layers},
                   ignored=("self_attn.rotary_emb.inv_freq",))


GRAMMARS: tuple[Grammar, ...] = (
    _decoder("llama", "Llama", _llama_block, 32),
    _decoder("mistral", "Mistral", lambda c: _llama_block(c, attn_bias=None, mlp_bias=None), 32),
    _decoder("qwen2", "Qwen2", lambda c: _llama_block(c, attn_bias=None, mlp_bias=None, qkv_bias=True), 32),
    _decoder("qwen3", "Qwen3", lambda c: _llama_block(c, mlp_bias=None, qk_norm=True), 32),
    _decoder("gemma", "Gemma", lambda c: _llama_block(c, mlp_bias=None), 28, tied=True),
    _decoder("gemma2", "Gemma2", lambda c: _llama_block(c, mlp_bias=None, norms=_GEMMA2_NORMS), 26, tied=True),
    _decoder("gemma3_text", "Gemma3", lambda c: _llama_block(c, mlp_bias=None, norms=_GEMMA2_NORMS, qk_norm=True), 26,
             tied=True, base="Gemma3TextModel"),
    _decoder("phi3", "Phi3", lambda c: _w("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                           "mlp.down_proj", "input_layernorm", "post_attention_layernorm"), 32),
    _decoder("olmo2", "Olmo2", lambda c: _llama_block(c, mlp_bias=None, qk_norm=True, norms=_OLMO2_NORMS), 32),
    _decoder("granite", "Granite", _llama_block, 32),
    _decoder("starcoder2", "Starcoder2", _starcoder2_block, 30, tied=True,
             globals_=lambda c: ["embed_tokens.weight", "norm.weight", "norm.bias"]),
    _decoder("phi", "Phi", _phi_block, 24, heads=("lm_head.weight", "lm_head.bias"),
             globals_=lambda c: ["embed_tokens.weight", "final_layernorm.weight", "final_layernorm.bias"]),
    _decoder("cohere", "Cohere", _cohere_block, 40, tied=True),
    _decoder("gpt_oss", "GptOss", _gpt_oss_block, 36),
    Grammar(family="gpt2", model_types=("gpt2",), causal_classes=("GPT2LMHeadModel",), base_classes=("GPT2Model",),
            prefix="transformer", stack="h", layers_key="n_layer",
            globals=lambda c: ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"], block=_gpt2_block,
            defaults={"tie_word_embeddings": True, "n_layer": 12}, ignored=("attn.bias", "attn.masked_bias")),
    Grammar(family="gpt_neox", model_types=("gpt_neox",), causal_classes=("GPTNeoXForCausalLM",),
            base_classes=("GPTNeoXModel",), prefix="gpt_neox", stack="layers",
            globals=lambda c: ["embed_in.weight", "final_layer_norm.weight", "final_layer_norm.bias"],
            block=_neox_block, defaults={"num_hidden_layers": 44}, aliases={"embed_out.weight": "lm_head.weight"},
            ignored=("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")),
)
_BY_MODEL_TYPE: dict[str, Grammar] = {t: g for g in GRAMMARS for t in g.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))

# Multimodal wrappers (Gemma 3, LLaVA, Mistral 3, Qwen2-VL ...): config.json nests the language model's config as
# text_config and the checkpoint stores it under one of these roots, beside towers and projectors. Each stored root
# maps onto the causal LM's own names; two stored tensors that land on one parameter are ambiguous, as anywhere.
LANGUAGE_ROOTS: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),  # as published (LLaVA, Gemma 3)
    ("model.language_model.", "model."),  # as transformers >= 4.52 saves them
)
# A wrapper's components outside the language model, by their first name component (after an optional `model.`):
# loaded by the runtime, but no grammar checks them, so nothing is fingerprinted of them.
COMPONENT_ROOTS: tuple[str, ...] = ("vision_tower", "vision_model", "visual", "multi_modal_projector",
                                    "mm_projector", "image_newline", "audio_tower", "embed_vision", "embed_audio")
# Qwen2-VL's language model is Qwen2's (its text_config says qwen2_vl_text; its older, flat configs qwen2_vl)
_TEXT_ALIASES: dict[str, str] = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen2_vl": "qwen2",
                                 "qwen2_5_vl": "qwen2"}
# Sub-configs of a wrapper's components: a config.json with one of these and no text_config is a wrapper whose
# language model's config is its own top level (Qwen2-VL as first published)
_COMPONENT_CONFIGS: tuple[str, ...] = ("vision_config", "audio_config")


@dataclass(frozen=True)
class LoadedSet:
    """How an artifact's stored tensors split: loaded (fingerprinted), unexpected (a finding), ignored buffers."""

    loaded: tuple[TensorInfo, ...]
    unexpected: tuple[TensorInfo, ...]
    architecture: str | None  # the grammar applied; None when no grammar applies
    notes: tuple[str, ...]  # warnings for the artifact (unknown architecture, missing tensors, ignored buffers)
    components: tuple[str, ...] = ()  # a multimodal wrapper's loaded tensors outside its language model
    text_config: dict[str, Any] | None = None  # a multimodal wrapper's language-model config (its text_config)


class _Bound:
    """A grammar bound to one config: name membership without enumerating every layer."""

    def __init__(self, grammar: Grammar, config: Config, causal: bool) -> None:
        self.grammar = grammar
        self.layers = grammar.layers(config)
        prefix = grammar.prefix + "."
        self.prefix = prefix
        self.globals = {prefix + g for g in grammar.globals(config)} | (set(grammar.heads) if causal else set())
        self.block = frozenset(grammar.block(config))
        self.block_start = f"{prefix}{grammar.stack}."
        self.ignored = frozenset(grammar.ignored)
        self.aliases = grammar.aliases

    def _block_rest(self, name: str) -> str | None:
        """For `model.layers.<i>.<rest>` with i a canonical index below the layer count: rest, else None."""
        if not name.startswith(self.block_start):
            return None
        index, dot, rest = name[len(self.block_start):].partition(".")
        if not dot or not index.isdigit() or not index.isascii() or (len(index) > 1 and index[0] == "0"):
            return None
        if self.layers is None or int(index) >= self.layers:
            return None
        return rest

    def parameter(self, name: str) -> bool:
        return name in self.globals or self._block_rest(name) in self.block

    def canonical(self, name: str) -> str | None:
        """The parameter a stored key loads into (transformers renames legacy keys, then adds or strips the base
        prefix key by key)."""
        name = self.aliases.get(name, name)
        if self.parameter(name):
            return name
        if name.startswith(self.prefix) and self.parameter(name[len(self.prefix):]):
            return name[len(self.prefix):]
        if self.parameter(self.prefix + name):
            return self.prefix + name
        return None

    def is_ignored(self, name: str) -> bool:
        for candidate in (name, self.prefix + name):
            rest = self._block_rest(candidate)
            if rest is not None and rest in self.ignored:
                return True
        return False

    def expected(self) -> list[str] | None:
        if self.layers is None or self.layers > MAX_ENUMERATED_LAYERS:
            return None
        names = sorted(self.globals)
        for index in range(self.layers):
            names += [f"{self.block_start}{index}.{rest}" for rest in sorted(self.block)]
        return names


def text_config_of(config: Config | None) -> dict[str, Any] | None:
    """A multimodal wrapper's language-model config (config.json's text_config, or its own top level when it has
    a tower's config and no text_config; the model_type read through the aliases, tie_word_embeddings inherited
    from the wrapper where it does not say), or None when config.json has a grammar of its own or is no wrapper."""
    if config is None or config.get("model_type") in _BY_MODEL_TYPE:
        return None
    text = config.get("text_config")
    if text is None and any(isinstance(config.get(key), dict) for key in _COMPONENT_CONFIGS):
        text = {k: v for k, v in config.items() if k not in _COMPONENT_CONFIGS}
    if not isinstance(text, dict):
        return None
    merged = dict(text)
    model_type = text.get("model_type")
    if isinstance(model_type, str):
        merged["model_type"] = _TEXT_ALIASES.get(model_type, model_type)
    if "tie_word_embeddings" not in text and isinstance(config.get("tie_word_embeddings"), bool):
        merged["tie_word_embeddings"] = config["tie_word_embeddings"]
    return merged


def grammar_for(config: Config | None) -> tuple[Grammar | None, bool, str | None]:
    """(grammar, causal LM?, why none applies) for a config.json document."""
    if config is None:
        return None, True, "no config.json"
    model_type = config.get("model_type")
    grammar = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if grammar is None:
        if text_config_of(config) is not None:
            return None, True, (f"model_type {shown(repr(model_type), 60)} wraps a language model and components "
                                f"no grammar describes")
        return None, True, f"model_type {shown(repr(model_type), 60)} has no tensor-name grammar in tg-verify"
    architectures = config.get("architectures")
    cls = architectures[0] if isinstance(architectures, list) and architectures else None
    if cls is None or cls in grammar.causal_classes:
        causal = True
    elif cls in grammar.base_classes:
        causal = False
    else:
        return None, True, (f"architectures names {shown(repr(cls), 60)}, not a class of model_type "
                            f"{grammar.family} that tg-verify knows")
    if grammar.layers(config) is None:
        return None, True, f"config.json has no usable {grammar.layers_key} for model_type {grammar.family}"
    return grammar, causal, None


def expected_parameters(config: Config | None) -> list[str] | None:
    """Every parameter name the runtime's class has for this config.json (tied heads included), or None
    when no grammar applies or the config has more than MAX_ENUMERATED_LAYERS layers."""
    grammar, causal, _ = grammar_for(config)
    if grammar is None:
        return None
    return _Bound(grammar, config or {}, causal).expected()


def _listed(names: Sequence[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(shown(n) for n in names[:MAX_LISTED]) + more


def classify(tensors: Sequence[TensorInfo], config: Config | None, where: str) -> LoadedSet:
    """Split stored tensors into what the runtime loads and what it does not, per config.json's architecture.

    Raises AmbiguousTensorError when two stored tensors load into the same parameter. Without a
    grammar (no config.json, an unsupported model_type), every tensor is kept, generic ambiguity
    checks still apply, and a note says the loaded set could not be checked.
    """
    text = text_config_of(config)
    if text is not None:
        return _wrapped(tensors, config or {}, text, where)
    grammar, causal, why = grammar_for(config)
    if grammar is None:
        assert why is not None
        return _generic(tensors, why, where, config=config)
    return _by_grammar(tensors, grammar, config or {}, causal, where)


def _by_grammar(tensors: Sequence[TensorInfo], grammar: Grammar, config: Config, causal: bool, where: str,
                rename: Callable[[str], str] = lambda name: name) -> LoadedSet:
    """classify() under one grammar; `rename` maps a stored name onto the grammar's first (a wrapper's roots)."""
    bound = _Bound(grammar, config, causal)
    loaded: list[TensorInfo] = []
    unexpected: list[TensorInfo] = []
    ignored: list[str] = []
    owner: dict[str, TensorInfo] = {}
    for info in tensors:
        target = bound.canonical(rename(info.name))
        if target is None:
            if bound.is_ignored(rename(info.name)):
                ignored.append(info.name)
            else:
                unexpected.append(info)
            continue
        if target in owner:
            raise AmbiguousTensorError(
                f"{where}: tensors '{shown(owner[target].name)}' and '{shown(info.name)}' both load into "
                f"{grammar.family} parameter '{shown(target)}'; which one a runtime uses depends on load order, "
                f"so neither can be verified (remove one)")
        owner[target] = info
        loaded.append(info)
    notes: list[str] = []
    if ignored:
        notes.append(f"{len(ignored)} stored buffer(s) that transformers skips on load ({_listed(ignored)}) are "
                     f"not fingerprinted")
    missing = _missing(bound, grammar, config, causal, set(owner))
    if missing:
        notes.append(f"{len(missing)} parameter(s) of {grammar.family} are not stored ({_listed(missing)}): a "
                     f"runtime would initialise them randomly, and they are not verified")
    return LoadedSet(tuple(loaded), tuple(unexpected), grammar.family, tuple(notes))


def _language_name(name: str) -> str:
    """A wrapper's stored name as its causal language model names the parameter (other names unchanged)."""
    for stored, own in LANGUAGE_ROOTS:
        if name.startswith(stored):
            return own + name[len(stored):]
    return name


def _component(name: str) -> bool:
    first = name.removeprefix("model.").split(".", 1)[0]
    return first in COMPONENT_ROOTS


def _wrapped(tensors: Sequence[TensorInfo], config: Config, text: dict[str, Any], where: str) -> LoadedSet:
    """A multimodal wrapper: its components (vision tower, projector) set apart, never fingerprinted; its language
    model checked by that model's grammar (text_config) where tg-verify has one, else by the generic rules."""
    components = [t for t in tensors if _component(t.name)]
    rest = [t for t in tensors if not _component(t.name)]
    model_type = text.get("model_type")
    grammar = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if grammar is not None and grammar.layers(text) is not None:
        language = _by_grammar(rest, grammar, text, True, where, rename=_language_name)
    else:
        why = (f"text_config has no usable {grammar.layers_key} for model_type {grammar.family}" if grammar else
               f"text_config's model_type {shown(repr(model_type), 60)} has no tensor-name grammar in tg-verify")
        language = _generic(rest, why, where, rename=_language_name, config=text)
    notes = list(language.notes)
    if components:
        roots = sorted({t.name.removeprefix("model.").split(".", 1)[0] for t in components})
        notes.append(f"{len(components)} tensor(s) outside the language model ({', '.join(roots)}) are not "
                     f"fingerprinted: no grammar says which of them a runtime loads, so the fingerprint and the "
                     f"lineage evidence cover the language model alone (their files are still bound by digest)")
    order = {t.name: n for n, t in enumerate(tensors)}
    loaded = tuple(sorted((*language.loaded, *components), key=lambda t: order[t.name]))
    return LoadedSet(loaded, language.unexpected, language.architecture, tuple(notes),
                     components=tuple(t.name for t in components), text_config=text)


def _missing(bound: _Bound, grammar: Grammar, config: Config, causal: bool, present: set[str]) -> list[str]:
    """Parameters the class has that no stored tensor fills; a tied head and embedding fill each other."""
    expected = bound.expected()
    if expected is None:
        return []
    missing = [n for n in expected if n not in present]
    if causal and grammar.tied(config):
        embedding, head = bound.prefix + grammar.globals(config)[0], grammar.heads[0]
        if embedding in present or head in present:
            missing = [n for n in missing if n not in (embedding, head)]
    return missing


# config.json keys that count a model's decoder blocks and its routed experts, across families: without a grammar,
# what a runtime built from the config has no room for is all tg-verify can still rule out
LAYER_COUNT_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
EXPERT_COUNT_KEYS: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _count(config: Config | None, keys: tuple[str, ...]) -> int | None:
    """The first of `keys` config.json states as a non-negative integer, or None."""
    for key in keys:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _beyond_config(name: str, stack: str | None, layers: int | None, experts: int | None) -> bool:
    """Whether a stored tensor sits in a block of the decoder `stack`, or an expert, that the config has no room
    for (a runtime never loads it). Other stacks (a tower's) are not counted by the decoder's layer count."""
    block, expert = naming.block_of(name), naming.expert_of(name)
    return ((layers is not None and block is not None and block[0] == stack and block[1] >= layers)
            or (experts is not None and expert is not None and expert >= experts))


def _decoder_stack(names: Sequence[str]) -> str | None:
    """The block prefix of the decoder: the stack beside the token embedding (`model.layers.` beside
    `model.embed_tokens`), or None when there is no embedding or not exactly one such stack. Other stacks (a
    tower's) are never counted against the decoder's layer count."""
    embeddings = [name for name in names if naming.global_role(name) == "embed"]
    if len(embeddings) != 1:
        return None
    parent = embeddings[0].rsplit(".", 2)[0] + "." if embeddings[0].count(".") >= 2 else ""
    stacks = {block[0] for name in names if (block := naming.block_of(name)) is not None}
    beside = [prefix for prefix in stacks if prefix.rsplit(".", 2)[0] + "." == parent
              or (parent == "" and prefix.count(".") == 1)]
    return beside[0] if len(beside) == 1 else None


def _generic(tensors: Sequence[TensorInfo], why: str, where: str,
             rename: Callable[[str], str] = lambda name: name, config: Config | None = None) -> LoadedSet:
    """No grammar: keep every tensor the config has room for, refuse a stored key that equals another with one
    leading component added (the base-prefix rule every transformers model applies; names read through `rename`,
    a wrapper's roots), and say the loaded set is unchecked.

    A block index at or past config.json's layer count, or an expert index at or past its expert count, is a
    parameter no runtime built from that config has: such tensors are unexpected, never fingerprinted (a decoy
    expert 99 beside a mixture of 8 would otherwise be summed into the lineage evidence)."""
    layers, experts = _count(config, LAYER_COUNT_KEYS), _count(config, EXPERT_COUNT_KEYS)
    stack = _decoder_stack([rename(info.name) for info in tensors])
    beyond = [info for info in tensors if _beyond_config(rename(info.name), stack, layers, experts)]
    if beyond:
        tensors = [info for info in tensors if info not in beyond]
    names: dict[str, str] = {}
    for info in tensors:
        name = rename(info.name)
        if name in names:
            raise AmbiguousTensorError(
                f"{where}: tensors '{shown(names[name])}' and '{shown(info.name)}' would load into the same parameter "
                f"'{shown(name)}'; which one a runtime uses depends on load order, so neither can be verified "
                f"(remove one)")
        names[name] = info.name
    for name, stored in names.items():
        head, dot, rest = name.partition(".")
        if dot and rest in names:
            raise AmbiguousTensorError(
                f"{where}: tensors '{shown(names[rest])}' and '{shown(stored)}' would load into the same parameter "
                f"(transformers adds or strips the base-model prefix '{shown(head)}.'); which one a runtime uses "
                f"depends on load order, so neither can be verified (remove one)")
    _refuse_role_twins(tensors, where, "no config.json says" if why == "no config.json" else
                       "no tensor-name grammar says")
    notes = [f"{why}: which tensors a runtime loads cannot be checked, so all {len(tensors)} are fingerprinted "
             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"] if tensors else []
    if beyond:
        notes.append(f"{len(beyond)} tensor(s) in blocks or experts past config.json's counts ({layers} layers, "
                     f"{experts} experts: {_listed([t.name for t in beyond])}) would not be loaded: not fingerprinted")
    return LoadedSet(tuple(tensors), tuple(beyond), None, tuple(notes))


def _role(name: str) -> tuple[object, ...] | None:
    """The unit the fingerprint and the sketch read a tensor as, by name alone (artifact/naming.py): a global
    role, or (block index, expert index, module leaf, kind) for a projection or a norm; None for any other
    tensor."""
    fused = naming.fused_experts(name)
    if fused is not None:
        return (naming.layer_of(name), "experts", fused)
    kind = name.rsplit(".", 1)[-1]
    if kind not in ("weight", "bias"):
        return None
    role = naming.global_role(name)
    if role is not None:
        return (role, kind)
    layer, module = naming.layer_of(name), naming.leaf(name)
    if layer is not None and (module in naming.PROJECTIONS or module in naming.NORMS):
        return (layer, naming.expert_of(name), module, kind)
    return None


def _refuse_role_twins(tensors: Sequence[TensorInfo], where: str, why: str = "no config.json says") -> None:
    """Without a grammar, two tensors the fingerprint would read as one unit (two embeddings, two `q_proj` of block
    3 under different stacks) leave the runtime's choice unknown: refused, never first- or last-one-wins. This is
    what stops decoy tensors when config.json is withheld."""
    owner: dict[tuple[object, ...], str] = {}
    experts: dict[int, tuple[bool, str]] = {}  # block -> (its experts fused in 3-D?, a tensor that says so)
    for info in tensors:
        layer, fused = naming.layer_of(info.name), naming.fused_experts(info.name) is not None
        if layer is not None and (fused or naming.expert_of(info.name) is not None):
            form = experts.setdefault(layer, (fused, info.name))
            if form[0] != fused:
                raise AmbiguousTensorError(
                    f"{where}: block {layer} stores its experts both fused and one by one ('{shown(form[1])}' and "
                    f"'{shown(info.name)}'), and {why} which a runtime loads, so neither can be verified (remove one)")
        role = _role(info.name)
        if role is None:
            continue
        if role in owner:
            raise AmbiguousTensorError(
                f"{where}: tensors '{shown(owner[role])}' and '{shown(info.name)}' are the same unit by name and "
                f"{why} which one a runtime loads, so neither can be verified (remove one)")
        owner[role] = info.name
