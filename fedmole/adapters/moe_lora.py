"""LoRA on the fused experts of a pretrained sparse-MoE block, for the LoRA methods (FedIT, FedIT-FT, FFA-LoRA,
HetLoRA, FlexLoRA, FLoRA, FDLoRA, local), so that they adapt the same weights as FLAME.

transformers 5 stores the experts of an OLMoE / Qwen2-MoE / Qwen3-MoE / Mixtral block as fused 3-D parameters
(`gate_up_proj` (M, 2I, d), `down_proj` (M, d, I)), which `nn.Linear` injection cannot wrap. `MoELoRA` replaces
the block as FLAME's `SparseMoELoRA` does and computes, for a token x,

    p   = softmax(W_g x);  S = TopK_K(p);  g_j = p_j (renormalised where the model does)   # the pretrained router
    y_j = down'_j( silu(gate'_j(x)) * up'_j(x) ),   proj'(v) = W_proj v [+ dW_proj v] + (alpha/r) B_proj A_proj v
    h   = sum_{j in S} g_j y_j

with the model's own top-K and router, both frozen. It is `SparseMoELoRA` at k = K without the rescaler and
without activation counting (one batched implementation for both, so a comparison runs the same arithmetic),
plus what the rank baselines need:

- the rank follows the tensors loaded (HetLoRA / FlexLoRA / FLoRA clients at their tier rank r_i): every
  expert of every projection has the same rank r, and the scale is alpha / r;
- optionally (`merged=True`, FlexLoRA and FLoRA) a merged dense update dW per (expert, projection), the
  analogue of `MergedLoRALinear`: loading a state sets dW from its `..._dW` entries or drops it when there are
  none, and a state without LoRA factors zeroes B.

Tensors by expert id, the vocabulary FLAME's `SparseMoELoRA` uses:
  `{block}/{j}/{proj}_A` (r, d_in), `{block}/{j}/{proj}_B` (d_out, r), `{block}/{j}/{proj}_dW` (d_out, d_in),
for j in 0..M-1 and proj in {gate, up, down}. With B = 0 and no dW the block equals the transformers block.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmole.adapters.base import LoRAAdapter
from fedmole.adapters.smoe import ALL_EXPERTS, FACTORS, PROJECTIONS, MoEContext, SparseMoELoRA

MERGED = "dW"


class MoELoRA(SparseMoELoRA, LoRAAdapter):
    """A pretrained sparse-MoE block with a LoRA of rank r on each (expert, projection), routed at the model's
    own top-K; no rescaler, nothing counted."""

    def __init__(self, block: nn.Module, rank: int, alpha: float, dropout: float,
                 projections: tuple[str, ...] = PROJECTIONS, merged: bool = False):
        super().__init__(block, rank, alpha, dropout, MoEContext(), projections)
        self.merged = merged
        self.dW: dict[str, torch.Tensor] | None = None  # proj -> (M, d_out, d_in), fp32, never trained

    def _observe(self, p: torch.Tensor, idx: torch.Tensor) -> None:
        """The LoRA methods route at K and keep no activation statistics."""

    def _project(self, proj: str, rows: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        out = super()._project(proj, rows, W)
        if self.dW is None or proj not in self.dW:
            return out
        return out + torch.bmm(rows.to(self.dW[proj].dtype), self.dW[proj].transpose(1, 2)).to(out.dtype)

    # ------------------------------------------------------------------------------- state by expert id
    def get_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        """The experts' factors, each followed by its merged dW when one is loaded; no router, no rescaler."""
        return self._expert_tensors()

    def _expert_extras(self, j: int, proj: str) -> dict[tuple[str, str], torch.Tensor]:
        return {} if self.dW is None else {(str(j), f"{proj}_{MERGED}"): self.dW[proj][j]}

    def trainable_parameters(self) -> dict[tuple[str, str], nn.Parameter]:
        """The real parameters: every expert's factors of one projection live in one (M, ...) tensor, listed
        projection by projection (A, B of each)."""
        return {(ALL_EXPERTS, f"{m}_{f}"): getattr(self, f)[m] for m in self.projections for f in FACTORS}

    def factor_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The live (A, B) of each projection, batched over experts: (M, r, d_in), (M, d_out, r)."""
        return [(self.A[m], self.B[m]) for m in self.projections]

    def init_tensors(self, generator: torch.Generator, rank: int | None = None) -> dict[tuple[str, str], torch.Tensor]:
        """A ~ kaiming-uniform and B = 0 for every expert, drawn as `SparseMoELoRA` draws them (one (M, r, d_in)
        tensor per projection), so FLAME and a LoRA method with the same seed start from the same factors."""
        return self._init_expert_factors(generator, rank or self.rank)

    def set_tensors(self, tensors: dict[tuple[str, str], torch.Tensor]) -> None:
        factors: dict[tuple[str, int, str], torch.Tensor] = {}  # (proj, expert, A|B) -> tensor
        merged: dict[tuple[str, int], torch.Tensor] = {}
        for (expert, name), value in tensors.items():
            proj, _, part = name.rpartition("_")
            if not expert.isdigit() or int(expert) >= self.M or proj not in self.projections \
                    or part not in (*FACTORS, MERGED):
                raise KeyError(f"expert LoRA tensor {expert}/{name} is not one of this block's: experts 0.."
                               f"{self.M - 1}, tensors {{{','.join(self.projections)}}}_{{A,B,dW}}")
            if part == MERGED:
                merged[(proj, int(expert))] = value
            else:
                factors[(proj, int(expert), part)] = value
        self._set_merged(merged)
        if factors:
            self._set_factors(factors)
        else:  # a merged update alone: the model is W0 + dW
            with torch.no_grad():
                for B in self.B.values():
                    B.zero_()

    def _set_factors(self, factors: dict[tuple[str, int, str], torch.Tensor]) -> None:
        ranks = {v.shape[0] if part == "A" else v.shape[1] for (_, _, part), v in factors.items()}
        if len(ranks) != 1:
            raise ValueError(f"expert LoRA factors of one block must share one rank; got ranks {sorted(ranks)}")
        (rank,) = ranks
        if rank != self.rank:  # another client's rank: every factor of the block is replaced
            missing = [(m, j, f) for m in self.projections for j in range(self.M) for f in FACTORS
                       if (m, j, f) not in factors]
            if missing:
                m, j, f = missing[0]
                raise ValueError(f"loading rank {rank} into a rank-{self.rank} expert block needs every expert's "
                                 f"factors; {len(missing)} are missing, e.g. {j}/{m}_{f}")
            device = self.A[self.projections[0]].device
            for m in self.projections:
                d_out, d_in = self.dims[m]
                self.A[m] = nn.Parameter(torch.empty(self.M, rank, d_in, device=device), requires_grad=False)
                self.B[m] = nn.Parameter(torch.empty(self.M, d_out, rank, device=device), requires_grad=False)
            self.rank, self.scaling = rank, self.alpha / rank
        with torch.no_grad():
            for (m, j, f), value in factors.items():
                getattr(self, f)[m][j].copy_(value)

    def _set_merged(self, merged: dict[tuple[str, int], torch.Tensor]) -> None:
        if not merged:
            self.dW = None
            return
        if not self.merged:
            raise KeyError("this expert block carries no merged update (only FlexLoRA and FLoRA do); "
                           f"got {len(merged)} ..._dW tensors")
        missing = [(m, j) for m in self.projections for j in range(self.M) if (m, j) not in merged]
        if missing:
            raise ValueError(f"a merged expert update needs dW for every expert and projection; "
                             f"{len(missing)} are missing, e.g. {missing[0][1]}/{missing[0][0]}_dW")
        device = self.A[self.projections[0]].device
        self.dW = {}
        for m in self.projections:
            dW = torch.stack([merged[(m, j)] for j in range(self.M)]).to(device, torch.float32)
            if tuple(dW.shape[1:]) != self.dims[m]:
                raise ValueError(f"merged {m}_dW has shape {tuple(dW.shape[1:])}, expected {self.dims[m]}")
            self.dW[m] = dW
