"""Local-only training: every client trains its own LoRA on its own data; nothing is communicated.

The lower bound that shows whether federation helps at all. Every client starts from the same initial LoRA
(drawn from the federation seed, like the federated methods), keeps it in its client state between rounds,
and does the same optimiser work per round as the federated runs (fresh optimiser, same lr decay).
Evaluation is personalised only.
"""

from __future__ import annotations

from fedmole.algorithms.base import PERSONALIZED, ClientProcedure, Strategy
from fedmole.algorithms.fedit import build_adapters
from fedmole.messages import ClientState, Payload, Reply

__all__ = ["Server", "Client", "build_adapters"]


class Server(Strategy):
    personalized = True
    has_global = False
    headline = PERSONALIZED

    def initial_state(self, adapters):
        return {}

    def configure_train(self, rnd, clients, evaluate):
        config = self.train_config(rnd, evaluate)
        return {c: Payload({}, config) for c in clients}

    def aggregate_train(self, rnd, replies):
        return {}


class Client(ClientProcedure):
    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        if not state.tensors:  # first round of this client: the shared seeded initialisation
            state.tensors = rt.adapters.init_state(self.cfg.federation.seed)
        rt.adapters.load(state.tensors)
        cfg = payload.config
        stats = rt.train(cid, state, list(rt.adapters.parameters().values()), cfg["lr"], cfg["steps"])
        state.tensors = rt.adapters.state()
        evals = rt.evaluate(cid, PERSONALIZED) if cfg.get("eval_personalized") else []
        return Reply({}, rt.data(cid).num_train_examples, stats, evals)
