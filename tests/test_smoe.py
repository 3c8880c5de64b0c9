"""FLAME's routed layers: the adapted SMoE block, the dense LoRA-expert pool, counting and the rescaler."""

import copy

import pytest
import torch

from fedmole.adapters.smoe import (
    PROJECTIONS,
    Groups,
    LoRAExpertPool,
    MoEContext,
    SparseMoELoRA,
    _Regroup,
    attach_context,
    find_moe_blocks,
    share_rescaler,
)
from fedmole.models.tiny import tiny_llama, tiny_olmoe

from conftest import tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe

VOCAB = 200


def _random_lora(layer, seed=0, scale=0.3):
    """Load a state with non-zero B so the LoRA path really contributes."""
    gen = torch.Generator().manual_seed(seed)
    state = layer.init_tensors(gen)
    state = {k: (torch.randn(v.shape, generator=gen) * scale if k[1].endswith("B") else v) for k, v in state.items()}
    layer.set_tensors(state)
    return state


def _lora_and_router(layer):
    """What FLAME's LoRA optimiser group trains of a layer: its trainable parameters but the rescaler."""
    return [p for (expert, _), p in layer.trainable_parameters().items() if expert != "rescaler"]


def _reference_block(layer: SparseMoELoRA, x: torch.Tensor, k: int, s: float) -> torch.Tensor:
    """FLAME section 3.4 written token by token and expert by expert (slow, obviously right)."""
    W_g = layer.router.weight
    W_gu, W_down = layer.experts.gate_up_proj, layer.experts.down_proj
    inter = W_down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = torch.softmax(W_g @ x[t], dim=-1)
        g, idx = torch.topk(p, k)
        if layer.renormalize:
            g = g / g.sum()
        for g_j, j in zip(g, idx.tolist()):
            def proj(name, W, v):
                if name not in layer.projections:
                    return W @ v
                return W @ v + layer.scaling * layer.B[name][j] @ (layer.A[name][j] @ v)
            gate = proj("gate", W_gu[j, :inter], x[t])
            up = proj("up", W_gu[j, inter:], x[t])
            y = proj("down", W_down[j], torch.nn.functional.silu(gate) * up)
            out[t] += g_j * y
    return s * out


def _olmoe_block(num_experts=8, top_k=4):
    model = tiny_olmoe(VOCAB, num_experts=num_experts, top_k=top_k)
    return model, model.model.layers[0].mlp


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_full_k_unit_rescaler_zero_B_equals_transformers_block(impl):
    model, block = _olmoe_block()
    model.config._experts_implementation = impl
    x = torch.randn(3, 5, 64)
    expected = block(x)
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, MoEContext())
    layer.set_tensors(layer.init_tensors(torch.Generator().manual_seed(0)))
    assert layer.k == layer.K == 4
    assert torch.allclose(layer(x), expected, atol=1e-6, rtol=1e-5)
    assert expected.abs().max() > 1e-4  # not trivially zero


def test_adapted_model_with_padding_equals_transformers_model():
    model = tiny_olmoe(VOCAB)
    reference = copy.deepcopy(model)
    ctx = attach_context(model)
    for path, block in find_moe_blocks(model).items():
        layer = SparseMoELoRA(block, 4, 8.0, 0.0, ctx)
        layer.set_tensors(layer.init_tensors(torch.Generator().manual_seed(1)))
        model.set_submodule(path, layer)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ours = model(input_ids=ids, attention_mask=mask).logits
    theirs = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("k", [4, 2, 1])
def test_batched_block_matches_token_by_token_reference(k):
    _, block = _olmoe_block()
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, MoEContext())
    _random_lora(layer)
    layer.set_active_experts(k)
    with torch.no_grad():
        layer.log_s.fill_(0.4)
    x = torch.randn(1, 11, 64)
    expected = _reference_block(layer, x[0], k, s=float(torch.exp(torch.tensor(0.4))))
    assert torch.allclose(layer(x)[0], expected, atol=1e-5)


