"""Sparse mixtures of experts with per-expert LoRA, for FLAME (arXiv 2506.16600).

Two layers share one routing core (`RoutedExperts`):

- `SparseMoELoRA` replaces a pretrained Hugging Face sparse-MoE block (OLMoE, Mixtral, Qwen2-MoE,
  Qwen3-MoE: fused 3-D expert weights `gate_up_proj` (M, 2I, d) and `down_proj` (M, d, I), router weight
  W_g (M, d)). For a token x, on a client that activates k_i experts:

      p   = softmax(W_g x)                         # (M,), fp32, over ALL experts
      S   = TopK_{k_i}(p);  g_j = p_j for j in S    # not renormalised unless the model does (Mixtral)
      y_j = down'_j( silu(gate'_j(x)) * up'_j(x) ),   proj'(v) = W_proj v + (alpha/r) B_proj A_proj v
      h   = s * sum_{j in S} g_j y_j               # s: the learnable rescaler, on the WHOLE MoE output

  Tokens are grouped by expert (sort, then scatter into a zero-padded (M, C, d) buffer, C = the largest
  number of tokens any expert got) and every projection is one batched matmul over experts, base and LoRA
  alike; no Python loop over experts.

- `LoRAExpertPool` is the dense variant: a frozen `nn.Linear` W plus a pool of M LoRA experts and a
  trainable router W_r (M, d_in), so FLAME also runs on dense models:

      y = W x + s * sum_{j in TopK_{k_i}(p)} p_j (alpha/r) B_j A_j x,   p = softmax(W_r x)

  Here s rescales the expert mixture only: the frozen W x is not a routed output and does not shrink.
  Two ways to compute it (`dispatch`): `dense` (default) computes A_j x for all M experts in one matmul and
  zeroes the unchosen ones' weights, with one dropout mask on x shared by the experts of a token; `sparse`
  sorts the (token, expert) pairs by expert and runs only the chosen experts (grouped matmuls without padding
  on CPU, the SMoE block's padded buffer elsewhere), with one dropout mask per (token, expert) pair, so the
  cost falls with k; at k = M (every expert chosen) it computes as `dense`. Without dropout both give the
  same numbers up to float rounding.

Trainable tensors by expert id (see `adapters.state`):
  `{block}/{j}/{proj}_A`, `{block}/{j}/{proj}_B`  expert j's LoRA on proj in {gate, up, down} (SMoE block)
  `{module}/{j}/A`, `{module}/{j}/B`             expert j of a dense pool
  `{path}/router/W`                              the router (dense pools; SMoE blocks with train_router)
  `{path}/rescaler/log_s`                        log of the rescaler s (s = exp(log_s) > 0)

Every layer also counts, during training forward passes, how many non-padding tokens it routed to each
expert (FLAME's a_i^{l,j}); the attention mask reaches the layers through `MoEContext`, which a forward
pre-hook on the model fills before every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmole.adapters.base import Adapter
from fedmole.adapters.lora import kaiming_uniform_

PROJECTIONS = ("gate", "up", "down")
FACTORS = ("A", "B")
ALL_EXPERTS = "experts"  # expert id of parameters batched over every expert (`trainable_parameters()`)
ROUTER, RESCALER = "router", "rescaler"


# ------------------------------------------------------------------------------------------ context
class MoEContext:
    """State shared by every routed layer of one model: the current attention mask, the number of
    non-padding tokens seen by training forward passes, pending auxiliary losses, and the probe switch
    for measuring the routed probability mass."""

    def __init__(self):
        self.mask: torch.Tensor | None = None  # (batch, seq) 1 = real token, 0 = padding
        self.tokens = 0  # non-padding tokens of training forward passes since `reset`
        self.aux_losses: list[torch.Tensor] = []
        self.measure_mass = False

    def reset(self) -> None:
        self.tokens = 0
        self.aux_losses = []

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: remember the attention mask; count tokens when training."""
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.mask = mask if mask is not None and mask.dim() == 2 else None
        if module.training and torch.is_grad_enabled():
            if self.mask is not None:
                self.tokens += int(self.mask.sum())
            elif ids is not None:
                self.tokens += ids.numel()

    def token_mask(self, n_tokens: int, device) -> torch.Tensor:
        """(n_tokens,) float mask of the flattened batch; all ones when no (matching) mask is known."""
        if self.mask is not None and self.mask.numel() == n_tokens:
            return self.mask.reshape(-1).to(device=device, dtype=torch.float32)
        return torch.ones(n_tokens, device=device)


