"""Shared LoRA-factor mechanics of the heterogeneous-rank baselines (baselines.md §2.5-2.7).

One adapted matrix holds A: (r, d_in) and B: (d_out, r) and adds ΔW = s B A with the LoRA scale s = α / r.
Methods work per adapted matrix on (A, B) pairs; these helpers convert between flat expert keys and pairs and
implement the maths once:

- `resize_rank`: truncate to the first r components or zero-pad to r, preserving the update of the kept
  components (B is multiplied by r_new / r_old because the scale α/r changes with the rank);
- `scaled_product` / `product_norm`: s B A and its Frobenius norm (without forming the d_out x d_in matrix);
- `svd_factors`: the best rank-r approximation of a dense ΔW as LoRA factors at scale α/r (FlexLoRA);
- `stack`: FLoRA's stacking, B_stack A_stack = Σ p_i s_i B_i A_i exactly.

An adapted matrix is named by its keys without the factor: a linear layer's LoRA `{module}/lora/A|B` is the
matrix `{module}` (its merged update `{module}/merged/dW`); expert j's LoRA on projection `proj` of a MoE block
(`adapters.moe_lora`), `{block}/{j}/{proj}_A|B`, is the matrix `{block}/{j}/{proj}` (merged: `{block}/{j}/{proj}_dW`).
So every method below treats each expert's projection as one more adapted matrix: HetLoRA truncates and
norm-weights per expert, FlexLoRA averages and decomposes per expert, FLoRA stacks per expert.
"""

from __future__ import annotations

import torch

from fedmole.adapters.state import SEP, key, parse_key
from fedmole.messages import Tensors
LORA, MERGED = "lora", "merged"  # expert ids: the trainable LoRA, and a merged dense update dW


# ------------------------------------------------------------------------------------- keys <-> pairs
def split_factor(k: str) -> tuple[str, str] | None:
    """(matrix, factor) of a LoRA-factor key, factor in A | B; None for any other key (routers, dW, ...)."""
    module, expert, name = parse_key(k)
    if expert == LORA and name in ("A", "B"):
        return module, name
    if expert.isdigit():
        proj, _, factor = name.rpartition("_")
        if proj and factor in ("A", "B"):
            return f"{module}{SEP}{expert}{SEP}{proj}", factor
    return None


def factor_key(matrix: str, factor: str) -> str:
    """The key of factor A | B (or the merged dW) of an adapted matrix; the inverse of `split_factor`."""
    if SEP in matrix:  # an expert's projection: {block}/{j}/{proj} -> {block}/{j}/{proj}_{factor}
        return f"{matrix}_{factor}"
    return key(matrix, MERGED if factor == "dW" else LORA, factor)


def lora_pairs(state: Tensors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{matrix: (A, B)} from the LoRA-factor keys of `state` (other keys are ignored), sorted by matrix."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in state.items():
        found = split_factor(k)
        if found:
            parts.setdefault(found[0], {})[found[1]] = t
    return {m: (p["A"], p["B"]) for m, p in sorted(parts.items())}


def from_pairs(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Tensors:
    out = {}
    for matrix, (A, B) in pairs.items():
        out[factor_key(matrix, "A")], out[factor_key(matrix, "B")] = A, B
    return out


def lora_only(state: Tensors) -> Tensors:
    """The trainable LoRA tensors of `state` (what a client uploads), without merged dense updates."""
    return {k: t for k, t in state.items() if split_factor(k)}


def is_factor(k: str, factor: str) -> bool:
    """Whether `k` names factor A or B of an adapted matrix (or the batched parameter of one, `{block}/experts/
    {proj}_B`, as `AdapterSet.parameters()` lists a MoE block's)."""
    name = parse_key(k).name
    return name == factor or name.endswith("_" + factor)


def merged_key(matrix: str) -> str:
    return factor_key(matrix, "dW")


def merged_matrix(k: str) -> str:
    """The adapted matrix whose merged update `k` is; the inverse of `merged_key`."""
    module, expert, name = parse_key(k)
    if expert == MERGED and name == "dW":
        return module
    if expert.isdigit() and name.endswith("_dW"):
        return f"{module}{SEP}{expert}{SEP}{name.removesuffix('_dW')}"
    raise KeyError(f"{k} is not a merged update (…/merged/dW or …/<expert>/<proj>_dW)")


def zero_merged_state(adapters) -> Tensors:
    """A zero merged update per adapted matrix: {merged key: (d_out, d_in)}."""
    return {merged_key(m): torch.zeros(B.shape[0], A.shape[1]) for m, (A, B) in lora_pairs(adapters.state()).items()}


# ------------------------------------------------------------------------------------------- maths
def resize_rank(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first min(r, r_old) components (zero-padding up to r), so that
    (α/r) B' A' = (α/r_old) B[:, :r] A[:r] : the update of the kept components is unchanged."""
    r_old = A.shape[0]
    if r == r_old:
        return A, B
    k = min(r, r_old)
    A_new = A.new_zeros(r, A.shape[1])
    B_new = B.new_zeros(B.shape[0], r)
    A_new[:k] = A[:k]
    B_new[:, :k] = B[:, :k] * (r / r_old)
    return A_new, B_new


def scaled_product(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """(α/r) B A in float64: (d_out, d_in)."""
    return (alpha / A.shape[0]) * (B.to(torch.float64) @ A.to(torch.float64))


def product_norm(A: torch.Tensor, B: torch.Tensor, alpha: float) -> float:
    """‖(α/r) B A‖_F via ‖BA‖_F² = Σ (BᵀB) ∘ (AAᵀ), two (r, r) matrices instead of (d_out, d_in)."""
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    sq = ((B64.T @ B64) * (A64 @ A64.T)).sum().clamp(min=0)
    return float(alpha / A.shape[0] * sq.sqrt())


def svd_factors(dW: torch.Tensor, ranks: list[int], alpha: float) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{r: (A, B)}: LoRA factors at rank r and scale α/r whose update is the best rank-r approximation of dW,
    from one thin SVD dW = U Σ Vᵀ:  A = Vᵀ[:r],  B = U[:, :r] diag(Σ[:r]) / (α/r).  float32; A: (r, d_in),
    B: (d_out, r); components beyond the matrix's rank are zero."""
    U, S, Vh = torch.linalg.svd(dW.to(torch.float32), full_matrices=False)  # U: (d_out, q), S: (q,), Vh: (q, d_in)
    out = {}
    for r in ranks:
        k = min(r, S.shape[0])
        A = U.new_zeros(r, dW.shape[1])
        B = U.new_zeros(dW.shape[0], r)
        A[:k] = Vh[:k]
        B[:, :k] = U[:, :k] * (S[:k] / (alpha / r))
        out[r] = (A, B)
    return out


def stack(factors: list[tuple[torch.Tensor, torch.Tensor, float]], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking of client factors [(A_i, B_i, p_i)] (float64):
    A_stack = concat_rows(p_i (α/r_i) A_i): (Σ r_i, d_in),  B_stack = concat_cols(B_i): (d_out, Σ r_i),
    so that B_stack A_stack = Σ p_i (α/r_i) B_i A_i. The weights and scales are folded into the A blocks."""
    A_stack = torch.cat([p * (alpha / A.shape[0]) * A.to(torch.float64) for A, _, p in factors], dim=0)
    B_stack = torch.cat([B.to(torch.float64) for _, B, _ in factors], dim=1)
    return A_stack, B_stack
