"""The in-process engine: every simulated client runs in this process on one shared frozen base model.

It only moves payloads: for each planned client it reseeds, runs the client procedure on a working copy of
the client's state, and keeps the copy only when the client succeeded, so a failing client leaves its
persistent state (and the global state, which only the server touches) as it was.
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Callable

from fedmole.algorithms.base import ClientProcedure, ClientState, Payload, Reply

log = logging.getLogger("fedmole")


class InProcessEngine:
    name = "inprocess"

    def __init__(self, procedure: ClientProcedure):
        self.procedure = procedure
        self.runtime = procedure.runtime
        self.states: dict[int, ClientState] = {}
        self.on_client: Callable[[str, int, int], None] | None = None  # (phase, client, round) -> None

    def _run(self, phase: str, rnd: int, plans: dict[int, Payload]) -> tuple[dict[int, Reply], dict[int, str]]:
        replies, failures = {}, {}
        for cid, payload in plans.items():
            if self.on_client is not None:
                self.on_client(phase, cid, rnd)
            state = self.states.get(cid) or ClientState()
            work = ClientState(dict(state.tensors), copy.deepcopy(state.meta))
            self.runtime.seed(rnd, cid, phase)
            try:
                fn = self.procedure.train if phase == "train" else self.procedure.evaluate
                replies[cid] = fn(cid, payload, work)
            except Exception as err:  # noqa: BLE001 - one client's failure must not stop the federation
                failures[cid] = f"{type(err).__name__}: {err}"
                log.warning("client %s failed in round %s (%s): %s", cid, rnd, phase, failures[cid])
                log.debug("%s", traceback.format_exc())
                continue
            self.states[cid] = work
        return replies, failures

    def train(self, rnd: int, plans: dict[int, Payload]):
        return self._run("train", rnd, plans)

    def evaluate(self, rnd: int, plans: dict[int, Payload]):
        return self._run("evaluate", rnd, plans)

    def client_states(self) -> dict[int, ClientState]:
        return self.states

    def load_client_states(self, states: dict[int, ClientState]) -> None:
        self.states = dict(states)

    def close(self) -> None:
        pass
