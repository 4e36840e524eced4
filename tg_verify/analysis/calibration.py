"""The lineage test's empirical null: scores of independently trained models, per architecture class.

bench/calibrate.py trains unrelated models (same-config twins at several training lengths and their
fine-tunes) and writes their pairwise lineage scores to tg_verify/analysis/data/lineage_calibration.json, with
the method version and the recipe. Here that file is read as untrusted data; the decision threshold
and every rate a report states come from it: the rate at a score is the share of null pairs scoring
at least as high, with its sample size and an exact (Clopper-Pearson) one-sided 95% upper bound.
A reference whose architecture class the file does not hold is "uncalibrated".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tg_verify.errors import FingerprintFormatError

CALIBRATION_FORMAT = 2  # 2: block scores paired with the sketch's
RESOURCE = "lineage_calibration.json"
DATA_FILE = Path(__file__).with_name("data") / RESOURCE
CONFIDENCE = 0.95
MAX_SCORES = 1_000_000
MAX_SCOPE = 400
UNCALIBRATED = "uncalibrated"


ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "layers", "vocab", "heads", "kv_heads", "intermediate_size")


def parse_architecture(raw: Any, at: str) -> dict[str, Any]:
    """Validate an untrusted `architecture` record (what the calibration classes are keyed by) found at `at`
    (e.g. "fp.json: sketch.architecture"); problems are FingerprintFormatError naming the field."""
    if not isinstance(raw, dict) or set(raw) != set(ARCHITECTURE_FIELDS):
        raise FingerprintFormatError(f"{at} must be an object with exactly {', '.join(ARCHITECTURE_FIELDS)}")
    model_type = raw["model_type"]
    if model_type is not None and (not isinstance(model_type, str) or len(model_type) > 100):
        raise FingerprintFormatError(f"{at}.model_type must be a short string or null")
    for name in ARCHITECTURE_FIELDS[1:]:
        value = raw[name]
        optional = value is None and name in ("heads", "kv_heads", "intermediate_size")
        if not optional and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise FingerprintFormatError(f"{at}.{name} must be a non-negative integer")
    return dict(raw)


def class_key(architecture: Mapping[str, Any]) -> str:
    """The calibration class of a sketch's `architecture`: model type and every dimension, so a null measured
    on one shape is never applied to another."""
    def part(name: str) -> str:
        value = architecture.get(name)
        return "?" if value is None else str(value)

    return (f"{part('model_type')}:h{part('hidden_size')}:l{part('layers')}:v{part('vocab')}"
            f":a{part('heads')}/{part('kv_heads')}:i{part('intermediate_size')}")


def upper_bound(count: int, n: int, confidence: float = CONFIDENCE) -> float:
    """Exact one-sided upper confidence bound (Clopper-Pearson) on a rate observed as count/n."""
    from scipy.stats import beta

    if n <= 0:
        return math.nan
    if count >= n:
        return 1.0
    return float(beta.ppf(confidence, count + 1, n - count))


@dataclass(frozen=True)
class NullSample:
    """The null scores of one architecture class; `block_scores`, when present, the block evidence's scores of the
    same pairs, in the same order (so a rule reading both is measured on the pairs as they are)."""

    key: str
    scores: np.ndarray = field(repr=False)
    block_scores: np.ndarray | None = field(default=None, repr=False)

    def blocks(self) -> NullSample | None:
        """The block scores as a null sample of their own (None when not measured)."""
        return None if self.block_scores is None else NullSample(self.key, self.block_scores)

    def either_above(self, threshold: float, block_threshold: float) -> int:
        """How many null pairs the either-evidence rule calls derived: sketch above `threshold` or blocks above
        `block_threshold`."""
        if self.block_scores is None:
            raise ValueError(f"calibration class {self.key}: no block scores")
        return int(np.count_nonzero((self.scores > threshold) | (self.block_scores > block_threshold)))

    def either_at_or_above(self, score: float, block_score: float) -> int:
        """How many null pairs are at least as extreme as (score, block_score) for the either-evidence rule: whose
        smaller tail share (the share of the null scoring at least as high, sketch or blocks) is at most the
        observed pair's."""
        if self.block_scores is None:
            raise ValueError(f"calibration class {self.key}: no block scores")
        observed = min(self.at_or_above(score), int(np.count_nonzero(self.block_scores >= block_score)))
        tails = np.minimum(_tail_counts(self.scores), _tail_counts(self.block_scores))
        return int(np.count_nonzero(tails <= observed))

    @property
    def size(self) -> int:
        return int(len(self.scores))

    def at_or_above(self, score: float) -> int:
        """How many null pairs score at least `score`."""
        return int(np.count_nonzero(self.scores >= score))

    def above(self, threshold: float) -> int:
        """How many null pairs a test with this threshold calls derived (score strictly above it)."""
        return int(np.count_nonzero(self.scores > threshold))

    def exceeding(self, threshold: float) -> tuple[int, int]:
        return self.above(threshold), self.size

    def threshold(self, alpha: float) -> float:
        """The lowest threshold at which at most floor(alpha * n) null pairs score above it: the
        (floor(alpha * n) + 1)-th highest null score (the highest when n < 1 / alpha)."""
        ranked = np.sort(self.scores)[::-1]
        return float(ranked[min(int(math.floor(alpha * self.size)), self.size - 1)])

    def upper_bound(self, count: int) -> float:
        return upper_bound(count, self.size)


