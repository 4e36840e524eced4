"""Policy schema v1: what loads, and every way a broken policy is refused (one line, file + field)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tg_verify.errors import PolicyError
from tg_verify.policy import DEFAULT_MAX_DISTANCE, MAX_POLICY_BYTES, load_policy, parse_policy


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A policy directory with a candidate model dir and two reference fingerprint files (content unused)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "refs").mkdir()
    for name in ("llama.json", "qwen.json", "cand.json"):
        (tmp_path / "refs" / name).write_text("{}")
    return tmp_path


GOOD = """\
version: 1
candidate:
  path: ./model
  name: acme/llama-legal
declared:
  base: llama-3.2-1b
  family: llama
references:
  - id: llama-3.2-1b
    family: llama
    fingerprint: refs/llama.json
  - id: qwen2.5-7b
    family: qwen
    fingerprint: refs/qwen.json
    max_distance: 5
forbidden: [qwen2.5-7b]
thresholds:
  max_distance: 6.5
on_out_of_cluster: warn
outputs:
  report: out/tg-report.json
  attestation: tg-attestation.json
"""


def write(workspace: Path, text: str, name: str = "policy.yml") -> Path:
    path = workspace / name
    path.write_text(text)
    return path


def test_full_policy_loads_with_paths_relative_to_the_policy(workspace: Path) -> None:
    path = write(workspace, GOOD)
    policy = load_policy(path)
    assert policy.version == 1
    assert policy.sha256 == hashlib.sha256(GOOD.encode()).hexdigest()
    assert policy.candidate.path == workspace / "model"
    assert policy.candidate.name == "acme/llama-legal"
    assert policy.declared.base == "llama-3.2-1b" and policy.declared_family == "llama"
    assert [r.id for r in policy.references] == ["llama-3.2-1b", "qwen2.5-7b"]
    assert policy.references[0].fingerprint == workspace / "refs" / "llama.json"
    assert policy.forbidden == ("qwen2.5-7b",)
    assert policy.thresholds.max_distance == 6.5
    assert policy.threshold_for(policy.reference("qwen2.5-7b")) == 5.0
    assert policy.threshold_for(policy.reference("llama-3.2-1b")) == 6.5
    assert policy.on_out_of_cluster == "warn" and policy.on_name_mismatch == "warn"
    assert policy.outputs.report == workspace / "out" / "tg-report.json"


def test_defaults_and_family_following_from_base(workspace: Path) -> None:
    policy = load_policy(write(workspace, """\
version: 1
candidate: {path: model}
declared: {base: a}
references:
  - {id: a, family: llama, fingerprint: refs/llama.json}
"""))
    assert policy.declared_family == "llama"
    assert policy.thresholds.max_distance == DEFAULT_MAX_DISTANCE == 7.0
    assert policy.thresholds.out_of_cluster == 7.0
    assert policy.on_out_of_cluster == "fail"
    assert policy.lineage.enabled and policy.lineage.alpha == 0.01 and policy.lineage.on_unavailable == "warn"
    assert policy.fingerprint == {} and policy.forbidden == ()


def test_extensions_fingerprint_settings_lineage_and_adapter_base(workspace: Path) -> None:
    (workspace / "base").mkdir()
    policy = load_policy(write(workspace, """\
version: 1
candidate: {path: model, fingerprint: refs/cand.json, base_model: base}
declared: {family: llama, relation: adapter}
references:
  - {id: a, family: llama, model: base}