def test_subset_of_projections_leaves_others_unadapted():
    _, block = _olmoe_block()
    layer = SparseMoELoRA(block, 2, 4.0, 0.0, MoEContext(), projections=("down",))
    _random_lora(layer)
    assert sorted({name for _, name in layer.get_tensors()}) == ["down_A", "down_B", "log_s"]
    x = torch.randn(1, 6, 64)
    assert torch.allclose(layer(x)[0], _reference_block(layer, x[0], 4, 1.0), atol=1e-5)


def test_routed_expert_counts_sum_to_k_per_real_token():
    model = tiny_olmoe(VOCAB)
    ctx = attach_context(model)
    layers = []
    for path, block in find_moe_blocks(model).items():
        layer = SparseMoELoRA(block, 4, 8.0, 0.0, ctx)
        layer.set_tensors(layer.init_tensors(torch.Generator().manual_seed(0)))
        model.set_submodule(path, layer)
        layers.append(layer)
    ids = torch.randint(3, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    real = int(mask.sum())
    for k in (4, 2, 1):
        ctx.reset()
        for layer in layers:
            layer.reset_counts()
            layer.set_active_experts(k)
        model.train()
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        assert ctx.tokens == real
        for layer in layers:
            assert layer.counts.sum().item() == k * real
            assert layer.counts.max().item() <= real  # an expert counts a token at most once
    model.eval()
    with torch.no_grad():  # evaluation passes are not counted
        before = [layer.counts.clone() for layer in layers]
        model(input_ids=ids, attention_mask=mask)
    assert all(torch.equal(b, layer.counts) for b, layer in zip(before, layers)) and ctx.tokens == real


def test_each_token_uses_exactly_k_experts():
    """Zeroing one expert's weights changes exactly the tokens routed to it: top-k really selects k experts."""
    _, block = _olmoe_block(num_experts=8, top_k=4)
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, MoEContext())
    layer.set_tensors(layer.init_tensors(torch.Generator().manual_seed(0)))
    x = torch.randn(1, 40, 64)
    for k in (1, 2, 4):
        layer.set_active_experts(k)
        base = layer(x)[0]
        used = torch.zeros(40, dtype=torch.long)
        for j in range(8):
            saved = layer.experts.down_proj.data[j].clone()
            layer.experts.down_proj.data[j] = 0
            used += ((layer(x)[0] - base).abs().amax(-1) > 0).long()
            layer.experts.down_proj.data[j] = saved
        assert used.tolist() == [k] * 40


def test_rescaler_multiplies_the_whole_moe_output():
    _, block = _olmoe_block()
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, MoEContext())
    _random_lora(layer)
    layer.set_active_experts(2)
    x = torch.randn(2, 5, 64)
    one = layer(x)
    with torch.no_grad():
        layer.log_s.fill_(torch.log(torch.tensor(2.5)))
    assert torch.allclose(layer(x), 2.5 * one, atol=1e-6)


def test_mass_ratio_probe_matches_router_probabilities():
    _, block = _olmoe_block()
    ctx = MoEContext()
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, ctx)
    layer.set_active_experts(1)
    x = torch.randn(1, 12, 64)
    ctx.measure_mass = True
    with torch.no_grad():
        layer(x)
    p = torch.softmax(x[0] @ block.gate.weight.t(), -1)
    top = torch.topk(p, 4).values
    expected = (top.sum(-1) / top[:, 0]).mean().item()
    assert layer.mass_ratio == pytest.approx(expected, rel=1e-5)
    assert layer.mass_ratio > 1.0


