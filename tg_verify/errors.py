"""Typed errors. Library code raises these; only cli.py turns them into a line and an exit code.

Exit codes (every verb): 0 success / PASS, 1 verdict FAIL, 2 bad input, 3 internal error.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class TgVerifyError(Exception):
    """Base of every error tg-verify raises on purpose."""

    exit_code: int = EXIT_INTERNAL
    code: str = "TGV_INTERNAL"


class InternalError(TgVerifyError):
    """A bug or an environment fault, not the user's input."""


class InputError(TgVerifyError):
    """Bad input: usage, an unreadable or invalid file, a broken policy. Exit 2."""

    exit_code = EXIT_BAD_INPUT
    code = "TGV_BAD_INPUT"


class UsageError(InputError):
    """Flags or arguments that do not fit together."""

    code = "TGV_USAGE"


class ArtifactError(InputError):
    """A model artifact that cannot be resolved (layout, missing files, unsupported format)."""

    code = "TGV_ARTIFACT"


class HeaderError(ArtifactError):
    """A safetensors header that breaks a validation rule. Subclasses name the rule."""

    code = "TGV_HEADER"


class UnsupportedDtypeError(ArtifactError):
    """A tensor dtype that tg-verify cannot decode to float32."""

    code = "TGV_UNSUPPORTED_DTYPE"


class WeightValueError(ArtifactError):
    """Tensor values that make a fingerprint meaningless (NaN, Inf, nothing to analyse)."""

    code = "TGV_WEIGHT_VALUES"


class AdapterError(ArtifactError):
    """A PEFT adapter that cannot be applied to its base."""

    code = "TGV_ADAPTER"


class FingerprintFormatError(InputError):
    """A fingerprint document that is malformed or incompatible."""

    code = "TGV_FINGERPRINT_FORMAT"


class IncompatibleFingerprintsError(InputError):
    """Fingerprints made with different settings or feature versions compared with each other."""

    code = "TGV_INCOMPATIBLE_FINGERPRINTS"


class PolicyError(InputError):
    """A policy file that is malformed or inconsistent."""

    code = "TGV_POLICY"


class DigestMismatchError(InputError):
    """Recorded file digests that do not match the files on disk."""

    code = "TGV_DIGEST_MISMATCH"


class AttestationError(InputError):
    """An attestation that is malformed or does not match the model or policy."""

    code = "TGV_ATTESTATION"


class ExecutorError(InternalError):
    """A distributed executor lost a job (its worker or node died beyond the retries, no node fits it)."""

    code = "TGV_EXECUTOR"


class IndexFormatError(InputError):
    """A reference index (tg-verify index) that is malformed, tampered with or of another version."""

    code = "TGV_INDEX"
