"""The FlowerEngine: the engine interface of `InProcessEngine`, with each client on a Flower node.

The round loop (`fedmole.run`) hands the engine one `Payload` per planned client; the engine turns each into
a Flower `Message` for the node that holds that client (`records.py`), sends them through the ServerApp's
`Grid`, and turns the replies back into `Reply`s or failures of a kind in `fedmole.run.FAILURE_KINDS`. No
reply within `federation.round_deadline` is `late`; Flower's error replies are `dropped` (node or message
unavailable), `crashed` (the ClientApp process crashed) or `failed`.

The clients' states live on their nodes: `client_states` gathers them with a `query` message when a checkpoint
is written, so a checkpoint of a Flower run holds every client's state like an in-process one, and
`load_client_states` pushes them back to the nodes on resume.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedmole.client.store import save_states
from fedmole.config import Config
from fedmole.engines.base import Engine
from fedmole.engines.flower.records import (EVALUATE, GET_STATE, HELLO, QUERY, SET_STATE, TRAIN, arrays,
                                            parse_reply, payload_content, tensors_of)
from fedmole.errors import UserError
from fedmole.messages import ClientState, Payload, Reply

log = logging.getLogger("fedmole")

# Flower error codes (flwr.common.constant.ErrorCode) that mean the node or its reply went away
_GONE_CODES = {3, 4, 5}  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE
_CRASHED_CODES = {8}  # CLIENT_APP_CRASHED

STOP = threading.Event()  # set: every FlowerEngine of this process stops waiting (Ctrl-C, simulation ended)


class EngineStopped(RuntimeError):
    """The Flower run was stopped while the server waited for replies."""


class FlowerEngine(Engine):
    """The engine interface of `InProcessEngine` on top of a Flower `Grid`."""

    def __init__(self, grid: Grid, cfg: Config, name: str = "flower-sim", connect_timeout: float | None = None):
        self.grid = grid
        self.cfg = cfg
        self.name = name
        self.deadline = cfg.federation.round_deadline
        self.states: dict[int, ClientState] = {}
        self.on_client: Callable[[str, int, int], None] | None = None  # (phase, client, round) -> None
        self.on_steps: Callable[[int, int], None] | None = None  # (client, local steps done) -> None
        self.poll_interval = 0.1  # seconds between polls for replies
        timeout = cfg.flower.connect_timeout if connect_timeout is None else connect_timeout
        self.node_of = self.discover(timeout)

    # ------------------------------------------------------------------------------ transport
    def _exchange(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """`Grid.send_and_receive`, but it gives up when `STOP` is set (so a stopped simulation's server
        thread ends instead of waiting forever)."""
        ids = {i for i in self.grid.push_messages(msgs) if i}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while ids:
            if STOP.is_set():
                raise EngineStopped("the Flower run was stopped while waiting for replies")
            got = list(self.grid.pull_messages(ids))
            replies += got
            ids -= {r.metadata.reply_to_message_id for r in got}
            if not ids or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_interval)
        return replies

    def _send(self, message_type: str, group: str, contents: dict[int, RecordDict], timeout: float | None):
        """Send one message per client; returns {client: reply message or None (no reply in time)}."""
        msgs = [Message(content, self.node_of[cid], message_type, group_id=group)
                for cid, content in contents.items()]
        by_node = {r.metadata.src_node_id: r for r in self._exchange(msgs, timeout)} if msgs else {}
        return {cid: by_node.get(self.node_of[cid]) for cid in contents}

    def discover(self, timeout: float) -> dict[int, int]:
        """Ask every node once which client it holds ("hello"); {client id: node id}."""
        n = self.cfg.federation.num_clients
        start = time.monotonic()
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= n or time.monotonic() - start > timeout:
                break
            if STOP.wait(1.0):
                raise EngineStopped("the Flower run was stopped while waiting for nodes")
        if len(nodes) < n:
            raise UserError(f"only {len(nodes)} Flower nodes connected within {timeout:.0f} s but the config has "
                            f"federation.num_clients={n}; start one SuperNode per client")
        hello = RecordDict({"config": ConfigRecord({"action": HELLO})})
        msgs = [Message(RecordDict(hello), node, QUERY, group_id="hello") for node in nodes]
        replies = self._exchange(msgs, timeout)
        node_of: dict[int, int] = {}
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                raise UserError(f"Flower node {node} refused the run: {r.error.reason}")
            cid = int(r.content.config_records["config"]["client"])
            if cid in node_of:
                raise UserError(f"two Flower nodes ({node_of[cid]} and {node}) hold partition-id={cid}; give "
                                f"every SuperNode its own partition-id")
            node_of[cid] = node
        missing = sorted(set(range(n)) - set(node_of))
        if missing:
            raise UserError(f"no Flower node answered for client(s) {missing}; start a SuperNode with "
                            f"partition-id for each")
        log.info("flower: client -> node %s", node_of)
        return node_of

    # ------------------------------------------------------------------------------ engine API
    def _run(self, phase: str, rnd: int, plans: dict[int, Payload]):
        replies: dict[int, Reply] = {}
        failures: dict[int, tuple[str, str]] = {}
        if self.on_client is not None:
            for cid in plans:
                self.on_client(phase, cid, rnd)
        contents = {cid: payload_content(cid, p, self.cfg.comm.dtype) for cid, p in plans.items()}
        got = self._send(phase, str(rnd), contents, self.deadline)
        for cid in plans:
            msg = got[cid]
            if msg is None:
                failure = ("late", f"client {cid} sent no reply within the {self.deadline} s round deadline")
            elif msg.has_error():
                code = int(msg.error.code)
                kind = "dropped" if code in _GONE_CODES else "crashed" if code in _CRASHED_CODES else "failed"
                failure = (kind, f"client {cid} (node {self.node_of[cid]}): {msg.error.reason}")
            else:
                reply, failure = parse_reply(msg.content)
                if reply is not None:
                    replies[cid] = reply
                    if phase == TRAIN and self.on_steps is not None:
                        self.on_steps(cid, int(plans[cid].config.get("steps", 0)))
                    continue
            failures[cid] = failure
            log.warning("round %s: client %s %s (%s): %s", rnd, cid, failure[0], phase, failure[1])
        return replies, failures

    def train(self, rnd: int, plans: dict[int, Payload]):
        return self._run(TRAIN, rnd, plans)

    def evaluate(self, rnd: int, plans: dict[int, Payload]):
        return self._run(EVALUATE, rnd, plans)

    def client_states(self) -> dict[int, ClientState]:
        """Every client's persistent state, fetched from the nodes (a `query` message each). A node that does
        not answer keeps its last fetched state (logged)."""
        ask = {cid: RecordDict({"config": ConfigRecord({"action": GET_STATE})}) for cid in self.node_of}
        for cid, msg in self._send(QUERY, "state", ask, self.deadline).items():
            if msg is None or msg.has_error():
                log.warning("flower: client %s did not return its state; the checkpoint keeps its last known "
                            "state", cid)
                continue
            conf = msg.content.config_records["config"]
            if conf["present"]:
                self.states[cid] = ClientState(tensors_of(msg.content.array_records.get("arrays")),
                                               json.loads(conf["meta"]))
            else:
                self.states.pop(cid, None)
        return {cid: self.states[cid] for cid in sorted(self.states)}

    def load_client_states(self, states: Mapping[int, ClientState]) -> None:
        """Write the given states to the nodes (resume); clients without a state start fresh."""
        contents = {}
        for cid in self.node_of:
            st = states.get(cid)
            conf = {"action": SET_STATE, "present": st is not None, "meta": json.dumps(st.meta if st else {})}
            contents[cid] = RecordDict({"arrays": arrays(st.tensors if st else {}), "config": ConfigRecord(conf)})
        for cid, msg in self._send(QUERY, "state", contents, None).items():
            if msg is None or msg.has_error():
                raise RuntimeError(f"client {cid} could not store its resumed state: "
                                   f"{msg.error.reason if msg is not None else 'no reply'}")
        self.states = {cid: states[cid] for cid in states}

    def save_client_states(self, root: Path) -> None:
        """Every client's state, fetched from the nodes, as `root/client-<id>.safetensors` (a checkpoint)."""
        save_states(root, self.client_states())

    def close(self) -> None:
        pass
