"""`train.optimizer_impl`: which of torch's implementations runs the clients' local update.

auto must be torch's default (on CPU: the loop, so every earlier result and digest stands); foreach and fused
must compute the same update up to float rounding, and the setting must reach the clients' optimiser.
"""

from pathlib import Path

import pytest
import torch

from fedmole.client.train import make_optimizer
from fedmole.config import TrainConfig
from fedmole.config_io import load_config
from fedmole.errors import UserError

from conftest import run_config

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def _train(optimizer: str, impl: str, steps: int = 5) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """`steps` updates of two param groups (the second at lr_scale 10) from a fixed start with fixed gradients."""
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(16, 24, generator=gen)) for _ in range(3)]
    b = [torch.nn.Parameter(torch.randn(24, generator=gen))]
    cfg = TrainConfig(optimizer=optimizer, optimizer_impl=impl, weight_decay=0.01, momentum=0.9)
    opt = make_optimizer([{"params": a}, {"params": b, "lr_scale": 10.0}], cfg, lr=1e-2)
    for _ in range(steps):
        for p in a + b:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in a + b], opt


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_every_implementation_computes_the_same_update_and_auto_is_the_loop_on_cpu(optimizer):
    loop, opt = _train(optimizer, "loop")
    assert opt.param_groups[0]["foreach"] is False
    start = _train(optimizer, "loop", steps=0)[0]
    assert min((x - s).abs().max().item() for x, s in zip(loop, start)) > 1e-3  # it trained
    auto, _ = _train(optimizer, "auto")
    assert all(torch.equal(x, y) for x, y in zip(auto, loop))  # bit for bit: earlier digests stand
    for impl, flag in (("foreach", "foreach"), ("fused", "fused")):
        other, opt = _train(optimizer, impl)
        assert all(g[flag] is True for g in opt.param_groups), impl  # torch runs the requested implementation
        assert all(torch.allclose(x, y, rtol=0, atol=1e-5) for x, y in zip(other, loop)), impl
        assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-1]  # the group's lr_scale is kept


def test_a_run_takes_the_setting(tmp_path):
    """On CPU, loop is auto bit for bit; fused is another computation (by float rounding)."""
    base = ["algorithm.name=fedit", "federation.rounds=1", "train.num_threads=1"]
    runs = {impl: run_config(SMOKE, [*base, f"train.optimizer_impl={impl}"], tmp_path / impl)[0]
            for impl in ("auto", "loop", "fused")}
    assert runs["loop"]["state_digest"] == runs["auto"]["state_digest"]
    assert runs["fused"]["state_digest"] != runs["auto"]["state_digest"]  # the fused kernel ran


def test_an_unknown_implementation_is_refused_with_the_choices():
    with pytest.raises(UserError) as err:
        load_config(SMOKE, ["train.optimizer_impl=fast"])
    assert "train.optimizer_impl" in str(err.value) and "fused" in str(err.value)
