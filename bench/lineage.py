"""Lineage bench: TPR per relation type and FPR on independent twins, sketch test vs the paper's method.

For each of the five tiny architectures, two independently trained roots (a base and its twin:
same config, different seed and data order, trained on Python stdlib source tokenised with a
512-token bigram vocabulary, shipped beside the weights as tokenizer.json). Each root gets every
derivative (fine-tunes, long continued pre-training on two new domains, adapter merges, casts,
quantisation, re-sharding, vocabulary growth, layer surgery, weight averaging), every evasion
(verified function-preserving first) and the attacks on the evidence (embedding rows re-drawn:
tgs1's 32 public probe rows, or a random tenth of all rows; the vocabulary relabelled, with the
tokenizer rewritten to match, or shipped without one). Positives: each derivative against its own
root. Negatives: each derivative against the other root of its architecture (twins and their
fine-tunes are not derived from the base), the roots against each other, and roots of different
architectures. None of these models is in the calibration (bench/calibrate.py: other seeds), so
the false-positive column measures the calibrated threshold on models it never saw. The paper's
method on the same pairs: Euclidean distance in the standardised 15-feature space fitted on the ten
roots (derived when <= 7), and the nearest-root rule.

    python bench/lineage.py [--work bench/out/lineage] [--quick] [--cost]

Prints Markdown tables; writes WORK/results.json. Models and fingerprints are cached in WORK.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import transforms as T  # noqa: E402
from bench.zoo import cast, corpus, fine_tune, int8_roundtrip, lora_merge  # noqa: E402
from tg_verify.analysis.lineage import lineage_test  # noqa: E402
from tg_verify.analysis.space import FeatureSpace, euclidean  # noqa: E402
from tg_verify.fingerprint.document import VECTOR_FEATURES, Fingerprint, load  # noqa: E402
from tg_verify.tiny import ARCHITECTURES, build_model, one_thread  # noqa: E402

VOCAB = 512
PAPER_THRESHOLD = 7.0


@dataclass(frozen=True)
class Recipe:
    """Every knob of the bench; its digest keys the model cache."""

    corpus_bytes: int = 600_000
    size: str = "medium"
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    light_steps: int = 20
    light_lr: float = 2e-4
    heavy_steps: int = 150  # as many steps as pretraining, at a third of its rate, on other text
    heavy_lr: float = 1e-3
    adapter_steps: int = 50
    lora_lr: float = 2e-3
    ia3_lr: float = 1e-2
    vocab_extra: int = 64
    cpt_steps: int = 300  # continued pre-training on a new domain: twice pretraining, at a third of its rate
    cpt_lr: float = 1e-3
    redraw_fraction: float = 0.1

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK = Recipe(corpus_bytes=200_000, pretrain_steps=60, light_steps=10, heavy_steps=60, adapter_steps=20,
               cpt_steps=120)
DOMAINS: tuple[str, ...] = ("c", "prose")


def domain_text(name: str, size: int) -> torch.Tensor:
    """Text of a domain the roots never saw, from every CPython install: "c" = the C headers of Python's include
    directory, "prose" = the English documentation in pydoc_data/topics.py."""
    import sysconfig

    paths = sysconfig.get_paths()
    if name == "c":
        data = b"".join(p.read_bytes() for p in sorted(Path(paths["include"]).rglob("*.h")))
    elif name == "prose":
        data = (Path(paths["stdlib"]) / "pydoc_data" / "topics.py").read_bytes()
    else:
        raise ValueError(f"unknown domain {name!r}")
    if len(data) < 4096:
        raise RuntimeError(f"too little offline text for domain {name!r}")
    return torch.frombuffer(bytearray(data[:size]), dtype=torch.uint8).to(torch.long)


# -- text: a 512-token bigram vocabulary, so every token id is used ---------------------------------

def bigram_tokenizer(text: torch.Tensor) -> np.ndarray:
    """A table (65536 -> id or -1): the bytes that occur, then the commonest byte pairs up to VOCAB ids."""
    data = text.numpy().astype(np.int64)
    present = np.flatnonzero(np.bincount(data, minlength=256))
    pairs = np.bincount(data[:-1] * 256 + data[1:], minlength=65536)
    top = [p for p in np.argsort(-pairs, kind="stable") if pairs[p] > 0][:VOCAB - len(present)]
    table = np.full(65536 + 256, -1, dtype=np.int64)
    ids = np.random.default_rng(0).permutation(VOCAB)  # ids unrelated to frequency rank
    for n, byte in enumerate(present):
        table[65536 + byte] = ids[n]
    for n, pair in enumerate(top):
        table[pair] = ids[len(present) + n]
    return table


def vocabulary(table: np.ndarray) -> dict[str, int]:
    """The bigram table as token strings (latin-1: one character per byte) -> id, as a tokenizer file holds them."""
    strings: dict[str, int] = {}
    for entry in np.flatnonzero(table >= 0):
        text = bytes([int(entry) - 65536]) if entry >= 65536 else bytes([int(entry) >> 8, int(entry) & 255])
        strings[text.decode("latin-1")] = int(table[entry])
    return strings


def write_tokenizer(directory: Path, table: np.ndarray, order: np.ndarray | None = None, extra: int = 0) -> Path:
    """Write the vocabulary beside the weights as a Hugging Face tokenizer.json (WordLevel model), as repositories
    ship it; `extra` new tokens after the table's ids (a vocabulary extension); with `order` (old id -> new id)
    the ids are rewritten, as a relabelling evader would."""
    vocab = vocabulary(table)
    first = max(vocab.values()) + 1
    vocab.update({f"<extra_{n}>": first + n for n in range(extra)})
    if order is not None:
        vocab = {text: int(order[i]) for text, i in vocab.items()}
    document = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": None, "post_processor": None, "decoder": None,
                "model": {"type": "WordLevel", "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                          "unk_token": min(vocab, key=vocab.__getitem__)}}
    path = Path(directory) / "tokenizer.json"
    path.write_text(json.dumps(document, ensure_ascii=False))
    return path


def tokenize(text: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """Greedy left-to-right: a known byte pair becomes one token, otherwise the byte (unknown bytes
    become the first byte id)."""
    data = text.numpy().astype(np.int64)
    known = table[data[:-1] * 256 + data[1:]] >= 0
    # inside each run of mergeable positions, greedy merging takes every other one
    start = np.where(known & ~np.concatenate([[False], known[:-1]]), np.arange(len(known)), 0)
    run_start = np.maximum.accumulate(start)
    take = known & ((np.arange(len(known)) - run_start) % 2 == 0)
    take = np.concatenate([take, [False]])
    covered = np.concatenate([[False], take[:-1]])
    out = np.where(take, table[data * 256 + np.roll(data, -1)], table[65536 + data])
    out = out[~covered]
    fallback = table[65536 + int(data[0])]
    return torch.from_numpy(np.where(out < 0, fallback, out))


# -- the models ------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One bench model: id, architecture, its root id, relation to the root, kind, fingerprint."""

    id: str
    arch: str
    root: str
    relation: str  # "root" or the derivation/evasion/attack name
    kind: str  # root | derivative | evasion | attack
    fingerprint: Fingerprint | None = None