def test_what_trains_is_the_batched_factors_then_router_and_rescaler_in_a_fixed_order():
    """The order an optimiser (and its state) sees them: every A, then every B, each in its ParameterDict's
    order (projection names sorted), the router copy, the rescaler; a dense pool likewise."""
    _, block = _olmoe_block()
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, MoEContext(), train_router=True)
    params = layer.trainable_parameters()
    assert list(params) == [("experts", f"{m}_{f}") for f in "AB" for m in ("down", "gate", "up")] + \
        [("router", "W"), ("rescaler", "log_s")]
    assert params[("experts", "up_B")] is layer.B["up"] and params[("rescaler", "log_s")] is layer.log_s
    pool, _ = _pool()
    assert list(pool.trainable_parameters()) == [("experts", "A"), ("experts", "B"), ("router", "W"),
                                                 ("rescaler", "log_s")]


def test_unactivated_experts_get_zero_gradient_and_router_stays_frozen():
    _, block = _olmoe_block(num_experts=8, top_k=4)
    ctx = MoEContext()
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, ctx)
    _random_lora(layer)
    layer.set_active_experts(1)
    for p in _lora_and_router(layer):
        p.requires_grad_(True)
    layer.train()
    layer(torch.randn(1, 3, 64)).pow(2).sum().backward()
    used = layer.counts > 0
    assert 1 <= int(used.sum()) <= 3
    for proj in PROJECTIONS:
        grad = layer.A[proj].grad.abs().sum((1, 2)) + layer.B[proj].grad.abs().sum((1, 2))
        assert torch.all(grad[~used] == 0) and torch.all(grad[used] > 0)
    assert block.gate.weight.grad is None and not block.gate.weight.requires_grad
    assert ctx.aux_losses == []  # frozen router: no load-balancing loss


def test_trained_router_gets_gradient_and_balance_loss():
    _, block = _olmoe_block()
    ctx = MoEContext()
    layer = SparseMoELoRA(block, 4, 8.0, 0.0, ctx, train_router=True)
    state = _random_lora(layer)
    assert torch.equal(state[("router", "W")], block.gate.weight)  # starts at the pretrained router
    for p in _lora_and_router(layer):
        p.requires_grad_(True)
    layer.train()
    layer.set_active_experts(2)
    out = layer(torch.randn(2, 6, 64))
    assert len(ctx.aux_losses) == 1
    (out.pow(2).sum() + ctx.aux_losses[0]).backward()
    assert layer.W_r.grad is not None and layer.W_r.grad.abs().sum() > 0


def test_balance_loss_is_one_for_uniform_router_and_larger_when_collapsed():
    ctx = MoEContext()
    _, block = _olmoe_block(num_experts=4, top_k=2)
    layer = SparseMoELoRA(block, 2, 4.0, 0.0, ctx)
    n, M = 8, 4
    uniform = torch.full((n, M), 1 / M)
    idx = torch.arange(n * 2).view(n, 2) % M  # every expert chosen equally often
    mask = torch.ones(n)
    assert layer.balance_loss(uniform, idx, mask).item() == pytest.approx(2.0)  # = k when perfectly balanced
    collapsed = torch.tensor([[0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3]]).repeat(n, 1)
    same = torch.tensor([[0, 1]]).repeat(n, 1)
    assert layer.balance_loss(collapsed, same, mask).item() > 2.0


@pytest.mark.parametrize("build", [tiny_qwen2_moe, tiny_qwen3_moe, tiny_mixtral],
                         ids=["qwen2_moe", "qwen3_moe", "mixtral"])
def test_other_moe_families_match_transformers(build):
    torch.manual_seed(0)
    model = build(VOCAB)
    for module in model.modules():  # random experts (the library initialises the fused tensors lazily)
        for name in ("gate_up_proj", "down_proj"):
            if isinstance(getattr(module, name, None), torch.nn.Parameter):
                torch.nn.init.normal_(getattr(module, name), std=0.2)
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.5)
    model.eval()
    blocks = find_moe_blocks(model)
    assert len(blocks) == 1
    (path, block), = blocks.items()
    x = torch.randn(2, 5, 32)
    expected = block(x)
    layer = SparseMoELoRA(block, 2, 4.0, 0.0, MoEContext())
    layer.set_tensors(layer.init_tensors(torch.Generator().manual_seed(0)))
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.renormalize == (build is not tiny_qwen2_moe)  # Mixtral always, Qwen3 by config, Qwen2 off here


