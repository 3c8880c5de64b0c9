"""Statistics of the accuracy suite (issue 15): intervals over seeds, methods paired example by example, a
stratified paired bootstrap, and a verdict on each paper claim.

A run directory `<root>/<scenario>/<run>/seed<N>/` holds summary.json, metrics.jsonl and, where the preset keeps
them, outcomes.jsonl: one record per test example per evaluated (model label, round), whose `value` is the
example's score x100. A *method* is one run plus one model label (`fedit_ft` = run `fedit`, label
`personalized`). Its test score is the one summary.json reports: the unweighted mean over clients of the mean
of each client's examples' values,

    score = 1/C sum_c 1/n_c sum_{i in c} value_i.

Tier scenarios: where the label M of a method also has labels `M_k{k}` (FLAME, HetLoRA, FlexLoRA: `global_k4`),
every client is scored at its own budget, the smallest one it was evaluated at (M itself is the top tier, `K`);
the method's score pools the clients at their own budgets, and each budget's score is the mean over its clients.

Paired difference of methods A and B (same scenario, same seeds, same test examples): d = value_A - value_B per
(seed, client, uid), each method at its own selected (or last) round. Its statistic keeps the score's client
mean and averages the seeds,

    D = 1/S sum_s 1/C_s sum_c 1/n_sc sum_{i in (s, c)} d_i,

and its 95 % interval is the percentile interval of D over B bootstrap samples that redraw examples with
replacement within each (seed, client) stratum.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from scipy import stats as sps

TOP = "K"  # budget of a client scored under the method's own label M (the top tier)
ROUND_KINDS = ("selected", "last")  # round selected on validation, last round
HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell at this power"
CONVERGED_BELOW = 0.10  # relative change of the mean training loss between the last two rounds

# The paper claims the suite checks. `a` and `b` are methods of the scenario's method table; `b` may be
# {"best_of": [...]}, the candidate with the highest mean over seeds (at the same round kind). `paper`: the
# direction the paper reports, ">" (a scores higher) or "<". `per_budget`: also at each budget of a tier scenario.
# A claim is checked in every scenario whose method table has `a` and `b` (or a candidate).
CLAIMS = [
    {"id": "fedamole_vs_best_baseline", "a": "fedamole", "b": {"best_of": ["local", "fedit", "fedit_ft", "fdlora"]},
     "paper": ">", "says": "FedAMoLE beats the best baseline"},
    {"id": "fedamole_vs_fedamole_r", "a": "fedamole", "b": "fedamole_r", "paper": ">",
     "says": "RSEA's assignment beats a static random architecture (FedAMoLE-R)"},
    {"id": "fedamole_vs_fedamole_rd", "a": "fedamole", "b": "fedamole_rd", "paper": ">",
     "says": "RSEA's affinity-driven re-assignment beats a random re-assignment every round (FedAMoLE-RD)"},
    {"id": "fedamole_r_vs_fedit_ft", "a": "fedamole_r", "b": "fedit_ft", "paper": ">",
     "says": "a mixture of LoRA experts, even randomly assigned, beats one fine-tuned LoRA"},
    {"id": "fedamole_vs_fedit_ft", "a": "fedamole", "b": "fedit_ft", "paper": ">",
     "says": "FedAMoLE beats FedIT-FT"},
    {"id": "fedamole_vs_fedamole_s", "a": "fedamole", "b": "fedamole_s", "paper": ">",
     "says": "the shared expert helps (FedAMoLE-S has none)"},
    {"id": "flame_vs_hetlora", "a": "flame", "b": "hetlora", "paper": ">", "per_budget": True,
     "says": "FLAME beats HetLoRA"},
    {"id": "flame_vs_flexlora", "a": "flame", "b": "flexlora", "paper": ">", "per_budget": True,
     "says": "FLAME beats FlexLoRA"},
    {"id": "flame_vs_no_rescaler", "a": "flame", "b": "flame_no_rescaler", "paper": ">", "per_budget": True,
     "says": "the rescaler helps"},
    {"id": "flame_vs_t0", "a": "flame", "b": "flame_t0", "paper": ">", "per_budget": True,
     "says": "activation-aware aggregation (t > 0) beats data-size weighting (t = 0)"},
]


class ProtocolError(ValueError):
    """The run artefacts break the protocol (outcomes that disagree with summary.json, unpaired examples...)."""


# ---------------------------------------------------------------- intervals over seeds

def t_interval(values, level: float = 0.95) -> dict:
    """Mean and Student-t interval (n - 1 degrees of freedom) of per-seed values: mean ± t * sd / sqrt(n).
    With one value there is no interval: `low` and `high` are None and `note` says so."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "n": 1,
                "note": "one seed: no interval"}
    half = float(sps.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": int(x.size)}


# ---------------------------------------------------------------- reading one run

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def label_section(summary: dict, label: str) -> dict | None:
    """summary.json's selection and test results for a model label (`personalized`, `global`, `global_k2`...)."""
    if label in ("personalized", "global"):
        return summary.get(label)
    return (summary.get("other_models") or {}).get(label)


def budget_labels(summary: dict, model: str) -> dict[str, str]:
    """Budget -> label for a method's label M: {K: M} plus {k: M_k{k}} for the tier-wise labels summary.json has."""
    out = {TOP: model} if label_section(summary, model) else {}
    for label, sec in (summary.get("other_models") or {}).items():
        m = re.fullmatch(re.escape(model) + r"_k(\d+)", label)
        if m and sec:
            out[m.group(1)] = label
    return out


def budget_order(budget: str) -> tuple:
    """Sort key: the top tier K first, then budgets from high to low."""
    return (0, 0) if budget == TOP else (1, -int(budget))


def index_outcomes(outcomes: list[dict], where: str = "outcomes.jsonl") -> dict[tuple, dict[int, dict[str, float]]]:
    """(label, round) -> client -> uid -> value, for the test split. A repeated example is an error."""
    idx: dict[tuple, dict[int, dict[str, float]]] = {}
    for o in outcomes:
        if o.get("split", "test") != "test":
            continue
        per = idx.setdefault((o["model"], int(o["round"])), {}).setdefault(int(o["client"]), {})
        uid = str(o["uid"])
        if uid in per:
            raise ProtocolError(f"{where}: example {uid!r} of client {o['client']} appears twice for model "
                                f"{o['model']!r} at round {o['round']}")
        per[uid] = float(o["value"])
    return idx


def client_means(examples: dict[int, dict[str, float]]) -> dict[int, float]:
    return {c: sum(v.values()) / len(v) for c, v in examples.items() if v}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def check_outcomes(run_dir: Path, summary: dict, index: dict) -> None:
    """Every label's score recomputed from outcomes.jsonl must equal summary.json's, per client and mean, at the
    selected and the last round; raises ProtocolError naming the run, label, round and both numbers."""
    for label in sorted({label for label, _ in index}):
        sec = label_section(summary, label)
        if sec is None:
            raise ProtocolError(f"{run_dir}: outcomes.jsonl has model {label!r}, which summary.json does not report")
        for kind, rkey, mkey, ckey in (("selected", "selected_round", "mean", "per_client"),
                                       ("last", "last_round", "last_mean", "last_per_client")):
            rnd = sec[rkey]
            if (label, rnd) not in index:
                raise ProtocolError(f"{run_dir}: outcomes.jsonl has no test examples of {label!r} at round {rnd}, "
                                    f"its {kind} round in summary.json")
            per = client_means(index[(label, rnd)])
            mean = sum(per.values()) / len(per)
            if not _close(mean, sec[mkey]):
                raise ProtocolError(f"{run_dir}: {label!r} at round {rnd} ({kind}): the mean over clients of "
                                    f"outcomes.jsonl's values is {mean!r}, summary.json says {sec[mkey]!r}")
            reported = {int(c): v for c, v in (sec.get(ckey) or {}).items()}
            if reported and set(reported) != set(per):
                raise ProtocolError(f"{run_dir}: {label!r} at round {rnd}: outcomes.jsonl has clients {sorted(per)}, "
                                    f"summary.json {sorted(reported)}")
            for c, v in reported.items():
                if not _close(per[c], v):
                    raise ProtocolError(f"{run_dir}: {label!r} at round {rnd}, client {c}: outcomes.jsonl gives "
                                        f"{per[c]!r}, summary.json {v!r}")


def train_loss_curve(metrics: list[dict]) -> list[dict]:
    """Mean over clients of the local training loss, per round: [{"round", "loss"}]."""
    by_round: dict[int, list[float]] = {}
    for r in metrics:
        is_train_loss = (r.get("model"), r.get("split"), r.get("metric")) == ("local", "train", "loss")
        if is_train_loss and r.get("client") is not None:
            by_round.setdefault(int(r["round"]), []).append(float(r["value"]))
    return [{"round": rnd, "loss": sum(v) / len(v)} for rnd, v in sorted(by_round.items())]


def load_method_run(run_dir: Path, model: str | None = None) -> dict | None:
    """One method's view of a finished run (None while summary.json is missing):
    `record`: the JSON entry of the results' `runs` list (scores, per-client scores, budgets, train loss...);
    `examples`: round kind -> {(client, uid): value}, each client at its own budget's label (None without
    outcomes.jsonl); `budget_of`: client -> budget."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    model = model or summary["headline"]
    labels = budget_labels(summary, model)
    if TOP not in labels:
        raise ProtocolError(f"{run_dir}: summary.json has no test results for model {model!r} "
                            f"(it has {[m for m in ('personalized', 'global') if summary.get(m)]})")
    index = None
    if (run_dir / "outcomes.jsonl").is_file():
        index = index_outcomes(read_jsonl(run_dir / "outcomes.jsonl"), str(run_dir / "outcomes.jsonl"))
        check_outcomes(run_dir, summary, index)
    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []

    budget_of: dict[int, str] = {}
    for b in sorted(labels, key=budget_order):  # top tier first: a smaller budget a client was evaluated at wins
        for c in label_section(summary, labels[b])["per_client"]:
            budget_of[int(c)] = b
    rounds = {"selected": ("selected_round", "mean", "per_client"),
              "last": ("last_round", "last_mean", "last_per_client")}
    scores, examples = {}, ({} if index is not None else None)
    for kind, (rkey, _, ckey) in rounds.items():
        scores[kind] = {}
        for c, b in budget_of.items():
            per_client = label_section(summary, labels[b])[ckey]
            if str(c) not in per_client:
                raise ProtocolError(f"{run_dir}: summary.json's {labels[b]!r} has no {ckey} score of client {c}")
            scores[kind][c] = float(per_client[str(c)])
        if index is not None:
            examples[kind] = {}
            for c, b in budget_of.items():
                rnd = label_section(summary, labels[b])[rkey]
                if c not in index.get((labels[b], rnd), {}):
                    raise ProtocolError(f"{run_dir}: outcomes.jsonl has no test examples of client {c} for "
                                        f"{labels[b]!r} at round {rnd}")
                examples[kind].update({(c, uid): v for uid, v in index[(labels[b], rnd)][c].items()})
    top = label_section(summary, model)
    tiered = len(labels) > 1

    def headline(kind):  # one label: summary.json's own number; tiers: clients pooled at their own budgets
        return float(top[rounds[kind][1]]) if not tiered else _mean(scores[kind].values())

    record = {
        "model": model, "metric": summary.get("metric"),
        "selected_round": top["selected_round"], "last_round": top["last_round"],
        "test": headline("selected"), "test_last": headline("last"),
        "per_client": {str(c): v for c, v in sorted(scores["selected"].items())},
        "per_client_last": {str(c): v for c, v in sorted(scores["last"].items())},
        "test_examples_per_client": ({str(c): sum(1 for cc, _ in examples["selected"] if cc == c)
                                      for c in sorted(budget_of)} if index is not None else None),
        "train_loss": train_loss_curve(metrics),
        "wall_seconds": summary.get("wall_seconds"), "cpu_seconds": summary.get("cpu_seconds"),
        "state_digest": summary.get("state_digest"), "outcomes": index is not None,
    }
    if tiered:
        record["budget_of_client"] = {str(c): b for c, b in sorted(budget_of.items())}
        record["budgets"] = {b: {"label": labels[b],
                                 "selected_round": label_section(summary, labels[b])["selected_round"],
                                 "last_round": label_section(summary, labels[b])["last_round"],
                                 "test": _mean(v for c, v in scores["selected"].items() if budget_of[c] == b),
                                 "test_last": _mean(v for c, v in scores["last"].items() if budget_of[c] == b),
                                 "clients": sorted(c for c in budget_of if budget_of[c] == b)}
                             for b in sorted(labels, key=budget_order) if b in budget_of.values()}
        if any(b != TOP for c, b in budget_of.items() if str(c) in top["per_client"]):
            # the global model was also evaluated on lower-tier clients: its score on all of them
            record["full_compute"] = {"test": float(top["mean"]), "test_last": float(top["last_mean"]),
                                      "clients": sorted(int(c) for c in top["per_client"])}
    return {"record": record, "examples": examples, "budget_of": budget_of}


def _mean(values) -> float:
    v = list(values)
    return sum(v) / len(v)


# ---------------------------------------------------------------- pairing and the bootstrap

def method_examples(runs: dict[int, dict], kind: str, budget: str | None = None) -> dict[tuple, float]:
    """(seed, client, uid) -> value over a method's runs by seed, at the round kind (`selected` / `last`);
    `budget` keeps only the clients of that budget. Runs without outcomes raise."""
    out = {}
    for seed, run in sorted(runs.items()):
        if run["examples"] is None:
            raise ProtocolError(f"seed {seed}: the run has no outcomes.jsonl, so it cannot be paired")
        out.update({(seed, c, uid): v for (c, uid), v in run["examples"][kind].items()
                    if budget is None or run["budget_of"][c] == budget})
    return out


def paired_differences(a: dict[tuple, float], b: dict[tuple, float], names: tuple[str, str] = ("A", "B")
                       ) -> dict[tuple, float]:
    """value_A - value_B per (seed, client, uid). The two methods must have been tested on exactly the same
    examples; otherwise ProtocolError says how many keys each lacks and shows a few."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ProtocolError(
            f"{names[0]} and {names[1]} were not tested on the same examples, so they cannot be paired: "
            f"{len(only_a)} (seed, client, uid) keys only in {names[0]} (e.g. {only_a[:3]}), {len(only_b)} only in "
            f"{names[1]} (e.g. {only_b[:3]}); both must use the same seeds, partition and test split")
    return {k: a[k] - b[k] for k in sorted(a)}


