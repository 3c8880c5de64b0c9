"""FedIT: federated instruction tuning with LoRA (FedAvg of the LoRA factors A and B).

Each round every sampled client receives the global LoRA, trains it for `train.local_steps` steps and sends
it back; the server averages A and B separately, weighted by client data size (or uniformly), and moves the
global LoRA to that average with the configured server optimiser (`server_opt`: FedAvg by default, or FedAvgM,
FedAdagrad, FedAdam, FedYogi on the aggregated delta). `prox_mu` > 0 adds FedProx's proximal term on the
clients. The global model is evaluated on every client's val/test split. With `personalize_by_finetune`
(FedIT-FT) each client is also evaluated right after its local training, before aggregation: its personalised
model, which the client keeps in its state (so `fedmole export --client` and `fedmole eval` can use it).
"""

from __future__ import annotations

from fedmole.algorithms.base import ClientProcedure
from fedmole.algorithms.lora_common import LoRAServer, build_lora_adapters, train_lora
from fedmole.messages import ClientState, Payload, Reply


def build_adapters(model, cfg):
    """LoRA on `target_modules`; on a MoE model the expert projection names adapt every expert (`MoELoRA`)."""
    return build_lora_adapters(model, cfg)


class Server(LoRAServer):
    def configure_train(self, rnd, clients, evaluate):
        config = self.train_config(rnd, evaluate)
        return {c: Payload(self.global_state, config) for c in clients}

    def aggregate_train(self, rnd, replies):
        weights = self.weights(replies)
        mean = self.average([(r.tensors, weights[c]) for c, r in replies.items()])
        self.global_state = self.server_step(self.global_state, mean)
        return {}


class Client(ClientProcedure):
    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        rt.adapters.load(payload.tensors)
        stats, evals = train_lora(self, cid, state, list(rt.adapters.parameters().values()), payload.config)
        trained = rt.adapters.state()
        if self.cfg.algorithm.personalize_by_finetune:
            state.tensors = dict(trained)  # FedIT-FT: the personalised model stays on the client
        return Reply(trained, rt.data(cid).num_train_examples, stats, evals)
