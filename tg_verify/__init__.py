"""tg-verify: lineage verification of open-weight model artifacts (TensorGuard and beyond)."""

from tg_verify.versions import VERSION as __version__

__all__ = ["__version__"]