def client_mean_statistic(diffs: dict[tuple, float]) -> float:
    """D = mean over seeds of the mean over clients of the mean over the client's examples."""
    strata, weights = _strata(diffs)
    return float(sum(w * d.mean() for d, w in zip(strata, weights)))


def _strata(diffs: dict[tuple, float]) -> tuple[list[np.ndarray], list[float]]:
    """The (seed, client) strata in key order and their weights 1 / (S * C_s)."""
    groups: dict[tuple, list[float]] = {}
    for (seed, client, _), d in sorted(diffs.items()):
        groups.setdefault((seed, client), []).append(d)
    seeds = sorted({s for s, _ in groups})
    clients = {s: sum(1 for t, _ in groups if t == s) for s in seeds}
    return ([np.asarray(v) for v in groups.values()],
            [1.0 / (len(seeds) * clients[s]) for s, _ in groups])


def _resampled_means(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_boot resamples (with replacement) of d, drawn in blocks of about 2M indices."""
    out = np.empty(n_boot)
    rows = max(1, 2_000_000 // d.size)
    for start in range(0, n_boot, rows):
        m = min(rows, n_boot - start)
        out[start:start + m] = d[rng.integers(0, d.size, size=(m, d.size), dtype=np.int32)].mean(axis=1)
    return out


def paired_bootstrap(diffs: dict[tuple, float], n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Point estimate and percentile interval of D (see the module doc) from n_boot resamples within each
    (seed, client) stratum, seeded. Returns diff, ci95 [low, high], n (examples), n_seeds, n_clients (strata,
    summed over seeds) and whether the interval excludes zero."""
    if not diffs:
        raise ValueError("paired_bootstrap needs at least one paired example")
    strata, weights = _strata(diffs)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for d, w in zip(strata, weights):
        boot += w * _resampled_means(d, n_boot, rng)
    low, high = (float(x) for x in np.percentile(boot, [50 * (1 - level), 50 * (1 + level)]))
    return {"diff": client_mean_statistic(diffs), "ci95": [low, high], "n": len(diffs),
            "n_seeds": len({k[0] for k in diffs}), "n_clients": len(strata), "excludes_zero": low > 0 or high < 0}


def verdict(low: float, high: float, paper: str = ">") -> str:
    """`holds` when the interval excludes zero in the paper's direction, `does not hold` when it excludes zero
    the other way, else `cannot tell at this power`."""
    sign = 1 if paper == ">" else -1
    if sign * low > 0 and sign * high > 0:
        return HOLDS
    if sign * low < 0 and sign * high < 0:
        return DOES_NOT_HOLD
    return CANNOT_TELL


# ---------------------------------------------------------------- claims and convergence

def best_of(candidates: list[str], by_method: dict[str, dict[int, dict]], kind: str) -> str | None:
    """The candidate with the highest mean over its seeds of the headline test score at the round kind."""
    key = "test" if kind == "selected" else "test_last"
    means = {m: _mean(r["record"][key] for r in by_method[m].values()) for m in candidates if by_method.get(m)}
    return max(means, key=means.get) if means else None


def check_claim(claim: dict, by_method: dict[str, dict[int, dict]], budget: str | None, n_boot: int = 10_000,
                seed: int = 0) -> dict:
    """One claim in one scenario (budget None: every client at its own budget) at both round kinds.
    by_method: method -> seed -> load_method_run(...). Methods are paired on the seeds both have."""
    out = {}
    for kind in ROUND_KINDS:
        b = claim["b"] if isinstance(claim["b"], str) else best_of(claim["b"]["best_of"], by_method, kind)
        ra, rb = by_method.get(claim["a"]) or {}, by_method.get(b) or {}
        seeds = sorted(ra.keys() & rb.keys())
        res = {"b": b, "seeds": seeds}
        if not seeds:
            out[kind] = {**res, "diff": None, "ci95": None, "n": 0, "verdict": "no runs to pair"}
            continue
        ra, rb = {s: ra[s] for s in seeds}, {s: rb[s] for s in seeds}
        if any(r["examples"] is None for r in (*ra.values(), *rb.values())):
            out[kind] = {**res, "diff": None, "ci95": None, "n": 0, "verdict": "no per-example outcomes"}
            continue
        for s in seeds:
            if ra[s]["budget_of"] != rb[s]["budget_of"]:
                raise ProtocolError(f"seed {s}: {claim['a']} and {b} put the clients in different budgets "
                                    f"({ra[s]['budget_of']} vs {rb[s]['budget_of']})")
        diffs = paired_differences(method_examples(ra, kind, budget), method_examples(rb, kind, budget),
                                   (claim["a"], b))
        if not diffs:
            out[kind] = {**res, "diff": None, "ci95": None, "n": 0, "verdict": "no clients at this budget"}
            continue
        boot = paired_bootstrap(diffs, n_boot, seed)
        out[kind] = {**res, **boot, "verdict": verdict(*boot["ci95"], claim["paper"])}
    return out


def applies(claim: dict, methods: list[str]) -> bool:
    bs = [claim["b"]] if isinstance(claim["b"], str) else claim["b"]["best_of"]
    return claim["a"] in methods and any(b in methods for b in bs)


def check_claims(scenario: str, by_method: dict[str, dict[int, dict]], methods: list[str], claims: list[dict],
                 n_boot: int = 10_000, seed: int = 0) -> list[dict]:
    """Every claim that applies to a scenario's method table; per-budget claims also at each budget that the
    claim's first method has in any seed ("budget": None is all clients at their own budgets)."""
    out = []
    for claim in claims:
        if not applies(claim, methods):
            continue
        budgets = [None]
        if claim.get("per_budget"):
            seen = {b for r in (by_method.get(claim["a"]) or {}).values() for b in r["budget_of"].values()}
            if len(seen) > 1:
                budgets += sorted(seen, key=budget_order)
        for budget in budgets:
            res = check_claim(claim, by_method, budget, n_boot, seed)
            b_rule = None if isinstance(claim["b"], str) else "best of " + ", ".join(claim["b"]["best_of"])
            out.append({"id": claim["id"], "scenario": scenario, "a": claim["a"], "b": res["selected"]["b"],
                        "b_rule": b_rule, "budget": budget, "paper": claim["paper"], "says": claim["says"], **res})
    return out


def convergence(curves: dict[int, list[dict]], threshold: float = CONVERGED_BELOW) -> dict:
    """Relative change of the mean training loss between the last two rounds, (L_R - L_{R-1}) / L_{R-1}, per
    seed; `rel_change` is the mean over seeds of its absolute value and `converged` whether that is below the
    threshold (None where no seed has two rounds)."""
    per_seed = {}
    for seed, curve in sorted(curves.items()):
        if len(curve) >= 2 and curve[-2]["loss"]:
            per_seed[str(seed)] = (curve[-1]["loss"] - curve[-2]["loss"]) / curve[-2]["loss"]
    rounds = max((len(c) for c in curves.values()), default=0)
    if not per_seed:
        return {"rel_change": None, "signed": None, "per_seed": {}, "converged": None, "threshold": threshold,
                "rounds": rounds}
    rel = _mean(abs(v) for v in per_seed.values())
    return {"rel_change": rel, "signed": _mean(per_seed.values()), "per_seed": per_seed,
            "converged": rel < threshold, "threshold": threshold, "rounds": rounds}
