"""The in-process engine: every simulated client runs in this process on one shared frozen base model.

It only moves payloads: for each planned client it runs `client.execute.execute` on a working copy of the
client's state and keeps the copy only when the client finished its work, so a failing client leaves its
persistent state (and the global state, which only the server touches) as it was. Clients run one after
another; `federation.round_deadline` applies to each client's own wall time, as if they ran in parallel.

Client states live in a `StateStore` on disk (client/store.py) when the engine is given one (a run: the
store is `<run dir>/client_states/`, holding the round's clients in memory), so memory does not grow with the
number of clients; without one (tests, re-evaluation) in a dict. A state is written only when the client
changed it, and a checkpoint links the store's files instead of copying them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fedmole.algorithms.base import ClientProcedure
from fedmole.client.execute import execute
from fedmole.client.store import MemoryStore, StateStore
from fedmole.engines.base import Engine, Failures, Replies
from fedmole.messages import ClientState, Payload

log = logging.getLogger("fedmole")


class InProcessEngine(Engine):
    name = "inprocess"

    def __init__(self, procedure: ClientProcedure, store: StateStore | None = None):
        self.procedure = procedure
        self.runtime = procedure.runtime
        self.deadline = procedure.cfg.federation.round_deadline
        self.states: StateStore | MemoryStore = MemoryStore() if store is None else store
        self.on_client: Callable[[str, int, int], None] | None = None  # (phase, client, round) -> None
        # never called: the clients train in this process, their runtime reports every step (runtime.on_step)
        self.on_steps: Callable[[int, int], None] | None = None

    def _run(self, phase: str, rnd: int, plans: dict[int, Payload]) -> tuple[Replies, Failures]:
        replies: Replies = {}
        failures: Failures = {}
        for cid, payload in plans.items():
            if self.on_client is not None:
                self.on_client(phase, cid, rnd)
            state = self.states.get(cid) or ClientState()
            work = ClientState(dict(state.tensors), copy.deepcopy(state.meta))
            start = time.monotonic()
            out = execute(self.procedure, phase, cid, payload, work)
            if out.commit and (cid not in self.states or changed(state, work)):
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

    def train(self, rnd: int, plans: dict[int, Payload]) -> tuple[Replies, Failures]:
        return self._run("train", rnd, plans)

    def evaluate(self, rnd: int, plans: dict[int, Payload]) -> tuple[Replies, Failures]:
        return self._run("evaluate", rnd, plans)

    def client_states(self) -> Mapping[int, ClientState]:
        return self.states

    def load_client_states(self, states: Mapping[int, ClientState]) -> None:
        """Make `states` the clients' states (resume), one state at a time."""
        self.states.clear()
        for cid in states:
            self.states[cid] = states[cid]

    def save_client_states(self, root: Path) -> None:
        """Every client's state as `root/client-<id>.safetensors` (a checkpoint; links of the store's files)."""
        self.states.link_into(root)

    def close(self) -> None:
        """Drop the clients' states: remove the store's directory (the last checkpoint holds them), or empty the
        in-memory store."""
        self.states.remove()


def changed(before: ClientState, after: ClientState) -> bool:
    """Whether a client's work changed its state. Engines never change a state's tensors in place (a failing
    client must leave its state as it was), so a change is a replaced tensor object or a changed meta."""
    return (before.meta != after.meta or before.tensors.keys() != after.tensors.keys()
            or any(after.tensors[k] is not v for k, v in before.tensors.items()))
