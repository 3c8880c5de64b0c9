"""Shared aggregation mechanics: weighted averaging of named tensors.

Methods call these instead of writing their own loops. Accumulation is in float64 and weights are
normalised per key, so a key held by only some contributors (an expert held by some clients) is averaged
over exactly those contributors.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fedmole.messages import Tensors


def weighted_mean(contributions: list[tuple[Tensors, float]]) -> Tensors:
    """Per key, the weighted mean over the contributions that contain the key.

    `contributions` is a list of (tensors, weight); weights must be >= 0 and, per key, not all zero.
    """
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = defaultdict(float)
    dtypes: dict[str, torch.dtype] = {}
    for tensors, weight in contributions:
        if weight < 0:
            raise ValueError(f"aggregation weight must be >= 0, got {weight}")
        for k, t in tensors.items():
            contrib = t.detach().to(torch.float64) * weight
            sums[k] = contrib if k not in sums else sums[k] + contrib
            totals[k] += weight
            dtypes.setdefault(k, t.dtype)
    out = {}
    for k, s in sums.items():
        if totals[k] <= 0:
            raise ValueError(f"all aggregation weights for {k} are zero")
        out[k] = (s / totals[k]).to(dtypes[k])
    return out


def client_weights(num_examples: dict[int, int], mode: str) -> dict[int, float]:
    """FedAvg weights: |D_i| ('data_size') or 1 ('uniform')."""
    if mode == "uniform":
        return {c: 1.0 for c in num_examples}
    return {c: float(n) for c, n in num_examples.items()}


def robust_mean(contributions: list[tuple[Tensors, float]], mode: str, trim_ratio: float = 0.1) -> Tensors:
    """Per key, the unweighted coordinate-wise median or trimmed mean over the contributions holding it.

    Robust to a minority of hostile clients; weights are ignored (a weight is itself an attack surface).
    The median of an even count is the mean of the two middle values.
    """
    stacks: dict[str, list[torch.Tensor]] = defaultdict(list)
    dtypes: dict[str, torch.dtype] = {}
    for tensors, _ in contributions:
        for k, t in tensors.items():
            stacks[k].append(t.detach().to(torch.float64))
            dtypes.setdefault(k, t.dtype)
    out = {}
    for k, ts in stacks.items():
        x = torch.stack(ts).sort(dim=0).values  # (holders, *shape), sorted per coordinate
        n = len(ts)
        if mode == "median":
            value = x[(n - 1) // 2 : n // 2 + 1].mean(0)
        elif mode == "trimmed_mean":
            cut = int(trim_ratio * n)
            value = x[cut : n - cut].mean(0)
        else:
            raise ValueError(f"unknown robust aggregation {mode!r}")
        out[k] = value.to(dtypes[k])
    return out
