"""Rule-based tensor categories from names, as in the paper (§III-C.1)."""

from __future__ import annotations

from typing import Literal

Category = Literal["attention", "ffn", "embedding", "norm", "unknown"]
CATEGORIES: tuple[Category, ...] = ("attention", "ffn", "embedding", "norm", "unknown")


def categorize(name: str) -> Category:
    """attention|attn -> attention; ffn|mlp -> ffn; embed -> embedding; norm -> norm; else unknown.

    Checked in the paper's order, on the lower-cased name. Norms inside blocks
    (e.g. `self_attn.q_norm`) count as norms: 'norm' is tested first among the
    block-internal names because their values are gains, not projections.
    """
    lowered = name.lower()
    leaf = lowered.rsplit(".", 2)[-2] if lowered.count(".") >= 1 else lowered
    if "norm" in leaf or leaf.startswith("ln"):
        return "norm"
    if "attention" in lowered or "attn" in lowered:
        return "attention"
    if "ffn" in lowered or "mlp" in lowered:
        return "ffn"
    if "embed" in lowered:
        return "embedding"
    if "norm" in lowered:
        return "norm"
    return "unknown"
