"""Client compute tiers (FLAME's k_i; the rank-tier baselines' r_i = r * k_i / K).

The assignment is a seeded permutation of per-level client counts (largest-remainder rounding of the
shares), so it is the same for every method and independent of the data partition.
"""

from __future__ import annotations

import numpy as np

from fedmole.config import TIER_MIXES, Config
from fedmole.errors import UserError


def default_levels(K: int) -> list[int]:
    """K and its halvings down to 1: 8 -> [8, 4, 2, 1]; 6 -> [6, 3, 1]."""
    levels = [K]
    while levels[-1] > 1:
        levels.append(max(levels[-1] // 2, 1))
    return levels


def tier_levels(cfg: Config, K: int) -> list[int]:
    levels = cfg.tiers.levels or default_levels(K)
    bad = [k for k in levels if k > K]
    if bad:
        raise UserError(f"tiers.levels={levels}: tier values {bad} exceed K={K} (the maximum for this model/method)")
    return levels


def _counts(n: int, shares: list[float]) -> list[int]:
    total = sum(shares)
    exact = [n * s / total for s in shares]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_tiers(cfg: Config, K: int) -> list[int]:
    """Tier value (k) per client id 0..num_clients-1."""
    n = cfg.federation.num_clients
    if cfg.tiers.per_client is not None:
        bad = [k for k in cfg.tiers.per_client if k > K]
        if bad:
            raise UserError(f"tiers.per_client has values {bad} above K={K}; allowed: 1..{K}")
        return list(cfg.tiers.per_client)
    levels = tier_levels(cfg, K)
    shares = cfg.tiers.shares or TIER_MIXES[cfg.tiers.mix] or [1.0] * len(levels)
    if len(shares) != len(levels):
        raise UserError(
            f"tiers.mix={cfg.tiers.mix} defines {len(shares)} shares but there are {len(levels)} levels {levels}; "
            f"use tiers.mix=uniform, give tiers.shares, or set tiers.levels to 4 values"
        )
    pool = [k for k, c in zip(levels, _counts(n, shares)) for _ in range(c)]
    seed = cfg.federation.seed if cfg.tiers.seed is None else cfg.tiers.seed
    perm = np.random.default_rng([seed, 0x7155]).permutation(n)
    return [pool[int(i)] for i in perm]
