"""Running one message on a client, the same way in every engine.

`execute` reseeds torch for (round, client, phase), carries out an injected fault (drop, crash at a local
step, straggle), runs the method's client procedure, and applies client-level DP to the upload. Engines
call it and only decide what to do with its outcome: keep the reply, or record the failure; the
client's persistent state is committed only when the client finished its work (`Outcome.commit`).
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import torch

from fedmole.algorithms.base import ClientProcedure, ClientState, Payload, Reply
from fedmole.client.runtime import derive_seed
from fedmole.faults import CRASH, DROP, STRAGGLE, ClientCrashed, ClientDropped

DP_PHASE = 3
log = logging.getLogger("fedmole")


@dataclass
class Outcome:
    reply: Reply | None
    failure: tuple[str, str] | None  # (kind: dropped | crashed | late | failed, message)
    commit: bool  # whether the client's state after the call should be kept


def execute(procedure: ClientProcedure, phase: str, cid: int, payload: Payload, state: ClientState) -> Outcome:
    runtime, cfg = procedure.runtime, procedure.cfg
    rnd = int(payload.config.get("round", 0))
    fault = payload.config.get("fault") if phase == "train" else None
    runtime.seed(rnd, cid, phase)
    try:
        if fault and fault["kind"] == DROP:
            raise ClientDropped(f"client {cid} dropped out before replying (injected)")
        runtime.crash_at = fault["at_step"] if fault and fault["kind"] == CRASH else None
        reply = (procedure.train if phase == "train" else procedure.evaluate)(cid, payload, state)
    except ClientDropped as err:
        return Outcome(None, ("dropped", str(err)), False)
    except ClientCrashed as err:
        return Outcome(None, ("crashed", str(err)), False)
    except Exception as err:  # noqa: BLE001 - a failing client must not stop the federation
        log.debug("client %s failed in round %s (%s):\n%s", cid, rnd, phase, traceback.format_exc())
        return Outcome(None, ("failed", f"{type(err).__name__}: {err}"), False)
    finally:
        runtime.crash_at = None
    if phase == "train" and cfg.dp.enabled:
        from fedmole.privacy import privatize

        gen = torch.Generator().manual_seed(derive_seed(cfg.federation.seed, rnd, cid, DP_PHASE))
        reply.tensors, facts = privatize(payload.tensors, reply.tensors, cfg.dp, gen)
        reply.metrics.update({"dp_groups": facts["groups"], "dp_clipped": facts["clipped"]})
    if fault and fault["kind"] == STRAGGLE:
        return Outcome(None, ("late", f"client {cid} replied after the round deadline (injected straggler)"), True)
    return Outcome(reply, None, True)
