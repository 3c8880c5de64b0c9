"""LoRA on top of a base whose weights carry a merged dense update.

    y = W0 x + dW x + (alpha / r) B A dropout(x)        dW: (d_out, d_in), A: (r, d_in), B: (d_out, r)

FLoRA merges every round's aggregate into the base weights, and FlexLoRA's global model is a dense ΔW. The
in-process engine shares one frozen W0 between all simulated clients, so the merged update is not written into
W0: the adapter carries it as a non-trainable tensor (expert id `merged`, name `dW`) that comes with the payload
or state like any other tensor. Every client can thus rebuild its effective base W0 + dW from what it is sent,
checkpoints keep it with the server state, and W0 stays bit-identical.

Loading a state sets dW from its `merged/dW` entry, or drops dW when there is none; a state without LoRA factors
zeroes B, so the adapter then adds dW only.
"""

from __future__ import annotations

import torch

from fedmole.adapters.lora import LoRALinear


class MergedLoRALinear(LoRALinear):
    """A frozen `nn.Linear` + a merged dense update `dW` (expert `merged`) + one LoRA (expert `lora`); dW is
    part of the state but never trains (`trainable_parameters` are the LoRA's)."""

    def __init__(self, base, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.dW: torch.Tensor | None = None  # (d_out, d_in), fp32, never trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.dW is None:
            return y
        return y + (x.to(self.dW.dtype) @ self.dW.t()).to(y.dtype)

    def get_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        out = super().get_tensors()
        if self.dW is not None:
            out[("merged", "dW")] = self.dW
        return out

    def set_tensors(self, tensors: dict[tuple[str, str], torch.Tensor]) -> None:
        dW = tensors.get(("merged", "dW"))
        if dW is not None and tuple(dW.shape) != (self.base.out_features, self.base.in_features):
            raise ValueError(f"merged dW has shape {tuple(dW.shape)}, expected {tuple(self.base.weight.shape)}")
        self.dW = None if dW is None else dW.to(self.base.weight.device, torch.float32, copy=True)
        lora = {k: v for k, v in tensors.items() if k[0] == "lora"}
        if lora:
            super().set_tensors(lora)
        else:
            with torch.no_grad():
                self.B.zero_()
