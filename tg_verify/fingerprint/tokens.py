"""Token keys: what the lineage sketch calls a token, so that a relabelled vocabulary keys the same.

When the runtime's tokenizer is at hand (tokenizer.json or vocab.json beside the weights, or a GGUF
vocabulary), a token's key is a hash of its text: re-numbering the ids (embedding and head rows moved,
the tokenizer rewritten to match) changes no key. Without a tokenizer the key is a hash of the id.
The two kinds never mix: a sketch records which one it used. Tokenizer files are untrusted input:
bounded, parsed as data, every problem an error naming the file and field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tg_verify.artifact.safeio import load_json_file
from tg_verify.errors import ArtifactError

MAX_TOKENIZER_BYTES = 128 * 1024 * 1024  # a 256k-token tokenizer.json with merges is ~35 MB
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "vocab.json")
MAX_TOKEN_ID = 1 << 24  # no vocabulary comes near 16M ids; larger ids are a malformed file


class TokenizerError(ArtifactError):
    """A tokenizer file beside the weights that cannot be read as a vocabulary."""

    code = "TGV_TOKENIZER"


@dataclass(frozen=True)
class TokenKeys:
    """Per embedding row: its 64-bit key, and whether it has one (rows a tokenizer does not name have none).

    `kind` is "strings" (keys from the token texts) or "ids"; `source` names the file or says "token ids".
    """

    kind: str
    keys: np.ndarray  # uint64 [rows]
    present: np.ndarray  # bool [rows]
    source: str


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"tgv-token-key").digest(), "little")


def id_keys(rows: int) -> TokenKeys:
    """Keys from the ids themselves (no tokenizer): every row has one (splitmix64 of the id, vectorised)."""
    with np.errstate(over="ignore"):
        z = np.arange(rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x6A09E667F3BCC909)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        keys = z ^ (z >> np.uint64(31))
    return TokenKeys("ids", keys, np.ones(rows, dtype=bool), "token ids")


def string_keys(texts: Sequence[Sequence[bytes]], rows: int, source: str) -> TokenKeys:
    """Keys from token texts: texts[i] = every text the tokenizer maps to id i (empty: none). Ids at or past
    `rows` (tokens without an embedding row) are ignored; rows no text names have no key."""
    keys = np.zeros(rows, dtype=np.uint64)
    present = np.zeros(rows, dtype=bool)
    for token_id, names in enumerate(texts[:rows]):
        if names:
            keys[token_id] = _hash(b"text:" + b"\0".join(sorted(names)))
            present[token_id] = True
    return TokenKeys("strings", keys, present, source)


def _checked_id(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_TOKEN_ID:
        raise TokenizerError(f"{where} must be a token id in [0, {MAX_TOKEN_ID}), got {str(value)[:40]!r}")
    return value


def _checked_text(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise TokenizerError(f"{where} must be a string, got {type(value).__name__}")
    return value.encode("utf-8", "surrogatepass")


def _vocab_entries(document: dict[str, Any], kind: str, name: str) -> list[tuple[int, bytes]]:
    """(id, text) pairs of a tokenizer.json (model.vocab and added_tokens) or a vocab.json (text -> id), by `kind`
    (the file's base name); `name` is the path the messages start with."""
    entries: list[tuple[int, bytes]] = []
    if kind == "vocab.json":
        for text, token_id in document.items():
            entries.append((_checked_id(token_id, f"{name}: the id of {text[:40]!r}"), _checked_text(text, name)))
        return entries
    model = document.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(f"{name}: 'model' must be an object")
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: text -> id
        for text, token_id in vocab.items():
            entries.append((_checked_id(token_id, f"{name}: model.vocab[{text[:40]!r}]"), _checked_text(text, name)))
    elif isinstance(vocab, list):  # Unigram: [[text, score], ...], the id is the position
        for token_id, item in enumerate(vocab):
            if not isinstance(item, list) or len(item) != 2:
                raise TokenizerError(f"{name}: model.vocab[{token_id}] must be a [text, score] pair")
            entries.append((_checked_id(token_id, f"{name}: model.vocab position"),
                            _checked_text(item[0], f"{name}: model.vocab[{token_id}][0]")))
    else:
        raise TokenizerError(f"{name}: model.vocab must be an object (text -> id) or a list of [text, score]")
    added = document.get("added_tokens", [])
    if not isinstance(added, list):
        raise TokenizerError(f"{name}: 'added_tokens' must be a list")
    for n, token in enumerate(added):
        if not isinstance(token, dict):
            raise TokenizerError(f"{name}: added_tokens[{n}] must be an object")
        entries.append((_checked_id(token.get("id"), f"{name}: added_tokens[{n}].id"),
                        _checked_text(token.get("content"), f"{name}: added_tokens[{n}].content")))
    return entries


def read_tokenizer(path: Path) -> list[list[bytes]]:
    """The vocabulary of a tokenizer.json or vocab.json: index = id, value = the texts naming that id."""
    try:
        document, _ = load_json_file(path, path.name, max_bytes=MAX_TOKENIZER_BYTES)
    except ArtifactError as exc:
        raise TokenizerError(str(exc), file=str(path)) from None
    entries = _vocab_entries(document, path.name, str(path))
    if not entries:
        raise TokenizerError(f"{path}: the vocabulary is empty")
    texts: list[list[bytes]] = [[] for _ in range(max(i for i, _ in entries) + 1)]
    for token_id, text in entries:
        if text not in texts[token_id]:
            texts[token_id].append(text)
    return texts


def tokenizer_path(root: Path) -> Path | None:
    """The tokenizer file a runtime would load beside the weights in `root` (tokenizer.json first), or None."""
    for name in TOKENIZER_FILES:
        candidate = root / name
        if candidate.is_file():
            return candidate
    return None


def artifact_keys(artifact: Any, rows: int, base: Any = None) -> TokenKeys:
    """The token keys of an artifact's `rows` embedding rows: from its vocabulary (GGUF metadata) or the tokenizer
    file beside its weights when there is one; for an adapter merged onto `base` that ships no tokenizer of its
    own, from the base's (what a runtime loads with it); else from the ids."""
    for source in (artifact, base):
        if source is None:
            continue
        vocabulary = getattr(source, "vocabulary", None)
        if vocabulary is not None:
            return string_keys([[bytes(text)] for text in vocabulary], rows, f"{source.root}: embedded vocabulary")
        root = Path(source.root)
        path = tokenizer_path(root) if root.is_dir() else None
        if path is not None:
            return string_keys(read_tokenizer(path), rows, str(path))
    return id_keys(rows)


def tokenizer_keys(path: str | Path, rows: int) -> TokenKeys:
    """Keys of `rows` embedding rows from a tokenizer file, as the fingerprint would take them: for computing
    the sketch of live weights (`sketch.sketch_units`)."""
    return string_keys(read_tokenizer(Path(path)), rows, str(path))
