"""Policy waivers: a dated exception for one finding; expired waivers fail; unused ones warn."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from test_verdict import codes, decide, make_evidence, make_policy

from tg_verify.errors import PolicyError
from tg_verify.policy import load_policy
from tg_verify.waivers import Waiver, from_records

TODAY = dt.date(2026, 6, 1)


def test_an_active_waiver_turns_its_failure_into_a_note_that_says_why() -> None:
    evidence = make_evidence(derived=())  # the lineage test does not establish the declared base
    assert not decide(make_policy(), evidence, TODAY).passed
    waiver = Waiver("TGV_LINEAGE_NOT_ESTABLISHED", "vendor's quantised release, SEC-1234", dt.date(2026, 6, 1), "base")
    verdict = decide(make_policy(waivers=(waiver,)), evidence, TODAY)  # the expiry day itself still counts
    assert verdict.passed
    waived = next(f for f in verdict.findings if f.code == "TGV_LINEAGE_NOT_ESTABLISHED")
    assert waived.severity == "info" and waived.subject == "base"
    assert waived.message.startswith("waived until 2026-06-01 (vendor's quantised release, SEC-1234): lineage")
    assert not codes(verdict) & {"TGV_WAIVER_EXPIRED", "TGV_WAIVER_UNUSED"}


def test_an_expired_waiver_waives_nothing_and_is_a_failure_itself() -> None:
    evidence = make_evidence(derived=())
    waiver = Waiver("TGV_LINEAGE_NOT_ESTABLISHED", "SEC-1234", dt.date(2026, 5, 31), "base")
    verdict = decide(make_policy(waivers=(waiver,)), evidence, TODAY)
    assert not verdict.passed
    assert {"TGV_LINEAGE_NOT_ESTABLISHED", "TGV_WAIVER_EXPIRED"} <= codes(verdict, "fail")
    expired = next(f for f in verdict.findings if f.code == "TGV_WAIVER_EXPIRED")
    assert "expires 2026-05-31" in expired.message and expired.subject == "base"
    # expired, even with nothing left to waive: the review it asked for is due
    assert "TGV_WAIVER_EXPIRED" in codes(decide(make_policy(waivers=(waiver,)), make_evidence(), TODAY), "fail")


def test_a_waiver_matches_code_and_reference_exactly() -> None:
    evidence = make_evidence(derived=())
    for waiver in (Waiver("TGV_LINEAGE_NOT_ESTABLISHED", "x", dt.date(2027, 1, 1), "sibling"),
                   Waiver("TGV_LINEAGE_NOT_ESTABLISHED", "x", dt.date(2027, 1, 1)),
                   Waiver("TGV_FAMILY_MISMATCH", "x", dt.date(2027, 1, 1), "base")):
        verdict = decide(make_policy(waivers=(waiver,)), evidence, TODAY)
        assert not verdict.passed and "TGV_WAIVER_UNUSED" in codes(verdict, "warn")


def test_waivers_round_trip_through_their_records() -> None:
    waivers = (Waiver("TGV_OUT_OF_CLUSTER", "new family, SEC-9", dt.date(2027, 1, 1)),
               Waiver("TGV_FORBIDDEN_MATCH", "r", dt.date(2026, 12, 31), "leaked"))
    assert from_records([w.to_dict() for w in waivers]) == waivers


GOOD = """\
version: 1
candidate:
  path: ./model
declared:
  base: base
references:
  - id: base
    family: llama
    fingerprint: base.json
