"""What the accuracy protocol's two structural savings buy (issue 15), on SmolLM2-135M and real WordNet data.

1. Test only where it is reported (`eval.test: selected`): one short FedIT-FT run (its global and its
   personalised model are both evaluated) with validation every round, testing every round vs testing only
   the round selected on validation and the last round. Wall time of each and the
   largest difference between the two runs' reported numbers (selected-round and last-round test scores per
   model: the protocol must not change them beyond float rounding).
2. Start-up paid once per worker: the same minimal run in a fresh `python -m fedmole.cli run` process vs in a
   long-lived worker process that has already run one (benchmarks/accuracy/runner.py): imports, model load
   and the WordNet read are what the worker saves on every run after its first.

    python -m benchmarks.perf.protocol
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.accuracy.runner import BASE, run_one
from benchmarks.common import record

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["data.prompt=plain", "data.tasks=[category]", "data.max_examples=1200", "partition.scheme=dirichlet",
          "partition.by=label", "partition.alpha=1.0", "partition.min_size=300", "partition.splits.train=0.55",
          "partition.splits.aux=0.04", "partition.splits.val=0.12", "partition.splits.test=0.29",
          "partition.caps.val=20", "partition.caps.test=40", "federation.num_clients=3", "train.batch_size=4",
          "train.lr=1e-3", "train.num_threads=1", "eval.max_examples=null", "eval.batch_size=16",
          "algorithm.name=fedit", "algorithm.personalize_by_finetune=true"]
EVAL_RUN = [*COMMON, "federation.rounds=4", "train.local_steps=4"]
MINIMAL = [*COMMON, "federation.rounds=1", "train.local_steps=1", "partition.caps.val=2", "partition.caps.test=2"]


def _reported(run_dir: Path) -> dict[str, float]:
    s = json.loads((run_dir / "summary.json").read_text())
    return {f"{m}/{k}": s[m][k] for m in ("personalized", "global") for k in ("mean", "last_mean")}


def main() -> None:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times, reported = {}, {}
        for mode in ("every", "selected"):
            run_dir = tmp / mode
            res = run_one({"overrides": [*EVAL_RUN, f"eval.test={mode}"]}, str(run_dir))
            assert res["ok"], res["error"]
            times[mode], reported[mode] = res["wall"], _reported(run_dir)
        diff = max(abs(reported["every"][k] - reported["selected"][k]) for k in reported["every"])
        out["test_where_reported"] = {"seconds": times, "speedup": times["every"] / times["selected"],
                                      "max_abs_reported_difference": diff, "rounds": 4, "clients": 3,
                                      "val_per_client": 20, "test_per_client": 40}
        print(f"eval.test every {times['every']:.0f} s vs selected {times['selected']:.0f} s: "
              f"{times['every'] / times['selected']:.2f}x (reported numbers differ by at most {diff:.1e})")

        fresh_dir = tmp / "fresh"
        cmd = [sys.executable, "-m", "fedmole.cli", "run", str(BASE), "--out", str(fresh_dir), "--progress", "none",
               *[a for o in MINIMAL for a in ("--set", o)]]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        fresh = time.perf_counter() - t
        run_one({"overrides": MINIMAL}, str(tmp / "warm-up"))  # this process becomes a warm worker
        warm = run_one({"overrides": MINIMAL}, str(tmp / "warm"))["wall"]
        out["startup"] = {"fresh_process_seconds": fresh, "warm_worker_seconds": warm, "saved_per_run": fresh - warm}
        print(f"minimal run: fresh process {fresh:.1f} s vs warm worker {warm:.1f} s: {fresh - warm:.1f} s saved per run")
    path = record("protocol", {"model": "smollm2-135m", **out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
