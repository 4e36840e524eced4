"""Typed errors. Library code raises these; only cli.py turns them into a line and an exit code.

Exit codes (every verb): 0 success / PASS, 1 verdict FAIL, 2 bad input, 3 internal error.
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class TgVerifyError(Exception):
    """Base of every error tg-verify raises on purpose.

    Besides the one-line message, an error names what it is about as attributes, so callers (the
    Action's annotations) never parse the text: `file`, the file that is wrong (the weights file, the
    policy, the attestation), and `field`, the field path inside it (`references[2].fingerprint`).
    Either is None when unknown; a layer that adds context fills in what a deeper one left open.
    """

    exit_code: int = EXIT_INTERNAL
    code: str = "TGV_INTERNAL"

    def __init__(self, *args: object, file: str | None = None, field: str | None = None) -> None:
        super().__init__(*args)
        self.file = file
        self.field = field


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
    """A model artifact that cannot be resolved (layout, missing files, unsupported format).

    The artifact layer's messages start with the file they are about (`model/x.safetensors: ...`,
    docs/artifact.md), and it passes that file as `file` itself (tests/corpus/test_corpus.py checks every
    case). For raisers elsewhere that leave `file` open, the message's leading path becomes `file` when
    it names an existing file.
    """

    code = "TGV_ARTIFACT"

    def __init__(self, *args: object, file: str | None = None, field: str | None = None) -> None:
        super().__init__(*args, file=file, field=field)
        if self.file is None and args and isinstance(args[0], str):
            head = args[0].split(": ", 1)[0]
            if head != args[0] and os.path.isfile(head):
                self.file = head


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
