"""The adapter contract: what every adapter layer offers the rest of fedmole.

An adapter replaces one module of the frozen base model (a linear layer, or a whole sparse-MoE block) and
holds its tensors by expert id: `(expert, name)` pairs such as `("lora", "A")`, `("3", "gate_B")` or
`("router", "W_t")`, which `AdapterSet` turns into the flat `"{module}/{expert}/{name}"` keys of
`adapters.state`. Every adapter class names `Adapter` as a base, so the contract is declared, not probed:

- state by expert id: `get_tensors()` (live tensors, in state key order), `set_tensors(tensors)` (load a
  state, all of the module's keys at once) and `init_tensors(generator)` (a fresh initial state);
- what trains: `trainable_parameters()`, the parameters an optimiser updates, keyed like the state. A layer
  that batches its experts in one tensor lists that tensor once, under a collective expert id (`experts`,
  `held`), so the dict's order is the order the optimiser receives them;
- run-time settings that change what the layer computes but are not tensors (FLAME's active experts k):
  `settings()` and `apply_settings(values)`; `{}` for a layer that has none.

`LoRAAdapter` adds what the LoRA methods read of a plain low-rank update: its rank and its live (A, B) pairs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

ExpertKey = tuple[str, str]  # (expert id, tensor name)


class Adapter(Protocol):
    """An adapter layer (see the module docstring); `nn.Module` subclasses name it as a base."""

    def get_tensors(self) -> dict[ExpertKey, torch.Tensor]:
        """Every tensor of the layer's state, live (views of batched parameters where experts are batched)."""
        ...

    def set_tensors(self, tensors: dict[ExpertKey, torch.Tensor]) -> None:
        """Load the layer's share of a state: every key of this module at once."""
        ...

    def init_tensors(self, generator: torch.Generator) -> dict[ExpertKey, torch.Tensor]:
        """A fresh initial state (CPU, fp32) drawn from `generator`; the layer itself is untouched. Layers
        whose rank follows the tensors loaded also take `rank=`."""
        ...

    def trainable_parameters(self) -> dict[ExpertKey, nn.Parameter]:
        """The parameters an optimiser updates, in the order it receives them."""
        ...

    def settings(self) -> dict:
        """Run-time settings that are not tensors; none by default."""
        return {}

    def apply_settings(self, settings: dict) -> None:
        """Restore `settings()`; a layer without settings accepts only none."""
        if settings:
            raise ValueError(f"{type(self).__name__} has no run-time settings; got {sorted(settings)}")


class LoRAAdapter(Adapter, Protocol):
    """An adapter whose trained update is one low-rank product per adapted matrix, (alpha/r) B A, at one
    rank r for the whole layer (HetLoRA's tail regulariser reads the factors)."""

    rank: int

    def factor_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The live (A, B) of every adapted matrix: (r, d_in), (d_out, r), or batched over experts with a
        leading expert dimension."""
        ...