def _current(fp_path: Path) -> bool:
    """Whether a cached fingerprint exists and was made by the current feature, sketch and block versions."""
    from tg_verify.fingerprint import sketch as sk
    from tg_verify.fingerprint.blocks import BLOCKS_VERSION
    from tg_verify.fingerprint.document import FEATURE_VERSION

    if not fp_path.exists():
        return False
    cached = load(fp_path)
    return (cached.feature_version == FEATURE_VERSION and cached.sketch is not None
            and cached.sketch.get("version") == sk.SKETCH_VERSION
            and cached.sketch["probe"].get("mixtures") == sk.DEFAULT_TOKENS
            and cached.blocks is not None and cached.blocks.get("version") == BLOCKS_VERSION)


def load_checkpoint(directory: Path) -> T.Checkpoint:
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return T.Checkpoint(config, state)


class Bench:
    """Builds (or reloads) every model, fingerprints it, and runs the pairs."""

    def __init__(self, work: Path, recipe: Recipe, log: Callable[[str], None]) -> None:
        self.work, self.recipe, self.log = work / recipe.digest(), recipe, log
        (self.work / "models").mkdir(parents=True, exist_ok=True)
        (self.work / "fingerprints").mkdir(parents=True, exist_ok=True)
        text = {part: corpus(part, recipe.corpus_bytes) for part in ("pretrain", "light", "heavy", "lora")}
        text.update({name: domain_text(name, recipe.corpus_bytes) for name in DOMAINS})
        self.table = bigram_tokenizer(text["pretrain"])
        self.tokens = {part: tokenize(t, self.table) for part, t in text.items()}
        self.entries: list[Entry] = []

    def _model(self, entry: Entry, make: Callable[[], T.Checkpoint], layout: str = "single",
               tokenizer: Callable[[Path], object] | None = None) -> T.Checkpoint | None:
        """Build (once) and fingerprint (once per version) one model; `tokenizer(directory)` writes what ships
        beside its weights (default: the vocabulary as it is)."""
        directory = self.work / "models" / entry.id
        fp_path = self.work / "fingerprints" / f"{entry.id}.json"
        ck = None
        if not (directory / "config.json").exists():
            started = time.perf_counter()
            ck = make()
            ck.save(directory, layout)
            self.log(f"  built {entry.id} in {time.perf_counter() - started:.1f}s")
            fp_path.unlink(missing_ok=True)
        (tokenizer or (lambda d: write_tokenizer(d, self.table)))(directory)
        if not _current(fp_path):
            from tg_verify.artifact import resolve
            from tg_verify.fingerprint.extract import fingerprint_artifact
            from tg_verify.fingerprint.settings import FingerprintSettings

            fp = fingerprint_artifact(resolve(directory), FingerprintSettings(device="cpu"), model_name=entry.id)
            fp_path.write_bytes(fp.to_json_bytes())
        entry.fingerprint = load(fp_path)
        self.entries.append(entry)
        return ck

    def checkpoint(self, entry_id: str) -> T.Checkpoint:
        return load_checkpoint(self.work / "models" / entry_id)

    def build(self, archs: tuple[str, ...]) -> None:
        r = self.recipe
        for number, arch in enumerate(archs):
            for root_kind, seed in (("base", 10 * number), ("twin", 10 * number + 1000)):
                root_id = f"{arch}-{root_kind}"
                self.log(f"{root_id}:")

                def pretrain(arch: str = arch, seed: int = seed) -> T.Checkpoint:
                    model = build_model(arch, seed=seed, size=r.size)
                    return T.from_model(fine_tune(model, self.tokens["pretrain"], r.pretrain_steps, r.pretrain_lr,
                                                  seed))
                self._model(Entry(root_id, arch, root_id, "root", "root"), pretrain)
                root = self.checkpoint(root_id)
                self._derivatives(arch, root_id, root, seed)
                self._attacks(arch, root_id, root, seed)
                for name, evasion in {**T.EVASIONS, "all-at-once": T.all_evasions}.items():
                    def evade(root: T.Checkpoint = root, evasion: Callable = evasion) -> T.Checkpoint:
                        out = evasion(root)
                        T.same_function(root, out)  # an evasion counts only when it preserves the function
                        return out
                    self._model(Entry(f"{root_id}~{name}", arch, root_id, name, "evasion"), evade)

    def _derivatives(self, arch: str, root_id: str, root: T.Checkpoint, seed: int) -> None:
        r, tok = self.recipe, self.tokens

        def light(ck: T.Checkpoint, s: int, part: str = "light") -> T.Checkpoint:
            return T.from_model(fine_tune(ck.model(), tok[part], r.light_steps, r.light_lr, s))

        recipes: dict[str, tuple[Callable[[], T.Checkpoint], str]] = {
            "ft-light": (lambda: light(root, seed + 1), "single"),
            "ft-heavy": (lambda: T.from_model(fine_tune(root.model(), tok["heavy"], r.heavy_steps, r.heavy_lr,
                                                        seed + 2)), "single"),
            "lora-merge": (lambda: T.from_model(lora_merge(root.model(), tok["lora"], r.adapter_steps, r.lora_lr,
                                                           seed + 3)), "single"),
            "ia3-merge": (lambda: T.from_model(T.ia3_merge(root.model(), tok["lora"], r.adapter_steps, r.ia3_lr,
                                                           seed + 4)), "single"),
            "bf16": (lambda: T.from_model(cast(root.model(), torch.bfloat16)), "single"),
            "fp16": (lambda: T.from_model(cast(root.model(), torch.float16)), "single"),
            "int8": (lambda: T.from_model(int8_roundtrip(root.model())), "single"),
            "resharded": (lambda: root.clone(), "indexed-shards"),
            "vocab-extended": (lambda: light(T.extend_vocab(root, r.vocab_extra, seed + 5), seed + 6), "single"),
            "dropped-layer": (lambda: light(T.drop_layer(root, root.layers // 2), seed + 7), "single"),
            "duplicated-layer": (lambda: light(T.duplicate_layer(root, root.layers // 2), seed + 8), "single"),
            "merge-avg": (lambda: T.average(light(root, seed + 1), light(root, seed + 9, "heavy")), "single"),
            **{f"cpt-{name}": ((lambda name=name: T.from_model(fine_tune(root.model(), tok[name], r.cpt_steps, r.cpt_lr,
                                                                         seed + 10 + len(name)))), "single")
               for name in DOMAINS},
        }
        for name, (make, layout) in recipes.items():
            extra = r.vocab_extra if name == "vocab-extended" else 0
            self._model(Entry(f"{root_id}~{name}", arch, root_id, name, "derivative"), make, layout,
                        tokenizer=lambda d, extra=extra: write_tokenizer(d, self.table, extra=extra))

    def _attacks(self, arch: str, root_id: str, root: T.Checkpoint, seed: int) -> None:
        """Attacks on the evidence, each on a light fine-tune of the root (the model an evader would ship)."""
        from tg_verify.fingerprint.sketch import probe_ids

        vocab = int(root.config.vocab_size)
        shipped = self.checkpoint(f"{root_id}~ft-light")
        count = round(self.recipe.redraw_fraction * vocab)
        tenth = np.random.default_rng(seed + 11).choice(vocab, count, replace=False)
        order = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed + 12))

        def relabelled() -> T.Checkpoint:
            out = T.relabel(shipped, order)
            T.same_function_relabelled(shipped, out, order)  # the same text gives the same probabilities
            return out

        attacks: dict[str, tuple[Callable[[], T.Checkpoint], Callable[[Path], object] | None]] = {
            "old-probe-rows": (lambda: T.redraw_rows(shipped, probe_ids(vocab, 32, 0).tolist(), seed + 13), None),
            "rows-10%": (lambda: T.redraw_rows(shipped, tenth.tolist(), seed + 14), None),
            "relabelled": (relabelled, lambda d: write_tokenizer(d, self.table, order=order.numpy())),
            "relabelled-no-tokenizer": (relabelled, lambda d: (d / "tokenizer.json").unlink(missing_ok=True)),
        }
        for name, (make, tokenizer) in attacks.items():
            self._model(Entry(f"{root_id}~{name}", arch, root_id, name, "attack"), make, tokenizer=tokenizer)

    # -- measurement --------------------------------------------------------------------------------

    def pairs(self) -> list[tuple[Entry, Entry, bool, str]]:
        """(candidate, reference root, truly derived, group)."""
        roots = {e.id: e for e in self.entries if e.kind == "root"}
        result = []
        for entry in self.entries:
            own = roots[entry.root]
            other_id = entry.root.replace("-base", "-twin") if entry.root.endswith("-base") \
                else entry.root.replace("-twin", "-base")
            if entry.kind != "root":
                result.append((entry, own, True, entry.relation))
            if other_id in roots:
                group = "twin root" if entry.kind == "root" else f"other root's {entry.kind}"
                result.append((entry, roots[other_id], False, group))
        for a in roots.values():
            for b in roots.values():
                if a.arch != b.arch:
                    result.append((a, b, False, "other architecture"))
        return result

    def run(self) -> dict[str, Any]:
        roots = [e for e in self.entries if e.kind == "root"]
        space = FeatureSpace.fit([e.fingerprint for e in roots], VECTOR_FEATURES)  # type: ignore[misc]
        root_points = space.transform([e.fingerprint for e in roots])  # type: ignore[misc]
        rows = []
        started = time.perf_counter()
        for candidate, reference, truth, group in self.pairs():
            assert candidate.fingerprint is not None and reference.fingerprint is not None
            result = lineage_test(candidate.fingerprint, reference.fingerprint)
            point = space.transform([candidate.fingerprint])
            distances = euclidean(point, root_points)[0]
            ref_index = roots.index(reference)
            others = [d for i, d in enumerate(distances) if roots[i].id != candidate.id]
            nearest = distances[ref_index] <= min(others) if others else True
            rows.append({"candidate": candidate.id, "reference": reference.id, "truth": truth, "group": group,
                         "kind": candidate.kind, "score": result.score, "p_value": result.p_value,
                         "block_score": result.block_score, "block_threshold": result.block_threshold,
                         "by_sketch": bool(result.score > result.threshold),
                         "by_blocks": bool(result.block_score > result.block_threshold),
                         "threshold": result.threshold, "fpr": result.false_positive_rate,
                         "rate": result.rate, "rate_upper": result.rate_upper, "null_size": result.null_size,
                         "calibration": result.calibration,
                         "derived": result.derived, "comparable": result.comparable,
                         "paper_distance": float(distances[ref_index]),
                         "paper_derived": bool(distances[ref_index] <= PAPER_THRESHOLD),
                         "nearest_derived": bool(nearest), "notes": result.notes})
        elapsed = time.perf_counter() - started
        return {"recipe": asdict(self.recipe), "rows": rows, "seconds_per_test": elapsed / max(len(rows), 1)}


# -- reporting -------------------------------------------------------------------------------------

def _rate(rows: list[dict[str, Any]], key: str) -> str:
    hits = sum(1 for r in rows if r[key])
    return f"{hits}/{len(rows)} ({100 * hits / len(rows):.0f}%)" if rows else "-"


def _scores(rows: list[dict[str, Any]], pick: Callable[..., float], key: str = "score") -> str:
    values = [r[key] for r in rows if r["comparable"] and math.isfinite(r.get(key, math.nan))]
    return f"{pick(values):.3f}" if values else "-"


def _row(name: str, members: list[dict[str, Any]], pick: Callable[..., float]) -> str:
    return (f"| {name} | {len(members)} | {_rate(members, 'derived')} | {_rate(members, 'by_sketch')} | "
            f"{_rate(members, 'by_blocks')} | {sum(1 for m in members if not m['comparable'])} | "
            f"{_scores(members, pick)} | {_scores(members, pick, 'block_score')} | "
            f"{_rate(members, 'paper_derived')} | {_rate(members, 'nearest_derived')} |")


def report(results: dict[str, Any]) -> str:
    rows = results["rows"]
    header = ("| {} | pairs | lineage test (sketch or blocks) | by the sketch | by the blocks | not comparable "
              "| {} sketch score | {} block score | paper: distance <= 7 | paper: nearest root |")
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    lines = ["### True derivatives (TPR: called derived)", "", header.format("relation", "min", "min"), rule]
    by_group: dict[tuple[bool, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_group[(row["truth"], row["group"])].append(row)
    positives = [r for r in rows if r["truth"]]
    for (truth, group), members in sorted(by_group.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        if truth:
            lines.append(_row(group, members, min))
    lines.append(_row("**all derivatives, evasions and attacks**", positives, min))
    negatives = [r for r in rows if not r["truth"]]
    lines += ["", "### Unrelated pairs (FPR: called derived)", "", header.format("pairs", "max", "max"), rule]
    for (truth, group), members in sorted(by_group.items(), key=lambda kv: kv[0][1]):
        if not truth:
            lines.append(_row(group, members, max))
    lines.append(_row("**all unrelated**", negatives, max))
    thresholds: dict[str, tuple[float, float, int]] = {
        r["calibration"]: (r["threshold"], r["block_threshold"], r["null_size"]) for r in rows if r["comparable"]}
    comparable_neg = [r for r in negatives if r["comparable"]]
    comparable_pos = [r for r in positives if r["comparable"]]
    lines += ["", f"Sketch scores: derivatives median {_scores(comparable_pos, statistics.median)}; unrelated median "
                  f"{_scores(comparable_neg, statistics.median)}. Block scores: derivatives median "
                  f"{_scores(comparable_pos, statistics.median, 'block_score')}; unrelated median "
                  f"{_scores(comparable_neg, statistics.median, 'block_score')}. "
                  f"{results['seconds_per_test'] * 1000:.0f} ms per test.", "",
              "Thresholds (target rate 1%: sketch or blocks, each at 0.5%; from "
              "tg_verify/analysis/data/lineage_calibration.json): " + "; ".join(
                  f"{key} {value:.3f} / blocks {block:.3f} (null of {n})"
                  for key, (value, block, n) in sorted(thresholds.items())) + ".", "",
              "Stated rate at each unrelated pair's score (share of the calibration null at or above it): median "
              + (f"{statistics.median(rates):.3f}" if (rates := [r['rate'] for r in comparable_neg if r['null_size']])
                 else "- (no calibrated class)")
              + f"; the test's false-positive rate on these held-out pairs: {_rate(comparable_neg, 'derived')}."]
    return "\n".join(lines)


def sketch_size(layers: int, vocab: int, k: int = 32) -> int:
    """Bytes of a sketch's JSON for a model of `layers` blocks (every unit present, the layer budget applied):
    computed from the format, not measured."""
    from tg_verify.fingerprint import sketch as sk

    unit = {"role": "attn_qk", "layer": 0, "data": "A" * (4 * -(-2 * k * k // 3))}
    kept = min(layers, sk.layer_budget(k))
    document = {"version": sk.SKETCH_VERSION,
                "probe": {"seed": 0, "mixtures": k, "keys": "strings", "keyed_rows": vocab, "rows": vocab,
                          "key_sample": "A" * (4 * -(-8 * sk.KEY_SAMPLE // 3)), "head_rows": sk.HEAD_ROWS},
                "architecture": {"model_type": "llama", "hidden_size": 8192, "layers": layers, "vocab": vocab,
                                 "heads": 64, "kv_heads": 8, "intermediate_size": 28672},
                "dtype": "float16", "layers": list(range(kept)),
                "units": [dict(unit, layer=i) for i in range(kept) for _ in sk.LAYER_ROLES] + [unit, unit],
                "notes": []}
    return len(json.dumps(document))


def blocks_size(layers: int) -> int:
    """Bytes of the block evidence's JSON for a model of `layers` blocks, computed from the format."""
    from tg_verify.fingerprint.blocks import BLOCKS_VERSION, RANK

    matrix = "A" * (4 * -(-2 * RANK * RANK // 3))
    document = {"version": BLOCKS_VERSION, "rank": RANK, "frame": "iterated-8", "dtype": "float16",
                "architecture": {"model_type": "llama", "hidden_size": 8192, "layers": layers, "vocab": 128256,
                                 "heads": 64, "kv_heads": 8, "intermediate_size": 28672},
                "units": [{"layer": i, "attn_ov": matrix, "mlp_ud": matrix} for i in range(layers)]}
    return len(json.dumps(document))


COST_SHAPES: dict[str, dict[str, int]] = {
    # vocabulary-heavy like a 1B model (embedding + head are most of the weights)
    "vocab-heavy": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
                        "num_key_value_heads": 4, "vocab_size": 32000},
    # layer-heavy like a 7B model (blocks are most of the weights)
    "layer-heavy": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
                        "num_key_value_heads": 4, "vocab_size": 8000},
}


def cost(repeats: int = 3) -> str:
    """Sketch overhead: fingerprint time with and without the sketch, interleaved in one run, best of `repeats`."""
    import tempfile

    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings
    from tg_verify.tiny import save_model

    lines = []
    for name, shape in COST_SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            model = build_model("llama", **shape)
            params = sum(p.numel() for p in model.parameters())
            artifact = resolve(save_model(model, Path(tmp) / "m"))
            del model
            times: dict[bool, list[float]] = {False: [], True: []}
            size = 0
            for _ in range(repeats):
                for sketch in (False, True):
                    started = time.perf_counter()
                    fp = fingerprint_artifact(artifact, FingerprintSettings(device="cpu", sketch=sketch))
                    times[sketch].append(time.perf_counter() - started)
                    if sketch:
                        size = len(json.dumps(fp.sketch))
        without, with_sketch = min(times[False]), min(times[True])
        lines.append(f"| {name} | {params / 1e6:.0f}M | {without:.2f}s | {with_sketch:.2f}s | "
                     f"x{with_sketch / without:.3f} (+{100 * (with_sketch / without - 1):.1f}%) | "
                     f"{size / 1e3:.0f} kB |")
    return "\n".join([f"### Sketch cost (fingerprint time, best of {repeats}, same run)", "",
                      "| model | parameters | without sketch | with sketch | ratio | sketch size |",
                      "|---|---|---|---|---|---|", *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "lineage")
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--quick", action="store_true", help="short training, for a smoke run")
    parser.add_argument("--cost", action="store_true", help="also measure the sketch's share of fingerprint time")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    bench = Bench(args.work, QUICK if args.quick else Recipe(), log)
    with one_thread():  # tiny models gain nothing from threads; on a shared machine each one's barriers cost ~10x
        bench.build(tuple(args.archs))
    results = bench.run()
    (bench.work / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(report(results))
    if args.cost:
        print()
        print(cost())
    print()
    print("Lineage evidence size, computed from the format (k = 32, r = 32): " + "; ".join(
        f"{name} ({layers} layers, vocabulary {vocab}) sketch {sketch_size(layers, vocab) / 1e6:.2f} MB + blocks "
        f"{blocks_size(layers) / 1e6:.2f} MB"
        for name, layers, vocab in (("7B", 32, 32000), ("70B", 80, 128256))) + ".")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
