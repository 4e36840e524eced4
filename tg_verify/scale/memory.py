"""How much memory fingerprinting one model needs, estimated from its safetensors headers alone.

The extractor streams the weights: each compute thread holds one tensor at a time (its stored bytes
mapped, released after use), a cache-sized float32 block, the responses of the paper's repeats for
every output row and the sketch's probe products, so the working set grows with the *largest*
tensor and the thread count, not with the model. A 7B model needs under 2 GB with two threads,
not the 13.5 GB of its files; a scheduler that reserves file sizes would run a fraction of the jobs a
node can hold. An adapter is merged tensor by tensor, so add a float32 copy of its largest target
and the base's mapped tensor per thread. It is a bound, not a prediction: every term is counted as
if alive at once (the measured peak is 0.46-0.63x of it, `bench/scale.py` prints both).
"""

from __future__ import annotations

from tg_verify.artifact.model import Artifact, TensorInfo

# The Python interpreter with torch, numpy and tg-verify imported (220 MB peak RSS measured on Linux
# x86-64, torch 2.13 CPU), a Ray worker's own runtime, and allocator slack: the floor of any job.
RUNTIME_BYTES = 384 * 2**20
BLOCK_BYTES = 4 * 2**20  # responses.BLOCK_ELEMENTS float32: the one conversion buffer per thread
RESPONSE_COLUMNS = 32 + 64  # repeats padded to 16 (30 -> 32) plus the sketch's probe columns (k <= 64)
STATISTICS_COPIES = 4  # float64 [repeats, rows] arrays alive at once while the statistics are taken
FOLD_WINDOW = 4  # results per thread waiting to be folded (workers.FOLD_WINDOW)
SAFETY = 1.25


def _rows_cols(info: TensorInfo) -> tuple[int, int]:
    cols = info.shape[-1] if info.shape else 1
    return (info.numel // cols if cols else 0), cols


def _per_thread(info: TensorInfo, repeats: int, merged: bool) -> int:
    rows, cols = _rows_cols(info)
    need = info.nbytes  # the stored bytes, mapped while the tensor is processed
    need += min(BLOCK_BYTES, rows * cols * 4)
    need += rows * RESPONSE_COLUMNS * 4  # one GEMM's output: responses and right products side by side
    need += STATISTICS_COPIES * repeats * rows * 8
    need += 3 * repeats * cols * 8  # inputs, FGSM gradient, noise
    need += 64 * cols * 4  # the left product of the sketch
    need += FOLD_WINDOW * 64 * (rows + cols) * 4  # finished products waiting to be folded in order
    if merged:
        need += rows * cols * 4 + info.nbytes  # the merged float32 tensor and the base's mapped tensor
    return need


def working_set(artifact: Artifact, threads: int, repeats: int = 30, base: Artifact | None = None) -> int:
    """Bytes of memory fingerprinting `artifact` with `threads` compute threads needs, with a margin.

    `base`: the base a PEFT adapter is merged onto (its tensors are the ones streamed then).
    """
    tensors = (base or artifact).tensors
    matrices = [t for t in tensors if len(t.shape) >= 2 and t.numel > 0]
    if not matrices:
        return RUNTIME_BYTES
    largest = max(_per_thread(t, repeats, merged=base is not None) for t in matrices)
    small = sum(t.nbytes for t in tensors if len(t.shape) < 2)  # norm gains, read whole by the sketch
    document = 16 * 2**20 + 400 * len(tensors)  # the JSON document (sketch <= 4 MB) while it is written
    return int(RUNTIME_BYTES + SAFETY * (max(threads, 1) * largest + 4 * small + document))
