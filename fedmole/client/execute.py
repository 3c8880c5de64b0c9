"""Running one message on a client, the same way in every engine.

`execute` reseeds torch for (round, client, phase), carries out an injected fault (drop, crash at a local
step, straggle), runs the method's client procedure, and applies client-level DP to the upload (noise from
`privacy.noise_generator`: the client's OS entropy unless `dp.noise: seeded`). Engines call it and only
decide what to do with its outcome: keep the reply, or record the failure; the client's persistent state is
committed only when the client finished its work (`Outcome.commit`).

Under `eval.test: selected` it also keeps the client's snapshots of evaluated models out of the method's
sight (client/snapshots.py): taken out of the state before the procedure runs, pruned to what the server
still needs, handed to the runtime, and put back afterwards; a message with `test_snapshots` evaluates the
test split on the named snapshots instead of running the procedure.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Protocol

from fedmole.client import snapshots
from fedmole.client.runtime import ClientRuntime
from fedmole.config import Config
from fedmole.faults import CRASH, DROP, STRAGGLE, ClientCrashed, ClientDropped
from fedmole.messages import ClientState, Payload, Reply
from fedmole.privacy import noise_generator, privatize

DP_PHASE = 3  # tag of the update-DP noise stream under dp.noise=seeded
log = logging.getLogger("fedmole")


class Procedure(Protocol):
    """What `execute` runs: a method's client half (`algorithms.base.ClientProcedure`), named by what it offers
    so that the client layer does not import the algorithms above it."""

    cfg: Config
    runtime: ClientRuntime

    def train(self, cid: int, payload: Payload, state: ClientState) -> Reply: ...

    def evaluate(self, cid: int, payload: Payload, state: ClientState) -> Reply: ...


@dataclass
class Outcome:
    reply: Reply | None
    failure: tuple[str, str] | None  # (kind: dropped | crashed | late | failed, message)
    commit: bool  # whether the client's state after the call should be kept


def execute(procedure: Procedure, phase: str, cid: int, payload: Payload, state: ClientState) -> Outcome:
    runtime, cfg = procedure.runtime, procedure.cfg
    rnd = int(payload.config.get("round", 0))
    fault = payload.config.get("fault") if phase == "train" else None
    runtime.seed(rnd, cid, phase)
    deferred = cfg.eval.test == "selected"
    snaps = snapshots.take(state) if deferred else None
    if deferred:
        snapshots.prune(snaps, payload.config.get("snapshot_keep", {}), rnd)
    runtime.snapshots, runtime.round = snaps, rnd
    try:
        if fault and fault["kind"] == DROP:
            raise ClientDropped(f"client {cid} dropped out before replying (injected)")
        runtime.crash_at = fault["at_step"] if fault and fault["kind"] == CRASH else None
        if "test_snapshots" in payload.config:
            reply = test_snapshots(runtime, cid, snaps or {}, payload.config["test_snapshots"])
        else:
            reply = (procedure.train if phase == "train" else procedure.evaluate)(cid, payload, state)
    except ClientDropped as err:
        return Outcome(None, ("dropped", str(err)), False)
    except ClientCrashed as err:
        return Outcome(None, ("crashed", str(err)), False)
    except Exception as err:  # noqa: BLE001 - a failing client must not stop the federation
        log.debug("client %s failed in round %s (%s):\n%s", cid, rnd, phase, traceback.format_exc())
        return Outcome(None, ("failed", f"{type(err).__name__}: {err}"), False)
    finally:
        runtime.crash_at, runtime.snapshots = None, None
        if deferred:
            snapshots.put(state, snaps)
    if phase == "train" and cfg.dp.enabled:
        gen = noise_generator(cfg, rnd, cid, DP_PHASE)  # OS entropy unless dp.noise=seeded
        reply.tensors, facts = privatize(payload.tensors, reply.tensors, cfg.dp, gen)
        reply.metrics.update({"dp_groups": facts["groups"], "dp_clipped": facts["clipped"]})
    if fault and fault["kind"] == STRAGGLE:
        return Outcome(None, ("late", f"client {cid} replied after the round deadline (injected straggler)"), True)
    return Outcome(reply, None, True)


def test_snapshots(runtime: ClientRuntime, cid: int, snaps: snapshots.Snapshots, wanted: dict[str, list[int]]) -> Reply:
    """The test split on each requested (model label, round) snapshot the client holds; every result carries
    the round of its snapshot."""
    evals = []
    for label, rounds in wanted.items():
        for rnd in rounds:
            snap = snaps.get(label, {}).get(int(rnd))
            if snap is None:  # not evaluated that round (not sampled, or failed)
                continue
            runtime.adapters.load(snap.tensors)
            runtime.adapters.apply_settings(snap.settings)
            evals += [{**e, "round": int(rnd)} for e in runtime.evaluate(cid, label, splits=("test",))]
    return Reply(evals=evals)
