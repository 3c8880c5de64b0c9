"""FedProx's proximal term as a client-side gradient hook (Li et al. 2020; baselines.md §3.1).

Client i minimises F_i(x) + (μ/2)‖x − x_t‖² over its trainable tensors: before each optimiser step, μ (x − x_t)
is added to the gradient of every trainable tensor, with x_t the frozen copy of the tensors the client started
the round from. The server aggregates as before. With an Adam local optimiser (the default) the proximal
gradient passes through Adam's normalisation, as in every LLM re-implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def proximal_hook(params: list[nn.Parameter], mu: float) -> Callable[[], None]:
    """A `before_step` hook adding mu * (p - p_t) to each parameter's gradient; p_t is snapshotted now."""
    anchors = [p.detach().clone() for p in params]  # x_t, fixed for the round

    def before_step() -> None:
        with torch.no_grad():
            for p, p0 in zip(params, anchors):
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=mu)

    return before_step
