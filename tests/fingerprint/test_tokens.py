"""Token keys: texts from the tokenizer beside the weights (validated as untrusted input), else ids."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tg_verify.fingerprint.tokens import (
    MAX_TOKEN_ID,
    TokenizerError,
    artifact_keys,
    id_keys,
    read_tokenizer,
    string_keys,
    tokenizer_keys,
)


def write(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


def bpe(vocab: dict[str, int], added: list[dict] | None = None) -> dict:
    return {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added or []}


def test_bpe_vocabulary_with_added_tokens(tmp_path: Path) -> None:
    path = write(tmp_path / "tokenizer.json", bpe({"a": 0, "b": 1, "ab": 3}, [{"id": 4, "content": "<s>"}]))
    assert read_tokenizer(path) == [[b"a"], [b"b"], [], [b"ab"], [b"<s>"]]
    keys = tokenizer_keys(path, 6)  # six embedding rows: row 2 and row 5 have no text, so no key
    assert keys.kind == "strings" and keys.present.tolist() == [True, True, False, True, True, False]
    assert len(set(keys.keys[keys.present].tolist())) == 4


def test_unigram_vocabulary_is_positional(tmp_path: Path) -> None:
    path = write(tmp_path / "tokenizer.json", {"model": {"type": "Unigram", "vocab": [["▁a", -1.0], ["▁b", -2.0]]}})
    assert read_tokenizer(path) == [["▁a".encode()], ["▁b".encode()]]


def test_keys_follow_texts_not_ids(tmp_path: Path) -> None:
    one = write(tmp_path / "one.json", bpe({"x": 0, "y": 1, "z": 2}))
    two = write(tmp_path / "two.json", bpe({"z": 0, "x": 1, "y": 2}))
    a, b = tokenizer_keys(one, 3), tokenizer_keys(two, 3)
    assert a.keys.tolist() == [b.keys[1], b.keys[2], b.keys[0]]
    assert not set(a.keys.tolist()) & set(id_keys(3).keys.tolist())  # texts and ids never share a key


def test_ids_beyond_the_embedding_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "tokenizer.json", bpe({"a": 0, "b": 1}, [{"id": 9, "content": "<pad>"}]))
    keys = tokenizer_keys(path, 2)
    assert keys.present.all() and len(keys.keys) == 2


def test_vocab_json(tmp_path: Path) -> None:
    path = write(tmp_path / "vocab.json", {"hello": 1, "world": 0})
    assert read_tokenizer(path) == [[b"world"], [b"hello"]]


@pytest.mark.parametrize("document, message", [
    ([1, 2], "must be a JSON object"),
    ({"model": "BPE"}, "'model' must be an object"),
    ({"model": {"vocab": 5}}, "model.vocab must be"),
    ({"model": {"vocab": {"a": -1}}}, "model.vocab\\['a'\\] must be a token id"),
    ({"model": {"vocab": {"a": MAX_TOKEN_ID}}}, "must be a token id"),
    ({"model": {"vocab": {"a": True}}}, "must be a token id"),
    ({"model": {"vocab": [["a"]]}}, "model.vocab\\[0\\] must be a \\[text, score\\] pair"),
    ({"model": {"vocab": {"a": 0}}, "added_tokens": {}}, "'added_tokens' must be a list"),
    ({"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 1}]}, "added_tokens\\[0\\].content must be a string"),
    ({"model": {"vocab": {}}}, "vocabulary is empty"),
])
def test_malformed_tokenizers_name_the_field(tmp_path: Path, document: object, message: str) -> None:
    path = write(tmp_path / "tokenizer.json", document)
    with pytest.raises(TokenizerError, match=message) as caught:
        read_tokenizer(path)
    assert str(caught.value).startswith(f"{path}: ") and caught.value.file == str(path)


def test_tokenizer_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"\xff{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        read_tokenizer(path)


def test_artifact_keys_prefer_an_embedded_vocabulary_then_the_file_then_ids(tmp_path: Path) -> None:
    assert artifact_keys(SimpleNamespace(root=tmp_path), 4).kind == "ids"
    write(tmp_path / "tokenizer.json", bpe({"a": 0, "b": 1, "c": 2, "d": 3}))
    from_file = artifact_keys(SimpleNamespace(root=tmp_path), 4)
    assert from_file.kind == "strings" and from_file.source.endswith("tokenizer.json")
    embedded = artifact_keys(SimpleNamespace(root=tmp_path, vocabulary=(b"a", b"b", b"c", b"d")), 4)
    assert embedded.kind == "strings" and np.array_equal(embedded.keys, from_file.keys)


def test_string_keys_of_an_id_with_two_texts_do_not_depend_on_their_order() -> None:
    a = string_keys([[b"x", b"y"]], 1, "a")
    b = string_keys([[b"y", b"x"]], 1, "b")
    assert a.keys[0] == b.keys[0]