fingerprint: {seed: 3, repeats: 5, strategy: gaussian, device: cpu}
lineage: {alpha: 0.001, min_score: 0.4, on_unavailable: fail}
on_name_mismatch: fail
on_base_mismatch: fail
"""))
    assert policy.candidate.fingerprint == workspace / "refs" / "cand.json"
    assert policy.candidate.base_model == workspace / "base"
    assert policy.references[0].model == workspace / "base"
    assert policy.fingerprint == {"seed": 3, "repeats": 5, "strategy": "gaussian", "device": "cpu"}
    assert policy.lineage.alpha == 0.001 and policy.lineage.min_score == 0.4
    assert policy.lineage.on_unavailable == "fail"
    assert policy.declared.relation == "adapter"
    assert policy.on_name_mismatch == "fail" and policy.on_base_mismatch == "fail"


def test_candidate_override_replaces_the_path(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    policy = load_policy(write(workspace, GOOD), candidate_override=other)
    assert policy.candidate.path == other


BAD_CASES = [
    # (YAML, expected fragment naming the field and what was expected)
    (GOOD.replace("version: 1", "version: 2"), "version: expected 1, got 2"),
    (GOOD.replace("version: 1", "version: '1'"), "version: expected 1"),
    (GOOD.replace("  name: acme/llama-legal", "  nmae: x"), "candidate.nmae: unknown key"),
    (GOOD + "extra: 1\n", "extra: unknown key"),
    (GOOD.replace("    max_distance: 5", "    max_distance: five"), "references[1].max_distance: expected a number"),
    (GOOD.replace("    max_distance: 5", "    max_distance: -1"), "references[1].max_distance: expected a finite"),
    (GOOD.replace("  max_distance: 6.5", "  max_distance: .inf"), "thresholds.max_distance: non-finite"),
    (GOOD.replace("  base: llama-3.2-1b", "  base: llama-9b"), "declared.base: unknown reference id 'llama-9b'"),
    (GOOD.replace("forbidden: [qwen2.5-7b]", "forbidden: [mistral]"), "forbidden[0]: unknown reference id"),
    (GOOD.replace("forbidden: [qwen2.5-7b]", "forbidden: [llama-3.2-1b]"), "forbidden[0]: 'llama-3.2-1b' is also"),
    (GOOD.replace("  family: llama\nreferences", "  family: qwen\nreferences"), "declared.family: 'qwen' disagrees"),
    (GOOD.replace("fingerprint: refs/qwen.json", "fingerprint: refs/missing.json"),
     "references[1].fingerprint: refs/missing.json does not exist"),
    (GOOD.replace("  path: ./model", "  path: ./nowhere"), "candidate.path: ./nowhere does not exist"),
    (GOOD.replace("    fingerprint: refs/qwen.json\n", ""), "references[1]: needs exactly one of"),
    (GOOD.replace("    fingerprint: refs/qwen.json\n", "    fingerprint: refs/qwen.json\n    model: model\n"),
     "references[1]: needs exactly one of"),
    (GOOD.replace("  - id: qwen2.5-7b", "  - id: llama-3.2-1b"), "references[1].id: duplicate id"),
    (GOOD.replace("  - id: qwen2.5-7b", "  - id: 2024"), "references[1].id: expected a string, got an integer (quote"),
    (GOOD.replace("on_out_of_cluster: warn", "on_out_of_cluster: ignore"), "on_out_of_cluster: expected one of"),
    (GOOD.replace("on_out_of_cluster: warn", "on_out_of_cluster: off"), "on_out_of_cluster: expected a string"),
    (GOOD.replace("candidate:\n  path: ./model\n  name: acme/llama-legal\n", "candidate: {name: x}\n"),
     "candidate: needs `path`"),
    (GOOD.replace("  family: llama\nreferences", "  family: gemma\nreferences").replace("  base: llama-3.2-1b\n", ""),
     "declared.family: no reference has family 'gemma'"),
    ("version: 1\n", "candidate: is required"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("", "the policy is empty"),
    (GOOD + "fingerprint: {repeats: 0}\n", "fingerprint: fingerprint settings: repeats must be"),
    (GOOD + "fingerprint: {colour: red}\n", "fingerprint.colour: unknown key"),
    (GOOD + "lineage: {alpha: 0.9}\n", "lineage.alpha: expected a finite number"),
    (GOOD + "version: 1\n", "duplicate key 'version'"),
    (GOOD.replace("  max_distance: 6.5", "  max_distance: 99999999999999999999999999"),
     "thresholds.max_distance: number is too large"),
    (GOOD.replace("  max_distance: 6.5", "  max_distance: " + "9" * 5000), "invalid YAML value"),
    ("version: 1\ncandidate: [unclosed\n", "line 3"),
    ("version: 1\ncandidate: !!python/object:os.system {}\n", "line 2"),
    (GOOD.replace("references:", "references: &r").replace("forbidden: [qwen2.5-7b]", "forbidden: *r"),
     "anchors and aliases"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "nesting deeper"),
    (GOOD.replace("    fingerprint: refs/qwen.json\n", "    fingerprint: refs/qwen.json\n    sha256: abc\n"),
     "references[1].sha256: expected a sha256 digest"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_bad_policies_are_one_line_naming_file_and_field(workspace: Path, text: str, expected: str) -> None:
    path = write(workspace, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "\n" not in message


def test_reference_pin_accepts_a_prefixed_digest_in_any_case(workspace: Path) -> None:
    digest = "AB" * 32
    text = GOOD.replace("    fingerprint: refs/qwen.json\n",
                        f"    fingerprint: refs/qwen.json\n    sha256: sha256:{digest}\n")
    policy = load_policy(write(workspace, text))
    assert policy.references[1].sha256 == digest.lower() and policy.references[0].sha256 is None


def test_alias_bomb_is_refused_before_expansion(workspace: Path) -> None:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [*a{i-1},*a{i-1},*a{i-1},*a{i-1},*a{i-1},*a{i-1},*a{i-1},*a{i-1},*a{i-1}]"
              for i in range(1, 10)]
    with pytest.raises(PolicyError, match="anchors and aliases"):
        load_policy(write(workspace, "\n".join(lines) + "\n"))


def test_huge_file_is_refused_without_parsing(workspace: Path) -> None:
    path = workspace / "huge.yml"
    path.write_bytes(b"# " + b"x" * MAX_POLICY_BYTES + b"\n")
    with pytest.raises(PolicyError, match="over the .*-byte limit"):
        load_policy(path)
    with pytest.raises(PolicyError, match="over the .*-byte limit"):
        parse_policy(path.read_bytes(), path)


def test_missing_policy_and_directory_and_binary(workspace: Path) -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(workspace / "nope.yml")
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(workspace / "refs")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(_binary(workspace))


def _binary(workspace: Path) -> Path:
    path = workspace / "binary.yml"
    path.write_bytes(b"version: 1\n\xff\xfe\n")
    return path


def test_output_path_that_is_a_directory(workspace: Path) -> None:
    text = GOOD.replace("  report: out/tg-report.json", "  report: refs")
    with pytest.raises(PolicyError, match=r"outputs.report: .* is a directory"):
        load_policy(write(workspace, text))


def test_missing_candidate_override(workspace: Path) -> None:
    with pytest.raises(PolicyError, match="candidate path .* does not exist"):
        load_policy(write(workspace, GOOD), candidate_override=workspace / "absent")


def test_derivative_references_name_a_parent_of_their_family(workspace: Path) -> None:
    text = GOOD.replace("  - id: qwen2.5-7b\n    family: qwen\n",
                        "  - id: llama-legal-v1\n    family: llama\n    parent: llama-3.2-1b\n"
                        "    fingerprint: refs/cand.json\n  - id: qwen2.5-7b\n    family: qwen\n")
    policy = load_policy(write(workspace, text))
    assert policy.reference("llama-legal-v1").parent == "llama-3.2-1b"
    assert policy.root_of("llama-legal-v1") == "llama-3.2-1b" and policy.root_of("qwen2.5-7b") == "qwen2.5-7b"
    with pytest.raises(PolicyError, match=r"references\[1\].parent: parent 'llama-3.2-1b' is family 'llama'"):
        load_policy(write(workspace, text.replace("family: llama\n    parent", "family: qwen\n    parent")))
    with pytest.raises(PolicyError, match=r"references\[1\].parent: unknown reference id 'nope'"):
        load_policy(write(workspace, text.replace("parent: llama-3.2-1b", "parent: nope")))
    looped = text.replace("  - id: llama-3.2-1b\n    family: llama\n",
                          "  - id: llama-3.2-1b\n    family: llama\n    parent: llama-legal-v1\n")
    with pytest.raises(PolicyError, match="loops back"):
        load_policy(write(workspace, looped))


def test_errors_name_the_file_and_the_field_as_attributes(tmp_path: Path) -> None:
    """Callers (the Action's annotations) read where an error is from its attributes, never its text."""
    path = tmp_path / "p.yml"
    path.write_text("version: 1\ncandidate: {path: .}\ndeclared: {base: a}\nreferences:\n"
                    "  - {id: a, family: f, fingerprint: missing.json}\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert raised.value.file == str(path) and raised.value.field == "references[0].fingerprint"
    path.write_text("version: 1\ncandidate: [\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert raised.value.file == str(path) and raised.value.field is None


@pytest.mark.parametrize("old, new, field", [
    ("  - id: qwen2.5-7b", "  - id: qw\u0435n2.5-7b\n    family: qwen\n    fingerprint: refs/cand.json\n"
                           "  - id: qwen2.5-7b", "references[1].id"),
    ("forbidden: [qwen2.5-7b]", "forbidden: [qw\u0435n2.5-7b]", "forbidden[0]"),
    ("  base: llama-3.2-1b", "  base: ll\u0430ma-3.2-1b", "declared.base"),
    ("    family: qwen\n", "    family: qw\u0435n\n", "references[1].family"),
    ("  - id: llama-3.2-1b", "  - id: llama-3.2-1b\u200b", "references[0].id"),
    ("  - id: llama-3.2-1b", "  - id: llama 3.2 1b", "references[0].id"),
])
def test_ids_and_families_outside_the_documented_character_set_are_refused(
        workspace: Path, old: str, new: str, field: str) -> None:
    """A Cyrillic letter, a zero-width space or a blank would let two ids look the same to a reviewer."""
    path = write(workspace, GOOD.replace(old, new, 1))
    with pytest.raises(PolicyError, match=rf"{re.escape(field)}: .* is not an identifier: use ASCII letters") as raised:
        load_policy(path)
    message = str(raised.value)
    assert "\n" not in message and ("CYRILLIC" in message or "SPACE" in message), message


def test_hugging_face_style_ids_are_identifiers(workspace: Path) -> None:
    text = GOOD.replace("llama-3.2-1b", "meta-llama/Llama-3.2-1B_v1.0+ft@main")
    assert load_policy(write(workspace, text)).declared.base == "meta-llama/Llama-3.2-1B_v1.0+ft@main"
