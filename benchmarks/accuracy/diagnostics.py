"""What FedAMoLE's assignment does, round by round, from the runs' metrics (issue 15, "explain what you find").

    python -m benchmarks.accuracy.diagnostics [--runs-dir runs/accuracy] [--preset powered] [--out FILE.json]

For every FedAMoLE run (and its ablations) of a preset: per round, the mean over clients of the share of its
experts a client holds again (`experts_kept`) next to what a uniformly random re-deal keeps (`n/N`), the
routing entropy H(p)/log n of local training (1 = uniform over the held experts), how peaked the RSEA affinities
are (C * max_c P[e, c], 1 = uniform over clients), and the relative update of A (domain and shared experts) and
of the router W_t in the round's aggregate. Written as JSON (and printed as a table) for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROUND_METRICS = ("affinity_peak", "update_A_domain", "update_A_shared", "update_W_t_router", "B_norm_domain")
CLIENT_METRICS = ("experts_kept", "experts_kept_random", "router_entropy")


def run_diagnostics(run_dir: Path) -> dict[int, dict[str, float]]:
    """round -> metric -> value (client metrics averaged over the round's clients)."""
    per_round: dict[int, dict[str, list[float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        name = r["metric"]
        if name in ROUND_METRICS and r["client"] is None or name in CLIENT_METRICS and r["client"] is not None:
            per_round.setdefault(r["round"], {}).setdefault(name, []).append(r["value"])
    return {rnd: {k: statistics.mean(v) for k, v in m.items()} for rnd, m in sorted(per_round.items())}


def collect(root: Path) -> dict:
    """scenario -> run -> round -> metric -> mean over seeds (and the seeds used)."""
    out: dict = {}
    for run_dir in sorted(root.glob("*/fedamole*/seed*")):
        if not (run_dir / "summary.json").is_file():
            continue
        scen, run, seed = run_dir.parts[-3], run_dir.parts[-2], int(run_dir.name[4:])
        entry = out.setdefault(scen, {}).setdefault(run, {"seeds": [], "rounds": {}})
        entry["seeds"].append(seed)
        for rnd, metrics in run_diagnostics(run_dir).items():
            for k, v in metrics.items():
                entry["rounds"].setdefault(str(rnd), {}).setdefault(k, []).append(v)
    for scen in out.values():
        for entry in scen.values():
            entry["rounds"] = {rnd: {k: statistics.mean(v) for k, v in m.items()} for rnd, m in entry["rounds"].items()}
    return out


def table(diag: dict) -> str:
    cols = ["experts_kept", "experts_kept_random", "router_entropy", "affinity_peak", "update_A_domain",
            "update_W_t_router"]
    lines = ["| scenario | run | round | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for scen, runs in diag.items():
        for run, entry in runs.items():
            for rnd, m in entry["rounds"].items():
                cells = [f"{m[c]:.3f}" if c in m else "–" for c in cols]
                lines.append(f"| {scen} | {run} | {rnd} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/accuracy"))
    ap.add_argument("--preset", default="powered")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    diag = collect(args.runs_dir / args.preset)
    if args.out:
        args.out.write_text(json.dumps(diag, indent=1))
    print(table(diag))


if __name__ == "__main__":
    main()
