"""Snapshots of evaluated models, for `eval.test: selected` (the test split only where the protocol needs it).

In that mode every evaluation during the rounds covers the validation split only, and the client keeps a
snapshot of each model it evaluated: the adapter tensors as they were loaded (`AdapterSet.state()`) plus the
adapters' run-time settings (e.g. FLAME's active experts k). After the last round the server asks every
client to evaluate the test split on two snapshots per model label: the round selected on validation and
the last round (one when they coincide). So a personalised model that exists only for a moment on the
client (FedAMoLE's trained experts before aggregation, FedIT-FT's fine-tuned LoRA, FDLoRA's fused model) is
tested exactly as it was validated, and the test split is evaluated twice per model instead of every round.

Pruning: every message of the deferred protocol names, per label, the best round the server has seen so far
(`snapshot_keep`); before the client procedure runs, a client drops its other snapshots of that label from
earlier rounds (the round it is about to evaluate will be the newest). So a client holds at most two
snapshots per label.

Storage: snapshots ride in the client's persistent `ClientState` under reserved names (tensors
`@eval/{label}/{round}/{key}`, settings in `meta["@eval"]`), so every engine persists and checkpoints them
without knowing about them; `execute` takes them out before the method's client procedure runs (a method
never sees them) and puts them back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from fedmole.messages import ClientState

PREFIX = "@eval/"
META = "@eval"


@dataclass
class Snapshot:
    tensors: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)


Snapshots = dict[str, dict[int, Snapshot]]  # model label -> round -> snapshot


def take(state: ClientState) -> Snapshots:
    """Remove the snapshots from `state` and return them."""
    settings = state.meta.pop(META, {})
    snaps: Snapshots = {}
    for name in [k for k in state.tensors if k.startswith(PREFIX)]:
        label, rnd, key = name[len(PREFIX):].split("/", 2)
        snap = snaps.setdefault(label, {}).setdefault(int(rnd), Snapshot({}, settings[label][rnd]))
        snap.tensors[key] = state.tensors.pop(name)
    return snaps


def put(state: ClientState, snaps: Snapshots) -> None:
    """Store `snaps` in `state` (the inverse of `take`)."""
    meta: dict = {}
    for label, by_round in snaps.items():
        for rnd, snap in by_round.items():
            meta.setdefault(label, {})[str(rnd)] = snap.settings
            state.tensors.update({f"{PREFIX}{label}/{rnd}/{k}": v for k, v in snap.tensors.items()})
    if meta:
        state.meta[META] = meta


def prune(snaps: Snapshots, keep: dict[str, int], current: int) -> None:
    """For every label named in `keep`, keep the snapshot of round `keep[label]` and those of round `current`
    (the message's round: a round's training and evaluation phases may each add one)."""
    for label, rnd in keep.items():
        if label in snaps:
            snaps[label] = {r: s for r, s in snaps[label].items() if r == int(rnd) or r >= current}


class Without(Mapping[int, ClientState]):
    """Client states without their snapshots (what a client's model is made of), read from `states` on access."""

    def __init__(self, states: Mapping[int, ClientState]):
        self.states = states

    def __getitem__(self, cid: int) -> ClientState:
        st = self.states[cid]
        st = ClientState(dict(st.tensors), dict(st.meta))
        take(st)
        return st

    def __iter__(self) -> Iterator[int]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)