waivers:
  - code: TGV_DISTANCE_ABOVE_THRESHOLD
    reference: base
    reason: quantised release, reviewed in SEC-1234
    expires: 2026-12-31
{extra}"""


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "base.json").write_text("{}")
    return tmp_path


def test_policy_reads_waivers(folder: Path) -> None:
    path = folder / "p.yml"
    path.write_text(GOOD.format(extra="  - code: TGV_OUT_OF_CLUSTER\n    reason: r\n    expires: '2027-01-02'\n"))
    policy = load_policy(path)
    assert policy.waivers == (Waiver("TGV_DISTANCE_ABOVE_THRESHOLD", "quantised release, reviewed in SEC-1234",
                                     dt.date(2026, 12, 31), "base"),
                              Waiver("TGV_OUT_OF_CLUSTER", "r", dt.date(2027, 1, 2)))


@pytest.mark.parametrize("extra, expected", [
    ("  - code: TGV_X\n    reason: r\n", r"waivers\[1\]: missing .*expires|waivers\[1\]\.expires: .*required"),
    ("  - code: tgv_x\n    reason: r\n    expires: 2027-01-01\n", r"waivers\[1\]\.code: .* not a reason code"),
    ("  - code: TGV_WAIVER_EXPIRED\n    reason: r\n    expires: 2027-01-01\n", r"waivers\[1\]\.code: .*cannot be"),
    ("  - code: TGV_X\n    reference: nobody\n    reason: r\n    expires: 2027-01-01\n",
     r"waivers\[1\]\.reference: unknown reference id 'nobody'"),
    ("  - code: TGV_X\n    reason: r\n    expires: next year\n", r"waivers\[1\]\.expires: expected a date"),
    ("  - code: TGV_X\n    reason: r\n    expires: 2027-01-01 10:00:00\n", r"waivers\[1\]\.expires: expected a date"),
    ("  - code: TGV_DISTANCE_ABOVE_THRESHOLD\n    reference: base\n    reason: again\n    expires: 2027-01-01\n",
     r"waivers\[1\]: a second waiver for TGV_DISTANCE_ABOVE_THRESHOLD on base"),
    ("  - code: TGV_X\n    reason: r\n    expires: 2027-01-01\n    owner: me\n", r"waivers\[1\]\.owner: unknown key"),
])
def test_bad_waivers_are_refused(folder: Path, extra: str, expected: str) -> None:
    path = folder / "p.yml"
    path.write_text(GOOD.format(extra=extra))
    with pytest.raises(PolicyError, match=expected):
        load_policy(path)


# ---------------------------------------------------------------------------------------------
# End to end: verify, the attestation, and verify-attestation re-deriving the verdict with the waivers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tg_verify import demo

    return demo.ensure(tmp_path_factory.getbasetemp() / "tg-demo")[0]


def _waived_policy(demo_tree: Path, tmp_path: Path, expires: dt.date) -> Path:
    """The demo's failing policy with a waiver for each of its failures."""
    from tg_verify.pipeline import verify

    failing = verify(load_policy(demo_tree / "policies" / "fail.yml")).verdict.failures
    lines = ["waivers:"]
    for finding in failing:
        lines += [f"  - code: {finding.code}", f"    reason: accepted for the test, TICKET-{len(lines)}",
                  f"    expires: {expires.isoformat()}"]
        if finding.subject:
            lines.append(f"    reference: {finding.subject}")
    text = (demo_tree / "policies" / "fail.yml").read_text().replace("../", f"{demo_tree}/")
    path = tmp_path / "waived.yml"
    path.write_text(text + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("days, verdict, attested_exit", [(30, 0, 0), (-1, 1, 1)])
def test_waivers_reach_the_attestation_and_verify_attestation_rederives_them(
        demo_tree: Path, tmp_path: Path, capsys, days: int, verdict: int, attested_exit: int) -> None:
    from tg_verify.cli import main
    from tg_verify.waivers import today_utc

    policy = _waived_policy(demo_tree, tmp_path, today_utc() + dt.timedelta(days=days))
    statement = tmp_path / "att.json"
    assert main(["verify", str(policy), "--attestation", str(statement), "--no-cache"]) == verdict
    out = capsys.readouterr().out
    assert ("waived until" in out) == (days > 0) and ("TGV_WAIVER_EXPIRED" in out) == (days < 0)
    import json

    predicate = json.loads(statement.read_text())["predicate"]
    assert [w["code"] for w in predicate["decisionRules"]["waivers"]]
    model = demo_tree / "models" / "unrelated"
    assert main(["verify-attestation", str(statement), str(model), "--policy", str(policy)]) == attested_exit
    out = capsys.readouterr().out
    assert "FAIL reason" not in out and "evidence implies" not in out, out  # the evidence agrees with the verdict
    assert "ok   waiver TGV_" in out


def test_a_waived_note_without_a_waiver_is_contradicting_evidence(demo_tree: Path, tmp_path: Path, capsys) -> None:
    import json

    from tg_verify.cli import main
    from tg_verify.waivers import today_utc

    policy = _waived_policy(demo_tree, tmp_path, today_utc() + dt.timedelta(days=30))
    statement = tmp_path / "att.json"
    assert main(["verify", str(policy), "--attestation", str(statement), "--no-cache"]) == 0
    document = json.loads(statement.read_text())
    del document["predicate"]["decisionRules"]["waivers"]  # a forger drops the waivers, keeps the notes
    statement.write_text(json.dumps(document))
    capsys.readouterr()
    assert main(["verify-attestation", str(statement), str(demo_tree / "models" / "unrelated")]) == 1
    assert "the recorded rules and evidence imply error" in capsys.readouterr().out
