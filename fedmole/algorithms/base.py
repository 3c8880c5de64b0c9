"""The engine-free algorithm interface.

A federated method is two small halves that never import Flower, threads, sockets or files:

- a server `Strategy`: holds the global state; plans a round (`configure_train`: which client gets which
  payload), merges the replies (`aggregate_train`), and plans the evaluation of a global model
  (`configure_evaluate`);
- a client `ClientProcedure`: trains locally on a payload and replies (`train`), or evaluates a payload
  (`evaluate`), using the `ClientRuntime` of the machine it runs on and the client's persistent `ClientState`.

Everything that travels is a `Payload` (server -> client) or a `Reply` (client -> server), defined in
fedmole/messages.py below both halves: flat tensor dicts keyed by `"{module}/{expert}/{name}"` plus JSON-able
config/metrics. Engines only move these objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from fedmole.algorithms.aggregate import robust_mean, weighted_mean
from fedmole.algorithms.validate import ReplyRules
from fedmole.client.train import round_lr
from fedmole.config import Config
from fedmole.messages import ClientState, Payload, Reply, Tensors
from fedmole.privacy import warn_if_reproducible

if TYPE_CHECKING:
    from fedmole.adapters import AdapterSet
    from fedmole.client.runtime import ClientRuntime

PERSONALIZED, GLOBAL = "personalized", "global"


class Strategy(ABC):
    """Server half of a method. Subclasses set the class attributes and implement the abstract methods
    (`configure_train`, `aggregate_train`); the rest have defaults a method overrides where it differs."""

    personalized: ClassVar[bool] = False  # clients report a personalised model (after local training)
    has_global: ClassVar[bool] = True  # there is a global model to evaluate
    headline: ClassVar[str] = GLOBAL  # which evaluation the method's papers report

    def __init__(self, cfg: Config, adapters: "AdapterSet"):
        self.cfg = cfg
        self.global_state: Tensors = self.initial_state(adapters)
        warn_if_reproducible(cfg)  # run.log says when the clients' DP noise is reproducible by the server

    def initial_state(self, adapters: "AdapterSet") -> Tensors:
        """The round-0 global state, drawn once on the server from the federation seed."""
        return adapters.init_state(self.cfg.federation.seed)

    def train_config(self, rnd: int, evaluate: bool) -> dict:
        """Instructions common to every client of a round."""
        return {"round": rnd, "lr": round_lr(self.cfg.train, rnd, self.cfg.federation.rounds),
                "steps": self.cfg.train.local_steps, "eval_personalized": evaluate and self.personalized}

    @abstractmethod
    def configure_train(self, rnd: int, clients: list[int], evaluate: bool) -> dict[int, Payload]:
        """Plan a training round: the payload of each of the round's clients."""

    @abstractmethod
    def aggregate_train(self, rnd: int, replies: dict[int, Reply]) -> dict:
        """Merge replies into the global state; returns JSON-able facts about the round for the log."""

    def average(self, contributions: list[tuple[Tensors, float]]) -> Tensors:
        """Combine client tensors: the weighted mean, or the robust rule of `replies.robust`."""
        rule = self.cfg.replies
        if rule.robust == "mean":
            return weighted_mean(contributions)
        return robust_mean(contributions, rule.robust, rule.trim_ratio)

    def reply_spec(self, cid: int, payload: Payload) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Tensors (name -> (shape, dtype)) this client may upload. Default: exactly those it was sent.
        Methods whose clients upload other tensors (statistics, fresh adapters) extend it."""
        return {k: (tuple(t.shape), t.dtype) for k, t in payload.tensors.items()}

    def reply_rules(self, cid: int, payload: Payload) -> ReplyRules:
        """Everything a reply to `payload` may hold (see `validate.ReplyRules`), checked before any
        accounting or aggregation. Default: every tensor of `reply_spec`, all required; no `extra` fields;
        evaluation results only when the payload asked for them. Methods that accept more or less say so."""
        return ReplyRules(self.reply_spec(cid, payload), evals=bool(payload.config.get("eval_personalized")))

    def round_records(self, rnd: int) -> list[dict]:
        """Per-client facts about the round just aggregated, as metric records
        (`{"client": id, "metric": name, "value": number}`), e.g. experts held per client."""
        return []

    def artifacts(self, rnd: int) -> dict[str, dict]:
        """Structured per-round artefacts: file name -> one JSON record appended to that file in the run
        directory (e.g. `{"assignments.jsonl": {...}}`). Round 0 is asked once before training starts."""
        return {}

    def summary_extra(self) -> dict:
        """Method-specific entries for summary.json (e.g. the final architecture per client)."""
        return {}

    def configure_evaluate(self, rnd: int, clients: list[int]) -> dict[int, Payload]:
        """Payloads for evaluating the global model on `clients`; {} when the method has none."""
        if not self.has_global:
            return {}
        return {c: Payload(self.global_state, {"round": rnd}) for c in clients}

    def export_state(self, cid: int | None = None, client_state: ClientState | None = None) -> Tensors:
        """The adapter tensors of the global model (`cid` None) or of client `cid`'s model, complete as the
        client's adapters would hold them (what an exporter writes). Default: the client's own tensors when
        it keeps any, else the global state."""
        if cid is not None and client_state is not None and client_state.tensors:
            return dict(client_state.tensors)
        return dict(self.global_state)

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> tuple[Tensors, dict]:
        """Everything the next round depends on, as (tensors, JSON-able meta). Keep server randomness
        derived from (seed, round) rather than stateful generators, or put the generator state here."""
        return dict(self.global_state), {}

    def load_state_dict(self, tensors: Tensors, meta: dict) -> None:
        self.global_state = dict(tensors)


class ClientProcedure(ABC):
    """Client half of a method: `train` is its own; `evaluate` defaults to evaluating the payload as the
    global model."""

    def __init__(self, cfg: Config, runtime: "ClientRuntime"):
        self.cfg = cfg
        self.runtime = runtime

    @abstractmethod
    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        """Train locally on the payload (updating `state`, the client's persistent state) and reply."""

    def evaluate(self, cid: int, payload: Payload, state: ClientState) -> Reply:
        """Default: load the payload tensors and evaluate them as the global model."""
        self.runtime.adapters.load(payload.tensors)
        return Reply(evals=self.runtime.evaluate(cid, GLOBAL))
