"""Which family a model belongs to, from both kinds of evidence: the lineage test first, the statistics after.

One rule, applied by `tg-verify classify` and by the index's lineage search (index/search.py): the family of
the strongest reference the lineage test calls the candidate derived from, when there is one (the stronger
evidence: it tells a derivative from an independent model of the same architecture); else the statistical
attribution's family when it is meaningful and in cluster; else none. Either way it says whether the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Derivation:
    """A reference the lineage test calls the candidate derived from, with the test's score."""

    reference: str
    family: str
    score: float


def strongest(derived: Sequence[Derivation]) -> Derivation | None:
    """The derivation with the highest lineage score (ties, and scores that are not finite: the first given)."""
    ranked = sorted(enumerate(derived), key=lambda p: (-p[1].score if math.isfinite(p[1].score) else math.inf, p[0]))
    return ranked[0][1] if ranked else None


def decide_family(derived: Sequence[Derivation], statistics_family: str | None,
                  statistics_base: str | None) -> dict[str, Any]:
    """The answer to "which family": the lineage test's when it shows a derivation, else the statistics' (the
    family and base of the statistical attribution, `statistics_family` None when it is not meaningful, out of
    cluster or not available), else none; with whether the two agree (None when only one answers)."""
    top = strongest(derived)
    if top is not None:
        return {"family": top.family, "base": top.reference, "by": "lineage", "statistics_family": statistics_family,
                "agrees": None if statistics_family is None else statistics_family == top.family}
    if statistics_family is not None:
        return {"family": statistics_family, "base": statistics_base, "by": "statistics",
                "statistics_family": statistics_family, "agrees": None}
    return {"family": None, "base": None, "by": None, "statistics_family": None, "agrees": None}
