"""Mean layer inputs over a client's aux split: what RSEA's embeddings are computed from.

A forward pre-hook on each module accumulates the sum of its input over the real tokens of every batch
(padding excluded; prompt and response tokens, BOS and EOS included) in eval mode without gradients. The
per-batch means are kept too, for bounds that need them (the DP clip bound of FedAMoLE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmole.client.train import to_device
from fedmole.data.tokenize import collate


@dataclass
class InputMeans:
    """Per module: the token-weighted mean input (d_in,) and the per-batch means (batches, d_in)."""

    mean: dict[str, torch.Tensor]
    batch_means: dict[str, torch.Tensor]
    tokens: int


@torch.no_grad()
def layer_input_means(model: nn.Module, modules: dict[str, nn.Module], encoded: list[dict], batch_size: int,
                      pad_id: int, device: torch.device) -> InputMeans:
    """Run `model` over `encoded` (tokenised examples) and average each module's input over the tokens."""
    sums: dict[str, list[torch.Tensor]] = {path: [] for path in modules}
    counts: list[torch.Tensor] = []
    mask: dict[str, torch.Tensor] = {}

    def hook(path):
        def record(module, args):
            x = args[0]  # (B, L, d_in)
            w = mask["m"].to(torch.float64).unsqueeze(-1)  # (B, L, 1): 1 on real tokens
            sums[path].append((x.to(torch.float64) * w).sum(dim=(0, 1)))
        return record

    handles = [mod.register_forward_pre_hook(hook(path)) for path, mod in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(encoded), batch_size):
            batch = to_device(collate([{"input_ids": e["input_ids"]} for e in encoded[i : i + batch_size]], pad_id), device)
            mask["m"] = batch["attention_mask"]
            counts.append(batch["attention_mask"].sum().to(torch.float64))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not counts:
        return InputMeans({}, {}, 0)
    n = torch.stack(counts)  # (batches,)
    mean, batch_means = {}, {}
    for path, parts in sums.items():
        s = torch.stack(parts)  # (batches, d_in)
        batch_means[path] = (s / n.unsqueeze(-1)).float().cpu()
        mean[path] = (s.sum(0) / n.sum()).float().cpu()
    return InputMeans(mean, batch_means, int(n.sum()))
