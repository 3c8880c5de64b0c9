"""The factor maths of the heterogeneous-rank baselines: stacking, SVD redistribution, rank resizing."""

import torch

from fedmole.algorithms.lora_ops import (
    from_pairs, lora_pairs, product_norm, resize_rank, scaled_product, stack, svd_factors,
)

ALPHA = 16.0


def _factors(gen, r, d_in=12, d_out=10):
    return torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)


def test_stacking_reproduces_the_weighted_sum_of_scaled_products_exactly():
    gen = torch.Generator().manual_seed(0)
    clients = [(*_factors(gen, r), p) for r, p in ((8, 0.5), (4, 0.3), (1, 0.2))]
    A_stack, B_stack = stack(clients, ALPHA)
    assert A_stack.shape == (13, 12) and B_stack.shape == (10, 13)
    expected = sum(p * (ALPHA / A.shape[0]) * (B.double() @ A.double()) for A, B, p in clients)
    assert torch.allclose(B_stack @ A_stack, expected, rtol=0, atol=1e-12)
    # the blocks keep each client's factors: client 1's rows are p_1 (α/r_1) A_1, its columns B_1
    assert torch.allclose(A_stack[8:12], 0.3 * (ALPHA / 4) * clients[1][0].double())
    assert torch.equal(B_stack[:, 8:12], clients[1][1].double())


def test_svd_redistribution_is_the_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(1)
    dW = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    S = torch.linalg.svdvals(dW)
    factors = svd_factors(dW, [1, 3, 8], ALPHA)
    for r, (A, B) in factors.items():
        assert A.shape == (r, 12) and B.shape == (10, r)
        approx = scaled_product(A, B, ALPHA)  # the client's update at its own scale α/r
        U, S_, Vh = torch.linalg.svd(dW)
        best = U[:, :r] @ torch.diag(S_[:r]) @ Vh[:r]
        assert torch.allclose(approx, best, atol=1e-5)
        # Eckart-Young: the error is exactly the discarded singular values
        err = torch.linalg.matrix_norm(dW - approx) ** 2
        assert abs(float(err) - float((S[r:] ** 2).sum())) < 1e-4
        # and beats a random rank-r factorisation fitted by least squares on the same A
        A_rand = torch.randn(r, 12, generator=gen, dtype=torch.float64)
        B_ls = dW @ torch.linalg.pinv(A_rand)
        assert torch.linalg.matrix_norm(dW - B_ls @ A_rand) > torch.linalg.matrix_norm(dW - approx)


def test_svd_factors_pad_ranks_above_the_matrix_rank_with_zeros():
    dW = torch.outer(torch.arange(1.0, 5.0), torch.ones(3))  # rank 1, (4, 3)
    A, B = svd_factors(dW, [5], ALPHA)[5]
    assert A.shape == (5, 3) and B.shape == (4, 5)
    assert torch.count_nonzero(A[3:]) == 0 and torch.count_nonzero(B[:, 3:]) == 0
    assert torch.allclose(scaled_product(A, B, ALPHA).float(), dW, atol=1e-5)


def test_resize_keeps_the_first_components_and_their_update():
    gen = torch.Generator().manual_seed(2)
    A, B = _factors(gen, 8)
    A2, B2 = resize_rank(A, B, 2)
    assert torch.equal(A2, A[:2])  # the *first* components
    first_two = (ALPHA / 8) * (B[:, :2].double() @ A[:2].double())
    assert torch.allclose(scaled_product(A2, B2, ALPHA), first_two, atol=1e-5)
    A8, B8 = resize_rank(A2, B2, 8)  # zero-padding back to r_max in the matching positions
    assert A8.shape == (8, 12) and B8.shape == (10, 8)
    assert torch.count_nonzero(A8[2:]) == 0 and torch.count_nonzero(B8[:, 2:]) == 0
    assert torch.equal(A8[:2], A[:2]) and torch.allclose(B8[:, :2], B[:, :2])
    assert torch.allclose(scaled_product(A8, B8, ALPHA), first_two, atol=1e-5)


def test_product_norm_equals_the_dense_frobenius_norm():
    gen = torch.Generator().manual_seed(3)
    A, B = _factors(gen, 4)
    assert abs(product_norm(A, B, ALPHA) - float(torch.linalg.matrix_norm(scaled_product(A, B, ALPHA)))) < 1e-9


def test_pairs_round_trip_through_flat_keys():
    gen = torch.Generator().manual_seed(4)
    pairs = {"m.layers.0.q_proj": _factors(gen, 2), "m.layers.0.v_proj": _factors(gen, 3)}
    state = from_pairs(pairs)
    assert sorted(state) == ["m.layers.0.q_proj/lora/A", "m.layers.0.q_proj/lora/B",
                             "m.layers.0.v_proj/lora/A", "m.layers.0.v_proj/lora/B"]
    back = lora_pairs({**state, "m.layers.0.q_proj/merged/dW": torch.zeros(10, 12)})
    assert back.keys() == pairs.keys()
    assert all(torch.equal(back[m][i], pairs[m][i]) for m in pairs for i in (0, 1))
