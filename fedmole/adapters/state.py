"""Trainable state addressed by expert identity.

Every trainable tensor is named `"{module}/{expert}/{tensor}"`: the module path inside the base model
(`model.layers.0.self_attn.q_proj`), the expert id (`lora`, `shared`, `router`, or a domain expert's global
integer id), and the tensor name (`A`, `B`, `W_t`, ...). Payloads, aggregation, checkpoints and reports all
use these flat string keys, so a client's architecture is simply the set of keys it holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

import torch

SEP = "/"


class Key(NamedTuple):
    module: str
    expert: str
    name: str

    def __str__(self) -> str:
        return SEP.join(self)


def key(module: str, expert: str | int, name: str) -> str:
    return f"{module}{SEP}{expert}{SEP}{name}"


def parse_key(k: str) -> Key:
    module, expert, name = k.rsplit(SEP, 2)
    return Key(module, expert, name)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted tensor names and their raw bytes (dtype and shape included)."""
    return digest_items((name, state[name]) for name in sorted(state))


def digest_items(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`state_digest` of a state given as (name, tensor) pairs already in sorted name order (a state too
    large to hold at once, read piece by piece)."""
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
