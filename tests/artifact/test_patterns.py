"""Adapter config patterns: peft's matching rule, on an engine without backtracking blow-ups, with caps."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tg_verify.artifact import resolve
from tg_verify.artifact.patterns import MAX_PATTERN_LENGTH, MAX_PATTERNS, PatternError, PatternTable, fullmatch
from tg_verify.artifact.peft import check_adapter_against_tensors

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.o_proj", "model.layers.1.mlp.down_proj",
           "base_model.model.model.layers.3.mlp.up_proj", "lm_head", "model.embed_tokens",
           "transformer.h.2.attn.c_attn"]
PATTERNS = ["o_proj", "q_proj", "layers.1.mlp.down_proj", r"model\.layers\.\d+\.mlp\.up_proj", "^lm_head",
            "layers.1", "(q|k)_proj", "mlp.*", "h\\.2\\..*", "embed_tokens", "[", "a(b", "attn.c_attn"]


def test_first_matching_pattern_wins_exactly_as_in_peft() -> None:
    from peft.utils.other import get_pattern_key

    for order in (PATTERNS, PATTERNS[::-1], PATTERNS[3:] + PATTERNS[:3]):
        values = {p: i for i, p in enumerate(order)}
        table = PatternTable(values, "a", "rank_pattern")
        for module in MODULES:
            valid = [p for p in order if p not in ("[", "a(b")]  # peft raises on invalid regexes
            key = get_pattern_key(valid, module)
            expected = values.get(key)
            got = table.lookup(module, None)
            if got is not None and order[got] in ("[", "a(b"):
                continue  # tg-verify matches an invalid regex literally, as it always did
            assert got == expected, (module, order)


def test_feedforward_fullmatch_like_re() -> None:
    assert fullmatch(r".*mlp\..*", "model.layers.0.mlp.down_proj", "a", "feedforward_modules")
    assert not fullmatch("down_proj", "model.layers.0.mlp.down_proj", "a", "feedforward_modules")
    assert not fullmatch("(", "x", "a", "feedforward_modules")


def _finishes(work: object, seconds: float = 20.0) -> bool:
    thread = threading.Thread(target=work, daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def test_catastrophic_patterns_do_not_hang(tmp_path: Path) -> None:
    """`(x+x+)+y` against a long module name takes Python's re exponential time; here it ends at once."""
    name = "x" * 60
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 2, "rank_pattern": {"(x+x+)+y": 4},
        "alpha_pattern": {"(x+x+)+y": 8.0}}))
    save_file({f"base_model.model.model.layers.0.{name}.lora_A.weight": np.zeros((2, 8), np.float32),
               f"base_model.model.model.layers.0.{name}.lora_B.weight": np.zeros((8, 2), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    results: list[object] = []
    tensors = [{"name": f"model.layers.0.{name}.weight", "shape": [8, 8]}]
    assert _finishes(lambda: results.append(check_adapter_against_tensors(resolve(adapter), tensors)))
    assert [f.code for f in results[0]] == ["TGV_ADAPTER_FITS"]  # type: ignore[attr-defined]
    assert _finishes(lambda: fullmatch("(x+x+)+y", name, "a", "feedforward_modules"))


def test_caps_and_backtracking_only_constructs_are_refused() -> None:
    with pytest.raises(PatternError, match="at most"):
        PatternTable({f"p{i}": 1 for i in range(MAX_PATTERNS + 1)}, "a", "rank_pattern")
    with pytest.raises(PatternError, match="characters"):
        PatternTable({"x" * (MAX_PATTERN_LENGTH + 1): 1}, "a", "rank_pattern")
    for pattern in (r"(a)\1", "(?=q)q_proj", "(?<!x)q_proj"):
        with pytest.raises(PatternError, match="linear time") as info:
            PatternTable({pattern: 1}, "a", "alpha_pattern")
        assert info.value.code == "TGV_ADAPTER_FORMAT"
    assert PatternTable({f"layers.{i}.q_proj": i for i in range(MAX_PATTERNS)}, "a", "rank_pattern").lookup(
        "model.layers.7.q_proj", None) == 7
