"""Seeded fault injection: which sampled client fails how in a round.

The round loop plans the faults and ships them inside the payload config (`config["fault"]`), so every
engine executes them for real on the client: a dropped client never starts, a crashing client raises at a
random local step (its persistent state is not updated), a straggler finishes but replies after the round
deadline (the server drops the reply). Plans depend only on (seed, round, client): a resumed run or
another engine sees the same faults.
"""

from __future__ import annotations

import numpy as np

from fedmole.config import Config

DROP, CRASH, STRAGGLE = "drop", "crash", "straggle"


class ClientDropped(Exception):
    """The client failed before replying (injected)."""


class ClientCrashed(Exception):
    """The client crashed during local training (injected)."""


def plan_fault(cfg: Config, rnd: int, cid: int) -> dict | None:
    """`{"kind": drop|crash|straggle, "at_step": s}` or None, from one seeded draw per (round, client)."""
    f = cfg.faults
    if not f.active:
        return None
    seed = cfg.federation.seed if f.seed is None else f.seed
    rng = np.random.default_rng([seed, rnd, cid, 0xFA])
    u, step = rng.random(), int(rng.integers(1, cfg.train.local_steps + 1))
    if u < f.drop_probability:
        return {"kind": DROP}
    if u < f.drop_probability + f.crash_probability:
        return {"kind": CRASH, "at_step": step}
    if u < f.drop_probability + f.crash_probability + f.straggler_probability:
        return {"kind": STRAGGLE}
    return None
