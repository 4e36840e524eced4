"""Reading a Statement out of its wrappers (DSSE, Sigstore bundle, gh's JSON Lines) as untrusted JSON."""

from __future__ import annotations

import base64
import json

import pytest
from attestation_helpers import make_predicate

from tg_verify.atomic import canonical_json
from tg_verify.attestation import envelope, record, statement
from tg_verify.errors import AttestationError


def _envelope(statement_doc: dict, urlsafe: bool = False) -> dict:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return {"payloadType": record.PAYLOAD_TYPE, "payload": encode(canonical_json(statement_doc)).decode().rstrip("="),
            "signatures": [{"keyid": "", "sig": "MEUCIQ=="}]}


def test_reads_statement_dsse_bundle_and_jsonl(tiny_models):
    built = statement.statement_of(make_predicate(tiny_models["llama"]["single"]))
    bare = envelope.parse_attestation(canonical_json(built))
    assert bare.wrapper == "statement" and bare.statement == built
    dsse = envelope.parse_attestation(json.dumps(_envelope(built, urlsafe=True)).encode())
    assert dsse.wrapper == "dsse" and dsse.statement == built
    bundle = {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "verificationMaterial": {},
              "dsseEnvelope": _envelope(built)}
    assert envelope.parse_attestation(json.dumps(bundle).encode()).wrapper == "sigstore-bundle"
    # gh attestation download: JSON Lines, possibly with other predicate types mixed in.
    provenance = dict(built, predicateType="https://slsa.dev/provenance/v1")
    lines = [json.dumps({"bundle": {"dsseEnvelope": _envelope(provenance)}}),
             json.dumps({"bundle": {"dsseEnvelope": _envelope(built)}})]
    loaded = envelope.parse_attestation("\n".join(lines).encode())
    assert loaded.statement == built and loaded.wrapper == "sigstore-bundle"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"_type": 1, "_type": 2}', "duplicate JSON key"),
    (b'{"payloadType": "text/plain", "payload": "e30=", "signatures": []}', "not an in-toto payload"),
    (b'{"payloadType": "application/vnd.in-toto+json", "payload": "***", "signatures": []}', "base64"),
    (b'{"hello": "world"}', "neither an in-toto Statement"),
    (b'[1, 2]', "expected a JSON object"),
    (b'{"_type": "x", "v": NaN}', "non-finite"),
    (b'{"_type": "x", "v": 1e999}', "overflows to infinity"),
])
def test_malformed_attestations_are_one_line_errors(data, message):
    with pytest.raises(AttestationError, match=message) as raised:
        envelope.parse_attestation(data, "a.json")
    assert raised.value.file == "a.json"
