"""Server optimisers on the aggregated delta, one element-wise rule per named tensor (baselines.md §3).

The round is one optimisation step of the server. With x_t the global tensors at the start of the round and
`mean` = Σ p_i x_i the round's aggregate, Δ_t = mean − x_t and g_t = −Δ_t (the pseudo-gradient):

    fedavg       x+ = x + η Δ                                   (η = 1: x+ = mean, plain FedAvg)
    fedavgm      v = β v + g;  x+ = x − η v                      (Hsu et al. 2019; Nesterov: x+ = x − η (g + β v))
    fedadagrad   m = β1 m + (1 − β1) Δ;  v = v + Δ²                                  x+ = x + η m / (√v + τ)
    fedadam      m = β1 m + (1 − β1) Δ;  v = β2 v + (1 − β2) Δ²                      x+ = x + η m / (√v + τ)
    fedyogi      m = β1 m + (1 − β1) Δ;  v = v − (1 − β2) Δ² sign(v − Δ²)             x+ = x + η m / (√v + τ)

with m_{-1} = 0, v_{-1} = τ² (Reddi et al. 2021, no bias correction) and momentum v_0 = 0. Arithmetic is float64;
the moments are kept in float32 (they are part of the checkpointed server state). A key that is in x but not in
`mean` (no client updated it) keeps its value and its moments.
"""

from __future__ import annotations

import torch

from fedmole.config import ServerOptConfig
from fedmole.messages import Tensors

SEP = "::"  # "m::{key}" / "v::{key}" in state_dict()


class ServerOptimizer:
    def __init__(self, cfg: ServerOptConfig):
        self.cfg = cfg
        self.m: Tensors = {}  # first moment (FedOpt)
        self.v: Tensors = {}  # second moment (FedOpt) or momentum buffer (fedavgm)

    @property
    def is_fedavg(self) -> bool:
        return self.cfg.name == "fedavg" and self.cfg.lr == 1.0

    def step(self, x: Tensors, mean: Tensors) -> Tensors:
        """The new global tensors: x moved along Δ = mean − x by the configured rule."""
        missing = sorted(set(mean) - set(x))
        if missing:
            raise KeyError(f"aggregate has keys the global state lacks: {missing[:3]}")
        out = dict(x)
        for k, target in mean.items():
            out[k] = target.to(x[k].dtype) if self.is_fedavg else self._update(k, x[k], target)
        return out

    def _update(self, k: str, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        x64 = x.to(torch.float64)
        delta = mean.to(torch.float64) - x64
        if c.name == "fedavg":
            new = x64 + c.lr * delta
        elif c.name == "fedavgm":
            g = -delta
            v = c.momentum * self._moment(self.v, k, x, 0.0) + g
            self.v[k] = v.to(torch.float32)
            new = x64 - c.lr * ((g + c.momentum * v) if c.nesterov else v)
        else:
            m = c.beta1 * self._moment(self.m, k, x, 0.0) + (1 - c.beta1) * delta
            v = self._moment(self.v, k, x, c.tau**2)
            sq = delta * delta
            if c.name == "fedadagrad":
                v = v + sq
            elif c.name == "fedadam":
                v = c.beta2 * v + (1 - c.beta2) * sq
            else:  # fedyogi
                v = v - (1 - c.beta2) * sq * torch.sign(v - sq)
            self.m[k], self.v[k] = m.to(torch.float32), v.to(torch.float32)
            new = x64 + c.lr * m / (v.sqrt() + c.tau)
        return new.to(x.dtype)

    @staticmethod
    def _moment(store: Tensors, k: str, like: torch.Tensor, init: float) -> torch.Tensor:
        if k not in store:
            return torch.full(like.shape, init, dtype=torch.float64, device=like.device)
        return store[k].to(torch.float64)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Tensors:
        return {**{f"m{SEP}{k}": t for k, t in self.m.items()}, **{f"v{SEP}{k}": t for k, t in self.v.items()}}

    def load_state_dict(self, tensors: Tensors) -> None:
        self.m, self.v = {}, {}
        for name, t in tensors.items():
            which, k = name.split(SEP, 1)
            (self.m if which == "m" else self.v)[k] = t.to(torch.float32)
