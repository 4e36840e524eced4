"""Fingerprint extraction settings: what a fingerprint was computed with, recorded in its document.

Two fingerprints are comparable only when every setting that changes feature values is equal
(`compatibility_key`); the device and whether a lineage sketch is attached do not change them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from tg_verify.errors import UsageError

# The five noise strategies of §III-C.2, in the order the seeded per-tensor draw indexes them.
# Changing this order changes every "random" fingerprint: it is part of the feature version.
NOISE_STRATEGIES: tuple[str, ...] = ("adversarial", "structural", "low-frequency", "high-frequency", "gaussian")
STRATEGY_CHOICES: tuple[str, ...] = ("random",) + NOISE_STRATEGIES
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
MAX_REPEATS = 10_000
MAX_SEED = 2**63 - 1

# Settings recorded in the document that do not change feature values.
# Keys that do not change feature values: the device, and the lineage sketch's probe seed (the sketch records it).
NON_SEMANTIC: frozenset[str] = frozenset({"device", "sketch_seed"})
MAX_SKETCH_SEED = 2**32 - 1


@dataclass(frozen=True)
class FingerprintSettings:
    """How a fingerprint is extracted. Defaults follow the paper and the authors' release (docs/method.md).

    Fractions of the rFFT band: `structural_band` and `low_band` keep the lowest fraction of bins,
    `high_band` keeps the highest fraction. `noise_scale` weights the gaussian, low- and
    high-frequency noise; `structural_scale` weights the smoothed (structural) noise.
    """

    seed: int = 0
    repeats: int = 30
    strategy: str = "random"
    epsilon: float = 0.03
    noise_scale: float = 0.1
    structural_scale: float = 1.0
    structural_band: float = 0.25
    low_band: float = 0.125
    high_band: float = 0.5
    device: str = "auto"
    sketch: bool = True
    # The lineage probe's seed (fingerprint/sketch.py). 0, the default, is public; a seed kept private by the
    # verifier, used for the candidate and `model:` references alike, gives a probe no edit could aim at.
    sketch_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"fingerprint settings: seed must be an integer in [0, 2^63-1], got {self.seed!r}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or not 1 <= self.repeats <= MAX_REPEATS:
            raise UsageError(f"fingerprint settings: repeats must be an integer in [1, {MAX_REPEATS}], "
                             f"got {self.repeats!r}")
        if self.strategy not in STRATEGY_CHOICES:
            raise UsageError(f"fingerprint settings: strategy must be one of {', '.join(STRATEGY_CHOICES)}, "
                             f"got {self.strategy!r}")
        if self.device not in DEVICE_CHOICES:
            raise UsageError(f"fingerprint settings: device must be one of {', '.join(DEVICE_CHOICES)}, "
                             f"got {self.device!r}")
        for name in ("epsilon", "noise_scale", "structural_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UsageError(f"fingerprint settings: {name} must be a finite number >= 0, got {value!r}")
        for name in ("structural_band", "low_band", "high_band"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise UsageError(f"fingerprint settings: {name} must be a fraction in (0, 1], got {value!r}")
        if not isinstance(self.sketch, bool):
            raise UsageError(f"fingerprint settings: sketch must be true or false, got {self.sketch!r}")
        if (isinstance(self.sketch_seed, bool) or not isinstance(self.sketch_seed, int)
                or not 0 <= self.sketch_seed <= MAX_SKETCH_SEED):
            raise UsageError(f"fingerprint settings: sketch_seed must be an integer in [0, 2^32-1], "
                             f"got {self.sketch_seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings recorded in a fingerprint document: every value-changing setting plus the device.

        `sketch` is not recorded here: the document's `sketch` field says whether one is attached; `sketch_seed`
        only when it is not the default 0 (so documents made before it existed read the same).
        """
        recorded = asdict(self)
        recorded.pop("sketch")
        if recorded["sketch_seed"] == 0:
            recorded.pop("sketch_seed")
        for name in ("epsilon", "noise_scale", "structural_scale", "structural_band", "low_band", "high_band"):
            recorded[name] = float(recorded[name])
        return recorded

    def compatibility_key(self) -> dict[str, Any]:
        """The settings that change feature values; equal keys mean comparable fingerprints."""
        return semantic(self.to_dict())

    def compatible_with(self, other: FingerprintSettings | dict[str, Any]) -> bool:
        """True when fingerprints made with `self` and `other` may be compared."""
        theirs = other.to_dict() if isinstance(other, FingerprintSettings) else other
        return self.compatibility_key() == semantic(theirs)

    @classmethod
    def from_dict(cls, recorded: dict[str, Any], **overrides: Any) -> FingerprintSettings:
        """Rebuild settings from a document's `settings` (validated), e.g. to re-fingerprint alike."""
        if not isinstance(recorded, dict):
            raise UsageError("fingerprint settings must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(recorded) - known)
        if unknown:
            raise UsageError(f"fingerprint settings: unknown keys {', '.join(unknown)}")
        return replace(cls(), **{**recorded, **overrides})


def semantic(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded settings dict without the keys that do not change feature values."""
    return {k: v for k, v in recorded.items() if k not in NON_SEMANTIC}


def assemble_settings(*, block: Mapping[str, Any] | None = None, recorded: Iterable[Mapping[str, Any]] = (),
                      **overrides: Any) -> FingerprintSettings:
    """The one place settings for a fingerprint made now are put together (policy, CLI, batch, analyses).

    An explicit `block` (a policy's `fingerprint:`) wins; else the first of `recorded` (settings a
    fingerprint recorded, so new fingerprints compare with it; its `device` is where it ran, not a
    setting, and is dropped); else the defaults. `overrides` whose value is not None go on top.
    """
    if block:
        base: dict[str, Any] = dict(block)
    else:
        first = next(iter(recorded), None)
        base = {k: v for k, v in first.items() if k != "device"} if first is not None else {}
    if not isinstance(base, dict):
        raise UsageError("fingerprint settings must be an object")
    return FingerprintSettings.from_dict(base, **{k: v for k, v in overrides.items() if v is not None})
