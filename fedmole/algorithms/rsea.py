"""RSEA: reverse selection-based expert assignment (FedAMoLE, spec section 4).

Per adapted module the server scores every (domain expert e, client c) pair and lets each *expert* choose
its clients ("reverse" selection):

    S = U_bar T^T / sqrt(r)          U_bar: (N, r) expert embeddings, T: (C, r) client data embeddings
    P = softmax(S, axis=clients)     each expert's row is a distribution over the clients
    max_X  sum_{e,c} P[e,c] X[e,c]   X in {0,1}^(N x C)
    s.t.   sum_c X[e,c] = k_c                         every expert picks exactly k_c clients
           min_experts <= sum_e X[e,c] <= max_experts  every client ends with a bounded expert count

This is a bipartite b-matching (a transportation problem with unit arc capacities), so it is solved
exactly as a min-cost flow: source -> expert (k_c units) -> client (one unit per pair, cost -P) -> sink,
where a client's first `min_experts` units earn a bonus larger than any total affinity (so every lower bound
is met whenever the bounds are satisfiable) and at most `max_experts` units fit. Successive shortest paths
builds the optimum one unit at a time. A shortest path alternates experts and clients; it is found on the
N-node graph of experts (arc a -> b: "a takes one of b's clients", weighted by the best such client) plus
terminal arcs ("a takes a client with room"), so one path costs O(N^2) and never O(N*C). All modules of a
round are solved in lock-step as one batch (every module needs exactly N*k_c augmentations), which keeps
the per-step numpy overhead shared.

Exactness and ties: affinities are rounded to integers on a 2^-40 grid (well below float32 embedding noise)
and the flow is computed in exact int64 arithmetic, so the result is the optimum of the rounded program and
never a tolerance-limited one. Every choice the algorithm makes takes the lowest index among equals (expert
id, then client position), so equal scores always give the same assignment.
"""

from __future__ import annotations

import math

import numpy as np

from fedmole.feasibility import feasibility_problem


# -------------------------------------------------------------------------------------------- scores
def softmax_rows(S: np.ndarray) -> np.ndarray:
    Z = np.exp(S - S.max(axis=-1, keepdims=True))
    return Z / Z.sum(axis=-1, keepdims=True)


def affinity(U_bar: np.ndarray, T: np.ndarray) -> np.ndarray:
    """P = softmax over clients of U_bar T^T / sqrt(r): (..., N, r), (..., C, r) -> (..., N, C)."""
    r = U_bar.shape[-1]
    S = np.asarray(U_bar, np.float64) @ np.swapaxes(np.asarray(T, np.float64), -1, -2) / math.sqrt(r)
    return softmax_rows(S)


