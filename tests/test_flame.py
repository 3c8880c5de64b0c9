"""FLAME server side: activation-aware aggregation, tiers, rescaler statistics, FLOPs, config errors."""

import math

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from fedmole.adapters import parse_key
from fedmole.algorithms.aggregate import robust_mean, weighted_mean
from fedmole.algorithms.flame import (
    RoutedLayers,
    Server,
    aggregate_experts,
    build_adapters,
    flops_per_token,
    log_gamma,
    normalised_weights,
)
from fedmole.config_io import load_config
from fedmole.errors import UserError
from fedmole.messages import Reply
from fedmole.models.tiny import tiny_llama, tiny_olmoe

VOCAB = 200


def _cfg(*overrides, clients=4):
    return load_config(None, ["algorithm.name=flame", f"federation.num_clients={clients}", *overrides])


def _state(seed, experts=3, module="m"):
    gen = torch.Generator().manual_seed(seed)
    out = {f"{module}/{j}/{n}": torch.randn(2, 3, generator=gen) for j in range(experts) for n in ("gate_A", "gate_B")}
    out[f"{module}/router/W"] = torch.randn(3, 4, generator=gen)
    return out


def _reply(seed, counts, tokens, n, drop=()):
    tensors = {k: v for k, v in _state(seed).items() if int(parse_key(k).expert in drop) == 0}
    return Reply(tensors, n, extra={"counts": {"m": counts}, "tokens": tokens, "steps": 5})


def test_temperature_zero_is_data_size_fedavg():
    old = _state(0)
    replies = {0: _reply(1, [5, 0, 3], 8, 10), 1: _reply(2, [2, 6, 0], 8, 30), 2: _reply(3, [1, 1, 6], 8, 20)}
    new, info = aggregate_experts(old, replies, t=0.0, normaliser="tokens")
    expected = weighted_mean([(r.tensors, float(r.num_examples)) for r in replies.values()])
    assert all(torch.allclose(new[k], expected[k], atol=1e-6) for k in old)
    assert info == {"experts_updated": 3, "experts_kept": 0}


def test_expert_weights_are_activation_frequency_to_the_t_times_data_size():
    old = _state(0)
    replies = {0: _reply(1, [6, 2, 4], 8, 10), 1: _reply(2, [2, 6, 0], 16, 30)}
    new, _ = aggregate_experts(old, replies, t=2.0, normaliser="tokens")
    g0, g1 = (6 / 8) ** 2 * 10, (2 / 16) ** 2 * 30  # expert 0
    k = "m/0/gate_A"
    assert torch.allclose(new[k], (g0 * replies[0].tensors[k] + g1 * replies[1].tensors[k]) / (g0 + g1), atol=1e-6)
    assert torch.allclose(new["m/2/gate_B"], replies[0].tensors["m/2/gate_B"])  # only client 0 used expert 2
    # the router (non-expert) is data-size FedAvg whatever the counts
    assert torch.allclose(new["m/router/W"], (10 * replies[0].tensors["m/router/W"] + 30 * replies[1].tensors[
        "m/router/W"]) / 40, atol=1e-6)


def test_steps_normaliser_divides_by_steps():
    old = _state(0)
    replies = {0: _reply(1, [6, 2, 4], 8, 10), 1: _reply(2, [2, 6, 1], 16, 10)}
    new, _ = aggregate_experts(old, replies, t=1.0, normaliser="steps")  # both 5 steps: weights 6:2 for expert 0
    k = "m/0/gate_A"
    assert torch.allclose(new[k], (6 * replies[0].tensors[k] + 2 * replies[1].tensors[k]) / 8, atol=1e-6)


