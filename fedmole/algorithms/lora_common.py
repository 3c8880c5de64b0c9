"""Mechanics shared by the federated LoRA methods (FedIT and the baselines), below the method files.

Adapters (`build_lora_adapters`): a LoRA on every linear layer `target_modules` names; on a sparse-MoE model the
expert projection names (`gate_proj`, `up_proj`, `down_proj`) adapt every routed expert of every MoE block
instead (`adapters.moe_lora`), the weights FLAME adapts.
Server (`LoRAServer`): evaluation labels (global, plus personalised when `personalize_by_finetune`), FedAvg
client weights, and the server optimiser step x_{t+1} = opt(x_t, Σ p_i x_i) whose moments travel with the
checkpointed server state; `RankTierServer` adds the clients' tier ranks. Client (`train_lora`): local training with the FedProx hook when `prox_mu` > 0 and
the personalised evaluation right after local training when the round asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmole.adapters import AdapterSet, LoRALinear, inject
from fedmole.adapters.merged import MergedLoRALinear
from fedmole.adapters.moe_lora import MoELoRA
from fedmole.adapters.smoe import find_moe_blocks
from fedmole.algorithms.aggregate import client_weights
from fedmole.algorithms.base import GLOBAL, PERSONALIZED, ClientProcedure, Strategy
from fedmole.algorithms.fedprox import proximal_hook
from fedmole.algorithms.rank_tiers import client_tiers
from fedmole.algorithms.server_opt import ServerOptimizer
from fedmole.config import EXPERT_PROJECTIONS
from fedmole.messages import ClientState, Payload, Reply, Tensors

OPT_PREFIX = "server_opt::"  # server-optimiser moments inside the checkpointed server tensors
TIER_PREFIX = "tier::"  # the client's own-rank model inside an evaluation payload (`tier_eval: own`)


def build_lora_adapters(model: nn.Module, cfg, merged: bool = False) -> AdapterSet:
    """LoRA (with a merged dense update dW when `merged`: FlexLoRA, FLoRA) on the modules `target_modules` names.

    On a model with supported sparse-MoE blocks (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral), the names `gate_proj`,
    `up_proj`, `down_proj` put a LoRA on that projection of every routed expert of every MoE block (`MoELoRA`,
    keyed `{block}/{j}/{proj}_A|B` as FLAME's experts), not on linear layers of the same name elsewhere (a
    Qwen2-MoE shared expert; target those with a `^regex`). Every other name or regex adapts the matching
    linear layers, as on a dense model."""
    a = cfg.algorithm
    blocks = find_moe_blocks(model)
    experts = [m for m in a.target_modules if m in EXPERT_PROJECTIONS] if blocks else []
    modules: dict[str, nn.Module] = {}
    for path, block in blocks.items() if experts else ():
        layer = MoELoRA(block, a.rank, a.alpha, a.dropout, tuple(m.removesuffix("_proj") for m in experts), merged)
        model.set_submodule(path, layer)
        modules[path] = layer
    linear = [m for m in a.target_modules if m not in experts]
    if linear:
        cls = MergedLoRALinear if merged else LoRALinear
        modules.update(inject(model, linear, lambda path, layer: cls(layer, a.rank, a.alpha, a.dropout)).modules)
    return AdapterSet(model, modules)


class LoRAServer(Strategy):
    def __init__(self, cfg, adapters):
        super().__init__(cfg, adapters)
        alg = cfg.algorithm
        if alg.finetune_eval:
            self.personalized = alg.personalize_by_finetune
            self.headline = PERSONALIZED if self.personalized else GLOBAL
        self.server_opt = ServerOptimizer(alg.server_opt) if alg.server_optimizer else None

    def weights(self, replies: dict[int, Reply]) -> dict[int, float]:
        """p_i ∝ |D_i| (`weighting: data_size`) or uniform; weighted_mean normalises them."""
        return client_weights({c: r.num_examples for c, r in replies.items()}, self.cfg.algorithm.weighting)

    def server_step(self, x: Tensors, mean: Tensors) -> Tensors:
        """x_{t+1} from x_t and the round's aggregate Σ p_i x_i (`server_opt`; fedavg: the aggregate itself)."""
        return self.server_opt.step(x, mean)

    def state_dict(self) -> tuple[Tensors, dict]:
        tensors = dict(self.global_state)
        if self.server_opt is not None:
            tensors.update({OPT_PREFIX + k: v for k, v in self.server_opt.state_dict().items()})
        return tensors, {}

    def load_state_dict(self, tensors: Tensors, meta: dict) -> None:
        self.global_state = {k: v for k, v in tensors.items() if not k.startswith(OPT_PREFIX)}
        if self.server_opt is not None:
            self.server_opt.load_state_dict(
                {k[len(OPT_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPT_PREFIX)}
            )


class RankTierServer(LoRAServer):
    """A LoRA server whose clients train at their tier ranks r_i = rank * k_i / K (`rank_tiers`); every round
    records each client's rank (`metric: rank`), and the summary lists them. With `tier_eval: own` a client
    below the highest tier also evaluates the model it can run, its `export_state` (the global LoRA at its
    rank), labelled `global_k{k_i}` as FLAME's tier-wise evaluation is; the payload carries it after
    `TIER_PREFIX`, and `evaluate_tiers` is the client half."""

    def __init__(self, cfg, adapters):
        super().__init__(cfg, adapters)
        self.tiers, self.K, self.ranks = client_tiers(cfg, adapters.model)

    def round_records(self, rnd):
        return [{"client": c, "metric": "rank", "value": r} for c, r in enumerate(self.ranks)]

    def summary_extra(self):
        return {"ranks": {str(c): r for c, r in enumerate(self.ranks)}}

    def configure_evaluate(self, rnd, clients):
        plans = super().configure_evaluate(rnd, clients)
        alg = self.cfg.algorithm
        if not alg.rank_tier_eval or alg.tier_eval == "none":
            return plans
        own: dict[int, Tensors] = {}  # rank -> the model at that rank, built once per round
        for c, plan in plans.items():
            if self.tiers[c] >= self.K:
                continue
            if self.ranks[c] not in own:
                own[self.ranks[c]] = {TIER_PREFIX + k: v for k, v in self.export_state(c).items()}
            plans[c] = Payload({**plan.tensors, **own[self.ranks[c]]},
                               {**plan.config, "tier_label": f"{GLOBAL}_k{self.tiers[c]}",
                                "tier_only": alg.tier_eval == "budget"})
        return plans


def evaluate_tiers(proc: ClientProcedure, cid: int, payload: Payload) -> Reply:
    """Client half of `RankTierServer.configure_evaluate`: the global model (unless `tier_only`), then the
    own-rank model."""
    rt = proc.runtime
    evals = []
    if not payload.config.get("tier_only"):  # tier_eval: budget evaluates a lower tier on its own model only
        rt.adapters.load({k: v for k, v in payload.tensors.items() if not k.startswith(TIER_PREFIX)})
        evals = rt.evaluate(cid, GLOBAL)
    label = payload.config.get("tier_label")
    if label:
        rt.adapters.load({k[len(TIER_PREFIX):]: v for k, v in payload.tensors.items() if k.startswith(TIER_PREFIX)})
        evals += rt.evaluate(cid, label)
    return Reply(evals=evals)


def train_lora(
    proc: ClientProcedure,
    cid: int,
    state: ClientState,
    params: list[nn.Parameter],
    config: dict,
    extra_loss: Callable[[], torch.Tensor | None] | None = None,
) -> tuple[dict, list[dict]]:
    """Local training of `params` (+ FedProx) and, if asked, the personalised evaluation; (stats, evals)."""
    rt = proc.runtime
    mu = proc.cfg.algorithm.prox_mu
    hook = proximal_hook(params, mu) if mu > 0 else None
    stats = rt.train(cid, state, params, config["lr"], config["steps"], extra_loss=extra_loss, before_step=hook)
    evals = rt.evaluate(cid, PERSONALIZED) if config.get("eval_personalized") else []
    return stats, evals
