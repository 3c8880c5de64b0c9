"""The engine contract: how the round loop (run.py) reaches the clients.

An engine only moves payloads and replies; the strategy decides what is sent and how replies merge, and the
client procedure what a client does. `InProcessEngine` runs every client in this process; `FlowerEngine`
sends them to Flower nodes. Both offer what `Engine` declares, and run.py uses nothing else of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from fedmole.messages import ClientState, Payload, Reply

Replies = dict[int, Reply]
Failures = dict[int, tuple[str, str]]  # client -> (kind: dropped | crashed | late | failed, message)


class Engine(Protocol):
    name: str  # the engine's name in summary.json
    # progress hooks, set by the round loop (None: nobody listens)
    on_client: Callable[[str, int, int], None] | None  # (phase, client, round): a client's work starts
    # (client, local steps done): a client's training reply arrived. Only engines whose clients train in
    # another process call it; in this process each step reaches the progress display through the runtime
    on_steps: Callable[[int, int], None] | None

    def train(self, rnd: int, plans: dict[int, Payload]) -> tuple[Replies, Failures]:
        """Local training of round `rnd` on every planned client: the replies and the clients that failed."""
        ...

    def evaluate(self, rnd: int, plans: dict[int, Payload]) -> tuple[Replies, Failures]:
        """Evaluation of round `rnd` on every planned client, as `train`."""
        ...

    def client_states(self) -> Mapping[int, ClientState]:
        """Every client's persistent state, by client id."""
        ...

    def load_client_states(self, states: Mapping[int, ClientState]) -> None:
        """Make `states` the clients' states (resume); a client without one starts fresh."""
        ...

    def save_client_states(self, root: Path) -> None:
        """Every client's state as `root/client-<id>.safetensors` (a checkpoint)."""
        ...

    def close(self) -> None:
        """Release what the engine holds for the run; called once when the run ends, however it ends."""
        ...
