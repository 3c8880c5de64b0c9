"""FedAMoLE: personalised federated fine-tuning with data-driven heterogeneous mixtures of LoRA experts
(Zhang et al., arXiv 2411.19128; spec: specs/fedamole.md).

Every adapted linear layer carries a shared LoRA expert, a router W_t and a client-specific subset of a
global pool of N domain LoRA experts (`adapters/mole.py`). The server holds the whole pool. Each round:

  dispatch   client c receives, per module, its assigned experts E_c^m (+ the shared expert + W_t^m);
  client     evaluates the dispatched model (label `global`), trains it for `train.local_steps` steps with
             loss CE + lb_weight * sum_m L_lb(m), evaluates it again (label `personalized`: the reported
             model), and, unless this is the last round, computes RSEA embeddings on its aux split:
             t_c^m = W_t^m x_bar and u_{c,e}^m = A_e^m x_bar from the mean layer input x_bar;
  aggregate  W_t and the shared expert are averaged over all replying clients, each domain expert over the
             clients that held it (A and B separately, uniform weights unless `weighting: data_size`), and
             each expert embedding over its holders: u_bar_e;
  RSEA       per module, P = softmax_clients(U_bar T^T / sqrt(r)) and the reverse-selection program
             (`algorithms/rsea.py`) give the next round's E_c^m.

Round 1 uses a random assignment from the same program (scores U(0,1)). Nothing trained stays on a client
between rounds: everything is uploaded and replaced by the averages.

Wire format: replies carry the trained tensors under the usual keys plus the embeddings, as tensors under
the same vocabulary: `{module}/router/t` (r,) for t_c and `{module}/{e}/u` (r,) for u_{c,e}.

Partial participation (`federation.clients_per_round`): the assignment is solved over the round's clients.
A client's data embedding is the latest it uploaded; a client that has not uploaded one yet is represented
by the mean of the known ones. An expert whose holders all failed keeps its previous embedding and weights.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmole.adapters import inject
from fedmole.adapters.mole import ROUTER, SHARED, AMoLELinear
from fedmole.adapters.state import key, parse_key
from fedmole.algorithms import rsea
from fedmole.algorithms.aggregate import client_weights
from fedmole.algorithms.base import GLOBAL, PERSONALIZED, ClientProcedure, Strategy
from fedmole.algorithms.validate import ReplyRules
from fedmole.errors import UserError
from fedmole.messages import ClientState, Payload, Reply

EMBEDDINGS = ("t", "u")  # tensor names of the uploaded RSEA embeddings
RNG_TAG = 0xA301  # stream of the random assignments
EMBED_DP_TAG = 0xE3B  # stream of the embedding-DP noise under dp.noise=seeded


def build_adapters(model, cfg):
    a = cfg.algorithm
    return inject(
        model, a.target_modules,
        lambda path, linear: AMoLELinear(linear, a.num_experts, a.rank, a.alpha, a.dropout, a.top_k, a.shared_expert,
                                         load_balance=a.lb_weight > 0),
    )


Architecture = dict[str, dict[int, list[int]]]  # module -> client -> ascending domain expert ids


class Server(Strategy):
    personalized = True
    headline = PERSONALIZED

    def __init__(self, cfg, adapters):
        super().__init__(cfg, adapters)
        a = cfg.algorithm
        self.modules = list(adapters.modules)  # sorted paths: the module axis of every RSEA array
        self.U_bar = torch.zeros(len(self.modules), a.num_experts, a.rank, dtype=torch.float64)  # latest u_bar_e
        self.T: dict[int, torch.Tensor] = {}  # client -> (modules, r): its latest data embeddings t_c
        self.static: Architecture | None = None  # static_arch: drawn once over every client
        self.arch: dict[int, dict[str, list[int]]] = {}  # client -> module -> experts, as last dispatched
        self._plan: tuple[int, tuple[int, ...], Architecture] | None = None
        self.diagnostics: dict[str, float] = {}  # facts about the last aggregation and assignment (round records)
        self.kept: dict[int, float] = {}  # client -> share of its previous experts it holds again this round
        self.embed_epsilon: dict[int, float] = {}  # client -> epsilon of all its embedding releases so far
        self._epsilon_records: list[dict] = []

    # ----------------------------------------------------------------------------------------- RSEA
    def _bounds(self, clients: int) -> tuple[int, int]:
        a = self.cfg.algorithm
        if a.homogeneous:
            per_client = a.num_experts * a.expert_choices // clients
            return per_client, per_client
        return a.min_experts, a.max_experts

    def _solve(self, P: np.ndarray, clients: list[int]) -> Architecture:
        """P: (modules, N, len(clients)) -> the optimal architecture of every module."""
        lo, hi = self._bounds(len(clients))
        X = rsea.solve_assignment(P, self.cfg.algorithm.expert_choices, lo, hi)  # (modules, N, C) bool
        return {m: rsea.assignment_lists(X[i], clients) for i, m in enumerate(self.modules)}

    def _random(self, draw: int, clients: list[int]) -> Architecture:
        rng = np.random.default_rng([self.cfg.federation.seed, draw, RNG_TAG])
        return self._solve(rsea.random_affinity(rng, (len(self.modules), self.cfg.algorithm.num_experts, len(clients))),
                           clients)

    def _affinities(self, clients: list[int]) -> np.ndarray:
        known = torch.stack(list(self.T.values())).mean(dim=0)  # (modules, r): stand-in for unseen clients
        T = torch.stack([self.T.get(c, known) for c in clients], dim=1)  # (modules, C, r)
        P = rsea.affinity(self.U_bar.numpy(), T.numpy())  # (modules, N, C)
        # how far each expert's distribution over clients is from uniform: C * max_c P (1 uniform, C one-hot)
        self.diagnostics["affinity_peak"] = float((P.max(axis=-1) * P.shape[-1]).mean())
        return P

    def plan(self, rnd: int, clients: list[int]) -> Architecture:
        """The architecture of round `rnd`'s clients: RSEA on the embeddings uploaded so far, or a random
        draw (round 1, `random_dispatch`), or the static draw (`static_arch`)."""
        clients = sorted(clients)
        if self._plan is not None and self._plan[:2] == (rnd, tuple(clients)):
            return self._plan[2]
        a = self.cfg.algorithm
        if a.static_arch:
            if self.static is None:
                self.static = self._random(0, list(range(self.cfg.federation.num_clients)))
            arch = {m: {c: self.static[m][c] for c in clients} for m in self.modules}
        elif a.random_dispatch or not self.T:
            arch = self._random(rnd - 1, clients)
        else:
            arch = self._solve(self._affinities(clients), clients)
        self._plan = (rnd, tuple(clients), arch)
        return arch

    # ------------------------------------------------------------------------------------- rounds
    def _share(self, experts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """The global tensors of one client's architecture: its experts per module + shared + router."""
        out = {}
        for m in self.modules:
            for expert in [*map(str, experts[m]), SHARED, ROUTER]:
                for name in ("A", "B", "W_t"):
                    k = key(m, expert, name)
                    if k in self.global_state:
                        out[k] = self.global_state[k]
        return out

    def configure_train(self, rnd, clients, evaluate):
        arch = self.plan(rnd, clients)
        config = self.train_config(rnd, evaluate)
        a = self.cfg.algorithm
        config["embed"] = a.uses_embeddings and rnd < self.cfg.federation.rounds
        self.kept = {}
        for c in clients:
            new = {m: arch[m][c] for m in self.modules}
            if c in self.arch:
                self.kept[c] = float(np.mean([len(set(new[m]) & set(self.arch[c][m])) / len(self.arch[c][m])
                                              for m in self.modules]))
            self.arch[c] = new
        return {c: Payload(self._share(self.arch[c]), config) for c in clients}

    def reply_spec(self, cid, payload):
        """What a client may upload: the tensors it was sent and, when asked for, its RSEA embeddings
        (`{module}/router/t` and `{module}/{e}/u` for each expert e it holds, each of shape (r,))."""
        spec = super().reply_spec(cid, payload)
        if payload.config.get("embed"):
            r = (self.cfg.algorithm.rank,)
            for m in self.modules:
                spec[key(m, ROUTER, "t")] = (r, torch.float32)
                spec.update({key(m, str(e), "u"): (r, torch.float32) for e in self.arch[cid][m]})
        return spec

    def reply_rules(self, cid, payload):
        """Every tensor it was sent; the embeddings (statistics) all together or none (an empty aux split)."""
        spec = self.reply_spec(cid, payload)
        emb = frozenset(k for k in spec if parse_key(k).name in EMBEDDINGS)
        return ReplyRules(spec, required=frozenset(spec) - emb, together=(emb,) if emb else (), statistics=emb,
                          evals=bool(payload.config.get("eval_personalized")))

    def aggregate_train(self, rnd, replies):
        before = dict(self.global_state)
        weights = client_weights({c: r.num_examples for c, r in replies.items()}, self.cfg.algorithm.weighting)
        params, embeddings = [], []
        for c, reply in replies.items():
            params.append(({k: v for k, v in reply.tensors.items() if parse_key(k).name not in EMBEDDINGS}, weights[c]))
            emb = {k: v for k, v in reply.tensors.items() if parse_key(k).name in EMBEDDINGS}
            if emb:
                embeddings.append((c, emb, weights[c]))
        self.global_state.update(self.average(params))  # experts over their holders, the rest over all
        if embeddings:
            self._update_embeddings(embeddings)
        self._update_norms(before)
        self._account(replies)
        return {}

    def _update_norms(self, before: dict[str, torch.Tensor]) -> None:
        """Diagnostics: the round's relative change |x_new - x_old| / |x_old| of A (domain experts, the
        shared expert) and of the router W_t, and the mean norm of the domain experts' B, over what changed."""
        groups: dict[str, list[float]] = {}
        for k, new in self.global_state.items():
            old = before[k]
            if new is old:
                continue
            m, expert, name = parse_key(k)
            kind = "router" if expert == ROUTER else "shared" if expert == SHARED else "domain"
            if name == "B":
                if kind == "domain":
                    groups.setdefault("B_norm_domain", []).append(float(new.norm()))
                continue
            groups.setdefault(f"update_{name}_{kind}", []).append(float((new - old).norm() / old.norm().clamp(min=1e-12)))
        self.diagnostics.update({k: float(np.mean(v)) for k, v in groups.items()})

    def _account(self, replies) -> None:
        """Compose each client's embedding-DP releases over rounds: the epsilons add up (pure DP)."""
        self._epsilon_records = []
        for c, reply in sorted(replies.items()):
            if "dp_embed_epsilon" in reply.metrics:
                self.embed_epsilon[c] = self.embed_epsilon.get(c, 0.0) + float(reply.metrics["dp_embed_epsilon"])
                self._epsilon_records.append({"client": c, "metric": "dp_embed_epsilon_total",
                                              "value": self.embed_epsilon[c]})

    def _update_embeddings(self, embeddings) -> None:
        index = {m: i for i, m in enumerate(self.modules)}
        u_bar = self.average([({k: v for k, v in emb.items() if k.endswith("/u")}, w) for _, emb, w in embeddings])
        for k, v in u_bar.items():  # u_bar_e over the clients that held e
            m, e, _ = parse_key(k)
            self.U_bar[index[m], int(e)] = v.to(torch.float64)
        for c, emb, _ in embeddings:
            self.T[c] = torch.stack([emb[key(m, ROUTER, "t")].to(torch.float64) for m in self.modules])

    def configure_evaluate(self, rnd, clients):
        """Only the untrained round-0 model (eval.init) is evaluated here; later rounds evaluate the
        dispatched and the personalised model inside the training replies."""
        if rnd != 0:
            return {}
        arch = self.plan(1, clients)
        return {c: Payload(self._share({m: arch[m][c] for m in self.modules}), {"round": 0}) for c in clients}

    # ---------------------------------------------------------------------------------- artefacts
    def _full_participation(self) -> bool:
        return self.cfg.clients_per_round >= self.cfg.federation.num_clients

    def artifacts(self, rnd):
        """assignments.jsonl: the experts each client holds per module in round `rnd` (round 0: the
        initial random draw, which round 1 trains with; written only under full participation)."""
        if rnd == 0:
            if not self._full_participation() and not self.cfg.algorithm.static_arch:
                return {}
            arch = self.plan(1, list(range(self.cfg.federation.num_clients)))
        elif self._plan is None or self._plan[0] != rnd:
            return {}
        else:
            arch = self._plan[2]
        experts = {m: {str(c): ids for c, ids in per_client.items()} for m, per_client in arch.items()}
        return {"assignments.jsonl": {"clients": sorted(next(iter(arch.values()))), "experts": experts}}

    def round_records(self, rnd):
        if self._plan is None or self._plan[0] != rnd:
            return []
        arch = self._plan[2]
        records = list(self._epsilon_records)
        N = self.cfg.algorithm.num_experts
        for c in self._plan[1]:
            counts = [len(arch[m][c]) for m in self.modules]
            for metric, value in (("experts_mean", float(np.mean(counts))), ("experts_min", min(counts)),
                                  ("experts_max", max(counts))):
                records.append({"client": c, "metric": metric, "value": value})
            if c in self.kept:
                # the share of its experts a client keeps, and what a uniformly random re-deal would keep (n/N)
                records += [{"client": c, "metric": "experts_kept", "value": self.kept[c]},
                            {"client": c, "metric": "experts_kept_random", "value": float(np.mean(counts)) / N}]
        records += [{"client": None, "metric": k, "value": v} for k, v in sorted(self.diagnostics.items())]
        self.diagnostics = {}
        return records

    def summary_extra(self):
        out = {"architecture": {str(c): self.arch[c] for c in sorted(self.arch)}}
        a = self.cfg.algorithm
        if a.dp_embeddings:
            eps = {str(c): v for c, v in sorted(self.embed_epsilon.items())}
            out["dp_embeddings"] = {
                "epsilon": eps, "epsilon_max": max(eps.values(), default=0.0), "delta": 0.0,
                "eta": a.dp_eta, "rank": a.rank, "clip": a.dp_embedding_clip, "noise": self.cfg.dp.noise,
                "accounting": "per client, pure eps-DP of every embedding vector it uploaded, summed over "
                              "vectors, modules and rounds; nominal when clip is null (the data sets tau)",
            }
        return out

    def export_state(self, cid=None, client_state=None):
        """Client `cid`'s model: the aggregated shared expert, router and domain experts of the architecture it
        was last dispatched (its locally trained copies are not kept: they are uploaded and averaged). The
        global model (`cid` None) is the whole pool."""
        if cid is None:
            return dict(self.global_state)
        if cid not in self.arch:
            raise UserError(f"client {cid} has not been dispatched any experts up to this checkpoint (it took part "
                            f"in no round yet), so it has no FedAMoLE model to export; choose another client")
        return self._share(self.arch[cid])

    # -------------------------------------------------------------------------------- checkpoints
    def state_dict(self):
        tensors = dict(self.global_state)
        tensors["rsea/U_bar"] = self.U_bar
        for c, t in self.T.items():
            tensors[f"rsea/T/{c}"] = t
        meta = {"static": self.static, "arch": {str(c): a for c, a in self.arch.items()},
                "embed_epsilon": {str(c): v for c, v in self.embed_epsilon.items()}}
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        self.global_state = {k: v for k, v in tensors.items() if not k.startswith("rsea/")}
        self.U_bar = tensors["rsea/U_bar"].to(torch.float64)
        self.T = {int(k.rsplit("/", 1)[1]): v.to(torch.float64) for k, v in tensors.items() if k.startswith("rsea/T/")}
        static = meta.get("static")
        self.static = None if static is None else {m: {int(c): ids for c, ids in per.items()} for m, per in static.items()}
        self.arch = {int(c): a for c, a in meta.get("arch", {}).items()}
        self.embed_epsilon = {int(c): float(v) for c, v in meta.get("embed_epsilon", {}).items()}
        self._plan = None


