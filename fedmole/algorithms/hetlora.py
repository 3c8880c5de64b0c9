"""HetLoRA: heterogeneous-rank LoRA by truncation and zero-padding (Cho et al., EMNLP 2024; baselines.md §2.5).

The server keeps every adapted matrix at the highest rank r_max = `rank`: A: (r_max, d_in), B: (d_out, r_max).
Client i trains at its tier rank r_i = rank * k_i / K (`rank_tiers`).

- Dispatch by truncation: client i receives the *first* r_i components, A[:r_i] and B[:, :r_i].
- Aggregation: each reply is zero-padded back to r_max in the matching positions and averaged with
  sparsity weights w_i = ‖ΔW_i‖_F / Σ_j ‖ΔW_j‖_F, per adapted matrix (`norm_weights: per_matrix`) or summed over a
  client's matrices (`per_client`). Components that only high-rank clients train are averaged with the zeros of
  low-rank clients, which shrinks them: inherent to HetLoRA. The configured `server_opt` then acts on the padded
  r_max tensors.
- Optional rank self-pruning (`self_pruning`, off by default): the regulariser
  λ ‖A[k:]‖_F ‖B[:, k:]‖_F with k = ceil(γ r_i) pushes the tail components to zero; when the client's tail norm
  product (summed over its matrices) ends a round below its value at the end of the client's previous round,
  the client drops the tail for good, r_i <- k: its reply carries the tail as zeros (the shapes it was sent)
  and `extra["rank"] = k`, and the server dispatches the smaller rank from then on. A client prunes only while
  ceil(γ r_i) < r_i: never at rank 1 (it has no component to spare), at rank 2 only with γ <= 0.5; the server
  names the ranks that can never prune in run.log when the run starts.

Scale bookkeeping: the LoRA scale is α/r, so truncating or padding changes it. Both directions go through
`resize_rank`, which rescales B by r_new/r_old: the client's update (α/r_i) B_i A_i equals the first r_i
components of the global update exactly, and ΔW_i in the weights is the client's real update.
"""

from __future__ import annotations

import logging
import math

import torch

from fedmole.adapters.base import LoRAAdapter
from fedmole.algorithms.aggregate import weighted_mean
from fedmole.algorithms.base import ClientProcedure
from fedmole.algorithms.fedit import build_adapters
from fedmole.algorithms.lora_common import RankTierServer, evaluate_tiers, train_lora
from fedmole.algorithms.lora_ops import from_pairs, lora_pairs, product_norm, resize_rank
from fedmole.algorithms.validate import Equal, Optional
from fedmole.messages import ClientState, Payload, Reply

__all__ = ["Server", "Client", "build_adapters", "aggregate"]

log = logging.getLogger("fedmole")


def aggregate(replies: dict[int, dict], r_max: int, alpha: float, weights: str, average=weighted_mean) -> dict:
    """Zero-pad every client's (A_i, B_i) to r_max and average with Frobenius-norm weights.

    `replies`: client -> LoRA state at the client's rank. Returns the r_max LoRA state. When every norm of a
    matrix is zero (nobody changed it) the clients are weighted equally. `average` combines the padded
    tensors (the strategy's weighted mean, or its robust rule, which ignores the weights)."""
    pairs = {c: lora_pairs(state) for c, state in replies.items()}
    modules = next(iter(pairs.values())).keys()
    norms = {c: {m: product_norm(A, B, alpha) for m, (A, B) in p.items()} for c, p in pairs.items()}
    if weights == "per_client":
        norms = {c: dict.fromkeys(n, sum(n.values())) for c, n in norms.items()}
    out = {}
    for m in modules:
        total = sum(norms[c][m] for c in pairs)
        contributions = [
            (from_pairs({m: resize_rank(*pairs[c][m], r_max)}), norms[c][m] / total if total > 0 else 1.0)
            for c in pairs
        ]
        out.update(average(contributions))
    return out


def zero_tail(state: dict, keep: int) -> dict:
    """The LoRA state with components keep: of every matrix set to zero (same shapes)."""
    out = {}
    for m, (A, B) in lora_pairs(state).items():
        A, B = A.clone(), B.clone()
        A[keep:], B[:, keep:] = 0.0, 0.0
        out.update(from_pairs({m: (A, B)}))
    return out


