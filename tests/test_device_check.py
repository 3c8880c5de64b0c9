"""`benchmarks/device/check.sh`, the GPU check: its syntax, its comparison rule, and its CPU fallback end to end
(the machine that runs the suite has no GPU; on one, the same script compares CUDA with the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.device import check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device" / "check.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def _run_dir(path: Path, loss: float, score: float) -> Path:
    from safetensors.torch import save_file
    import torch

    recs = [{"round": 1, "client": c, "model": "global", "split": "test", "metric": m, "value": v}
            for c in range(10) for m, v in (("loss", loss), ("score", score if c == 0 else 0.5))]
    (path / "checkpoints" / "round_0001").mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    save_file({"w": torch.full((2,), loss)}, path / "checkpoints" / "round_0001" / "server.safetensors")
    return path


def test_a_run_matches_within_the_stated_tolerance_and_not_beyond(tmp_path):
    cpu = _run_dir(tmp_path / "cpu", 2.0, 0.5)
    assert check.compare(cpu, _run_dir(tmp_path / "same", 2.0, 0.5), "fp32")["ok"]
    near = check.compare(cpu, _run_dir(tmp_path / "near", 2.002, 0.5), "fp32")  # 1e-3 relative
    assert near["ok"] and near["loss_max_rel_diff"] == pytest.approx(1e-3) and near["state_max_abs_diff"] > 0
    assert not check.compare(cpu, _run_dir(tmp_path / "far", 2.01, 0.5), "fp32")["ok"]  # 5e-3 > 2e-3
    assert check.compare(cpu, _run_dir(tmp_path / "bf16", 2.01, 0.5), "bf16")["ok"]
    flipped = check.compare(cpu, _run_dir(tmp_path / "flip", 2.0, 1.0), "fp32")  # 1 of 10 scores: at the limit
    assert flipped["ok"] and flipped["scores_differing"] == "1/10"


def test_the_cpu_fallback_runs_end_to_end(tmp_path):
    data = tmp_path / "words.jsonl"
    rows = [{"instruction": f"{['Define', 'Spell', 'Rhyme'][i % 3]} the word w{i}.", "context": "",
             "response": f"thing {i % 17}", "task": f"t{i % 3}", "domain": f"d{i % 2}"} for i in range(90)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "device.json"
    sets = ["data.source=jsonl", f"data.path={data}", "data.max_examples=null", "partition.scheme=iid",
            "federation.num_clients=3", "eval.generation.max_new_tokens=2"]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(SCRIPT), "--quick", "--configs", "fedit", "--repeats", "1", "--out", str(out),
                           *[a for s in sets for a in ("--set", s)]], env={**env, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu (fallback: no GPU)" and result["ok"]
    run = result["runs"]["fedit/fp32"]
    assert run["records"] > 0 and run["loss_max_rel_diff"] == 0.0 and run["state_max_abs_diff"] == 0.0
    for layer in ("amole", "smoe"):
        assert result["layers"][layer]["max_abs_diff"] < 1e-3 and result["layers"][layer]["speedup_batched_over_loop"] > 0
    assert "all runs match" in proc.stdout
