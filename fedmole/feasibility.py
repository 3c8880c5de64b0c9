"""Whether the numbers of a config admit a solution: the pure arithmetic that the schema (config.py) checks
when a config is loaded and the methods rely on when they run.

It sits below config.py so that the schema can refuse an impossible setting with the method's own message
without importing the methods (algorithms/ sits above config): the rank tiers of the rank-heterogeneous
baselines (algorithms/rank_tiers.py) and RSEA's assignment program (algorithms/rsea.py).
"""

from __future__ import annotations

import math


# ------------------------------------------------------------------------------------------ rank tiers
def tier_rank_map(rank: int, K: int, values: list[int]) -> dict[int, int]:
    """{k: rank * k / K} for every tier value k; ValueError naming the keys when one is not a positive integer."""
    bad = [k for k in values if (rank * k) % K or rank * k < K]
    if bad:
        need = math.lcm(*(K // math.gcd(k, K) for k in values))
        raise ValueError(
            f"algorithm.rank={rank} with tier values {sorted(values, reverse=True)} (K={K}) gives ranks rank*k/K = "
            f"{', '.join(f'{rank * k / K:g}' for k in bad)} for k = {bad}, which are not positive integers; set "
            f"algorithm.rank to a multiple of {need}, or choose tiers.levels / tiers.per_client so that every "
            f"rank*k/K is a whole number"
        )
    return {k: rank * k // K for k in values}


# ---------------------------------------------------------------------------------- RSEA assignment
def feasibility_problem(num_experts: int, expert_choices: int, clients: int, min_experts: int, max_experts: int,
                        homogeneous: bool = False) -> str | None:
    """Why RSEA's assignment program has no solution for these numbers, or None when it has one.

    With unit pair capacities the program is feasible exactly when k_c <= C and
    C*min_experts <= N*k_c <= C*max_experts: the cyclic assignment (expert e takes clients e*k_c ...
    e*k_c + k_c - 1 modulo C) gives every client floor or ceil of N*k_c/C experts.
    """
    N, k, C = num_experts, expert_choices, clients
    F = N * k
    if k > C:
        return (f"each expert picks expert_choices={k} distinct clients but a round has only {C} clients; "
                f"lower expert_choices to <= {C}")
    if homogeneous:
        if F % C:
            return (f"algorithm.homogeneous needs num_experts*expert_choices ({N}*{k}={F}) to be a multiple of "
                    f"the clients per round ({C}); nearest feasible expert_choices: {_multiple_choices(N, C, k)}")
        per_client = F // C
        if not min_experts <= per_client <= max_experts:
            return (f"algorithm.homogeneous gives every client {F}/{C}={per_client} experts, outside "
                    f"[min_experts={min_experts}, max_experts={max_experts}]")
        return None
    if F < C * min_experts:
        fixes = [f"raise expert_choices to >= {math.ceil(C * min_experts / N)}",
                 f"raise num_experts to >= {math.ceil(C * min_experts / k)}"]
        return (f"num_experts*expert_choices ({N}*{k}={F}) is below clients*min_experts ({C}*{min_experts}="
                f"{C * min_experts}), so some client would get fewer than min_experts experts; "
                + ", or ".join(fixes))
    if F > C * max_experts:
        fixes = [f"raise max_experts to >= {math.ceil(F / C)}"]
        if C * max_experts // N >= 1:
            fixes.append(f"lower expert_choices to <= {C * max_experts // N}")
        fixes.append(f"lower num_experts to <= {C * max_experts // k}")
        return (f"num_experts*expert_choices ({N}*{k}={F}) exceeds clients*max_experts ({C}*{max_experts}="
                f"{C * max_experts}), so the experts cannot all be placed; " + ", or ".join(fixes))
    return None


def _multiple_choices(N: int, C: int, k: int) -> str:
    step = C // math.gcd(N, C)  # the smallest k' with C | N*k'
    below, above = (k // step) * step, (k // step + 1) * step
    return " or ".join(str(v) for v in (below, above) if 1 <= v <= C) or "none (more clients than N*k_c allows)"
