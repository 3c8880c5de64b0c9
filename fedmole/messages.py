"""What travels between the server and a client, and what a client keeps between rounds.

These types sit below every layer that uses them (client/, algorithms/, engines/, run.py), so the client side
never imports the algorithms to name a message. Tensors are flat dicts keyed by `"{module}/{expert}/{name}"`
(adapters/state.py); everything else is JSON-able, so every engine can move or store them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]  # named tensors: "{module}/{expert}/{name}" -> tensor


@dataclass
class Payload:
    """Server -> client: tensors to load and JSON-able instructions (round, lr, steps, eval requests...)."""

    tensors: Tensors = field(default_factory=dict)
    config: dict = field(default_factory=dict)


@dataclass
class Reply:
    """Client -> server.

    `evals` are evaluation results computed on the client: dicts with keys `model` (personalized|global),
    `split` (val|test) and `metrics` (metric name -> value). `extra` carries JSON-able method data
    (e.g. activation counts).
    """

    tensors: Tensors = field(default_factory=dict)
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class ClientState:
    """What a client keeps between rounds: tensors (private adapters, rescalers) and JSON-able meta
    (the data cursor, ...). Engines persist it: in memory in-process, node-local in Flower."""

    tensors: Tensors = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
