"""Reliability: exact resume, crash-safe checkpoints, failing and hostile clients, DP on updates."""

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fedmole.algorithms.aggregate import robust_mean, weighted_mean
from fedmole.algorithms.validate import Limits, ReplyRules, check_reply, spec_of
from fedmole.config_io import load_config
from fedmole.messages import Reply
from fedmole.privacy import epsilon, privatize
from fedmole.run import _setup, latest_checkpoint, run_experiment

from conftest import metrics_records, run_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = ["federation.num_clients=4", "eval.max_examples=2", "eval.every=2", "data.max_examples=600",
        "partition.min_size=10"]


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedmole.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _reference(tmp_path, *overrides) -> tuple[dict, Path]:
    return run_config(SMOKE, FAST + list(overrides), tmp_path / "reference")


def test_resume_after_sigkill_mid_round_matches_the_uninterrupted_run(tmp_path):
    over = ["federation.rounds=5"]
    ref, ref_dir = _reference(tmp_path, *over)
    run_dir = tmp_path / "killed"
    proc = _cli("run", str(SMOKE), "--out", str(run_dir), "--progress", "none", *sum((["--set", o] for o in FAST + over), []))
    deadline = time.time() + 300
    while latest_checkpoint(run_dir) is None if run_dir.exists() else True:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # somewhere in round 2 (or writing its checkpoint)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    killed_at = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert killed_at < 5

    res = _cli("resume", str(run_dir), "--progress", "none")
    stdout, stderr = res.communicate(timeout=600)
    assert res.returncode == 0, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state_digest"] == ref["state_digest"]
    assert metrics_records(run_dir) == metrics_records(ref_dir)
    assert summary["global"] == ref["global"]


def test_sigkill_during_checkpoint_write_leaves_the_previous_checkpoint_valid(tmp_path):
    """A real SIGKILL in the middle of writing round 2's checkpoint (after its first file is written)."""
    run_dir = tmp_path / "run"
    overrides = FAST + ["federation.rounds=3"]
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import fedmole.run as run
        real, calls = run.save_file, []
        def dying_save_file(tensors, path):
            real(tensors, path)
            calls.append(path)
            if "round_0002" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
        run.save_file = dying_save_file
        cfg = run_cfg = __import__("fedmole.config_io", fromlist=["x"]).load_config({str(SMOKE)!r}, {overrides!r})
        d = Path({str(run_dir)!r}); d.mkdir()
        run.run_experiment(cfg, d, "none")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    assert latest_checkpoint(run_dir).name == "round_0001"  # round 2 never became a checkpoint
    assert list(ckpts.glob(".tmp-round_0002-*"))  # its half-written temporary directory is ignored
    res = _cli("resume", str(run_dir), "--progress", "none")
    _, stderr = res.communicate(timeout=600)
    assert res.returncode == 0, stderr[-2000:]
    ref, _ = _reference(tmp_path, "federation.rounds=3")
    assert json.loads((run_dir / "summary.json").read_text())["state_digest"] == ref["state_digest"]


def test_thirty_percent_injected_failures_complete_and_are_recorded(tmp_path):
    cfg = load_config(SMOKE, FAST + ["federation.rounds=4", "faults.drop_probability=0.1",
                                     "faults.crash_probability=0.1", "faults.straggler_probability=0.1"])
    run_dir = tmp_path / "faulty"
    run_dir.mkdir()
    summary = run_experiment(cfg, run_dir, "none")
    skipped = summary["skipped"]
    failed = skipped["dropped"] + skipped["crashed"] + skipped["late"]
    assert failed > 0 and skipped["failed"] == 0 and skipped["rejected"] == 0
    recs = metrics_records(run_dir)
    per_kind = {k: sum(1 for r in recs if r["metric"] == f"client_{k}") for k in ("dropped", "crashed", "late")}
    assert per_kind == {k: skipped[k] for k in per_kind}
    replied = sum(r["value"] for r in recs if r["metric"] == "clients_replied")
    assert replied + failed == 4 * 4  # every planned client either replied or was recorded as failing
    # a crashed client's persistent state (its data stream) did not advance in its crash round
    assert "crashed" in (run_dir / "run.log").read_text() or per_kind["crashed"] == 0


