"""Client-level differential privacy on model updates (DP-FedAvg with noise added on the client).

The update of a client is what it uploads minus what it received (a tensor it uploads without having
received it counts as an update from zero). Before upload the client clips the update to L2 norm C,
either as a whole (`granularity: update`) or per (module, expert) group (`expert`, for sparse expert
updates), and adds N(0, (sigma C)^2) to every coordinate. The server sees only privatised updates.

Accounting: each round is a Gaussian mechanism on each client's clipped update, applied to a client
sampled with probability q = clients_per_round / num_clients (the accountant treats sampling as Poisson,
the usual approximation for fixed-size sampling). With per-expert clipping a client's whole update has
L2 sensitivity C * sqrt(g) for g groups, so the effective noise multiplier is sigma / sqrt(g), with g the
most groups any client uploads. Epsilon for the configured delta comes from opacus' RDP accountant.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from fedmole.adapters.state import parse_key
from fedmole.config import Config, DPConfig


def _groups(keys: list[str], granularity: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for k in sorted(keys):
        if granularity == "update":
            out["update"].append(k)
        else:
            key = parse_key(k)
            out[f"{key.module}/{key.expert}"].append(k)
    return out


def privatize(received: dict[str, torch.Tensor], uploaded: dict[str, torch.Tensor], cfg: DPConfig,
              generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """(privatised upload, facts): clip each group's update to `clip_norm`, add Gaussian noise."""
    out, facts = dict(uploaded), {"groups": 0, "clipped": 0}
    for keys in _groups([k for k, t in uploaded.items() if t.is_floating_point()], cfg.granularity).values():
        deltas = {k: uploaded[k].double() - (received[k].double() if k in received else 0.0) for k in keys}
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
        scale = min(1.0, cfg.clip_norm / norm) if norm > 0 else 1.0
        facts["groups"] += 1
        facts["clipped"] += int(scale < 1.0)
        std = cfg.noise_multiplier * cfg.clip_norm
        for k, d in deltas.items():
            noise = torch.randn(d.shape, generator=generator, dtype=torch.float64) * std
            base = received[k].double() if k in received else 0.0
            out[k] = (base + d * scale + noise).to(uploaded[k].dtype)
    return out, facts


def effective_noise_multiplier(cfg: DPConfig, max_groups: int) -> float:
    if cfg.granularity == "expert" and max_groups > 1:
        return cfg.noise_multiplier / math.sqrt(max_groups)
    return cfg.noise_multiplier


def epsilon(cfg: Config, rounds: int, max_groups: int = 1) -> float:
    """Epsilon after `rounds` rounds for `dp.delta` (inf without noise, 0 before any round)."""
    if rounds <= 0:
        return 0.0
    sigma = effective_noise_multiplier(cfg.dp, max_groups)
    if sigma <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    q = cfg.clients_per_round / cfg.federation.num_clients
    acc.history = [(sigma, q, rounds)]
    return float(acc.get_epsilon(cfg.dp.delta))
