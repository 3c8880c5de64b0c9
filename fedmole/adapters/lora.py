"""Plain LoRA on a frozen linear layer.

    y = W0 x + (alpha / r) * B A dropout(x)        A: (r, d_in), B: (d_out, r)

A is initialised kaiming-uniform(a=sqrt(5)) (i.e. U(+-1/sqrt(d_in))) and B = 0, so the adapted layer starts
equal to the base layer; this matches peft's LoRA. The adapter trains in fp32 whatever the base dtype.
The rank may differ between clients (HetLoRA, FlexLoRA): loading a state of another rank resizes A and B,
and the scaling follows `alpha / rank` of the tensors currently held.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmole.adapters.base import LoRAAdapter


def kaiming_uniform_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """nn.Linear's default init, kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(t.shape[-1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class LoRALinear(nn.Module, LoRAAdapter):
    """A frozen `nn.Linear` plus one LoRA expert (expert id `lora`, tensors `A` and `B`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.A = nn.Parameter(torch.zeros(rank, base.in_features, device=device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        kaiming_uniform_(self.A)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x).to(self.A.dtype)
        delta = (h @ self.A.t()) @ self.B.t()  # (..., r) -> (..., d_out)
        return y + (delta * self.scaling).to(y.dtype)

    # ------------------------------------------------------------------------------- state by expert id
    def init_tensors(self, generator: torch.Generator, rank: int | None = None) -> dict[tuple[str, str], torch.Tensor]:
        """Fresh initial tensors (CPU, fp32) drawn from `generator`; the module itself is untouched."""
        r = rank or self.rank
        A = kaiming_uniform_(torch.empty(r, self.base.in_features), generator)
        B = torch.zeros(self.base.out_features, r)
        return {("lora", "A"): A, ("lora", "B"): B}

    def get_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        return {("lora", "A"): self.A, ("lora", "B"): self.B}

    def trainable_parameters(self) -> dict[tuple[str, str], nn.Parameter]:
        return {("lora", "A"): self.A, ("lora", "B"): self.B}

    def set_tensors(self, tensors: dict[tuple[str, str], torch.Tensor]) -> None:
        A, B = tensors[("lora", "A")], tensors[("lora", "B")]
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"LoRA A has rank {A.shape[0]} but B has rank {B.shape[1]}")
        for name, value in (("A", A), ("B", B)):
            param = getattr(self, name)
            if param.shape != value.shape:  # another client's rank: resize in place of the old parameter
                setattr(self, name, nn.Parameter(torch.empty(value.shape, device=param.device)))
                param = getattr(self, name)
            with torch.no_grad():
                param.copy_(value)

    def factor_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The live (A, B) of the adapted matrix (one here; a MoE block has one per projection)."""
        return [(self.A, self.B)]
