"""The one heavy computation: responses o = X Wᵀ of a weight to all repeats at once, streamed.

On CPU the stored weight (bf16, fp16, fp32, ...) is converted to float32 in row blocks into a
buffer that is allocated once and reused, and each block is multiplied while it is still in cache:
no fresh per-tensor float32 allocation (whose page faults cost more than the arithmetic), no
autograd, no second copy. The block size depends only on the row width, and sums over blocks are
taken in block order, so results never depend on the buffer or on threads. One engine
serves one thread. On CUDA the weight is copied to the device once per tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

# Rows per block = BLOCK_ELEMENTS // row width: 4 MiB of float32, L2/L3-resident while multiplied;
# on the 2-core runner 2^20 beat 2^22 and 2^24 by ~15% single-threaded (docs/benchmarks.md). Fixed:
# the blocking of the FGSM input-gradient sum changes its rounding.
BLOCK_ELEMENTS = 1 << 20
# MKL's skinny sgemm runs ~30% faster when the repeat dimension is a multiple of 16.
REPEAT_ALIGNMENT = 16


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cuda` without CUDA is a usage error."""
    from tg_verify.errors import UsageError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch here; use --device cpu or auto")
    return torch.device(name)


def _padded(matrix: np.ndarray) -> torch.Tensor:
    """[repeats, n] float32 -> [n, repeats rounded up to REPEAT_ALIGNMENT] contiguous, zero columns added."""
    repeats, width = matrix.shape
    padded = -(-repeats // REPEAT_ALIGNMENT) * REPEAT_ALIGNMENT
    out = torch.zeros((width, padded), dtype=torch.float32)
    out[:, :repeats] = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).t()
    return out


