"""Lineage search: the references of an index a candidate most likely derives from, each with the exact test.

Two stages. Retrieval: the candidate's signature (index/signature.py) against every reference's, one
float32 matrix-vector product, and the k most similar form the short list. The exact test: the full
lineage test (analysis.lineage.lineage_test, its permutation null and effect-size floor) of the
candidate against each short-listed reference's stored fingerprint, read back and checked against its
digest. Hits are ordered by that evidence (derived first, then by lineage score), so retrieval only
decides which references are tested, never what is concluded. Attribution follows the lineage
evidence: the family of the strongest reference the test calls the candidate's base; the paper's
feature distance, on the population scale of the whole index (z-scores over every reference), is
reported beside it for the nearest reference, never instead of it.
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

from tg_verify.analysis.lineage import DEFAULT_PERMUTATIONS, LineageResult, lineage_test
from tg_verify.errors import IndexFormatError, InputError, UsageError
from tg_verify.fingerprint.document import FEATURE_NAMES, VECTOR_FEATURES, Fingerprint
from tg_verify.fingerprint.settings import semantic
from tg_verify.index.signature import fingerprint_signature
from tg_verify.index.store import Entry, ReferenceIndex

DEFAULT_K = 10
MAX_K = 1000
# The paper's out-of-cluster threshold (analysis/attribution.py), in its standardised space; here it is
# applied on the index's population scale, which is the kind of scale it was set on (many models).
PAPER_THRESHOLD = 7.0
_COLUMNS = [FEATURE_NAMES.index(n) for n in VECTOR_FEATURES]


@dataclass(frozen=True)
class Hit:
    """One short-listed reference: retrieval similarity, the exact lineage test, the paper's distance."""

    retrieval_rank: int
    entry: Entry
    similarity: float
    lineage: LineageResult
    distance: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.entry.id, "family": self.entry.family, "base": self.entry.base,
                "parent": self.entry.parent, "model_name": self.entry.model_name,
                "fingerprint_sha256": self.entry.fingerprint_sha256, "retrieval_rank": self.retrieval_rank,
                "similarity": round(self.similarity, 6), "lineage": self.lineage.to_dict(),
                "distance": None if self.distance is None else round(self.distance, 6)}


@dataclass
class SearchResult:
    """The hits (by evidence), the attribution they support, the nearest reference by the paper, caveats."""

    k: int
    hits: list[Hit]
    attribution: dict[str, Any]
    nearest: dict[str, Any] | None
    caveats: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "hits": [h.to_dict() for h in self.hits], "attribution": self.attribution,
                "nearest_by_features": self.nearest, "caveats": list(self.caveats),
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


class PopulationScale:
    """z-scores of the paper's 15 features over every reference of the index (zero spread: unscaled)."""

    def __init__(self, index: ReferenceIndex) -> None:
        raw = index.features[:, _COLUMNS]
        self.mean = raw.mean(axis=0) if len(raw) else np.zeros(len(_COLUMNS))
        spread = raw.std(axis=0) if len(raw) else np.ones(len(_COLUMNS))
        self.scale = np.where(spread > 0, spread, 1.0)
        self.points = (raw - self.mean) / self.scale

    def distances(self, fingerprint: Fingerprint) -> np.ndarray:
        point = (np.array(fingerprint.vector(VECTOR_FEATURES)) - self.mean) / self.scale
        distances: np.ndarray = np.sqrt(((self.points - point) ** 2).sum(axis=1))
        return distances


