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

Per-expert LoRA on a MoE block's fused experts (`adapters.moe_lora`, keys `{block}/{j}/{proj}_A|B|dW`) goes
through peft's `target_parameters` (peft >= 0.17: a LoRA on a 3-D `nn.Parameter`, one (A, B) per expert):
- `{block}.experts.gate_up_proj` (M, 2I, d) holds gate and up stacked, so expert j's gate and up LoRAs become
  one LoRA of rank r_gate + r_up: A_j = [A_gate ; A_up], B_j = [[B_gate, 0], [0, B_up]] (block diagonal);
  `{block}.experts.down_proj` takes the down LoRA as it is;
- each expert's update (its LoRA and, where there is one, its merged dW factored exactly by SVD) is folded into
  A at scale 1 (alpha = rank), and experts of lower rank are zero-padded to the parameter's largest rank;
- peft's parameter LoRA has no dropout (it refuses lora_dropout > 0), so such an export says lora_dropout 0.
The adapter is written by a peft model built on a fresh copy of the base (`base_factory`), so the file layout
(peft nests the wrappers of two parameters of one module) is peft's own.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmole.adapters.state import SEP, parse_key
from fedmole.algorithms.lora_ops import MERGED, lora_pairs
from fedmole.config import AlgorithmConfig
from fedmole.errors import UserError
from fedmole.messages import Tensors


def _factor_dense(dW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A = dW at dW's numerical rank (float64): A: (k, d_in), B: (d_out, k)."""
    U, S, Vh = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)
    tol = S.max() * max(dW.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    k = int((S > tol).sum())
    return Vh[:k], U[:, :k] * S[:k]


def peft_tensors(state: Tensors, alpha: float) -> tuple[Tensors, dict[str, int], dict[str, float]]:
    """(peft weights, rank per module, alpha per module) for the linear layers of a fedmole LoRA state."""
    pairs = {m: p for m, p in lora_pairs(state).items() if SEP not in m}
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


def _expert_updates(state: Tensors, alpha: float) -> dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(block, expert, proj): (A, B)} with B A = the expert's whole update at scale 1 (float64): its LoRA
    (α/r folded into A) stacked with its merged dW factored by SVD."""
    blocks: dict[tuple[str, int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for matrix, (A, B) in lora_pairs(state).items():
        if SEP in matrix:
            block, j, proj = matrix.split(SEP)
            blocks.setdefault((block, int(j), proj), []).append(
                ((alpha / A.shape[0]) * A.to(torch.float64), B.to(torch.float64)))
    for k, dW in state.items():
        module, expert, name = parse_key(k)
        if expert.isdigit() and name.endswith("_dW"):
            blocks.setdefault((module, int(expert), name.removesuffix("_dW")), []).insert(0, _factor_dense(dW))
    return {m: (torch.cat([a for a, _ in bs]), torch.cat([b for _, b in bs], dim=1)) for m, bs in blocks.items()}


def expert_parameter_tensors(state: Tensors, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{`{block}.experts.gate_up_proj` | `...down_proj`: (A, B)} batched over experts, A: (M, r, d_in),
    B: (M, d_out, r), scale 1; gate and up stacked block-diagonally into gate_up, ranks zero-padded to the
    parameter's largest."""
    updates = _expert_updates(state, alpha)
    out = {}
    for block in sorted({b for b, _, _ in updates}):
        M = 1 + max(j for b, j, _ in updates if b == block)
        for param, projs in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
            if not any((block, 0, p) in updates for p in projs):
                continue
            per_expert = []
            for j in range(M):
                parts = [updates[(block, j, p)] for p in projs if (block, j, p) in updates]
                d_outs = [b.shape[0] for _, b in parts]
                A = torch.cat([a for a, _ in parts])  # (Σ r_p, d_in)
                B = A.new_zeros(sum(d_outs), A.shape[0])  # block diagonal: gate rows x gate ranks, up x up
                rows = cols = 0
                for a, b in parts:
                    B[rows : rows + b.shape[0], cols : cols + a.shape[0]] = b
                    rows, cols = rows + b.shape[0], cols + a.shape[0]
                per_expert.append((A, B))
            r = max(1, max(a.shape[0] for a, _ in per_expert))
            A = torch.zeros(M, r, per_expert[0][0].shape[1], dtype=torch.float64)
            B = torch.zeros(M, per_expert[0][1].shape[0], r, dtype=torch.float64)
            for j, (a, b) in enumerate(per_expert):
                A[j, : a.shape[0]], B[j, :, : a.shape[0]] = a, b
            out[f"{block}.experts.{param}"] = (A, B)
    return out


