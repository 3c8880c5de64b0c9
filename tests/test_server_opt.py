"""Server optimisers on the aggregated delta (FedAvgM, FedAdagrad, FedAdam, FedYogi) and FedProx's hook."""

import math

import pytest
import torch

from fedmole.algorithms.server_opt import ServerOptimizer
from fedmole.config import ServerOptConfig
from fedmole.config_io import validate_config
from fedmole.errors import UserError


def _opt(**kw):
    return ServerOptimizer(ServerOptConfig(**kw))


X = {"m/lora/A": torch.tensor([1.0, -2.0, 0.5]), "m/lora/B": torch.tensor([[0.0, 3.0]])}
MEAN = {"m/lora/A": torch.tensor([1.5, -2.5, 0.5]), "m/lora/B": torch.tensor([[0.2, 2.0]])}


def test_fedavg_returns_the_aggregate_itself():
    out = _opt().step(X, MEAN)
    assert all(torch.equal(out[k], MEAN[k]) for k in X)


def test_momentum_optimiser_with_lr_1_and_no_momentum_equals_fedavg():
    opt = _opt(name="fedavgm", lr=1.0, momentum=0.0)
    x = X
    for _ in range(3):  # repeated rounds: no hidden state may accumulate
        x = opt.step(x, MEAN)
        assert all(torch.allclose(x[k], MEAN[k], atol=1e-7) for k in X)


def test_fedavg_with_a_server_rate_scales_the_delta():
    out = _opt(name="fedavg", lr=0.5).step(X, MEAN)
    assert torch.allclose(out["m/lora/A"], torch.tensor([1.25, -2.25, 0.5]))


@pytest.mark.parametrize("nesterov", [False, True])
def test_fedavgm_matches_the_momentum_recursion(nesterov):
    beta, lr = 0.9, 0.1
    opt = _opt(name="fedavgm", lr=lr, momentum=beta, nesterov=nesterov)
    x = {"k/lora/A": torch.tensor([0.0])}
    targets = [1.0, 1.5, 1.0]
    v, ref = 0.0, 0.0
    for t in targets:
        x = opt.step(x, {"k/lora/A": torch.tensor([t])})
        g = -(t - ref)
        v = beta * v + g
        ref = ref - lr * ((g + beta * v) if nesterov else v)
        assert float(x["k/lora/A"]) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_optimisers_match_the_fedopt_rules(name):
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 1e-2
    opt = _opt(name=name, lr=lr, beta1=b1, beta2=b2, tau=tau) if name != "fedadagrad" else \
        _opt(name=name, lr=lr, beta1=b1, tau=tau)
    x, m, v, ref = {"k/lora/B": torch.tensor([0.0])}, 0.0, tau**2, 0.0
    for target in [2e-3, -1e-3, 5e-3]:
        x = opt.step(x, {"k/lora/B": torch.tensor([ref + target])})
        d = target
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
        ref = ref + lr * m / (math.sqrt(v) + tau)
        assert float(x["k/lora/B"]) == pytest.approx(ref, rel=1e-5)


def test_moments_survive_a_checkpoint_round_trip():
    cfg = dict(name="fedadam", lr=1e-2, tau=1e-3)
    a, b = _opt(**cfg), _opt(**cfg)
    x_a = a.step(X, MEAN)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    again = {k: v * 1.5 for k, v in MEAN.items()}
    out_a, out_b = a.step(x_a, again), b.step(x_a, again)
    assert all(torch.equal(out_a[k], out_b[k]) for k in X)
    fresh = _opt(**cfg).step(x_a, again)  # without the moments the step differs
    assert not torch.equal(fresh["m/lora/A"], out_a["m/lora/A"])


def test_keys_nobody_updated_keep_value_and_moments():
    opt = _opt(name="fedavgm", lr=0.1)
    out = opt.step(X, {"m/lora/A": MEAN["m/lora/A"]})
    assert torch.equal(out["m/lora/B"], X["m/lora/B"]) and "m/lora/B" not in opt.v


def test_lr_defaults_follow_the_optimiser_and_unused_keys_are_errors():
    assert ServerOptConfig().lr == 1.0
    assert ServerOptConfig(name="fedavgm", momentum=0.8).lr == pytest.approx(0.2)
    assert ServerOptConfig(name="fedyogi").lr == pytest.approx(1e-3)
    with pytest.raises(UserError, match="server_opt.tau=0.1 has no effect with server_opt.name=fedavgm"):
        validate_config({"algorithm": {"name": "fedit", "server_opt": {"name": "fedavgm", "tau": 0.1}}})
    cfg = validate_config({"algorithm": {"name": "fedit", "server_opt": {"name": "fedadam", "tau": 1e-5}}})
    assert validate_config(cfg.to_dict()).algorithm.server_opt == cfg.algorithm.server_opt  # resolved config reloads


def test_proximal_hook_adds_mu_times_the_distance_to_the_round_start():
    from fedmole.algorithms.fedprox import proximal_hook

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    hook = proximal_hook([p], mu=0.5)
    with torch.no_grad():
        p.add_(torch.tensor([2.0, -4.0]))
    p.grad = torch.tensor([0.1, 0.1])
    hook()
    assert torch.allclose(p.grad, torch.tensor([0.1 + 1.0, 0.1 - 2.0]))
    p.grad = torch.tensor([0.1, 0.1])
    proximal_hook([p], mu=0.0)()
    assert torch.equal(p.grad, torch.tensor([0.1, 0.1]))