def search(index: ReferenceIndex, candidate: Fingerprint, k: int = DEFAULT_K, *,
           permutations: int = DEFAULT_PERMUTATIONS, scale: PopulationScale | None = None) -> SearchResult:
    """Short-list the k references nearest the candidate's signature and run the full lineage test on each.

    `scale`: a PopulationScale of this index, reused across searches (made here when None).
    """
    if not 1 <= k <= MAX_K:
        raise UsageError(f"-k must be in [1, {MAX_K}], got {k}")
    started = time.perf_counter()
    signature = fingerprint_signature(candidate)
    if signature is None:
        raise InputError(f"{candidate.source or candidate.model_name}: the candidate has no lineage sketch with "
                         "usable units; fingerprint it without --no-sketch")
    short = retrieve(index, signature, k)
    retrieved = time.perf_counter()
    caveats: list[str] = []
    comparable = _features_comparable(index, candidate, caveats)
    if comparable and scale is None:
        scale = PopulationScale(index)
    distances = scale.distances(candidate) if comparable and scale is not None else None
    hits = []
    # The tests' products are small: BLAS threads only add barrier waits (5x slower on a loaded 2-core machine)
    with threadpool_limits(limits=1, user_api="blas"):
        for rank, (position, similarity) in enumerate(short, start=1):
            entry = index.entries[position]
            result = lineage_test(candidate, index.fingerprint(entry), permutations=permutations)
            hits.append(Hit(rank, entry, similarity, result,
                            None if distances is None else float(distances[position])))
    hits.sort(key=lambda h: (not h.lineage.derived, -_score(h.lineage), h.retrieval_rank))
    tested = time.perf_counter()
    own = hashlib.sha256(candidate.to_json_bytes()).hexdigest()
    if same := [e.id for e in index.entries if e.fingerprint_sha256 == own]:
        caveats.append(f"the candidate's fingerprint is that of reference {', '.join(same)}: it is searched against "
                       "itself")
    nearest = None
    if distances is not None and len(distances):
        best = int(np.argmin(distances))
        nearest = {"reference": index.entries[best].id, "family": index.entries[best].family,
                   "distance": round(float(distances[best]), 6),
                   "within_threshold": bool(distances[best] <= PAPER_THRESHOLD), "threshold": PAPER_THRESHOLD}
    return SearchResult(k=k, hits=hits, attribution=_attribution(hits, caveats), nearest=nearest, caveats=caveats,
                        seconds={"retrieval": retrieved - started, "exact_tests": tested - retrieved})


def _score(result: LineageResult) -> float:
    return result.score if math.isfinite(result.score) else -2.0


def _features_comparable(index: ReferenceIndex, candidate: Fingerprint, caveats: list[str]) -> bool:
    references = index.references
    if candidate.legacy or not references or len(index.entries) < 2:
        caveats.append("no feature distances: " + ("a legacy candidate" if candidate.legacy else
                                                   "fewer than two references give no population scale"))
        return False
    if candidate.feature_version != references["feature_version"] or \
            semantic(candidate.settings) != references["settings"]:
        caveats.append("no feature distances: the candidate was fingerprinted with another feature version or "
                       "other settings than the index's references (the lineage tests do not depend on them)")
        return False
    return True


def _attribution(hits: Sequence[Hit], caveats: list[str]) -> dict[str, Any]:
    derived = [h for h in hits if h.lineage.derived]
    if not derived:
        best = max((h for h in hits if math.isfinite(h.lineage.score)), key=lambda h: h.lineage.score, default=None)
        return {"family": None, "reference": None, "basis": None,
                "note": "the lineage test establishes none of the short-listed references as the candidate's base"
                        + (f" (highest score {best.lineage.score:.3f}, {best.entry.id})" if best else "")}
    families = sorted({h.entry.family for h in derived})
    if len(families) > 1:
        caveats.append(f"the lineage test calls references of several families derived: {', '.join(families)}; "
                       "the strongest decides, the others are listed")
    top = derived[0]
    return {"family": top.entry.family, "reference": top.entry.id, "basis": "lineage",
            "score": round(top.lineage.score, 6), "derived_references": [h.entry.id for h in derived]}


def check_index_usable(index: ReferenceIndex) -> None:
    """An index with no reference cannot answer a search: say so instead of returning nothing."""
    if not index.entries:
        raise IndexFormatError(f"{index.root}: the index holds no reference; add some with `tg-verify index add`")