def test_experts_nobody_activated_keep_their_previous_value():
    old = _state(0)
    replies = {0: _reply(1, [3, 0, 5], 8, 10, drop=("1",)), 1: _reply(2, [4, 0, 4], 8, 10, drop=("1",))}
    new, info = aggregate_experts(old, replies, t=2.0, normaliser="tokens")
    assert torch.equal(new["m/1/gate_A"], old["m/1/gate_A"]) and torch.equal(new["m/1/gate_B"], old["m/1/gate_B"])
    assert not torch.equal(new["m/0/gate_A"], old["m/0/gate_A"])
    assert info == {"experts_updated": 2, "experts_kept": 1}


def test_skipped_uploads_count_as_the_unchanged_global_copy_when_t_is_zero():
    old = _state(0)
    full = {0: _reply(1, [3, 0, 5], 8, 10), 1: _reply(2, [4, 2, 4], 8, 30)}
    full[0].tensors.update({k: old[k] for k in old if parse_key(k).expert == "1"})  # untouched copy
    skipped = {0: _reply(1, [3, 0, 5], 8, 10, drop=("1",)), 1: full[1]}
    a, _ = aggregate_experts(old, full, t=0.0, normaliser="tokens")
    b, _ = aggregate_experts(old, skipped, t=0.0, normaliser="tokens")
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in old)


def test_robust_rule_combines_an_expert_over_the_clients_that_trained_it():
    old = _state(0)
    replies = {c: _reply(c + 1, [3, 1 if c < 2 else 0, 2], 8, 10 * (c + 1)) for c in range(3)}
    new, _ = aggregate_experts(old, replies, t=2.0, normaliser="tokens",
                               combine=lambda contributions: robust_mean(contributions, "median"))
    k = "m/0/gate_A"
    median = torch.stack([replies[c].tensors[k] for c in range(3)]).median(0).values
    assert torch.allclose(new[k], median)
    k = "m/1/gate_B"  # only clients 0 and 1 activated expert 1: the median of two is their mean
    assert torch.allclose(new[k], (replies[0].tensors[k] + replies[1].tensors[k]) / 2, atol=1e-7)


def test_tiny_frequencies_with_large_t_do_not_underflow():
    # f = 1e-80: f^5 = 1e-400 underflows float64, log space does not
    assert normalised_weights([log_gamma(1, 1e80, 10, 5.0), log_gamma(2, 1e80, 10, 5.0)]) == pytest.approx(
        [1 / 33, 32 / 33])
    assert normalised_weights([log_gamma(0, 10, 10, 2.0)] * 2) is None
    assert log_gamma(0, 10, 7, 0.0) == pytest.approx(math.log(7))


# ----------------------------------------------------------------------------------------- server
def _server(*overrides, model="olmoe", clients=4):
    cfg = _cfg(*overrides, clients=clients)
    m = tiny_olmoe(VOCAB) if model == "olmoe" else tiny_llama(VOCAB)
    adapters = build_adapters(m, cfg)
    return Server(cfg, adapters), adapters


def test_auto_picks_pretrained_experts_on_moe_and_lora_pools_on_dense():
    server, adapters = _server()
    assert server.layers.mode == "pretrained" and server.K == 4 and server.layers.M == 8
    assert "model.layers.0.mlp/5/gate_A" in server.global_state
    assert not any(parse_key(k).expert == "rescaler" for k in server.global_state)  # s never goes global
    dense, _ = _server(model="llama")
    assert dense.layers.mode == "lora" and dense.K == 4
    assert "model.layers.1.mlp.down_proj/7/B" in dense.global_state
    assert "model.layers.1.mlp.down_proj/router/W" in dense.global_state


def test_default_tiers_are_K_and_halvings_seeded_and_data_independent():
    server, _ = _server(clients=6)
    assert sorted(server.tiers) == [1, 1, 2, 2, 4, 4]
    again, _ = _server(clients=6)
    assert again.tiers == server.tiers
    plans = server.configure_train(1, [0, 3], evaluate=False)
    assert plans[3].config["k"] == server.tiers[3]


