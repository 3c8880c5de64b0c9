"""Scale on one machine: 10, 100 and 1,000 simulated clients with 10 per round (in-process engine, tiny models).

Each (method, clients) point is a fresh process that runs `--rounds` rounds and reports its peak RSS (VmHWM,
the whole process: imports, data, model, rounds, checkpoints) and the wall time of every round. A round is all
of `Federation.run_round`: sampling, planning (FedAMoLE: RSEA over the round's 10 clients), local training of
the 10 clients (their states read from and written to the state store on disk), aggregation, the global
evaluation on `eval.clients: 10` clients, the logs and the checkpoint. Time per round is the median over
rounds 2 and later (round 1 pays one-time warm-up).

The data set is the same at every client count (`--examples` synthetic instruction/response pairs, split iid),
so a point with more clients holds the same examples in smaller shares: what the comparison measures is what
the framework holds and does per client it knows, not the size of the data set. Every client gets at least
the 2 validation and 2 test examples `eval.max_examples` evaluates (20 examples each at 1,000 clients), so
every round evaluates as much at every size, and the aux split FedAMoLE embeds for RSEA is capped at the 2
examples a client has at 1,000 (uncapped, a client at 10 embeds 200 and the round costs 3.3 s against 0.9 s).

Targets (issue 20): peak RSS at 1,000 clients <= 1.2 x at 10; time per round at 1,000 <= 1.2 x at 10.

    python -m benchmarks.perf.scale [--clients 10 100 1000] [--methods fedamole flame fedit] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import record

ROOT = Path(__file__).resolve().parents[2]
METHODS = {  # name -> (config, overrides)
    "fedamole": ("smoke_fedamole.yaml", ["algorithm.num_experts=10", "algorithm.expert_choices=2",
                                         "algorithm.min_experts=2", "algorithm.max_experts=6"]),
    "flame": ("smoke_flame.yaml", []),
    "fedit": ("smoke.yaml", []),
}
COMMON = ["federation.clients_per_round=10", "eval.clients=10", "partition.scheme=iid", "partition.min_size=1",
          "partition.caps.aux=2",  # FedAMoLE embeds a client's whole aux split: the same 2 examples at every size
          "partition.splits={train: 0.6, aux: 0.1, val: 0.15, test: 0.15}", "train.local_steps=2",
          "train.batch_size=4", "train.max_length=64", "train.num_threads=1", "eval.max_examples=2",
          "eval.batch_size=4", "eval.generation.max_new_tokens=4", "data.source=jsonl", "data.max_examples=null",
          "output.progress=none"]

CHILD = """
import json, sys, time
from pathlib import Path
from fedmole.config_io import load_config
from fedmole import run as R

rounds, marks = [], {}
inner = R.Federation.run_round
def timed(self, rnd):
    if not rounds:
        marks["rss_before_round_1"] = rss("VmRSS:")
    start = time.perf_counter()
    out = inner(self, rnd)
    rounds.append(time.perf_counter() - start)
    return out
R.Federation.run_round = timed

def rss(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) / 1024

cfg = load_config(sys.argv[1], sys.argv[3:])
start = time.perf_counter()
summary = R.run_experiment(cfg, R.prepare_run_dir(cfg, sys.argv[2], None, True), "none")
print(json.dumps({"peak_rss_mib": rss("VmHWM:"), "rss_end_mib": rss("VmRSS:"), **marks, "round_seconds": rounds,
                  "run_seconds": time.perf_counter() - start, "state_digest": summary["state_digest"]}))
"""


def write_data(path: Path, n: int) -> None:
    """`n` short instruction/response pairs (generation examples, 3 tasks, 2 domains), seeded by position."""
    verbs, things = ["Define", "Spell", "Rhyme"], ["river", "stone", "cloud", "ember", "field", "shore", "glass"]
    with path.open("w") as fh:
        for i in range(n):
            row = {"instruction": f"{verbs[i % 3]} the word {things[i % 7]}{i % 101}.", "context": "",
                   "response": f"{things[(i * 3) % 7]} {i % 17} {things[(i * 5) % 7]}", "task": f"t{i % 3}",
                   "domain": f"d{i % 2}"}
            fh.write(json.dumps(row) + "\n")


def measure(method: str, clients: int, rounds: int, data: Path, work: Path) -> dict:
    config, overrides = METHODS[method]
    sets = [*overrides, *COMMON, f"federation.num_clients={clients}", f"federation.rounds={rounds}",
            f"data.path={data}"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "configs" / config),
                           str(work / f"{method}-{clients}"), *sets],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{method} with {clients} clients failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    later = sorted(out["round_seconds"][1:])
    out["seconds_per_round"] = later[len(later) // 2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=20_000)
    args = ap.parse_args()
    load = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedmole-scale-") as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, args.examples)
        for method in args.methods:
            points = {}
            for c in args.clients:
                points[str(c)] = p = measure(method, c, args.rounds, data, Path(tmp))
                print(f"{method:9s} {c:5d} clients  peak RSS {p['peak_rss_mib']:7.1f} MiB  "
                      f"{p['seconds_per_round']:6.2f} s/round  (rounds {', '.join(f'{t:.2f}' for t in p['round_seconds'])})",
                      flush=True)
            lo, hi = str(min(args.clients)), str(max(args.clients))
            results[method] = {
                "points": points,
                "rss_ratio": points[hi]["peak_rss_mib"] / points[lo]["peak_rss_mib"],
                "round_time_ratio": points[hi]["seconds_per_round"] / points[lo]["seconds_per_round"],
            }
            r = results[method]
            print(f"{method:9s} {hi} vs {lo} clients: RSS x{r['rss_ratio']:.3f}, time per round x{r['round_time_ratio']:.3f}"
                  f" (targets <= 1.2)", flush=True)
    met = all(r["rss_ratio"] <= 1.2 and r["round_time_ratio"] <= 1.2 for r in results.values())
    result = {"clients_per_round": 10, "rounds": args.rounds, "examples": args.examples, "engine": "inprocess",
              "load_average_before": load, "load_average_after": os.getloadavg(), "targets_met": met,
              "methods": results, "measured": time.strftime("%Y-%m-%d %H:%M")}
    print(f"targets {'met' if met else 'NOT met'}; wrote {record('scale', result)}")


if __name__ == "__main__":
    main()
