"""Property-based fuzzing of `verify-attestation`: a predicate is untrusted input.

Any edit of a valid Statement (a field replaced by any JSON value, or removed) ends in exit 0, 1 or 2 (an
AttestationError naming the field), never another exception (exit 3). An edit that still parses is decided
again by the same procedure, and a PASSED attestation whose evidence was changed never stays VERIFIED unless
the change left the decision and the files as they were.

CI runs a fixed-seed budget; TG_FUZZ_EXAMPLES=20000 pytest tests/fuzz -q for a long run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from attestation_helpers import make_predicate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tg_verify.atomic import canonical_json
from tg_verify.attestation.check import verify_attestation
from tg_verify.attestation.envelope import LoadedStatement, loads
from tg_verify.attestation.statement import statement_of
from tg_verify.errors import TgVerifyError

EXAMPLES = int(os.environ.get("TG_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize="TG_FUZZ_EXAMPLES" not in os.environ, deadline=None,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["base-1b", "qwen-7b", "fail", "warn", "error", "PASSED", "FAILED", "a" * 64]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def release(tiny_models: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    model = shutil.copytree(tiny_models["llama"]["indexed-shards"], tmp_path_factory.mktemp("fuzz") / "model")
    return model, canonical_json(statement_of(make_predicate(model))).decode()


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a JSON document (dict keys and list indexes)."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, (*prefix, index))
    return found


def run(model: Path, statement: dict[str, Any]) -> int:
    """What `tg-verify verify-attestation` exits with (TgVerifyError -> its code; anything else propagates)."""
    try:
        return verify_attestation(LoadedStatement(statement, "statement", "a.json"), model).exit_code
    except TgVerifyError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc), exc
        return exc.exit_code


@FUZZ
@given(data=st.data())
def test_any_edit_of_a_predicate_exits_0_1_or_2(release: tuple[Path, str], data: st.DataObject) -> None:
    model, text = release
    statement = json.loads(text)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        where = data.draw(st.sampled_from(paths(statement)))
        node = statement
        for key in where[:-1]:
            node = node[key]
        if isinstance(node, dict) and data.draw(st.booleans()):
            node.pop(where[-1], None)
        else:
            node[where[-1]] = data.draw(JSON)
    code = run(model, statement)
    assert code in (0, 1, 2)
    if code == 0:  # still VERIFIED: only a PASSED attestation of exactly these files can be
        assert statement["predicate"]["verificationResult"] == "PASSED"
        def attested(predicate: dict[str, Any]) -> list[tuple[Any, Any]]:  # what is verified: names and digests
            return [(f.get("name"), f.get("digest")) for f in predicate["candidate"]["files"]]

        assert attested(statement["predicate"]) == attested(json.loads(text)["predicate"])


@FUZZ
@given(number=st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=100),
       field=st.sampled_from(["distance", "threshold"]), ref=st.integers(min_value=0, max_value=1))
def test_moving_a_decided_number_is_caught_unless_the_decision_stays(release: tuple[Path, str], number: float,
                                                                     field: str, ref: int) -> None:
    """A changed distance or threshold either leaves every flag and reason as decided (VERIFIED) or is named."""
    model, text = release
    statement = json.loads(text)
    target = statement["predicate"]["references"][ref]
    target[field] = number
    code = run(model, statement)
    within = target["distance"] <= target["threshold"]
    if within != target["withinThreshold"]:
        assert code == 1
    else:
        assert code in (0, 1)


def test_huge_and_non_finite_numbers_are_refused_as_json(release: tuple[Path, str]) -> None:
    _, text = release
    for raw in ("1e999", "-1e999", "NaN", "Infinity"):
        with pytest.raises(TgVerifyError):
            loads(text.replace('"distance": 1.25', f'"distance": {raw}', 1), "a.json")
