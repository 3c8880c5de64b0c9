"""Memory as the number of simulated clients grows (5 to 50), with one shared frozen base model.

Each point is a fresh process running one round of SmolLM2-135M (in-process engine, 1 local step per
client, loss-only evaluation) and reporting its peak RSS. The base model is loaded once whatever the
number of clients; what grows is per-client data and per-client state (for `local`, every client's own
adapter). Reported: peak RSS per client count and the marginal MiB per added client.

    python -m benchmarks.perf.memory [--clients 5 10 20 50] [--methods fedit local]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import record

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys, tempfile
from pathlib import Path
from fedmole.config_io import load_config
from fedmole.run import run_experiment
cfg = load_config(sys.argv[1], sys.argv[2:])
with tempfile.TemporaryDirectory() as d:
    run_experiment(cfg, Path(d), "none")
peak = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss_mib": int(peak.split()[1]) / 1024}))
"""


def measure(method: str, clients: int) -> float:
    over = [f"algorithm.name={method}", f"federation.num_clients={clients}", "federation.rounds=1",
            "partition.scheme=iid", f"data.max_examples={40 * clients}", "train.local_steps=1",
            "train.batch_size=2", "eval.metric=loss", "eval.max_examples=2", "partition.min_size=10"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "configs" / "smoke.yaml"), "model.name=smollm2-135m", *over],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="*", default=[5, 10, 20, 50])
    ap.add_argument("--methods", nargs="*", default=["fedit", "local"])
    args = ap.parse_args()
    results = {}
    for method in args.methods:
        peaks = {c: measure(method, c) for c in args.clients}
        lo, hi = min(args.clients), max(args.clients)
        per_client = (peaks[hi] - peaks[lo]) / (hi - lo)
        results[method] = {"peak_rss_mib": peaks, "mib_per_added_client": per_client}
        print(f"{method:6s} peak RSS " + "  ".join(f"{c} clients {m:.0f} MiB" for c, m in peaks.items())
              + f"   -> {per_client:.1f} MiB per added client")
    print(f"wrote {record('memory_vs_clients', {'model': 'smollm2-135m', 'engine': 'inprocess', 'methods': results})}")


if __name__ == "__main__":
    main()
