"""The index on disk: incremental updates, and every file validated as untrusted input when read."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tg_verify.cli import main
from tg_verify.errors import IndexFormatError, UsageError
from tg_verify.fingerprint.document import load
from tg_verify.index.build import add_references, remove_references, verify_index
from tg_verify.index.store import MANIFEST, blob_path, locked, open_index, shard_path


@pytest.fixture(scope="module")
def few(search_zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six reference fingerprints copied out of the search zoo (bases, a root, three distractors)."""
    folder = tmp_path_factory.mktemp("few")
    names = ["000-llama-base", "llama-distractor-00001", "llama-distractor-00002", "llama-distractor-00003",
             "qwen2-distractor-00001", "qwen2-distractor-00002"]
    base = next(p for p in search_zoo.references.glob("*qwen2-base.json"))
    paths = {name: Path(shutil.copy(search_zoo.references / f"{name}.json", folder)) for name in names}
    paths["qwen2-base"] = Path(shutil.copy(base, folder))
    return paths


def _build(tmp_path: Path, paths: list[Path], **kwargs: Any) -> Path:
    root = tmp_path / "index"
    report = add_references(root, paths, create=True, **kwargs)
    assert report.problems == [], report.problems
    return root


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST).read_text())


def _rewrite_manifest(root: Path, change: Any) -> None:
    manifest = _manifest(root)
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_incremental_add_replace_remove_and_garbage(few: dict[str, Path], tmp_path: Path) -> None:
    paths = list(few.values())
    root = _build(tmp_path, paths[:3])
    first = open_index(root)
    assert [e.id for e in first.entries] == ["000-llama-base", "llama-distractor-00001", "llama-distractor-00002"]
    assert np.allclose(np.linalg.norm(first.signatures, axis=1), 1.0, atol=2e-3)

    more = add_references(root, paths[2:])
    assert (set(more.added), more.unchanged) == ({Path(p).stem for p in paths[3:]}, ["llama-distractor-00002"])
    grown = open_index(root)
    assert len(grown.entries) == 7 and len(grown.shards) == 2  # the first shard untouched, one new shard
    assert grown.shards[0].entries == first.shards[0].entries

    changed = tmp_path / "changed" / "llama-distractor-00001.json"  # same id, other content: a stale entry
    fp = load(few["llama-distractor-00001"])
    edited = replace(fp, **{"features": {**fp.features, "global_mean": fp.features["global_mean"] * 2}})
    changed.parent.mkdir()
    changed.write_bytes(edited.to_json_bytes())
    refused = add_references(root, [changed])
    assert refused.exit_code == 2 and "indexed already with other content" in refused.problems[0][1]
    assert open_index(root).digest == grown.digest  # nothing written
    replaced = add_references(root, [changed], replace=True)
    assert replaced.replaced == ["llama-distractor-00001"]
    assert open_index(root).fingerprint(open_index(root).entries[-1]).features == edited.features

    qwen2_base = few["qwen2-base"].stem
    removed = remove_references(root, ["llama-distractor-00001", qwen2_base])
    after = open_index(root)
    assert set(removed.removed) == {"llama-distractor-00001", qwen2_base}
    assert {e.id for e in after.entries} == {"000-llama-base", "llama-distractor-00002", "llama-distractor-00003",
                                             "qwen2-distractor-00001", "qwen2-distractor-00002"}
    named = {f"{e.fingerprint_sha256}.json" for e in after.entries}
    assert {p.name for p in (root / "refs").rglob("*.json")} == named  # no orphan left behind
    assert len(list((root / "shards").iterdir())) == 3 * len(after.shards)
    with pytest.raises(UsageError, match="no reference called 'nope'"):
        remove_references(root, ["nope"])
    assert verify_index(root).problems == []


def test_the_same_references_give_the_same_index_whatever_the_order(few: dict[str, Path], tmp_path: Path) -> None:
    paths = list(few.values())
    one = _build(tmp_path / "a", paths)
    two = _build(tmp_path / "b", paths[::-1])
    assert open_index(one).digest == open_index(two).digest
    add_references(two, [few["qwen2-base"]])  # unchanged: nothing rewritten
    assert open_index(two).digest == open_index(one).digest