# --------------------------------------------------------------------------------------------- dense pool
def _pool(k=None, seed=0, random_B=True):
    torch.manual_seed(seed)
    base = torch.nn.Linear(12, 10)
    ctx = MoEContext()
    pool = LoRAExpertPool(base, num_experts=6, top_k=3, rank=2, alpha=4.0, dropout=0.0, ctx=ctx)
    if random_B:
        _random_lora(pool, seed)
    else:
        pool.set_tensors(pool.init_tensors(torch.Generator().manual_seed(seed)))
    if k:
        pool.set_active_experts(k)
    return pool, ctx


def test_fresh_pool_equals_base_linear():
    pool, _ = _pool(random_B=False)
    x = torch.randn(4, 7, 12)
    assert torch.equal(pool(x), pool.base(x))


@pytest.mark.parametrize("k", [3, 1])
def test_pool_matches_token_by_token_reference(k):
    pool, _ = _pool(k)
    with torch.no_grad():
        pool.log_s.fill_(0.3)
    x = torch.randn(9, 12)
    expected = pool.base(x).clone()
    for t in range(9):
        p = torch.softmax(pool.W_r @ x[t], -1)
        g, idx = torch.topk(p, k)
        delta = sum(g_j * pool.scaling * pool.B[j] @ (pool.A[j] @ x[t]) for g_j, j in zip(g, idx.tolist()))
        expected[t] += torch.exp(torch.tensor(0.3)) * delta
    assert torch.allclose(pool(x), expected, atol=1e-5)


def test_pool_counts_and_gradients_follow_routing():
    pool, ctx = _pool(k=1)
    for p in _lora_and_router(pool):
        p.requires_grad_(True)
    pool.train()
    pool(torch.randn(2, 12)).pow(2).sum().backward()
    used = pool.counts > 0
    assert pool.counts.sum().item() == 2
    grad = pool.A.grad.abs().sum((1, 2)) + pool.B.grad.abs().sum((1, 2))
    assert torch.all(grad[~used] == 0) and torch.all(grad[used] > 0)
    assert pool.W_r.grad.abs().sum() > 0 and len(ctx.aux_losses) == 1


def test_client_granularity_shares_one_rescaler():
    model = tiny_llama(VOCAB)
    ctx = attach_context(model)
    pools = []
    for i in range(2):
        path = f"model.layers.{i}.mlp.down_proj"
        pool = LoRAExpertPool(model.get_submodule(path), 4, 2, 2, 4.0, 0.0, ctx)
        model.set_submodule(path, pool)
        pools.append(pool)
    shared = share_rescaler(pools)
    assert pools[0].log_s is pools[1].log_s is shared
    assert len([p for p in model.parameters() if p is shared]) == 1


