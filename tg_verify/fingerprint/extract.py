"""Fingerprint an artifact: one streamed pass over its tensors, hashing its files alongside.

Per tensor: the paper's gradient statistics in closed form (gradient.py) from the responses to
seeded inputs (noise.py, responses.py), structural metadata, and the lineage sketch; then the 16
features are aggregated as docs/method.md defines. Only one row block of a tensor is in float32 at
a time: the sketch's products come out of the same block-wise pass as the responses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from tg_verify.artifact import Artifact, TensorInfo, categorize, file_digests, naming, root_digest
from tg_verify.artifact.formats import Reader, open_reader
from tg_verify.artifact.model import FLOAT_DTYPES
from tg_verify.errors import UsageError, WeightValueError
from tg_verify.fingerprint import noise
from tg_verify.fingerprint.blocks import build_blocks
from tg_verify.fingerprint.document import FEATURE_NAMES, Fingerprint
from tg_verify.fingerprint.gradient import TensorStats, tensor_statistics
from tg_verify.fingerprint.responses import ResponseEngine, resolve_device
from tg_verify.fingerprint.settings import FingerprintSettings
from tg_verify.fingerprint.sketch import SketchBuilder
from tg_verify.fingerprint.workers import WorkerPool, check_threads, default_threads, hash_threads, helper_threads
from tg_verify.progress import NullProgress, ProgressSink
from tg_verify.versions import tool_record

CATEGORY_FEATURES: tuple[str, ...] = ("attention", "ffn", "embedding")
CATEGORY_SAMPLE = 3  # "up to three layers from each category" (§III-C)


class TensorSource(Protocol):
    """What the extractor reads weights through: a TensorReader, or e.g. a merged-adapter reader."""

    def raw(self, info: TensorInfo) -> torch.Tensor: ...

    def float32(self, info: TensorInfo) -> torch.Tensor: ...


# GGUF's integer types (ggml I8..I64) are the safetensors names of FLOAT_DTYPES' complement; every other ggml type
# (Q4_0, Q4_K, IQ2_XS ... and types newer than this code) stores real numbers in blocks, so it is analysed, and
# refused by the reader where the installed gguf cannot dequantise it: never silently skipped.
GGUF_INTEGER_TYPES: frozenset[str] = frozenset({"I8", "I16", "I32", "I64"})


def real_valued(dtype: str, fmt: str = "safetensors") -> bool:
    """Whether a stored dtype holds real numbers (floats, or GGUF's quantised float blocks)."""
    return dtype in FLOAT_DTYPES or (fmt == "gguf" and dtype not in GGUF_INTEGER_TYPES)


def analysis_kind(info: TensorInfo, fmt: str = "safetensors") -> str:
    """How a tensor enters the fingerprint: "gradient" (rank >= 2 real-valued) or why it does not."""
    if info.numel == 0:
        return "empty"
    if len(info.shape) < 2:
        return "one-dimensional"
    if not real_valued(info.dtype, fmt):
        return "not-float"
    return "gradient"


def tensor_inputs(settings: FingerprintSettings, name: str, strategy: str, width: int) -> np.ndarray:
    """The float32 inputs of a weight-independent strategy, [repeats, width] (values exactly as used)."""
    inputs: np.ndarray = noise.base_inputs(settings, name, width) + noise.additive_noise(settings, name, strategy,
                                                                                         width)
    return inputs


def _nonfinite_error(source: TensorSource, info: TensorInfo, engine: ResponseEngine) -> WeightValueError:
    where = f"{info.file}: tensor '{info.name}'"
    if not engine.finite():
        return WeightValueError(f"{where} holds NaN or infinite values; a fingerprint of it would be meaningless")
    return WeightValueError(f"{where}: its response to unit-scale inputs overflows float32 (weights of "
                            f"magnitude near 1e38); a fingerprint of it would be meaningless")


def gradient_response(engine: ResponseEngine, source: TensorSource, info: TensorInfo,
                      settings: FingerprintSettings, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x [repeats, in] and responses o = x Wᵀ [repeats, out] for the loaded tensor (float64)."""
    x, responses, _, _ = gradient_response_and_products(engine, source, info, settings, strategy)
    return x, responses


def gradient_response_and_products(engine: ResponseEngine, source: TensorSource, info: TensorInfo,
                                   settings: FingerprintSettings, strategy: str, right: torch.Tensor | None = None,
                                   left: torch.Tensor | None = None, right_rows: torch.Tensor | None = None,
                                   left_groups: int = 1
                                   ) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """`gradient_response`, plus the sketch's products W rightᵀ and left W computed in the same pass (left W per
    expert of a 3-D tensor with `left_groups` experts)."""
    width = info.shape[-1]
    if strategy == "adversarial":
        x0 = noise.base_inputs(settings, info.name, width)
        clean = engine.respond(x0)
        if not np.isfinite(clean).all():
            raise _nonfinite_error(source, info, engine)
        targets = noise.pseudo_targets(settings, info.name, clean.shape[1])
        direction = engine.input_gradient(noise.softmax_minus_onehot(clean, targets))
        x = noise.fgsm(x0.astype(np.float64), direction, settings.epsilon).astype(np.float32)
    else:
        x = tensor_inputs(settings, info.name, strategy, width)
    responses, right_product, left_product = engine.respond_and_project(x, right, left, right_rows, left_groups)
    if not np.isfinite(responses).all():
        raise _nonfinite_error(source, info, engine)
    return x.astype(np.float64), responses, right_product, left_product


def evenly_spaced(count: int, wanted: int = CATEGORY_SAMPLE) -> list[int]:
    """Indices floor(linspace(0, count-1, wanted)), de-duplicated: the release's uniform layer sample."""
    if count <= 0:
        return []
    return sorted({int(v) for v in np.linspace(0, count - 1, wanted)})


def count_layers(names: list[str]) -> tuple[int, str | None]:
    """Model depth: distinct block indices under the name prefix that has the most (the decoder stack)."""
    stacks: dict[str, set[int]] = {}
    for name in names:
        block = naming.block_of(name)
        if block is not None:
            stacks.setdefault(block[0], set()).add(block[1])
    if not stacks:
        return 0, None
    prefix = max(sorted(stacks), key=lambda p: len(stacks[p]))
    return len(stacks[prefix]), prefix


def aggregate(analysed: list[tuple[str, TensorStats]], all_names: list[str], total_params: int
              ) -> tuple[dict[str, float], dict[str, Any]]:
    """The 16 features from per-tensor statistics, and the record of which tensors fed which feature."""
    if not analysed:
        raise WeightValueError("no tensor could be analysed")
    features: dict[str, float] = {}
    for stat in ("mean", "std", "norm", "skewness", "kurtosis"):
        features[f"global_{stat}"] = float(np.mean([getattr(s, stat) for _, s in analysed]))
    chosen: dict[str, list[str]] = {}
    empty: list[str] = []
    for category in CATEGORY_FEATURES:
        members = [(name, s) for name, s in analysed if categorize(name) == category]
        picks = [members[i] for i in evenly_spaced(len(members))]
        chosen[category] = [name for name, _ in picks]
        if not picks:
            empty.append(category)
        for stat in ("mean", "std", "norm"):
            features[f"{category}_{stat}"] = float(np.mean([getattr(s, stat) for _, s in picks])) if picks else 0.0
    layers, stack = count_layers(all_names)
    features["total_params"] = float(total_params)
    features["num_layers"] = float(layers)
    summary = {"analysed_tensors": len(analysed), "category_tensors": chosen, "empty_categories": empty,
               "layer_stack": stack}
    return {n: features[n] for n in FEATURE_NAMES}, summary


class _Progress:
    """Thread-safe adapter over a ProgressSink: one bar over bytes fingerprinted and bytes hashed."""

    def __init__(self, sink: ProgressSink, tensors: int) -> None:
        self.sink = sink
        self.tensors = tensors
        self.done = 0
        self._lock = threading.Lock()
        self._describe: Callable[[str], None] | None = getattr(sink, "describe", None)
        self._last = 0.0

    def advance(self, amount: int) -> None:
        with self._lock:
            self.sink.advance(amount)

    def tensor_done(self, label: str, amount: int) -> None:
        with self._lock:
            self.done += 1
            self.sink.advance(amount)
            now = time.monotonic()
            if self._describe is not None and (now - self._last > 0.1 or self.done == self.tensors):
                self._last = now
                self._describe(f"{label}: {self.done}/{self.tensors} tensors")


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _Cancelled(Exception):
    """Stops the background hashing when fingerprinting fails."""


def _hashing(artifact: Artifact, progress: _Progress, stop: threading.Event,
             threads: int) -> Callable[[], dict[str, str]]:
    def advance(count: int) -> None:
        if stop.is_set():
            raise _Cancelled()
        progress.advance(count)

    return lambda: file_digests(artifact, advance, threads=threads)


def fingerprint_artifact(artifact: Artifact, settings: FingerprintSettings | None = None, *,
                         reader: TensorSource | None = None, progress: ProgressSink | None = None,
                         model_name: str | None = None, digests: dict[str, str] | None = None,
                         threads: int | None = None) -> Fingerprint:
    """Fingerprint `artifact` (TensorGuard features, metadata, file digests, sketch) in one streamed pass.

    `reader` defaults to a TensorReader over the artifact; any object with `.raw(info)` and
    `.float32(info)` for the artifact's tensors works. `digests` (path -> sha256) skips hashing when
    the caller already has them; otherwise a helper thread hashes the files meanwhile and then joins
    the products. `threads` is how many threads compute (default: `default_threads()`); torch's own
    intra-op threads are set to one for the duration. Results do not depend on either.
    """
    workers = check_threads(threads) if threads is not None else default_threads()
    with _torch_threads(1):
        return _fingerprint(artifact, settings, reader, progress, model_name, digests, workers)


@dataclass(frozen=True)
class _TensorResult:
    """What one weight matrix contributes: its strategy, statistics and sketch products."""

    strategy: str
    stats: TensorStats | None
    right: torch.Tensor | None
    left: torch.Tensor | None


def _tensor_result(engine: ResponseEngine, source: TensorSource, info: TensorInfo, settings: FingerprintSettings,
                   builder: SketchBuilder | None, release: Callable[[TensorInfo], None] | None) -> _TensorResult:
    """Statistics and sketch products of one weight matrix; its stored bytes are released afterwards."""
    strategy = noise.strategy_for(settings, info.name)
    engine.load(source.raw(info))
    try:
        right, left, rows = ((builder.right_probe(info), builder.left_probe(info), builder.right_rows(info))
                             if builder is not None else (None, None, None))
        x, responses, right_product, left_product = gradient_response_and_products(
            engine, source, info, settings, strategy, right, left, rows,
            builder.left_groups(info) if builder is not None else 1)
        return _TensorResult(strategy, tensor_statistics(responses, x), right_product, left_product)
    finally:
        engine.unload()
        if release is not None:
            release(info)


@dataclass(frozen=True)
class _Pass:
    """What every step of one fingerprinting pass reads: the artifact, how each tensor enters, the weights' source."""

    artifact: Artifact
    kinds: list[str]  # analysis_kind of each of artifact.tensors, in order
    source: TensorSource
    settings: FingerprintSettings
    tracker: _Progress
    label: str
    release: Callable[[TensorInfo], None] | None  # the source's, where it can drop a tensor's stored bytes
    components: tuple[str, ...] = ()  # a multimodal wrapper's tower tensors, left out (artifact is its language model)


def _fingerprint(artifact: Artifact, settings: FingerprintSettings | None, reader: TensorSource | None,
                 progress: ProgressSink | None, model_name: str | None, digests: dict[str, str] | None,
                 workers: int) -> Fingerprint:
    """The pass behind fingerprint_artifact: records and checks, the weight matrices on the workers, the features,
    the sketch and the digests; the reader it opened and the pool's threads are closed whatever happens."""
    settings = settings or FingerprintSettings()
    _check_digests(artifact, digests)
    # a multimodal wrapper is fingerprinted as its language model: no grammar says which of its towers' tensors a
    # runtime loads, so none of them may move a feature (their files stay bound by digest)
    components, artifact = artifact.components, artifact.language_model()
    device = resolve_device(settings.device)
    label = model_name or artifact.name
    hashing = digests is None
    tracker = _start_progress(progress or NullProgress(), artifact, label, hashing)
    owned: Reader | None = None
    if reader is None:
        reader = owned = open_reader(artifact)
    run = _Pass(artifact, [analysis_kind(info, artifact.format) for info in artifact.tensors], reader, settings,
                tracker, label, getattr(reader, "release", None), components)
    stop = threading.Event()
    # On CUDA one thread drives the device (whole-tensor products); a helper is then only there to hash.
    compute = workers if device.type == "cpu" else 1
    pool = WorkerPool(helper_threads(compute, hashing),
                      _hashing(artifact, tracker, stop, hash_threads(compute)) if hashing else None,
                      prelude_joins=compute > 1)
    try:
        builder = SketchBuilder(artifact, run.source, settings) if settings.sketch else None
        records = _screen(run)
        analysed = _analyse_matrices(run, records, builder, pool, device)
        _require_analysed(run, analysed)
        features, summary = _summary(run, records, analysed)
        sketch = builder.finish() if builder is not None else None
        # after the stream, one layer per computing thread, torch's own threads at one like every product here (they
        # thrash on thin products when the machine is shared: 10x slower measured)
        blocks = (build_blocks(artifact, run.source, note=sketch["notes"].append, threads=compute)
                  if sketch is not None else None)
        if hashing:
            digests = pool.prelude_result()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.close()
        if owned is not None:
            owned.close()
    assert digests is not None
    files = [{"path": f.path, "role": f.role, "sha256": digests[f.path], "size": f.size} for f in artifact.files]
    return Fingerprint(
        model_name=label, features=features, settings={**settings.to_dict(), "device": device.type},
        tool={**tool_record(), "torch": torch.__version__.split("+")[0]},
        artifact=_artifact_record(artifact, files, digests), tensors=records, sketch=sketch, blocks=blocks,
        extraction=summary)


def _check_digests(artifact: Artifact, digests: dict[str, str] | None) -> None:
    """Digests given by the caller must cover every file of the artifact (none given: they are computed)."""
    if digests is not None and any(f.path not in digests for f in artifact.files):
        missing = sorted(f.path for f in artifact.files if f.path not in digests)
        raise UsageError(f"{artifact.root}: digests given for fingerprinting lack {', '.join(missing)}")


def _start_progress(sink: ProgressSink, artifact: Artifact, label: str, hashing: bool) -> _Progress:
    """One bar over the bytes to fingerprint, plus the bytes to hash when the digests are computed here."""
    tensor_bytes = sum(info.nbytes for info in artifact.tensors)
    hash_bytes = sum(f.size for f in artifact.files) if hashing else 0
    sink.start(f"fingerprint {label}", total=tensor_bytes + hash_bytes)
    return _Progress(sink, len(artifact.tensors))


def _screen(run: _Pass) -> list[dict[str, Any]]:
    """A record for every tensor, in stored order; the tensors that are no weight matrix are done here: a real-valued
    1-D one must be finite (a NaN gain poisons the model as surely as a NaN matrix), then each is released."""
    records: list[dict[str, Any]] = []
    quantisation = run.artifact.quantisation
    scaled = quantisation.scaled if quantisation is not None else {}
    for info, kind in zip(run.artifact.tensors, run.kinds):
        records.append({"name": info.name, "shape": list(info.shape), "size": info.numel,
                        "category": categorize(info.name), "dtype": info.dtype, "analysis": kind})
        if info.name in scaled:  # read as the runtime computes it: the stored values times this scale
            records[-1]["scale"] = scaled[info.name].scale.name
        if kind == "gradient":
            continue
        if (kind == "one-dimensional" and real_valued(info.dtype, run.artifact.format)
                and not bool(torch.isfinite(run.source.float32(info)).all())):
            raise WeightValueError(f"{info.file}: tensor '{info.name}' holds NaN or infinite values; "
                                   f"a fingerprint of it would be meaningless",
                                   file=str(run.artifact.path_of(info.file)))
        if run.release is not None:
            run.release(info)
        run.tracker.tensor_done(run.label, info.nbytes)
    return records


def _analyse_matrices(run: _Pass, records: list[dict[str, Any]], builder: SketchBuilder | None, pool: WorkerPool,
                      device: torch.device) -> list[tuple[str, TensorStats]]:
    """The weight matrices on the pool's workers (one response engine each), folded in stored order: statistics
    into their records and the returned list, sketch products into the builder. Results do not depend on the
    number of workers."""
    matrices = [n for n, kind in enumerate(run.kinds) if kind == "gradient"]
    capacity = max((run.artifact.tensors[n].numel for n in matrices), default=0)
    engines: list[ResponseEngine | None] = [None] * pool.workers
    analysed: list[tuple[str, TensorStats]] = []

    def work(item: int, worker: int) -> _TensorResult:
        engine = engines[worker]
        if engine is None:
            engine = engines[worker] = ResponseEngine(device, capacity)
        return _tensor_result(engine, run.source, run.artifact.tensors[matrices[item]], run.settings, builder,
                              run.release)

    def fold(item: int, result: _TensorResult) -> None:
        info = run.artifact.tensors[matrices[item]]
        _record_result(records[matrices[item]], result)
        if result.stats is not None:
            analysed.append((info.name, result.stats))
        if builder is not None:
            builder.add_products(info, right=result.right, left=result.left)
        run.tracker.tensor_done(run.label, info.nbytes)

    pool.run(len(matrices), work, fold)
    return analysed


def _record_result(record: dict[str, Any], result: _TensorResult) -> None:
    """A weight matrix's record gets its strategy and statistics, or is marked degenerate (no usable repeat)."""
    record["strategy"] = result.strategy
    if result.stats is None:
        record["analysis"] = "degenerate"
        return
    record["stats"] = result.stats.to_dict()
    if result.stats.degenerate_repeats:
        record["degenerate_repeats"] = result.stats.degenerate_repeats


def _require_analysed(run: _Pass, analysed: list[tuple[str, TensorStats]]) -> None:
    """No fingerprint without a weight matrix, or when every matrix gave a zero response."""
    if not any(kind == "gradient" for kind in run.kinds):
        raise WeightValueError(f"{run.artifact.root}: no tensor of rank 2 or more with a floating-point dtype; "
                               f"nothing to fingerprint")
    if not analysed:
        raise WeightValueError(f"{run.artifact.root}: every weight matrix gives a zero response (all-zero weights?); "
                               f"nothing to fingerprint")


def _summary(run: _Pass, records: list[dict[str, Any]], analysed: list[tuple[str, TensorStats]]
             ) -> tuple[dict[str, float], dict[str, Any]]:
    """The 16 features and the document's `extraction` record: what fed each feature, what was skipped and why,
    the tensors stored but not loaded by the runtime, a wrapper's tower tensors and an FP8 checkpoint's scales
    (listed, never fingerprinted as weights), the strategies drawn."""
    artifact = run.artifact
    features, summary = aggregate(analysed, [info.name for info in artifact.tensors], artifact.total_params)
    summary["degenerate_tensors"] = [r["name"] for r in records if r["analysis"] == "degenerate"]
    summary["skipped_tensors"] = {k: run.kinds.count(k) for k in ("one-dimensional", "not-float", "empty")}
    if artifact.unexpected:
        summary["unexpected_tensors"] = [info.name for info in artifact.unexpected]
    if run.components:
        summary["component_tensors"] = list(run.components)
    if artifact.quantisation is not None:  # an FP8 checkpoint's scales: applied to their weights, bound by digest
        summary["quantization_method"] = artifact.quantisation.method
        summary["scale_tensors"] = [info.name for info in artifact.quantisation.companions]
    summary["strategies"] = {s: sum(1 for r in records if r.get("strategy") == s and r["analysis"] == "gradient")
                             for s in sorted({r["strategy"] for r in records if "strategy" in r})}
    return features, summary


def _artifact_record(artifact: Artifact, files: list[dict[str, Any]], digests: dict[str, str]) -> dict[str, Any]:
    """The fingerprint's `artifact`: layout, file digests; for a GGUF file also its format and the quantisation
    types of the tensors fingerprinted (tensors per ggml type)."""
    record: dict[str, Any] = {"layout": artifact.layout, "files": files, "root_digest": root_digest(digests)}
    if artifact.format != "safetensors":
        record["format"] = artifact.format
    if artifact.format == "gguf":
        types: dict[str, int] = {}
        for info in artifact.tensors:
            types[info.dtype] = types.get(info.dtype, 0) + 1
        record["quantisation"] = dict(sorted(types.items()))
    return record
