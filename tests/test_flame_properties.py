"""FLAME's method-defining properties on the client and in the tiers (spec: specs/flame.md §4-§5): the
rescaler's learning-rate multiplier, a client's own rescaler carried between rounds, a new rescaler's start
at the measured probability-mass ratio (on a router peaked enough that the ratio is far from K/k), the
global evaluation at k = K with s = 1, and the tier mixes. `make mutation` breaks each of them on purpose."""

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedmole.algorithms import flame
from fedmole.client.train import make_optimizer
from fedmole.config_io import load_config
from fedmole.messages import ClientState, Payload
from fedmole.run import build_runtime, load_federated_data
from fedmole.tiers import assign_tiers

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke_flame.yaml"
FAST = ["data.max_examples=240", "eval.max_examples=2", "federation.num_clients=3", "partition.min_size=10"]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(SMOKE, [*FAST, "tiers.per_client=[1,2,4]", "train.local_steps=1",
                              "algorithm.rescaler_lr_scale=7"])
    rt = build_runtime(cfg, load_federated_data(cfg))
    return cfg, rt, flame.Server(cfg, rt.adapters), flame.Client(cfg, rt)


@pytest.fixture
def start_of_training(setup, monkeypatch):
    """Replaces local training by a probe: what each layer's s, the param groups and the lr were."""
    cfg, rt, server, client = setup
    seen = {}

    def probe(cid, state, params, lr, steps, extra_loss=None, before_step=None):
        seen.update(s={p: float(layer.s) for p, layer in client.layers.layers.items()}, groups=params, lr=lr)
        return {"loss": 0.0, "steps": steps, "tokens": 0}

    monkeypatch.setattr(rt, "train", probe)
    return seen


def _log_s(client, value):
    return {key: math.log(value) for key in client.layers.rescaler_keys()}


def test_rescaler_trains_at_its_learning_rate_multiplier(setup, start_of_training):
    cfg, rt, server, client = setup
    payload = server.configure_train(1, [0], evaluate=False)[0]
    client.train(0, payload, ClientState(tensors={k: torch.tensor([0.3]) for k in client.layers.rescaler_keys()}))
    opt = make_optimizer(start_of_training["groups"], cfg.train, start_of_training["lr"])
    rescalers = {id(p) for p in client.layers.rescaler_parameters()}
    lrs = {any(id(p) in rescalers for p in g["params"]): g["lr"] for g in opt.param_groups}
    assert lrs == {False: pytest.approx(payload.config["lr"]), True: pytest.approx(7 * payload.config["lr"])}


def test_a_client_resumes_from_its_own_rescaler_not_its_tiers(setup, start_of_training):
    """Own s = 2.5 (kept from its last round) wins over the tier average 1.7 the server sends; a client
    without one starts from the tier average."""
    cfg, rt, server, client = setup
    base = server.configure_train(1, [0], evaluate=False)[0]
    payload = Payload(base.tensors, {**base.config, "tier_log_s": _log_s(client, 1.7)})
    own = ClientState(tensors={k: torch.tensor([v]) for k, v in _log_s(client, 2.5).items()})
    client.train(0, payload, own)
    assert start_of_training["s"] == pytest.approx(dict.fromkeys(client.layers.layers, 2.5))
    client.train(0, payload, ClientState())
    assert start_of_training["s"] == pytest.approx(dict.fromkeys(client.layers.layers, 1.7))


def _measured_ratio(rt, client, batch):
    """Per MoE layer, from the router inputs of the first training batch at s = 1: the mean over real
    tokens of (sum of the top-K probabilities) / (sum of the top-k), with p = softmax(W_g x)."""
    L, inputs = client.layers, {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, p=p: inputs.__setitem__(p, args[0]))
             for p, layer in L.layers.items()]
    L.set_log_s({})
    try:
        with torch.no_grad():
            rt.model.eval()
            rt.model(**batch)
    finally:
        for h in hooks:
            h.remove()
    mask = batch["attention_mask"].reshape(-1).double()
    out = {}
    for p, layer in L.layers.items():
        probs = torch.softmax(inputs[p].reshape(-1, inputs[p].shape[-1]).double() @ layer.router.weight.double().t(), -1)
        top = probs.topk(L.K, dim=-1).values
        ratio = top.sum(-1) / top[:, :1].sum(-1)  # k = 1
        out[p] = float((ratio * mask).sum() / mask.sum())
    return out