def attach_context(model: nn.Module) -> MoEContext:
    ctx = MoEContext()
    model.register_forward_pre_hook(ctx.hook, with_kwargs=True)
    return ctx


# ------------------------------------------------------------------------------------------ routing
class RoutedExperts(nn.Module, Adapter):
    """Top-k routing over M experts with k settable per client, activation counting, the optional
    load-balancing loss, the rescaler, and the probability-mass probe (FLAME section 5)."""

    def __init__(self, num_experts: int, top_k: int, renormalize: bool, ctx: MoEContext, device):
        super().__init__()
        self.M, self.K, self.k = num_experts, top_k, top_k
        self.renormalize = renormalize
        self.ctx = ctx
        self.router_trainable = False
        self.log_s = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)  # s = exp(log_s)
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False)
        self.mass_ratio: float | None = None

    def set_active_experts(self, k: int) -> None:
        if not 1 <= k <= self.K:
            raise ValueError(f"active experts k={k} is outside 1..K={self.K}")
        self.k = k

    def settings(self) -> dict:
        """The run-time setting that is not a tensor: how many experts each token activates."""
        return {"k": self.k}

    def apply_settings(self, settings: dict) -> None:
        self.set_active_experts(int(settings["k"]))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, M) router logits -> gate weights g (N, k) in fp32 and expert ids (N, k)."""
        p = torch.softmax(logits.float(), dim=-1)  # (N, M)
        g, idx = torch.topk(p, self.k, dim=-1)
        if self.renormalize:
            g = g / g.sum(dim=-1, keepdim=True)
        self._observe(p, idx)
        return g, idx

    def _observe(self, p: torch.Tensor, idx: torch.Tensor) -> None:
        training = self.training and torch.is_grad_enabled()
        if not (training or self.ctx.measure_mass):
            return
        mask = self.ctx.token_mask(p.shape[0], p.device)  # (N,)
        if training:
            with torch.no_grad():  # a_i^{l,j} += non-pad tokens routed to j
                self.counts.index_add_(0, idx.reshape(-1), mask.repeat_interleave(self.k).to(self.counts.dtype))
            if self.router_trainable:
                self.ctx.aux_losses.append(self.balance_loss(p, idx, mask))
        if self.ctx.measure_mass:
            self.mass_ratio = self._mass_ratio(p, mask)

    def balance_loss(self, p: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Switch/OLMoE load balancing, M * sum_j f_j P_j over real tokens, where f_j is the fraction of
        tokens routed to j (summing to k over experts) and P_j the mean router probability of j."""
        n = mask.sum().clamp(min=1)
        routed = torch.zeros_like(p).scatter_(1, idx, 1.0)  # (N, M) one-hot of the k choices
        f = (routed * mask[:, None]).sum(0) / n
        P = (p * mask[:, None]).sum(0) / n
        return self.M * (f * P).sum()

    @torch.no_grad()
    def _mass_ratio(self, p: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean over real tokens of sum_{top-K} p / sum_{top-k} p (1 when the model renormalises)."""
        if self.renormalize:
            return 1.0
        top = torch.topk(p, self.K, dim=-1).values  # (N, K), sorted descending
        ratio = top.sum(-1) / top[:, : self.k].sum(-1)
        return float((ratio * mask).sum() / mask.sum().clamp(min=1))

    @property
    def s(self) -> torch.Tensor:
        return self.log_s.exp()

    def reset_counts(self) -> None:
        self.counts.zero_()


# ------------------------------------------------------------------------------- pretrained SMoE block
@dataclass(frozen=True)
class Family:
    """How a Hugging Face MoE family routes (everything else is the shared fused-expert layout)."""

    always_renormalize: bool = False  # Mixtral divides the kept weights by their sum unconditionally
    shared_expert: bool = False  # Qwen2-MoE adds a sigmoid-gated dense shared expert
    jitter: bool = False  # Mixtral's optional multiplicative input jitter in training


FAMILIES = {
    "OlmoeSparseMoeBlock": Family(),
    "Qwen3MoeSparseMoeBlock": Family(),
    "Qwen2MoeSparseMoeBlock": Family(shared_expert=True),
    "MixtralSparseMoeBlock": Family(always_renormalize=True, jitter=True),
}


def find_moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Supported sparse-MoE blocks by module path, in model order."""
    return {name: mod for name, mod in model.named_modules() if type(mod).__name__ in FAMILIES}


def unsupported_moe_blocks(model: nn.Module) -> list[str]:
    """Class names of MoE-looking blocks (a router plus experts) that `SparseMoELoRA` cannot wrap."""
    return sorted({
        type(mod).__name__ for mod in model.modules()
        if type(mod).__name__ not in FAMILIES and hasattr(mod, "experts") and hasattr(mod, "gate")
    })


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `t`, with a backward that is bit-reproducible on the device: on CPU the gradient of
    advanced indexing (`t[index]`) is accumulated by several threads in a varying order (torch 2.13), while
    `index_select`'s (index_add_) is not; on CUDA it is the other way round."""
    return t.index_select(0, index) if t.device.type == "cpu" else t[index]


class _Regroup(torch.autograd.Function):
    """`x.index_select(0, index)` where `index` visits every row of x exactly `k` times (a permutation of the
    (row, copy) pairs), with the backward as a gather by the inverse permutation `inverse` (pair q of the
    row-major order came out at position `inverse[q]`) and a sum over each row's k copies. The default
    backward of a gather allocates a zeroed x-sized buffer and index-adds into it, two passes over the largest
    tensors of a pool per call; this is one gather, deterministic on any number of threads, and for k = 1
    exactly the same numbers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        pairs = grad.index_select(0, inverse)  # row-major (row, copy) order
        return (pairs if ctx.k == 1 else pairs.view(-1, ctx.k, pairs.shape[-1]).sum(1)), None, None, None


@dataclass
class Groups:
    """The (token, expert) pairs of a batch grouped by expert: pair p = (token t, its i-th choice) sits in
    row `slot[p]` of a flat (M*C, .) buffer, expert j owning rows j*C .. j*C + C - 1."""

    token: torch.Tensor  # (S,) token of each pair, in expert order (S = N*k)
    row: torch.Tensor  # (S,) buffer row of each pair, in expert order
    slot: torch.Tensor  # (S,) buffer row of each pair, in token-major order (the order of idx.reshape(-1))
    capacity: int  # C, the most pairs any expert received

    @classmethod
    def of(cls, idx: torch.Tensor, num_experts: int) -> "Groups":
        flat = idx.reshape(-1)  # (S,)
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        counts = torch.bincount(flat, minlength=num_experts)  # (M,)
        capacity = int(counts.max())
        starts = counts.cumsum(0) - counts
        row = expert * capacity + torch.arange(flat.numel(), device=flat.device) - starts[expert]
        slot = torch.empty_like(row)
        slot[order] = row
        return cls(order // idx.shape[1], row, slot, capacity)

    def scatter(self, x: torch.Tensor, num_experts: int) -> torch.Tensor:
        """(N, d) token states -> (M, C, d) expert rows, zero-padded."""
        buf = x.new_zeros(num_experts * self.capacity, x.shape[-1]).index_copy(0, self.row, _take(x, self.token))
        return buf.view(num_experts, self.capacity, -1)

    def gather(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(M, C, d) expert outputs and (N, k) gate weights -> (N, d) weighted sum over each token's experts."""
        n, k = weights.shape
        pairs = _take(rows.reshape(-1, rows.shape[-1]), self.slot) * weights.reshape(-1, 1).to(rows.dtype)  # (S, d)
        return pairs.view(n, k, -1).sum(1)  # deterministic, unlike index_add_ on GPU


class SparseMoELoRA(RoutedExperts):
    """A pretrained sparse-MoE block with a LoRA on each (expert, projection), top-k_i routing and a
    rescaler on the whole MoE output. Base weights stay frozen and in their dtype; LoRA trains in fp32."""

    def __init__(self, block: nn.Module, rank: int, alpha: float, dropout: float, ctx: MoEContext,
                 projections: tuple[str, ...] = PROJECTIONS, train_router: bool = False):
        family = FAMILIES[type(block).__name__]
        router, experts = block.gate, block.experts
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) \
                or not getattr(experts, "is_concatenated", True):
            raise ValueError(f"{type(experts).__name__} stores its experts in a layout this layer does not read "
                             f"(bias, transposed or interleaved gate/up)")
        renormalize = family.always_renormalize or bool(getattr(router, "norm_topk_prob", False))
        device = experts.down_proj.device
        super().__init__(router.weight.shape[0], router.top_k, renormalize, ctx, device)
        self.router, self.experts = router, experts  # frozen; W_g (M, d), gate_up (M, 2I, d), down (M, d, I)
        block.requires_grad_(False)  # the pretrained router and experts never train (see W_r for train_router)
        self.jitter = getattr(block, "jitter_noise", 0.0) if family.jitter else 0.0
        self.shared_expert = block.shared_expert if family.shared_expert else None
        self.shared_expert_gate = block.shared_expert_gate if family.shared_expert else None
        self.projections = tuple(projections)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d, inter = experts.down_proj.shape[1], experts.down_proj.shape[2]
        self.dims = {"gate": (inter, d), "up": (inter, d), "down": (d, inter)}  # (d_out, d_in)
        self.A = nn.ParameterDict({m: nn.Parameter(torch.zeros(self.M, rank, self.dims[m][1], device=device),
                                                   requires_grad=False) for m in self.projections})
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(self.M, self.dims[m][0], rank, device=device),
                                                   requires_grad=False) for m in self.projections})
        self.router_trainable = train_router
        if train_router:  # an fp32 trainable copy of W_g; the pretrained weight is the initial value
            self.W_r = nn.Parameter(router.weight.detach().float().clone(), requires_grad=False)

    # ---------------------------------------------------------------------------------------- forward
    def _project(self, proj: str, rows: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """(M, C, d_in) -> (M, C, d_out): W_j v + (alpha/r) B_j A_j v for every expert j at once."""
        out = torch.bmm(rows, W.transpose(1, 2))  # frozen W: (M, d_out, d_in)
        if proj not in self.A:
            return out
        A, B = self.A[proj], self.B[proj]  # (M, r, d_in), (M, d_out, r)
        h = torch.bmm(self.dropout(rows).to(A.dtype), A.transpose(1, 2)) * self.scaling  # (M, C, r)
        if out.dtype == A.dtype:
            return torch.baddbmm(out, h, B.transpose(1, 2))  # add the low-rank term inside the matmul
        return out + torch.bmm(h, B.transpose(1, 2)).to(out.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        if self.training and self.jitter > 0:
            hidden = hidden * torch.empty_like(hidden).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        x = hidden.reshape(-1, shape[-1])  # (N, d)
        W_g = self.W_r if self.router_trainable else self.router.weight
        g, idx = self.route(F.linear(x.to(W_g.dtype), W_g))  # (N, k), (N, k)
        groups = Groups.of(idx, self.M)
        rows = groups.scatter(x, self.M)  # (M, C, d)
        W_gate, W_up = self.experts.gate_up_proj.chunk(2, dim=1)  # (M, I, d) views of the fused weight
        inner = self.experts.act_fn(self._project("gate", rows, W_gate)) * self._project("up", rows, W_up)
        out = self._project("down", inner, self.experts.down_proj)  # (M, C, d)
        y = groups.gather(out, g * self.s)  # (N, d) = s * sum_j g_j y_j: s scales the whole routed output
        if self.shared_expert is not None:  # always-on shared expert: not routed, so not rescaled
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(shape)

    # ------------------------------------------------------------------------------- state by expert id
    def _expert_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        """Every expert's LoRA factors, live: `(j, {proj}_A)`, `(j, {proj}_B)` for j in 0..M-1 (outer) and
        each projection (inner), then whatever `_expert_extras(j, proj)` adds (`MoELoRA`'s merged dW)."""
        out: dict[tuple[str, str], torch.Tensor] = {}
        for j in range(self.M):
            for m in self.projections:
                out[(str(j), f"{m}_A")] = self.A[m][j]
                out[(str(j), f"{m}_B")] = self.B[m][j]
                out.update(self._expert_extras(j, m))
        return out

    def _expert_extras(self, j: int, proj: str) -> dict[tuple[str, str], torch.Tensor]:
        return {}

    def _init_expert_factors(self, generator: torch.Generator, rank: int) -> dict[tuple[str, str], torch.Tensor]:
        """Fresh factors at `rank` for every expert, keyed as `_expert_tensors`: per projection (outer) one
        kaiming-uniform (M, rank, d_in) draw for A, and B = 0."""
        out: dict[tuple[str, str], torch.Tensor] = {}
        for m in self.projections:
            d_out, d_in = self.dims[m]
            A = kaiming_uniform_(torch.empty(self.M, rank, d_in), generator)
            for j in range(self.M):
                out[(str(j), f"{m}_A")] = A[j].clone()
                out[(str(j), f"{m}_B")] = torch.zeros(d_out, rank)
        return out

    def get_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        out = self._expert_tensors()
        if self.router_trainable:
            out[(ROUTER, "W")] = self.W_r
        out[(RESCALER, "log_s")] = self.log_s
        return out

    def set_tensors(self, tensors: dict[tuple[str, str], torch.Tensor]) -> None:
        with torch.no_grad():
            for (expert, name), value in tensors.items():
                if expert == RESCALER:
                    self.log_s.copy_(value)
                elif expert == ROUTER:
                    if not self.router_trainable:
                        raise KeyError("this block's router is frozen (train_router is off); no router/W to load")
                    self.W_r.copy_(value)
                else:
                    proj, factor = name.rsplit("_", 1)
                    getattr(self, factor)[proj][int(expert)].copy_(value)

    def init_tensors(self, generator: torch.Generator) -> dict[tuple[str, str], torch.Tensor]:
        """A ~ kaiming-uniform, B = 0 for every expert, log_s = 0 (s = 1), router = the pretrained W_g."""
        out = self._init_expert_factors(generator, self.rank)
        if self.router_trainable:
            out[(ROUTER, "W")] = self.router.weight.detach().to("cpu", torch.float32, copy=True)
        out[(RESCALER, "log_s")] = torch.zeros(1)
        return out

    def trainable_parameters(self) -> dict[tuple[str, str], nn.Parameter]:
        """The LoRA factors batched over experts, every projection's A then every projection's B (each in its
        ParameterDict's order, which sorts the projection names), the router copy when trained, and the
        rescaler (which FLAME trains in a group of its own, or not at all)."""
        out = {(ALL_EXPERTS, f"{m}_{f}"): p for f in FACTORS for m, p in getattr(self, f).items()}
        if self.router_trainable:
            out[(ROUTER, "W")] = self.W_r
        out[(RESCALER, "log_s")] = self.log_s
        return out


# -------------------------------------------------------------------------------- dense LoRA experts
class LoRAExpertPool(RoutedExperts):
    """A frozen `nn.Linear` plus M LoRA experts chosen per token by a trainable top-k_i router."""

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int, rank: int, alpha: float, dropout: float,
                 ctx: MoEContext, dispatch: str = "dense"):
        device = base.weight.device
        super().__init__(num_experts, top_k, False, ctx, device)
        if dispatch not in ("dense", "sparse"):
            raise ValueError(f"dispatch={dispatch!r}; allowed: dense, sparse")
        self.dispatch = dispatch
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_in, d_out = base.in_features, base.out_features
        self.A = nn.Parameter(torch.zeros(num_experts, rank, d_in, device=device), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(num_experts, d_out, rank, device=device), requires_grad=False)
        self.W_r = nn.Parameter(torch.zeros(num_experts, d_in, device=device), requires_grad=False)
        self.router_trainable = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.A.dtype)  # (N, d_in)
        g, idx = self.route(flat @ self.W_r.t())  # (N, k)
        # with every expert chosen (k = M) there is nothing to skip: the one-matmul masked form is the cheaper one
        sparse = self.dispatch == "sparse" and idx.shape[1] < self.M
        delta = self._sparse(flat, g, idx) if sparse else self._masked(flat, g, idx)
        return y + delta.view(*x.shape[:-1], -1).to(y.dtype)

    def _masked(self, flat: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(N, d_out): every expert's A_j x, the unchosen ones weighted 0; one dropout mask per token."""
        w = torch.zeros(flat.shape[0], self.M, device=flat.device).scatter(1, idx, g)  # (N, M), 0 if not chosen
        h = self.dropout(flat) @ self.A.reshape(-1, flat.shape[-1]).t()  # (N, M*r): A_j x for every j
        h = h.view(-1, self.M, self.rank) * w[..., None]  # (N, M, r)
        B = self.B.transpose(1, 2).reshape(self.M * self.rank, -1)  # (M*r, d_out)
        return (h.reshape(h.shape[0], -1) @ B) * (self.scaling * self.s)  # (N, d_out)

    def _sparse(self, flat: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(N, d_out): only the chosen experts run, one dropout mask per (token, expert) pair."""
        return self._grouped(flat, g, idx) if self.grouped_mm_fits() else self._padded(flat, g, idx)

    def grouped_mm_fits(self) -> bool:
        """Whether the grouped form runs: on CPU (where it is tested; CUDA's grouped kernel documents bf16
        inputs only, and fedmole's factors are fp32), with every row stride (d_in, rank, d_out elements) a
        multiple of 16 bytes, as the kernel requires: in fp32, each a multiple of 4."""
        size = self.A.element_size()
        return self.A.device.type == "cpu" and all(dim * size % 16 == 0
                                                   for dim in (self.A.shape[2], self.rank, self.B.shape[1]))

    def _grouped(self, flat: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The N*k (token, expert) pairs sorted by expert into one unpadded (N*k, d_in) block; two grouped
        matmuls (`F.grouped_mm`, jagged by `offs`) apply each expert's A_j, then B_j, to its own run of rows:
        no padding, no loop over tokens or experts, and every buffer's size depends on N and k only. The gate
        weight and the scales multiply the rank-r intermediate, not the d_out-wide output (fewer passes over
        the largest tensors, forward and backward)."""
        n, k = idx.shape
        experts = idx.reshape(-1)  # (S,) token-major
        order = torch.argsort(experts, stable=True)  # pair positions in expert order
        offs = torch.bincount(experts, minlength=self.M).cumsum(0).to(torch.int32)  # end of each expert's run
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)  # expert order -> token-major order
        # every gather below is a permutation of (token, choice) pairs: its gradient is the inverse gather
        rows = self.dropout(_Regroup.apply(flat, order // k, back, k))  # (S, d_in)
        h = F.grouped_mm(rows, self.A.transpose(1, 2), offs=offs)  # (S, r): A_j x for the tokens routed to j
        gate = _Regroup.apply(g.reshape(-1, 1), order, back, 1)  # (S, 1)
        h = h * (gate.to(h.dtype) * (self.scaling * self.s))  # s (a/r) g_j A_j x
        out = F.grouped_mm(h, self.B.transpose(1, 2), offs=offs)  # (S, d_out)
        pairs = _Regroup.apply(out, back, order, 1)  # (S, d_out), token-major
        return pairs if k == 1 else pairs.view(n, k, -1).sum(1)  # (N, d_out) = s sum_j g_j (a/r) B_j A_j x

    def _padded(self, flat: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """For shapes the grouped kernel refuses: the pairs grouped into a zero-padded (M, C, d_in) buffer (C =
        the busiest expert's count) and two `bmm`s, which pad as much as the router is unbalanced."""
        groups = Groups.of(idx, self.M)
        rows = self.dropout(groups.scatter(flat, self.M))  # (M, C, d_in)
        h = torch.bmm(rows, self.A.transpose(1, 2))  # (M, C, r): A_j x for the tokens routed to j
        out = torch.bmm(h, self.B.transpose(1, 2))  # (M, C, d_out)
        return groups.gather(out, g) * (self.scaling * self.s)  # (N, d_out) = sum_j g_j B_j A_j x

    def get_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        out: dict[tuple[str, str], torch.Tensor] = {}
        for j in range(self.M):
            out[(str(j), "A")] = self.A[j]
            out[(str(j), "B")] = self.B[j]
        out[(ROUTER, "W")] = self.W_r
        out[(RESCALER, "log_s")] = self.log_s
        return out

    def set_tensors(self, tensors: dict[tuple[str, str], torch.Tensor]) -> None:
        with torch.no_grad():
            for (expert, name), value in tensors.items():
                if expert == RESCALER:
                    self.log_s.copy_(value)
                elif expert == ROUTER:
                    self.W_r.copy_(value)
                else:
                    getattr(self, name)[int(expert)].copy_(value)

    def init_tensors(self, generator: torch.Generator) -> dict[tuple[str, str], torch.Tensor]:
        """A ~ kaiming-uniform, B = 0, router ~ kaiming-uniform (like nn.Linear), log_s = 0."""
        d_in, d_out = self.base.in_features, self.base.out_features
        A = kaiming_uniform_(torch.empty(self.M, self.rank, d_in), generator)
        out: dict[tuple[str, str], torch.Tensor] = {}
        for j in range(self.M):
            out[(str(j), "A")] = A[j].clone()
            out[(str(j), "B")] = torch.zeros(d_out, self.rank)
        out[(ROUTER, "W")] = kaiming_uniform_(torch.empty(self.M, d_in), generator)
        out[(RESCALER, "log_s")] = torch.zeros(1)
        return out

    def trainable_parameters(self) -> dict[tuple[str, str], nn.Parameter]:
        """The experts' factors batched (A, B), the router, and the rescaler (trained apart by FLAME)."""
        return {(ALL_EXPERTS, "A"): self.A, (ALL_EXPERTS, "B"): self.B, (ROUTER, "W"): self.W_r,
                (RESCALER, "log_s"): self.log_s}


def share_rescaler(layers: list[RoutedExperts]) -> nn.Parameter:
    """Make every layer use one rescaler parameter (granularity `client`); each layer still reports it
    under its own key, so the state always holds the same value once per layer."""
    shared = layers[0].log_s
    for layer in layers[1:]:
        layer.log_s = shared
    return shared