def export_peft(state: Tensors, algorithm: AlgorithmConfig, out_dir: str | Path, base_model: str | None = None,
                base_factory: Callable[[], torch.nn.Module] | None = None) -> Path:
    """Write `state` as a peft LoRA adapter directory; returns the directory. A state with per-expert LoRA on a
    MoE model's experts needs `base_factory`, which returns a fresh copy of the plain base model."""
    from peft import LoraConfig

    if not algorithm.peft_export:
        raise UserError(f"algorithm {algorithm.name} has no LoRA adapter to export in peft format")
    if not state:
        raise UserError(f"algorithm {algorithm.name} has no adapter state to export here (no global model?)")
    weights, ranks, alphas = peft_tensors(state, algorithm.alpha)
    experts = expert_parameter_tensors(state, algorithm.alpha)
    for param, (A, _) in experts.items():
        ranks[param], alphas[param] = A.shape[1], float(A.shape[1])  # scale 1
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0 if experts else algorithm.dropout,  # peft's parameter LoRA refuses dropout
        target_modules=sorted(m for m in ranks if m not in experts),
        target_parameters=sorted(experts) or None,
        rank_pattern={re.escape(m): v for m, v in ranks.items() if v != r},
        alpha_pattern={re.escape(m): v for m, v in alphas.items() if v != lora_alpha},
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not experts:
        config.save_pretrained(str(out))
        save_file(weights, str(out / "adapter_model.safetensors"))
        return out
    if base_factory is None:
        raise ValueError("exporting per-expert LoRA in peft format needs base_factory (a fresh base model)")
    _save_with_peft(config, weights, experts, base_factory(), out)
    return out


def _save_with_peft(config, weights: Tensors, experts: dict, base: torch.nn.Module, out: Path) -> None:
    """Build the peft model on `base`, set every LoRA factor through its modules, and let peft write it."""
    import warnings

    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    name = config.base_model_name_or_path
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5 (FutureWarning), renames
        warnings.simplefilter("ignore")  # the base after the in-memory model and warns on pattern keys of parameters
        model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = name  # the run's base, not the in-memory copy's name
    found = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
                continue
            path = name.replace(".base_layer", "").removeprefix("base_model.model.")
            if isinstance(mod, ParamWrapper):
                key = f"{path}.{mod.parameter_name}"
                A, B = experts[key]  # (M, r, d_in), (M, d_out, r) -> peft's (M*r, d_in), (d_out, r*M)
                mod.lora_A["default"].weight.copy_(A.reshape(-1, A.shape[-1]))
                mod.lora_B["default"].weight.copy_(B.permute(1, 2, 0).reshape(B.shape[1], -1))
            else:
                key = path
                mod.lora_A["default"].weight.copy_(weights[f"base_model.model.{path}.lora_A.weight"])
                mod.lora_B["default"].weight.copy_(weights[f"base_model.model.{path}.lora_B.weight"])
            found.add(key)
    missing = (set(experts) | {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                               for k in weights if k.endswith("lora_A.weight")}) - found
    if missing:
        raise RuntimeError(f"peft built no LoRA layer for {sorted(missing)[:3]}")
    model.save_pretrained(str(out))
