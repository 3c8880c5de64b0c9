"""AMoLE: an adaptive (heterogeneous) mixture of LoRA experts on a frozen linear layer (FedAMoLE, spec 3).

For a frozen W0 (d_out x d_in), the client's held domain experts E_c (ascending global ids, n = |E_c|),
a shared expert s and the router matrix W_t (r x d_in):

    y = W0 x + s_lora * B_s A_s drop(x)                                  shared expert, weight 1, every token
             + sum_{e in top-k(x)} g_e(x) * s_lora * B_e A_e drop(x)     routed domain experts
    z_e(x) = <A_e x, W_t x> / sqrt(r)                                    the expert's own A_e is its key
    p(x)   = softmax_{e in E_c} z(x)                                     over the held experts only
    g_e(x) = p_e(x) / sum_{e' in top-k(x)} p_e'(x)                       renormalised over the k selected

with s_lora = alpha / r and dropout on the LoRA input only (the router sees the un-dropped x). Each expert
draws its own dropout mask (the shared expert too), as one PEFT adapter per expert would. During training
every call also records the load-balancing term n * sum_e P_e f_e (when `load_balance` is on), where P_e is
the mean router probability and f_e the share of the T*k (token, slot) selections that went to e.

Storage: the held experts are batched, A: (n, r, d_in), B: (n, d_out, r), so a forward pass is a handful of
matmuls with no Python loop over experts. The routed mixture is computed densely over the held experts with
a gate that is zero outside each token's top-k, which is exactly the sparse sum (the zero gates contribute
nothing, to the output or to the gradients).

State by expert id: domain experts are `"{id}"` (`A`, `B`), the shared expert `shared` (`A`, `B`), the
router `router` (`W_t`). `init_tensors` draws the whole global pool (what the server holds);
`set_tensors` loads a client's share, and the domain ids present define the held subset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedmole.adapters.base import Adapter
from fedmole.adapters.lora import kaiming_uniform_

SHARED, ROUTER = "shared", "router"


class AMoLELinear(nn.Module, Adapter):
    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, dropout: float = 0.0,
                 top_k: int = 2, shared_expert: bool = True, load_balance: bool = True):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        self.base = base
        self.num_experts, self.r, self.top_k = num_experts, rank, top_k
        self.scaling = float(alpha) / rank
        self.dropout_p = float(dropout)
        self.shared_expert = shared_expert
        self.load_balance = load_balance  # record the load-balancing term in training (off: lb_weight 0)
        d_in, d_out = base.in_features, base.out_features
        device = base.weight.device
        self.W_t = nn.Parameter(torch.zeros(rank, d_in, device=device))  # router / token projection
        if shared_expert:
            self.A_s = nn.Parameter(torch.zeros(rank, d_in, device=device))
            self.B_s = nn.Parameter(torch.zeros(d_out, rank, device=device))
        # until a client's share is loaded the module holds the whole pool (ids 0..N-1)
        self.A = nn.Parameter(torch.zeros(num_experts, rank, d_in, device=device))  # (n, r, d_in)
        self.B = nn.Parameter(torch.zeros(num_experts, d_out, rank, device=device))  # (n, d_out, r)
        self.register_buffer("held", torch.arange(num_experts, device=device), persistent=False)
        self.set_tensors(self.init_tensors(torch.Generator().manual_seed(0)))
        self._lb_terms: list[torch.Tensor] = []
        self._entropy = [0.0, 0]  # training: sum over tokens of the normalised routing entropy, tokens

    @property
    def num_held(self) -> int:
        return self.A.shape[0]

    # ---------------------------------------------------------------------------------------- forward
    def route(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router for tokens X (T, d_in) -> probabilities p (T, n), top-k ids (T, k), keys A_e x (T, n, r)."""
        n, r = self.A.shape[:2]
        K = (X @ self.A.reshape(n * r, -1).t()).view(-1, n, r)  # (T, n, r): A_e x for every held expert
        q = X @ self.W_t.t()  # (T, r): W_t x
        z = torch.einsum("tnr,tr->tn", K, q) / math.sqrt(r)  # (T, n) logits
        p = z.softmax(dim=-1)
        top = p.topk(self.top_k, dim=-1).indices  # (T, k)
        return p, top, K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        X = x.reshape(-1, x.shape[-1]).to(self.A.dtype)  # (T, d_in)
        n, r = self.A.shape[:2]
        p, top, K = self.route(X)
        g = p.gather(-1, top)
        g = g / g.sum(dim=-1, keepdim=True)  # renormalised over the top-k
        G = torch.zeros_like(p).scatter(-1, top, g)  # (T, n), zero outside each token's top-k
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # diagnostics: how peaked the routing is, H(p) / log n in [0, 1]
                self._entropy[0] += float(-(p * p.clamp(min=1e-12).log()).sum() / math.log(n)) if n > 1 else 0.0
                self._entropy[1] += p.shape[0]
            if self.load_balance:
                f = torch.bincount(top.reshape(-1), minlength=n).to(p.dtype) / top.numel()  # share of selections
                self._lb_terms.append(n * (p.mean(dim=0) * f).sum())

        if self.training and self.dropout_p > 0:  # one mask per expert: A_e drop_e(x)
            h = F.dropout(X, self.dropout_p, training=True)  # the shared expert's
            dropped = F.dropout(X.unsqueeze(1).expand(-1, n, -1), self.dropout_p, training=True)  # (T, n, d_in)
            down = torch.einsum("tnd,nrd->tnr", dropped, self.A)  # (T, n, r)
        else:
            h, down = X, K
        B_cat = self.B.transpose(1, 2).reshape(n * r, -1)  # (n*r, d_out): the held B_e side by side
        delta = (down * G.unsqueeze(-1)).reshape(-1, n * r) @ B_cat  # (T, d_out): sum_e g_e B_e A_e x
        if self.shared_expert:
            delta = delta + (h @ self.A_s.t()) @ self.B_s.t()
        return y + (self.scaling * delta).view(*x.shape[:-1], -1).to(y.dtype)

    def pop_load_balance(self) -> torch.Tensor | None:
        """The sum of the load-balancing terms recorded since the last call (None if none), and forget them."""
        if not self._lb_terms:
            return None
        total = torch.stack(self._lb_terms).sum()
        self._lb_terms = []
        return total

    def pop_routing_entropy(self) -> float | None:
        """Mean over the training tokens since the last call of the routing entropy H(p) / log n (1: uniform
        over the held experts, 0: one expert takes all), and forget them; None if there were none."""
        total, tokens = self._entropy
        self._entropy = [0.0, 0]
        return total / tokens if tokens else None

    @torch.no_grad()
    def embed(self, x_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RSEA embeddings from the mean layer input x_bar (d_in,): t = W_t x_bar (r,) and
        U = [A_e x_bar]_e (n, r), rows in held order. Both are linear in x, so this equals the mean over
        tokens of W_t x and A_e x."""
        x_mean = x_mean.to(self.A.dtype)
        return self.W_t @ x_mean, torch.einsum("nrd,d->nr", self.A, x_mean)

    # ------------------------------------------------------------------------------- state by expert id
    def init_tensors(self, generator: torch.Generator) -> dict[tuple[str, str], torch.Tensor]:
        """The full global pool, freshly drawn (CPU, fp32): A kaiming-uniform, B = 0, W_t nn.Linear's init."""
        d_in, d_out, r = self.base.in_features, self.base.out_features, self.r
        out = {}
        if self.shared_expert:
            out[(SHARED, "A")] = kaiming_uniform_(torch.empty(r, d_in), generator)
            out[(SHARED, "B")] = torch.zeros(d_out, r)
        for e in range(self.num_experts):
            out[(str(e), "A")] = kaiming_uniform_(torch.empty(r, d_in), generator)
            out[(str(e), "B")] = torch.zeros(d_out, r)
        out[(ROUTER, "W_t")] = kaiming_uniform_(torch.empty(r, d_in), generator)
        return out

    def get_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        out = {}
        if self.shared_expert:
            out[(SHARED, "A")], out[(SHARED, "B")] = self.A_s, self.B_s
        for i, e in enumerate(self.held.tolist()):
            out[(str(e), "A")], out[(str(e), "B")] = self.A[i], self.B[i]
        out[(ROUTER, "W_t")] = self.W_t
        return out

    def trainable_parameters(self) -> dict[tuple[str, str], nn.Parameter]:
        """The real parameters: the held experts live in two batched tensors (expert id `held`)."""
        out = {("held", "A"): self.A, ("held", "B"): self.B, (ROUTER, "W_t"): self.W_t}
        if self.shared_expert:
            out[(SHARED, "A")], out[(SHARED, "B")] = self.A_s, self.B_s
        return out

    def set_tensors(self, tensors: dict[tuple[str, str], torch.Tensor]) -> None:
        """Load a client's share: the domain expert ids present become the held subset (ascending)."""
        ids, names = set(), {}
        for expert, name in tensors:
            if expert not in (SHARED, ROUTER):
                if not expert.isdigit() or int(expert) >= self.num_experts:
                    raise ValueError(f"AMoLE expert id {expert!r} is not a domain expert id in 0..{self.num_experts - 1}")
                ids.add(int(expert))
            names.setdefault(expert, set()).add(name)
        need = {ROUTER: {"W_t"}, **({SHARED: {"A", "B"}} if self.shared_expert else {}), **{str(e): {"A", "B"} for e in ids}}
        for expert, required in need.items():
            if names.get(expert, set()) != required:
                raise ValueError(f"AMoLE state for expert {expert!r} has tensors {sorted(names.get(expert, ()))}, "
                                 f"expected {sorted(required)}")
        extra = set(names) - set(need)
        if extra:
            raise ValueError(f"AMoLE state has tensors for {sorted(extra)}, which this module does not have "
                             f"(shared_expert={self.shared_expert})")
        if len(ids) < self.top_k:
            raise ValueError(f"a client must hold at least top_k={self.top_k} domain experts, got {len(ids)}")
        held = sorted(ids)
        A = torch.stack([tensors[(str(e), "A")] for e in held])
        B = torch.stack([tensors[(str(e), "B")] for e in held])
        self._assign("A", A)
        self._assign("B", B)
        self._assign("W_t", tensors[(ROUTER, "W_t")])
        if self.shared_expert:
            self._assign("A_s", tensors[(SHARED, "A")])
            self._assign("B_s", tensors[(SHARED, "B")])
        self.held = torch.tensor(held, dtype=torch.long, device=self.A.device)

    def _assign(self, name: str, value: torch.Tensor) -> None:
        param = getattr(self, name)
        batched = name in ("A", "B")  # only the expert count (dim 0 of the batched tensors) may change
        if param.shape != value.shape:
            if not batched or param.shape[1:] != value.shape[1:]:
                per_expert = " per expert" if batched else ""
                raise ValueError(f"AMoLE {name} has shape {tuple(value.shape[batched:])}{per_expert}, expected "
                                 f"{tuple(param.shape[batched:])} (rank {self.r}, this layer's sizes)")
            param = nn.Parameter(torch.empty(value.shape, device=param.device), requires_grad=param.requires_grad)
            setattr(self, name, param)
        with torch.no_grad():
            param.copy_(value)
