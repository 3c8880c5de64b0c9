"""FedAMoLE's method-defining properties, each on a small hand-checkable case (spec: specs/fedamole.md):
RSEA's softmax over clients of scores scaled by 1/sqrt(r), the expert-count bounds, unweighted aggregation,
the load-balancing term lambda_lb * sum over modules, embeddings of the locally trained model, and the
per-round learning-rate decay every method shares. `make mutation` breaks each of them on purpose."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmole.adapters.state import parse_key
from fedmole.algorithms import fedamole, get_algorithm, rsea
from fedmole.client.train import round_lr
from fedmole.config_io import load_config, validate_config
from fedmole.messages import ClientState, Payload, Reply
from fedmole.models.tiny import tiny_llama, tiny_olmoe
from fedmole.run import build_runtime, load_federated_data

from conftest import fedamole_server

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke_fedamole.yaml"
CLIENTS = [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------- RSEA
def test_rsea_affinity_is_a_softmax_over_clients_of_scores_scaled_by_one_over_sqrt_r():
    """r = 4, so the scores are U_bar T^T / 2. Expert 0 scores (ln 3, 0) over the two clients, expert 1
    (0, ln 4), expert 2 (0, 0): each expert's row is a distribution over the clients."""
    T = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # (C=2, r=4)
    U = np.array([[2 * math.log(3), 0, 0, 0], [0, 2 * math.log(4), 0, 0], [0, 0, 5.0, 5.0]])  # (N=3, r)
    P = rsea.affinity(U, T)
    assert P == pytest.approx(np.array([[3 / 4, 1 / 4], [1 / 5, 4 / 5], [1 / 2, 1 / 2]]), abs=1e-12)
    # a softmax over experts would give column 0 = (3/5, 1/5, 1/5); without 1/sqrt(r) expert 0 gets (9/10, 1/10)
    batched = rsea.affinity(np.stack([U, 2 * U]), np.stack([T, T]))  # (modules, N, C): solved independently
    assert batched[0] == pytest.approx(P) and batched[1][0] == pytest.approx([9 / 10, 1 / 10])


def test_reverse_selection_on_an_asymmetric_case_follows_the_per_expert_softmax():
    """Scores S = U T^T / sqrt(4) with T = 2 I: expert 0 (1, 2.5), expert 1 (1, 2), expert 2 (0, 20); each
    expert picks one client, each client holds 1 or 2 experts. Per expert, client 1 is preferred by
    softmax margins 0.82, 0.73 and ~1: the optimum sends experts 0 and 2 to client 1 and expert 1 to client 0
    (1.09 + 1 against 0.91 + 1). A softmax over experts would let expert 2 swamp client 1's column and send
    experts 0 and 1 to client 0."""
    T = 2.0 * np.eye(2, 4)
    U = np.array([[1.0, 2.5, 0, 0], [1.0, 2.0, 0, 0], [0.0, 20.0, 0, 0]])
    X = rsea.solve_assignment(rsea.affinity(U, T), expert_choices=1, min_experts=1, max_experts=2)
    assert X.astype(int).tolist() == [[0, 1], [1, 0], [0, 1]]


def _embeddings(server, cid, rng):
    r = server.cfg.algorithm.rank
    out = {}
    for m in server.modules:
        out[f"{m}/router/t"] = torch.tensor(rng.normal(size=r), dtype=torch.float32)
        for e in server.arch[cid][m]:
            out[f"{m}/{e}/u"] = torch.tensor(rng.normal(size=r), dtype=torch.float32)
    return out


def test_every_client_holds_between_min_and_max_experts_in_every_module(tiny_tok):
    """8 experts x k_c = 2 over 4 clients with at most 4 each: every client holds exactly 4, in the
    random round-1 draw and in the RSEA assignment after it, in every module."""
    _, server = fedamole_server(tiny_tok, "algorithm.min_experts=2", "algorithm.max_experts=4")
    rng = np.random.default_rng(0)
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    server.aggregate_train(1, {c: Reply({**plans[c].tensors, **_embeddings(server, c, rng)}, 10) for c in CLIENTS})
    for rnd in (1, 2):
        for per_client in server.plan(rnd, CLIENTS).values():
            assert sorted(len(ids) for ids in per_client.values()) == [4, 4, 4, 4]


def test_experts_router_and_embeddings_are_averaged_unweighted_by_default(tiny_tok):
    """Clients with 1, 5, 10 and 50 training examples add c + 1 to every tensor and upload embeddings
    c + 1: the router and shared expert become the plain mean over all clients, an expert (and its
    embedding u_bar_e) the plain mean over its holders; the example counts play no part."""
    _, server = fedamole_server(tiny_tok)
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    before = dict(server.global_state)
    sizes = {0: 1, 1: 5, 2: 10, 3: 50}
    replies = {}
    for c in CLIENTS:
        emb = {k: torch.full_like(v, float(c + 1)) for k, v in _embeddings(server, c, np.random.default_rng(c)).items()}
        replies[c] = Reply({**{k: v + float(c + 1) for k, v in plans[c].tensors.items()}, **emb}, sizes[c])
    server.aggregate_train(1, replies)
    for k, v in server.global_state.items():
        m, e, _ = parse_key(k)
        holders = CLIENTS if not e.isdigit() else [c for c in CLIENTS if int(e) in server.arch[c][m]]
        assert torch.allclose(v, before[k] + float(np.mean([c + 1 for c in holders])), atol=1e-6), k
    m = server.modules[0]
    for e in range(8):
        holders = [c for c in CLIENTS if e in server.arch[c][m]]
        assert server.U_bar[0, e] == pytest.approx(torch.full((4,), float(np.mean([c + 1 for c in holders]))).double())


