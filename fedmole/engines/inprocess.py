"""The in-process engine: every simulated client runs in this process on one shared frozen base model.

It only moves payloads: for each planned client it runs `client.execute.execute` on a working copy of the
client's state and keeps the copy only when the client finished its work, so a failing client leaves its
persistent state (and the global state, which only the server touches) as it was. Clients run one after
another; `federation.round_deadline` applies to each client's own wall time, as if they ran in parallel.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

from fedmole.algorithms.base import ClientProcedure, ClientState, Payload, Reply
from fedmole.client.execute import execute

log = logging.getLogger("fedmole")


class InProcessEngine:
    name = "inprocess"

    def __init__(self, procedure: ClientProcedure):
        self.procedure = procedure
        self.runtime = procedure.runtime
        self.deadline = procedure.cfg.federation.round_deadline
        self.states: dict[int, ClientState] = {}
        self.on_client: Callable[[str, int, int], None] | None = None  # (phase, client, round) -> None

    def _run(self, phase: str, rnd: int, plans: dict[int, Payload]):
        replies: dict[int, Reply] = {}
        failures: dict[int, tuple[str, str]] = {}
        for cid, payload in plans.items():
            if self.on_client is not None:
                self.on_client(phase, cid, rnd)
            state = self.states.get(cid) or ClientState()
            work = ClientState(dict(state.tensors), copy.deepcopy(state.meta))
            start = time.monotonic()
            out = execute(self.procedure, phase, cid, payload, work)
            if out.commit:
                self.states[cid] = work
            if out.reply is not None and self.deadline is not None and time.monotonic() - start > self.deadline:
                out.failure = ("late", f"client {cid} took {time.monotonic() - start:.1f} s, past the "
                                       f"{self.deadline} s round deadline")
                out.reply = None
            if out.reply is not None:
                replies[cid] = out.reply
            else:
                failures[cid] = out.failure
                log.warning("round %s: client %s %s (%s): %s", rnd, cid, out.failure[0], phase, out.failure[1])
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
