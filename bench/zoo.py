"""A labelled zoo of tiny models, built on the CPU in seconds: bases trained on text, and their derivatives.

Five architectures x two sizes of base, each briefly trained (byte-level LM, vocab 512) on Python
standard-library source read offline, then seven derivatives per base: light and heavy full
fine-tunes on other text, a LoRA fine-tune merged with peft, fp16 and bf16 casts, an int8
quantise-dequantise round trip, and a re-sharded copy. The functions (train, fine_tune, lora_merge,
cast, int8_roundtrip, reshard) are reusable: the lineage benchmarks build twins and evasions with them.

    python bench/zoo.py [--out bench/out/zoo] [--force]

writes OUT/models/<id>/ (safetensors + config.json), OUT/labels.yml, OUT/fingerprints/<id>.json
and OUT/manifest.json (recipe and corpus digests, so a changed recipe rebuilds).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tg_verify.tiny import ARCHITECTURES, build_model, one_thread, save_model  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "out" / "zoo"
SIZES: tuple[str, ...] = ("small", "medium")
VOCAB = 512  # bytes use 0..255; the rest are never seen, as in a vocabulary with unused tokens
CORPUS_PARTS: tuple[str, ...] = ("pretrain", "light", "heavy", "lora")
DERIVATIVES: tuple[str, ...] = ("ft-light", "ft-heavy", "lora", "fp16", "bf16", "int8", "resharded")


@dataclass(frozen=True)
class Recipe:
    """Every knob of the zoo; its digest decides whether a cached zoo is still valid."""

    corpus_bytes: int = 400_000
    batch: int = 8
    context: int = 64
    pretrain_steps: int = 40
    pretrain_lr: float = 3e-3
    light_steps: int = 10
    light_lr: float = 2e-4
    heavy_steps: int = 50
    heavy_lr: float = 1e-3
    lora_steps: int = 20
    lora_lr: float = 2e-3
    lora_rank: int = 8

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# -- text -------------------------------------------------------------------------------------------

def corpus(part: str, size: int) -> torch.Tensor:
    """Up to `size` bytes of Python stdlib source for one disjoint part ('pretrain', 'light', 'heavy', 'lora').

    Files are assigned to parts by a hash of their relative path, so the parts never share a file.
    """
    if part not in CORPUS_PARTS:
        raise ValueError(f"unknown corpus part {part!r}; expected one of {', '.join(CORPUS_PARTS)}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).as_posix()
        if "site-packages" in relative or "test" in relative.split("/")[0]:
            continue
        bucket = hashlib.sha256(relative.encode()).digest()[0] % len(CORPUS_PARTS)
        if CORPUS_PARTS[bucket] != part:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= size:
            break
    data = b"".join(chunks)[:size]
    if len(data) < 4096:
        raise RuntimeError(f"too little offline text for corpus part {part!r} under {stdlib}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


def batches(tokens: torch.Tensor, batch: int, context: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of [batch, context] windows at seeded random offsets."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - context - 1, (batch,), generator=generator)
        yield torch.stack([tokens[s:s + context] for s in starts.tolist()])


# -- training ---------------------------------------------------------------------------------------

def train(model: torch.nn.Module, tokens: torch.Tensor, steps: int, lr: float, seed: int, batch: int = 16,
          context: int = 64, parameters: list[torch.nn.Parameter] | None = None,
          penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None) -> float:
    """Causal-LM training in place with AdamW; returns the last LM loss. Deterministic for a seed.

    `penalty(model)`, when given, is added to every step's loss (bench/evasion.py's adaptive attacker).
    """
    torch.manual_seed(seed)
    model.train()
    trainable = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    stream = batches(tokens, batch, context, seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        inputs = next(stream)
        loss = model(input_ids=inputs, labels=inputs).loss
        optimiser.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty(model)).backward()
        optimiser.step()
    model.eval()
    return float(loss.detach())


def fine_tune(model: torch.nn.Module, tokens: torch.Tensor, steps: int, lr: float, seed: int, **kwargs: int
              ) -> torch.nn.Module:
    """A full fine-tune of a copy of `model` (every weight trainable)."""
    tuned = copy.deepcopy(model)
    train(tuned, tokens, steps, lr, seed, **kwargs)
    return tuned


def lora_merge(model: torch.nn.Module, tokens: torch.Tensor, steps: int, lr: float, seed: int, rank: int = 8,
               **kwargs: int) -> torch.nn.Module:
    """LoRA on every linear layer of a copy of `model`, trained, then merged with peft's merge_and_unload."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        init_lora_weights=True)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    # LoRA's B starts at zero; train so the merge changes the weights.
    train(peft_model, tokens, steps, lr, seed, **kwargs)
    return peft_model.merge_and_unload()


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` with every floating-point weight cast to `dtype` (saved in that dtype)."""
    return copy.deepcopy(model).to(dtype)


@torch.no_grad()
def int8_roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose matrices went through symmetric per-row int8 quantisation and back (fp32 again)."""
    result = copy.deepcopy(model)
    for parameter in result.parameters():
        if parameter.ndim < 2:
            continue
        scale = parameter.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        parameter.copy_(torch.round(parameter / scale).clamp(-127, 127) * scale)
    return result


def reshard(model: torch.nn.Module, directory: str | Path, shards: int = 3) -> Path:
    """Save `model` as `shards` files with an index: the same weights in another layout."""
    return save_model(model, directory, "indexed-shards", shards=shards)


# -- the zoo ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: its id, family (the architecture), parent base (None for a base), directory."""

    id: str
    family: str
    parent: str | None
    path: Path
    kind: str


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:4], "little")


def _derive(kind: str, base: torch.nn.Module, base_id: str, texts: dict[str, torch.Tensor], recipe: Recipe
            ) -> torch.nn.Module:
    seed = _seed(base_id, kind)
    shape = {"batch": recipe.batch, "context": recipe.context}
    if kind == "ft-light":
        return fine_tune(base, texts["light"], recipe.light_steps, recipe.light_lr, seed, **shape)
    if kind == "ft-heavy":
        return fine_tune(base, texts["heavy"], recipe.heavy_steps, recipe.heavy_lr, seed, **shape)
    if kind == "lora":
        return lora_merge(base, texts["lora"], recipe.lora_steps, recipe.lora_lr, seed, rank=recipe.lora_rank, **shape)
    if kind == "fp16":
        return cast(base, torch.float16)
    if kind == "bf16":
        return cast(base, torch.bfloat16)
    if kind == "int8":
        return int8_roundtrip(base)
    if kind == "resharded":
        return base
    raise ValueError(f"unknown derivative kind {kind!r}")


def build_zoo(out: Path = DEFAULT_OUT, recipe: Recipe = Recipe(), force: bool = False,
              architectures: tuple[str, ...] = ARCHITECTURES, sizes: tuple[str, ...] = SIZES,
              log: Callable[[str], None] = lambda message: None) -> list[ZooModel]:
    """Build (or reuse, when the recipe is unchanged) the zoo's models under `out`/models; write labels.yml."""
    # One thread: these models are far too small for intra-op parallelism to pay, and on a shared
    # machine extra threads only contend (measured 10-20x slower per step with 2 threads under load).
    with one_thread():
        return _build(out, recipe, force, architectures, sizes, log)


def _build(out: Path, recipe: Recipe, force: bool, architectures: tuple[str, ...], sizes: tuple[str, ...],
           log: Callable[[str], None]) -> list[ZooModel]:
    manifest_path = out / "manifest.json"
    wanted = {"recipe": asdict(recipe), "digest": recipe.digest(), "architectures": list(architectures),
              "sizes": list(sizes), "torch": torch.__version__}
    texts = {part: corpus(part, recipe.corpus_bytes) for part in CORPUS_PARTS}
    wanted["corpus_sha256"] = {p: hashlib.sha256(t.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]
                               for p, t in texts.items()}
    if manifest_path.exists() and not force:
        previous = json.loads(manifest_path.read_text())
        if {k: previous.get(k) for k in wanted} != wanted:
            force = True
    if force and out.exists():
        shutil.rmtree(out / "models", ignore_errors=True)
        shutil.rmtree(out / "fingerprints", ignore_errors=True)
    models: list[ZooModel] = []
    for arch in architectures:
        for size in sizes:
            base_id = f"{arch}-{size}"
            base_dir = out / "models" / base_id
            base_model: torch.nn.Module | None = None
            if not (base_dir / "model.safetensors").exists():
                started = time.perf_counter()
                base_model = build_model(arch, seed=_seed(base_id), size=size, vocab_size=VOCAB)
                loss = train(base_model, texts["pretrain"], recipe.pretrain_steps, recipe.pretrain_lr,
                             _seed(base_id, "pretrain"), recipe.batch, recipe.context)
                save_model(base_model, base_dir)
                log(f"{base_id}: trained {recipe.pretrain_steps} steps, loss {loss:.2f} "
                    f"({time.perf_counter() - started:.1f}s)")
            models.append(ZooModel(base_id, arch, None, base_dir, "base"))
            for kind in DERIVATIVES:
                model_id = f"{base_id}-{kind}"
                directory = out / "models" / model_id
                if not (directory / "config.json").exists():
                    if base_model is None:
                        base_model = _load(base_dir)
                    started = time.perf_counter()
                    derived = _derive(kind, base_model, base_id, texts, recipe)
                    if kind == "resharded":
                        reshard(derived, directory)
                    else:
                        save_model(derived, directory)
                    log(f"{model_id}: built ({time.perf_counter() - started:.1f}s)")
                models.append(ZooModel(model_id, arch, base_id, directory, kind))
    write_labels(models, out / "labels.yml")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    return models


def _load(directory: Path) -> torch.nn.Module:
    """Load a zoo model back (our own safetensors, no pickle, no remote code)."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise RuntimeError(f"{directory}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    if tied:
        model.tie_weights()
    model.eval()
    return model


def write_labels(models: list[ZooModel], path: Path) -> Path:
    """labels.yml in the format `tg-verify study clustering --labels` reads: id -> {family, parent}."""
    lines = ["# tg-verify zoo labels: family = architecture; derivatives name their parent base."]
    for model in models:
        if model.parent is None:
            lines.append(f"{model.id}: {{family: {model.family}, base: true}}")
        else:
            lines.append(f"{model.id}: {{family: {model.family}, parent: {model.parent}}}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def fingerprint_zoo(models: list[ZooModel], out: Path = DEFAULT_OUT, settings: object | None = None,
                    force: bool = False, log: Callable[[str], None] = lambda message: None) -> list[Path]:
    """Fingerprint every zoo model into OUT/fingerprints/<id>.json (model_name = id); reuse up-to-date files.

    A cached document is reused when its feature version, settings and recorded file digests still match.
    """
    from tg_verify.artifact import file_digests, resolve
    from tg_verify.atomic import write_bytes
    from tg_verify.fingerprint.document import FEATURE_VERSION, load
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    chosen = settings if isinstance(settings, FingerprintSettings) else FingerprintSettings(device="cpu")
    paths = []
    for model in models:
        path = out / "fingerprints" / f"{model.id}.json"
        artifact = resolve(model.path)
        if path.exists() and not force:
            cached = load(path)
            if (cached.feature_version == FEATURE_VERSION
                    and cached.settings == chosen.to_dict() | {"device": cached.settings.get("device")}
                    and cached.file_digests == file_digests(artifact)):
                paths.append(path)
                continue
        started = time.perf_counter()
        fingerprint = fingerprint_artifact(artifact, chosen, model_name=model.id)
        write_bytes(path, fingerprint.to_json_bytes())
        log(f"{model.id}: fingerprinted ({time.perf_counter() - started:.2f}s)")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="zoo directory (default bench/out/zoo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached zoo matches the recipe")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    log = lambda message: print(message, flush=True)  # noqa: E731
    models = build_zoo(args.out, force=args.force, log=log)
    built = time.perf_counter()
    fingerprint_zoo(models, args.out, force=args.force, log=log)
    print(f"zoo: {len(models)} models ({sum(m.parent is None for m in models)} bases) in {args.out}: "
          f"built in {built - started:.1f}s, fingerprinted in {time.perf_counter() - built:.1f}s; "
          f"labels {args.out / 'labels.yml'}, fingerprints {args.out / 'fingerprints'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
