"""Server halves of the baselines on a tiny model, driven with hand-made replies (no training needed)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmole.algorithms import get_algorithm
from fedmole.algorithms.hetlora import aggregate
from fedmole.adapters.state import parse_key
from fedmole.algorithms.lora_ops import from_pairs, lora_pairs, merged_key, resize_rank, scaled_product
from fedmole.config_io import validate_config
from fedmole.errors import UserError
from fedmole.messages import Reply
from fedmole.models.tiny import tiny_llama, tiny_olmoe

Q = "model.layers.0.self_attn.q_proj"


def _setup(tok, name, num_clients=4, model=tiny_llama, **alg):
    data = {"algorithm": {"name": name, **alg}, "federation": {"num_clients": num_clients},
            "partition": {"splits": {"aux": 0.05}}}
    tiers = alg.pop("tiers", None)
    if tiers:
        data["algorithm"].pop("tiers", None)
        data["tiers"] = tiers
    cfg = validate_config(data)
    algo = get_algorithm(name)
    adapters = algo.build_adapters(model(len(tok)), cfg)
    return cfg, algo.Server(cfg, adapters), adapters


def _randomised(state, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def _echo(plans, n=10):
    return {c: Reply({k: v.clone() for k, v in p.tensors.items()}, n) for c, p in plans.items()}


@pytest.mark.parametrize("name,alg", [
    ("fedit", {}),
    ("fedit", {"server_opt": {"name": "fedavgm"}}),
    ("fedit", {"server_opt": {"name": "fedadam"}}),
    ("fedit", {"server_opt": {"name": "fedyogi"}}),
    ("fedit", {"server_opt": {"name": "fedadagrad"}}),
    ("ffa_lora", {}),
    ("hetlora", {"tiers": {"levels": [8]}}),
    ("fdlora", {}),
])
def test_identical_client_updates_leave_the_global_state_unchanged(tiny_tok, name, alg):
    cfg, server, _ = _setup(tiny_tok, name, **alg)
    server.global_state = _randomised(server.global_state, 0)
    before = {k: v.clone() for k, v in server.global_state.items()}
    for rnd in (1, 2, 3):
        server.aggregate_train(rnd, _echo(server.configure_train(rnd, [0, 1, 2, 3], False)))
        for k in before:
            assert torch.allclose(server.global_state[k], before[k], atol=1e-6), (name, rnd, k)


def test_flexlora_identical_updates_keep_delta_w(tiny_tok):
    cfg, server, adapters = _setup(tiny_tok, "flexlora", tiers={"levels": [8]})
    gen = torch.Generator().manual_seed(1)
    for k, dW in server.global_state.items():  # a rank-8 global update: exactly representable at rank 8
        server.global_state[k] = torch.randn(dW.shape[0], 8, generator=gen) @ torch.randn(8, dW.shape[1], generator=gen)
    server.aggregated = True
    before = {k: v.clone() for k, v in server.global_state.items()}
    server.aggregate_train(2, _echo(server.configure_train(2, [0, 1, 2, 3], False)))
    for k in before:
        assert torch.allclose(server.global_state[k], before[k], atol=1e-4)


def test_flexlora_averages_scaled_products_and_redistributes_by_svd(tiny_tok):
    cfg, server, _ = _setup(tiny_tok, "flexlora", tiers={"per_client": [8, 4, 2, 1]})
    plans = server.configure_train(1, [0, 1, 2, 3], False)
    assert [lora_pairs(plans[c].tensors)[Q][0].shape[0] for c in range(4)] == [8, 4, 2, 1]
    replies = {c: Reply(_randomised(plans[c].tensors, c), 10 * (c + 1)) for c in range(4)}
    server.aggregate_train(1, replies)
    expected = sum((10 * (c + 1) / 100) * scaled_product(*lora_pairs(replies[c].tensors)[Q], 16.0) for c in range(4))
    dW = server.global_state[merged_key(Q)]
    assert torch.allclose(dW.double(), expected, atol=1e-6)  # exact product average, scale α/r_i respected
    plans = server.configure_train(2, [0, 3], False)
    U, S, Vh = torch.linalg.svd(dW.double())
    for c, r in ((0, 8), (3, 1)):
        A, B = lora_pairs(plans[c].tensors)[Q]
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        assert torch.allclose(scaled_product(A, B, 16.0), best, atol=1e-5)
    assert set(server.configure_evaluate(2, [0])[0].tensors) == set(server.global_state)  # global = full ΔW


def test_hetlora_truncates_on_dispatch_and_zero_pads_on_aggregation(tiny_tok):
    cfg, server, _ = _setup(tiny_tok, "hetlora", tiers={"per_client": [8, 4, 2, 1]})
    server.global_state = _randomised(server.global_state, 2)
    A_g, B_g = lora_pairs(server.global_state)[Q]
    plans = server.configure_train(1, [0, 1, 2, 3], False)
    for c, r in enumerate([8, 4, 2, 1]):
        A, B = lora_pairs(plans[c].tensors)[Q]
        assert A.shape == (r, A_g.shape[1]) and B.shape == (B_g.shape[0], r)
        assert torch.equal(A, A_g[:r])  # the first r components
        assert torch.allclose(scaled_product(A, B, 16.0), scaled_product(A_g[:r], B_g[:, :r], 16.0 * r / 8), atol=1e-6)

    replies = {c: _randomised(plans[c].tensors, 10 + c) for c in (0, 2)}  # a rank-8 and a rank-2 client
    out = lora_pairs(aggregate(replies, 8, 16.0, "per_matrix"))[Q]
    n0 = torch.linalg.matrix_norm(scaled_product(*lora_pairs(replies[0])[Q], 16.0))
    n2 = torch.linalg.matrix_norm(scaled_product(*lora_pairs(replies[2])[Q], 16.0))
    w0, w2 = float(n0 / (n0 + n2)), float(n2 / (n0 + n2))
    A0, B0 = lora_pairs(replies[0])[Q]
    A2, B2 = resize_rank(*lora_pairs(replies[2])[Q], 8)
    assert torch.count_nonzero(A2[2:]) == 0 and torch.count_nonzero(B2[:, 2:]) == 0  # zeros in matching positions
    assert torch.allclose(out[0][2:], w0 * A0[2:], atol=1e-6)  # tail: averaged with the rank-2 client's zeros
    assert torch.allclose(out[0][:2], w0 * A0[:2] + w2 * A2[:2], atol=1e-6)
    assert torch.allclose(out[1], w0 * B0 + w2 * B2, atol=1e-6)


def test_hetlora_per_client_norm_weights_are_shared_by_all_matrices(tiny_tok):
    cfg, server, _ = _setup(tiny_tok, "hetlora", tiers={"levels": [8]})
    s0, s1 = _randomised(server.global_state, 3), _randomised(server.global_state, 4)
    s1 = {k: v * (3.0 if k.endswith("B") and Q in k else 1.0) for k, v in s1.items()}  # client 1 big on q only
    per_matrix = lora_pairs(aggregate({0: s0, 1: s1}, 8, 16.0, "per_matrix"))
    per_client = lora_pairs(aggregate({0: s0, 1: s1}, 8, 16.0, "per_client"))
    norms = {c: {m: float(torch.linalg.matrix_norm(scaled_product(A, B, 16.0))) for m, (A, B) in lora_pairs(s).items()}
             for c, s in ((0, s0), (1, s1))}
    other = next(m for m in per_client if m != Q)
    t0, t1 = sum(norms[0].values()), sum(norms[1].values())
    A0, A1 = lora_pairs(s0)[other][0], lora_pairs(s1)[other][0]
    assert torch.allclose(per_client[other][0], (t0 * A0 + t1 * A1) / (t0 + t1), atol=1e-6)
    m0, m1 = norms[0][other], norms[1][other]
    assert torch.allclose(per_matrix[other][0], (m0 * A0 + m1 * A1) / (m0 + m1), atol=1e-6)


def _fake_reply(server, payload, seed):
    """A client's reply: the payload's LoRA factors perturbed, or (FLoRA) a trained fresh LoRA at its rank."""
    if all(parse_key(k).expert == "merged" for k in payload.tensors):  # FLoRA: trains a fresh LoRA at its rank
        r, gen = payload.config["rank"], torch.Generator().manual_seed(seed)
        pairs = {parse_key(k).module: (torch.randn(r, v.shape[1], generator=gen), torch.randn(v.shape[0], r, generator=gen))
                 for k, v in payload.tensors.items()}
        return Reply(from_pairs(pairs), 5 + seed)
    return Reply(_randomised(payload.tensors, seed), 5 + seed)


@pytest.mark.parametrize("name,alg", [
    ("fedit", {"server_opt": {"name": "fedadam"}}),
    ("ffa_lora", {"server_opt": {"name": "fedavgm"}}),
    ("hetlora", {"tiers": {"per_client": [8, 4, 2, 1]}, "server_opt": {"name": "fedyogi"}}),
    ("flexlora", {"tiers": {"per_client": [8, 4, 2, 1]}, "server_opt": {"name": "fedadagrad"}}),
    ("flora", {"tiers": {"per_client": [8, 4, 2, 1]}}),
    ("fdlora", {}),
])
def test_server_state_round_trips_through_a_checkpoint(tiny_tok, tmp_path, name, alg):
    cfg, server, adapters = _setup(tiny_tok, name, **alg)
    for rnd in (1, 2):  # round 2 leaves FDLoRA's warm-up and fills the optimiser moments
        plans = server.configure_train(rnd, [0, 1, 2, 3], False)
        server.aggregate_train(rnd, {c: _fake_reply(server, p, 10 * rnd + c) for c, p in plans.items()})
    tensors, meta = server.state_dict()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "server.safetensors")
    other = get_algorithm(name).Server(cfg, adapters)
    other.load_state_dict(load_file(tmp_path / "server.safetensors"), json.loads(json.dumps(meta)))
    plans, again = server.configure_train(3, [0, 3], False), other.configure_train(3, [0, 3], False)
    for c in (0, 3):
        assert plans[c].tensors.keys() == again[c].tensors.keys()
        assert all(torch.equal(plans[c].tensors[k], again[c].tensors[k]) for k in plans[c].tensors)
    replies = {c: _fake_reply(server, p, 30 + c) for c, p in plans.items()}
    server.aggregate_train(3, replies)
    other.aggregate_train(3, replies)
    assert all(torch.equal(server.global_state[k], other.global_state[k]) for k in server.global_state)


def test_flora_stacking_identical_updates_merges_one_update(tiny_tok):
    cfg, server, _ = _setup(tiny_tok, "flora", tiers={"levels": [8]})
    reply = _fake_reply(server, server.configure_train(1, [0], False)[0], 0)
    server.aggregate_train(1, {c: Reply(dict(reply.tensors), 10 * (c + 1)) for c in range(4)})
    for m, (A, B) in lora_pairs(reply.tensors).items():
        assert torch.allclose(server.global_state[merged_key(m)].double(), scaled_product(A, B, 16.0), atol=1e-5)


def test_ffa_lora_exchanges_only_b_and_exports_the_seeded_a(tiny_tok):
    cfg, server, adapters = _setup(tiny_tok, "ffa_lora")
    assert server.global_state and all(k.endswith("/B") for k in server.global_state)
    full = server.export_state()
    init = adapters.init_state(cfg.federation.seed)
    assert all(torch.equal(full[k], init[k]) for k in init if k.endswith("/A"))


def test_rank_tiers_follow_the_moe_top_k_and_reject_fractional_ranks(tiny_tok):
    from fedmole.algorithms.rank_tiers import client_ranks

    cfg, server, _ = _setup(tiny_tok, "hetlora", num_clients=6, model=tiny_olmoe, target_modules=["q_proj"])
    assert sorted(server.ranks) == [2, 2, 4, 4, 8, 8]  # tiny-olmoe top-k 4: levels 4/2/1 -> ranks 8/4/2
    cfg = validate_config({"algorithm": {"name": "hetlora", "rank": 2}, "federation": {"num_clients": 4}})
    with pytest.raises(UserError, match=r"algorithm.rank=2 .* multiple of 8"):
        client_ranks(cfg, tiny_llama(len(tiny_tok)))
    with pytest.raises(UserError, match=r"algorithm.rank=2 .*tier values \[4, 2, 1\].*multiple of 4"):
        validate_config({"algorithm": {"name": "flora", "rank": 2}, "tiers": {"levels": [4, 2, 1]}})
    assert validate_config({"algorithm": {"name": "flora", "rank": 4}, "tiers": {"levels": [4, 2, 1]}})
