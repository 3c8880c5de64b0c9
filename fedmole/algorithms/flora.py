"""FLoRA: stacking aggregation, merge into the base, fresh LoRA every round (Wang et al., NeurIPS 2024;
baselines.md §2.7).

Each round client i trains a *fresh* LoRA at its tier rank r_i (`rank_tiers`; A seeded per round and client,
B = 0) on top of its merged base. Per adapted matrix the server stacks the replies,

    A_stack = concat_rows(p_i (α/r_i) A_i): (Σ r_i, d_in),    B_stack = concat_cols(B_i): (d_out, Σ r_i),

so B_stack A_stack = Σ p_i (α/r_i) B_i A_i exactly (weights and LoRA scales folded into the A blocks), and merges
the product into the base: dW <- dW + B_stack A_stack. The server keeps the accumulated dW of every matrix; it
is its whole global state, so checkpoints and the global evaluation (base + dW) are exact.

The base is never written: `MergedLoRALinear` carries dW next to the frozen W0 that the in-process engine
shares between clients. Clients receive the accumulated dW with every payload instead of only the round's
stack, so a client that missed rounds (partial participation, a new Flower node) still starts from the right
base; FLoRA's own protocol needs every client in every round for that. No server optimiser: the local LoRA is
re-initialised every round, so there is no persistent x_t to move; and no robust combination
(`replies.robust`), since the stack is an exact sum by construction.
"""

from __future__ import annotations

import torch

from fedmole.algorithms.base import ClientProcedure
from fedmole.algorithms.flexlora import build_adapters
from fedmole.algorithms.lora_common import RankTierServer, train_lora
from fedmole.algorithms.lora_ops import (
    factor_key, lora_only, lora_pairs, merged_key, merged_matrix, stack, zero_merged_state,
)
from fedmole.client.runtime import derive_seed
from fedmole.messages import ClientState, Payload, Reply

__all__ = ["Server", "Client", "build_adapters", "stacked_update"]

FRESH_INIT = 0xF10A  # seed-derivation tag of the per-round LoRA initialisation


def stacked_update(replies: dict[int, dict], weights: dict[int, float], alpha: float) -> tuple[dict, int]:
    """({module/merged/dW: B_stack A_stack}, Σ r_i) for the replies, with weights normalised to sum to 1."""
    total = sum(weights[c] for c in replies)
    pairs = {c: lora_pairs(state) for c, state in replies.items()}
    out = {}
    for m in next(iter(pairs.values())):
        A_stack, B_stack = stack([(*pairs[c][m], weights[c] / total) for c in replies], alpha)
        out[merged_key(m)] = B_stack @ A_stack  # (d_out, d_in), float64
    return out, int(A_stack.shape[0])


class Server(RankTierServer):
    def initial_state(self, adapters):
        return zero_merged_state(adapters)

    def configure_train(self, rnd, clients, evaluate):
        config = self.train_config(rnd, evaluate)
        return {c: Payload(self.global_state, {**config, "rank": self.ranks[c]}) for c in clients}

    def reply_spec(self, cid, payload):
        """A fresh LoRA at the client's rank for every adapted matrix (the client was sent the merged dW)."""
        r = payload.config["rank"]
        spec = {}
        for k, dW in payload.tensors.items():
            matrix = merged_matrix(k)
            spec[factor_key(matrix, "A")] = ((r, dW.shape[1]), torch.float32)
            spec[factor_key(matrix, "B")] = ((dW.shape[0], r), torch.float32)
        return spec

    def aggregate_train(self, rnd, replies):
        update, stack_rank = stacked_update({c: r.tensors for c, r in replies.items()}, self.weights(replies),
                                            self.cfg.algorithm.alpha)
        self.global_state = {k: (self.global_state[k].to(torch.float64) + d).to(torch.float32) for k, d in update.items()}
        return {"stack_rank": stack_rank}


class Client(ClientProcedure):
    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        rnd, rank = payload.config["round"], payload.config["rank"]
        fresh = rt.adapters.init_state(derive_seed(self.cfg.federation.seed, rnd, cid, FRESH_INIT), rank=rank)
        rt.adapters.load({**payload.tensors, **fresh})  # merged base dW + a fresh LoRA (B = 0) at rank r_i
        stats, evals = train_lora(self, cid, state, list(rt.adapters.parameters().values()), payload.config)
        return Reply(lora_only(rt.adapters.state()), rt.data(cid).num_train_examples, stats, evals)
