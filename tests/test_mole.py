"""The AMoLE layer (adapters/mole.py) against a naive per-token, per-expert loop written from the equations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmole.adapters import LoRALinear, inject
from fedmole.adapters.mole import AMoLELinear
from fedmole.models.tiny import tiny_llama


def naive_amole(x, W0, A, B, W_t, A_s, B_s, scaling, top_k, h=None, h_e=None):
    """y_t = W0 x + s B_s A_s h + sum_{e in top-k} g_e s B_e A_e h_e, with z_e = <A_e x, W_t x>/sqrt(r),
    looping over tokens and experts. `h` (T, d) is the shared expert's LoRA input and `h_e` (T, n, d) each
    domain expert's (x after that expert's dropout); the router always sees x."""
    h = x if h is None else h
    h_e = x.unsqueeze(1).expand(-1, A.shape[0], -1) if h_e is None else h_e
    r = W_t.shape[0]
    rows = []
    for t in range(x.shape[0]):
        xt, ht = x[t], h[t]
        q = W_t @ xt
        logits = torch.stack([(A[e] @ xt) @ q / math.sqrt(r) for e in range(A.shape[0])])
        p = logits.softmax(0)
        chosen = sorted(range(A.shape[0]), key=lambda e: -float(p[e].detach()))[:top_k]
        norm = sum(p[e] for e in chosen)
        y = W0 @ xt
        if A_s is not None:
            y = y + scaling * (B_s @ (A_s @ ht))
        for e in chosen:
            y = y + (p[e] / norm) * scaling * (B[e] @ (A[e] @ h_e[t, e]))
        rows.append(y)
    return torch.stack(rows)


def _layer(n=5, d_in=12, d_out=7, r=3, top_k=2, shared=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=False)
    layer = AMoLELinear(base, n, r, alpha=2 * r, dropout=dropout, top_k=top_k, shared_expert=shared)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in layer.init_tensors(gen).items()}  # B != 0
    layer.set_tensors(state)
    return layer


def _params(layer):
    return [layer.A, layer.B, layer.W_t] + ([layer.A_s, layer.B_s] if layer.shared_expert else [])


@pytest.mark.parametrize("top_k,shared", [(2, True), (1, False), (3, True)])
def test_fast_layer_matches_naive_loop_outputs_and_gradients(top_k, shared):
    layer = _layer(top_k=top_k, shared=shared)
    x = torch.randn(2, 9, 12)
    y = layer(x)
    weight = torch.randn_like(y)
    grads_fast = torch.autograd.grad((y * weight).sum(), _params(layer))

    leaves = [p.detach().clone().requires_grad_(True) for p in _params(layer)]
    A, B, W_t, *shared_ab = leaves
    A_s, B_s = shared_ab if shared else (None, None)
    y_ref = naive_amole(x.reshape(-1, 12), layer.base.weight, A, B, W_t, A_s, B_s, layer.scaling, top_k).view_as(y)
    grads_ref = torch.autograd.grad((y_ref * weight).sum(), leaves)
    assert (y - y_ref).abs().max() < 1e-5
    for g, g_ref in zip(grads_fast, grads_ref):
        assert (g - g_ref).abs().max() < 1e-5
    assert (y - layer.base(x)).abs().max() > 1e-2  # the experts really contribute


def test_dropout_applies_to_the_lora_input_only_with_one_mask_per_expert():
    layer = _layer(dropout=0.5).train()
    x = torch.randn(1, 8, 12)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)  # the same masks: the shared expert's is the layer's first draw, the experts' the second
    X = x.reshape(-1, 12)
    h = F.dropout(X, 0.5, training=True)
    h_e = F.dropout(X.unsqueeze(1).expand(-1, 5, -1), 0.5, training=True)  # (T, n, d): expert e's input
    y_ref = naive_amole(X, layer.base.weight, layer.A, layer.B, layer.W_t, layer.A_s, layer.B_s,
                        layer.scaling, 2, h=h, h_e=h_e).view_as(y)
    assert (y - y_ref).abs().max() < 1e-5
    # the masks differ between experts (one shared mask would zero the same features for every expert)
    kept = h_e != 0  # (T, n, d)
    assert (kept[:, 0] != kept[:, 1]).any() and (kept[:, 0] != (h != 0)).any()
    one_mask = naive_amole(X, layer.base.weight, layer.A, layer.B, layer.W_t, layer.A_s, layer.B_s, layer.scaling,
                           2, h=h, h_e=h.unsqueeze(1).expand(-1, 5, -1)).view_as(y)
    assert (y - one_mask).abs().max() > 1e-3
    layer.pop_load_balance()
    layer.eval()  # and no dropout in eval mode
    y_eval = layer(x)
    y_ref = naive_amole(x.reshape(-1, 12), layer.base.weight, layer.A, layer.B, layer.W_t, layer.A_s, layer.B_s,
                        layer.scaling, 2).view_as(y)
    assert (y_eval - y_ref).abs().max() < 1e-5


def test_one_expert_top1_without_shared_expert_is_plain_lora():
    torch.manual_seed(0)
    base = nn.Linear(10, 6, bias=False)
    layer = AMoLELinear(base, 1, 4, alpha=8, top_k=1, shared_expert=False)
    lora = LoRALinear(base, 4, alpha=8)
    A, B = torch.randn(4, 10), torch.randn(6, 4)
    layer.set_tensors({("0", "A"): A, ("0", "B"): B, ("router", "W_t"): torch.randn(4, 10)})
    lora.set_tensors({("lora", "A"): A, ("lora", "B"): B})
    x = torch.randn(3, 5, 10)
    assert (layer(x) - lora(x)).abs().max() < 1e-6


def test_softmax_sees_only_the_held_experts():
    pool = _layer(n=16)
    gen = torch.Generator().manual_seed(5)
    full = {k: torch.randn(v.shape, generator=gen) for k, v in pool.init_tensors(gen).items()}
    held = [3, 7, 12]
    share = {k: v for k, v in full.items() if k[0] in ("shared", "router") or (k[0].isdigit() and int(k[0]) in held)}
    pool.set_tensors(share)
    assert pool.held.tolist() == held and pool.num_held == 3

    # a module that only ever had three experts, with the same tensors under ids 0..2, computes the same
    small = _layer(n=3)
    small.set_tensors({(str(held.index(int(e))) if e.isdigit() else e, name): v for (e, name), v in share.items()})
    x = torch.randn(2, 6, 12)
    assert (pool(x) - small(x)).abs().max() < 1e-6
    p, top, _ = pool.route(x.reshape(-1, 12))
    assert p.shape == (12, 3) and torch.allclose(p.sum(-1), torch.ones(12))
    assert top.max() < 3


def test_load_balancing_loss_hand_case():
    """d_in=2, r=1, n=2: tokens (1,0),(0,1),(1,0) get p = (.75,.25), (.25,.75), (.75,.25).
    top-1: P = (7/12, 5/12), f = (2/3, 1/3) -> n*sum P f = 19/18; top-2: f = (1/2, 1/2) -> 1."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    state = {("0", "A"): torch.tensor([[1.0, 0.0]]), ("1", "A"): torch.tensor([[0.0, 1.0]]),
             ("0", "B"): torch.zeros(2, 1), ("1", "B"): torch.zeros(2, 1),
             ("router", "W_t"): torch.tensor([[math.log(3), math.log(3)]])}
    for top_k, expected in ((1, 19 / 18), (2, 1.0)):
        layer = AMoLELinear(nn.Linear(2, 2, bias=False), 2, 1, alpha=1, top_k=top_k, shared_expert=False)
        layer.set_tensors(state)
        layer.train()
        layer(x)
        layer(x)
        assert layer.pop_load_balance().item() == pytest.approx(2 * expected)  # two calls are summed
        assert layer.pop_load_balance() is None  # and then forgotten
        layer.eval()
        layer(x)
        assert layer.pop_load_balance() is None  # nothing is recorded outside training


