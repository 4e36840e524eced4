"""Reading an attestation: a bare in-toto Statement, a DSSE envelope, a Sigstore bundle, a GitHub attestations
API record, or JSON Lines of those (as `gh attestation download` writes). Signatures are NOT verified here.

The JSON is read as untrusted input: size-capped, no duplicate keys, no NaN/Infinity, no number that
overflows to infinity; every failure is an AttestationError naming the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tg_verify.atomic import canonical_json
from tg_verify.attestation.record import MAX_ATTESTATION_BYTES, PREDICATE_TYPE
from tg_verify.errors import AttestationError


@dataclass(frozen=True)
class LoadedStatement:
    """A Statement read from a file, with the wrapper it came in (signatures are NOT verified here)."""

    statement: dict[str, Any]
    wrapper: str  # statement | dsse | sigstore-bundle
    source: str


def _error(where: str, message: str) -> AttestationError:
    return AttestationError(f"{where}: {message}", file=where.split(": ")[0])


def _b64decode(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise _error(where, "payload must be a base64 string")
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise _error(where, "payload is not valid base64") from None


def loads(data: bytes | str, where: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity literals, no number that overflows to infinity."""
    def reject_constant(value: str) -> Any:
        raise _error(where, f"non-finite number {value} is not allowed")

    def finite_float(value: str) -> float:
        number = float(value)
        if not math.isfinite(number):
            raise _error(where, f"number {value[:40]} overflows to infinity")
        return number

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            raise _error(where, f"duplicate JSON key {dupes[0][:80]!r}")
        return dict(pairs)

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=reject_constant, parse_float=finite_float,
                          object_pairs_hook=no_duplicates)
    except AttestationError:
        raise
    except UnicodeDecodeError:
        raise _error(where, "not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise _error(where, f"not valid JSON ({str(exc)[:120]})") from None


def _unwrap(document: Any, where: str) -> tuple[dict[str, Any], str]:
    """Peel a Sigstore bundle / GitHub API record / DSSE envelope down to the Statement."""
    if not isinstance(document, dict):
        raise _error(where, "expected a JSON object")
    if "bundle" in document and isinstance(document["bundle"], dict):  # GitHub attestations API record
        document = document["bundle"]
    if "dsseEnvelope" in document:  # Sigstore bundle (v0.1-v0.3)
        statement, _ = _unwrap(document["dsseEnvelope"], f"{where}: dsseEnvelope")
        return statement, "sigstore-bundle"
    if "payload" in document and "payloadType" in document:  # DSSE envelope
        payload_type = document["payloadType"]
        if not isinstance(payload_type, str) or not payload_type.startswith("application/vnd.in-toto"):
            raise _error(where, f"payloadType {str(payload_type)[:80]!r} is not an in-toto payload")
        if not isinstance(document.get("signatures"), list):
            raise _error(where, "DSSE envelope has no 'signatures' list")
        statement = loads(_b64decode(document["payload"], where), f"{where}: payload")
        if not isinstance(statement, dict):
            raise _error(where, "payload is not a JSON object")
        return statement, "dsse"
    if "_type" in document:
        return document, "statement"
    raise _error(where, "neither an in-toto Statement, a DSSE envelope nor a Sigstore bundle")


def parse_attestation(data: bytes, source: str = "<attestation>") -> LoadedStatement:
    """Find our Statement in `data`: a Statement, DSSE envelope, Sigstore bundle, or JSON Lines of those."""
    if len(data) > MAX_ATTESTATION_BYTES * 2:
        raise _error(source, f"{len(data)} bytes is over the attestation size limit")
    stripped = data.strip()
    if not stripped:
        raise _error(source, "file is empty")
    try:
        documents = [(loads(stripped, source), source)]
    except AttestationError:
        lines = [line for line in stripped.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        documents = [(loads(line, f"{source}:{n}"), f"{source}:{n}") for n, line in enumerate(lines, 1)]
    found = []
    for document, where in documents:
        statement, wrapper = _unwrap(document, where)
        if len(documents) == 1 or statement.get("predicateType") == PREDICATE_TYPE:
            found.append(LoadedStatement(statement, wrapper, where))
    if not found:
        raise _error(source, f"no Statement with predicateType {PREDICATE_TYPE}")
    if len({canonical_json(f.statement) for f in found}) > 1:
        raise _error(source, f"holds {len(found)} different tg-verify Statements; pass a file with exactly one")
    return found[0]


def load_attestation(path: str | os.PathLike[str]) -> LoadedStatement:
    """Read an attestation file (see `parse_attestation`) as untrusted input."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_ATTESTATION_BYTES * 2:
            raise _error(str(path), f"{size} bytes is over the attestation size limit")
        data = path.read_bytes()
    except AttestationError:
        raise
    except OSError as exc:
        raise AttestationError(f"{path}: cannot read ({exc.strerror or exc})", file=str(path)) from exc
    return parse_attestation(data, str(path))
