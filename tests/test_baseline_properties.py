"""The baselines' method-defining properties that the server and client tests do not already pin
(spec: specs/baselines.md): FedIT's data-size weighted factor-wise average, FDLoRA's outer Nesterov SGD
after a plain warm-up, its fusion objective and fused adapter, its private snapshot, FedProx wired into a
client's training, local-only clients, FLoRA's accumulated stacks and HetLoRA's self-pruning limits.
`make mutation` breaks each of them on purpose."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmole.algorithms import fdlora, get_algorithm
from fedmole.algorithms.lora_ops import from_pairs, lora_pairs, merged_key, scaled_product
from fedmole.config_io import validate_config
from fedmole.engines.inprocess import InProcessEngine
from fedmole.messages import ClientState, Reply
from fedmole.models.tiny import tiny_llama
from fedmole.run import build_runtime, load_federated_data

CLIENTS = [0, 1, 2, 3]


def _setup(tok, name, **alg):
    tiers = alg.pop("tiers", None)
    data = {"algorithm": {"name": name, **alg}, "federation": {"num_clients": 4}, "partition": {"splits": {"aux": 0.05}}}
    if tiers:
        data["tiers"] = tiers
    cfg = validate_config(data)
    algo = get_algorithm(name)
    return cfg, algo.Server(cfg, algo.build_adapters(tiny_llama(len(tok)), cfg))


def _shifted(state, by):
    return {k: v + by for k, v in state.items()}


def _close(a, b, atol=1e-6):
    return all(torch.allclose(a[k].double(), b[k].double(), atol=atol) for k in b)


# ------------------------------------------------------------------------------------------- FedIT
def test_fedit_averages_factors_weighted_by_data_size(tiny_tok):
    """Clients with 1 and 3 examples send A + 1, B + 1 and A + 5, B + 5: each factor moves by
    (1*1 + 3*5) / 4 = 4, separately (not the product)."""
    cfg, server = _setup(tiny_tok, "fedit")
    x = dict(server.global_state)
    plans = server.configure_train(1, [0, 1], False)
    server.aggregate_train(1, {0: Reply(_shifted(plans[0].tensors, 1.0), 1), 1: Reply(_shifted(plans[1].tensors, 5.0), 3)})
    assert _close(server.global_state, _shifted(x, 4.0))


# ------------------------------------------------------------------------------------------ FDLoRA
def test_fdlora_outer_step_is_nesterov_sgd_with_momentum_half_after_a_plain_warmup(tiny_tok):
    """Pseudo-gradient g = -(mean_c local_c - global). Round 1 (warm-up): plain average. Round 2: v = g,
    x -= g + 0.5 v, i.e. x += 1.5 D2. Round 3: v = 0.5 v + g, x -= g + 0.5 v, i.e. x += 1.5 D3 + 0.25 D2."""
    cfg, server = _setup(tiny_tok, "fdlora")
    x0 = {k: v.clone() for k, v in server.global_state.items()}
    steps = {1: (0.2, 0.6), 2: (0.1, 0.3), 3: (-0.1, 0.5)}  # per round, what each of two clients adds
    expected = {1: 0.4, 2: 0.4 + 1.5 * 0.2, 3: 0.4 + 1.5 * 0.2 + 1.5 * 0.2 + 0.25 * 0.2}
    for rnd, adds in steps.items():
        plans = server.configure_train(rnd, [0, 1], False)
        server.aggregate_train(rnd, {c: Reply(_shifted(plans[c].tensors, adds[c]), 10 * (c + 1)) for c in (0, 1)})
        assert _close(server.global_state, _shifted(x0, expected[rnd]), atol=1e-5), rnd


class _FakeRuntime:
    """Loads nothing and evaluates nothing; the model's cross-entropy comes from the monkeypatched
    `sequence_ce`."""

    def __init__(self):
        self.loaded = []
        self.adapters = SimpleNamespace(load=self.loaded.append)
        self.model = SimpleNamespace(eval=lambda: None)
        self.tokenizer = SimpleNamespace(pad_token_id=0)
        self.device = torch.device("cpu")


def test_fusion_objective_is_mean_aux_loss_plus_l1_penalty_on_the_weights(tiny_tok, monkeypatch):
    """Two aux batches with token-mean CEs 1.0 (CE sums 1 and 3 over 1 + 3 tokens) and 3.0 (6 over 2):
    objective(w = (0.3, -0.9)) = (1 + 3) / 2 + 0.05 * (0.3 + 0.9) / 2 = 2.03."""
    cfg, _ = _setup(tiny_tok, "fdlora")
    assert cfg.algorithm.fusion_l1 == 0.05  # the reference's coefficient
    ces = iter([(torch.tensor([1.0, 3.0]), torch.tensor([1, 3])), (torch.tensor([6.0]), torch.tensor([2]))])
    monkeypatch.setattr(fdlora, "sequence_ce", lambda model, batch, pad, device: next(ces))
    client = fdlora.Client(cfg, _FakeRuntime())
    value = client.fusion_objective({"k": torch.ones(2)}, {"k": torch.zeros(2)}, np.array([0.3, -0.9]), [["b1"], ["b2"]])
    assert value == pytest.approx(2.03)


def test_fused_adapter_is_w0_shared_plus_w1_private_tensor_by_tensor():
    shared = {"m/lora/A": torch.tensor([1.0, 2.0]), "m/lora/B": torch.tensor([[4.0]])}
    private = {"m/lora/A": torch.tensor([10.0, -10.0]), "m/lora/B": torch.tensor([[0.5]])}
    fused = fdlora.fuse(shared, private, (0.3, -0.5))
    assert torch.allclose(fused["m/lora/A"], torch.tensor([0.3 - 5.0, 0.6 + 5.0]))
    assert torch.allclose(fused["m/lora/B"], torch.tensor([[1.2 - 0.25]]))


# ------------------------------------------------------------------------- clients that train for real
def _config(name, **alg):
    return validate_config({
        "model": {"name": "tiny-llama"},
        "data": {"source": "wordnet", "max_examples": 240},
        "partition": {"scheme": "iid", "splits": {"train": 0.7, "aux": 0.1, "val": 0.1, "test": 0.1}},
        "algorithm": {"name": name, "rank": 8, "alpha": 16, **alg},
        "federation": {"num_clients": 4, "rounds": 2, "seed": 7},
        "train": {"local_steps": 3, "batch_size": 4, "lr": 5e-3, "max_length": 96, "device": "cpu"},
        "eval": {"max_examples": 3, "batch_size": 8, "metric": "loss"},
    })


@pytest.fixture(scope="module")
def runtime():
    """One tiny LoRA runtime shared by the FedIT-style clients (FedIT, FDLoRA and local build the same adapters)."""
    cfg = _config("fedit")
    return build_runtime(cfg, load_federated_data(cfg))


def _client(runtime, name, **alg):
    cfg = _config(name, **alg)
    algo = get_algorithm(name)
    return cfg, algo.Server(cfg, runtime.adapters), algo.Client(cfg, runtime)


def test_fdlora_private_adapter_is_the_locally_trained_shared_adapter(runtime):
    cfg, server, client = _client(runtime, "fdlora")
    payload = server.configure_train(2, [0], False)[0]
    assert payload.config["sync"]
    state = ClientState()
    runtime.seed(2, 0, "train")
    reply = client.train(0, payload, state)
    assert set(state.tensors) == set(reply.tensors)
    assert all(torch.equal(state.tensors[k], reply.tensors[k]) for k in reply.tensors)
    assert any(not torch.equal(state.tensors[k], payload.tensors[k]) for k in payload.tensors)  # it trained


def _distance(state, start):
    return sum(float((state[k] - start[k]).norm() ** 2) for k in start) ** 0.5


def test_prox_mu_pulls_a_clients_local_training_towards_the_round_start(runtime):
    moved = {}
    for mu in (0.0, 1e3):
        cfg, server, client = _client(runtime, "fedit", prox_mu=mu)
        payload = server.configure_train(1, [0], False)[0]
        runtime.seed(1, 0, "train")
        moved[mu] = _distance(client.train(0, payload, ClientState()).tensors, payload.tensors)
    assert 0 < moved[1e3] < 0.5 * moved[0.0]


def test_local_clients_keep_their_own_adapter_and_upload_nothing(runtime):
    cfg, server, client = _client(runtime, "local")
    starts, train = [], runtime.train

    def spy(cid, state, params, *args, **kwargs):
        starts.append((cid, runtime.adapters.state()))
        return train(cid, state, params, *args, **kwargs)

    runtime.train = spy
    try:
        engine = InProcessEngine(client)
        for rnd in (1, 2):
            replies, failures = engine.train(rnd, server.configure_train(rnd, [0, 1], False))
            assert not failures and all(r.tensors == {} for r in replies.values())
            server.aggregate_train(rnd, replies)
    finally:
        runtime.train = train
    after_round_1 = engine.client_states()
    init = runtime.adapters.init_state(cfg.federation.seed)
    for cid, start in starts[:2]:  # round 1: the shared seeded initialisation
        assert all(torch.equal(start[k], init[k]) for k in init)
    for cid, start in starts[2:]:  # round 2: the client's own adapter, trained in round 1 (not the other's)
        own = [s for c, s in starts[2:] if c != cid][0]
        assert any(not torch.equal(start[k], init[k]) for k in init)
        assert any(not torch.equal(start[k], own[k]) for k in init)
    assert all(after_round_1[c].tensors for c in (0, 1))


# ------------------------------------------------------------------------------------------ FLoRA
def _fresh_replies(plans, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c, p in plans.items():
        r = p.config["rank"]
        pairs = {k.rsplit("/", 2)[0]: (torch.randn(r, v.shape[1], generator=gen), torch.randn(v.shape[0], r, generator=gen))
                 for k, v in p.tensors.items()}
        out[c] = Reply(from_pairs(pairs), 5 + 3 * c)
    return out


def test_flora_merges_each_rounds_stack_into_the_accumulated_update(tiny_tok):
    """dW after two rounds = sum over rounds of sum_i p_i (alpha/r_i) B_i A_i with p_i = |D_i| / sum |D_j|
    (sizes 5, 8, 11, 14; ranks 8, 4, 2, 1)."""
    cfg, server = _setup(tiny_tok, "flora", tiers={"per_client": [8, 4, 2, 1]})
    total = {}
    for rnd in (1, 2):
        replies = _fresh_replies(server.configure_train(rnd, CLIENTS, False), rnd)
        server.aggregate_train(rnd, replies)
        n = sum(r.num_examples for r in replies.values())
        for c, r in replies.items():
            for m, (A, B) in lora_pairs(r.tensors).items():
                total[m] = total.get(m, 0.0) + r.num_examples / n * scaled_product(A, B, 16.0)
    assert [lora_pairs(r.tensors).popitem()[1][0].shape[0] for r in replies.values()] == [8, 4, 2, 1]
    for m, dW in total.items():
        assert torch.allclose(server.global_state[merged_key(m)].double(), dW, atol=1e-4)


# ----------------------------------------------------------------------------------------- HetLoRA
@pytest.mark.parametrize("gamma,stuck", [(0.75, "2 / 1"), (0.5, "1")])
def test_hetlora_names_the_ranks_that_can_never_self_prune(tiny_tok, caplog, gamma, stuck):
    """ceil(gamma r) = r leaves nothing to prune: at gamma 0.75 ranks 2 and 1 never prune (8 -> 6, 4 -> 3
    can); at gamma 0.5 rank 2 can (-> 1) and only rank 1 cannot."""
    with caplog.at_level(logging.WARNING, logger="fedmole"):
        _setup(tiny_tok, "hetlora", self_pruning=True, prune_gamma=gamma, tiers={"per_client": [8, 4, 2, 1]})
    lines = [r.getMessage() for r in caplog.records if "self-pruning" in r.getMessage()]
    assert len(lines) == 1 and f"clients at rank {stuck} never prune" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmole"):
        _setup(tiny_tok, "hetlora", self_pruning=False, tiers={"per_client": [8, 4, 2, 1]})
    assert not [r for r in caplog.records if "self-pruning" in r.getMessage()]
