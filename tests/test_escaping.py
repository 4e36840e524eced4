"""Untrusted text never becomes a workflow command, a second line, or markup (tg_verify/escaping.py).

The end-to-end tests run the CLI and the Action entrypoint on models whose adapter config, file
names and directory names carry workflow commands, and read the log back as the runner would
(actions/runner ActionCommand.TryParseV2 and TryParse): the only commands in it are the ones
tg-verify means.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from attestation_helpers import build_workspace, make_predicate

from tg_verify.attestation.statement import statement_of
from tg_verify.cli import main
from tg_verify.commands import action
from tg_verify.escaping import CommandGuard, markdown_code, markdown_text, neutralise, one_line, shown
from tg_verify.tiny import build_model, save_lora_adapter

# Commands the runner registers (actions/runner ActionCommandManager and its extensions).
REGISTERED = {"error", "warning", "notice", "debug", "group", "endgroup", "add-mask", "stop-commands", "set-output",
              "save-state", "set-env", "add-path", "add-matcher", "remove-matcher", "echo"}
INJECTED = "x\n::error::pwned\n::add-mask::FAIL\n::stop-commands::tok\n##[warning]legacy"


def runner_commands(log: str) -> list[tuple[str, dict[str, str], str]]:
    """(command, properties, data) for every line the runner would execute, parsed as actions/runner does."""
    commands = []
    for line in re.split(r"\r\n|\r|\n", log):
        trimmed = line.lstrip()  # .NET TrimStart: Python's whitespace set is a superset
        if trimmed.startswith("::"):
            end = trimmed.find("::", 2)
            if end >= 0:
                info = trimmed[2:end]
                name, _, props = info.partition(" ")
                if name.lower() in REGISTERED:
                    properties = dict(p.split("=", 1) for p in props.split(",") if "=" in p)
                    commands.append((name.lower(), properties, trimmed[end + 2:]))
                    continue
        start = line.find("##[")
        if start >= 0:
            close = line.find("]", start)
            if close >= 0 and line[start + 3:close].split(" ")[0].lower() in REGISTERED:
                commands.append((line[start + 3:close].split(" ")[0].lower(), {}, line[close + 1:]))
    return commands


# ---------------------------------------------------------------------------------------------
# The functions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [INJECTED, "::add-mask::NOT", "a ##[error]b", "a ##vso[task.setvariable]x",
                                   "\u2028::error::x", "\x1b]0;title\x07", "\u202etxt.exe", "tab\there"])
def test_shown_is_one_line_without_commands_or_controls(value: str) -> None:
    text = shown(value)
    assert text.isprintable() and runner_commands(text) == [] and runner_commands("  " + text) == []
    assert "::" not in text and "##[" not in text and "##vso[" not in text


def test_plain_values_are_unchanged_and_escapes_are_unambiguous() -> None:
    assert shown("model-00001-of-00002.safetensors") == "model-00001-of-00002.safetensors"
    assert shown("naïve 模型") == "naïve 模型"
    assert shown("a\\b") == "a\\b"  # plain: left alone
    assert shown("a\\b\n") == "a\\\\b\\n"  # escaped: the backslash doubled, so "\n" can only mean a newline
    assert shown("x" * 500).endswith("...(100 more characters)")
    name = shown("a\\b")
    assert one_line(f"tg-verify: {name}: line\nbreak") == "tg-verify: a\\b: line\\nbreak"


def test_guard_neutralises_command_lines_across_writes() -> None:
    raw = io.StringIO()
    guard = CommandGuard(raw)
    guard.write("fine\n   ::error::one\nx ##[warning]two\n::gr")
    guard.write("oup::three\r\n::add-mask::")
    guard.command("::notice title=tg-verify::meant")
    guard.write("tail\n")
    guard.finish()
    assert [c[0] for c in runner_commands(raw.getvalue())] == ["notice"]
    assert raw.getvalue() == ("fine\n   :\\u003aerror::one\nx #\\u0023[warning]two\n:\\u003agroup::three\r\n"
                              ":\\u003aadd-mask::\n::notice title=tg-verify::meant\ntail\n")
    assert neutralise("ok\n::x::y") == "ok\n:\\u003ax::y"


def test_markdown_helpers_render_inputs_as_text() -> None:
    assert markdown_text("</details><h1>PASS</h1>") == "&lt;/details&gt;&lt;h1&gt;PASS&lt;/h1&gt;"
    assert markdown_text("![t](https://example.invalid/p.png)").startswith("\\!\\[t\\]\\(")
    assert markdown_code("a`b|c") == "`a'b\\|c`"


# ---------------------------------------------------------------------------------------------
# End to end: the CLI and the Action on hostile models
# ---------------------------------------------------------------------------------------------

ADAPTER_POLICY = """version: 1
candidate:
  path: ./adapter
  base_model: ./llama-base
