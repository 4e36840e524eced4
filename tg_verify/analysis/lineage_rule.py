"""The lineage test's decision rule, its method version and its default target rate.

Torch- and numpy-free, so that the test (analysis/lineage.py), the policy that sets `alpha` and
verify-attestation, which re-checks a recorded decision, share one rule instead of three copies.
"""

from __future__ import annotations

# The scoring method (sketch version, geometry correction, alignment, median). The calibration file records the
# method it was measured with and is only used for that method; attestations record it beside the numbers.
LINEAGE_METHOD = "tgl3"
# The target false-positive rate the calibrated threshold is set at, unless the policy sets lineage.alpha.
DEFAULT_ALPHA = 0.01


CALIBRATED_METHODS = frozenset({"tgl2", LINEAGE_METHOD})  # methods whose threshold comes from a calibration null


def is_derived(*, score: float, threshold: float, comparable: bool = True, method: str | None = LINEAGE_METHOD,
               p_value: float | None = None, alpha: float | None = None) -> bool:
    """"Derived" iff the sketches are comparable and the score is above the threshold (methods tgl2 and tgl3:
    the calibration null's level at the target rate, or the most conservative calibrated one's).

    Records without a method come from the earlier test (tgl1), which also required its permutation
    p-value to be at most alpha and took a score at the threshold as derived.
    """
    if not comparable:
        return False
    if method in CALIBRATED_METHODS:
        return bool(score > threshold)
    return bool(p_value is not None and alpha is not None and p_value <= alpha and score >= threshold)
