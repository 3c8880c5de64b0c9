"""FedIT: federated instruction tuning with LoRA (FedAvg of the LoRA factors A and B).

Each round every sampled client receives the global LoRA, trains it for `train.local_steps` steps and sends
it back; the server averages A and B separately, weighted by client data size (or uniformly). The global
model is evaluated on every client's val/test split. With `personalize_by_finetune` (FedIT-FT) each client
is also evaluated right after its local training, before aggregation: its personalised model.
"""

from __future__ import annotations

from fedmole.adapters import LoRALinear, inject
from fedmole.algorithms.aggregate import client_weights
from fedmole.algorithms.base import GLOBAL, PERSONALIZED, ClientProcedure, ClientState, Payload, Reply, Strategy


def build_adapters(model, cfg):
    a = cfg.algorithm
    return inject(model, a.target_modules, lambda path, linear: LoRALinear(linear, a.rank, a.alpha, a.dropout))


class Server(Strategy):
    def __init__(self, cfg, adapters):
        super().__init__(cfg, adapters)
        self.personalized = cfg.algorithm.personalize_by_finetune
        self.headline = PERSONALIZED if self.personalized else GLOBAL

    def configure_train(self, rnd, clients, evaluate):
        config = self.train_config(rnd, evaluate)
        return {c: Payload(self.global_state, config) for c in clients}

    def aggregate_train(self, rnd, replies):
        weights = client_weights({c: r.num_examples for c, r in replies.items()}, self.cfg.algorithm.weighting)
        self.global_state = self.average([(r.tensors, weights[c]) for c, r in replies.items()])
        return {}


class Client(ClientProcedure):
    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        rt.adapters.load(payload.tensors)
        cfg = payload.config
        stats = rt.train(cid, state, list(rt.adapters.parameters().values()), cfg["lr"], cfg["steps"])
        evals = rt.evaluate(cid, PERSONALIZED) if cfg.get("eval_personalized") else []
        return Reply(rt.adapters.state(), rt.data(cid).num_train_examples, stats, evals)
