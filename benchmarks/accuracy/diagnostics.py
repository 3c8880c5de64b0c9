"""What FedAMoLE's assignment does, round by round, from the runs' metrics (issue 15, "explain what you find").

    python -m benchmarks.accuracy.diagnostics [--runs-dir runs/accuracy] [--preset powered] [--out FILE.json]

For every FedAMoLE run (and its ablations) of a preset: per round, the mean over clients of the share of its
experts a client holds again (`experts_kept`) next to what a uniformly random re-deal keeps (`n/N`), the
routing entropy H(p)/log n of local training (1 = uniform over the held experts), how peaked the RSEA affinities
are (C * max_c P[e, c], 1 = uniform over clients), and the relative update of A (domain and shared experts) and
of the router W_t in the round's aggregate. From the last checkpoint's RSEA state (the embeddings of the
second-to-last round): how alike the clients' data embeddings t_c are (mean pairwise cosine), how alike the
experts' embeddings u_e are, and the size of the affinity scores S = u_e . t_c / sqrt(r) and of their spread over
clients (what the softmax over clients turns into P). Written as JSON (and printed as tables) for
docs/RESULTS.md.
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


def embedding_stats(run_dir: Path) -> dict[str, float] | None:
    """Statistics of the RSEA embeddings in the run's last checkpoint (None without RSEA state)."""
    import itertools

    import torch
    from safetensors.torch import load_file

    ckpts = sorted((run_dir / "checkpoints").glob("round_*"))
    if not ckpts:
        return None
    state = load_file(ckpts[-1] / "server.safetensors")
    T = [state[k] for k in sorted(k for k in state if k.startswith("rsea/T/"))]
    if len(T) < 2:
        return None
    T = torch.stack(T, 1)  # (modules, C, r)
    U = state["rsea/U_bar"]  # (modules, N, r)

    def pairwise_cos(X):  # (modules, n, r) -> mean cosine over pairs and modules
        n = X.shape[1]
        return statistics.mean(torch.nn.functional.cosine_similarity(X[:, i], X[:, j], dim=-1).mean().item()
                               for i, j in itertools.combinations(range(n), 2))

    S = torch.einsum("mnr,mcr->mnc", U, T) / U.shape[-1] ** 0.5  # (modules, N, C)
    return {"client_embedding_cos": pairwise_cos(T), "expert_embedding_cos": pairwise_cos(U),
            "score_abs_mean": S.abs().mean().item(), "score_std_over_clients": S.std(-1).mean().item(),
            "client_embedding_norm": T.norm(dim=-1).mean().item(),
            "client_embedding_spread": (T - T.mean(1, keepdim=True)).norm(dim=-1).mean().item()}


def collect(root: Path) -> dict:
    """scenario -> run -> round -> metric -> mean over seeds (and the seeds used)."""
    out: dict = {}
    for run_dir in sorted(root.glob("*/fedamole*/seed*")):
        if not (run_dir / "summary.json").is_file():
            continue
        scen, run, seed = run_dir.parts[-3], run_dir.parts[-2], int(run_dir.name[4:])
        entry = out.setdefault(scen, {}).setdefault(run, {"seeds": [], "rounds": {}, "embeddings": {}})
        entry["seeds"].append(seed)
        for k, v in (embedding_stats(run_dir) or {}).items():
            entry["embeddings"].setdefault(k, []).append(v)
        for rnd, metrics in run_diagnostics(run_dir).items():
            for k, v in metrics.items():
                entry["rounds"].setdefault(str(rnd), {}).setdefault(k, []).append(v)
    for scen in out.values():
        for entry in scen.values():
            entry["rounds"] = {rnd: {k: statistics.mean(v) for k, v in m.items()} for rnd, m in entry["rounds"].items()}
            entry["embeddings"] = {k: statistics.mean(v) for k, v in entry["embeddings"].items()}
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
    emb = ["client_embedding_cos", "expert_embedding_cos", "score_abs_mean", "score_std_over_clients"]
    lines += ["", "| scenario | run | seeds | " + " | ".join(emb) + " |", "|---|---|---|" + "---|" * len(emb)]
    for scen, runs in diag.items():
        for run, entry in runs.items():
            if entry["embeddings"]:
                lines.append(f"| {scen} | {run} | {len(entry['seeds'])} | "
                             + " | ".join(f"{entry['embeddings'][c]:.3f}" for c in emb) + " |")
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
