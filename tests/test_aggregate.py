"""Weighted averaging of named tensors (the shared aggregation mechanics)."""

import pytest
import torch

from fedmole.algorithms.aggregate import client_weights, weighted_mean


def test_fedavg_of_identical_updates_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    state = {"m/lora/A": torch.randn(4, 8, generator=gen), "m/lora/B": torch.randn(8, 4, generator=gen)}
    out = weighted_mean([(state, 3.0), (dict(state), 17.0), (dict(state), 1.0)])
    for k in state:
        assert torch.equal(out[k], state[k])


def test_weighted_mean_uses_data_size_weights():
    a, b = {"x/lora/A": torch.zeros(2)}, {"x/lora/A": torch.ones(2) * 4}
    out = weighted_mean([(a, 1.0), (b, 3.0)])
    assert torch.allclose(out["x/lora/A"], torch.full((2,), 3.0))


def test_keys_are_averaged_over_their_holders_only():
    a = {"m/3/A": torch.ones(2), "m/shared/A": torch.zeros(2)}
    b = {"m/shared/A": torch.ones(2) * 2}
    out = weighted_mean([(a, 1.0), (b, 1.0)])
    assert torch.equal(out["m/3/A"], torch.ones(2))
    assert torch.equal(out["m/shared/A"], torch.ones(2))


def test_zero_and_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="zero"):
        weighted_mean([({"k": torch.ones(1)}, 0.0)])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_mean([({"k": torch.ones(1)}, -1.0)])


def test_client_weights_modes():
    assert client_weights({0: 10, 1: 30}, "data_size") == {0: 10.0, 1: 30.0}
    assert client_weights({0: 10, 1: 30}, "uniform") == {0: 1.0, 1: 1.0}