def test_grouped_dispatch_has_a_reproducible_backward_on_several_threads():
    """FLAME's grouped dispatch must give bit-identical gradients run after run on a multi-threaded CPU
    (exact resume and the digests depend on it): the gradient of `x[index]` is accumulated in a varying
    order by torch's CPU threads, that of index_select is not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        n, d, m, k = 8192, 64, 8, 4
        x = torch.randn(n, d, generator=gen, requires_grad=True)
        idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)])
        w = torch.rand(n, k, generator=gen)
        g = torch.randn(n, d, generator=gen)
        grads = set()
        for _ in range(20):
            x.grad = None
            groups = Groups.of(idx, m)
            rows = groups.scatter(x, m)
            groups.gather(rows * 1.5, w).backward(g)
            grads.add(x.grad.numpy().tobytes())
        assert len(grads) == 1
        # and the dispatch is still the weighted sum over each token's experts
        x.grad = None
        groups = Groups.of(idx, m)
        out = groups.gather(groups.scatter(x, m) * 1.5, w)
        torch.testing.assert_close(out, 1.5 * w.sum(1, keepdim=True) * x, rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_regroup_gradient_is_the_gradient_of_the_gather(k):
    """The grouped dispatch gathers (token, choice) pairs into expert order with `_Regroup`, whose backward is
    the inverse gather plus a sum over each token's k copies instead of index_select's zero-fill and
    index-add: the same gradient (bit for bit up to k = 2, where a sum of two terms cannot round apart; within
    float rounding beyond), on a permutation whose inverse is not itself."""
    gen = torch.Generator().manual_seed(0)
    n, d = 50, 6
    idx = torch.stack([torch.randperm(5, generator=gen)[:k] for _ in range(n)])  # (n, k) expert choices
    order = torch.argsort(idx.reshape(-1), stable=True)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel())
    assert not torch.equal(order, back)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    g = torch.randn(n * k, d, generator=gen)
    ours = _Regroup.apply(x, order // k, back, k)
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    reference = x.index_select(0, order // k)
    (grad_ref,) = torch.autograd.grad(reference, x, g)
    assert torch.equal(ours, reference)
    if k <= 2:
        assert torch.equal(grad_ours, grad_ref)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- pool dispatch (dense / sparse)
def _masked_reference(pool, x):
    """The pool's forward exactly as it was before `dispatch` existed (the default must not move a bit)."""
    y = pool.base(x)
    flat = x.reshape(-1, x.shape[-1]).to(pool.A.dtype)
    g, idx = pool.route(flat @ pool.W_r.t())
    w = torch.zeros(flat.shape[0], pool.M, device=flat.device).scatter(1, idx, g)
    h = pool.dropout(flat) @ pool.A.reshape(-1, flat.shape[-1]).t()
    h = h.view(-1, pool.M, pool.rank) * w[..., None]
    B = pool.B.transpose(1, 2).reshape(pool.M * pool.rank, -1)
    delta = (h.reshape(h.shape[0], -1) @ B) * (pool.scaling * pool.s)
    return y + delta.view(*x.shape[:-1], -1).to(y.dtype)


def _grads(pool, fn, x, seed):
    params = [pool.A, pool.B, pool.W_r, pool.log_s]
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout draws
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


def _dropout_pool(dispatch, dropout=0.3, k=2, dims=(12, 10, 2)):
    torch.manual_seed(0)
    d_in, d_out, rank = dims
    base = torch.nn.Linear(d_in, d_out)
    pool = LoRAExpertPool(base, num_experts=6, top_k=3, rank=rank, alpha=4.0, dropout=dropout, ctx=MoEContext(),
                          dispatch=dispatch)
    _random_lora(pool, 0)
    pool.set_active_experts(k)
    with torch.no_grad():
        pool.log_s.fill_(0.2)
    return pool.train()


def test_default_dense_dispatch_is_the_old_masked_formula_bit_for_bit():
    pool = _dropout_pool("dense")
    assert pool.dispatch == "dense"  # the default of the layer and of the config
    x = torch.randn(3, 7, 12)
    out, grads = _grads(pool, pool, x, seed=11)
    ref_out, ref_grads = _grads(pool, lambda v: _masked_reference(pool, v), x, seed=11)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("k", [3, 2, 1])
@pytest.mark.parametrize("dims,grouped", [((16, 8, 4), True), ((12, 10, 2), False)], ids=["grouped", "padded"])
def test_sparse_dispatch_equals_the_masked_computation_without_dropout(k, dims, grouped):
    """Both sparse forms (grouped matmuls where the kernel takes the shapes, the padded buffer where it does
    not: rank 2 in fp32 is 8-byte rows) give the masked computation's output and gradients, the input's
    included."""
    dense, sparse = _dropout_pool("dense", 0.0, k, dims), _dropout_pool("sparse", 0.0, k, dims)
    assert sparse.grouped_mm_fits() is grouped
    x = torch.randn(2, 9, dims[0], requires_grad=True)
    out_d, grads_d = _grads(dense, dense, x, seed=0)
    x_grad_d, x.grad = x.grad, None
    out_s, grads_s = _grads(sparse, sparse, x, seed=0)
    assert torch.allclose(out_s, out_d, atol=1e-6)
    for name, a, b in zip(("A", "B", "W_r", "log_s", "x"), grads_s + [x.grad], grads_d + [x_grad_d]):
        assert torch.allclose(a, b, atol=1e-5), name
    assert torch.equal(sparse.counts, dense.counts) and sparse.counts.sum() == 18 * k


