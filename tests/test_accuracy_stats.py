"""Statistics of the accuracy suite (benchmarks/accuracy/stats.py, report.py) on synthetic run directories:
intervals over seeds, pairing of examples across methods, the stratified paired bootstrap, claims, partial
suites and the check of outcomes.jsonl against summary.json. No model runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.accuracy.report import collect, plan_methods, write_report
from benchmarks.accuracy.stats import (CANNOT_TELL, CLAIMS, DOES_NOT_HOLD, HOLDS, ProtocolError, check_claim,
                                       client_mean_statistic, convergence, load_method_run, method_examples,
                                       paired_bootstrap, paired_differences, t_interval, verdict)

# ---------------------------------------------------------------- synthetic runs


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def write_run(run_dir: Path, evals: dict, *, headline: str, selected: dict | None = None,
              loss=(2.0, 1.5, 1.45), outcomes: bool = True, summary_patch=None) -> Path:
    """A run directory as fedmole writes it. evals: label -> round -> client -> {uid: value}; selected: label ->
    round selected on validation (default: the last round)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    selected = selected or {}
    summary = {"metric": "score", "headline": headline, "personalized": None, "global": None,
               "wall_seconds": 12.5, "cpu_seconds": 20.0, "state_digest": f"digest-{run_dir.name}"}
    other, out, clients = {}, [], set()
    for label, by_round in evals.items():
        last = max(by_round)
        sel = selected.get(label, last)

        def per_client(r):
            return {str(c): _mean(ex.values()) for c, ex in by_round[r].items()}

        sec = {"selected_round": sel, "val": 50.0, "mean": _mean(per_client(sel).values()),
               "per_client": per_client(sel), "last_round": last, "last_mean": _mean(per_client(last).values()),
               "last_per_client": per_client(last)}
        if label in ("personalized", "global"):
            summary[label] = sec
        else:
            other[label] = sec
        for r in sorted({sel, last}):
            for c, ex in by_round[r].items():
                clients.add(c)
                out += [{"round": r, "model": label, "client": c, "split": "test", "uid": uid, "gold": 1,
                         "pred": 1 if v else 0, "choice_scores": None, "correct": int(v > 0), "rouge_l": None,
                         "value": v} for uid, v in ex.items()]
    if other:
        summary["other_models"] = other
    summary.update(summary_patch or {})
    (run_dir / "summary.json").write_text(json.dumps(summary))
    metrics = [{"round": r, "client": c, "model": "local", "split": "train", "metric": "loss", "value": L}
               for r, L in enumerate(loss, 1) for c in sorted(clients)]
    metrics += [{"round": r, "client": None, "model": headline, "split": "val", "metric": "score", "value": 50.0}
                for r in range(1, len(loss) + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if outcomes:
        (run_dir / "outcomes.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))
    return run_dir


def examples(values_by_client: dict[int, list[float]]) -> dict[int, dict[str, float]]:
    return {c: {f"c{c}-{i}": float(v) for i, v in enumerate(vs)} for c, vs in values_by_client.items()}


def both_rounds(ex, last=None):
    """The same examples at rounds 1 and 2 (or `last` at round 2)."""
    return {1: ex, 2: last if last is not None else ex}


# ---------------------------------------------------------------- intervals over seeds


def test_t_interval_matches_the_hand_computed_case():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 df) = 4.302653
    assert iv["mean"] == pytest.approx(2.0) and iv["n"] == 3
    assert iv["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (iv["low"], iv["high"]) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)))


def test_t_interval_of_one_seed_has_no_interval_and_says_so():
    iv = t_interval([7.5])
    assert iv["mean"] == 7.5 and iv["low"] is None and iv["high"] is None and "no interval" in iv["note"]


# ---------------------------------------------------------------- the bootstrap


def test_identical_differences_give_a_zero_width_interval_at_that_value():
    diffs = {(s, c, f"u{i}"): 3.25 for s in (1, 2) for c in (0, 1, 2) for i in range(7)}
    res = paired_bootstrap(diffs, n_boot=500, seed=1)
    assert res["diff"] == pytest.approx(3.25)
    assert res["ci95"][0] == res["ci95"][1] == pytest.approx(3.25)
    assert res["excludes_zero"] and res["n"] == 42 and res["n_seeds"] == 2 and res["n_clients"] == 6


def test_constant_strata_give_the_exact_client_then_seed_mean():
    # seed 1: client 0 has 4 examples at 1, client 1 one example at 10 -> 5.5; seed 2: 2 examples at 4, 3 at -2 -> 1
    diffs = {(1, 0, f"a{i}"): 1.0 for i in range(4)} | {(1, 1, "b"): 10.0}
    diffs |= {(2, 0, f"c{i}"): 4.0 for i in range(2)} | {(2, 1, f"d{i}"): -2.0 for i in range(3)}
    res = paired_bootstrap(diffs, n_boot=300, seed=0)
    assert res["diff"] == pytest.approx((5.5 + 1.0) / 2)
    assert res["ci95"] == pytest.approx([3.25, 3.25])  # resampling within a constant stratum changes nothing


def test_the_statistic_is_the_client_mean_not_the_example_mean_on_unbalanced_clients():
    # client 0: one example, difference 100; client 1: nine examples, difference 0
    diffs = {(1, 0, "x"): 100.0} | {(1, 1, f"y{i}"): 0.0 for i in range(9)}
    assert _mean(diffs.values()) == pytest.approx(10.0)  # the example mean
    assert client_mean_statistic(diffs) == pytest.approx(50.0)
    assert paired_bootstrap(diffs, n_boot=200)["diff"] == pytest.approx(50.0)


def test_the_interval_shrinks_with_more_examples():
    rng = np.random.default_rng(0)

    def width(n):
        diffs = {(s, c, f"u{i}"): float(v) for s in (1, 2, 3) for c in (0, 1)
                 for i, v in enumerate(100 * (rng.random(n) < 0.5) - 100 * (rng.random(n) < 0.4))}
        lo, hi = paired_bootstrap(diffs, n_boot=1000, seed=0)["ci95"]
        return hi - lo

    small, large = width(20), width(2000)
    assert large < small / 5  # about 1 / sqrt(100)


def test_the_bootstrap_seed_makes_it_reproducible():
    rng = np.random.default_rng(3)
    diffs = {(1, c, f"u{i}"): float(v) for c in (0, 1) for i, v in enumerate(rng.normal(size=50))}
    a, b = paired_bootstrap(diffs, n_boot=400, seed=7), paired_bootstrap(diffs, n_boot=400, seed=7)
    assert a == b
    assert paired_bootstrap(diffs, n_boot=400, seed=8)["ci95"] != a["ci95"]


def test_verdict_follows_the_papers_direction():
    assert verdict(0.5, 2.0, ">") == HOLDS
    assert verdict(-2.0, -0.5, ">") == DOES_NOT_HOLD
    assert verdict(-0.5, 2.0, ">") == CANNOT_TELL
    assert verdict(0.0, 0.0, ">") == CANNOT_TELL
    assert verdict(-2.0, -0.5, "<") == HOLDS


# ---------------------------------------------------------------- pairing


def test_pairing_gives_differences_per_seed_client_and_example():
    a = {(1, 0, "u"): 100.0, (1, 0, "v"): 0.0, (2, 3, "w"): 100.0}
    b = {(1, 0, "u"): 0.0, (1, 0, "v"): 0.0, (2, 3, "w"): 100.0}
    assert paired_differences(a, b) == {(1, 0, "u"): 100.0, (1, 0, "v"): 0.0, (2, 3, "w"): 0.0}


def test_pairing_methods_tested_on_different_examples_is_a_clear_error():
    a = {(1, 0, "u"): 100.0, (1, 0, "v"): 0.0}
    b = {(1, 0, "u"): 0.0, (1, 0, "z"): 0.0}
    with pytest.raises(ProtocolError, match=r"fedamole and fedit_ft were not tested on the same examples.*"
                                            r"1 \(seed, client, uid\) keys only in fedamole"):
        paired_differences(a, b, ("fedamole", "fedit_ft"))


def test_two_runs_are_paired_at_their_own_selected_and_last_rounds(tmp_path):
    ex = examples({0: [100, 0, 100, 0], 1: [100, 100, 0]})
    worse = examples({0: [0, 0, 100, 0], 1: [100, 0, 0]})
    a = load_method_run(write_run(tmp_path / "a", {"personalized": both_rounds(ex, worse)}, headline="personalized",
                                  selected={"personalized": 1}))
    b = load_method_run(write_run(tmp_path / "b", {"personalized": {1: worse, 2: worse, 3: ex}},
                                  headline="personalized", selected={"personalized": 2}))
    sel = paired_differences(method_examples({1: a}, "selected"), method_examples({1: b}, "selected"))
    assert sel[(1, 0, "c0-0")] == 100.0 and sel[(1, 1, "c1-1")] == 100.0 and sum(sel.values()) == 200.0
    last = paired_differences(method_examples({1: a}, "last"), method_examples({1: b}, "last"))
    assert sum(last.values()) == -200.0  # a's last round (2) is worse, b's (3) better


# ---------------------------------------------------------------- runs against summary.json


def test_the_score_recomputed_from_outcomes_equals_summary_json(tmp_path):
    # unbalanced clients: the client mean (50) is not the example mean (10)
    ex = examples({0: [100], 1: [0] * 9})
    run = load_method_run(write_run(tmp_path / "r", {"personalized": both_rounds(ex)}, headline="personalized"))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert run["record"]["test"] == summary["personalized"]["mean"] == pytest.approx(50.0)
    assert run["record"]["per_client"] == {"0": 100.0, "1": 0.0}
    assert run["record"]["test_examples_per_client"] == {"0": 1, "1": 9}
    assert run["record"]["train_loss"] == [{"round": 1, "loss": pytest.approx(2.0)},
                                           {"round": 2, "loss": pytest.approx(1.5)},
                                           {"round": 3, "loss": pytest.approx(1.45)}]
    assert (run["record"]["wall_seconds"], run["record"]["cpu_seconds"]) == (12.5, 20.0)


def test_outcomes_that_disagree_with_summary_json_fail_loudly(tmp_path):
    ex = examples({0: [100], 1: [0] * 9})
    # a summary that averaged the examples instead of the clients
    bad = {"selected_round": 2, "val": 1.0, "mean": 10.0, "per_client": {"0": 100.0, "1": 0.0}, "last_round": 2,
           "last_mean": 50.0, "last_per_client": {"0": 100.0, "1": 0.0}}
    write_run(tmp_path / "r", {"personalized": both_rounds(ex)}, headline="personalized",
              summary_patch={"personalized": bad})
    with pytest.raises(ProtocolError, match=r"'personalized' at round 2 \(selected\).*50\.0.*summary.json says 10\.0"):
        load_method_run(tmp_path / "r")


def test_outcomes_missing_the_selected_round_fail_loudly(tmp_path):
    ex = examples({0: [100, 0]})
    write_run(tmp_path / "r", {"global": both_rounds(ex)}, headline="global", selected={"global": 1})
    lines = (tmp_path / "r" / "outcomes.jsonl").read_text().splitlines()
    (tmp_path / "r" / "outcomes.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["round"] == 2))
    with pytest.raises(ProtocolError, match="no test examples of 'global' at round 1"):
        load_method_run(tmp_path / "r")


def test_tier_clients_are_scored_at_their_own_budget(tmp_path):
    # global evaluated on every client, global_k4 on clients 2 and 3, global_k2 on client 4
    g = examples({0: [100, 100], 1: [100, 0], 2: [0, 0], 3: [0, 0], 4: [0, 0]})
    k4 = examples({2: [100, 0], 3: [100, 100]})
    k2 = examples({4: [0, 100]})
    run = load_method_run(write_run(tmp_path / "r", {"global": both_rounds(g), "global_k4": both_rounds(k4),
                                                     "global_k2": both_rounds(k2)}, headline="global"))
    rec = run["record"]
    assert rec["budget_of_client"] == {"0": "K", "1": "K", "2": "4", "3": "4", "4": "2"}
    assert rec["per_client"] == {"0": 100.0, "1": 50.0, "2": 50.0, "3": 100.0, "4": 50.0}
    assert rec["test"] == pytest.approx(70.0)  # pooled at own budgets
    assert {b: v["test"] for b, v in rec["budgets"].items()} == {"K": 75.0, "4": 75.0, "2": 50.0}
    assert rec["full_compute"]["test"] == pytest.approx(30.0)
    assert set(run["examples"]["selected"]) == {(c, f"c{c}-{i}") for c in range(5) for i in range(2)}


# ---------------------------------------------------------------- suites: claims, partial, report


PERSONAL = {"local": {"run": "local", "model": "personalized"}, "fedit": {"run": "fedit", "model": "global"},
            "fedit_ft": {"run": "fedit", "model": "personalized"}, "fdlora": {"run": "fdlora", "model": "personalized"},
            "fedamole": {"run": "fedamole", "model": "personalized"},
            "fedamole_r": {"run": "fedamole_r", "model": "personalized"},
            "fedamole_s": {"run": "fedamole_s", "model": "personalized"}}
TIER = {m: {"run": m, "model": "global"} for m in ("flame", "flame_no_rescaler", "flame_t0", "hetlora", "flexlora")}
SEEDS = [1, 2, 3]
N = 30  # test examples per client


def _flip_one_each_way(values: list[float]) -> list[float]:
    """One wrong example made right and one right example made wrong."""
    out = list(values)
    out[out.index(0.0)], out[out.index(100.0)] = 100.0, 0.0
    return out


def _personal_suite(root: Path, seeds=SEEDS):
    for seed in seeds:
        rng = np.random.default_rng(seed)
        base = {c: list(100.0 * (rng.random(N + 5 * c) < 0.5)) for c in range(3)}  # unbalanced clients
        flipped = {c: _flip_one_each_way(vs) for c, vs in base.items()}  # a zero-mean difference to base
        ninety = {c: [0.0 if i % 10 == 0 else 100.0 for i in range(len(vs))] for c, vs in base.items()}
        better = {c: [100.0 if i % 5 == 0 else v for i, v in enumerate(vs)] for c, vs in base.items()}
        d = root / "task"
        write_run(d / "local" / f"seed{seed}", {"personalized": both_rounds(examples(base))}, headline="personalized")
        write_run(d / "fedit" / f"seed{seed}", {"global": both_rounds(examples(base)),
                                                "personalized": both_rounds(examples(base))}, headline="global")
        write_run(d / "fdlora" / f"seed{seed}", {"personalized": both_rounds(examples(better))},
                  headline="personalized")
        # FedAMoLE: 90 % at the selected round 1, all wrong at the last round 2
        wrong = examples({c: [0.0] * len(v) for c, v in base.items()})
        write_run(d / "fedamole" / f"seed{seed}", {"personalized": both_rounds(examples(ninety), wrong)},
                  headline="personalized", selected={"personalized": 1})
        write_run(d / "fedamole_r" / f"seed{seed}", {"personalized": both_rounds(examples(flipped))},
                  headline="personalized")
        write_run(d / "fedamole_s" / f"seed{seed}",
                  {"personalized": both_rounds(examples({c: [100.0] * len(v) for c, v in base.items()}))},
                  headline="personalized")


def _tier_suite(root: Path, seeds=SEEDS):
    tiers = {0: "K", 1: "K", 2: "4", 3: "4", 4: "2", 5: "2"}
    for seed in seeds:
        rng = np.random.default_rng(100 + seed)
        half = {c: list(100.0 * (rng.random(N) < 0.5)) for c in tiers}

        def evals(values, global_on_all):
            g = {c: v for c, v in values.items() if global_on_all or tiers[c] == "K"}
            out = {"global": both_rounds(examples(g))}
            for k in ("4", "2"):
                out[f"global_k{k}"] = both_rounds(examples({c: v for c, v in values.items() if tiers[c] == k}))
            return out

        # FLAME: all right at the top tier, the baseline's outcomes at k = 4, all wrong at k = 2
        flame = {c: [100.0] * N if tiers[c] == "K" else half[c] if tiers[c] == "4" else [0.0] * N for c in tiers}
        write_run(root / "tiers" / "flame" / f"seed{seed}", evals(flame, True), headline="global")
        for m in ("flame_no_rescaler", "flame_t0", "hetlora", "flexlora"):
            write_run(root / "tiers" / m / f"seed{seed}", evals(half, m == "flame_t0"), headline="global")


def _claim(results, cid, budget=None, scenario=None):
    return next(c for c in results["claims"] if c["id"] == cid and c["budget"] == budget
                and (scenario is None or c["scenario"] == scenario))


def test_a_full_suite_reports_tables_claims_and_convergence(tmp_path):
    _personal_suite(tmp_path)
    _tier_suite(tmp_path)
    res = collect(tmp_path, {"task": PERSONAL, "tiers": TIER}, SEEDS, n_boot=300)
    assert not res["partial"] and res["missing"] == []
    assert len(res["runs"]) == 3 * (len(PERSONAL) + len(TIER))
    run = next(r for r in res["runs"] if r["method"] == "fedit_ft" and r["seed"] == 2)
    assert (run["run"], run["model"], run["state_digest"]) == ("fedit", "personalized", "digest-seed2")
    for key in ("selected_round", "last_round", "test", "test_last", "per_client", "test_examples_per_client",
                "train_loss", "wall_seconds", "cpu_seconds"):
        assert key in run
    # the compute totals count each run once: FedIT's run gives both FedIT and FedIT-FT
    run_dirs = {(r["scenario"], r["run"], r["seed"]) for r in res["runs"]}
    assert len(run_dirs) == len(res["runs"]) - 3
    assert (res["compute_seconds"], res["cpu_seconds"]) == (12.5 * len(run_dirs), 20.0 * len(run_dirs))
    fedamole = res["table"]["task"]["fedamole"]
    assert fedamole["n"] == 3 and fedamole["selected"]["mean"] == pytest.approx(90.0, abs=1.0)
    assert fedamole["last"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 3}

    best = _claim(res, "fedamole_vs_best_baseline")
    assert best["b"] == "fdlora" and best["selected"]["verdict"] == HOLDS
    assert best["last"]["verdict"] == DOES_NOT_HOLD and best["selected"]["n"] == 3 * (3 * N + 15)
    assert _claim(res, "fedamole_r_vs_fedit_ft")["selected"]["verdict"] == CANNOT_TELL
    assert _claim(res, "fedamole_r_vs_fedit_ft")["selected"]["diff"] == pytest.approx(0.0, abs=1e-9)
    assert _claim(res, "fedamole_vs_fedamole_s")["selected"]["verdict"] == DOES_NOT_HOLD
    assert not any(c["id"].startswith("flame") and c["scenario"] == "task" for c in res["claims"])

    # tiers: pooled over budgets and at each budget, on that budget's clients only
    assert _claim(res, "flame_vs_hetlora", "K")["selected"]["verdict"] == HOLDS
    k4 = _claim(res, "flame_vs_hetlora", "4")["selected"]
    assert k4["diff"] == 0.0 and k4["ci95"] == [0.0, 0.0] and k4["verdict"] == CANNOT_TELL
    k2 = _claim(res, "flame_vs_hetlora", "2")["selected"]
    assert k2["verdict"] == DOES_NOT_HOLD and k2["n"] == 3 * 2 * N and k2["n_clients"] == 3 * 2
    assert _claim(res, "flame_vs_hetlora", None)["selected"]["n"] == 3 * 6 * N
    # flame_t0 evaluates its global model on every client (full compute), the others on the top tier only
    assert res["table"]["tiers"]["flame_t0"]["selected"] == res["table"]["tiers"]["hetlora"]["selected"]
    assert set(res["table"]["tiers"]["flame"]["budgets"]) == {"K", "4", "2"}
    tiers = res["table"]["tiers"]
    assert "full_compute" in tiers["flame_t0"] and "full_compute" not in tiers["hetlora"]

    conv = res["convergence"]["task"]["fedamole"]
    assert conv["rel_change"] == pytest.approx(0.05 / 1.5) and conv["converged"] and conv["rounds"] == 3

    write_report({**res, "wall_seconds": 600.0, "jobs": 2}, tmp_path / "docs", "synthetic")
    md = (tmp_path / "docs" / "accuracy_synthetic.md").read_text()
    assert "## Scenario `task`" in md and "## Paper claims" in md and "## Convergence" in md
    assert "fedamole > best baseline (fdlora)" in md and "does not hold" in md and "cannot tell at this power" in md
    assert "Score by compute budget (`tiers`)" in md and "k = 4" in md and "K (top tier)" in md
    assert "the suite took 10.0 minutes with 2 run(s) at a time" in md and "Partial" not in md
    assert (tmp_path / "docs" / "accuracy_synthetic_claims.png").stat().st_size > 5000
    assert (tmp_path / "docs" / "accuracy_synthetic.png").stat().st_size > 5000
    json.dumps(res)  # the results file is plain JSON


def test_a_partial_suite_reports_what_is_there_and_marks_it_partial(tmp_path):
    _personal_suite(tmp_path)
    for run in ("fedamole/seed3", "fedit/seed2"):
        for f in (tmp_path / "task" / run).iterdir():
            f.unlink()
        (tmp_path / "task" / run).rmdir()
    res = collect(tmp_path, {"task": PERSONAL}, SEEDS, n_boot=200)
    assert res["partial"]
    assert sorted((m["run"], m["seed"], tuple(m["methods"])) for m in res["missing"]) == [
        ("fedamole", 3, ("fedamole",)), ("fedit", 2, ("fedit", "fedit_ft"))]
    assert res["table"]["task"]["fedamole"]["n"] == 2 and res["table"]["task"]["fedit_ft"]["seeds"] == [1, 3]
    claim = _claim(res, "fedamole_vs_fedit_ft")
    assert claim["selected"]["seeds"] == [1] and claim["selected"]["verdict"] == HOLDS  # the seeds both have
    write_report(res, tmp_path / "docs", "partial")
    md = (tmp_path / "docs" / "accuracy_partial.md").read_text()
    assert "**Partial results**: 2 run(s) missing" in md and "| task | fedit | 2 | fedit, fedit_ft |" in md


def test_a_claim_whose_runs_are_all_missing_says_so(tmp_path):
    _personal_suite(tmp_path, seeds=[1])
    res = collect(tmp_path, {"task": PERSONAL}, [1, 2], n_boot=100)
    assert _claim(res, "fedamole_vs_fedit_ft")["selected"]["seeds"] == [1]
    methods = {**PERSONAL, "fedamole_s": {"run": "never_ran", "model": "personalized"}}
    res = collect(tmp_path, {"task": methods}, [1], n_boot=100)
    assert _claim(res, "fedamole_vs_fedamole_s")["selected"]["verdict"] == "no runs to pair"


def test_the_old_cpu_preset_without_outcomes_gives_summary_tables_and_no_claims(tmp_path):
    g = examples({0: [100, 0], 1: [0, 0], 2: [100, 100], 3: [0, 100]})
    for m in ("flame", "hetlora"):
        write_run(tmp_path / "tiers" / m / "seed42",
                  {"global": both_rounds(g), "global_k4": both_rounds(examples({1: [100, 100]})),
                   "global_k2": both_rounds(examples({2: [0, 100]})),
                   "global_k1": both_rounds(examples({3: [100, 100]}))},
                  headline="global", outcomes=False)
    write_run(tmp_path / "task" / "fedamole" / "seed42", {"personalized": both_rounds(g)}, headline="personalized",
              outcomes=False)
    plan = [{"scenario": s, "method": m, "seed": 42, "overrides": []}
            for s, m in (("task", "fedamole"), ("tiers", "flame"), ("tiers", "hetlora"))]
    methods, seeds = plan_methods(plan)
    assert methods["tiers"]["hetlora"] == {"run": "hetlora", "model": None} and seeds == [42]
    res = collect(tmp_path, methods, seeds)
    assert res["claims"] == [] and "outcomes" in res["claims_note"] and not res["partial"]
    entry = res["table"]["tiers"]["flame"]
    assert entry["selected"] == {"mean": pytest.approx(75.0), "ci95": None, "n": 1}  # 50, 100, 50, 100 at own budgets
    assert {b: v["selected"]["mean"] for b, v in entry["budgets"].items()} == {"K": 50.0, "4": 100.0, "2": 50.0,
                                                                               "1": 100.0}
    assert entry["full_compute"]["selected"]["mean"] == pytest.approx(50.0)
    assert res["runs"][0]["test_examples_per_client"] is None and res["runs"][0]["model"] == "personalized"
    write_report(res, tmp_path / "docs", "cpu")
    md = (tmp_path / "docs" / "accuracy_cpu.md").read_text()
    assert "| fedamole | 50.00 | 50.00 | 1 | – |" in md and "Not checked: no run kept per-example outcomes" in md
    assert not (tmp_path / "docs" / "accuracy_cpu_claims.png").exists()


def test_runs_that_put_clients_in_different_budgets_cannot_be_paired(tmp_path):
    a = load_method_run(write_run(tmp_path / "a", {"global": both_rounds(examples({0: [100], 1: [0]})),
                                                   "global_k4": both_rounds(examples({1: [0]}))}, headline="global"))
    b = load_method_run(write_run(tmp_path / "b", {"global": both_rounds(examples({0: [100], 1: [0]})),
                                                   "global_k4": both_rounds(examples({0: [0]}))}, headline="global"))
    claim = next(c for c in CLAIMS if c["id"] == "flame_vs_hetlora")
    with pytest.raises(ProtocolError, match="different budgets"):
        check_claim(claim, {"flame": {1: a}, "hetlora": {1: b}}, None, n_boot=10)


def test_convergence_is_the_mean_absolute_relative_change_of_the_last_two_rounds():
    conv = convergence({1: [{"round": 1, "loss": 2.0}, {"round": 2, "loss": 1.0}, {"round": 3, "loss": 0.9}],
                        2: [{"round": 1, "loss": 2.0}, {"round": 2, "loss": 1.0}, {"round": 3, "loss": 1.2}]})
    assert conv["rel_change"] == pytest.approx(0.15) and conv["signed"] == pytest.approx(0.05)
    assert conv["converged"] is False and conv["per_seed"] == {"1": pytest.approx(-0.1), "2": pytest.approx(0.2)}
    conv = convergence({1: [{"round": 1, "loss": 1.0}, {"round": 2, "loss": 0.96}]})
    assert conv["rel_change"] == pytest.approx(0.04) and conv["converged"] is True
    assert convergence({1: [{"round": 1, "loss": 2.0}]})["converged"] is None
    assert convergence({1: [{"round": 1, "loss": 2.0}]})["rounds"] == 1
