"""Rank tiers: the rank-heterogeneous baselines (HetLoRA, FlexLoRA, FLoRA) adapt only the LoRA rank.

A client in compute tier k_i (the `tiers` section, the same seeded assignment FLAME uses) trains at rank

    r_i = rank * k_i / K        K = the highest tier level

so that a baseline and FLAME are compared on equal budgets (baselines.md §1.2). On a sparse-MoE model the
tier values are active-expert counts and K defaults to the model's top-k; on a dense model the levels default
to 8, 4, 2, 1 unless `tiers.levels` is set.
"""

from __future__ import annotations

from fedmole.config import Config
from fedmole.errors import UserError
from fedmole.feasibility import tier_rank_map
from fedmole.tiers import assign_tiers, tier_levels

DENSE_K = 8  # default highest tier level of a dense model


def model_tier_k(cfg: Config, model) -> int:
    """The largest allowed tier value: the MoE top-k, or (dense) the highest configured level / DENSE_K."""
    top_k = getattr(model.config, "num_experts_per_tok", None)
    if top_k:
        return int(top_k)
    return cfg.tiers.levels[0] if cfg.tiers.levels else DENSE_K


def client_tiers(cfg: Config, model) -> tuple[list[int], int, list[int]]:
    """(tier value k_i per client id 0..num_clients-1, the highest level K, LoRA rank r_i per client)."""
    K_model = model_tier_k(cfg, model)
    tiers = assign_tiers(cfg, K_model)
    K = tier_levels(cfg, K_model)[0]
    try:
        ranks = tier_rank_map(cfg.algorithm.rank, K, sorted(set(tiers)))
    except ValueError as err:
        raise UserError(str(err)) from None
    return tiers, K, [ranks[k] for k in tiers]


def client_ranks(cfg: Config, model) -> list[int]:
    """LoRA rank r_i per client id 0..num_clients-1."""
    return client_tiers(cfg, model)[2]
