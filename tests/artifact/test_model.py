"""Canonical tensor order: natural sort, total, and safe on any name."""

from __future__ import annotations

import random

from tg_verify.artifact.model import natural_key


def test_layers_sort_numerically() -> None:
    names = ["model.layers.10.mlp.weight", "model.layers.2.mlp.weight", "model.layers.1.mlp.weight",
             "lm_head.weight", "model.embed_tokens.weight"]
    assert sorted(names, key=natural_key) == ["lm_head.weight", "model.embed_tokens.weight",
                                              "model.layers.1.mlp.weight", "model.layers.2.mlp.weight",
                                              "model.layers.10.mlp.weight"]


def test_order_is_total_so_input_order_never_matters() -> None:
    names = ["a01", "a1", "a001", "a1b", "a10", "a2", "x" + "9" * 5000, "x" + "9" * 4999, "l\u0663", "l\u00b2", "l3"]
    expected = sorted(names, key=natural_key)
    for seed in range(20):
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        assert sorted(shuffled, key=natural_key) == expected
    assert expected.index("x" + "9" * 4999) < expected.index("x" + "9" * 5000)