class ResponseEngine:
    """Multiplies one tensor at a time by the repeat inputs, one cache-sized float32 block at a time.

    Only one block of float32 exists at a time; a later pass (FGSM) re-converts from the stored bytes.
    The lineage sketch's products come from the same pass (`respond_and_project`).
    """

    def __init__(self, device: torch.device, capacity: int, whole: bool | None = None) -> None:
        """`whole` (default: on any device but the CPU) copies each tensor whole into one float32 buffer
        of `capacity` elements on `device` and multiplies it there; on the CPU it runs the same code,
        which is how the GPU path is tested without a GPU."""
        self.device = device
        whole = device.type != "cpu" if whole is None else whole
        self._device_buffer = torch.empty(max(1, capacity), dtype=torch.float32, device=device) if whole else None
        self._buffer: torch.Tensor | None = None
        self._raw: torch.Tensor | None = None
        self._on_device: torch.Tensor | None = None

    # -- loading -----------------------------------------------------------------------------------
    def load(self, raw: torch.Tensor) -> None:
        """Select the next tensor (in its stored dtype, any rank >= 2); nothing is converted yet."""
        self._raw = raw.reshape(-1, raw.shape[-1])
        self._on_device = None
        if self._device_buffer is not None:
            rows, cols = self._raw.shape
            self._on_device = self._device_buffer[:rows * cols].view(rows, cols)
            self._on_device.copy_(self._raw)

    def unload(self) -> None:
        """Forget the current tensor (so its stored bytes can be released)."""
        self._raw = None
        self._on_device = None

    def _rows_per_block(self) -> int:
        assert self._raw is not None
        return max(1, BLOCK_ELEMENTS // max(1, self._raw.shape[1]))

    def each_block(self, work: Callable[[int, int, torch.Tensor], T], fold: Callable[[T], object] | None = None
                    ) -> None:
        """work(row0, row1, float32 block) for each block in order, converted into the one reused buffer;
        fold(value) after each, in block order."""
        assert self._raw is not None
        rows, cols = self._raw.shape
        step = self._rows_per_block()
        if self._buffer is None or self._buffer.numel() < min(rows, step) * cols:
            self._buffer = torch.empty(min(rows, step) * cols, dtype=torch.float32)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = self._buffer[:(stop - start) * cols].view(stop - start, cols)
            block.copy_(self._raw[start:stop])
            value = work(start, stop, block)
            if fold is not None:
                fold(value)

    # -- the products --------------------------------------------------------------------------------
    def respond(self, inputs: np.ndarray) -> np.ndarray:
        """o = X Wᵀ for X [repeats, in] (float32 values); returns [repeats, out] float64."""
        return self.respond_and_project(inputs)[0]

    def respond_and_project(self, inputs: np.ndarray, right: torch.Tensor | None = None,
                            left: torch.Tensor | None = None, right_rows: torch.Tensor | None = None,
                            left_groups: int = 1) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
        """Responses X Wᵀ, and in the same pass W rightᵀ ([out, k]) and left W ([k, in]) when given.

        `right` [k, in] is stacked beside the repeat inputs in one right-hand side, so one GEMM per
        block serves both; with `right_rows` (ascending row ids) only those rows are multiplied by it,
        giving [len(right_rows), k]. `left` [k, out] is multiplied by each block while it is in cache,
        accumulated in block order. With `left_groups` = G > 1 (a 3-D tensor of G experts, rows taken G-wise) `left`
        is [k, out / G] and multiplies each group of rows alone: [G, k, in].
        The responses are bitwise those of `respond` alone (columns of one GEMM are independent).
        """
        assert self._raw is not None
        repeats = inputs.shape[0]
        rhs = _padded(inputs)
        padded = rhs.shape[1]
        stacked = False
        sample: tuple[torch.Tensor, torch.Tensor] | None = None  # (right_rows, right in float32)
        if right is not None and right_rows is None:
            rhs = torch.cat([rhs, right.to(torch.float32).t()], dim=1)
            stacked = True
        elif right is not None and right_rows is not None:
            sample = (right_rows, right.to(torch.float32))
        right_product: torch.Tensor | None = None
        left_product: torch.Tensor | None = None
        if self._on_device is not None:
            out = (self._on_device @ rhs.to(self.device)).cpu()
            if sample is not None:
                rows, sampled = sample
                right_product = (self._on_device[rows.to(self.device)] @ sampled.to(self.device).t()).cpu()
            if left is not None:
                whole = self._on_device if left_groups == 1 else self._on_device.view(left_groups, -1,
                                                                                      self._on_device.shape[1])
                left_product = (left.to(self.device, torch.float32) @ whole).cpu()
        else:
            out = torch.empty((self._raw.shape[0], rhs.shape[1]), dtype=torch.float32)
            # what each block adds to: (rows, right, their product) and (left, its product)
            sampling = None if sample is None else (*sample, torch.empty((len(sample[0]), sample[1].shape[0]),
                                                                         dtype=torch.float32))
            accumulating = None if left is None else (
                left.to(torch.float32), torch.zeros((left.shape[0], self._raw.shape[1]) if left_groups == 1 else
                                                    (left_groups, left.shape[0], self._raw.shape[1]),
                                                    dtype=torch.float32))
            per_group = self._raw.shape[0] // left_groups

            def work(start: int, stop: int, block: torch.Tensor) -> None:
                torch.mm(block, rhs, out=out[start:stop])
                if sampling is not None:
                    rows, sampled, product = sampling
                    lo, hi = (int(torch.searchsorted(rows, edge)) for edge in (start, stop))
                    if hi > lo:
                        torch.mm(block[rows[lo:hi] - start], sampled.t(), out=product[lo:hi])
                if accumulating is not None:
                    left32, product = accumulating
                    if left_groups == 1:
                        product.addmm_(left32[:, start:stop], block)  # accumulated in block order
                        return
                    for group in range(start // per_group, (stop - 1) // per_group + 1):  # the groups in this block
                        lo, hi = max(start, group * per_group), min(stop, (group + 1) * per_group)
                        product[group].addmm_(left32[:, lo - group * per_group:hi - group * per_group],
                                              block[lo - start:hi - start])

            self.each_block(work)
            right_product = None if sampling is None else sampling[2]
            left_product = None if accumulating is None else accumulating[1]
        responses = out[:, :repeats].t().numpy().astype(np.float64)
        if stacked:
            right_product = out[:, padded:].contiguous()
        return responses, right_product, left_product

    def project(self, right: torch.Tensor | None = None, left: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """W right ([out, k] for right [in, k]) and left W ([k, in] for left [k, out]) of the loaded tensor,
        float32, without responses: one cache-sized block converted at a time on the CPU, as `respond_and_project`
        (no float32 copy of the whole weight, whose page faults and memory traffic cost more than the products)."""
        assert self._raw is not None
        if self._on_device is not None:
            return ((self._on_device @ right.to(self.device)).cpu() if right is not None else None,
                    (left.to(self.device) @ self._on_device).cpu() if left is not None else None)
        rows, cols = self._raw.shape
        right_product = None if right is None else torch.empty((rows, right.shape[1]), dtype=torch.float32)
        left_product = None if left is None else torch.zeros((left.shape[0], cols), dtype=torch.float32)

        def work(start: int, stop: int, block: torch.Tensor) -> None:
            if right is not None and right_product is not None:
                torch.mm(block, right, out=right_product[start:stop])
            if left is not None and left_product is not None:
                left_product.addmm_(left[:, start:stop], block)  # accumulated in block order

        self.each_block(work)
        return right_product, left_product

    def input_gradient(self, coefficients: np.ndarray) -> np.ndarray:
        """C W for C [repeats, out]: the FGSM input gradient when C = softmax(o) - e_t. [repeats, in] float64."""
        assert self._raw is not None
        repeats = coefficients.shape[0]
        left = _padded(coefficients)  # [out, padded repeats]
        if self._on_device is not None:
            return (left.to(self.device).t() @ self._on_device)[:repeats].double().cpu().numpy()
        total = torch.zeros((left.shape[1], self._raw.shape[1]), dtype=torch.float64)

        self.each_block(lambda start, stop, block: torch.mm(left[start:stop].t(), block), total.add_)
        return total[:repeats].numpy()

    def finite(self) -> bool:
        """Whether every stored value of the current tensor is finite (used to name NaN/Inf precisely)."""
        assert self._raw is not None
        return bool(torch.isfinite(self._raw).all())