# -------------------------------------------------------------------------------------- the client
@pytest.fixture(scope="module")
def runtime():
    cfg = load_config(SMOKE, ["algorithm.lb_weight=0.01", "train.optimizer=sgd", "train.lr=0.5"])
    rt = build_runtime(cfg, load_federated_data(cfg))
    return cfg, rt, fedamole.Server(cfg, rt.adapters), fedamole.Client(cfg, rt)


def _payload(server, cid, **config):
    payload = server.configure_train(1, CLIENTS, evaluate=False)[cid]
    return Payload(payload.tensors, {**payload.config, **config})


def test_training_adds_lb_weight_times_the_sum_of_the_modules_load_balancing_terms(runtime, monkeypatch):
    """Modules report load-balancing terms 1, 2, 3, 4: the training loss gets 0.01 * (1+2+3+4) = 0.1
    (not 1 * 10, and not 0.01 * their mean 2.5)."""
    cfg, rt, server, client = runtime
    for i, mod in enumerate(rt.adapters.modules.values()):
        monkeypatch.setattr(mod, "pop_load_balance", lambda v=float(i + 1): torch.tensor(v))
    seen = []

    def train(cid, state, params, lr, steps, extra_loss=None, before_step=None):
        seen.append(None if extra_loss is None else float(extra_loss()))
        return {"loss": 0.0, "steps": steps, "tokens": 0}

    monkeypatch.setattr(rt, "train", train)
    client.train(1, _payload(server, 1, embed=False, eval_personalized=False), ClientState())
    assert len(rt.adapters.modules) == 4
    assert seen == [pytest.approx(0.01 * 10)]


def test_the_extra_loss_term_enters_the_gradient_with_weight_one(runtime):
    """One SGD step (lr 0.5, no momentum) with an extra term 3 * sum(W_t) moves every router weight by
    exactly -0.5 * 3 more than the same step without it."""
    cfg, rt, server, _ = runtime
    start = _payload(server, 0).tensors
    mod = next(iter(rt.adapters.modules.values()))
    after = []
    for extra in (None, lambda: 3.0 * mod.W_t.sum()):
        rt.adapters.load(start)
        rt.seed(1, 0, "train")
        rt.train(0, ClientState(), [mod.W_t], 0.5, 1, extra_loss=extra)
        after.append(mod.W_t.detach().clone())
        for m in rt.adapters.modules.values():
            m.pop_load_balance()  # the AMoLE layers recorded terms this loop did not consume
    assert torch.allclose(after[1] - after[0], torch.full_like(after[0], -1.5), atol=1e-5)


def test_embeddings_are_computed_from_the_locally_trained_model(runtime):
    """The uploaded t_c and u_{c,e} equal the embeddings of the uploaded (trained) weights, and differ from
    those of the dispatched weights the client started from."""
    cfg, rt, server, client = runtime
    payload = _payload(server, 2, embed=True, eval_personalized=False, steps=2)
    rt.seed(1, 2, "train")
    reply = client.train(2, payload, ClientState())
    uploaded = {k: v for k, v in reply.tensors.items() if parse_key(k).name in ("t", "u")}
    trained = {k: v for k, v in reply.tensors.items() if parse_key(k).name not in ("t", "u")}
    assert uploaded and any(not torch.equal(trained[k], payload.tensors[k]) for k in trained)
    rt.adapters.load(trained)
    of_trained, _, _ = client.embeddings(2)
    rt.adapters.load(payload.tensors)
    of_dispatched, _, _ = client.embeddings(2)
    assert set(of_trained) == set(uploaded)
    assert all(torch.allclose(uploaded[k], of_trained[k], atol=1e-6) for k in uploaded)
    assert max(float((uploaded[k] - of_dispatched[k]).abs().max()) for k in uploaded) > 1e-3


# ------------------------------------------------------------------------------ every method's lr
@pytest.mark.parametrize("name", ["fedit", "local", "ffa_lora", "hetlora", "flexlora", "flora", "fdlora", "fedamole",
                                  "flame"])
def test_every_method_sends_the_round_learning_rate_lr_times_decay_to_the_round_minus_one(tiny_tok, name):
    alg = {"fedamole": {"num_experts": 8, "max_experts": 6, "rank": 4, "alpha": 8}}.get(name, {})
    cfg = validate_config({"algorithm": {"name": name, **alg}, "federation": {"num_clients": 4},
                           "train": {"lr": 0.1, "lr_decay": 0.5}, "tiers": {"per_client": [4, 4, 2, 1]},
                           "partition": {"splits": {"aux": 0.05}}})
    assert [round_lr(cfg.train, r, cfg.federation.rounds) for r in (1, 2, 3)] == pytest.approx([0.1, 0.05, 0.025])
    algo = get_algorithm(name)
    model = tiny_olmoe(len(tiny_tok)) if name == "flame" else tiny_llama(len(tiny_tok))
    server = algo.Server(cfg, algo.build_adapters(model, cfg))
    for rnd, lr in ((1, 0.1), (3, 0.025)):
        plans = server.configure_train(rnd, CLIENTS, evaluate=False)
        assert [p.config["lr"] for p in plans.values()] == pytest.approx([lr] * 4)
