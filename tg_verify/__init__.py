"""tg-verify: lineage verification of open-weight model artifacts (TensorGuard and beyond)."""

__version__ = "0.1.0"