@pytest.mark.parametrize("override", ["tiers.per_client=[4,8,2,1]", "tiers.levels=[8,4,2,1]"])
def test_tier_above_model_K_is_a_user_error(override):
    with pytest.raises(UserError, match="K=4"):
        _server(override)


def test_tier_zero_or_above_pool_K_is_rejected_at_config_load():
    with pytest.raises(UserError, match="tier value must be an integer >= 1"):
        _cfg("tiers.per_client=[4,0,2,1]")
    with pytest.raises(UserError, match="above K = algorithm.top_k = 4"):
        _cfg("algorithm.experts=lora", "tiers.per_client=[4,5,2,1]")


def test_rescaler_is_averaged_within_tiers_never_across():
    server, _ = _server("tiers.per_client=[2,2,1,4]")
    keys = server.layers.rescaler_keys()
    rescalers = {0: 1.2, 1: 1.6, 2: 3.0, 3: 1.0}
    replies = {}
    for c, s in rescalers.items():
        tensors = dict(server.global_state)
        tensors.update({k: torch.tensor([math.log(s)]) for k in keys})
        counts = {p: [1] * 8 for p in server.layers.layers}
        replies[c] = Reply(tensors, 10, extra={"counts": counts, "tokens": 8, "steps": 1})
    server.aggregate_train(1, replies)
    assert all(math.exp(v) == pytest.approx(1.4) for v in server.tier_log_s(2).values())
    assert all(math.exp(v) == pytest.approx(3.0) for v in server.tier_log_s(1).values())
    assert server.tier_log_s(4) == {}  # k = K: frozen at s = 1
    plans = server.configure_train(2, [0, 2], evaluate=False)
    assert math.exp(next(iter(plans[2].config["tier_log_s"].values()))) == pytest.approx(3.0)
    evals = server.configure_evaluate(2, [0, 3])
    assert [e["label"] for e in evals[0].config["evaluations"]] == ["global", "global_k2"]
    assert evals[0].config["evaluations"][0] == {"label": "global", "k": 4, "log_s": {}}
    assert [e["label"] for e in evals[3].config["evaluations"]] == ["global"]


def test_replies_may_skip_experts_and_carry_rescalers_but_nothing_else():
    from fedmole.algorithms.validate import Limits, check_reply

    server, _ = _server()
    payload = server.configure_train(1, [0], evaluate=False)[0]
    rules, limits = server.reply_rules(0, payload), Limits(100.0)
    some = {k: v for k, v in list(payload.tensors.items())[:10]}
    rescaler = {k: torch.zeros(1) for k in server.layers.rescaler_keys()}
    k, steps = payload.config["k"], payload.config["steps"]
    extra = {"k": k, "steps": steps, "tokens": 10, "counts": {m: [10] * k + [0] * (server.layers.M - k)
                                                               for m in server.layers.layers}}
    assert check_reply(Reply({**some, **rescaler}, 5, extra=extra), rules, limits) is None
    assert "unexpected" in check_reply(Reply({**some, **rescaler, "model.layers.0.mlp/99/gate_A": torch.zeros(1)}, 5,
                                             extra=extra), rules, limits)
    assert "missing tensors" in check_reply(Reply(some, 5, extra=extra), rules, limits)  # the rescaler is required
    too_many = {**extra, "counts": {m: [11] * server.layers.M for m in server.layers.layers}}
    assert "more tokens" in check_reply(Reply({**some, **rescaler}, 5, extra=too_many), rules, limits)


def test_fixed_rescaler_is_K_over_k():
    server, _ = _server("algorithm.rescaler=fixed", "tiers.per_client=[4,2,1,1]")
    assert all(math.exp(v) == pytest.approx(4.0) for v in server.tier_log_s(1).values())
    assert all(math.exp(v) == pytest.approx(2.0) for v in server.tier_log_s(2).values())


