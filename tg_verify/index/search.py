"""Lineage search: the references of an index a candidate most likely derives from, each with the exact test.

Two stages. Retrieval: the candidate's signature (index/signature.py) against every reference's, one
float32 matrix-vector product, and the k most similar form the short list. The exact test: the full
lineage test (analysis.lineage.lineage_test, its permutation null and effect-size floor) of the
candidate against each short-listed reference's stored fingerprint, read back and checked against its
digest. Hits are ordered by that evidence (derived first, then by lineage score), so retrieval only
decides which references are tested, never what is concluded. Family attribution follows the rule
`tg-verify classify` applies: the lineage test's family when it shows a derivation (the strongest
derived reference), else the statistical attribution (analysis.attribution.classify over the short
list, on the shipped population scale when it applies) when that is meaningful, else none (analysis/family.py).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from tg_verify.analysis.family import Derivation, decide_family
from tg_verify.analysis.lineage import LineageResult, lineage_test
from tg_verify.analysis.references import Reference
from tg_verify.errors import IndexFormatError, InputError, UsageError
from tg_verify.fingerprint.document import Fingerprint
from tg_verify.index.signature import fingerprint_signature
from tg_verify.index.store import Entry, ReferenceIndex

DEFAULT_K = 10
MAX_K = 1000


@dataclass(frozen=True)
class Hit:
    """One short-listed reference: retrieval similarity, the exact lineage test, its statistical distance."""

    retrieval_rank: int
    entry: Entry
    similarity: float
    lineage: LineageResult
    distance: float | None = None  # the paper's feature distance, on the statistics' scale, when meaningful

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.entry.id, "family": self.entry.family, "base": self.entry.base,
                "parent": self.entry.parent, "model_name": self.entry.model_name,
                "fingerprint_sha256": self.entry.fingerprint_sha256, "retrieval_rank": self.retrieval_rank,
                "similarity": round(self.similarity, 6), "lineage": self.lineage.to_dict(),
                "distance": None if self.distance is None else round(self.distance, 6)}


@dataclass
class SearchResult:
    """The hits (by evidence), the family attribution, the statistical attribution behind it, caveats."""

    k: int
    hits: list[Hit]
    attribution: dict[str, Any]
    statistics: dict[str, Any] | None  # analysis.attribution.classify over the short list (None: not possible)
    caveats: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "hits": [h.to_dict() for h in self.hits], "attribution": self.attribution,
                "statistics": self.statistics, "caveats": list(self.caveats),
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}


def retrieve(index: ReferenceIndex, signature: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k references most similar to `signature` (position, similarity), best first (ties: by id)."""
    if not len(index.entries):
        return []
    similarities = index.signatures @ signature.astype(np.float32)
    count = min(k, len(similarities))
    top = np.argpartition(-similarities, count - 1)[:count]
    order = sorted(top.tolist(), key=lambda n: (-float(similarities[n]), index.entries[n].id))
    return [(n, float(similarities[n])) for n in order]


