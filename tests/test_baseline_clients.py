"""Client halves of the baselines, trained for real on a tiny model and a small WordNet federation."""

import numpy as np
import pytest
import torch

from fedmole.algorithms import get_algorithm
from fedmole.algorithms.fdlora import fusion_search
from fedmole.algorithms.fedprox import proximal_hook
from fedmole.algorithms.lora_ops import lora_pairs, merged_key
from fedmole.config_io import validate_config
from fedmole.engines.inprocess import InProcessEngine
from fedmole.messages import ClientState, Payload
from fedmole.models.tiny import tiny_llama
from fedmole.run import build_runtime, load_federated_data


def _config(name, **alg):
    tiers = alg.pop("tiers", {"per_client": [8, 4, 2, 1]})
    return validate_config({
        "model": {"name": "tiny-llama"},
        "data": {"source": "wordnet", "max_examples": 240},
        "partition": {"scheme": "iid", "splits": {"train": 0.7, "aux": 0.1, "val": 0.1, "test": 0.1}},
        "algorithm": {"name": name, "rank": 8, "alpha": 16, **alg},
        "federation": {"num_clients": 4, "rounds": 2, "seed": 7},
        "tiers": tiers,
        "train": {"local_steps": 3, "batch_size": 4, "lr": 5e-3, "max_length": 96, "device": "cpu"},
        "eval": {"max_examples": 3, "batch_size": 8, "metric": "loss"},
    })


def _federation(name, **alg):
    cfg = _config(name, **alg)
    runtime = build_runtime(cfg, load_federated_data(cfg))
    algo = get_algorithm(name)
    return cfg, runtime, algo.Server(cfg, runtime.adapters), algo.Client(cfg, runtime)


def _round(server, engine, rnd, clients=(0, 1, 2, 3)):
    replies, failures = engine.train(rnd, server.configure_train(rnd, list(clients), False))
    assert not failures, failures
    server.aggregate_train(rnd, replies)
    return replies


def test_ffa_lora_a_is_identical_across_clients_and_rounds():
    cfg, rt, server, client = _federation("ffa_lora")
    seen = []
    train = client.train

    def spy(cid, payload, state):
        reply = train(cid, payload, state)
        seen.append({k: v for k, v in rt.adapters.state().items() if k.endswith("/A")})
        assert all(k.endswith("/B") for k in reply.tensors)  # only B travels
        return reply

    client.train = spy
    engine = InProcessEngine(client)
    B0 = {k: v.clone() for k, v in server.global_state.items()}
    for rnd in (1, 2):
        _round(server, engine, rnd)
    init_A = {k: v for k, v in rt.adapters.init_state(cfg.federation.seed).items() if k.endswith("/A")}
    assert len(seen) == 8
    for A in seen:
        assert all(torch.equal(A[k], init_A[k]) for k in init_A)
    assert any(not torch.equal(server.global_state[k], B0[k]) for k in B0)  # B did train


def test_fedprox_with_mu_zero_equals_fedit_and_mu_pulls_towards_the_round_start():
    cfg, rt, server, _ = _federation("fedit")
    start = server.global_state

    def train(hook_mu):
        rt.adapters.load(start)
        params = list(rt.adapters.parameters().values())
        rt.seed(1, 0, "train")
        hook = proximal_hook(params, hook_mu) if hook_mu is not None else None
        rt.train(0, ClientState(), params, 5e-3, 6, before_step=hook)
        return rt.adapters.state()

    plain, mu0, strong = train(None), train(0.0), train(1e3)
    assert all(torch.equal(plain[k], mu0[k]) for k in plain)  # μ = 0 is FedIT bit for bit

    def dist(s):
        return sum(float((s[k] - start[k]).norm() ** 2) for k in s) ** 0.5

    assert dist(strong) < 0.5 * dist(plain)


def test_hetlora_self_pruning_regularises_and_drops_the_tail():
    cfg, rt, server, client = _federation("hetlora", self_pruning=True, prune_lambda=5.0, tiers={"levels": [8]})
    gen = torch.Generator().manual_seed(0)
    start = {k: (0.1 * torch.randn(v.shape, generator=gen) if k.endswith("/B") else v) for k, v in server.global_state.items()}
    payload = Payload(start, server.train_config(1, False))

    def tail(state):
        return sum(float(A[6:].norm() * B[:, 6:].norm()) for A, B in lora_pairs(state).values())

    # the previous tail was larger: the client keeps ceil(0.75 * 8) = 6 components
    state = ClientState(meta={"tail_norm": {"rank": 8, "value": 1e9}})
    rt.seed(1, 0, "train")
    pruned = client.train(0, payload, state)
    assert {A.shape[0] for A, _ in lora_pairs(pruned.tensors).values()} == {8}  # the shapes it was sent
    assert tail(pruned.tensors) == 0.0 and pruned.extra == {"rank": 6}  # the tail is dropped
    assert any(float(B[:, :6].abs().sum()) > 0 for _, B in lora_pairs(pruned.tensors).values())
    assert "tail_norm" not in state.meta and pruned.metrics["pruned_to"] == 6
    # the server dispatches the smaller rank from then on
    server.aggregate_train(1, {0: pruned})
    assert server.ranks[0] == 6
    assert lora_pairs(server.configure_train(2, [0], False)[0].tensors).popitem()[1][0].shape[0] == 6

    # no previous value: nothing is dropped, the tail is remembered; the regulariser shrinks it
    state = ClientState()
    rt.seed(1, 0, "train")
    kept = client.train(0, payload, state)
    assert {A.shape[0] for A, _ in lora_pairs(kept.tensors).values()} == {8}
    assert state.meta["tail_norm"]["value"] == pytest.approx(tail(kept.tensors), rel=1e-5)
    cfg.algorithm.prune_lambda = 0.0
    rt.seed(1, 0, "train")
    unregularised = client.train(0, payload, ClientState())
    assert tail(kept.tensors) < tail(unregularised.tensors)


