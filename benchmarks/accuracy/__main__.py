"""`make bench-accuracy`: run the accuracy suite, then write its tables and plot.

    python -m benchmarks.accuracy [--preset cpu|gpu|micro] [--scenarios task dir0.1 dir1.0 tiers]
                                  [--methods ...] [--runs-dir runs/accuracy] [--report-only]
                                  [--jobs N] [--set KEY=VALUE ...]

Each run is a real `fedmole run` in its own process, in runs/accuracy/<preset>/<scenario>/<method>/seed<N>.
The suite is resumable: a finished run (summary.json present) is kept, an interrupted one is resumed
with `fedmole resume`. `--jobs N` runs N at a time (default: the preset's, 2 for `cpu`, whose runs use 1 torch
thread each). Results: benchmarks/results/accuracy_<preset>.json, docs/results/accuracy_<preset>.md
and docs/results/accuracy_<preset>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.accuracy.report import collect, write_report
from benchmarks.accuracy.suite import PRESETS, SCENARIOS, runs

ROOT = Path(__file__).resolve().parents[2]
BASE = Path(__file__).resolve().parent / "base.yaml"


def run_one(run: dict, run_dir: Path, extra: list[str] = ()) -> tuple[bool, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if (run_dir / "summary.json").is_file():
        return True, 0.0
    if (run_dir / "checkpoints").is_dir():
        cmd = [sys.executable, "-m", "fedmole.cli", "resume", str(run_dir), "--progress", "none"]
    else:
        cmd = [sys.executable, "-m", "fedmole.cli", "run", str(BASE), "--out", str(run_dir), "--overwrite",
               "--progress", "none", *[a for o in [*run["overrides"], *extra] for a in ("--set", o)]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode == 0, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--methods", nargs="*", default=None, help="only these methods (default: all)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "accuracy")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the preset's)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run, e.g. train.num_threads=1 on a busy machine")
    args = ap.parse_args()

    plan = [r for r in runs(args.preset, args.scenarios) if not args.methods or r["method"] in args.methods]
    root = args.runs_dir / args.preset
    failed, started = [], time.perf_counter()
    jobs = max(1, args.jobs or PRESETS[args.preset].get("jobs", 1))
    if not args.report_only:
        def one(item):
            i, run = item
            run_dir = root / run["scenario"] / run["method"] / f"seed{run['seed']}"
            ok, secs = run_one(run, run_dir, args.extra)
            status = "ok" if ok else "FAILED"
            print(f"[{i}/{len(plan)}] {run['scenario']:7s} {run['method']:18s} seed {run['seed']}: {status} "
                  f"({secs:.0f} s, {time.perf_counter() - started:.0f} s total)", flush=True)
            return None if ok else run

        with ThreadPoolExecutor(jobs) as pool:
            failed = [r for r in pool.map(one, enumerate(plan, 1)) if r is not None]
    out = args.results / f"accuracy_{args.preset}.json"
    results = collect(plan, root)
    results["preset"] = args.preset
    if args.report_only and out.is_file():
        # tables only: keep how the runs were made (overrides, jobs, wall time) from the invocation that ran them
        before = json.loads(out.read_text())
        results.update({k: before[k] for k in ("extra_overrides", "jobs", "wall_seconds") if k in before})
    else:
        results.update(extra_overrides=args.extra, jobs=jobs, wall_seconds=round(time.perf_counter() - started, 1))
    args.results.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    write_report(results, args.docs, args.preset)
    print(f"wrote {out} and {args.docs}/accuracy_{args.preset}.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
