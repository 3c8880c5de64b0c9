"""`make bench-accuracy`: run the accuracy suite, then write its results file, tables and plots.

    python -m benchmarks.accuracy [--preset cpu|gpu|micro|powered] [--scenarios ...] [--methods ...]
                                  [--runs-dir runs/accuracy] [--report-only] [--jobs N] [--n-boot B]
                                  [--set KEY=VALUE ...]

Each run is a real fedmole run (`run_experiment`) in runs/accuracy/<preset>/<scenario>/<run>/seed<N>. The runs
are carried out by `--jobs` worker processes (default: the preset's, 2 for `cpu` and `powered`, whose runs use
one torch thread each) that live for the whole invocation, so imports, the model load and the data set are
paid once per worker, not once per run. The suite is resumable run by run: a finished run (summary.json
present) is kept, an interrupted one is resumed from its last checkpoint, and a run without a checkpoint
starts over; so a long preset can be completed in several sittings, and each sitting's wall time is kept in
the results file (`sittings`). Results: benchmarks/results/accuracy_<preset>.json,
docs/results/accuracy_<preset>.md and .png (and the forest plot of the paper claims, _claims.png).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks.accuracy.runner import run_one

ROOT = Path(__file__).resolve().parents[2]


def _run_all(plan: list[dict], root: Path, extra: list[str], jobs: int) -> tuple[list[dict], int]:
    """Run the plan on `jobs` long-lived worker processes; returns the failed runs and how many ran."""
    todo = [(i, r) for i, r in enumerate(plan, 1) if not (_run_dir(root, r) / "summary.json").is_file()]
    print(f"{len(plan) - len(todo)} of {len(plan)} runs already finished; {len(todo)} to run, {jobs} at a time",
          flush=True)
    if not todo:
        return [], 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers inherit it: one thread per run
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    failed, started = [], time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, r, str(_run_dir(root, r)), extra): (i, r) for i, r in todo}
        for fut in as_completed(futures):
            i, r = futures[fut]
            out = fut.result()
            status = out["kind"] if out["ok"] else "FAILED"
            print(f"[{i}/{len(plan)}] {r['scenario']:8s} {r['method']:18s} seed {r['seed']}: {status} "
                  f"({out['wall']:.0f} s wall, {out['cpu']:.0f} s cpu; {time.perf_counter() - started:.0f} s "
                  "this sitting)", flush=True)
            if not out["ok"]:
                print(out["error"], file=sys.stderr, flush=True)
                failed.append(r)
    return failed, len(todo)


def _run_dir(root: Path, run: dict) -> Path:
    return root / run["scenario"] / run["method"] / f"seed{run['seed']}"


def main() -> int:
    from benchmarks.accuracy.report import collect, write_report
    from benchmarks.accuracy.suite import PRESETS, method_table, runs, scenario_names

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--scenarios", nargs="*", default=None, help="only these scenarios (default: the preset's)")
    ap.add_argument("--methods", nargs="*", default=None, help="only these runs (default: all)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "accuracy")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the preset's)")
    ap.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples per paired claim")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run, e.g. train.num_threads=1 on a busy machine")
    args = ap.parse_args()

    scenarios = args.scenarios or scenario_names(args.preset)
    bad = sorted(set(scenarios) - set(scenario_names(args.preset)))
    if bad:
        ap.error(f"preset {args.preset} has no scenario {bad}; its scenarios: {scenario_names(args.preset)}")
    plan = [r for r in runs(args.preset, scenarios) if not args.methods or r["method"] in args.methods]
    root = args.runs_dir / args.preset
    jobs = max(1, args.jobs or PRESETS[args.preset].get("jobs", 1))
    out = args.results / f"accuracy_{args.preset}.json"
    before = json.loads(out.read_text()) if out.is_file() else {}
    sittings = list(before.get("sittings", []))
    failed = []
    if not args.report_only:
        started = time.time()
        failed, ran = _run_all(plan, root, args.extra, jobs)
        if ran:
            sittings.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                             "wall_seconds": round(time.time() - started, 1), "jobs": jobs, "runs": ran,
                             "extra_overrides": args.extra})
    table = {s: {m: spec for m, spec in ms.items() if not args.methods or spec["run"] in args.methods}
             for s, ms in method_table(args.preset, scenarios).items()}
    results = collect(root, table, PRESETS[args.preset]["seeds"], n_boot=args.n_boot)
    results.update(preset=args.preset, sittings=sittings,
                   wall_seconds=round(sum(s["wall_seconds"] for s in sittings), 1),
                   jobs=sittings[-1]["jobs"] if sittings else before.get("jobs", jobs))
    args.results.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    write_report(results, args.docs, args.preset)
    print(f"wrote {out} and {args.docs}/accuracy_{args.preset}.md" + (" (partial)" if results["partial"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
