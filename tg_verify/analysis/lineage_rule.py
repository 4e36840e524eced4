"""The lineage test's decision rule and its default significance level.

Torch- and numpy-free, so that the test (analysis/lineage.py), the policy that sets `alpha` and
verify-attestation, which re-checks a recorded decision, share one rule instead of three copies.
"""

from __future__ import annotations

DEFAULT_ALPHA = 0.01  # the stated false-positive rate of a "derived" call, unless the policy sets lineage.alpha


def is_derived(*, score: float, threshold: float, p_value: float, alpha: float, comparable: bool = True) -> bool:
    """"Derived" iff the sketches are comparable, the permutation p-value is <= alpha and the score reaches
    the threshold (the minimum effect size, or the null's 1 - alpha quantile when higher)."""
    return bool(comparable and p_value <= alpha and score >= threshold)
