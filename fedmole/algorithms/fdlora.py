"""FDLoRA: dual LoRA with adaptive fusion (Qi et al., arXiv 2406.07925; baselines.md §2.8, as run by the
FedAMoLE reference for its Table 1).

Every client holds two LoRA adapters of the same shape: the *shared* one, which is trained and uploaded every
round, and a *private* one, which never leaves the client (`ClientState.tensors`).

- Round 1 (`warmup_round`, FDLoRA's round "−1"): purely local training from the seeded initial LoRA, then plain
  averaging.
- Every round: the client loads the global shared adapter and trains it (the reference uses AdamW:
  `train.optimizer: adamw`). In the reference's rounds u = 0, 1, ... (our round 2, 3, ... after the warm-up) with
  u % `sync_freq` == 0, the trained shared adapter is snapshotted as the client's private adapter.
- Server: the outer optimiser `server_opt` (default SGD, lr 1, momentum 0.5, Nesterov) steps on the
  pseudo-gradient mean_c(global − local_c).
- Adaptive fusion, when a client receives a global adapter G for evaluation: two weights w = (w0, w1) in
  [−bound, bound]² minimise the mean loss over `fusion_batches` aux batches of the fused adapter
  w0·G + w1·P (applied to A and B separately) plus `fusion_l1`·mean|w|. The search is derivative-free:
  scipy's bounded Nelder–Mead from the simplex {0, e0, e1} (w = 0, pure shared, pure private), stopped after
  `fusion_budget` objective evaluations; the best point evaluated wins. (The reference uses Nevergrad's NGOpt
  with budget 5 from w = 0; Nevergrad is not a dependency here.)

Evaluation: `global` is G alone; `personalized` is the fused adapter (the method's headline). A client without a
private adapter yet, or without aux examples to search on, uses G as its personalised model. The chosen
weights are kept in the client state (`meta["fusion"]`, checkpointed) and define the client's exported adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize

from fedmole.algorithms.base import GLOBAL, PERSONALIZED, ClientProcedure
from fedmole.algorithms.fedit import build_adapters
from fedmole.algorithms.lora_common import LoRAServer, train_lora
from fedmole.client.evaluate import sequence_ce
from fedmole.messages import ClientState, Payload, Reply

__all__ = ["Server", "Client", "build_adapters", "fuse", "fusion_search"]


def fuse(shared: dict, private: dict, w) -> dict:
    """w0·shared + w1·private, tensor by tensor (A and B separately)."""
    return {k: float(w[0]) * shared[k] + float(w[1]) * private[k] for k in shared}


def fusion_search(objective: Callable[[np.ndarray], float], budget: int, bound: float) -> tuple[np.ndarray, float]:
    """Bounded Nelder–Mead over w in [-bound, bound]² from the simplex {0, s·e0, s·e1} (s = min(1, bound)),
    at most `budget` evaluations of `objective`; returns the best point evaluated and its value."""
    seen: list[tuple[float, tuple[float, float]]] = []

    def counted(w: np.ndarray) -> float:
        if len(seen) >= budget:  # past the budget: refuse without evaluating
            return float("inf")
        value = float(objective(w))
        seen.append((value, (float(w[0]), float(w[1]))))
        return value

    s = min(1.0, bound)
    minimize(counted, x0=np.zeros(2), method="Nelder-Mead", bounds=[(-bound, bound)] * 2,
             options={"maxfev": budget, "initial_simplex": np.array([[0.0, 0.0], [s, 0.0], [0.0, s]])})
    value, w = min(seen)
    return np.array(w), value


class Server(LoRAServer):
    headline = PERSONALIZED

    def warmup(self, rnd: int) -> bool:
        return self.cfg.algorithm.warmup_round and rnd == 1

    def syncs(self, rnd: int) -> bool:
        """Whether clients snapshot their trained shared adapter as the private one this round."""
        u = rnd - (2 if self.cfg.algorithm.warmup_round else 1)  # the reference's round index
        return u >= 0 and u % self.cfg.algorithm.sync_freq == 0

    def configure_train(self, rnd, clients, evaluate):
        config = {**self.train_config(rnd, evaluate), "sync": self.syncs(rnd)}
        return {c: Payload(self.global_state, config) for c in clients}

    def aggregate_train(self, rnd, replies):
        weights = self.weights(replies)
        mean = self.average([(r.tensors, weights[c]) for c, r in replies.items()])
        if self.warmup(rnd):
            self.global_state = {k: v.to(self.global_state[k].dtype) for k, v in mean.items()}
        else:
            self.global_state = self.server_step(self.global_state, mean)
        return {"synced": int(self.syncs(rnd))}

    def export_state(self, cid=None, client_state=None):
        if cid is None or client_state is None or "fusion" not in client_state.meta:
            return dict(self.global_state)
        return fuse(self.global_state, client_state.tensors, client_state.meta["fusion"])


class Client(ClientProcedure):
    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        rt.adapters.load(payload.tensors)
        stats, _ = train_lora(self, cid, state, list(rt.adapters.parameters().values()), payload.config)
        shared = rt.adapters.state()
        if payload.config["sync"]:
            state.tensors = dict(shared)  # the private adapter
        return Reply(shared, rt.data(cid).num_train_examples, stats)

    def evaluate(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        rt = self.runtime
        rt.adapters.load(payload.tensors)
        evals = rt.evaluate(cid, GLOBAL)
        batches = self.aux_batches(cid)
        if not state.tensors or not batches:
            # no private adapter yet: the personalised model is the global one (evaluated once when both are asked)
            return Reply(evals=evals + (rt.relabel(evals, PERSONALIZED) if evals else rt.evaluate(cid, PERSONALIZED)))
        w, _ = fusion_search(lambda w: self.fusion_objective(payload.tensors, state.tensors, w, batches),
                                 self.cfg.algorithm.fusion_budget, self.cfg.algorithm.fusion_bound)
        state.meta["fusion"] = [float(w[0]), float(w[1])]
        rt.adapters.load(fuse(payload.tensors, state.tensors, w))
        return Reply(evals=evals + rt.evaluate(cid, PERSONALIZED))

    def aux_batches(self, cid: int) -> list[list[dict]]:
        """The first `fusion_batches` batches of the client's aux split (fixed for the whole search)."""
        aux, bs = self.runtime.data(cid).aux, self.cfg.train.batch_size
        n = min(len(aux), self.cfg.algorithm.fusion_batches * bs)
        return [aux[i : i + bs] for i in range(0, n, bs)]

    @torch.no_grad()
    def fusion_objective(self, shared: dict, private: dict, w, batches) -> float:
        """Mean over the aux batches of the token-mean CE of the fused adapter, + fusion_l1 * mean|w|."""
        rt = self.runtime
        rt.adapters.load(fuse(shared, private, w))
        rt.model.eval()
        losses = []
        for batch in batches:
            ce, tokens = sequence_ce(rt.model, batch, rt.tokenizer.pad_token_id, rt.device)
            losses.append(float(ce.sum() / tokens.sum().clamp(min=1)))
        return sum(losses) / len(losses) + self.cfg.algorithm.fusion_l1 * float(np.abs(w).mean())