def _tail_counts(scores: np.ndarray) -> np.ndarray:
    """For each score, how many scores of the sample are at least as high."""
    ranked = np.sort(scores)
    return len(scores) - np.searchsorted(ranked, scores, side="left")


@dataclass(frozen=True)
class Calibration:
    """A validated calibration file: the method it was measured with, one null sample per class, and its scope
    (which models the null covers, e.g. their training lengths: every stated rate holds for those only)."""

    method: str
    sketch_version: str
    recipe: dict[str, Any]
    classes: dict[str, NullSample]
    source: str
    scope: str = ""
    blocks_version: str = ""

    def null_for(self, architecture: Mapping[str, Any]) -> NullSample | None:
        return self.classes.get(class_key(architecture))

    def conservative_threshold(self, alpha: float, blocks: bool = False) -> float:
        """For an uncalibrated architecture: the highest threshold any calibrated class has at `alpha` (of the
        block scores with `blocks`)."""
        nulls = [null.blocks() if blocks else null for null in self.classes.values()]
        return max(null.threshold(alpha) for null in nulls if null is not None)


def parse_calibration(document: Any, source: str) -> Calibration:
    """Validate an untrusted calibration document; problems are FingerprintFormatError naming the field."""
    def bad(message: str) -> FingerprintFormatError:
        return FingerprintFormatError(f"{source}: {message}")

    if not isinstance(document, dict):
        raise bad("a calibration document must be a JSON object")
    if document.get("format") != CALIBRATION_FORMAT:
        raise bad(f"format {document.get('format')!r} is not supported (expected {CALIBRATION_FORMAT})")
    method, version, recipe = document.get("method"), document.get("sketch_version"), document.get("recipe")
    blocks_version = document.get("blocks_version")
    if not isinstance(method, str) or not isinstance(version, str) or not isinstance(blocks_version, str):
        raise bad("'method', 'sketch_version' and 'blocks_version' must be strings")
    if not isinstance(recipe, dict):
        raise bad("'recipe' must be an object")
    scope = recipe.get("scope", "")
    if not isinstance(scope, str) or len(scope) > MAX_SCOPE or not scope.isprintable():
        raise bad(f"recipe.scope must be a printable string of at most {MAX_SCOPE} characters")
    raw = document.get("classes")
    if not isinstance(raw, list) or not raw:
        raise bad("'classes' must be a non-empty list")
    classes: dict[str, NullSample] = {}
    for n, entry in enumerate(raw):
        where = f"classes[{n}]"
        if not isinstance(entry, dict):
            raise bad(f"{where} must be an object")
        architecture, scores = entry.get("architecture"), entry.get("scores")
        if not isinstance(architecture, dict):
            raise bad(f"{where}.architecture must be an object")
        key = class_key(architecture)
        if entry.get("key") != key:
            raise bad(f"{where}.key {entry.get('key')!r} does not match its architecture ({key!r})")
        if key in classes:
            raise bad(f"{where} repeats class {key!r}")
        if (not isinstance(scores, list) or not 0 < len(scores) <= MAX_SCORES
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                           and -1.0 <= s <= 1.0 for s in scores)):
            raise bad(f"{where}.scores must be a non-empty list of at most {MAX_SCORES} finite numbers in [-1, 1]")
        blocks = entry.get("block_scores")
        if (not isinstance(blocks, list) or len(blocks) != len(scores)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                           and -1.0 <= s <= 1.0 for s in blocks)):
            raise bad(f"{where}.block_scores must be a list of finite numbers in [-1, 1], one per score "
                      f"({len(scores)})")
        classes[key] = NullSample(key=key, scores=np.asarray(scores, dtype=np.float64),
                                  block_scores=np.asarray(blocks, dtype=np.float64))
    return Calibration(method=method, sketch_version=version, recipe=recipe, classes=classes, source=source,
                       scope=scope, blocks_version=blocks_version)


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The calibration file at `path`, or the one shipped inside the package."""
    if path is None:
        text = DATA_FILE.read_text(encoding="utf-8")
        source = f"tg_verify/analysis/data/{RESOURCE}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        source = str(path)
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise FingerprintFormatError(f"{source}: not valid JSON ({exc})") from None
    return parse_calibration(document, source)


@lru_cache(maxsize=1)
def packaged_calibration() -> Calibration:
    """The shipped calibration, read once."""
    return load_calibration()