def test_flops_estimate_reproduces_the_spec_numbers_for_olmoe_1b_7b():
    config = OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = OlmoeForCausalLM(config)
    layers = RoutedLayers(build_adapters(model, _cfg()))
    f8, f1 = (flops_per_token(model, layers, k)["forward"] / 1e9 for k in (8, 1))
    lora8 = 2 * 8 * 3072 * 3 * 8 * 16 / 1e9  # spec: LoRA on 8 experts x 3 projections x 16 layers at r=8
    assert f8 - lora8 == pytest.approx(2.36, abs=0.01)  # spec section 4: ~2.36 GFLOPs/token at k=8
    assert f1 == pytest.approx(0.95, abs=0.01)  # and ~0.95 at k=1
    assert f1 / f8 < 0.41


def test_config_rejects_keys_that_do_not_apply():
    with pytest.raises(UserError, match="only applies to algorithm.rescaler=learned"):
        _cfg("algorithm.rescaler=fixed", "algorithm.rescaler_granularity=client")
    with pytest.raises(UserError, match="top_k applies to the LoRA-expert pools"):
        _cfg("algorithm.experts=pretrained", "algorithm.top_k=2")
    with pytest.raises(UserError, match="router of the LoRA-expert pools"):
        _cfg("algorithm.experts=lora", "algorithm.train_router=true")
    with pytest.raises(UserError, match="expert"):
        _cfg("algorithm.experts=pretrained", "algorithm.target_modules=[q_proj]")
    with pytest.raises(UserError, match="temperature"):
        _cfg("algorithm.temperature=-1")
    with pytest.raises(UserError, match="activation counts in the clear"):
        _cfg("dp.enabled=true")


def test_pretrained_on_dense_model_is_a_user_error():
    cfg = _cfg("algorithm.experts=pretrained")
    with pytest.raises(UserError, match="experts=lora"):
        build_adapters(tiny_llama(VOCAB), cfg)


def test_param_groups_scale_the_round_learning_rate():
    """The rescaler's faster learning rate: optimiser param groups with `lr_scale` (client/train.py)."""
    from fedmole.client.train import flat_params, make_optimizer
    from fedmole.config import TrainConfig

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [a]}, {"params": [b], "lr_scale": 10.0}], TrainConfig(optimizer="adamw"), 2e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-4, 2e-3])
    assert flat_params([{"params": [a]}, {"params": [b]}]) == [a, b] and flat_params([a, b]) == [a, b]


def test_dispatch_chooses_how_lora_pools_compute_and_is_refused_for_pretrained_experts():
    assert _cfg().algorithm.dispatch == "dense"
    with pytest.raises(UserError, match="dispatch applies to the LoRA-expert pools"):
        _cfg("algorithm.experts=pretrained", "algorithm.dispatch=sparse")
    with pytest.raises(UserError, match="whose pretrained experts always run only the selected"):
        _server("algorithm.dispatch=sparse")  # auto resolves to pretrained on tiny-olmoe
    _, adapters = _server("algorithm.dispatch=sparse", model="llama")
    assert {m.dispatch for _, m in adapters} == {"sparse"}


# ------------------------------------------------------------------------- server optimisers for the experts
def _expert_reply(server, delta, count, n):
    """A reply that moved every tensor of layer 0's expert 0 by `delta` and routed `count` of 8 tokens there."""
    tensors = {k: v + delta for k, v in server.global_state.items() if k.startswith("model.layers.0.mlp/0/")}
    counts = {"model.layers.0.mlp": [count] + [0] * 7, "model.layers.1.mlp": [0] * 8}
    return Reply(tensors, n, extra={"counts": counts, "tokens": 8, "steps": 5})


def test_default_fedavg_server_step_is_the_activation_aware_aggregate_bit_for_bit():
    server, _ = _server()
    old = dict(server.global_state)
    replies = {0: _expert_reply(server, 0.3, 4, 10), 1: _expert_reply(server, 0.1, 2, 30)}
    expected, _ = aggregate_experts(old, replies, 2.0, "tokens")
    server.aggregate_train(1, replies)
    assert server.global_state.keys() == expected.keys()
    assert all(torch.equal(server.global_state[k], expected[k]) for k in expected)
    assert server.server_opt.state_dict() == {}  # plain FedAvg keeps no moments