def test_zero_lb_weight_records_no_load_balancing_terms(tiny_tok):
    """With lb_weight 0 nobody collects the terms, so the layers must not record them (each holds a graph)."""
    from fedmole.algorithms import get_algorithm
    from fedmole.config_io import load_config

    cfg = load_config(None, ["algorithm.name=fedamole", "algorithm.num_experts=4", "algorithm.lb_weight=0", "partition.splits.aux=0.1"])
    model = tiny_llama(len(tiny_tok))
    adapters = get_algorithm("fedamole").build_adapters(model, cfg)
    model.train()
    for _ in range(3):
        model(torch.randint(0, len(tiny_tok), (2, 6)))
    assert all(not m._lb_terms for m in adapters.modules.values())
    cfg = load_config(None, ["algorithm.name=fedamole", "algorithm.num_experts=4", "partition.splits.aux=0.1"])
    adapters = get_algorithm("fedamole").build_adapters(tiny_llama(len(tiny_tok)), cfg)
    adapters.model.train()
    adapters.model(torch.randint(0, len(tiny_tok), (2, 6)))
    assert all(len(m._lb_terms) == 1 for m in adapters.modules.values())


def test_expert_state_round_trips_through_the_adapter_set(tiny_tok):
    model = tiny_llama(len(tiny_tok))
    adapters = inject(model, ["q_proj", "v_proj"], lambda p, lin: AMoLELinear(lin, 6, 4, 8, 0.0, 2))
    pool = adapters.init_state(0)
    assert len(pool) == 4 * (2 * 6 + 2 + 1)  # 4 modules x (6 experts + shared) x (A, B) + router
    share = {k: v for k, v in pool.items() if k.split("/")[1] in ("shared", "router", "1", "4", "5")}
    share = {k: v + 1.0 if k.endswith("/B") else v for k, v in share.items()}
    adapters.load(share)
    state = adapters.state()
    assert set(state) == set(share)
    assert all(torch.equal(state[k], share[k]) for k in share)
    params = adapters.parameters()
    assert sum(p.numel() for p in params.values()) == sum(v.numel() for v in share.values())
    assert all(not p.requires_grad for p in params.values())  # loading freezes until training asks


def test_bad_shares_are_rejected_with_the_reason():
    layer = _layer(n=5)
    with pytest.raises(ValueError, match="at least top_k=2"):
        layer.set_tensors({("shared", "A"): layer.A_s, ("shared", "B"): layer.B_s, ("router", "W_t"): layer.W_t,
                           ("1", "A"): layer.A[0], ("1", "B"): layer.B[0]})
    with pytest.raises(ValueError, match="not a domain expert id"):
        layer.set_tensors({("9", "A"): layer.A[0]})
    with pytest.raises(ValueError, match="rank 3"):
        layer.set_tensors({("shared", "A"): layer.A_s, ("shared", "B"): layer.B_s, ("router", "W_t"): layer.W_t,
                           **{(str(e), n): torch.zeros(2, 12) if n == "A" else torch.zeros(7, 2)
                              for e in (0, 1) for n in ("A", "B")}})
