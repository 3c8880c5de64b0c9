"""The local training loop, visible in one function (no Trainer).

A fresh optimiser every round (the federated LoRA convention), a constant learning rate within the round,
optional gradient clipping, and hooks (`TrainHooks`) for algorithms and the runtime: `extra_loss()` adds a
method-specific term after each forward pass (e.g. AMoLE's load-balancing loss), `before_step()` edits
gradients before the optimiser step (e.g. FedProx's proximal term) and `on_step(step, loss)` follows progress.
The batches come from the client's persistent stream (`Batches`, `client_batches`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmole.client.data import BatchStream, EncodedClient
from fedmole.config import Config, TrainConfig
from fedmole.data.tokenize import collate


Params = list[nn.Parameter] | list[dict]


def flat_params(params: Params) -> list[nn.Parameter]:
    """The parameters of a list of parameters or of param groups (`{"params": [...], "lr_scale": x}`)."""
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


_IMPL = {"auto": {}, "loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_optimizer(params: Params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """`params` may be param groups; a group's optional `lr_scale` multiplies the round's lr for it.
    `cfg.optimizer_impl` picks torch's implementation of the update (auto: torch's default)."""
    if params and isinstance(params[0], dict):
        params = [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in params]
    impl = _IMPL[cfg.optimizer_impl]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **impl)


def round_lr(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """The learning rate of round `rnd` of `rounds` (counted from 1), constant within the round: lr * decay^(rnd-1)
    (exponential), or lr_min + (lr - lr_min)(1 + cos(pi rnd / rounds)) / 2 (cosine, the FlowerTune template's)."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * rnd / rounds))
    return cfg.lr * cfg.lr_decay ** max(rnd - 1, 0)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    # left padding: positions count real tokens only, as if each sequence started at position 0
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


@dataclass
class Batches:
    """A client's training batches: the examples of `encoded` its `stream` draws next, collated (left-padded
    with `pad_id`) and on `device`. The stream's cursor says where the next round resumes."""

    encoded: list[dict]
    stream: BatchStream
    pad_id: int
    device: torch.device

    def next(self) -> dict[str, torch.Tensor]:
        return to_device(collate([self.encoded[i] for i in self.stream.next()], self.pad_id), self.device)


def client_batches(data: EncodedClient, cfg: Config, cursor: dict | None, pad_id: int,
                   device: torch.device) -> Batches:
    """The training batches of client `data.client_id` from `cursor` on (None: the start of its stream),
    drawn as local training draws them (`train.batch_size`, shuffles seeded by `federation.seed`)."""
    stream = BatchStream(len(data.train), cfg.train.batch_size, cfg.federation.seed, data.client_id, cursor)
    return Batches(data.train, stream, pad_id, device)


@dataclass
class TrainHooks:
    """What an algorithm or the runtime adds to the loop: `extra_loss()` after each forward pass (a term
    added to the loss, or None), `before_step()` after the backward pass (edits gradients), `on_step(step,
    loss)` after each optimiser step (progress, injected crashes)."""

    extra_loss: Callable[[], torch.Tensor | None] | None = None
    before_step: Callable[[], None] | None = None
    on_step: Callable[[int, float], None] | None = None


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can compute logits for the last positions only (transformers' causal LMs)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def response_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions that predict a labelled token, for a left-padded batch with labels.

    Left padding ends every sequence in the last column, so those positions are the last `keep` columns,
    where `keep` reaches one column before the earliest labelled one. The model projects only those onto
    the vocabulary (`logits_to_keep`): the projection is about a fifth of SmolLM2-135M's forward FLOPs, and
    prompt positions carry no label. targets[:, t] is the label logits[:, t] predicts (-100: ignore)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    width = labels.shape[1]
    labelled = (labels != -100).any(0).nonzero()
    keep = min(width - int(labelled[0]) + 1, width) if len(labelled) else 1
    if takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, -keep:]
    return logits[:, :-1], labels[:, width - keep + 1 :]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (response) tokens of a left-padded batch, as the model's own
    `loss`, computed from `response_logits`. A model configured to add its router's auxiliary loss
    (`output_router_logits`) keeps its own loss, which includes that term."""
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        return model(**batch).loss
    logits, targets = response_logits(model, batch)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def local_train(model: nn.Module, params: Params, batches: Batches, steps: int, lr: float, cfg: TrainConfig,
                hooks: TrainHooks | None = None) -> dict[str, float]:
    """Run `steps` optimiser steps on the next `steps` batches; returns mean loss and token counts."""
    hooks = hooks or TrainHooks()
    opt = make_optimizer(params, cfg, lr)
    params = flat_params(params)
    for p in params:
        p.requires_grad_(True)
    model.train()
    total_loss, total_tokens = 0.0, 0
    for step in range(steps):
        batch = batches.next()
        loss = causal_lm_loss(model, batch)  # mean CE over response tokens (prompt labels are -100)
        task_loss = loss.item()
        if hooks.extra_loss is not None:
            extra = hooks.extra_loss()
            if extra is not None:
                loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hooks.before_step is not None:
            hooks.before_step()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        total_loss += task_loss
        total_tokens += int((batch["labels"] != -100).sum())
        if hooks.on_step is not None:
            hooks.on_step(step + 1, task_loss)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return {"loss": total_loss / steps, "steps": steps, "tokens": total_tokens}
