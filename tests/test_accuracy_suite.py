"""The accuracy suite: every planned run is a valid config, and the runner and report work end to end."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.accuracy.suite import PRESETS, SCENARIOS, runs
from fedmole.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "accuracy" / "base.yaml"


def test_every_run_of_every_preset_is_a_valid_config():
    for preset, spec in PRESETS.items():
        plan = runs(preset)
        assert len(plan) == sum(len(s["methods"]) for s in SCENARIOS.values()) * len(spec["seeds"])
        for run in plan:
            cfg = load_config(BASE, run["overrides"])  # raises on an invalid combination
            assert cfg.federation.seed == run["seed"]
            assert cfg.algorithm.name == SCENARIOS[run["scenario"]]["methods"][run["method"]][0].split("=")[1]


def test_gpu_preset_is_the_papers_scale():
    cfg = load_config(BASE, next(r for r in runs("gpu", ["dir1.0"]) if r["method"] == "fedamole")["overrides"])
    assert (cfg.federation.num_clients, cfg.federation.rounds, cfg.train.local_steps) == (10, 30, 200)
    assert (cfg.algorithm.num_experts, cfg.algorithm.expert_choices, cfg.algorithm.max_experts) == (30, 2, 8)
    assert len(PRESETS["gpu"]["seeds"]) == 3


def test_runner_and_report_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--preset", "micro", "--scenarios", "task",
         "--methods", "fedit_ft", "fedamole", "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path),
         "--docs", str(tmp_path / "docs")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "accuracy_micro.json").read_text())
    assert {r["method"] for r in res["runs"]} == {"fedit_ft", "fedamole"}
    assert all(r["model"] == "personalized" for r in res["runs"])
    assert res["gains"]["task"]["best_baseline"] == "fedit_ft"
    md = (tmp_path / "docs" / "accuracy_micro.md").read_text()
    assert "Scenario `task`" in md and "fedamole" in md
    assert (tmp_path / "docs" / "accuracy_micro.png").stat().st_size > 1000


def test_tier_scenario_reports_every_method_at_every_budget(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--preset", "micro", "--scenarios", "tiers",
         "--methods", "flame", "hetlora", "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path),
         "--docs", str(tmp_path / "docs"), "--jobs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "accuracy_micro.json").read_text())
    assert res["jobs"] == 2 and {r["method"] for r in res["runs"]} == {"flame", "hetlora"}
    # one client per tier (8, 4, 2, 1): each lower tier's own model is evaluated, by both methods
    for method in ("flame", "hetlora"):
        assert set(res["budgets"]["tiers"][method]) == {"4", "2", "1"}
        run = next(r for r in res["runs"] if r["method"] == method)
        summary = json.loads((tmp_path / "runs" / "micro" / "tiers" / method / "seed42" / "summary.json").read_text())
        assert run["budgets"]["1"] == summary["other_models"]["global_k1"]["mean"]
    md = (tmp_path / "docs" / "accuracy_micro.md").read_text()
    assert "Score by compute budget" in md and "| flame |" in md and "k = 1" in md
    assert f"the suite took {res['wall_seconds'] / 60:.1f} minutes with 2 run(s) at a time" in md

    # --report-only rewrites the tables but keeps how the runs were made (wall time, jobs)
    (tmp_path / "docs" / "accuracy_micro.md").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--preset", "micro", "--scenarios", "tiers", "--report-only",
         "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path), "--docs", str(tmp_path / "docs")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "accuracy_micro.json").read_text())
    assert (again["wall_seconds"], again["jobs"], again["table"]) == (res["wall_seconds"], 2, res["table"])
    assert (tmp_path / "docs" / "accuracy_micro.md").read_text() == md