def test_a_new_rescaler_starts_at_the_measured_mass_ratio_far_from_K_over_k(setup, start_of_training):
    """A tier-1 client (K = 4) without own or tier rescaler. With the pretrained router made 12x sharper,
    the top-1 expert carries most of the top-4 mass: the measured ratio is about 1.7-1.9, far from both
    K/k = 4 (the fixed ablation) and 1 (no rescaler), and s starts exactly there."""
    cfg, rt, server, client = setup
    payload = server.configure_train(1, [0], evaluate=False)[0]
    assert payload.config["k"] == 1 and payload.config["tier_log_s"] is None
    routers = {p: layer.router.weight.detach().clone() for p, layer in client.layers.layers.items()}
    try:
        with torch.no_grad():
            for p, layer in client.layers.layers.items():
                layer.router.weight.mul_(12.0)
        rt.adapters.load(payload.tensors)
        client.layers.set_k(1)
        expected = _measured_ratio(rt, client, client._first_batch(0, ClientState()))
        client.train(0, payload, ClientState())
    finally:
        with torch.no_grad():
            for p, layer in client.layers.layers.items():
                layer.router.weight.copy_(routers[p])
    assert all(1.3 < r < 2.5 for r in expected.values()), expected  # |ratio - K/k| > 1.5: the test discriminates
    assert start_of_training["s"] == pytest.approx(expected, rel=1e-5)


def test_global_model_is_evaluated_at_full_k_with_unit_rescaler(setup, monkeypatch):
    """Whatever k and s the client trained with, `global` is evaluated at k = K = 4 and s = 1, and the
    tier-wise model of a lower tier at its k with the tier's average s."""
    cfg, rt, server, client = setup
    monkeypatch.setattr(server, "client_log_s", {0: _log_s(client, 2.0)})  # tier 1's only member trained s = 2
    seen = []
    monkeypatch.setattr(rt, "evaluate", lambda cid, label, splits=None: seen.append(
        (label, next(iter(client.layers.layers.values())).k,
         [float(layer.s) for layer in client.layers.layers.values()])) or [])
    for c in (0, 1, 2):
        client.layers.set_k(1)
        client.layers.set_log_s(_log_s(client, 3.0))  # left over from training
        client.evaluate(c, server.configure_evaluate(1, [c])[c], ClientState())
    assert seen[0] == ("global", 4, pytest.approx([1.0, 1.0]))
    assert ("global_k1", 1, pytest.approx([2.0, 2.0])) in seen
    assert all(k == 4 and s == pytest.approx([1.0, 1.0]) for label, k, s in seen if label == "global")


@pytest.mark.parametrize("mix,expected", [
    ("uniform", {8: 5, 4: 5, 2: 5, 1: 5}),
    ("low-heavy", {8: 2, 4: 2, 2: 6, 1: 10}),  # 10 / 10 / 30 / 50 %
    ("high-heavy", {8: 10, 4: 6, 2: 2, 1: 2}),  # 50 / 30 / 10 / 10 %
])
def test_tier_mixes_give_the_specified_shares_of_clients(mix, expected):
    cfg = load_config(None, ["algorithm.name=flame", "federation.num_clients=20", f"tiers.mix={mix}"])
    tiers = assign_tiers(cfg, 8)
    assert Counter(tiers) == expected
    other_seed = load_config(None, ["algorithm.name=flame", "federation.num_clients=20", f"tiers.mix={mix}",
                                    "federation.seed=7"])
    assert Counter(assign_tiers(other_seed, 8)) == expected  # the seed permutes clients, not the shares