def test_a_crash_leaves_the_client_state_untouched(tmp_path):
    cfg = load_config(SMOKE, FAST + ["federation.rounds=1", "faults.crash_probability=1.0"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    fed = _setup(cfg, run_dir, "none")
    before = dict(fed.strategy.global_state)
    fed.run_round(1)
    # no client committed its training: no data stream advanced, no tensors kept
    assert all(st.meta == {} and st.tensors == {} for st in fed.engine.client_states().values())
    assert all(torch.equal(before[k], v) for k, v in fed.strategy.global_state.items())
    assert fed.skips()["crashed"] == 4 and fed.skips()["rounds_skipped"] == 1


HOSTILE = {
    "nan": lambda t, n: ({**t, next(iter(t)): torch.full_like(next(iter(t.values())), float("nan"))}, n),
    "inf": lambda t, n: ({**t, next(iter(t)): torch.full_like(next(iter(t.values())), float("inf"))}, n),
    "wrong shape": lambda t, n: ({**t, next(iter(t)): torch.zeros(3, 3)}, n),
    "wrong dtype": lambda t, n: ({**t, next(iter(t)): next(iter(t.values())).double()}, n),
    "unknown name": lambda t, n: ({**t, "model.layers.0.self_attn.q_proj/lora/C": torch.zeros(2)}, n),
    "unassigned expert": lambda t, n: ({**t, "model.layers.0.self_attn.q_proj/7/A": torch.zeros(4, 64)}, n),
    "zero samples": lambda t, n: (t, 0),
    "float samples": lambda t, n: (t, 2.5),
    "negative samples": lambda t, n: (t, -3),
}


def test_each_kind_of_hostile_reply_is_rejected_and_leaves_the_global_state_unchanged(tmp_path):
    cfg = load_config(SMOKE, FAST + ["federation.rounds=1", "federation.num_clients=2", "data.max_examples=300"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    fed = _setup(cfg, run_dir, "none")
    honest_train = fed.engine.procedure.train
    before = {k: v.clone() for k, v in fed.strategy.global_state.items()}
    for attack, corrupt in HOSTILE.items():
        def train(cid, payload, state, corrupt=corrupt):
            reply = honest_train(cid, payload, state)
            if cid == 1:  # client 1 is hostile, client 0 honest
                reply.tensors, reply.num_examples = corrupt(reply.tensors, reply.num_examples)
            return reply

        fed.engine.procedure.train = train
        plans = fed.strategy.configure_train(1, [0, 1], False)
        replies, _ = fed.engine.train(1, plans)
        accepted, rejected = fed._accept(1, plans, replies)
        assert list(accepted) == [0] and list(rejected) == [1], attack
        assert all(torch.equal(before[k], v) for k, v in fed.strategy.global_state.items()), attack
    fed.strategy.aggregate_train(1, accepted)  # only the honest reply reaches the global state
    assert all(torch.equal(accepted[0].tensors[k], fed.strategy.global_state[k]) for k in before)


def test_check_reply_names_the_problem():
    rules, limits = ReplyRules(spec_of({"m/lora/A": torch.zeros(2, 3)})), Limits(1.0)
    ok = Reply({"m/lora/A": torch.ones(2, 3)}, 5)
    assert check_reply(ok, rules, limits) is None
    assert "shape (3, 2)" in check_reply(Reply({"m/lora/A": torch.ones(3, 2)}, 5), rules, limits)
    assert "NaN" in check_reply(Reply({"m/lora/A": torch.full((2, 3), float("nan"))}, 5), rules, limits)
    assert "not assigned" in check_reply(Reply({"m/3/A": torch.ones(2, 3)}, 5), rules, limits)
    assert "positive integer" in check_reply(Reply({}, True), rules, limits)
    big = check_reply(Reply({"m/lora/A": torch.ones(2, 3)}, 5), rules, Limits(max_mb=1e-6))
    assert "exceeds replies.max_mb=1e-06" in big


def test_min_replies_skips_the_round_and_keeps_the_global_state(tmp_path):
    cfg = load_config(SMOKE, FAST + ["federation.rounds=1", "federation.min_replies=4", "faults.drop_probability=0.5"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    fed = _setup(cfg, run_dir, "none")
    before = {k: v.clone() for k, v in fed.strategy.global_state.items()}
    fed.run_round(1)
    assert fed.skips()["dropped"] > 0 and fed.skips()["rounds_skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in fed.strategy.global_state.items())


def test_round_deadline_drops_late_clients(tmp_path):
    cfg = load_config(SMOKE, FAST + ["federation.rounds=1", "federation.round_deadline=0.000001"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    fed = _setup(cfg, run_dir, "none")
    fed.run_round(1)
    assert fed.skips()["late"] == 4 and fed.skips()["rounds_skipped"] == 1
    assert len(fed.engine.client_states()) == 4  # late clients did their work: their data streams advanced


def test_robust_aggregation_resists_an_outlier():
    honest = [({"k": torch.full((3,), v)}, 1.0) for v in (1.0, 1.1, 0.9, 1.0)]
    attack = honest + [({"k": torch.full((3,), 1e6)}, 100.0)]
    assert weighted_mean(attack)["k"][0] > 1e5
    assert torch.allclose(robust_mean(attack, "median")["k"], torch.full((3,), 1.0))
    assert torch.allclose(robust_mean(attack, "trimmed_mean", 0.2)["k"], torch.full((3,), (1.0 + 1.0 + 1.1) / 3))
    assert torch.allclose(robust_mean(honest, "median")["k"], torch.full((3,), 1.0))  # even count: middle mean


# --------------------------------------------------------------------------------------------- DP
def test_dp_noise_has_the_configured_scale_and_clipping_bounds_the_update():
    cfg = load_config(None, ["dp.enabled=true", "dp.clip_norm=0.5", "dp.noise_multiplier=2.0"]).dp
    received = {"m/lora/A": torch.zeros(200, 100), "m/lora/B": torch.zeros(100, 200)}
    gen = torch.Generator().manual_seed(0)
    noisy, facts = privatize(received, {k: v.clone() for k, v in received.items()}, cfg, gen)
    values = torch.cat([t.flatten() for t in noisy.values()])
    assert values.std().item() == pytest.approx(2.0 * 0.5, rel=0.02)  # 40k samples: std within 2 %
    assert abs(values.mean().item()) < 0.02

    silent = load_config(None, ["dp.enabled=true", "dp.clip_norm=0.5", "dp.noise_multiplier=0"]).dp
    big = {k: v + 3.0 for k, v in received.items()}
    clipped, facts = privatize(received, big, silent, gen)
    norm = math.sqrt(sum(float((clipped[k] - received[k]).pow(2).sum()) for k in received))
    assert norm == pytest.approx(0.5, rel=1e-6) and facts["clipped"] == 1
    per_expert = load_config(None, ["dp.enabled=true", "dp.clip_norm=0.5", "dp.noise_multiplier=0",
                                    "dp.granularity=expert"]).dp
    two = {"m/1/A": torch.ones(4), "m/2/A": torch.ones(4) * 9}
    out, facts = privatize({k: torch.zeros(4) for k in two}, two, per_expert, gen)
    assert facts["groups"] == 2
    assert out["m/1/A"].norm().item() == pytest.approx(0.5) and out["m/2/A"].norm().item() == pytest.approx(0.5)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    cfg = load_config(None, ["dp.enabled=true", "federation.num_clients=10", "federation.clients_per_round=5"])
    eps = [epsilon(cfg, r) for r in range(0, 6)]
    assert eps[0] == 0 and all(a < b for a, b in zip(eps, eps[1:]))
    noisier = load_config(None, ["dp.enabled=true", "dp.noise_multiplier=3", "federation.num_clients=10",
                                 "federation.clients_per_round=5"])
    assert epsilon(noisier, 5) < eps[5]
    per_expert = load_config(None, ["dp.enabled=true", "dp.granularity=expert", "federation.num_clients=10",
                                    "federation.clients_per_round=5"])
    assert epsilon(per_expert, 5, max_groups=1) == pytest.approx(eps[5])
    assert epsilon(per_expert, 5, max_groups=4) > eps[5]  # per-expert clipping over 4 groups costs privacy


def test_dp_run_records_epsilon_each_round(tmp_path):
    cfg = load_config(SMOKE, FAST + ["federation.rounds=2", "dp.enabled=true", "dp.noise_multiplier=0.5"])
    run_dir = tmp_path / "dp"
    run_dir.mkdir()
    summary = run_experiment(cfg, run_dir, "none")
    eps = [r["value"] for r in metrics_records(run_dir) if r["metric"] == "dp_epsilon"]
    assert len(eps) == 2 and eps[0] < eps[1] == pytest.approx(summary["dp"]["epsilon"])
    assert any(r["metric"] == "dp_clipped" for r in metrics_records(run_dir))


# ------------------------------------------------------------------------------------ validation
def test_user_errors_exit_2_with_one_message(tmp_path):
    bad_jsonl = tmp_path / "d.jsonl"
    bad_jsonl.write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n')
    cases = {
        ("run", str(SMOKE), "--set", "federation.num_clients=0"): "federation.num_clients",
        ("run", str(SMOKE), "--set", "data.source=jsonl", "--set", f"data.path={bad_jsonl}"): f"{bad_jsonl}:2",
        ("run", str(SMOKE), "--set", "model.name=no-such/model-zz"): "not a built-in",
        ("resume", str(tmp_path / "missing")): "not a fedmole run directory",
    }
    for args, needle in cases.items():
        proc = _cli(*args, "--out", str(tmp_path / f"o{len(needle)}")) if args[0] == "run" else _cli(*args)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err[-1500:])
        assert needle in err and "Traceback" not in err, (args, err[-1500:])


def test_resume_with_a_changed_config_is_refused_with_the_diff(tmp_path):
    _, run_dir = _reference(tmp_path, "federation.rounds=1")
    proc = _cli("resume", str(run_dir), "--set", "train.lr=0.5", "--set", "federation.seed=3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "train.lr: 0.001 -> 0.5" in err and "federation.seed: 42 -> 3" in err
