"""FLAME client procedure and whole runs: the rescaler trains and stays local, uploads skip idle experts,
3-round runs on tiny-olmoe (tiers 4/2/1) and on the dense variant."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmole.adapters import parse_key
from fedmole.algorithms import flame
from fedmole.client.runtime import ClientRuntime
from fedmole.config_io import load_config
from fedmole.messages import ClientState
from fedmole.models import load_tokenizer
from fedmole.models.tiny import tiny_olmoe
from fedmole.run import build_runtime, load_federated_data, resume_experiment, run_experiment

from conftest import metrics_records

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke_flame.yaml"
DENSE = ROOT / "configs" / "smoke_flame_dense.yaml"
FAST = ["data.max_examples=240", "eval.max_examples=2", "federation.num_clients=3", "partition.min_size=10"]


@pytest.fixture(scope="module")
def olmoe_setup():
    cfg = load_config(SMOKE, [*FAST, "tiers.per_client=[1,2,4]", "train.local_steps=3"])
    runtime = build_runtime(cfg, load_federated_data(cfg))
    return cfg, runtime, flame.Server(cfg, runtime.adapters), flame.Client(cfg, runtime)


def _rescalers(tensors):
    return {k: float(v) for k, v in tensors.items() if parse_key(k).expert == "rescaler"}


def test_rescaler_starts_at_mass_ratio_trains_and_stays_on_the_client(olmoe_setup):
    cfg, runtime, server, client = olmoe_setup
    payload = server.configure_train(1, [0], evaluate=False)[0]
    assert payload.config["k"] == 1 and payload.config["tier_log_s"] is None
    assert not _rescalers(payload.tensors)  # the server never sends a global rescaler
    state = ClientState()
    layers = client.layers
    layers.set_k(1)
    runtime.adapters.load(payload.tensors)
    ratios = layers.mass_ratios(runtime.model, client._first_batch(0, state))
    assert all(r > 1.0 for r in ratios.values())  # fewer experts keep less probability mass

    runtime.seed(1, 0, "train")
    reply = client.train(0, payload, state)
    trained = _rescalers(state.tensors)
    assert set(trained) == set(layers.rescaler_keys())
    for path, r in ratios.items():
        s = math.exp(trained[f"{path}/rescaler/log_s"])
        assert s != pytest.approx(r, abs=1e-7)  # it moved: it trains
        assert s == pytest.approx(r, rel=0.2)  # from the mass-ratio start, not from K/k or 1
    assert _rescalers(reply.tensors) == trained  # uploaded for the tier statistics only

    server.aggregate_train(1, {0: reply})
    assert not _rescalers(server.global_state)
    again = server.configure_train(2, [0, 1, 2], evaluate=False)
    assert again[0].config["tier_log_s"] == pytest.approx(trained)  # tier 1 average = its only member
    assert again[1].config["tier_log_s"] is None  # tier 2: nobody has trained, so nothing to share
    assert again[2].config["tier_log_s"] == {}  # k = K: s = 1, frozen


def test_full_k_client_keeps_s_at_one_and_counts_k_experts_per_token(olmoe_setup):
    cfg, runtime, server, client = olmoe_setup
    payload = server.configure_train(1, [2], evaluate=False)[2]
    assert payload.config["k"] == 4
    runtime.seed(1, 2, "train")
    reply = client.train(2, payload, ClientState())
    assert all(v == 0.0 for v in _rescalers(reply.tensors).values())
    tokens = reply.extra["tokens"]
    assert tokens > 0
    for counts in reply.extra["counts"].values():
        assert sum(counts) == 4 * tokens


def test_fedprox_pulls_the_expert_lora_towards_the_global_copy_but_not_the_rescaler(olmoe_setup):
    cfg, runtime, server, _ = olmoe_setup
    payload = server.configure_train(1, [0], evaluate=False)[0]  # client 0: k = 1, a learned rescaler

    def train(mu):
        alg = cfg.algorithm.model_copy(update={"prox_mu": mu})
        runtime.seed(1, 0, "train")
        reply = flame.Client(cfg.model_copy(update={"algorithm": alg}), runtime).train(0, payload, ClientState())
        lora = {k: v for k, v in reply.tensors.items() if parse_key(k).expert.isdigit()}
        moved = sum(float((v - payload.tensors[k]).norm() ** 2) for k, v in lora.items()) ** 0.5
        return moved, _rescalers(reply.tensors), lora

    probe = flame.Client(cfg, runtime)
    runtime.adapters.load(payload.tensors)
    probe.layers.set_k(1)
    start = probe._initial_log_s(0, 1, payload, ClientState())  # log of the mass ratio, where s starts
    plain, s_plain, lora_plain = train(0.0)
    strong, s_strong, lora_strong = train(1e3)
    assert lora_plain.keys() == lora_strong.keys()  # the same experts trained (and the idle ones skipped)
    assert 0 < strong < 0.5 * plain
    for key, s0 in start.items():  # the rescaler is the client's own: not pulled, it moves as without FedProx
        assert abs(s_strong[key] - s0) > 0.5 * abs(s_plain[key] - s0) > 0


def test_idle_experts_are_not_uploaded():
    cfg = load_config(SMOKE, [*FAST, "tiers.per_client=[1,1,1]", "train.local_steps=1", "train.batch_size=1"])
    tok = load_tokenizer(cfg.model)
    model = tiny_olmoe(len(tok), num_experts=64, top_k=8)
    model.requires_grad_(False)
    adapters = flame.build_adapters(model, cfg)
    runtime = ClientRuntime(cfg, model, tok, adapters, torch.device("cpu"))
    runtime.add_clients(load_federated_data(cfg))
    server, client = flame.Server(cfg, adapters), flame.Client(cfg, runtime)
    payload = server.configure_train(1, [0], evaluate=False)[0]
    reply = client.train(0, payload, ClientState())
    idle = {(m, j) for m, counts in reply.extra["counts"].items() for j, a in enumerate(counts) if a == 0}
    assert len(idle) > 64  # one short sequence at k = 1 cannot reach all 2 x 64 experts
    for key in payload.tensors:
        k = parse_key(key)
        assert (key in reply.tensors) == ((k.module, int(k.expert)) not in idle)
    server.aggregate_train(1, {0: reply})
    skipped = [r for r in server.round_records(1) if r["metric"] == "upload_bytes_skipped"][0]["value"]
    per_expert = 3 * 4 * (64 + 32) * 4  # 3 projections x r (d_in + d_out) at r = 4, fp32 bytes
    assert skipped == len(idle) * per_expert
    for m, j in idle:  # and the server keeps those experts as they were
        key = f"{m}/{j}/gate_A"
        assert torch.equal(server.global_state[key], payload.tensors[key])


def test_three_round_tiny_olmoe_run_with_tiers_4_2_1(tmp_path):
    cfg = load_config(SMOKE, [*FAST, "federation.num_clients=6", "eval.every=3"])
    summary = run_experiment(cfg, tmp_path, "none")
    info = summary["flame"]
    assert info["experts"] == "pretrained" and info["K"] == 4 and sorted(info["tiers"]) == [1, 1, 2, 2, 4, 4]
    flops = info["flops_per_token"]
    assert flops["1"]["forward_gflops"] < flops["2"]["forward_gflops"] < flops["4"]["forward_gflops"]

    acts = [json.loads(line) for line in (tmp_path / "activations.jsonl").read_text().splitlines()]
    assert [a["round"] for a in acts] == [1, 2, 3]
    for rec in acts:
        assert len(rec["clients"]) == 6
        for c in rec["clients"]:
            assert c["k"] == info["tiers"][c["client"]]
            assert all(sum(counts) == c["k"] * c["tokens"] for counts in c["counts"].values())

    # rescalers: per client, never global; per tier averages differ across tiers
    ckpt = tmp_path / "checkpoints" / "round_0003"
    assert not any("rescaler" in k for k in load_file(ckpt / "server.safetensors"))
    clients = {c: load_file(ckpt / "clients" / f"client-{c}.safetensors") for c in range(6)}
    s = {c: math.exp(float(clients[c]["model.layers.0.mlp/rescaler/log_s"])) for c in range(6)}
    by_tier = info["tier_rescaler_s"]
    assert set(by_tier) == {"1", "2"}
    assert min(by_tier["1"]) > max(by_tier["2"]) > 1.0
    for c, k in enumerate(info["tiers"]):
        assert (s[c] == 1.0) == (k == 4)

    labels = {r["model"] for r in metrics_records(tmp_path) if r["split"] == "test"}
    assert labels == {"global", "global_k2", "global_k1"}
    assert set(summary["other_models"]) == {"global_k1", "global_k2"}
    assert summary["global"]["selected_round"] == 3


def test_resume_restores_rescalers_and_tier_statistics_exactly(tmp_path):
    cfg = load_config(SMOKE, [*FAST, "tiers.per_client=[1,2,1]", "checkpoint.keep_last=null"])
    ref = run_experiment(cfg, tmp_path / "ref", "none") if (tmp_path / "ref").mkdir() is None else None
    shutil.copytree(tmp_path / "ref", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "round_0003")
    (tmp_path / "cut" / "summary.json").unlink()
    resumed = resume_experiment(tmp_path / "cut", progress_mode="none")
    assert resumed["state_digest"] == ref["state_digest"]
    assert resumed["flame"]["tier_rescaler_s"] == ref["flame"]["tier_rescaler_s"]
    for name in ("activations.jsonl", "metrics.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "ref" / name).read_text()


def test_three_round_dense_run_trains_router_and_rescaler(tmp_path):
    cfg = load_config(DENSE, [*FAST, "federation.num_clients=3", "tiers.per_client=[4,2,1]", "eval.every=3",
                              "algorithm.target_modules=[down_proj]"])
    summary = run_experiment(cfg, tmp_path, "none")
    assert summary["flame"]["experts"] == "lora"
    server_state = load_file(tmp_path / "checkpoints" / "round_0003" / "server.safetensors")
    initial = flame.build_adapters  # the initial router is drawn from the federation seed
    from fedmole.models import load_model

    model = load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model)))
    start = initial(model, cfg).init_state(cfg.federation.seed)
    router = "model.layers.0.mlp.down_proj/router/W"
    assert not torch.equal(server_state[router], start[router])  # the router trained and was averaged
    assert any(not torch.equal(server_state[k], start[k]) for k in start if k.endswith("/B"))
    client = load_file(tmp_path / "checkpoints" / "round_0003" / "clients" / "client-2.safetensors")
    s1 = math.exp(float(client["model.layers.0.mlp.down_proj/rescaler/log_s"]))
    assert s1 > 1.0
    acts = [json.loads(line) for line in (tmp_path / "activations.jsonl").read_text().splitlines()]
    assert all(sum(v) == c["k"] * c["tokens"] for a in acts for c in a["clients"] for v in c["counts"].values())


def test_smoke_config_runs_flame_with_its_defaults(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml",
                      ["algorithm.name=flame", "federation.num_clients=3", "federation.rounds=1",
                       "eval.max_examples=2"])
    summary = run_experiment(cfg, tmp_path, "none")
    assert summary["flame"]["experts"] == "lora" and summary["global"] is not None