# ------------------------------------------------------------------------------------------ client
def clip_norm(v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """v (..., r) scaled down to L2 norm at most tau (...,)."""
    return v * (tau / v.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0).unsqueeze(-1)


def privatize(v: torch.Tensor, eta: float, tau: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DP noise on embeddings v (..., r) with clip bounds tau (...,): v is clipped to norm tau (the sensitivity
    bound of the privacy cost; a no-op when tau is the data-derived bound), gets z_i = l_i * s_i with
    l_i ~ Gamma(shape=r, rate=eta) (a sum of r Exp(eta) draws) and s_i ~ U(-1, 1) per coordinate, and the
    noisy vector is clipped to norm tau (the spec's step: post-processing). Noise from `generator`."""
    r = v.shape[-1]
    magnitude = torch.empty(*v.shape, r).exponential_(generator=generator).sum(-1) / eta  # (..., r)
    sign = 2 * torch.rand(v.shape, generator=generator) - 1  # (..., r): U(-1, 1)
    return clip_norm(clip_norm(v, tau) + magnitude * sign, tau)


class Client(ClientProcedure):
    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt, a, cfg = self.runtime, self.cfg.algorithm, payload.config
        rt.adapters.load(payload.tensors)
        evals = []
        if cfg.get("eval_personalized") and a.evaluate_dispatched:
            evals += rt.evaluate(cid, GLOBAL)  # the aggregated experts on this client's architecture
            rt.seed(cfg["round"], cid, "train")  # training draws the same randomness with or without it
        extra = self._load_balance if a.lb_weight > 0 else None
        for mod in rt.adapters.modules.values():
            mod.pop_routing_entropy()
        stats = rt.train(cid, state, list(rt.adapters.parameters().values()), cfg["lr"], cfg["steps"], extra_loss=extra)
        entropy = [h for mod in rt.adapters.modules.values() if (h := mod.pop_routing_entropy()) is not None]
        if entropy:
            stats["router_entropy"] = float(np.mean(entropy))  # diagnostics: mean over modules
        if cfg.get("eval_personalized"):
            evals += rt.evaluate(cid, PERSONALIZED)
        tensors = rt.adapters.state()
        if cfg.get("embed"):
            rt.seed(cfg["round"], cid, "embed")
            emb, tokens, epsilon = self.embeddings(cid, cfg["round"])
            tensors.update(emb)
            stats["embed_tokens"] = tokens
            if a.dp_embeddings:
                stats["dp_embed_epsilon"] = epsilon  # this round's releases; the server composes rounds
        return Reply(tensors, rt.data(cid).num_train_examples, stats, evals)

    def _load_balance(self) -> torch.Tensor | None:
        terms = [t for mod in self.runtime.adapters.modules.values() if (t := mod.pop_load_balance()) is not None]
        return self.cfg.algorithm.lb_weight * torch.stack(terms).sum() if terms else None

    def embeddings(self, cid: int, rnd: int = 0) -> tuple[dict[str, torch.Tensor], int, float]:
        """RSEA embeddings of the locally trained model on the client's aux split (none if it is empty), the
        aux token count, and the epsilon of the release (0 without `dp_embeddings`)."""
        from fedmole.client.embed import layer_input_means
        from fedmole.privacy import noise_generator

        rt, a = self.runtime, self.cfg.algorithm
        aux = rt.data(cid).aux
        if not aux:
            return {}, 0, 0.0
        modules = rt.adapters.modules
        means = layer_input_means(rt.model, modules, aux, min(self.cfg.train.batch_size, len(aux)),
                                  rt.tokenizer.pad_token_id, rt.device)
        gen = noise_generator(self.cfg, rnd, cid, EMBED_DP_TAG) if a.dp_embeddings else None
        out, epsilon = {}, 0.0
        for path, mod in modules.items():
            t, U = (v.cpu() for v in mod.embed(means.mean[path].to(rt.device)))  # (r,), (n, r)
            if a.dp_embeddings:
                t, U, eps = self._privatize(mod, path, means, t, U, gen)
                epsilon += eps  # modules and vectors compose by summing
            out[key(path, ROUTER, "t")] = t
            for i, e in enumerate(mod.held.tolist()):
                out[key(path, str(e), "u")] = U[i]
        return out, means.tokens, epsilon

    def _privatize(self, mod, path, means, t, U, gen):
        """(noisy t, noisy U, the epsilon of releasing them): one release per vector, each with its own tau."""
        from fedmole.privacy import embedding_epsilon

        a = self.cfg.algorithm
        if a.dp_embedding_clip is not None:
            tau_t, tau_u = torch.tensor(a.dp_embedding_clip), torch.full((U.shape[0],), a.dp_embedding_clip)
        else:  # the largest per-batch mean embedding norm, per vector
            xb = means.batch_means[path].to(mod.A.device)  # (batches, d_in)
            tau_t = (xb @ mod.W_t.detach().t()).norm(dim=-1).max().cpu()
            tau_u = torch.einsum("nrd,bd->bnr", mod.A.detach(), xb).norm(dim=-1).amax(dim=0).cpu()  # (n,)
        epsilon = sum(embedding_epsilon(a.rank, a.dp_eta, float(tau)) for tau in [tau_t, *tau_u])
        return privatize(t, a.dp_eta, tau_t, gen), privatize(U, a.dp_eta, tau_u, gen), epsilon
