"""FFA-LoRA: federated LoRA with A frozen (Sun et al., ICLR 2024; baselines.md §2.4).

A keeps its random initialisation, drawn from the federation seed and therefore identical on every client and
in every round; only B is trained, uploaded and averaged: B <- Σ p_i B_i. Because A is shared, the aggregate is
exact: Σ p_i (α/r) B_i A = (α/r) (Σ p_i B_i) A. The global state holds B only; each client regenerates the same
A from the seed instead of downloading it, which halves the communicated parameters.

A homogeneous reference (one rank for all clients). Options shared with FedIT: `weighting`, `server_opt` (on B),
`prox_mu` (on B), `personalize_by_finetune`.
"""

from __future__ import annotations

from fedmole.algorithms.base import GLOBAL, ClientProcedure
from fedmole.algorithms.fedit import build_adapters
from fedmole.algorithms.lora_common import LoRAServer, train_lora
from fedmole.algorithms.lora_ops import is_factor
from fedmole.messages import ClientState, Payload, Reply

__all__ = ["Server", "Client", "build_adapters"]


def split_frozen(state):
    """(A tensors, B tensors) of a LoRA state."""
    A = {k: v for k, v in state.items() if is_factor(k, "A")}
    B = {k: v for k, v in state.items() if is_factor(k, "B")}
    return A, B


class Server(LoRAServer):
    def __init__(self, cfg, adapters):
        self.frozen_A, _ = split_frozen(adapters.init_state(cfg.federation.seed))
        super().__init__(cfg, adapters)

    def initial_state(self, adapters):
        return split_frozen(adapters.init_state(self.cfg.federation.seed))[1]  # B = 0

    def configure_train(self, rnd, clients, evaluate):
        config = self.train_config(rnd, evaluate)
        return {c: Payload(self.global_state, config) for c in clients}

    def aggregate_train(self, rnd, replies):
        weights = self.weights(replies)
        mean = self.average([(r.tensors, weights[c]) for c, r in replies.items()])
        self.global_state = self.server_step(self.global_state, mean)
        return {}

    def export_state(self, cid=None, client_state=None):
        return {**self.frozen_A, **self.global_state}


class Client(ClientProcedure):
    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.frozen_A, _ = split_frozen(runtime.adapters.init_state(cfg.federation.seed))  # same A everywhere

    def load(self, B):
        self.runtime.adapters.load({**self.frozen_A, **B})

    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        self.load(payload.tensors)
        params = [p for k, p in rt.adapters.parameters().items() if is_factor(k, "B")]
        stats, evals = train_lora(self, cid, state, params, payload.config)
        _, B = split_frozen(rt.adapters.state())
        return Reply(B, rt.data(cid).num_train_examples, stats, evals)

    def evaluate(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        self.load(payload.tensors)
        return Reply(evals=self.runtime.evaluate(cid, GLOBAL))
