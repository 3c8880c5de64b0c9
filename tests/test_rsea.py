"""RSEA's assignment program (algorithms/rsea.py): constraints, optimality, determinism, feasibility."""

import itertools

import numpy as np
import pytest
from scipy.optimize import LinearConstraint, milp

from fedmole.algorithms import rsea


def _constraints_hold(X, k, lo, hi):
    return (X.sum(axis=-1) == k).all() and (X.sum(axis=-2) >= lo).all() and (X.sum(axis=-2) <= hi).all()


def _brute_force(P, k, lo, hi):
    N, C = P.shape
    rows = [np.array(r) for r in itertools.product([0, 1], repeat=C) if sum(r) == k]  # each expert's choice
    best = -1.0
    for choice in itertools.product(rows, repeat=N):
        X = np.stack(choice)
        if (X.sum(0) >= lo).all() and (X.sum(0) <= hi).all():
            best = max(best, float((P * X).sum()))
    return best


def _milp(P, k, lo, hi):
    N, C = P.shape
    A = np.vstack([np.kron(np.eye(N), np.ones((1, C))), np.kron(np.ones((1, N)), np.eye(C))])
    res = milp(-P.ravel(), integrality=np.ones(N * C), bounds=(0, 1),
               constraints=LinearConstraint(A, np.r_[np.full(N, k), np.full(C, lo)], np.r_[np.full(N, k), np.full(C, hi)]))
    return -res.fun


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    N, C, k, lo, hi = 4, 3, 2, 2, 3
    P = rsea.affinity(rng.normal(size=(N, 4)) * 2, rng.normal(size=(C, 4)))
    X = rsea.solve_assignment(P, k, lo, hi)
    assert X.dtype == bool and _constraints_hold(X, k, lo, hi)
    assert (P * X).sum() == pytest.approx(_brute_force(P, k, lo, hi), abs=1e-9)


@pytest.mark.parametrize("sharpness", [0.0, 1.0, 30.0])
def test_matches_an_independent_mip_solver_and_meets_every_constraint(sharpness):
    """Including sharp affinities (most scores underflow to 0: massive ties)."""
    rng = np.random.default_rng(1)
    N, C, k, lo, hi = 12, 9, 3, 2, 5
    P = rsea.random_affinity(rng, (N, C)) if sharpness == 0 else rsea.affinity(
        rng.normal(size=(N, 8)) * sharpness, rng.normal(size=(C, 8)))
    X = rsea.solve_assignment(P, k, lo, hi)
    assert _constraints_hold(X, k, lo, hi)
    assert (P * X).sum() >= _milp(P, k, lo, hi) - 1e-7


def test_a_batch_of_modules_equals_solving_each_alone_and_is_deterministic():
    rng = np.random.default_rng(2)
    P = rsea.affinity(rng.normal(size=(5, 10, 4)), rng.normal(size=(5, 7, 4)))
    batch = rsea.solve_assignment(P, 3, 2, 6)
    for m in range(5):
        assert np.array_equal(batch[m], rsea.solve_assignment(P[m], 3, 2, 6))
    assert np.array_equal(batch, rsea.solve_assignment(P.copy(), 3, 2, 6))


def test_equal_scores_give_a_fixed_lowest_index_assignment():
    X = rsea.solve_assignment(np.full((4, 4), 0.25), 2, 2, 2)
    assert _constraints_hold(X, 2, 2, 2)
    assert np.array_equal(X, rsea.solve_assignment(np.full((4, 4), 0.25), 2, 2, 2))


def test_experts_follow_the_clients_whose_data_embedding_matches_theirs():
    """Two client groups with opposite data embeddings; experts 0-2 point one way, 3-5 the other."""
    T = np.array([[4.0, 0], [4.0, 0], [-4.0, 0], [-4.0, 0]])
    U = np.array([[4.0, 0]] * 3 + [[-4.0, 0]] * 3)
    X = rsea.solve_assignment(rsea.affinity(U, T), 2, 2, 4)
    assert X[:3, :2].all() and not X[:3, 2:].any()
    assert X[3:, 2:].all() and not X[3:, :2].any()


def test_homogeneous_bounds_give_every_client_the_same_count():
    rng = np.random.default_rng(3)
    X = rsea.solve_assignment(rsea.random_affinity(rng, (6, 4)), 2, 3, 3)
    assert (X.sum(0) == 3).all()


@pytest.mark.parametrize("N,k,C,lo,hi,homo,match", [
    (30, 2, 40, 2, 8, False, r"below clients\*min_experts \(40\*2=80\).*expert_choices to >= 3"),
    (30, 2, 3, 2, 8, False, r"exceeds clients\*max_experts \(3\*8=24\).*max_experts to >= 20"),
    (4, 5, 3, 1, 8, False, "only 3 clients"),
    (30, 2, 7, 2, 8, True, "multiple of the clients per round"),
])
def test_infeasible_numbers_are_explained(N, k, C, lo, hi, homo, match):
    problem = rsea.feasibility_problem(N, k, C, lo, hi, homo)
    assert problem is not None and __import__("re").search(match, problem)
    if not homo:
        with pytest.raises(ValueError, match="no feasible assignment"):
            rsea.solve_assignment(np.full((N, C), 1.0 / C), k, lo, hi)


def test_feasible_bounds_are_exactly_the_solvable_ones():
    rng = np.random.default_rng(4)
    for N, k, C, lo, hi in itertools.product([3, 5], [1, 2, 3], [2, 3, 4], [1, 2], [2, 4]):
        if lo > hi:
            continue
        ok = rsea.feasibility_problem(N, k, C, lo, hi) is None
        if ok:
            assert _constraints_hold(rsea.solve_assignment(rng.random((N, C)), k, lo, hi), k, lo, hi)
        else:
            assert k > C or N * k < C * lo or N * k > C * hi