def tail_norm(modules: list[LoRAAdapter], keep: int) -> torch.Tensor:
    """Σ over adapted matrices of ‖A[keep:]‖_F ‖B[:, keep:]‖_F (differentiable); each expert's projection of a
    MoE block is a matrix of its own."""
    total = 0
    for mod in modules:
        for A, B in mod.factor_pairs():
            if A.dim() == 2:
                total = total + A[keep:].norm() * B[:, keep:].norm()
            else:  # (M, r, d_in), (M, d_out, r): one product per expert
                total = total + (A[:, keep:].flatten(1).norm(dim=1) * B[..., keep:].flatten(1).norm(dim=1)).sum()
    return total


class Server(RankTierServer):
    """`self.ranks` (per client) shrinks when a client self-prunes; it is part of the checkpointed meta."""

    def __init__(self, cfg, adapters):
        super().__init__(cfg, adapters)
        a = cfg.algorithm
        stuck = sorted({r for r in self.ranks if math.ceil(a.prune_gamma * r) >= r}, reverse=True)
        if a.self_pruning and stuck:
            log.warning("hetlora self-pruning: clients at rank %s never prune, since algorithm.prune_gamma=%s keeps "
                        "ceil(γ r) = r of their r components (rank 1 never can; rank r can with prune_gamma <= "
                        "(r-1)/r)", " / ".join(map(str, stuck)), a.prune_gamma)

    def configure_train(self, rnd, clients, evaluate):
        config = self.train_config(rnd, evaluate)
        pairs = lora_pairs(self.global_state)
        return {
            c: Payload(from_pairs({m: resize_rank(A, B, self.ranks[c]) for m, (A, B) in pairs.items()}), config)
            for c in clients
        }

    def reply_rules(self, cid, payload):
        """With self-pruning, `extra["rank"]` (optional) is the rank the client prunes to: ceil(γ r_i)."""
        rules = super().reply_rules(cid, payload)
        a, rank = self.cfg.algorithm, self.ranks[cid]
        keep = math.ceil(a.prune_gamma * rank)
        if a.self_pruning and keep < rank:
            rules.extra = {"rank": Optional(Equal(keep))}
        return rules

    def aggregate_train(self, rnd, replies):
        a = self.cfg.algorithm
        mean = aggregate({c: r.tensors for c, r in replies.items()}, a.rank, a.alpha, a.norm_weights, self.average)
        for c, r in replies.items():
            pruned = r.extra.get("rank")
            if a.self_pruning and isinstance(pruned, int) and 1 <= pruned < self.ranks[c]:
                self.ranks[c] = pruned
        self.global_state = self.server_step(self.global_state, mean)
        return {"mean_rank": sum(self.ranks[c] for c in replies) / len(replies)}

    def export_state(self, cid=None, client_state=None):
        if cid is None:
            return dict(self.global_state)
        return from_pairs({m: resize_rank(A, B, self.ranks[cid]) for m, (A, B) in lora_pairs(self.global_state).items()})

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "ranks": self.ranks}

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.ranks = list(meta["ranks"])


class Client(ClientProcedure):
    def evaluate(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        return evaluate_tiers(self, cid, payload)

    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt, a = self.runtime, self.cfg.algorithm
        rt.adapters.load(payload.tensors)
        modules = [mod for _, mod in rt.adapters]
        rank = modules[0].rank
        keep = math.ceil(a.prune_gamma * rank)
        prune = a.self_pruning and keep < rank
        extra = (lambda: a.prune_lambda * tail_norm(modules, keep)) if prune and a.prune_lambda > 0 else None
        stats, evals = train_lora(self, cid, state, list(rt.adapters.parameters().values()), payload.config, extra)
        tensors = rt.adapters.state()
        if prune:
            with torch.no_grad():
                tail = float(tail_norm(modules, keep))
            previous = state.meta.get("tail_norm")
            if previous is not None and previous["rank"] == rank and tail < previous["value"]:
                # drop the tail: zeroed in this reply (same shapes), and rank `keep` from the next round on
                tensors = zero_tail(tensors, keep)
                state.meta.pop("tail_norm")
                return Reply(tensors, rt.data(cid).num_train_examples, {**stats, "pruned_to": keep}, evals,
                             extra={"rank": keep})
            state.meta["tail_norm"] = {"rank": rank, "value": tail}
        return Reply(tensors, rt.data(cid).num_train_examples, stats, evals)