def test_inputs_that_cannot_be_indexed_are_reported_and_the_rest_indexed(few: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    fp = load(few["000-llama-base"])
    no_sketch = tmp_path / "in" / "no-sketch.json"
    no_sketch.parent.mkdir()
    no_sketch.write_bytes(replace(fp, **{"model_name": "no-sketch", "sketch": None}).to_json_bytes())
    other_settings = tmp_path / "in" / "other.json"
    other_settings.write_bytes(replace(fp, **{"model_name": "other",
                                              "settings": {**fp.settings, "repeats": 7}}).to_json_bytes())
    twin = tmp_path / "in" / "twin.json"  # the same model name as a reference: ids would collide
    twin.write_bytes(replace(load(few["qwen2-base"]), **{"model_name": fp.model_name}).to_json_bytes())
    (tmp_path / "in" / "broken.json").write_text("{")
    code = main(["index", "build", str(few["000-llama-base"]), str(tmp_path / "in"), "-o", str(tmp_path / "I")])
    out, err = capsys.readouterr()
    assert code == 2 and "1 references, 1 added" in out
    assert "no-sketch.json: no lineage sketch" in err and "other.json: fingerprinted with" in err
    assert "broken.json: not valid JSON" in err and "ids must be unique" in err
    assert err.rstrip().endswith("4 problem(s)")
    assert main(["index", "build", str(few["qwen2-base"]), "-o", str(tmp_path / "I")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["index", "add", str(tmp_path / "I"), str(tmp_path / "in" / "twin.json"), "--id-from", "file"]) == 0
    assert {e.id for e in open_index(tmp_path / "I").entries} == {fp.model_name, "twin"}


def test_labels_name_families(few: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "labels.yml"
    labels.write_text("\n".join(f"{Path(p).stem}: {{family: {'llama' if 'llama' in Path(p).stem else 'qwen'}}}"
                                for p in few.values()) + "\n")
    root = tmp_path / "I"
    assert main(["index", "build", *map(str, few.values()), "-o", str(root), "--labels", str(labels)]) == 0
    families = {e.id: e.family for e in open_index(root).entries}
    assert families["000-llama-base"] == "llama" and families["qwen2-distractor-00002"] == "qwen"


# ------------------------------------------------------------------------------------- untrusted input


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _replace_shard_file(root: Path, part: str, data: bytes, *, update_manifest: bool) -> None:
    record = _manifest(root)["shards"][0]
    shard_path(root, record["name"], part).write_bytes(data)
    if update_manifest:  # an attacker who also fixes the manifest's digest
        _rewrite_manifest(root, lambda m: m["shards"][0].__setitem__(f"{part.split('.')[0]}_sha256",
                                                                      hashlib.sha256(data).hexdigest()))


MANIFEST_EDITS = {
    "schema": (lambda m: m.__setitem__("schema", "x"), "'schema' must be"),
    "version": (lambda m: m.__setitem__("format_version", 2), "format_version 2 is not supported"),
    "unknown": (lambda m: m.__setitem__("extra", 1), "unknown fields extra"),
    "signature": (lambda m: m["signature"].__setitem__("dims", 64), "rebuild it with `tg-verify index build`"),
    "count": (lambda m: m.__setitem__("count", 99), "differs from the shards' total"),
    "traversal": (lambda m: m["shards"][0].__setitem__("name", "../../etc/passwd"), "expected 16 lowercase hex"),
    "duplicate": (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
    "digest": (lambda m: m["shards"][0].__setitem__("entries_sha256", "0" * 64), "does not match the manifest"),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_a_manifest_that_breaks_a_rule_is_refused_with_the_field(edit: str, few: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    root = _build(tmp_path, [few["000-llama-base"], few["qwen2-base"]])
    change, message = MANIFEST_EDITS[edit]
    _rewrite_manifest(root, change)
    with pytest.raises(IndexFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_index(root)


def test_malformed_json_and_arrays_are_refused(few: dict[str, Path], tmp_path: Path) -> None:
    root = _build(tmp_path, [few["000-llama-base"], few["qwen2-base"]])
    text = (root / MANIFEST).read_text()
    (root / MANIFEST).write_text(text.replace('"count"', '"count": 2, "count"', 1))
    with pytest.raises(IndexFormatError, match="duplicate key 'count'"):
        open_index(root)
    (root / MANIFEST).write_text(text.replace('"count": 2', '"count": NaN'))
    with pytest.raises(IndexFormatError, match="non-finite number NaN"):
        open_index(root)
    (root / MANIFEST).write_text(text)
    entries = shard_path(root, _manifest(root)["shards"][0]["name"], "entries.json")
    bad = json.loads(entries.read_text())
    bad[0]["id"] = "evil\x1b[31m"
    _replace_shard_file(root, "entries.json", json.dumps(bad).encode(), update_manifest=True)
    with pytest.raises(IndexFormatError, match=r"entries.json\[0\].id: expected a non-empty string of printable"):
        open_index(root)
    for part, data, message in (
            ("signatures.npy", _npy(np.array([{"a": 1}, {"b": 2}], dtype=object)), "not a .npy array"),
            ("signatures.npy", _npy(np.zeros((2, 512), dtype=np.float32)), "expected float16 \\[2, 512\\]"),
            ("signatures.npy", _npy(np.full((2, 512), np.nan, dtype=np.float16)), "non-finite"),
            ("features.npy", b"PK\x03\x04 a zip, not an array", "bad magic")):
        fresh = _build(tmp_path / part / message[:5], [few["000-llama-base"], few["qwen2-base"]])
        _replace_shard_file(fresh, part, data, update_manifest=True)
        with pytest.raises(IndexFormatError, match=message):
            open_index(fresh)


def test_tampered_files_are_caught_on_read_and_by_verify(few: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = _build(tmp_path, [few["000-llama-base"], few["qwen2-base"], few["llama-distractor-00001"]])
    index = open_index(root)
    record = _manifest(root)["shards"][0]
    signatures = np.load(shard_path(root, record["name"], "signatures.npy"))
    hidden = signatures.copy()
    hidden[0] = -hidden[0]  # an attacker hides the llama base from retrieval, and fixes the manifest's digest
    _replace_shard_file(root, "signatures.npy", _npy(hidden), update_manifest=True)
    assert open_index(root).entries == index.entries  # consistent files: only a re-derivation shows it
    report = verify_index(root)
    assert report.problems == [("000-llama-base", "its signature does not match its stored fingerprint "
                                                  "(tampered with)")]

    blob = blob_path(root, index.entries[1].fingerprint_sha256)
    document = json.loads(blob.read_text())
    document["model_name"] = "renamed"
    blob.write_text(json.dumps(document))
    with pytest.raises(IndexFormatError, match="does not match its sha256"):
        open_index(root).fingerprint(index.entries[1])
    assert main(["index", "verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert "000-llama-base: its signature" in err and "does not match its sha256" in err
    assert err.rstrip().endswith("2 problem(s)")
    blob.unlink()
    assert any("missing or unreadable" in m for _, m in verify_index(root).problems)


def test_verify_sources_finds_stale_and_missing_entries(few: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    sources = [Path(shutil.copy(few[n], folder)) for n in ("000-llama-base", "qwen2-base", "llama-distractor-00002")]
    root = _build(tmp_path, sources)
    assert main(["index", "verify", str(root), "--sources"]) == 0
    assert "3 references, checked" in capsys.readouterr().out
    fp = load(sources[0])
    sources[0].write_bytes(replace(fp, **{"features": {**fp.features, "global_std": 1.0}}
                                       ).to_json_bytes())
    sources[2].unlink()
    problems = dict(verify_index(root, sources=True).problems)
    assert problems["000-llama-base"].startswith("stale: its source") and "changed since" in problems["000-llama-base"]
    assert "cannot be read now" in problems["llama-distractor-00002"]
    assert verify_index(root).problems == []  # the index itself is intact


def test_one_writer_at_a_time(few: dict[str, Path], tmp_path: Path) -> None:
    root = _build(tmp_path, [few["000-llama-base"], few["qwen2-base"]])
    with locked(root), pytest.raises(UsageError, match="another tg-verify is changing this index"):
        add_references(root, [few["llama-distractor-00001"]])
    assert add_references(root, [few["llama-distractor-00001"]]).added == ["llama-distractor-00001"]
