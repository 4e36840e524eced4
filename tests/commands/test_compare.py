"""`tg-verify compare`: distances between models or fingerprints, with and without a reference scale."""

from __future__ import annotations

import json

from tg_verify.cli import main


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_two_fingerprints_without_refs_report_only_the_relative_distance(tiny_fingerprints, capsys):
    assert main(["compare", str(tiny_fingerprints["llama-ft"]), str(tiny_fingerprints["llama"]), "--json"]) == 0
    result = _json(capsys)["comparison"]
    assert result["distance"] is None and 0 < result["relative_distance"] < 1
    assert any("no scale for the paper's distance" in c for c in result["caveats"])
    assert any("the population scale does not apply: reference llama lies outside" in c for c in result["caveats"])
    assert result["lineage"]["derived"] is True


def test_with_refs_the_derivative_is_nearer_its_base_than_other_families(tiny_fingerprints, capsys):
    refs = str(tiny_fingerprints["llama"].parent)
    distances = {}
    for other in ("llama", "qwen2", "gemma"):
        assert main(["compare", str(tiny_fingerprints["llama-ft"]), str(tiny_fingerprints[other]), "--refs", refs,
                     "--json", "--no-lineage"]) == 0
        result = _json(capsys)["comparison"]
        assert result["space"]["reference_count"] == 5 and result["lineage"] is None
        assert result["scale"] == "references" and not result["meaningful"] and result["within_threshold"] is None
        assert any("fitted on 5 references" in r for r in result["not_meaningful"])
        distances[other] = result["distance"]
    assert distances["llama"] < distances["qwen2"] and distances["llama"] < distances["gemma"]


def test_a_model_is_fingerprinted_on_the_fly_with_the_other_sides_settings(tiny_fingerprints, capsys):
    model = str(tiny_fingerprints["llama-ft-model"])
    assert main(["compare", model, str(tiny_fingerprints["llama-ft"]), "--json", "--no-lineage",
                 "--device", "cpu"]) == 0
    document = _json(capsys)
    assert document["comparison"]["relative_distance"] == 0.0
    assert document["a"]["root_digest"] == document["b"]["root_digest"]


def test_stable_across_runs_and_written_with_output(tiny_fingerprints, capsys, tmp_path):
    args = ["compare", str(tiny_fingerprints["gemma"]), str(tiny_fingerprints["phi3"]),
            "--refs", str(tiny_fingerprints["llama"].parent), "--json", "-o", str(tmp_path / "c.json")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first == (tmp_path / "c.json").read_text()


def test_human_output_says_when_the_distance_is_not_meaningful(tiny_fingerprints, capsys):
    assert main(["compare", str(tiny_fingerprints["llama-ft"]), str(tiny_fingerprints["llama"]),
                 "--refs", str(tiny_fingerprints["llama"].parent), "--no-lineage"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "llama-ft" in out and "global_mean" in out
    assert "on the scale fitted on 5 references: not meaningful: the scale was fitted on 5 references" in out


def test_legacy_reference_compares_with_a_caveat(tiny_fingerprints, tmp_path, capsys):
    document = json.loads(tiny_fingerprints["qwen2"].read_text())
    flat = {**document["features"], "model_name": "qwen-release"}
    (tmp_path / "legacy.json").write_text(json.dumps(flat))
    assert main(["compare", str(tiny_fingerprints["qwen2"]), str(tmp_path / "legacy.json"), "--json"]) == 0
    result = _json(capsys)["comparison"]
    assert result["legacy"] and result["relative_distance"] == 0.0
    assert any("legacy" in c for c in result["caveats"])


def test_incompatible_settings_are_exit_2(tiny_fingerprints, tmp_path, capsys):
    document = json.loads(tiny_fingerprints["qwen2"].read_text())
    document["settings"]["seed"] = 7
    (tmp_path / "other.json").write_text(json.dumps(document))
    assert main(["compare", str(tiny_fingerprints["qwen2"]), str(tmp_path / "other.json")]) == 2
    assert "settings differ" in capsys.readouterr().err


def test_bad_arguments_are_exit_2(tiny_fingerprints, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.json"), str(tiny_fingerprints["qwen2"])]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["compare", str(tiny_fingerprints["qwen2"]), str(tiny_fingerprints["qwen2"]),
                 "--threshold", "0"]) == 2
    assert "--threshold" in capsys.readouterr().err
