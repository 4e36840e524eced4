"""Fingerprint layer: the TensorGuard gradient features and the lineage sketch of a model."""

from tg_verify.fingerprint.document import FEATURE_NAMES, VECTOR_FEATURES, Fingerprint, from_dict, load

__all__ = ["FEATURE_NAMES", "VECTOR_FEATURES", "Fingerprint", "from_dict", "load"]