declared:
  base: llama-base
  family: llama
references:
  - id: llama-base
    family: llama
    model: ./llama-base
  - id: qwen-base
    family: qwen2
    model: ./qwen-base
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with: an adapter whose adapter_config names a base with workflow commands in it; the
    fine-tune under a directory name that rich wraps onto a line starting `::error`, next to a pickle
    file with such a name; and the fine-tune under a directory name holding a newline."""
    root = build_workspace(tmp_path_factory.mktemp("hostile"))
    save_lora_adapter(build_model("llama", seed=0), root / "adapter", seed=3, base_name=INJECTED)
    (root / "adapter.yml").write_text(ADAPTER_POLICY)
    wrapped = root / ("w" * 70 + " ::error::wrapped ::add-mask::FAIL " + "v" * 40)
    shutil.copytree(root / "candidate", wrapped)
    (wrapped / ("p" * 70 + " ::error::pickled ##[add-mask]FAIL.bin")).write_bytes(b"\x80\x04N.")
    newline = root / "cand\n::add-mask::FAIL"
    shutil.copytree(root / "candidate", newline)
    return root


CANDIDATES = {"wrapped": lambda root: next(p for p in root.iterdir() if p.name.startswith("www")),
              "newline": lambda root: root / "cand\n::add-mask::FAIL"}


def _no_commands(text: str) -> None:
    assert runner_commands(text) == [], runner_commands(text)


def test_cli_verify_of_an_adapter_with_commands_in_its_config(hostile: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(hostile)
    code = main(["verify", "adapter.yml", "--cache-dir", str(hostile / ".tg-cache")])
    out = capsys.readouterr()
    assert code in (0, 1), out.err
    assert "TGV_ADAPTER_BASE_NAME_MISMATCH" in out.out  # the finding that quotes the name is shown...
    _no_commands(out.out + out.err)  # ...and cannot act


def test_cli_inspect_of_the_adapter(hostile: Path, capsys) -> None:
    assert main(["inspect", str(hostile / "adapter")]) == 0
    out = capsys.readouterr()
    _no_commands(out.out + out.err)


@pytest.mark.parametrize("which", sorted(CANDIDATES))
def test_cli_verify_of_hostile_directory_and_file_names(hostile: Path, which: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(hostile)
    candidate = CANDIDATES[which](hostile)
    code = main(["verify", "pass.yml", "--candidate", str(candidate), "--cache-dir", str(hostile / ".tg-cache")])
    out = capsys.readouterr()
    assert code in (0, 1, 2), out.err
    _no_commands(out.out + out.err)


@pytest.mark.parametrize("which", sorted(CANDIDATES))
def test_fingerprint_and_inspect_of_hostile_names(hostile: Path, which: str, tmp_path: Path, capsys) -> None:
    candidate = CANDIDATES[which](hostile)
    main(["fingerprint", str(candidate), "-o", str(tmp_path / "fp.json")])
    main(["inspect", str(candidate)])
    out = capsys.readouterr()
    _no_commands(out.out + out.err)


def _action_env(root: Path, tmp_path: Path, **inputs: str) -> dict[str, str]:
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    env = {"GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(root), "RUNNER_TEMP": str(temp),
           "GITHUB_OUTPUT": str(temp / "output"), "GITHUB_STEP_SUMMARY": str(temp / "summary"),
           "INPUT_CACHE": str(root / ".tg-cache")}  # the module's cache: references fingerprinted once
    env.update({f"INPUT_{k.upper()}": v for k, v in inputs.items()})
    return env


@pytest.mark.parametrize("case", ["adapter", "wrapped", "newline"])
def test_action_log_holds_only_the_commands_tg_verify_means(hostile: Path, tmp_path: Path, case: str,
                                                              monkeypatch) -> None:
    monkeypatch.chdir(hostile)
    inputs = {"policy": "adapter.yml"} if case == "adapter" else \
        {"policy": "pass.yml", "candidate": str(CANDIDATES[case](hostile).relative_to(hostile))}
    if case == "newline":
        inputs["candidate"] = "cand"  # an input must be one line; the hostile name reaches it via a symlink
        (hostile / "cand").unlink(missing_ok=True)
        (hostile / "cand").symlink_to(CANDIDATES["newline"](hostile))
    out = io.StringIO()
    code = action.run(type("Args", (), {"debug": False})(), environ=_action_env(hostile, tmp_path, **inputs), out=out)
    log = out.getvalue()
    assert code in (0, 1, 2), log
    commands = runner_commands(log)
    assert {name for name, _, _ in commands} <= {"group", "endgroup", "error", "warning", "notice"}, commands
    for name, properties, data in commands:
        if name in ("error", "warning", "notice"):
            assert properties.get("title", "").startswith("tg-verify"), (name, properties, data)
            assert "\n" not in data and "%0A" not in data  # one line on the run page too


def test_verify_attestation_prints_attestation_strings_escaped(tmp_path: Path, capsys) -> None:
    """Subject names, reason codes and reference ids of an untrusted attestation cannot hide the verdict."""
    from tg_verify.tiny import save_model

    model = save_model(build_model("llama", seed=0), tmp_path / "model", "single")
    statement = statement_of(make_predicate(model))
    statement["subject"].append({"name": "x\n::add-mask::NOT", "digest": {"sha256": "d" * 64}})
    predicate = statement["predicate"]
    predicate["reasons"].append({"code": "TGV_X\n::add-mask::NOT\n##[error]forged", "severity": "error",
                                 "message": "m"})
    hostile_id = "ref\n::stop-commands::tok"  # renamed wherever the id is named, so the predicate still parses
    assert predicate["references"][0]["id"] == predicate["declaredLineage"]["base"] == predicate["attribution"]["base"]
    predicate["references"][0]["id"] = predicate["declaredLineage"]["base"] = hostile_id
    predicate["attribution"]["base"] = predicate["decisionRules"]["declaredBaseRoot"] = hostile_id
    predicate["references"][0]["withinThreshold"] = not predicate["references"][0]["withinThreshold"]
    path = tmp_path / "attestation.json"
    path.write_text(json.dumps(statement))
    code = main(["verify-attestation", str(path), str(model)])
    out = capsys.readouterr()
    assert code != 0
    _no_commands(out.out + out.err)
    assert re.search(r"^NOT VERIFIED: attested PASSED", out.out, re.M)
    code = main(["verify-attestation", str(path), str(model), "--json"])
    out = capsys.readouterr()
    _no_commands(out.out + out.err)
    assert json.loads(out.out)["ok"] is False  # the JSON stays valid JSON


def test_index_search_and_classify_print_stored_names_escaped(tiny_models, tmp_path: Path, capsys) -> None:
    """Model names recorded in fingerprint files reach the verbs added since (index, search, classify): they
    print as one escaped line, never as a command or as rich markup; an index refuses a name with a line
    break when it is built (it could not read it back), naming the file."""
    fps = tmp_path / "fps"
    names = {"llama": "llama ::add-mask::FAIL ##[error]x [bold]", "qwen2": "qwen\n::stop-commands::tok"}
    for arch, name in names.items():
        assert main(["fingerprint", str(tiny_models[arch]["single"]), "-o", str(fps / f"{arch}.json"),
                     "--name", name]) == 0
    capsys.readouterr()
    index = tmp_path / "index"
    assert main(["index", "build", str(fps), "-o", str(index)]) == 2  # the qwen2 name is refused, llama indexed
    out = capsys.readouterr()
    assert "qwen2.json" in out.err and "holds control characters" in out.err
    for argv in (["search", str(fps / "llama.json"), "--index", str(index)], ["index", "verify", str(index)],
                 ["classify", str(fps / "llama.json"), "--refs", str(fps)]):
        assert main(argv) == 0, argv
        out = capsys.readouterr()
        _no_commands(out.out + out.err)
        if argv[0] != "index":
            assert ":\\u003aadd-mask:\\u003aFAIL #\\u0023[error]x [bold]" in out.out  # shown, markup kept as text
