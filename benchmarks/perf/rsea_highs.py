"""RSEA's assignment: the hand-written min-cost flow (fedmole/algorithms/rsea.py) against scipy's HiGHS on the
same program (issue 19: use the library if it meets the target and changes no assignment).

    max_X sum P[e,c] X[e,c]  s.t.  sum_c X[e,c] = k_c,  min_experts <= sum_e X[e,c] <= max_experts,  X in {0,1}

The constraint matrix is that of a transportation problem (totally unimodular), so HiGHS solves it exactly as
an LP: `linprog(method="highs-ds")` (dual simplex, which ends at a vertex, i.e. an integral X) and `milp` with
every variable integral (what a reader would write first). Three questions:

1. Property check on random instances (N, C, k_c, bounds and the sharpness of the affinities drawn at random,
   plus instances with exact ties): is HiGHS's objective equal to the flow's, and is its assignment the same?
   fedmole's results depend on the assignment, so a different optimum among ties is a behaviour change.
2. The RSEA benchmark of benchmarks/perf/amole.py (N = 30 experts, 60 modules, C in {10, 100, 1000} with the
   smallest feasible k_c, bounds [2, 8]): seconds per round for the flow and for HiGHS (one module after
   another; HiGHS has no batch), and how many of the 60 modules get the same assignment.
3. Target: C = 1000 under 5 s per round.

    python -m benchmarks.perf.rsea_highs [--instances 300] [--repeats 1] [--clients 10 100 1000]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy import sparse
from scipy.optimize import LinearConstraint, linprog, milp

from benchmarks.common import median, record
from fedmole.algorithms import rsea


def _constraint_matrix(N: int, C: int) -> sparse.csr_matrix:
    """Rows 0..N-1: expert e's clients (sum over c of X[e, c]); rows N..N+C-1: client c's experts."""
    experts = sparse.kron(sparse.eye(N), np.ones((1, C)))
    clients = sparse.kron(np.ones((1, N)), sparse.eye(C))
    return sparse.vstack([experts, clients]).tocsr()


def highs_assignment(P: np.ndarray, k: int, lo: int, hi: int, method: str) -> np.ndarray:
    """The optimal X (bool, N x C) for one module from HiGHS: method "lp" (dual simplex) or "milp"."""
    N, C = P.shape
    A = _constraint_matrix(N, C)
    if method == "milp":
        res = milp(-P.ravel(), integrality=np.ones(N * C), bounds=(0, 1),
                   constraints=LinearConstraint(A, np.r_[np.full(N, k), np.full(C, lo)],
                                                np.r_[np.full(N, k), np.full(C, hi)]))
    else:
        A_eq, A_c = A[:N], A[N:]
        res = linprog(-P.ravel(), A_eq=A_eq, b_eq=np.full(N, k), A_ub=sparse.vstack([A_c, -A_c]),
                      b_ub=np.r_[np.full(C, hi), np.full(C, -lo)], bounds=(0, 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"HiGHS ({method}) failed: {res.message}")
    x = res.x.reshape(N, C)
    assert np.abs(x - np.round(x)).max() < 1e-6, "HiGHS returned a fractional vertex"
    return x > 0.5


def _random_instance(rng: np.random.Generator) -> tuple[np.ndarray, int, int, int, str]:
    """A feasible (P, k, lo, hi) of random size and a label for its kind of affinities."""
    while True:
        N, C = int(rng.integers(2, 16)), int(rng.integers(2, 40))
        k = int(rng.integers(1, C + 1))
        lo = int(rng.integers(0, min(3, N) + 1))
        hi = int(rng.integers(max(lo, 1), N + 1))
        if rsea.feasibility_problem(N, k, C, lo, hi) is None:
            break
    kind = ["uniform", "smooth", "sharp", "ties"][int(rng.integers(4))]
    if kind == "uniform":  # round 0 / random_dispatch
        P = rsea.random_affinity(rng, (N, C))
    elif kind == "ties":  # scores on a coarse grid: many exactly equal affinities
        P = rsea.softmax_rows(rng.integers(0, 3, size=(N, C)).astype(float))
    else:
        scale = 1.0 if kind == "smooth" else 30.0  # sharp: most scores underflow to 0
        P = rsea.affinity(rng.normal(size=(N, 8)) * scale, rng.normal(size=(C, 8)))
    return P, k, lo, hi, kind


def property_check(instances: int, seed: int = 0) -> dict:
    """Objective and assignment of HiGHS (LP and MILP) against the flow on random instances."""
    rng = np.random.default_rng(seed)
    by_kind: dict[str, dict] = {}
    gaps = []  # flow objective - HiGHS objective
    for _ in range(instances):
        P, k, lo, hi, kind = _random_instance(rng)
        X = rsea.solve_assignment(P, k, lo, hi)
        flow = float((P * X).sum())
        row = by_kind.setdefault(kind, {"instances": 0, "objective_equal": {"lp": 0, "milp": 0},
                                        "assignment_equal": {"lp": 0, "milp": 0}})
        row["instances"] += 1
        for method in ("lp", "milp"):
            Y = highs_assignment(P, k, lo, hi, method)
            gap = flow - float((P * Y).sum())  # >= 0 up to the 2^-40 grid: the flow is exact
            gaps.append(gap)
            row["objective_equal"][method] += abs(gap) <= 1e-9
            row["assignment_equal"][method] += bool(np.array_equal(X, Y))
    return {"instances": instances, "seed": seed, "by_kind": by_kind,
            "objective_flow_minus_highs": {"min": min(gaps), "max": max(gaps)}}


def timing(clients: list[int], repeats: int) -> dict:
    """The amole.py RSEA benchmark for the flow (one batch) and for HiGHS (module by module)."""
    N, modules, r, lo, hi = 30, 60, 8, 2, 8
    out = {}
    for C in clients:
        k = max(2, math.ceil(C * lo / N))  # the smallest feasible expert_choices, as in amole.py
        rng = np.random.default_rng(C)
        times = {"flow": [], "highs_lp": [], "highs_milp": []}
        same = {"highs_lp": 0, "highs_milp": 0}
        for _ in range(repeats):
            P = rsea.affinity(rng.normal(size=(modules, N, r)), rng.normal(size=(modules, C, r)))
            t = time.perf_counter()
            X = rsea.solve_assignment(P, k, lo, hi)
            times["flow"].append(time.perf_counter() - t)
            for name, method in (("highs_lp", "lp"), ("highs_milp", "milp")):
                t = time.perf_counter()
                Y = np.stack([highs_assignment(P[m], k, lo, hi, method) for m in range(modules)])
                times[name].append(time.perf_counter() - t)
                same[name] += int(sum(np.array_equal(X[m], Y[m]) for m in range(modules)))
        out[str(C)] = {"expert_choices": k, "seconds_per_round": {n: median(v) for n, v in times.items()},
                       "modules_with_same_assignment": {n: f"{v} of {modules * repeats}" for n, v in same.items()}}
        s = out[str(C)]["seconds_per_round"]
        print(f"C={C:>4} k_c={k:>2}  flow {s['flow']:.2f} s   HiGHS LP {s['highs_lp']:.2f} s   HiGHS MILP "
              f"{s['highs_milp']:.2f} s per round (60 modules); same assignment: "
              f"{out[str(C)]['modules_with_same_assignment']}", flush=True)
    return {"experts": N, "modules": modules, "bounds": [lo, hi], "repeats": repeats, "by_clients": out,
            "target": "C=1000 < 5 s"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    args = ap.parse_args()
    result = {"property_check": property_check(args.instances)}
    for kind, row in result["property_check"]["by_kind"].items():
        print(f"{kind:>8}: {row['instances']} instances, objective equal {row['objective_equal']}, "
              f"assignment equal {row['assignment_equal']}", flush=True)
    gap = result["property_check"]["objective_flow_minus_highs"]
    print(f"objective of the flow minus HiGHS's: min {gap['min']:.3g}, max {gap['max']:.3g}", flush=True)
    result["timing"] = timing(args.clients, args.repeats)
    print(f"wrote {record('rsea_vs_highs', result)}")


if __name__ == "__main__":
    main()