def test_fedadam_steps_each_expert_on_its_gamma_weighted_delta_and_skips_idle_experts():
    server, _ = _server("algorithm.temperature=1.0", "algorithm.server_opt.name=fedadam",
                        "algorithm.server_opt.lr=0.01", "algorithm.server_opt.tau=0.1")
    old = dict(server.global_state)
    server.aggregate_train(1, {0: _expert_reply(server, 0.3, 4, 10), 1: _expert_reply(server, 0.1, 2, 30)})
    # gamma = (a/S)^t |D| = (4/8)*10 = 5 and (2/8)*30 = 7.5  ->  Delta = (5*0.3 + 7.5*0.1) / 12.5 = 0.18
    # m = 0.1 * 0.18 = 0.018;  v = 0.99 * 0.1^2 + 0.01 * 0.18^2 = 0.010224;  step = 0.01 * m / (sqrt(v) + 0.1)
    step = 0.01 * 0.018 / (math.sqrt(0.010224) + 0.1)
    assert step == pytest.approx(8.9501e-4, rel=1e-4)
    k = "model.layers.0.mlp/0/gate_A"
    assert torch.allclose(server.global_state[k], old[k] + step, atol=1e-7)
    assert torch.allclose(server.server_opt.m[k], torch.full_like(old[k], 0.018))
    idle = "model.layers.0.mlp/1/up_B"  # nobody activated expert 1: no step, no moments
    assert torch.equal(server.global_state[idle], old[idle]) and idle not in server.server_opt.m
    # the moments are part of the checkpointed server state
    tensors, meta = server.state_dict()
    again, _ = _server("algorithm.temperature=1.0", "algorithm.server_opt.name=fedadam",
                       "algorithm.server_opt.lr=0.01", "algorithm.server_opt.tau=0.1")
    again.load_state_dict(tensors, meta)
    assert again.global_state.keys() == server.global_state.keys()
    assert all(torch.equal(again.server_opt.v[k], v) for k, v in server.server_opt.v.items())


def test_fedavgm_takes_no_step_on_an_idle_expert_and_keeps_its_momentum():
    server, _ = _server("algorithm.server_opt.name=fedavgm", "algorithm.server_opt.lr=1.0",
                        "algorithm.server_opt.momentum=0.5")
    k = "model.layers.0.mlp/0/down_B"
    x0 = server.global_state[k].clone()
    server.aggregate_train(1, {0: _expert_reply(server, 0.2, 4, 10)})  # g = -0.2, v = -0.2, x = x0 + 0.2
    assert torch.allclose(server.global_state[k], x0 + 0.2, atol=1e-7)
    server.aggregate_train(2, {0: _expert_reply(server, 0.0, 0, 10)})  # nobody routed to it: no step at all
    assert torch.allclose(server.global_state[k], x0 + 0.2, atol=1e-7)
    server.aggregate_train(3, {0: _expert_reply(server, 0.2, 4, 10)})  # v = 0.5 * -0.2 - 0.2 = -0.3
    assert torch.allclose(server.global_state[k], x0 + 0.5, atol=1e-6)  # (stepping in round 2 too would give x0 + 0.55)


def test_flame_config_takes_fedprox_and_server_optimiser_keys():
    cfg = _cfg("algorithm.prox_mu=0.01", "algorithm.server_opt.name=fedyogi")
    assert cfg.algorithm.prox_mu == 0.01 and cfg.algorithm.server_opt.lr == 1e-3
    with pytest.raises(UserError, match="has no effect with server_opt.name=fedavg"):
        _cfg("algorithm.server_opt.tau=0.1")
