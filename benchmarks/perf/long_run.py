"""A long run under failures: 50 rounds of the tiny smoke federation with 20% injected failures.

Checks that the run completes, counts the skips, and compares the process RSS after round 5 with the RSS
after round 50 (target, issue 7: no growth beyond 5%).

    python -m benchmarks.perf.long_run [--rounds 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import record

ROOT = Path(__file__).resolve().parents[2]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()

    import fedmole.run as run
    from fedmole.config_io import load_config

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"federation.rounds={args.rounds}", "train.local_steps=2", "eval.every=10", "eval.max_examples=4",
        "faults.drop_probability=0.07", "faults.crash_probability=0.07", "faults.straggler_probability=0.06",
    ])
    rss: dict[int, float] = {}
    real_round = run.Federation.run_round

    def measured_round(self, rnd):
        real_round(self, rnd)
        rss[rnd] = rss_mib()

    run.Federation.run_round = measured_round
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        summary = run.run_experiment(cfg, Path(d), "none")
        wall = time.perf_counter() - t
    growth = rss[args.rounds] / rss[5] - 1
    print(f"{args.rounds} rounds in {wall:.0f} s; skipped {summary['skipped']}")
    print(f"RSS after round 5: {rss[5]:.0f} MiB, after round {args.rounds}: {rss[args.rounds]:.0f} MiB, "
          f"growth {100 * growth:+.1f}% (target <= +5%)")
    print(f"wrote {record('long_run_failures', {'rounds': args.rounds, 'wall_s': wall, 'skipped': summary['skipped'], 'rss_mib_round5': rss[5], 'rss_mib_last': rss[args.rounds], 'rss_growth': growth, 'target': 'growth <= 5%'})}")


if __name__ == "__main__":
    main()
