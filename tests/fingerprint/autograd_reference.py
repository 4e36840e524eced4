"""The paper's computation, literally: an nn.Linear per weight, L = ||x Wᵀ||₂, L.backward(), weight.grad.

The fast path must agree with this to float tolerance. Inputs come from the same seeded draws; FGSM
is recomputed here with autograd (x.grad of a real cross-entropy), not with the closed form.
"""

from __future__ import annotations

import numpy as np
import torch

from tg_verify.fingerprint import noise
from tg_verify.fingerprint.settings import FingerprintSettings

STATS = ("mean", "std", "norm", "skewness", "kurtosis")


def reference_inputs(weight: torch.Tensor, name: str, settings: FingerprintSettings, strategy: str) -> torch.Tensor:
    """[repeats, in] float32 inputs, FGSM done by autograd through a real CrossEntropyLoss."""
    width = weight.shape[1]
    x0 = torch.from_numpy(noise.base_inputs(settings, name, width).astype(np.float32))
    if strategy != "adversarial":
        extra = noise.additive_noise(settings, name, strategy, width)
        return torch.from_numpy((noise.base_inputs(settings, name, width) + extra).astype(np.float32))
    layer = torch.nn.Linear(width, weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    targets = torch.from_numpy(noise.pseudo_targets(settings, name, weight.shape[0]))
    rows = []
    for r in range(settings.repeats):
        x = x0[r:r + 1].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(layer(x), targets[r:r + 1])
        loss.backward()
        rows.append((x0[r].double() + settings.epsilon * torch.sign(x.grad[0]).double()).float())
    return torch.stack(rows)


def reference_statistics(weight: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
    """Average over repeats of mean, std, Frobenius norm, skewness, excess kurtosis of weight.grad."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    per_repeat = []
    for x in inputs:
        layer.zero_grad()
        loss = torch.linalg.vector_norm(layer(x[None, :]))
        loss.backward()
        g = layer.weight.grad.double()
        mean = g.mean()
        std = g.std(unbiased=False)
        z = (g - mean) / std
        per_repeat.append([mean.item(), std.item(), torch.linalg.norm(g).item(), (z ** 3).mean().item(),
                           (z ** 4).mean().item() - 3.0])
    average = np.mean(np.array(per_repeat), axis=0)
    return dict(zip(STATS, (float(v) for v in average)))


def assert_close(fast: dict[str, float], reference: dict[str, float], where: str) -> None:
    """Per statistic: relative 1e-4 (mean: relative to std, skewness: absolute 1e-4 besides relative)."""
    scale = reference["std"]
    for stat in STATS:
        a, b = fast[stat], reference[stat]
        if stat == "mean":
            ok = abs(a - b) <= 1e-4 * scale
        elif stat == "skewness":
            ok = abs(a - b) <= 1e-4 * max(1.0, abs(b))
        else:
            ok = abs(a - b) <= 1e-4 * abs(b)
        assert ok, f"{where}: {stat} fast {a!r} vs autograd {b!r}"
