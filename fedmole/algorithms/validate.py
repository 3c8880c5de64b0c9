"""Server-side checks of client replies, before anything is aggregated.

A reply is accepted only if every tensor it carries is one the server expects from that client
(`Strategy.reply_spec`: by default exactly the tensors the client was sent, so a tensor of an expert not
assigned to the client is rejected), with the expected shape and a floating dtype, finite values, a total
size within `replies.max_mb`, and a positive integer sample count. A rejected reply is logged with its
reason and leaves the global state untouched.
"""

from __future__ import annotations

import math

import torch

from fedmole.algorithms.base import Reply

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def spec_of(tensors: dict[str, torch.Tensor]) -> Spec:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def check_reply(reply: Reply, spec: Spec, max_mb: float) -> str | None:
    """None if the reply is acceptable, else the reason it is rejected."""
    n = reply.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"sample count must be a positive integer, got {n!r}"
    if not isinstance(reply.tensors, dict):
        return f"tensors must be a mapping of names to tensors, got {type(reply.tensors).__name__}"
    unknown = sorted(k for k in reply.tensors if k not in spec)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        return f"unexpected tensors (unknown names or experts not assigned to this client): {unknown[:3]}{more}"
    size = 0
    for k, t in reply.tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{k}: not a tensor ({type(t).__name__})"
        shape, dtype = spec[k]
        if tuple(t.shape) != shape:
            return f"{k}: shape {tuple(t.shape)}, expected {shape}"
        if t.dtype != dtype:
            return f"{k}: dtype {t.dtype}, expected {dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{k}: contains NaN or infinite values"
        size += t.numel() * t.element_size()
    if size > max_mb * 2**20:
        return f"reply of {size / 2**20:.3g} MiB exceeds replies.max_mb={max_mb}"
    return None


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
