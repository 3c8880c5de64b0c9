"""The client runtime: what a client procedure uses on the machine it runs on.

One frozen base model with the method's adapters injected is shared by every client simulated on the
machine; a client procedure loads its payload into the adapters, trains, evaluates and reads them back.
The runtime also holds the tokenised data of the clients that live here and the round's RNG discipline:
each (round, client, phase) reseeds torch from the federation seed, so results do not depend on the order
clients run in or on which engine runs them.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmole.adapters import AdapterSet
from fedmole.client.data import EncodedClient, encode_client
from fedmole.client.evaluate import evaluate_splits
from fedmole.client.snapshots import Snapshot, Snapshots
from fedmole.client.train import TrainHooks, client_batches, local_train
from fedmole.config import Config
from fedmole.data.partition import ClientData
from fedmole.faults import ClientCrashed
from fedmole.messages import ClientState

PHASES = {"train": 0, "evaluate": 1, "embed": 2}


def derive_seed(*parts: int) -> int:
    """A 32-bit seed determined by the integers `parts` (federation seed, round, client, phase...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class ClientRuntime:
    def __init__(self, cfg: Config, model: nn.Module, tokenizer, adapters: AdapterSet, device: torch.device):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.device = device
        self.clients: dict[int, EncodedClient] = {}
        self.on_step: Callable[[int, float], None] | None = None  # progress display hook
        self.crash_at: int | None = None  # injected fault: raise after this local step
        self.eval_splits: tuple[str, ...] = ("val", "test")  # what `evaluate` covers unless told otherwise
        # `eval.test: selected`: set by `execute` for one message; evaluations then cover val only and keep a
        # snapshot of the evaluated model (client/snapshots.py), tagged with the message's round
        self.snapshots: Snapshots | None = None
        self.round = 0
        self.seconds = {"train": 0.0, "evaluate": 0.0}  # wall time spent in local training and in evaluation

    def add_clients(self, clients: list[ClientData]) -> None:
        for c in clients:
            self.clients[c.client_id] = encode_client(
                c, self.tokenizer, self.cfg.data, self.cfg.train.max_length, self.cfg.eval.max_examples
            )

    def data(self, cid: int) -> EncodedClient:
        return self.clients[cid]

    def seed(self, rnd: int, cid: int, phase: str) -> None:
        torch.manual_seed(derive_seed(self.cfg.federation.seed, rnd, cid, PHASES[phase]))

    # ---------------------------------------------------------------------------------------- training
    def train(
        self,
        cid: int,
        state: ClientState,
        params: list[nn.Parameter] | list[dict],
        lr: float,
        steps: int,
        extra_loss: Callable[[], torch.Tensor | None] | None = None,
        before_step: Callable[[], None] | None = None,
    ) -> dict[str, float]:
        """`steps` local steps on the client's stream, which resumes from `state.meta['cursor']`.
        `params` is a list of parameters or of param groups with an optional `lr_scale` each."""
        batches = client_batches(self.data(cid), self.cfg, state.meta.get("cursor"), self.tokenizer.pad_token_id,
                                 self.device)
        start = time.perf_counter()
        stats = local_train(self.model, params, batches, steps, lr, self.cfg.train,
                            TrainHooks(extra_loss, before_step, self._step_hook))
        self.seconds["train"] += time.perf_counter() - start
        state.meta["cursor"] = batches.stream.cursor
        return stats

    def _step_hook(self, step: int, loss: float) -> None:
        if self.crash_at is not None and step >= self.crash_at:
            raise ClientCrashed(f"client crashed at local step {step} (injected)")
        if self.on_step is not None:
            self.on_step(step, loss)

    # -------------------------------------------------------------------------------------- evaluation
    def evaluate(self, cid: int, model_label: str, splits: tuple[str, ...] | None = None) -> list[dict]:
        """Evaluate the adapters currently loaded on the client's splits (default `eval_splits`), labelled
        `model_label`; [] for a label `eval.models` leaves out. Under the deferred-test protocol (`snapshots`
        set, no explicit `splits`) only val is evaluated and the model is kept as a snapshot. Test results
        carry the per-example outcomes under `examples`."""
        if not self.wants(model_label):
            return []
        deferred = self.snapshots is not None and splits is None
        splits = ("val",) if deferred else splits or self.eval_splits
        data = self.data(cid)
        outcomes: dict[str, list[dict]] = {"test": []} if "test" in splits else {}
        start = time.perf_counter()
        metrics = evaluate_splits(
            self.model, self.tokenizer, {split: getattr(data, split) for split in splits},
            self.cfg.data, self.cfg.train.max_length, self.cfg.eval, self.device, outcomes=outcomes,
        )
        self.seconds["evaluate"] += time.perf_counter() - start
        if deferred:
            self.snapshots.setdefault(model_label, {})[self.round] = Snapshot(self.adapters.state(),
                                                                              self.adapters.settings())
        return [{"model": model_label, "split": split, "metrics": m,
                 **({"examples": outcomes[split]} if split in outcomes else {})} for split, m in metrics.items()]

    def relabel(self, evals: list[dict], model_label: str) -> list[dict]:
        """`evals` of one model reported again under `model_label` (e.g. FDLoRA's personalised model before the
        client has a private adapter is the global one), with its snapshot under the deferred-test protocol."""
        if not self.wants(model_label):
            return []
        if self.snapshots is not None:
            for label in {e["model"] for e in evals}:
                snap = self.snapshots[label][self.round]
                copy = Snapshot({k: v.clone() for k, v in snap.tensors.items()}, dict(snap.settings))
                self.snapshots.setdefault(model_label, {})[self.round] = copy  # stored apart (safetensors)
        return [{**e, "model": model_label} for e in evals]

    def wants(self, model_label: str) -> bool:
        """Whether `eval.models` asks for this model label (null: every label the method evaluates)."""
        wanted = self.cfg.eval.models
        return wanted is None or any(fnmatch.fnmatchcase(model_label, pattern) for pattern in wanted)
