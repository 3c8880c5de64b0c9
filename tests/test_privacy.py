"""Differential privacy that protects outside a simulation: the clients' noise comes from OS entropy unless
`dp.noise: seeded` says otherwise, and the privacy cost of FedAMoLE's embedding DP (one release per
uploaded vector, eps = eta * 2 tau sqrt(r)) is derived, composed and reported per client."""

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import gammaincc

from fedmole.algorithms import fedamole, get_algorithm
from fedmole.client.execute import execute
from fedmole.config_io import load_config, validate_config
from fedmole.messages import ClientState, Payload, Reply
from fedmole.models.tiny import tiny_llama
from fedmole.privacy import embedding_epsilon
from fedmole.run import build_runtime, load_federated_data, run_experiment

from conftest import metrics_records

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SMOKE_FEDAMOLE = ROOT / "configs" / "smoke_fedamole.yaml"
FAST = ["federation.num_clients=4", "eval.max_examples=2", "eval.every=2", "data.max_examples=600",
        "partition.min_size=10", "federation.rounds=1", "train.local_steps=1"]


# ------------------------------------------------------------------------------------ noise source
def test_secure_noise_is_the_default_and_is_recorded_in_the_run_config():
    assert load_config(None, []).dp.noise == "secure"
    with pytest.raises(Exception, match="secure"):
        load_config(None, ["dp.noise=fixed"])


