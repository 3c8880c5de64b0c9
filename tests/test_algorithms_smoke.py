"""Every registered algorithm runs the 2-round smoke federation (`fedmole run configs/smoke.yaml --set
algorithm.name=NAME`), and every LoRA method reports labelled global and personalised evaluations."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmole.config import ALGORITHMS, FinetuneEvalKeys
from fedmole.config_io import load_config
from fedmole.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST_EVAL = ["eval.max_examples=2", "eval.generation.max_new_tokens=2"]  # smaller evaluation, same code paths


def _run(tmp_path, overrides):
    cfg = load_config(SMOKE, overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_experiment(cfg, run_dir, "none"), run_dir


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_the_smoke_federation_with_its_defaults(tmp_path, name):
    summary, run_dir = _run(tmp_path, [f"algorithm.name={name}", *FAST_EVAL])
    assert summary["algorithm"] == name and summary["rounds_completed"] == 2
    assert not any(summary["skipped"].values()), summary["skipped"]  # no client failed or was rejected
    head = summary[summary["headline"]]
    assert head is not None and set(head["per_client"]) == {str(c) for c in range(10)}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["split"] == "train" and r["metric"] == "loss"]) == 2 * 10
    assert not [r for r in records if r["metric"].startswith("eval_")]  # no evaluation failed
    assert (run_dir / "checkpoints" / "round_0002" / "server.safetensors").is_file()


FINETUNE_EVAL = sorted(n for n, cls in ALGORITHMS.items() if issubclass(cls, FinetuneEvalKeys))


@pytest.mark.parametrize("name", FINETUNE_EVAL)
def test_finetuned_evaluation_is_labelled_next_to_the_global_one(tmp_path, name):
    fast = ["federation.num_clients=4", "federation.rounds=1", "tiers.per_client=[8,4,2,1]", *FAST_EVAL]
    summary, run_dir = _run(tmp_path, [f"algorithm.name={name}", "algorithm.personalize_by_finetune=true", *fast])
    assert summary["headline"] == "personalized"
    assert summary["personalized"]["per_client"].keys() == summary["global"]["per_client"].keys() == {"0", "1", "2", "3"}
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the rank baselines also evaluate each lower-tier client at its own rank (tier_eval: own, default)
    tier_wise = {"global_k4", "global_k2", "global_k1"} if name in ("hetlora", "flexlora") else set()
    assert {r["model"] for r in recs if r["split"] == "test"} == {"personalized", "global", *tier_wise}


def test_a_rank_tier_baseline_runs_through_the_cli(tmp_path):
    run_dir = tmp_path / "hetlora"
    sets = [arg for item in ["algorithm.name=hetlora", *FAST_EVAL] for arg in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), *sets,
                           "--out", str(run_dir), "--progress", "none"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not any(summary["skipped"].values())
    assert sorted(set(summary["ranks"].values())) == [1, 2, 4, 8]  # tiers 8/4/2/1 -> ranks rank*k/8


def test_unknown_algorithm_exits_2_listing_the_known_ones(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), "--set", "algorithm.name=hetlroa",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert 'unknown algorithm "hetlroa"' in err and 'did you mean "hetlora"' in err
    for name in ALGORITHMS:
        assert name in err
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was created


@pytest.mark.parametrize("name,extra", [
    ("hetlora", ["algorithm.server_opt.name=fedyogi", "algorithm.self_pruning=true", "algorithm.prune_lambda=1.0"]),
    ("flexlora", ["algorithm.server_opt.name=fedadam"]),
    ("flora", []),
    ("fdlora", ["algorithm.sync_freq=1"]),
])
def test_resuming_a_baseline_reproduces_the_uninterrupted_run(tmp_path, name, extra):
    """Server state (optimiser moments, ranks, merged updates) and client state (private adapters, pruning
    memory, data cursors) survive a checkpoint: resuming round 3 from round 2's checkpoint changes nothing."""
    import shutil

    from fedmole.run import resume_experiment

    over = [f"algorithm.name={name}", *extra, "federation.num_clients=4", "federation.rounds=3",
            "tiers.per_client=[8,4,2,1]", "checkpoint.keep_last=null", *FAST_EVAL]
    ref, run_dir = _run(tmp_path, over)
    shutil.rmtree(run_dir / "checkpoints" / "round_0003")
    (run_dir / "summary.json").unlink()
    resumed = resume_experiment(run_dir, progress_mode="none")
    assert resumed["state_digest"] == ref["state_digest"]
    assert resumed[ref["headline"]] == ref[ref["headline"]]