def random_affinity(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Round 0 and `random_dispatch`: scores S ~ U(0,1) through the same softmax over clients."""
    return softmax_rows(rng.random(shape))


# -------------------------------------------------------------------------------------------- solver
def solve_assignment(P: np.ndarray, expert_choices: int, min_experts: int, max_experts: int) -> np.ndarray:
    """The optimal assignment X (bool) for affinities P: (N, C) -> (N, C), or a batch (M, N, C) -> (M, N, C)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim == 2:
        return solve_assignment(P[None], expert_choices, min_experts, max_experts)[0]
    _, N, C = P.shape
    problem = feasibility_problem(N, expert_choices, C, min_experts, max_experts)
    if problem is not None:
        raise ValueError(f"RSEA has no feasible assignment: {problem}")
    return _Flow(P, expert_choices, min_experts, max_experts).solve()


INF = np.int64(2**61)  # "no arc"; sums of two stay below int64's limit
HALF = INF // 2  # anything above is unreachable
WINDOW = 64  # clients inspected per pointer advance


class _Flow:
    """Successive shortest paths for M independent modules in lock-step.

    State per module: X (N, C) held pairs; H/nh the held clients of each expert (as a short list);
    load (C,); W[a, b] = min over clients c held by b and not by a of Q[b,c] - Q[a,c] (Wc: that client);
    the terminal arc of expert a (a takes its best client with room), read from its preference order with
    two pointers: the best client still below min_experts and the best still below max_experts.
    """

    def __init__(self, P: np.ndarray, k: int, lo: int, hi: int):
        M, N, C = P.shape
        self.M, self.N, self.C, self.k, self.lo, self.hi = M, N, C, k, lo, hi
        F = N * k
        scale = min(2.0**40, 2.0**58 / (F + 2 * N + 4))  # keep every path sum far from int64 overflow
        self.Q = np.round(P * scale).astype(np.int64)  # (M, N, C)
        self.bonus = (F + 1) * math.ceil(scale)  # exceeds any total affinity: lower bounds come first
        self.X = np.zeros((M, N, C), dtype=bool)
        self.H = np.zeros((M, N, k + 1), dtype=np.int64)  # held clients, the first nh[m, a] are valid
        self.nh = np.zeros((M, N), dtype=np.int64)
        self.load = np.zeros((M, C), dtype=np.int64)
        self.W = np.full((M, N, N), INF, dtype=np.int64)
        self.Wc = np.zeros((M, N, N), dtype=np.int64)
        # preference order of every expert (best client first, lowest client index among equals)
        self.order = np.argsort(-self.Q, axis=2, kind="stable")  # (M, N, C)
        self.rank = np.empty_like(self.order)
        np.put_along_axis(self.rank, self.order, np.arange(C)[None, None, :], axis=2)
        self.p_lo = np.zeros((M, N), dtype=np.int64)  # first client in the order below min_experts, not held
        self.p_hi = np.zeros((M, N), dtype=np.int64)  # first client in the order below max_experts, not held
        self.Tt = np.empty((M, N), dtype=np.int64)
        self.Ttc = np.empty((M, N), dtype=np.int64)
        every = np.repeat(np.arange(M), N), np.tile(np.arange(N), M)
        self._refresh_terminal(*every)

    # ---------------------------------------------------------------------------------- terminal arcs
    def _advance(self, ms, as_, pointer, limit):
        """Move `pointer` of (ms, as_) to the first client in the expert's order with load < limit that
        the expert does not hold (C when none)."""
        C = self.C
        while len(ms):
            p = pointer[ms, as_]
            idx = p[:, None] + np.arange(WINDOW)[None, :]  # (R, WINDOW)
            inside = idx < C
            clients = self.order[ms[:, None], as_[:, None], np.minimum(idx, C - 1)]
            ok = inside & (self.load[ms[:, None], clients] < limit) & ~self.X[ms[:, None], as_[:, None], clients]
            found = ok.any(axis=1)
            step = np.where(found, ok.argmax(axis=1), WINDOW)
            pointer[ms, as_] = np.minimum(p + step, C)
            more = ~found & (p + WINDOW < C)
            ms, as_ = ms[more], as_[more]

    def _refresh_terminal(self, ms, as_):
        self._advance(ms, as_, self.p_lo, self.lo)
        self._advance(ms, as_, self.p_hi, self.hi)
        C = self.C
        p_lo, p_hi = self.p_lo[ms, as_], self.p_hi[ms, as_]
        use_lo = p_lo < C
        p = np.where(use_lo, p_lo, p_hi)
        c = self.order[ms, as_, np.minimum(p, C - 1)]
        cost = -self.Q[ms, as_, c] - np.where(use_lo, self.bonus, 0)
        self.Tt[ms, as_] = np.where(p < C, cost, INF)
        self.Ttc[ms, as_] = c

    # ------------------------------------------------------------------------------- expert-graph arcs
    def _recompute(self, ms, xs, bs):
        """W[x, b] from scratch over b's held clients that x does not hold."""
        hb = self.H[ms, bs]  # (R, k+1)
        valid = (np.arange(self.k + 1)[None, :] < self.nh[ms, bs][:, None]) & ~self.X[ms[:, None], xs[:, None], hb]
        v = self.Q[ms[:, None], bs[:, None], hb] - self.Q[ms[:, None], xs[:, None], hb]
        v = np.where(valid, v, INF)
        j = v.argmin(axis=1)
        rows = np.arange(len(ms))
        self.W[ms, xs, bs] = v[rows, j]
        self.Wc[ms, xs, bs] = hb[rows, j]

    def _improve(self, ms, xs, bs, values, clients):
        better = values < self.W[ms, xs, bs]
        ms, xs, bs = ms[better], xs[better], bs[better]
        self.W[ms, xs, bs] = values[better]
        self.Wc[ms, xs, bs] = clients[better]

    # ------------------------------------------------------------------------------------------ steps
    def _shortest_paths(self):
        """Bellman-Ford from the source (arcs to experts with free supply) over the expert graph."""
        M, N = self.M, self.N
        d = np.where(self.nh < self.k, 0, INF)
        pred = np.full((M, N), -1)
        mm, bb = np.meshgrid(np.arange(M), np.arange(N), indexing="ij")
        while True:
            cand = d[:, :, None] + self.W  # (M, a, b): reach b through a
            a = cand.argmin(axis=1)  # (M, b)
            best = cand[mm, a, bb]
            better = (best < d) & (best < HALF)
            if not better.any():
                return d, pred
            d = np.where(better, best, d)
            pred = np.where(better, a, pred)

    def _augment(self):
        M = self.M
        m_all = np.arange(M)
        d, pred = self._shortest_paths()
        total = np.where(d < HALF, d + self.Tt, INF)
        e = total.argmin(axis=1)
        if (total[m_all, e] >= HALF).any():
            raise RuntimeError("RSEA: no augmenting path although the bounds are satisfiable")
        c = self.Ttc[m_all, e]
        # the path, walked back from the sink: the last expert takes c, each predecessor takes a client
        # of its successor, who drops it
        takes, drops = [(m_all, e, c)], []
        ms, cur = m_all, e
        while True:
            p = pred[ms, cur]
            alive = p >= 0
            if not alive.any():
                break
            ms, cur, p = ms[alive], cur[alive], p[alive]
            cc = self.Wc[ms, p, cur]
            takes.append((ms, p, cc))
            drops.append((ms, cur, cc))
            cur = p
        tm, ta, tc = (np.concatenate(v) for v in zip(*takes))
        if drops:
            dm, da, dc = (np.concatenate(v) for v in zip(*drops))
        else:
            dm = da = dc = np.zeros(0, dtype=np.int64)
        self._apply(tm, ta, tc, dm, da, dc, m_all, c)

    def _apply(self, tm, ta, tc, dm, da, dc, m_all, c):
        X, H, nh, Q = self.X, self.H, self.nh, self.Q
        X[tm, ta, tc] = True
        H[tm, ta, nh[tm, ta]] = tc
        nh[tm, ta] += 1
        X[dm, da, dc] = False
        pos = (H[dm, da] == dc[:, None]).argmax(axis=1)
        H[dm, da, pos] = H[dm, da, nh[dm, da] - 1]
        nh[dm, da] -= 1
        self.load[m_all, c] += 1

        # expert-graph arcs whose best client changed hands are recomputed ...
        r, b = np.nonzero(self.Wc[tm, ta, :] == tc[:, None])  # a took c: (a, b) used c
        r2, x = np.nonzero(self.Wc[dm, :, da] == dc[:, None])  # a dropped c: (x, a) used c
        stale = (np.concatenate([tm[r], dm[r2]]), np.concatenate([ta[r], x]), np.concatenate([b, da[r2]]))
        # ... and new pairs become candidates: a took c -> any x not holding c may take it from a
        r, x = np.nonzero(~X[tm, :, tc])
        self._improve(tm[r], x, ta[r], Q[tm[r], ta[r], tc[r]] - Q[tm[r], x, tc[r]], tc[r])
        # a dropped c -> a may take c from any holder b
        r, b = np.nonzero(X[dm, :, dc])
        self._improve(dm[r], da[r], b, Q[dm[r], b, dc[r]] - Q[dm[r], da[r], dc[r]], dc[r])
        if len(stale[0]):
            self._recompute(*stale)

        # terminal arcs to refresh: an expert that took its terminal client, an expert that dropped a client
        # ranked before one of its pointers, and every expert pointing at the filled client once that
        # client reached min_experts (below it the client still has the same room for everyone else)
        back = np.zeros(len(dm), dtype=bool)
        for pointer, limit in ((self.p_lo, self.lo), (self.p_hi, self.hi)):
            rk = self.rank[dm, da, dc]
            moved = (self.load[dm, dc] < limit) & (rk < pointer[dm, da])
            pointer[dm[moved], da[moved]] = rk[moved]
            back |= moved
        took_terminal = self.Ttc[tm, ta] == tc
        r, a = np.nonzero((self.Ttc == c[:, None]) & (self.load[m_all, c] >= self.lo)[:, None])
        self._refresh_terminal(np.concatenate([tm[took_terminal], dm[back], r]),
                               np.concatenate([ta[took_terminal], da[back], a]))

    def solve(self) -> np.ndarray:
        for _ in range(self.N * self.k):
            self._augment()
        return self.X


def assignment_lists(X: np.ndarray, clients: list[int]) -> dict[int, list[int]]:
    """X (N x C, columns in the order of `clients`) -> {client id: ascending expert ids}."""
    return {cid: np.flatnonzero(X[:, j]).tolist() for j, cid in enumerate(clients)}