class _EchoProcedure:
    """A client procedure that uploads exactly what it received plus one, so only the DP noise varies."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.runtime = SimpleNamespace(seed=lambda *a: None, crash_at=None)

    def train(self, cid, payload, state):
        return Reply({k: v + 1.0 for k, v in payload.tensors.items()}, 10)


@pytest.mark.parametrize("noise", ["secure", "seeded"])
def test_update_dp_noise_is_reproducible_only_when_seeded(noise):
    cfg = load_config(None, ["dp.enabled=true", f"dp.noise={noise}", "dp.noise_multiplier=1.0"])
    payload = Payload({"m/lora/A": torch.zeros(64)}, {"round": 3})
    uploads = [execute(_EchoProcedure(cfg), "train", 1, payload, ClientState()).reply.tensors["m/lora/A"]
               for _ in range(2)]
    assert not torch.equal(uploads[0], torch.ones(64))  # noise was added
    assert torch.equal(uploads[0], uploads[1]) == (noise == "seeded")


@pytest.mark.parametrize("noise", ["secure", "seeded"])
def test_two_dp_runs_with_the_same_seed_differ_unless_the_noise_is_seeded(tmp_path, caplog, noise):
    cfg = load_config(SMOKE, [*FAST, "dp.enabled=true", "dp.noise_multiplier=0.5", f"dp.noise={noise}"])
    digests = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        with caplog.at_level(logging.WARNING, logger="fedmole"):
            digests.append(run_experiment(cfg, tmp_path / name, "none")["state_digest"])
    assert (digests[0] == digests[1]) == (noise == "seeded")
    assert f"noise: {noise}" in (tmp_path / "a" / "config.yaml").read_text()  # the run directory records it
    warned = "dp.noise=seeded" in (tmp_path / "a" / "run.log").read_text()
    assert warned == (noise == "seeded")


@pytest.fixture(scope="module")
def fedamole_runtime():
    cfg = load_config(SMOKE_FEDAMOLE, ["algorithm.dp_embeddings=true", "algorithm.dp_eta=3.0",
                                       "algorithm.dp_embedding_clip=0.25"])
    rt = build_runtime(cfg, load_federated_data(cfg))
    server = fedamole.Server(cfg, rt.adapters)
    rt.adapters.load(server.configure_train(1, [0, 1, 2, 3], evaluate=False)[2].tensors)
    return cfg, rt, fedamole.Client(cfg, rt)


@pytest.mark.parametrize("noise", ["secure", "seeded"])
def test_embedding_dp_noise_is_reproducible_only_when_seeded(fedamole_runtime, noise):
    cfg, rt, client = fedamole_runtime
    cfg.dp.noise = noise
    try:
        first, second = client.embeddings(2, rnd=1)[0], client.embeddings(2, rnd=1)[0]
    finally:
        cfg.dp.noise = "secure"
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first) == (noise == "seeded")


# ------------------------------------------------------------------------------ embedding privacy cost
@pytest.mark.parametrize("rank,eta,tau,expected", [
    (4, 2.0, 0.5, 4.0),  # 2 * eta * tau * sqrt(r) = 2 * 2 * 0.5 * 2
    (9, 0.5, 1.0, 3.0),  # 2 * 0.5 * 1 * 3
    (8, 100.0, 0.1, 20.0 * math.sqrt(8)),  # the paper's eta = 100
])
def test_embedding_release_epsilon_is_eta_times_the_l1_sensitivity_of_the_clip_ball(rank, eta, tau, expected):
    assert embedding_epsilon(rank, eta, tau) == pytest.approx(expected)


def test_rank_one_embedding_dp_has_no_finite_epsilon_and_is_refused():
    assert embedding_epsilon(1, 100.0, 1.0) == math.inf
    with pytest.raises(Exception, match="rank >= 2"):
        validate_config({"algorithm": {"name": "fedamole", "rank": 1, "dp_embeddings": True}})


def _density(z, r, eta):
    """The derived density of one noise coordinate: eta / (2 (r-1)) * Q(r-1, eta |z|)."""
    return eta / (2 * (r - 1)) * gammaincc(r - 1, eta * np.abs(z))


@pytest.mark.parametrize("r,eta", [(2, 1.5), (4, 2.0), (8, 5.0)])
def test_noise_density_is_the_derived_one_and_its_log_is_eta_lipschitz(r, eta):
    """The premise of the epsilon: the sampled noise follows the derived density, and for a shift delta the
    log-density ratio never exceeds eta * delta (and comes close to it in the tail: the bound is tight)."""
    gen = torch.Generator().manual_seed(0)
    z = fedamole.privatize(torch.zeros(100_000, r), eta, torch.full((100_000,), 1e9), gen).flatten().numpy()
    edges = np.linspace(-2 * r / eta, 2 * r / eta, 41)
    hist, _ = np.histogram(z, bins=edges, density=False)
    centres, width = (edges[1:] + edges[:-1]) / 2, edges[1] - edges[0]
    expected = _density(centres, r, eta) * width * z.size
    assert np.abs(hist - expected).max() < 5 * np.sqrt(expected.max())  # within Poisson noise
    grid = np.linspace(-30 / eta * r, 30 / eta * r, 20001)
    delta = 0.7 / eta
    ratio = np.abs(np.log(_density(grid, r, eta)) - np.log(_density(grid + delta, r, eta)))
    assert ratio.max() <= eta * delta * (1 + 1e-9)
    assert ratio.max() >= 0.9 * eta * delta


def test_a_vector_outside_the_clip_ball_is_released_as_its_projection_onto_it():
    """Clipping before the noise is what bounds the sensitivity by tau: same noise, same output."""
    v = torch.tensor([[30.0, -40.0, 0.0, 0.0]])  # norm 50
    tau = torch.tensor([2.0])
    far = fedamole.privatize(v, 4.0, tau, torch.Generator().manual_seed(5))
    projected = fedamole.privatize(v * 2.0 / 50.0, 4.0, tau, torch.Generator().manual_seed(5))
    assert torch.allclose(far, projected, atol=1e-6)
    assert float(far.norm()) <= 2.0 + 1e-5


def test_client_reports_the_epsilon_of_a_round_composed_over_modules_and_vectors(fedamole_runtime):
    cfg, rt, client = fedamole_runtime
    emb, _, epsilon = client.embeddings(2, rnd=1)
    vectors = len(emb)  # one t per module plus one u per held expert
    per_vector = 2 * 3.0 * 0.25 * math.sqrt(4)  # rank 4, eta 3, tau 0.25
    assert vectors == sum(1 + len(m.held) for m in rt.adapters.modules.values())
    assert epsilon == pytest.approx(vectors * per_vector)
    assert all(float(v.norm()) <= 0.25 + 1e-6 for v in emb.values())


def test_server_composes_each_clients_embedding_epsilon_over_rounds(tiny_tok):
    cfg = load_config(SMOKE_FEDAMOLE, ["algorithm.dp_embeddings=true"])
    server = fedamole.Server(cfg, get_algorithm("fedamole").build_adapters(tiny_llama(len(tiny_tok)), cfg))
    spent = {0: [1.5, 2.0], 1: [0.25, 4.0], 2: [3.0]}
    for rnd in (1, 2):
        plans = server.configure_train(rnd, [0, 1, 2, 3], evaluate=False)
        replies = {c: Reply(dict(plans[c].tensors), 10, {"dp_embed_epsilon": spent[c][rnd - 1]})
                   for c in (0, 1, 2) if len(spent[c]) >= rnd}
        replies[3] = Reply(dict(plans[3].tensors), 10)  # a client that released nothing
        server.aggregate_train(rnd, replies)
    totals = {r["client"]: r["value"] for r in server.round_records(2) if r["metric"] == "dp_embed_epsilon_total"}
    assert totals == {0: pytest.approx(3.5), 1: pytest.approx(4.25)}
    report = server.summary_extra()["dp_embeddings"]
    assert report["epsilon"] == {"0": pytest.approx(3.5), "1": pytest.approx(4.25), "2": pytest.approx(3.0)}
    assert report["epsilon_max"] == pytest.approx(4.25) and report["delta"] == 0.0
    restored = fedamole.Server(cfg, get_algorithm("fedamole").build_adapters(tiny_llama(len(tiny_tok)), cfg))
    restored.load_state_dict(*server.state_dict())
    assert restored.summary_extra()["dp_embeddings"] == report  # the budget survives a checkpoint


def test_embedding_epsilon_reaches_metrics_and_summary_of_a_run(tmp_path):
    cfg = load_config(SMOKE_FEDAMOLE, ["algorithm.dp_embeddings=true", "algorithm.dp_eta=3.0",
                                       "algorithm.dp_embedding_clip=0.25", "train.local_steps=1",
                                       "eval.max_examples=2"])
    summary = run_experiment(cfg, tmp_path, "none")
    recs = metrics_records(tmp_path)
    rounds = {(r["round"], r["client"]): r["value"] for r in recs if r["metric"] == "dp_embed_epsilon"}
    assert {rnd for rnd, _ in rounds} == {1, 2}  # no embeddings after the last round
    per_vector = 2 * 3.0 * 0.25 * math.sqrt(4)
    for value in rounds.values():  # a whole number of releases, each costing per_vector
        assert value / per_vector == pytest.approx(round(value / per_vector))
    for c in range(4):
        total = rounds[(1, c)] + rounds[(2, c)]
        assert summary["dp_embeddings"]["epsilon"][str(c)] == pytest.approx(total)
        last = [r["value"] for r in recs if r["metric"] == "dp_embed_epsilon_total" and r["client"] == c]
        assert last[-1] == pytest.approx(total)
    from fedmole import cli

    cli.out.begin_capture()
    cli.print_results(summary, tmp_path)
    printed = cli.out.end_capture()
    assert f"embedding DP: epsilon up to {summary['dp_embeddings']['epsilon_max']:.4g} per client" in printed


@pytest.mark.parametrize("noise", ["secure", "seeded"])
def test_resuming_a_dp_run_keeps_the_checkpoint_exactly_and_redraws_later_noise_unless_seeded(tmp_path, noise):
    """The documented resume guarantee (docs/reliability.md): everything up to the checkpoint is kept bit
    for bit; the rounds after it draw new noise under `secure` (same distribution, other numbers), the
    same noise under `seeded` (the uninterrupted run, bit for bit)."""
    import shutil

    from fedmole.run import resume_experiment

    cfg = load_config(SMOKE, [*FAST, "federation.rounds=2", "dp.enabled=true", "dp.noise_multiplier=0.5",
                              f"dp.noise={noise}", "checkpoint.keep_last=null"])
    (tmp_path / "full").mkdir()
    full = run_experiment(cfg, tmp_path / "full", "none")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "round_0002")
    (tmp_path / "cut" / "summary.json").unlink()
    resumed = resume_experiment(tmp_path / "cut", progress_mode="none")
    first = [r for r in metrics_records(tmp_path / "full") if r["round"] <= 1]
    assert [r for r in metrics_records(tmp_path / "cut") if r["round"] <= 1] == first
    assert (resumed["state_digest"] == full["state_digest"]) == (noise == "seeded")
    assert resumed["dp"] == full["dp"]  # the privacy accounting does not depend on the draws
