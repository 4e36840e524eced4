"""The command line's own behaviour: verb dispatch, a mistyped verb, and one-line errors."""

from __future__ import annotations

import pytest

from tg_verify.cli import main


@pytest.mark.parametrize("typo, verb", [("inspct", "inspect"), ("fingerprnt", "fingerprint"),
                                        ("verify-atestation", "verify-attestation"), ("clasify", "classify")])
def test_a_mistyped_verb_names_the_closest_verb(typo: str, verb: str, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([typo, "model"]) == 2
    err = capsys.readouterr().err
    assert f"'{typo}' is neither a verb nor a policy file" in err and f"did you mean '{verb}'?" in err
    assert "unrecognized arguments" not in err and len(err.strip().splitlines()) == 1


def test_a_word_close_to_no_verb_lists_the_verbs(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["zzz"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "verbs: verify, fingerprint" in err


def test_a_policy_file_is_still_the_main_job(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["gate.yml"]) == 2  # shorthand for `verify gate.yml`: the policy is missing
    assert "gate.yml" in capsys.readouterr().err
    (tmp_path / "policy").write_text("version: 1\n")  # an existing file without .yml is a policy too
    assert main(["policy"]) == 2
    assert "neither a verb" not in capsys.readouterr().err
