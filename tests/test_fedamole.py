"""FedAMoLE end to end: dispatch, aggregation by expert id, RSEA wiring, ablations, DP embeddings, artefacts."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmole.adapters.state import parse_key
from fedmole.algorithms import fedamole, rsea
from fedmole.config_io import load_config
from fedmole.data.tokenize import collate
from fedmole.messages import Reply
from fedmole.models.tiny import tiny_llama
from fedmole.run import build_runtime, load_federated_data, resume_experiment, run_experiment

from conftest import fedamole_server, metrics_records

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke_fedamole.yaml"
CLIENTS = [0, 1, 2, 3]


def _reply(server, cid, payload, offset, embeddings=None, n=10):
    tensors = {k: v + offset for k, v in payload.tensors.items()}
    return Reply({**tensors, **(embeddings or {})}, num_examples=n)


def _holders(server, module, expert):
    return [c for c in server.arch if int(expert) in server.arch[c][module]]


def test_payloads_carry_only_the_assigned_experts(tiny_tok):
    cfg, server = fedamole_server(tiny_tok)
    plans = server.configure_train(1, CLIENTS, evaluate=True)
    for c, payload in plans.items():
        experts = {}
        for k in payload.tensors:
            m, e, _ = parse_key(k)
            experts.setdefault(m, set()).add(e)
        for m, ids in experts.items():
            domain = sorted(int(e) for e in ids if e.isdigit())
            assert domain == server.arch[c][m] and {"shared", "router"} <= ids
            assert cfg.algorithm.min_experts <= len(domain) <= cfg.algorithm.max_experts
    assert plans[0].config["embed"] and plans[0].config["eval_personalized"]


@pytest.mark.parametrize("replied", [CLIENTS, [0, 1, 2], [0]])  # the others failed this round
def test_each_expert_is_averaged_over_exactly_its_holders(tiny_tok, replied):
    _, server = fedamole_server(tiny_tok)
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    before = dict(server.global_state)
    server.aggregate_train(1, {c: _reply(server, c, plans[c], float(c + 1)) for c in replied})
    unchanged = 0
    for k, v in server.global_state.items():
        m, e, _ = parse_key(k)
        if e.isdigit():
            assert len(_holders(server, m, e)) == 2  # every expert picked k_c = 2 clients
        holders = replied if not e.isdigit() else [c for c in _holders(server, m, e) if c in replied]
        if not holders:  # held only by failed clients: keeps its previous value
            assert torch.equal(v, before[k])
            unchanged += 1
            continue
        assert torch.allclose(v, before[k] + float(np.mean([c + 1 for c in holders])), atol=1e-6), k
    assert (unchanged > 0) == (replied == [0])


def test_replies_may_carry_embeddings_but_not_unassigned_experts(tiny_tok):
    from fedmole.algorithms.validate import Limits, check_reply

    _, server = fedamole_server(tiny_tok)
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    rules, limits = server.reply_rules(0, plans[0]), Limits(4096.0)
    good = _reply(server, 0, plans[0], 0.0, _embeddings(server, 0, 1.0))
    assert check_reply(good, rules, limits) is None
    assert check_reply(_reply(server, 0, plans[0], 0.0), rules, limits) is None  # no embeddings (empty aux split)
    m = server.modules[0]
    stranger = next(e for e in range(8) if e not in server.arch[0][m])
    bad = _reply(server, 0, plans[0], 0.0, {f"{m}/{stranger}/u": torch.zeros(4)})
    assert "not assigned" in check_reply(bad, rules, limits)
    without_t = {k: v for k, v in _embeddings(server, 0, 1.0).items() if not k.endswith(f"{m}/router/t")}
    assert "incomplete group" in check_reply(_reply(server, 0, plans[0], 0.0, without_t), rules, limits)


def test_data_size_weighting_weights_by_training_examples(tiny_tok):
    _, server = fedamole_server(tiny_tok, "algorithm.weighting=data_size")
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    before = dict(server.global_state)
    server.aggregate_train(1, {c: _reply(server, c, plans[c], float(c), n=c + 1) for c in CLIENTS})
    k = next(k for k in before if k.endswith("router/W_t"))
    expected = sum(c * (c + 1) for c in CLIENTS) / sum(c + 1 for c in CLIENTS)
    assert torch.allclose(server.global_state[k], before[k] + expected, atol=1e-6)


def _embeddings(server, cid, sign):
    r = server.cfg.algorithm.rank
    out = {}
    for m in server.modules:
        out[f"{m}/router/t"] = torch.full((r,), sign * (1.0 + cid))
        for e in server.arch[cid][m]:
            out[f"{m}/{e}/u"] = torch.full((r,), sign * float(e + 1))
    return out


def test_next_round_is_rsea_on_the_holder_averaged_embeddings(tiny_tok):
    _, server = fedamole_server(tiny_tok)
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    signs = {0: 1.0, 1: 1.0, 2: -1.0, 3: -1.0}
    server.aggregate_train(1, {c: _reply(server, c, plans[c], 0.0, _embeddings(server, c, signs[c])) for c in CLIENTS})
    i, m = 1, server.modules[1]
    for e in range(8):
        holder_signs = [signs[c] for c in _holders(server, m, e)]
        assert server.U_bar[i, e] == pytest.approx(torch.full((4,), np.mean(holder_signs) * (e + 1)).double())
    T = np.stack([[np.full(4, signs[c] * (1.0 + c)) for c in CLIENTS] for _ in server.modules])
    expected = rsea.solve_assignment(rsea.affinity(server.U_bar.numpy(), T), 2, 2, 6)
    plan = server.plan(2, CLIENTS)
    for i, m in enumerate(server.modules):
        assert plan[m] == rsea.assignment_lists(expected[i], CLIENTS)


def test_static_arch_keeps_the_round_zero_assignment_and_uploads_no_embeddings(tiny_tok):
    _, server = fedamole_server(tiny_tok, "algorithm.static_arch=true")
    _, reference = fedamole_server(tiny_tok)
    first = server.plan(1, CLIENTS)
    assert first == reference.plan(1, CLIENTS)  # FedAMoLE-R starts from FedAMoLE's random round-0 draw
    for rnd in (1, 2, 3):
        plans = server.configure_train(rnd, CLIENTS, evaluate=False)
        assert not plans[0].config["embed"]
        assert server.plan(rnd, CLIENTS) == first
        server.aggregate_train(rnd, {c: _reply(server, c, plans[c], 0.0) for c in CLIENTS})


def test_random_dispatch_redraws_every_round(tiny_tok):
    _, server = fedamole_server(tiny_tok, "algorithm.random_dispatch=true")
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    assert not plans[0].config["embed"]
    server.aggregate_train(1, {c: _reply(server, c, plans[c], 0.0) for c in CLIENTS})
    assert server.plan(2, CLIENTS) != server.plan(1, CLIENTS)


def test_homogeneous_gives_every_client_the_same_expert_count(tiny_tok):
    _, server = fedamole_server(tiny_tok, "algorithm.homogeneous=true")
    for per_client in server.plan(1, CLIENTS).values():
        assert {len(ids) for ids in per_client.values()} == {8 * 2 // 4}


def test_no_shared_expert_sends_and_holds_none(tiny_tok):
    cfg, server = fedamole_server(tiny_tok, "algorithm.shared_expert=false")
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    assert not any("/shared/" in k for k in plans[0].tensors)
    adapters = fedamole.build_adapters(tiny_llama(len(tiny_tok)), cfg)
    adapters.load(plans[0].tensors)
    assert not any("/shared/" in k for k in adapters.state())


def test_server_state_round_trips_through_a_checkpoint(tiny_tok):
    _, server = fedamole_server(tiny_tok)
    plans = server.configure_train(1, CLIENTS, evaluate=False)
    signs = {0: 1.0, 1: -1.0, 2: 1.0, 3: -1.0}
    server.aggregate_train(1, {c: _reply(server, c, plans[c], 0.5, _embeddings(server, c, signs[c])) for c in CLIENTS})
    _, restored = fedamole_server(tiny_tok)
    restored.load_state_dict(*server.state_dict())
    assert restored.plan(2, CLIENTS) == server.plan(2, CLIENTS)
    assert all(torch.equal(restored.global_state[k], v) for k, v in server.global_state.items())


@pytest.mark.parametrize("overrides,match", [
    (["federation.num_clients=2"], r"exceeds clients\*max_experts"),
    (["federation.num_clients=10"], r"below clients\*min_experts"),
    (["algorithm.homogeneous=true", "federation.num_clients=3"], "multiple of the clients per round"),
    (["algorithm.min_experts=1"], "top_k"),
    (["algorithm.static_arch=true", "algorithm.random_dispatch=true"], "exclusive"),
    (["algorithm.dp_embeddings=true", "algorithm.static_arch=true"], "never compute"),
    (["dp.enabled=true"], "RSEA embeddings"),
    (["federation.clients_per_round=3", "eval.init=true"], "eval.init"),
])
def test_infeasible_configs_exit_2_with_the_numbers(tmp_path, overrides, match):
    import subprocess
    import sys

    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), *args, "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert __import__("re").search(match, proc.stderr.replace("\n", " ")), proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_partial_participation_solves_over_the_rounds_clients():
    cfg = load_config(SMOKE, ["federation.num_clients=6", "federation.clients_per_round=4"])
    assert cfg.clients_per_round == 4  # 8*2 = 16 slots: feasible for 4 clients (<= 24), not needed for 6


# ------------------------------------------------------------------------------------- with data
@pytest.fixture(scope="module")
def runtime():
    cfg = load_config(SMOKE, ["algorithm.dp_embeddings=true", "algorithm.dp_eta=0.05", "train.batch_size=3"])
    return cfg, build_runtime(cfg, load_federated_data(cfg))


def _token_inputs(rt, cid, path):
    """Per aux batch, the inputs of module `path` at every real token (a hook and a plain loop)."""
    batches, seen = [], []
    mod = rt.adapters.modules[path]
    handle = mod.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    aux = rt.data(cid).aux
    with torch.no_grad():
        for i in range(0, len(aux), 3):
            b = collate([{"input_ids": e["input_ids"]} for e in aux[i:i + 3]], rt.tokenizer.pad_token_id)
            rt.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     position_ids=(b["attention_mask"].cumsum(-1) - 1).clamp(min=0))
            batches.append(seen.pop()[b["attention_mask"].bool()])  # (real tokens, d_in)
    handle.remove()
    return batches


def test_embeddings_are_token_means_and_dp_clips_to_the_largest_batch_mean_norm(runtime):
    cfg, rt = runtime
    server = fedamole.Server(cfg, rt.adapters)
    payload = server.configure_train(1, CLIENTS, evaluate=False)[1]
    rt.adapters.load(payload.tensors)
    client = fedamole.Client(cfg, rt)
    path = next(iter(rt.adapters.modules))
    mod = rt.adapters.modules[path]
    batches = _token_inputs(rt, 1, path)
    tokens = torch.cat(batches)
    clean_t = (tokens @ mod.W_t.t()).mean(0)  # the spec's definition: mean over tokens of W_t x
    clean_u = torch.einsum("nrd,td->tnr", mod.A, tokens).mean(0)  # and of A_e x

    cfg.algorithm.dp_embeddings = False
    emb, n_tokens, _ = client.embeddings(1)
    cfg.algorithm.dp_embeddings = True
    assert n_tokens == tokens.shape[0]
    assert torch.allclose(emb[f"{path}/router/t"], clean_t, atol=1e-5)
    for i, e in enumerate(mod.held.tolist()):
        assert torch.allclose(emb[f"{path}/{e}/u"], clean_u[i], atol=1e-5)

    noisy, _, _ = client.embeddings(1)  # eta = 0.05: noise ~ r/(2 eta) = 40 per coordinate, always clipped
    tau_t = max((b @ mod.W_t.t()).mean(0).norm() for b in batches)  # the largest per-batch MEAN norm
    sum_bound = max((b @ mod.W_t.t()).sum(0).norm() for b in batches)  # the reference code's (wrong) bound
    assert noisy[f"{path}/router/t"].norm() == pytest.approx(float(tau_t), rel=1e-4)
    assert noisy[f"{path}/router/t"].norm() < sum_bound / 5
    assert not torch.allclose(noisy[f"{path}/router/t"], clean_t, atol=1e-3)


def test_privatize_noise_scale_and_clip():
    torch.manual_seed(0)
    v = torch.zeros(20000, 8)
    z = fedamole.privatize(v, eta=100.0, tau=torch.full((20000,), 1e9))
    assert z.abs().mean().item() == pytest.approx(8 / (2 * 100.0), rel=0.05)  # E|l v| = (r/eta) * 1/2
    clipped = fedamole.privatize(torch.ones(5, 8) * 3, eta=1e6, tau=torch.full((5,), 2.0))
    assert torch.allclose(clipped.norm(dim=-1), torch.full((5,), 2.0), atol=1e-4)


def test_three_round_run_clients_with_different_data_end_with_different_experts(tmp_path):
    cfg = load_config(SMOKE, ["eval.init=true", "checkpoint.keep_last=null"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run_experiment(cfg, run_dir, "none")
    # resuming from round 2 recomputes the same assignment and ends in the same state
    shutil.copytree(run_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "round_0003")
    (tmp_path / "cut" / "summary.json").unlink()
    resumed = resume_experiment(tmp_path / "cut", progress_mode="none")
    assert resumed["state_digest"] == summary["state_digest"]
    assert resumed["architecture"] == summary["architecture"]
    for name in ("assignments.jsonl", "metrics.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (run_dir / name).read_text()
    assert summary["headline"] == "personalized" and summary["personalized"] and summary["global"]

    rounds = [json.loads(x) for x in (run_dir / "assignments.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and rounds[0]["experts"] == rounds[1]["experts"]
    for r in rounds:
        for per_client in r["experts"].values():
            counts = np.zeros(8, int)
            for ids in per_client.values():
                assert 2 <= len(ids) <= 6 and ids == sorted(ids)
                counts[ids] += 1
            assert (counts == 2).all()  # every expert held by exactly k_c clients
    assert rounds[2]["experts"] != rounds[1]["experts"]  # RSEA re-assigned after round 1

    arch = summary["architecture"]
    assert arch == {c: {m: ids[c] for m, ids in rounds[3]["experts"].items()} for c in "0123"}
    signatures = {json.dumps(a, sort_keys=True) for a in arch.values()}
    assert len(signatures) == 4  # four tasks, four different final architectures

    recs = metrics_records(run_dir)
    counts = [r for r in recs if r["metric"] == "experts_mean"]
    assert {(r["round"], r["client"]) for r in counts} == {(rnd, c) for rnd in (1, 2, 3) for c in CLIENTS}
    embedded = {r["round"] for r in recs if r["metric"] == "embed_tokens" and r["value"] > 0}
    assert embedded == {1, 2}  # no RSEA after the last round
    models = {(r["round"], r["model"]) for r in recs if r["split"] == "test" and r["metric"] == "score"}
    assert models == {(0, "global")} | {(rnd, m) for rnd in (1, 2, 3) for m in ("global", "personalized")}



@pytest.mark.parametrize("extra,kept_is_one", [(["algorithm.static_arch=true"], True), ([], False)])
def test_diagnostics_record_how_many_experts_clients_keep_and_how_peaked_routing_is(tmp_path, extra, kept_is_one):
    """Per round: the share of its previous experts each client holds again (1 for a static architecture) next
    to what a random re-deal keeps (n/N), the routing entropy H(p)/log n of local training, the relative update
    of A and W_t; RSEA rounds also record how peaked the expert-to-client affinities are."""
    cfg = load_config(SMOKE, ["federation.rounds=3", "eval.max_examples=2", *extra])
    run_experiment(cfg, tmp_path, "none")
    recs = metrics_records(tmp_path)
    kept = [r for r in recs if r["metric"] == "experts_kept"]
    assert {r["round"] for r in kept} == {2, 3} and {r["client"] for r in kept} == set(CLIENTS)
    assert all(0 <= r["value"] <= 1 for r in kept)
    assert all(r["value"] == 1.0 for r in kept) == kept_is_one
    random_keep = {(r["round"], r["client"]): r["value"] for r in recs if r["metric"] == "experts_kept_random"}
    held = {(r["round"], r["client"]): r["value"] for r in recs if r["metric"] == "experts_mean"}
    assert all(v == pytest.approx(held[k] / cfg.algorithm.num_experts) for k, v in random_keep.items())
    entropy = [r["value"] for r in recs if r["metric"] == "router_entropy"]
    assert len(entropy) == 3 * len(CLIENTS) and all(0 < h <= 1 for h in entropy)
    names = {r["metric"] for r in recs if r["client"] is None and r["split"] == "round"}
    assert {"update_A_domain", "update_A_shared", "update_W_t_router", "B_norm_domain"} <= names
    assert ("affinity_peak" in names) == (not kept_is_one)
    peaks = [r["value"] for r in recs if r["metric"] == "affinity_peak"]
    assert all(1 <= p <= len(CLIENTS) for p in peaks)
