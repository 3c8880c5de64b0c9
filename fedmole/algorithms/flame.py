"""FLAME: federated fine-tuning through an adaptive sparse MoE (Le et al., arXiv 2506.16600).

Every client holds the same full-rank LoRA on every expert; client i adapts to its compute budget by
activating only k_i <= K experts per token (its tier, from the shared `tiers` section). Per round:

  server -> client i : all global expert LoRA factors, k_i, and (for a client without a rescaler yet)
                       the average rescaler of its tier
  client i           : route with top-k_i, train LoRA and the rescaler s_i (which multiplies the MoE output),
                       count a_i^{l,j} = non-padding tokens routed to expert j of layer l, and S_i
  client -> server   : the experts it activated (a_i^{l,j} > 0), the counts, S_i, |D_i|, and s_i (statistics
                       only: the rescaler stays on the client)
  server             : per (layer l, expert j), over the replying clients,
                           gamma_i = (a_i^{l,j} / S_i)^t * |D_i|
                           theta^{l,j} <- sum_i gamma_i theta_i^{l,j} / sum_i gamma_i     (factor-wise A and B)
                       computed in log space and float64; an expert nobody activated keeps its value; routers
                       and attention LoRA are averaged by |D_i|; s is averaged per tier, never across tiers.
                       The global tensors then move towards that aggregate with `server_opt` (FedAvg by
                       default; FedAvgM / FedAdagrad / FedAdam / FedYogi on Δ = aggregate − x_t, skipping the
                       experts nobody activated). `prox_mu` > 0 adds FedProx's term on the clients.

The global model is evaluated at k = K with s = 1 (label `global`) and tier-wise at k < K with the tier's
average s (labels `global_k{k}`). See docs/flame.md for every option and deviation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from fedmole.adapters import AdapterSet, LoRALinear, inject, parse_key
from fedmole.adapters.smoe import (
    RESCALER,
    LoRAExpertPool,
    RoutedExperts,
    SparseMoELoRA,
    attach_context,
    find_moe_blocks,
    share_rescaler,
    unsupported_moe_blocks,
)
from fedmole.adapters.state import key as state_key
from fedmole.adapters.state import state_bytes
from fedmole.algorithms.aggregate import weighted_mean
from fedmole.algorithms.base import GLOBAL, ClientProcedure, Strategy
from fedmole.algorithms.fedprox import proximal_hook
from fedmole.algorithms.lora_common import OPT_PREFIX
from fedmole.algorithms.server_opt import ServerOptimizer
from fedmole.algorithms.validate import Equal, Integer, ListOf, MapOf, ReplyRules
from fedmole.client.train import client_batches
from fedmole.config import ATTENTION_PROJECTIONS, EXPERT_PROJECTIONS
from fedmole.errors import UserError
from fedmole.messages import ClientState, Payload, Reply
from fedmole.tiers import assign_tiers

LOG_S_BOUND = 20.0  # |log s| a client may report: s within e^-20..e^20 (honest values are near log(K/k))


# ------------------------------------------------------------------------------------------ building
def build_adapters(model: nn.Module, cfg) -> AdapterSet:
    """Wrap the model's MoE blocks (experts: pretrained) or put LoRA-expert pools on the target modules
    (experts: lora); optionally a plain LoRA on attention."""
    a = cfg.algorithm
    ctx = attach_context(model)
    blocks = find_moe_blocks(model)
    mode = a.experts if a.experts != "auto" else ("pretrained" if blocks else "lora")
    modules: dict[str, nn.Module] = {}
    if mode == "pretrained":
        if not blocks:
            other = unsupported_moe_blocks(model)
            found = f"; it has MoE blocks of unsupported classes {other}" if other else " (it is a dense model)"
            raise UserError(
                f"algorithm.experts=pretrained needs a sparse-MoE model (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE), but "
                f"model {cfg.model.name} has no supported MoE block{found}; use algorithm.experts=lora"
            )
        if a.dispatch != "dense":
            raise UserError(
                f"algorithm.dispatch={a.dispatch} chooses how the LoRA-expert pools of experts=lora compute; "
                f"model {cfg.model.name} has MoE blocks, whose pretrained experts always run only the selected "
                f"ones; remove algorithm.dispatch (or use algorithm.experts=lora)"
            )
        bad = [m for m in a.target_modules if m not in EXPERT_PROJECTIONS]
        if bad:
            raise UserError(
                f"algorithm.target_modules={a.target_modules}: on the experts of {cfg.model.name} only "
                f"{list(EXPERT_PROJECTIONS)} can be adapted (got {bad}); for attention use lora_on_attention=true"
            )
        projections = tuple(m.removesuffix("_proj") for m in a.target_modules)
        # the routed layers compute their own load-balancing loss; the library's needs its router hooks
        model.config.output_router_logits = False
        for path, block in blocks.items():
            layer = SparseMoELoRA(block, a.rank, a.alpha, a.dropout, ctx, projections, a.train_router)
            model.set_submodule(path, layer)
            modules[path] = layer
    else:
        pool = lambda path, linear: LoRAExpertPool(linear, a.num_experts, a.top_k, a.rank, a.alpha, a.dropout, ctx,
                                                   a.dispatch)
        modules.update(inject(model, a.target_modules, pool).modules)
    if a.rescaler_granularity == "client":
        share_rescaler([m for m in modules.values() if isinstance(m, RoutedExperts)])
    if a.lora_on_attention:
        plain = lambda path, linear: LoRALinear(linear, a.rank, a.alpha, a.dropout)
        modules.update(inject(model, list(ATTENTION_PROJECTIONS), plain).modules)
    return AdapterSet(model, modules)


def rescaler_key(path: str) -> str:
    """The state key of the rescaler log s of the routed layer at `path`."""
    return state_key(path, RESCALER, "log_s")


def is_rescaler(key: str) -> bool:
    return parse_key(key).expert == RESCALER


def is_expert(key: str) -> bool:
    return parse_key(key).expert.isdigit()


class RoutedLayers:
    """The routed layers of an adapted model, with the per-client knobs: k, the rescaler, the counts."""

    def __init__(self, adapters: AdapterSet):
        self.adapters = adapters
        self.layers: dict[str, RoutedExperts] = {p: m for p, m in adapters if isinstance(m, RoutedExperts)}
        first = next(iter(self.layers.values()))
        self.ctx, self.K, self.M = first.ctx, first.K, first.M
        self.mode = "pretrained" if isinstance(first, SparseMoELoRA) else "lora"

    def set_k(self, k: int) -> None:
        for layer in self.layers.values():
            layer.set_active_experts(k)

    # rescaler: stored as log_s under `{path}/rescaler/log_s`
    def rescaler_keys(self) -> list[str]:
        return [rescaler_key(p) for p in self.layers]

    def set_log_s(self, values: dict[str, float]) -> None:
        """Set log s per layer from {rescaler key: value}; missing keys mean s = 1."""
        with torch.no_grad():
            for path, layer in self.layers.items():
                layer.log_s.fill_(float(values.get(rescaler_key(path), 0.0)))

    def log_s(self) -> dict[str, float]:
        return {rescaler_key(p): float(layer.log_s) for p, layer in self.layers.items()}

    def rescaler_parameters(self) -> list[nn.Parameter]:
        return list({id(m.log_s): m.log_s for m in self.layers.values()}.values())

    def trainable(self) -> list[nn.Parameter]:
        """LoRA factors and trained routers of every module (its `trainable_parameters` but the rescaler, which
        trains in a group of its own), each parameter once."""
        params: dict[int, nn.Parameter] = {}
        for _, module in self.adapters:
            params.update({id(p): p for (expert, _), p in module.trainable_parameters().items() if expert != RESCALER})
        return list(params.values())

    # activity: a_i^{l,j} and S_i
    def reset_activity(self) -> None:
        self.ctx.reset()
        for layer in self.layers.values():
            layer.reset_counts()

    def counts(self) -> dict[str, list[int]]:
        return {p: [int(round(c)) for c in layer.counts.tolist()] for p, layer in self.layers.items()}

    def aux_loss(self, coef: float):
        """The hook for the training loop: coef * mean load-balancing loss of the pass just run."""
        def extra() -> torch.Tensor | None:
            losses, self.ctx.aux_losses = self.ctx.aux_losses, []
            return coef * torch.stack(losses).mean() if losses else None
        return extra

    def routers_trained(self) -> bool:
        return any(layer.router_trainable for layer in self.layers.values())

    @torch.no_grad()
    def mass_ratios(self, model: nn.Module, batch: dict) -> dict[str, float]:
        """Per layer, the mean over real tokens of sum_{top-K} p / sum_{top-k} p, with s = 1."""
        self.set_log_s({})
        self.ctx.measure_mass = True
        try:
            model.eval()
            model(**batch)
        finally:
            self.ctx.measure_mass = False
        return {p: layer.mass_ratio for p, layer in self.layers.items()}


# --------------------------------------------------------------------------------------- aggregation
def log_gamma(count: float, total: float, num_examples: int, t: float) -> float:
    """log gamma_i = t log(a_i / S_i) + log |D_i|; -inf when the client never activated the expert (t > 0).
    With t = 0, gamma_i = |D_i| whatever a_i is (data-size FedAvg; 0^0 = 1)."""
    if t == 0:
        return math.log(num_examples)
    if count <= 0 or total <= 0:
        return -math.inf
    return t * math.log(count / total) + math.log(num_examples)


def normalised_weights(log_gammas: list[float]) -> list[float] | None:
    """gamma_i / sum gamma, from log gamma without underflow; None when every gamma is zero."""
    top = max(log_gammas)
    if top == -math.inf:
        return None
    w = [math.exp(g - top) for g in log_gammas]
    total = math.fsum(w)
    return [x / total for x in w]


def aggregate_experts(
    global_state: dict[str, torch.Tensor],
    replies: dict[int, Reply],
    t: float,
    normaliser: str,
    combine: Callable[[list[tuple[dict[str, torch.Tensor], float]]], dict[str, torch.Tensor]] = weighted_mean,
    keep_unactivated: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """FLAME's activation-aware aggregation of every expert tensor, plus data-size FedAvg of every other
    global tensor. A client that did not upload an expert contributes the global copy it received (it
    never routed a token there, so that copy is what it holds). `combine` merges (tensors, weight) pairs:
    the weighted mean (float64, normalised per key), or a robust rule that ignores the weights, applied to
    the clients with gamma > 0. Returns the new state and counts of experts updated / kept; an expert that
    no replying client activated (sum gamma = 0) keeps its value, or, with `keep_unactivated` false, is left
    out of the result (the server optimiser then takes no step on it)."""
    clients = sorted(replies)
    totals = {c: float(replies[c].extra["tokens" if normaliser == "tokens" else "steps"]) for c in clients}
    by_expert: dict[tuple[str, str], list[str]] = defaultdict(list)
    others: list[str] = []
    for k in global_state:
        key = parse_key(k)
        (by_expert[(key.module, key.expert)] if key.expert.isdigit() else others).append(k)

    new: dict[str, torch.Tensor] = {}
    updated = kept = 0
    for (module, expert), keys in by_expert.items():
        gammas = [log_gamma(replies[c].extra["counts"][module][int(expert)], totals[c], replies[c].num_examples, t)
                  for c in clients]
        weights = normalised_weights(gammas)
        if weights is None:  # no replying client routed a token to this expert: keep the previous value
            kept += 1
            if keep_unactivated:
                new.update({k: global_state[k] for k in keys})
            continue
        updated += 1
        new.update(combine([({k: replies[c].tensors.get(k, global_state[k]) for k in keys}, w)
                            for c, w in zip(clients, weights) if w > 0]))
    if others:
        new.update(combine([({k: r.tensors[k] for k in others}, float(r.num_examples)) for r in replies.values()]))
    return new, {"experts_updated": updated, "experts_kept": kept}


def counts_within_tokens(extra: dict) -> str | None:
    """a_i^{l,j} <= S_i (a token reaches an expert at most once per layer) and sum_j a_i^{l,j} <= k S_i."""
    tokens, k = extra["tokens"], extra["k"]
    for module, counts in extra["counts"].items():
        if max(counts, default=0) > tokens or sum(counts) > k * tokens:
            return (f"extra.counts[{module!r}] routes more tokens than the {tokens} it trained on with k={k} "
                    f"(max {max(counts)}, sum {sum(counts)})")
    return None


# ---------------------------------------------------------------------------------------------- FLOPs
def flops_per_token(model: nn.Module, layers: RoutedLayers, k: int) -> dict[str, float]:
    """Analytic matmul FLOPs per token at k active experts (attention scores excluded).

    forward = 2 * (P_dense + P_router + k * P_expert + P_lora(k)), where P_dense counts every frozen linear
    weight outside the routed experts (attention, dense MLPs, lm_head), P_expert the weights of one expert in
    every MoE layer, and P_lora the LoRA factors a token passes through. Training costs about one more
    forward for the frozen path (input gradients only) and two more for the LoRA path (input and weight
    gradients): train = 2 * 2 * (P_dense + P_router + k * P_expert) + 3 * 2 * P_lora(k)."""
    dense = router = expert = lora = 0
    for layer in layers.layers.values():
        if isinstance(layer, SparseMoELoRA):
            router += layer.M * layer.router.weight.shape[1]
            expert += layer.experts.gate_up_proj[0].numel() + layer.experts.down_proj[0].numel()
            lora += k * sum(layer.rank * (d_out + d_in) for d_out, d_in in (layer.dims[m] for m in layer.projections))
        else:  # a dense pool; its frozen base is counted below with the other linear layers
            d_in, d_out = layer.base.in_features, layer.base.out_features
            router += layer.M * d_in
            lora += k * layer.rank * (d_in + d_out)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):  # attention, dense MLPs, shared experts, lm_head, bases of adapters
            dense += mod.weight.numel()
        elif isinstance(mod, LoRALinear):
            lora += mod.A.numel() + mod.B.numel()
    frozen = dense + router + k * expert
    return {"forward": 2.0 * (frozen + lora), "train": 4.0 * frozen + 6.0 * lora}


# -------------------------------------------------------------------------------------------- server
class Server(Strategy):
    headline = GLOBAL

    def __init__(self, cfg, adapters: AdapterSet):
        self.layers = RoutedLayers(adapters)
        super().__init__(cfg, adapters)
        self.K = self.layers.K
        self.tiers = assign_tiers(cfg, self.K)  # k_i per client id; UserError (exit 2) for k outside 1..K
        self.client_log_s: dict[int, dict[str, float]] = {}  # latest rescaler each client reported
        self.activity: list[dict] = []  # the last round's per-client activations (for activations.jsonl)
        self.comm = {"upload_bytes": 0, "upload_bytes_skipped": 0}
        self._round_facts: list[dict] = []
        levels = sorted(set(self.tiers) | {self.K}, reverse=True)
        self.flops = {k: flops_per_token(adapters.model, self.layers, k) for k in levels}
        self.server_opt = ServerOptimizer(cfg.algorithm.server_opt)

    def initial_state(self, adapters):
        return {k: v for k, v in adapters.init_state(self.cfg.federation.seed).items() if not is_rescaler(k)}

    # rescaler statistics per tier ----------------------------------------------------------------
    def tier_log_s(self, k: int) -> dict[str, float] | None:
        """log of the tier's rescaler for clients and tier-wise evaluation: the mean of s over the clients
        of tier k (learned), K/k (fixed) or 1 (none); None while no client of tier k has trained (learned)."""
        a = self.cfg.algorithm
        if a.rescaler == "none" or k == self.K and a.rescaler_full_k == "frozen":
            return {}
        if a.rescaler == "fixed":
            return {key: math.log(self.K / k) for key in self.layers.rescaler_keys()}
        members = [v for c, v in self.client_log_s.items() if self.tiers[c] == k]
        if not members:
            return None
        return {key: math.log(sum(math.exp(m[key]) for m in members) / len(members)) for key in members[0]}

    # training -------------------------------------------------------------------------------------
    def configure_train(self, rnd, clients, evaluate):
        base = self.train_config(rnd, evaluate)
        plans = {}
        for c in clients:
            k = self.tiers[c]
            plans[c] = Payload(self.global_state, {**base, "k": k, "tier_log_s": self.tier_log_s(k)})
        return plans

    def aggregate_train(self, rnd, replies):
        a = self.cfg.algorithm
        full = state_bytes(self.global_state)
        self._round_facts, self.activity = [], []
        for c, r in sorted(replies.items()):
            log_s = {k: float(v) for k, v in r.tensors.items() if is_rescaler(k)}
            if a.rescaler == "learned":
                self.client_log_s[c] = log_s
            sent = state_bytes({k: v for k, v in r.tensors.items() if not is_rescaler(k)})
            self.comm["upload_bytes"] += sent
            self.comm["upload_bytes_skipped"] += full - sent
            experts = sum(1 for k in r.tensors if is_expert(k))
            self._round_facts += [
                {"client": c, "metric": "k", "value": self.tiers[c]},
                {"client": c, "metric": "upload_bytes", "value": sent},
                {"client": c, "metric": "upload_bytes_skipped", "value": full - sent},
                {"client": c, "metric": "expert_tensors_uploaded", "value": experts},
            ]
            if log_s:
                s = [math.exp(v) for v in log_s.values()]
                self._round_facts.append({"client": c, "metric": "rescaler_s_mean", "value": sum(s) / len(s)})
            self.activity.append({"client": c, "k": self.tiers[c], "tokens": r.extra["tokens"],
                                  "steps": r.extra["steps"], "counts": r.extra["counts"]})
        global_only = {c: Reply({k: v for k, v in r.tensors.items() if not is_rescaler(k)}, r.num_examples,
                                extra=r.extra) for c, r in replies.items()}
        mean, info = aggregate_experts(self.global_state, global_only, a.temperature, a.freq_normaliser,
                                       self.average, keep_unactivated=False)
        # x_{t+1} = opt(x_t, aggregate): Δ per (layer, expert) is the gamma-weighted mean minus x_t; an expert
        # nobody activated is not in `mean`, so it keeps its value and its moments (baselines.md §3.5)
        self.global_state = self.server_opt.step(self.global_state, mean)
        return info

    def reply_spec(self, cid, payload):
        """The tensors it was sent (any subset: idle experts are skipped) plus its rescaler statistics."""
        return {**super().reply_spec(cid, payload),
                **{key: ((1,), torch.float32) for key in self.layers.rescaler_keys()}}

    def reply_rules(self, cid, payload):
        """Every routed layer's log s (within +-LOG_S_BOUND), every non-expert tensor, any subset of the
        experts; extra: k and steps as sent, the tokens S_i and the counts a_i^{l,j} (each at most S_i, at
        most k S_i per layer), none beyond what `steps` batches of `train.max_length` tokens hold."""
        spec, cfg, t = self.reply_spec(cid, payload), payload.config, self.cfg.train
        rescalers = frozenset(self.layers.rescaler_keys())
        most = cfg["steps"] * t.batch_size * t.max_length
        count = Integer(0, most)
        return ReplyRules(
            spec, required=frozenset(k for k in spec if not is_expert(k)), statistics=rescalers,
            ranges=dict.fromkeys(rescalers, (-LOG_S_BOUND, LOG_S_BOUND)),
            extra={"k": Equal(cfg["k"]), "steps": Equal(cfg["steps"]), "tokens": count,
                   "counts": MapOf(frozenset(self.layers.layers), ListOf(count, self.layers.M))},
            relations=(counts_within_tokens,))

    def round_records(self, rnd):
        return self._round_facts

    def artifacts(self, rnd):
        if rnd == 0:
            return {}
        return {"activations.jsonl": {"clients": self.activity}}

    # evaluation -----------------------------------------------------------------------------------
    def configure_evaluate(self, rnd, clients):
        mode = self.cfg.algorithm.tier_eval
        lower = sorted({k for k in self.tiers if k < self.K}, reverse=True)
        plans = {}
        for c in clients:
            own_only = mode == "budget" and self.tiers[c] < self.K  # only the model this client can run
            evals = [] if own_only else [{"label": GLOBAL, "k": self.K, "log_s": {}}]
            tiers = lower if mode == "all" else [self.tiers[c]] if mode in ("own", "budget") and self.tiers[c] < self.K else []
            for k in tiers:
                log_s = self.tier_log_s(k)
                if log_s is not None:
                    evals.append({"label": f"{GLOBAL}_k{k}", "k": k, "log_s": log_s})
            plans[c] = Payload(self.global_state, {"round": rnd, "evaluations": evals})
        return plans

    # export ---------------------------------------------------------------------------------------
    def active_experts(self, cid: int | None = None) -> int:
        """k of client `cid`'s model (its tier), or K for the global model."""
        return self.K if cid is None else self.tiers[cid]

    def export_state(self, cid=None, client_state=None):
        """The global experts and routers with the model's rescaler: s = 1 for the global model (k = K);
        for client `cid` (at k_i) its own learned rescaler, else its tier's (`tier_log_s`), else s = 1."""
        log_s: dict[str, float] = {}
        if cid is not None:
            own = {k: float(v) for k, v in (client_state.tensors if client_state else {}).items() if is_rescaler(k)}
            log_s = own or self.tier_log_s(self.tiers[cid]) or {}
        rescaler = {k: torch.tensor([log_s.get(k, 0.0)]) for k in self.layers.rescaler_keys()}
        return {**self.global_state, **rescaler}

    def summary_extra(self):
        flops_K = self.flops[self.K]["forward"]
        return {"flame": {
            "experts": self.layers.mode,
            "num_experts": self.layers.M,
            "K": self.K,
            "tiers": self.tiers,
            "flops_per_token": {str(k): {"forward_gflops": f["forward"] / 1e9, "train_gflops": f["train"] / 1e9,
                                         "forward_ratio_to_K": f["forward"] / flops_K}
                                for k, f in self.flops.items()},
            "communication": dict(self.comm),
            "tier_rescaler_s": {str(k): [math.exp(v) for v in s.values()]
                                for k in sorted(set(self.tiers)) if (s := self.tier_log_s(k))},
        }}

    # checkpoints ----------------------------------------------------------------------------------
    def state_dict(self):
        meta = {"client_log_s": {str(c): v for c, v in self.client_log_s.items()}, "comm": self.comm}
        moments = {OPT_PREFIX + k: v for k, v in self.server_opt.state_dict().items()}
        return {**self.global_state, **moments}, meta

    def load_state_dict(self, tensors, meta):
        self.global_state = {k: v for k, v in tensors.items() if not k.startswith(OPT_PREFIX)}
        self.server_opt.load_state_dict({k[len(OPT_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPT_PREFIX)})
        self.client_log_s = {int(c): v for c, v in meta.get("client_log_s", {}).items()}
        self.comm = dict(meta.get("comm", self.comm))


# -------------------------------------------------------------------------------------------- client
class Client(ClientProcedure):
    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.layers = RoutedLayers(runtime.adapters)

    def _first_batch(self, cid: int, state: ClientState) -> dict:
        """The batch local training will start with, without its labels (the client's stream is not advanced:
        `state` keeps its cursor)."""
        rt = self.runtime
        batch = client_batches(rt.data(cid), self.cfg, state.meta.get("cursor"), rt.tokenizer.pad_token_id,
                               rt.device).next()
        batch.pop("labels")
        return batch

    def _initial_log_s(self, cid: int, k: int, payload: Payload, state: ClientState) -> dict[str, float]:
        """The client's rescaler for this round: its own (learned, persisted), else its tier's average,
        else the measured probability-mass ratio (or 1); fixed: K/k; none: 1."""
        a, L = self.cfg.algorithm, self.layers
        if a.rescaler != "learned":
            return payload.config["tier_log_s"]
        own = {key: float(v) for key, v in state.tensors.items() if is_rescaler(key)}
        if own:
            return own
        if payload.config["tier_log_s"] is not None:
            return payload.config["tier_log_s"]
        if a.rescaler_init == "one" or k == L.K:
            return {}
        ratios = L.mass_ratios(self.runtime.model, self._first_batch(cid, state))
        if a.rescaler_granularity == "client":
            mean = sum(ratios.values()) / len(ratios)
            ratios = dict.fromkeys(ratios, mean)
        return {rescaler_key(p): math.log(r) for p, r in ratios.items()}

    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt, a, L = self.runtime, self.cfg.algorithm, self.layers
        cfg, k = payload.config, payload.config["k"]
        rt.adapters.load(payload.tensors)
        L.set_k(k)
        L.set_log_s(self._initial_log_s(cid, k, payload, state))
        groups = [{"params": L.trainable()}]
        if a.rescaler == "learned" and (k < L.K or a.rescaler_full_k == "learned"):
            groups.append({"params": L.rescaler_parameters(), "lr_scale": a.rescaler_lr_scale})
        L.reset_activity()
        extra = L.aux_loss(a.router_aux_loss_coef) if L.routers_trained() else None
        # FedProx on the LoRA factors and routers (not the client's own rescaler), anchored at the global copy
        prox = proximal_hook(groups[0]["params"], a.prox_mu) if a.prox_mu > 0 else None
        stats = rt.train(cid, state, groups, cfg["lr"], cfg["steps"], extra_loss=extra, before_step=prox)
        counts = L.counts()
        log_s = {key: torch.tensor([v]) for key, v in L.log_s().items()}
        if a.rescaler == "learned":
            state.tensors = dict(log_s)  # the rescaler stays on the client between rounds
        out = {}
        for key_, v in rt.adapters.state().items():
            key = parse_key(key_)
            if is_rescaler(key_) or (a.skip_unactivated_upload and key.expert.isdigit()
                                     and counts[key.module][int(key.expert)] == 0):
                continue
            out[key_] = v
        out.update(log_s)  # for the server's per-tier statistics
        return Reply(out, rt.data(cid).num_train_examples, stats,
                     extra={"k": k, "tokens": L.ctx.tokens, "steps": cfg["steps"], "counts": counts})

    def evaluate(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt, L = self.runtime, self.layers
        rt.adapters.load(payload.tensors)
        evals = []
        for e in payload.config["evaluations"]:
            L.set_k(e["k"])
            L.set_log_s(e["log_s"])
            evals += rt.evaluate(cid, e["label"])
        return Reply(evals=evals)
