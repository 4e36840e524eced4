"""The paper's RQ2 (Fig. 5): per-layer gradient sensitivity of one model under each noise strategy.

Sensitivity of a weight W under a strategy = the mean over the repeats of ||∂L/∂W||_F with
L = ||x Wᵀ||₂, for the attention and MLP matrices; z-scored within the model per strategy. The
inputs and responses are the fingerprint's own (fingerprint/extract.py, noise.py), so the study
measures exactly what the fingerprint sees. Note (docs/analysis.md): ||∂L/∂W||_F = ||x||, so the
score depends on the perturbation and the input width only, never on the weight values.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from tg_verify.artifact import Artifact, Category, categorize, naming, open_reader, resolve
from tg_verify.errors import UsageError, WeightValueError
from tg_verify.fingerprint import noise
from tg_verify.fingerprint.extract import analysis_kind, gradient_response
from tg_verify.fingerprint.gradient import STAT_NAMES, repeat_statistics
from tg_verify.fingerprint.responses import ResponseEngine, resolve_device
from tg_verify.fingerprint.settings import NOISE_STRATEGIES, FingerprintSettings
from tg_verify.progress import NullProgress, ProgressSink

STUDY_STRATEGIES: tuple[str, ...] = ("random", *NOISE_STRATEGIES)
STUDY_CATEGORIES: frozenset[str] = frozenset({"attention", "ffn"})
_NORM = STAT_NAMES.index("norm")


@dataclass
class PerturbationStudy:
    """Per-layer sensitivity under every strategy: raw means, within-model z-scores, their spread."""

    model_name: str
    repeats: int
    seed: int
    strategies: list[str]
    layers: list[str]
    short_names: list[str]
    categories: list[Category]
    input_widths: list[int]
    raw: dict[str, list[float]]
    zscores: dict[str, list[float]]
    variance: dict[str, float]  # variance of the raw scores across layers
    variance_ratio: dict[str, float]  # variance under "random" / variance under each strategy
    category_means: dict[str, dict[Category, float]]  # strategy -> category -> mean z-score
    drawn: dict[str, str]  # layer -> the strategy "random" drew for it
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the study report."""
        return asdict(self)


def short_name(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `3.mlp.down_proj` (block index and the module path)."""
    stem = name[:-len(".weight")] if name.endswith(".weight") else name
    block = naming.block_of(stem)
    return f"{block[1]}.{block[2]}" if block is not None and block[2] else stem


def _zscores(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def perturbation_study(model: str | os.PathLike[str] | Artifact, settings: FingerprintSettings | None = None,
                       progress: ProgressSink | None = None, max_blocks: int | None = None) -> PerturbationStudy:
    """Sensitivity of each attention/MLP matrix of `model` under the five strategies and "random".

    `max_blocks` keeps the first N decoder blocks (None: all). Raises WeightValueError when the model
    has no attention or MLP matrix to study, UsageError for a PEFT adapter.
    """
    settings = settings or FingerprintSettings()
    artifact = model if isinstance(model, Artifact) else resolve(model)
    if artifact.layout == "adapter":
        raise UsageError(f"{artifact.root}: is a PEFT adapter; the perturbation study needs a full model "
                         "(merge the adapter onto its base first)")
    chosen = [info for info in artifact.tensors
              if analysis_kind(info, artifact.format) == "gradient" and categorize(info.name) in STUDY_CATEGORIES]
    if max_blocks is not None:
        chosen = [info for info in chosen
                  if (layer := naming.layer_of(info.name)) is None or layer < max_blocks]
    if not chosen:
        raise WeightValueError(f"{artifact.root}: no attention or MLP weight matrix to study")
    sink = progress or NullProgress()
    sink.start(f"perturbation study of {artifact.name}", total=len(chosen))
    engine = ResponseEngine(resolve_device(settings.device), max(info.numel for info in chosen))
    scores = {s: np.zeros(len(chosen)) for s in STUDY_STRATEGIES}
    drawn: dict[str, str] = {}
    per_strategy = {s: replace(settings, strategy=s) for s in STUDY_STRATEGIES}
    with open_reader(artifact) as reader:
        for index, info in enumerate(chosen):
            engine.load(reader.raw(info))
            for strategy in STUDY_STRATEGIES:
                actual = noise.strategy_for(per_strategy[strategy], info.name)
                if strategy == "random":
                    drawn[info.name] = actual
                x, responses = gradient_response(engine, reader, info, per_strategy[strategy], actual)
                stats, valid = repeat_statistics(responses, x)
                scores[strategy][index] = float(stats[valid, _NORM].mean()) if valid.any() else 0.0
            reader.release(info)
            sink.advance(1)
    sink.finish()
    categories = [categorize(info.name) for info in chosen]
    zscores = {s: _zscores(v) for s, v in scores.items()}
    variance = {s: float(v.var()) for s, v in scores.items()}
    ratio = {s: (variance["random"] / v if v > 0 else float("inf")) for s, v in variance.items()}
    category_means = {s: {c: float(np.mean([z for z, cat in zip(zscores[s], categories) if cat == c]))
                          for c in sorted(set(categories))} for s in STUDY_STRATEGIES}
    widths = [int(info.shape[-1]) for info in chosen]
    notes = ["||dL/dW||_F = ||x|| for L = ||x W^T||: the scores depend on each strategy's perturbation and the "
             "tensor's input width only, not on the weight values (except through FGSM's direction)"]
    if len(set(widths)) > 1:
        notes.append(f"input widths {sorted(set(widths))}: wider inputs (e.g. down_proj) get larger norms")
    return PerturbationStudy(
        model_name=artifact.name, repeats=settings.repeats, seed=settings.seed, strategies=list(STUDY_STRATEGIES),
        layers=[info.name for info in chosen], short_names=[short_name(info.name) for info in chosen],
        categories=categories, input_widths=widths, raw={s: v.tolist() for s, v in scores.items()},
        zscores={s: v.tolist() for s, v in zscores.items()}, variance=variance,
        variance_ratio={s: r for s, r in ratio.items() if np.isfinite(r)}, category_means=category_means,
        drawn=drawn, notes=notes)
