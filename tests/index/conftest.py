"""A zoo of trained tiny models for lineage search: bases, their derivatives and evasions, and distractors.

Two architectures, each with a base and two independently trained roots (same shape, same text, other
seeds). The index holds the bases, one root each (a real unrelated model) and distractors mixed from the
roots (bench/distractors.py); the candidates are the bases' derivatives and evasions, never indexed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import transforms as T  # noqa: E402
from bench.distractors import distractors  # noqa: E402
from bench.zoo import corpus, fine_tune, int8_roundtrip, lora_merge, train  # noqa: E402
from tg_verify.atomic import write_bytes  # noqa: E402
from tg_verify.fingerprint.document import Fingerprint  # noqa: E402
from tg_verify.tiny import build_model, one_thread  # noqa: E402

ARCHS = ("llama", "qwen2")
STEPS = 30
DISTRACTORS = 150  # per architecture


@dataclass(frozen=True)
class SearchZoo:
    references: Path  # a directory of reference fingerprints (bases, roots, distractors)
    candidates: dict[str, tuple[Path, str]]  # derivative name -> (fingerprint file, id of its base)
    bases: dict[str, Path]  # arch -> base fingerprint file
    unrelated: Path  # an independently trained model that nothing indexed derives from


def _save(fingerprint: Fingerprint, path: Path) -> Path:
    return write_bytes(path, fingerprint.to_json_bytes())


@pytest.fixture(scope="session")
def search_zoo(tmp_path_factory: pytest.TempPathFactory) -> SearchZoo:
    root = tmp_path_factory.mktemp("search-zoo")
    text = {part: corpus(part, 120_000) for part in ("pretrain", "light", "lora")}
    references, models = root / "references", root / "models"
    candidates: dict[str, tuple[Path, str]] = {}
    bases: dict[str, Path] = {}
    counter = iter(range(1000))

    def fingerprint(ck: T.Checkpoint, name: str) -> Fingerprint:
        return T.fingerprint_of(ck, models / f"{next(counter):03d}-{name}")

    with one_thread():
        for number, arch in enumerate(ARCHS):
            trained = []
            for seed in range(4 if number == 0 else 3):  # the base, two roots for distractors, a stranger
                model = build_model(arch, seed=100 * number + seed, size="medium")
                train(model, text["pretrain"], STEPS, 3e-3, seed=100 * number + seed, batch=8, context=64)
                trained.append(model)
            base, roots = trained[0], trained[1:3]
            base_ck = T.from_model(base)
            base_fp = fingerprint(base_ck, f"{arch}-base")
            bases[arch] = _save(base_fp, references / f"{base_fp.model_name}.json")
            root_fps = [fingerprint(T.from_model(m), f"{arch}-root{n}") for n, m in enumerate(roots)]
            _save(root_fps[0], references / f"{root_fps[0].model_name}.json")
            for fp in distractors(root_fps, DISTRACTORS, f"{arch}-distractor", seed=number):
                _save(fp, references / f"{fp.model_name}.json")
            derived = {
                "ft": T.from_model(fine_tune(base, text["light"], 10, 2e-4, seed=7, batch=8, context=64)),
                "lora": T.from_model(lora_merge(base, text["lora"], 10, 2e-3, seed=8, batch=8, context=64)),
                "int8": T.from_model(int8_roundtrip(base)),
                "evasions": T.all_evasions(base_ck),
                "drop-layer": T.drop_layer(base_ck, 1),
                "vocab+64": T.extend_vocab(base_ck, 64, seed=9),
            }
            for kind, ck in derived.items():
                fp = fingerprint(ck, f"{arch}-{kind}")
                saved = _save(fp, root / "candidates" / f"{arch}-{kind}.json")
                candidates[f"{arch}-{kind}"] = (saved, base_fp.model_name)
            if number == 0:
                unrelated = _save(fingerprint(T.from_model(trained[3]), f"{arch}-stranger"), root / "stranger.json")
    return SearchZoo(references, candidates, bases, unrelated)
