"""The accuracy suite: every planned run is a valid config, and the runner and report work end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accuracy.suite import (POWERED_PERSONAL_METHODS, POWERED_SCENARIOS, PRESETS, SCENARIOS,
                                       method_table, runs)
from fedmole.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "accuracy" / "base.yaml"


def test_every_run_of_every_preset_is_a_valid_config():
    for preset, spec in PRESETS.items():
        plan = runs(preset)
        table = method_table(preset)
        runs_per_seed = sum(len({m["run"] for m in methods.values()}) for methods in table.values())
        assert len(plan) == runs_per_seed * len(spec["seeds"])
        for run in plan:
            cfg = load_config(BASE, run["overrides"])  # raises on an invalid combination
            assert cfg.federation.seed == run["seed"]
            assert run["method"] in {m["run"] for m in table[run["scenario"]].values()}


def test_powered_preset_meets_the_protocol():
    """Mostly classification, >= 150 test and 60 validation examples per client, >= 1,000 paired test examples
    per scenario over the 3 seeds, test only at the selected and last rounds, every required method."""
    assert PRESETS["powered"]["seeds"] == [42, 62, 82]
    for scen, spec in POWERED_SCENARIOS.items():
        cfg = load_config(BASE, next(r for r in runs("powered", [scen]) if r["method"] != "fdlora")["overrides"])
        assert cfg.eval.test == "selected" and cfg.federation.num_clients == spec["clients"]
        if scen != "gen":
            assert (cfg.partition.caps.test, cfg.partition.caps.val) == (150, 60)
            assert spec["clients"] * cfg.partition.caps.test * 3 >= 1000
    assert set(POWERED_PERSONAL_METHODS) >= {"fedamole", "fedamole_r", "fedamole_s", "fedit", "fedit_ft", "fdlora",
                                             "local"}
    assert set(method_table("powered", ["tiers"])["tiers"]) == {"flame", "flame_no_rescaler", "flame_t0",
                                                                  "hetlora", "flexlora"}
    tiers = load_config(BASE, next(r for r in runs("powered", ["tiers"]) if r["method"] == "flame")["overrides"])
    assert tiers.federation.num_clients >= 3 * len(tiers.tiers.levels)


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
        assert set(res["table"]["tiers"][method]["budgets"]) == {"K", "4", "2", "1"}
        run = next(r for r in res["runs"] if r["method"] == method)
        summary = json.loads((tmp_path / "runs" / "micro" / "tiers" / method / "seed42" / "summary.json").read_text())
        assert run["budgets"]["1"]["test"] == summary["other_models"]["global_k1"]["mean"]
    md = (tmp_path / "docs" / "accuracy_micro.md").read_text()
    assert "Score by compute budget" in md and "| flame |" in md and "k = 1" in md
    assert f"the suite took {res['wall_seconds'] / 60:.1f} minutes with 2 run(s) at a time" in md

    # --report-only rewrites the tables but keeps how the runs were made (wall time, jobs)
    (tmp_path / "docs" / "accuracy_micro.md").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--preset", "micro", "--scenarios", "tiers", "--report-only",
         "--methods", "flame", "hetlora", "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path),
         "--docs", str(tmp_path / "docs")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "accuracy_micro.json").read_text())
    assert (again["wall_seconds"], again["jobs"], again["table"]) == (res["wall_seconds"], 2, res["table"])
    assert (tmp_path / "docs" / "accuracy_micro.md").read_text() == md


def test_a_partial_suite_is_reported_as_partial_and_resumed_run_by_run(tmp_path):
    """A sitting that ran some runs leaves a partial report; the next sitting keeps the finished runs (their
    directories untouched), resumes an interrupted one from its checkpoint, runs the rest, and the results
    file keeps every sitting's wall time."""
    args = [sys.executable, "-m", "benchmarks.accuracy", "--preset", "micro", "--scenarios", "task",
            "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path), "--docs", str(tmp_path / "docs")]
    first = subprocess.run([*args, "--methods", "fedit_ft", "local"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = subprocess.run([*args, "--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    res = json.loads((tmp_path / "accuracy_micro.json").read_text())
    assert res["partial"] and {m for r in res["missing"] for m in r["methods"]} == set(SCENARIOS["task"]["methods"]) - {
        "fedit_ft", "local"}
    assert "Partial results" in (tmp_path / "docs" / "accuracy_micro.md").read_text()
    runs_dir = tmp_path / "runs" / "micro" / "task"
    kept = (runs_dir / "fedit_ft" / "seed42" / "summary.json").stat().st_mtime_ns
    # an interrupted run: its summary is gone, its checkpoint stays
    (runs_dir / "local" / "seed42" / "summary.json").unlink()
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "local              seed 42: resumed" in second.stdout and "fedit_ft" not in second.stdout.split("\n", 1)[1]
    assert (runs_dir / "fedit_ft" / "seed42" / "summary.json").stat().st_mtime_ns == kept
    res = json.loads((tmp_path / "accuracy_micro.json").read_text())
    assert not res["partial"] and len(res["sittings"]) == 2
    assert res["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in res["sittings"]), abs=0.2)
