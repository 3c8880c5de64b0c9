"""Export of a LoRA-method adapter (global or one client's) in peft's format.

`export_peft(state, algorithm, out_dir)` writes `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base_model, out_dir)` loads into a model that computes the same logits as
fedmole's adapted model. `state` is the complete adapter state as a client's adapters hold it
(`Strategy.export_state`), keyed `{module}/lora/A|B` and optionally `{module}/merged/dW`.

Per adapted matrix:
- LoRA only: lora_A = A (r, d_in), lora_B = B (d_out, r), rank r and alpha α, so peft's scale α/r is ours.
  A client's rank (HetLoRA, FlexLoRA, FLoRA tiers) is exported as is: its own r.
- With a merged dense update dW (FLoRA's merged base, FlexLoRA's global ΔW): dW is factored exactly by SVD at
  its numerical rank k, dW = (U_k Σ_k) V_kᵀ, and stacked with the LoRA (scale folded into its A block):
  lora_A = [V_kᵀ ; (α/r) A], lora_B = [U_k Σ_k, B], rank k + r, alpha = rank (scale 1).
Ranks and alphas that differ from the most common one go into peft's `rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmole.adapters.state import parse_key
from fedmole.algorithms.lora_ops import MERGED, lora_pairs
from fedmole.config import AlgorithmConfig, LoRAKeys
from fedmole.errors import UserError

Tensors = dict[str, torch.Tensor]


def _factor_dense(dW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A = dW at dW's numerical rank (float64): A: (k, d_in), B: (d_out, k)."""
    U, S, Vh = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)
    tol = S.max() * max(dW.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    k = int((S > tol).sum())
    return Vh[:k], U[:, :k] * S[:k]


def peft_tensors(state: Tensors, alpha: float) -> tuple[Tensors, dict[str, int], dict[str, float]]:
    """(peft weights, rank per module, alpha per module) for a fedmole LoRA state."""
    pairs = lora_pairs(state)
    merged = {parse_key(k).module: t for k, t in state.items() if parse_key(k).expert == MERGED}
    weights, ranks, alphas = {}, {}, {}
    for module in sorted(set(pairs) | set(merged)):
        if module in merged:
            blocks = [_factor_dense(merged[module])]
            if module in pairs:
                A, B = pairs[module]
                blocks.append(((alpha / A.shape[0]) * A.to(torch.float64), B.to(torch.float64)))
            A_out = torch.cat([a for a, _ in blocks], dim=0)
            B_out = torch.cat([b for _, b in blocks], dim=1)
            if A_out.shape[0] == 0:  # nothing merged and no LoRA: a rank-1 zero update
                A_out, B_out = A_out.new_zeros(1, A_out.shape[1]), B_out.new_zeros(B_out.shape[0], 1)
            r, a = A_out.shape[0], float(A_out.shape[0])  # scale 1
        else:
            A_out, B_out = pairs[module]
            r, a = A_out.shape[0], float(alpha)
        weights[f"base_model.model.{module}.lora_A.weight"] = A_out.to(torch.float32).contiguous()
        weights[f"base_model.model.{module}.lora_B.weight"] = B_out.to(torch.float32).contiguous()
        ranks[module], alphas[module] = r, a
    return weights, ranks, alphas


def export_peft(state: Tensors, algorithm: AlgorithmConfig, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write `state` as a peft LoRA adapter directory; returns the directory."""
    from peft import LoraConfig

    if not isinstance(algorithm, LoRAKeys):
        raise UserError(f"algorithm {algorithm.name} has no LoRA adapter to export in peft format")
    if not state:
        raise UserError(f"algorithm {algorithm.name} has no adapter state to export here (no global model?)")
    weights, ranks, alphas = peft_tensors(state, algorithm.alpha)
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=algorithm.dropout,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(m): v for m, v in ranks.items() if v != r},
        alpha_pattern={re.escape(m): v for m, v in alphas.items() if v != lora_alpha},
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(weights, str(out / "adapter_model.safetensors"))
    return out
