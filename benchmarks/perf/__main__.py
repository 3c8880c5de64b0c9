"""`make bench-perf`: every performance benchmark, each in its own process, results in
benchmarks/results/perf.json. A failing benchmark is reported and the others still run.

    python -m benchmarks.perf [NAME ...]
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = ["train_loop", "evaluation", "model_load", "amole", "rsea_highs", "flame", "aggregation", "memory",
              "long_run", "flower", "protocol", "scale", "flame_dense", "pool_dispatch", "optimizer"]


def main() -> int:
    names = sys.argv[1:] or BENCHMARKS
    failed = []
    for name in names:
        print(f"\n=== benchmarks.perf.{name}", flush=True)
        t = time.perf_counter()
        if subprocess.run([sys.executable, "-m", f"benchmarks.perf.{name}"]).returncode:
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - t:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