def search(index: ReferenceIndex, candidate: Fingerprint, k: int = DEFAULT_K) -> SearchResult:
    """Short-list the k references nearest the candidate's signature and run the full lineage test on each."""
    if not 1 <= k <= MAX_K:
        raise UsageError(f"-k must be in [1, {MAX_K}], got {k}")
    started = time.perf_counter()
    signature = fingerprint_signature(candidate)
    if signature is None:
        raise InputError(f"{candidate.source or candidate.model_name}: the candidate has no lineage sketch with "
                         "usable units; fingerprint it without --no-sketch")
    short = retrieve(index, signature, k)
    retrieved = time.perf_counter()
    hits: list[Hit] = []
    fingerprints: dict[str, Fingerprint] = {}
    # The tests' products are small: BLAS threads only add barrier waits (5x slower on a loaded 2-core machine)
    with threadpool_limits(limits=1, user_api="blas"):
        for rank, (position, similarity) in enumerate(short, start=1):
            entry = index.entries[position]
            fingerprints[entry.id] = index.fingerprint(entry)
            result = lineage_test(candidate, fingerprints[entry.id])
            hits.append(Hit(rank, entry, similarity, result))
    tested = time.perf_counter()
    caveats: list[str] = []
    statistics = _statistics(candidate, hits, fingerprints)
    if statistics is not None and statistics.get("meaningful"):
        distances = {r["id"]: r["distance"] for r in statistics["references"]}
        hits = [Hit(h.retrieval_rank, h.entry, h.similarity, h.lineage, distances.get(h.entry.id)) for h in hits]
    hits.sort(key=lambda h: (not h.lineage.derived, -_score(h.lineage), h.retrieval_rank))
    own = hashlib.sha256(candidate.to_json_bytes()).hexdigest()
    if same := [e.id for e in index.entries if e.fingerprint_sha256 == own]:
        caveats.append(f"the candidate's fingerprint is that of reference {', '.join(same)}: it is searched against "
                       "itself")
    return SearchResult(k=k, hits=hits, attribution=_attribution(hits, statistics, caveats), statistics=statistics,
                        caveats=caveats, seconds={"retrieval": retrieved - started, "exact_tests": tested - retrieved,
                                              "attribution": time.perf_counter() - tested})


def _score(result: LineageResult) -> float:
    return result.score if math.isfinite(result.score) else -2.0


def _statistics(candidate: Fingerprint, hits: Sequence[Hit], fingerprints: dict[str, Fingerprint]
                ) -> dict[str, Any] | None:
    """The statistical attribution (the classify verb's) of the candidate among the short-listed references."""
    from tg_verify.analysis.attribution import classify

    references = [Reference(id=h.entry.id, family=h.entry.family, fingerprint=fingerprints[h.entry.id],
                            base=h.entry.base, parent=h.entry.parent) for h in hits]
    if not references:
        return None
    try:
        result = classify(candidate, references).to_dict()
    except InputError as exc:  # incompatible settings or feature versions, no base among the short list
        return {"available": False, "reason": str(exc)}
    return {"available": True, **result}


def _attribution(hits: Sequence[Hit], statistics: dict[str, Any] | None, caveats: list[str]) -> dict[str, Any]:
    """Which family, by analysis.family's rule (that of `tg-verify classify`) over the short list; with the
    lineage score and every derived reference when the lineage test decides, else a note on why it does not."""
    derived = [h for h in hits if h.lineage.derived]
    usable = statistics is not None and statistics.get("available") and statistics.get("attribution_meaningful") \
        and not statistics.get("out_of_cluster")
    statistics_family = statistics["family"] if usable and statistics is not None else None
    statistics_base = statistics["base"] if usable and statistics is not None else None
    decision = decide_family([Derivation(h.entry.id, h.entry.family, h.lineage.score) for h in derived],
                             statistics_family, statistics_base)
    if decision["by"] == "lineage":
        families = sorted({h.entry.family for h in derived})
        if len(families) > 1:
            caveats.append(f"the lineage test calls references of several families derived: {', '.join(families)}; "
                           "the strongest decides, the others are listed")
        top = next(h for h in derived if h.entry.id == decision["base"])
        return {**decision, "score": round(top.lineage.score, 6), "derived_references": [h.entry.id for h in derived]}
    best = max((h for h in hits if math.isfinite(h.lineage.score)), key=lambda h: h.lineage.score, default=None)
    note = ("the lineage test establishes none of the short-listed references as the candidate's base"
            + (f" (highest score {best.lineage.score:.3f}, {best.entry.id})" if best else ""))
    return {**decision, "note": note}


def check_index_usable(index: ReferenceIndex) -> None:
    """An index with no reference cannot answer a search: say so instead of returning nothing."""
    if not index.entries:
        raise IndexFormatError(f"{index.root}: the index holds no reference; add some with `tg-verify index add`")
