"""The lineage test's decision rule, its method version and its default target rate.

Torch- and numpy-free, so that the test (analysis/lineage.py), the policy that sets `alpha` and
verify-attestation, which re-checks a recorded decision, share one rule instead of three copies.
"""

from __future__ import annotations

import math

# The scoring method (sketch version, geometry correction, alignment, median; block evidence and the either-evidence
# rule since tgl4). The calibration file records the method it was measured with and is only used for that method;
# attestations record it beside the numbers.
LINEAGE_METHOD = "tgl4"
# The target false-positive rate the calibrated threshold is set at, unless the policy sets lineage.alpha.
DEFAULT_ALPHA = 0.01


# methods whose threshold comes from a calibration null
CALIBRATED_METHODS = frozenset({"tgl2", "tgl3", LINEAGE_METHOD})


def _above(score: float | None, threshold: float | None) -> bool:
    return (score is not None and threshold is not None and math.isfinite(score) and math.isfinite(threshold)
            and score > threshold)


def is_derived(*, score: float, threshold: float, comparable: bool = True, method: str | None = LINEAGE_METHOD,
               p_value: float | None = None, alpha: float | None = None, block_score: float | None = None,
               block_threshold: float | None = None) -> bool:
    """"Derived" iff the test is comparable and the sketch's score is above its threshold, or (tgl4) the block
    evidence's score above its own (methods tgl2-tgl4: thresholds from the calibration null at the target rate,
    shared between the two evidences, or the most conservative calibrated class's). A missing evidence is NaN/None.

    Records without a method come from the earlier test (tgl1), which also required its permutation
    p-value to be at most alpha and took a score at the threshold as derived.
    """
    if not comparable:
        return False
    if method in CALIBRATED_METHODS:
        return _above(score, threshold) or (method == LINEAGE_METHOD and _above(block_score, block_threshold))
    return bool(p_value is not None and alpha is not None and p_value <= alpha and score >= threshold)
