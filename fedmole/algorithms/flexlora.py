"""FlexLoRA: average the full updates, redistribute by truncated SVD (Bai et al., NeurIPS 2024; baselines.md §2.6).

Client i trains (A_i, B_i) at its tier rank r_i (`rank_tiers`) with scale α/r_i. Per adapted matrix:

- Server: ΔW = Σ p_i (α/r_i) B_i A_i, the exact average of the clients' products (no cross terms), then the
  configured `server_opt` moves the global ΔW_t towards it.
- Redistribution: thin SVD ΔW = U Σ Vᵀ once per matrix per round; client i receives
  B_i = U[:, :r_i] diag(Σ[:r_i]) / (α/r_i) and A_i = Vᵀ[:r_i], so that (α/r_i) B_i A_i is the best rank-r_i
  approximation of ΔW, and continues training from them. Before the first aggregation every client starts
  from the seeded initial LoRA truncated to its rank (B = 0).
- Global model: the full ΔW, carried by `MergedLoRALinear` as a dense `merged/dW` tensor (not its rank-r_max
  truncation), so the evaluated global model is exactly the average.
"""

from __future__ import annotations

from fedmole.algorithms.aggregate import weighted_mean
from fedmole.algorithms.base import ClientProcedure
from fedmole.algorithms.lora_common import RankTierServer, build_lora_adapters, evaluate_tiers, train_lora
from fedmole.algorithms.lora_ops import (
    from_pairs, lora_only, lora_pairs, merged_key, resize_rank, scaled_product, svd_factors, zero_merged_state,
)
from fedmole.messages import ClientState, Payload, Reply


def build_adapters(model, cfg):
    """LoRA + a merged dense update on `target_modules` (`MergedLoRALinear`; on a MoE model's experts `MoELoRA`)."""
    return build_lora_adapters(model, cfg, merged=True)


def average_products(replies: dict[int, dict], weights: dict[int, float], alpha: float, average=weighted_mean) -> dict:
    """{module/merged/dW: Σ p_i (α/r_i) B_i A_i} over the replies (float64); `average` is the strategy's
    weighted mean, or its robust rule."""
    products = [({merged_key(m): scaled_product(A, B, alpha) for m, (A, B) in lora_pairs(state).items()}, weights[c])
                for c, state in replies.items()]
    return average(products)


class Server(RankTierServer):
    def __init__(self, cfg, adapters):
        super().__init__(cfg, adapters)
        self.init_pairs = lora_pairs(adapters.init_state(cfg.federation.seed))  # round-1 start, at r_max
        self.aggregated = False  # has ΔW been produced by a round yet?

    def initial_state(self, adapters):
        return zero_merged_state(adapters)

    def client_factors(self, ranks: set[int]) -> dict[int, dict]:
        """{r: LoRA state at rank r} for the requested ranks: the truncated SVD of each ΔW (one SVD per matrix),
        or, before the first aggregation, the seeded initial LoRA truncated to r (B = 0)."""
        alpha, ranks = self.cfg.algorithm.alpha, sorted(ranks)
        out: dict[int, dict] = {r: {} for r in ranks}
        for m, (A0, B0) in self.init_pairs.items():
            if self.aggregated:
                pairs = svd_factors(self.global_state[merged_key(m)], ranks, alpha)
            else:
                pairs = {r: resize_rank(A0, B0, r) for r in ranks}
            for r in ranks:
                out[r].update(from_pairs({m: pairs[r]}))
        return out

    def configure_train(self, rnd, clients, evaluate):
        config = self.train_config(rnd, evaluate)
        factors = self.client_factors({self.ranks[c] for c in clients})
        return {c: Payload(factors[self.ranks[c]], config) for c in clients}

    def aggregate_train(self, rnd, replies):
        mean = average_products({c: r.tensors for c, r in replies.items()}, self.weights(replies), self.cfg.algorithm.alpha,
                                self.average)
        self.global_state = self.server_step(self.global_state, mean)
        self.aggregated = True
        return {}

    def export_state(self, cid=None, client_state=None):
        if cid is None:
            return dict(self.global_state)
        return self.client_factors({self.ranks[cid]})[self.ranks[cid]]

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "aggregated": self.aggregated}

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.aggregated = bool(meta["aggregated"])


class Client(ClientProcedure):
    def evaluate(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        return evaluate_tiers(self, cid, payload)

    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        rt.adapters.load(payload.tensors)  # LoRA factors at rank r_i, no merged ΔW
        stats, evals = train_lora(self, cid, state, list(rt.adapters.parameters().values()), payload.config)
        return Reply(lora_only(rt.adapters.state()), rt.data(cid).num_train_examples, stats, evals)