def test_flora_merges_into_a_carried_base_and_reinitialises_every_round():
    cfg, rt, server, client = _federation("flora")
    W0 = {m: mod.base.weight.detach().clone() for m, mod in rt.adapters}
    starts = []  # what each client's adapters hold when its local training starts
    train = rt.train

    def spy(cid, state, params, *args, **kwargs):
        starts.append({m: (mod.rank, float(mod.B.detach().abs().sum()), mod.dW.clone()) for m, mod in rt.adapters})
        return train(cid, state, params, *args, **kwargs)

    rt.train = spy
    engine = InProcessEngine(client)
    replies = _round(server, engine, 1)
    dW1 = {k: v.clone() for k, v in server.global_state.items()}
    # the merged update is exactly Σ p_i (α/r_i) B_i A_i (p_i ∝ |D_i|)
    n = {c: r.num_examples for c, r in replies.items()}
    m0 = next(iter(lora_pairs(replies[0].tensors)))
    expected = sum(n[c] / sum(n.values()) * (16.0 / A.shape[0]) * (B.double() @ A.double())
                   for c in replies for A, B in [lora_pairs(replies[c].tensors)[m0]])
    assert torch.allclose(dW1[merged_key(m0)].double(), expected, atol=1e-6)
    assert float(expected.abs().max()) > 0

    _round(server, engine, 2)
    # every client, every round: a fresh LoRA (B = 0) at its tier rank on top of the accumulated base
    assert [s[m0][0] for s in starts] == [8, 4, 2, 1] * 2
    assert all(s[m][1] == 0.0 for s in starts for m in s)
    assert all(torch.count_nonzero(s[m0][2]) == 0 for s in starts[:4])
    assert all(torch.equal(s[m0][2], dW1[merged_key(m0)]) for s in starts[4:])
    assert all(not torch.equal(server.global_state[k], dW1[k]) for k in dW1)  # accumulated again
    # the shared frozen base is never written
    assert all(torch.equal(mod.base.weight, W0[m]) for m, mod in rt.adapters)

    # global model = base + dW: compare against a model whose weights hold W0 + dW
    client.evaluate(0, server.configure_evaluate(2, [0])[0], ClientState())
    x = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    dense = tiny_llama(len(rt.tokenizer))
    with torch.no_grad():
        for m, _ in rt.adapters:
            dense.get_submodule(m).weight += server.global_state[merged_key(m)]
    assert (rt.model(x).logits - dense(x).logits).abs().max() < 1e-5


def test_fusion_search_respects_the_budget_and_returns_the_best_point():
    calls = []

    def objective(w):
        calls.append(w.copy())
        return float((w[0] - 0.9) ** 2 + (w[1] - 0.2) ** 2)

    w, value = fusion_search(objective, budget=5, bound=1.5)
    assert len(calls) == 5
    assert value == min(objective(c) for c in calls[:5])
    assert np.allclose(calls[0], [0, 0])  # starts at w = 0, like the reference
    assert value < objective(np.zeros(2)) and all(abs(x) <= 1.5 for c in calls for x in c)


def test_fdlora_syncs_private_adapters_and_evaluates_a_fused_personal_model():
    cfg, rt, server, client = _federation("fdlora", sync_freq=5)
    assert [server.syncs(r) for r in range(1, 9)] == [False, True, False, False, False, False, True, False]
    engine = InProcessEngine(client)
    _round(server, engine, 1)
    assert not engine.client_states()[0].tensors  # the warm-up round does not sync
    _round(server, engine, 2)
    states = engine.client_states()
    assert all(states[c].tensors for c in range(4))
    replies, failures = engine.evaluate(2, server.configure_evaluate(2, [0, 1]))
    assert not failures
    for c in (0, 1):
        labels = {(e["model"], e["split"]) for e in replies[c].evals}
        assert labels == {("global", "val"), ("global", "test"), ("personalized", "val"), ("personalized", "test")}
        w = states[c].meta["fusion"]
        fused = server.export_state(c, states[c])
        k = next(iter(fused))
        assert torch.allclose(fused[k], w[0] * server.global_state[k] + w[1] * states[c].tensors[k])