def test_grouped_sparse_dispatch_takes_a_stride_0_output_gradient():
    """grouped_mm's CPU backward refuses an output gradient with stride 0 (what `out.sum().backward()` sends);
    in the pool the second grouped output feeds only index_select (whose gradient is contiguous) and the first
    gets its gradient from the second's backward, so a stride-0 gradient on the pool's output still trains it."""
    dense, sparse = _dropout_pool("dense", 0.0, 2, (16, 8, 4)), _dropout_pool("sparse", 0.0, 2, (16, 8, 4))
    assert sparse.grouped_mm_fits()
    x = torch.randn(2, 9, 16)
    grads = []
    for pool in (dense, sparse):
        pool.A.requires_grad_(True)
        pool(x).sum().backward()
        grads.append(pool.A.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_sparse_dispatch_draws_one_dropout_mask_per_token_and_expert():
    """A = B = identity experts on x = 1: the masked computation drops a coordinate for all of a token's experts
    at once (each coordinate is 0 or s (a/r) (g_1 + g_2) / (1 - p)); the sparse one drops it per expert, so some
    coordinates carry one expert's share only."""
    for dispatch in ("dense", "sparse"):
        torch.manual_seed(0)
        pool = LoRAExpertPool(torch.nn.Linear(4, 4), 3, 2, 4, 4.0, 0.5, MoEContext(), dispatch).train()
        pool.set_tensors({**{(str(j), n): torch.eye(4) for j in range(3) for n in ("A", "B")},
                          ("router", "W"): torch.randn(3, 4), ("rescaler", "log_s"): torch.zeros(1)})
        x = torch.ones(64, 4)
        with torch.no_grad():
            g, _ = torch.topk(torch.softmax(x @ pool.W_r.t(), -1), 2)
            delta = (pool(x) - pool.base(x)) * (1 - 0.5)  # (64, 4): each coordinate 0, g1, g2 or g1 + g2
        total = g.sum(-1, keepdim=True).expand_as(delta)
        whole = torch.isclose(delta, total) | (delta == 0)
        assert whole.all() if dispatch == "dense" else not whole.all()


def test_sparse_pool_dispatch_has_a_reproducible_backward_on_several_threads():
    """The grouped sparse dispatch of a LoRA-expert pool (top-4 of 8: each token's row gathered 4 times) gives
    bit-identical outputs and gradients run after run on a multi-threaded CPU, as exact resume needs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        pool = LoRAExpertPool(torch.nn.Linear(64, 96), 8, 4, 8, 16.0, 0.0, MoEContext(), "sparse")
        pool.set_tensors({**{(str(j), n): torch.randn(*shape) for j in range(8)
                             for n, shape in (("A", (8, 64)), ("B", (96, 8)))},
                          ("router", "W"): torch.randn(8, 64), ("rescaler", "log_s"): torch.zeros(1)})
        for p in (pool.A, pool.B, pool.W_r):
            p.requires_grad_(True)
        x = torch.randn(4096, 64, requires_grad=True)
        runs = set()
        for _ in range(10):
            for t in (x, pool.A, pool.B, pool.W_r):
                t.grad = None
            out = pool(x)
            out.pow(2).sum().backward()
            runs.add(b"".join(t.numpy().tobytes() for t in (out.detach(), x.grad, pool.A.grad, pool.B.grad,
                                                             pool.W_r.grad)))
        assert len(runs) == 1
    finally:
        torch.set_num_threads(threads)
