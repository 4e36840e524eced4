"""Which fingerprints may be compared with each other, and on which features.

Native documents compare only with documents of the same feature version and settings; the paper's
legacy flat documents (unknown settings) compare on the features whose meaning both sides share,
and every result that mixes them carries a caveat saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tg_verify.errors import IncompatibleFingerprintsError
from tg_verify.fingerprint.document import VECTOR_FEATURES, Fingerprint

# Features whose definition in tg-verify differs from the authors' release, so a legacy document
# and a native one cannot be compared on them: the release's num_layers counts the 10 tensors it
# analysed (it is 10 in every published fingerprint), not the model's depth.
LEGACY_INCOMPARABLE: tuple[str, ...] = ("num_layers",)

# Settings keys that record how a fingerprint was computed but do not change its values.
NON_SEMANTIC_SETTINGS: frozenset[str] = frozenset({"device"})


@dataclass(frozen=True)
class Comparability:
    """The feature names a set of fingerprints is compared on, and the caveats that go with it."""

    features: tuple[str, ...]
    legacy: bool
    caveats: list[str] = field(default_factory=list)


def _semantic_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in NON_SEMANTIC_SETTINGS}


def _label(fp: Fingerprint) -> str:
    return fp.source or fp.model_name


def _settings_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


def comparability(fingerprints: Sequence[Fingerprint]) -> Comparability:
    """Check that `fingerprints` may be compared; return the shared feature names and caveats.

    Raises IncompatibleFingerprintsError when native documents differ in feature version or in a
    setting that changes feature values.
    """
    if not fingerprints:
        raise IncompatibleFingerprintsError("no fingerprints to compare")
    native = [fp for fp in fingerprints if not fp.legacy]
    legacy = [fp for fp in fingerprints if fp.legacy]
    if native:
        first = native[0]
        for other in native[1:]:
            if other.feature_version != first.feature_version:
                raise IncompatibleFingerprintsError(
                    f"{_label(other)}: feature version {other.feature_version!r} differs from "
                    f"{first.feature_version!r} of {_label(first)}; re-fingerprint both with one tg-verify version")
            if _semantic_settings(other.settings) != _semantic_settings(first.settings):
                raise IncompatibleFingerprintsError(
                    f"{_label(other)}: fingerprint settings differ from {_label(first)} "
                    f"({_settings_difference(_semantic_settings(first.settings), _semantic_settings(other.settings))});"
                    " re-fingerprint with the same settings")
    if not legacy:
        return Comparability(features=VECTOR_FEATURES, legacy=False)
    if not native:
        return Comparability(features=VECTOR_FEATURES, legacy=True, caveats=[
            "legacy fingerprints (the authors' release format): extraction settings unknown; compared on "
            "the release's 15 features as published"])
    features = tuple(n for n in VECTOR_FEATURES if n not in LEGACY_INCOMPARABLE)
    names = ", ".join(sorted({fp.model_name for fp in legacy}))
    return Comparability(features=features, legacy=True, caveats=[
        f"legacy fingerprints ({names}) mixed with native ones: settings of the legacy documents are unknown, "
        f"so distances are indicative only; compared on {len(features)} features, leaving out "
        f"{', '.join(LEGACY_INCOMPARABLE)} (defined differently by the release)"])
