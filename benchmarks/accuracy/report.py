"""Results file, tables and plots of the accuracy suite, from the run directories (see stats.py).

`collect` reads every (scenario, method, seed) of a method table and returns the results dict written to
benchmarks/results/accuracy_<preset>.json; `write_report` writes docs/results/accuracy_<preset>.md, the score
plot accuracy_<preset>.png and, where claims were checked, the forest plot accuracy_<preset>_claims.png.
Runs without outcomes.jsonl (the `cpu` preset) give summary-based tables and no claims.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.accuracy.stats import (CLAIMS, CONVERGED_BELOW, DOES_NOT_HOLD, HOLDS, ROUND_KINDS, TOP, budget_order,
                                       check_claims, convergence, load_method_run, t_interval)

HEADLINE_METHODS = ("fedamole", "flame")


def interval_json(values) -> dict:
    """{"mean", "ci95": [low, high] (None for one seed), "n"} of per-seed values."""
    iv = t_interval(values)
    return {"mean": iv["mean"], "ci95": None if iv["low"] is None else [iv["low"], iv["high"]], "n": iv["n"]}


def plan_methods(plan: list[dict]) -> tuple[dict[str, dict[str, dict]], list[int]]:
    """The method table and seeds of a plan whose every method is its own run, scored on the run's headline
    model (the `cpu` and `micro` presets: run directory <scenario>/<method>/seed<N>)."""
    methods: dict[str, dict[str, dict]] = {}
    for r in plan:
        methods.setdefault(r["scenario"], {})[r["method"]] = {"run": r["method"], "model": None}
    return methods, sorted({r["seed"] for r in plan})


def collect(root: Path, methods: dict[str, dict[str, dict]], seeds: list[int], *, claims: list[dict] = CLAIMS,
            n_boot: int = 10_000, boot_seed: int = 0) -> dict:
    """The results of a suite whose runs live in `root/<scenario>/<run>/seed<N>/`.

    methods: scenario -> method -> {"run": run directory name, "model": label (None: the run's headline)}, e.g.
    {"task": {"fedit_ft": {"run": "fedit", "model": "personalized"}, ...}, "tiers": {"flame": {"run": "flame",
    "model": "global"}, ...}}. Missing runs are listed and make the results `partial`."""
    root = Path(root)
    loaded: dict[str, dict[str, dict[int, dict]]] = {}
    rows, missing = [], {}
    for scen, table in methods.items():
        for method, spec in table.items():
            for seed in seeds:
                run = load_method_run(root / scen / spec["run"] / f"seed{seed}", spec.get("model"))
                if run is None:
                    missing.setdefault((scen, spec["run"], seed), []).append(method)
                    continue
                loaded.setdefault(scen, {}).setdefault(method, {})[seed] = run
                rows.append({"scenario": scen, "method": method, "run": spec["run"], "seed": seed, **run["record"]})
    with_outcomes = any(r["outcomes"] for r in rows)
    results = {
        "seeds": list(seeds), "methods": methods,
        "partial": bool(missing),
        "missing": [{"scenario": s, "run": r, "seed": seed, "methods": ms} for (s, r, seed), ms in missing.items()],
        "runs": rows,
        "table": {scen: {m: _table_entry(by_seed) for m, by_seed in by_method.items()}
                  for scen, by_method in loaded.items()},
        "claims": [c for scen, by_method in loaded.items()
                   for c in check_claims(scen, by_method, list(methods[scen]), claims, n_boot, boot_seed)]
        if with_outcomes else [],
        "bootstrap": {"n_boot": n_boot, "seed": boot_seed, "level": 0.95},
        "convergence": {scen: {m: convergence({s: r["record"]["train_loss"] for s, r in by_seed.items()})
                               for m, by_seed in by_method.items()} for scen, by_method in loaded.items()},
        **_compute(rows),
    }
    if not with_outcomes:
        results["claims_note"] = "no run kept per-example outcomes (outcomes.jsonl): no paired claims"
    results["gains"] = _gains(results["table"], claims)
    return results


def _compute(rows: list[dict]) -> dict:
    """Wall and CPU seconds over the suite's runs, each run directory once: one run can give two methods'
    models (FedIT's global model and its fine-tuned one, FedIT-FT), and it ran once."""
    runs = {(r["scenario"], r["run"], r["seed"]): r for r in rows}.values()
    cpu = [r["cpu_seconds"] for r in runs if r["cpu_seconds"] is not None]
    return {"compute_seconds": round(sum(r["wall_seconds"] or 0.0 for r in runs), 1),
            "cpu_seconds": round(sum(cpu), 1) if cpu else None}


def _table_entry(by_seed: dict[int, dict]) -> dict:
    recs = [r["record"] for _, r in sorted(by_seed.items())]
    entry = {"selected": interval_json(r["test"] for r in recs), "last": interval_json(r["test_last"] for r in recs),
             "n": len(recs), "seeds": sorted(by_seed)}
    counts = [n for r in recs for n in (r["test_examples_per_client"] or {}).values()]
    entry["test_examples_per_client"] = {"min": min(counts), "max": max(counts)} if counts else None
    budgets = sorted({b for r in recs for b in r.get("budgets", {})}, key=budget_order)
    if budgets:
        entry["budgets"] = {b: {"selected": interval_json(r["budgets"][b]["test"] for r in recs if b in r["budgets"]),
                                "last": interval_json(r["budgets"][b]["test_last"] for r in recs if b in r["budgets"])}
                            for b in budgets}
        full = [r["full_compute"] for r in recs if "full_compute" in r]
        if full:
            entry["full_compute"] = {"selected": interval_json(f["test"] for f in full),
                                     "last": interval_json(f["test_last"] for f in full)}
    return entry


def _gains(table: dict, claims: list[dict]) -> dict:
    """Relative gain (%) of a claim's method over the best of its `best_of` baselines, by mean over seeds at the
    selected round (the papers' headline number)."""
    out = {}
    for scen, methods in table.items():
        for claim in claims:
            if isinstance(claim["b"], str) or claim["a"] not in methods:
                continue
            base = {m: methods[m]["selected"]["mean"] for m in claim["b"]["best_of"] if m in methods}
            if base:
                best = max(base, key=base.get)
                ours = methods[claim["a"]]["selected"]["mean"]
                out[scen] = {"method": claim["a"], "best_baseline": best,
                             "relative_gain_pct": 100 * (ours - base[best]) / base[best] if base[best] else None}
    return out


# ---------------------------------------------------------------- markdown

def _fmt(iv: dict | None) -> str:
    if not iv:
        return "–"
    if iv["ci95"] is None:
        return f"{iv['mean']:.2f}"
    return f"{iv['mean']:.2f} [{iv['ci95'][0]:.2f}, {iv['ci95'][1]:.2f}]"


def _budget_name(b: str) -> str:
    return "K (top tier)" if b == TOP else f"k = {b}"


def _diff(res: dict) -> str:
    if res.get("diff") is None:
        return res["verdict"]
    return f"{res['diff']:+.2f} [{res['ci95'][0]:+.2f}, {res['ci95'][1]:+.2f}]"


def _claim_name(c: dict) -> str:
    rel = ">" if c["paper"] == ">" else "<"
    b = c["b"] or "–"
    if c["b_rule"]:
        b = f"best baseline ({b})"
    return f"{c['a']} {rel} {b}"


def write_report(results: dict, docs: Path, preset: str) -> None:
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    seeds = results.get("seeds", [])
    lines = [f"# Accuracy suite, preset `{preset}`", ""]
    if results.get("partial"):
        lines += [f"**Partial results**: {len(results['missing'])} run(s) missing (listed at the end); the tables "
                  "and claims use the runs that finished.", ""]
    lines += ["Test score (x100: accuracy for choice tasks, ROUGE-L F for generation) of each method's model, the "
              "unweighted mean over clients, at the round selected on validation and at the last round: mean over "
              f"seeds with its 95 % Student-t interval [low, high] (n = seeds of {len(seeds)}; one seed: no "
              f"interval). Generated by `python -m benchmarks.accuracy --preset {preset}`.", ""]
    for scen, methods in results["table"].items():
        lines += [f"## Scenario `{scen}`", "",
                  "| method | selected round | last round | n | test examples per client |", "|---|---|---|---|---|"]
        for method, v in sorted(methods.items(), key=lambda kv: -kv[1]["selected"]["mean"]):
            ex = v.get("test_examples_per_client")
            ex = "–" if not ex else str(ex["min"]) if ex["min"] == ex["max"] else f"{ex['min']}-{ex['max']}"
            lines.append(f"| {method} | {_fmt(v['selected'])} | {_fmt(v['last'])} | {v['n']} | {ex} |")
        g = results.get("gains", {}).get(scen)
        if g and g["relative_gain_pct"] is not None:
            lines += ["", f"Relative gain of {g['method']} over the best baseline ({g['best_baseline']}), means over "
                          f"seeds at the selected round: {g['relative_gain_pct']:+.2f} %"]
        lines.append("")
        lines += _budget_table(scen, methods)
    lines += _claims_section(results)
    lines += _convergence_section(results)
    lines += [f"Compute: {results['compute_seconds'] / 60:.1f} minutes of run wall time in total"
              + (f", {results['cpu_seconds'] / 60:.1f} CPU minutes" if results.get("cpu_seconds") else "")
              + (f"; the suite took {results['wall_seconds'] / 60:.1f} minutes with {results['jobs']} run(s) at a time."
                 if results.get("wall_seconds") and results.get("jobs") else "."), ""]
    if results.get("missing"):
        lines += ["## Missing runs", "", "| scenario | run | seed | methods |", "|---|---|---|---|"]
        lines += [f"| {m['scenario']} | {m['run']} | {m['seed']} | {', '.join(m['methods'])} |"
                  for m in results["missing"]]
        lines.append("")
    (docs / f"accuracy_{preset}.md").write_text("\n".join(lines))
    _plot_scores(results, docs / f"accuracy_{preset}.png")
    forest = docs / f"accuracy_{preset}_claims.png"
    if any(c["selected"].get("diff") is not None for c in results.get("claims", [])):
        _plot_forest(results, forest)
    elif forest.exists():
        forest.unlink()


def _budget_table(scen: str, methods: dict) -> list[str]:
    """Tier scenario: each method's score at every budget, each client scored on the model its budget runs."""
    budgets = sorted({b for v in methods.values() for b in v.get("budgets", {})}, key=budget_order)
    if not budgets:
        return []
    full = any("full_compute" in v for v in methods.values())
    lines = [f"Score by compute budget (`{scen}`), at the selected round: each client is scored on the model its "
             "budget runs (the top tier K on the global model, a tier-k client on `global_k{k}`); the table above "
             "pools all clients at their own budgets."
             + (" Full compute: the global model on every client it was evaluated on." if full else ""), "",
             "| method | " + " | ".join(_budget_name(b) for b in budgets) + (" | full compute |" if full else " |"),
             "|---|" + "---|" * (len(budgets) + full)]
    for method, v in methods.items():
        b = v.get("budgets", {})
        lines.append(f"| {method} | " + " | ".join(_fmt(b.get(k, {}).get("selected")) for k in budgets)
                     + (f" | {_fmt(v.get('full_compute', {}).get('selected'))} |" if full else " |"))
    return lines + [""]


def _claims_section(results: dict) -> list[str]:
    claims = results.get("claims", [])
    if not claims:
        note = results.get("claims_note", "no claim applies to these scenarios")
        return ["## Paper claims", "", f"Not checked: {note}.", ""]
    boot = results.get("bootstrap", {})
    lines = ["## Paper claims", "",
             "Paired difference A - B of the test score (x100) over the same test examples, each method at its own "
             "selected (or last) round: the mean over seeds of the mean over clients of the mean per-example "
             f"difference, with a 95 % percentile interval from {boot.get('n_boot', '?')} bootstrap resamples of "
             "examples within each (seed, client) (bootstrap seed "
             f"{boot.get('seed', '?')}). Verdict: *holds* when the interval excludes zero in the paper's direction, "
             "*does not hold* when it excludes zero the other way, *cannot tell at this power* when it includes "
             "zero. The best baseline is the one with the highest mean test score over seeds at that round, a "
             "choice that favours the baseline. Budget: own = every client at its own budget.", "",
             "| scenario | paper claims | budget | selected round: A - B [95 % CI] | verdict | last round | verdict "
             "| examples | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in claims:
        s, last = c["selected"], c["last"]
        budget = "–" if c["budget"] is None and not _tiered(results, c) else "own" if c["budget"] is None \
            else _budget_name(c["budget"])
        last_b = f" (vs {last['b']})" if last.get("b") != s.get("b") else ""
        lines.append(f"| {c['scenario']} | {_claim_name(c)} | {budget} | {_diff(s)} | "
                     f"{s['verdict'] if s.get('diff') is not None else ''} | {_diff(last)}{last_b} | "
                     f"{last['verdict'] if last.get('diff') is not None else ''} | {s['n']} | {len(s['seeds'])} |")
    return lines + ["", "What each claim says: " + "; ".join(dict.fromkeys(f"{_claim_name(c).split(' (')[0]}: "
                                                                         f"{c['says']}" for c in claims)) + ".", ""]


def _tiered(results: dict, claim: dict) -> bool:
    return "budgets" in results["table"].get(claim["scenario"], {}).get(claim["a"], {})


def _convergence_section(results: dict) -> list[str]:
    conv = results.get("convergence", {})
    if not conv:
        return []
    lines = ["## Convergence", "",
             "Relative change of the mean training loss (mean over clients) between the last two rounds, "
             f"|L_R - L_R-1| / L_R-1, averaged over seeds (signed mean in brackets); converged: below "
             f"{100 * CONVERGED_BELOW:.0f} %.", "",
             "| scenario | method | rounds | change | converged |", "|---|---|---|---|---|"]
    for scen, methods in conv.items():
        for method, c in methods.items():
            if c["rel_change"] is None:
                lines.append(f"| {scen} | {method} | {c['rounds']} | – | cannot tell (fewer than 2 rounds) |")
            else:
                lines.append(f"| {scen} | {method} | {c['rounds']} | {100 * c['rel_change']:.1f} % "
                             f"({100 * c['signed']:+.1f} %) | {'yes' if c['converged'] else '**no**'} |")
    not_conv = [f"{s}/{m}" for s, ms in conv.items() for m, c in ms.items() if c["converged"] is False]
    if not_conv:
        lines += ["", "Not converged by this criterion: " + ", ".join(not_conv) + "."]
    return lines + [""]


# ---------------------------------------------------------------- plots

def _color(method: str) -> str:
    if method in HEADLINE_METHODS:
        return "tab:red"
    return "tab:orange" if method.startswith(HEADLINE_METHODS) else "tab:blue"


def _yerr(ivs: list[dict]):
    """Asymmetric error bars from intervals (zero where there is none)."""
    low = [iv["mean"] - iv["ci95"][0] if iv and iv["ci95"] else 0.0 for iv in ivs]
    high = [iv["ci95"][1] - iv["mean"] if iv and iv["ci95"] else 0.0 for iv in ivs]
    return [low, high]


def _plot_scores(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(results["table"])
    if not scen:
        return
    tiers = {s: m for s, m in results["table"].items() if any("budgets" in v for v in m.values())}
    n = len(scen) + len(tiers)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    order = results.get("methods", {})
    for ax, s in zip(axes[0], scen):
        methods = [m for m in order.get(s, results["table"][s]) if m in results["table"][s]]
        ivs = [results["table"][s][m]["selected"] for m in methods]
        ax.bar(range(len(methods)), [iv["mean"] for iv in ivs], yerr=_yerr(ivs),
               color=[_color(m) for m in methods], capsize=3)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(s)
        ax.set_ylabel("test score, selected round (95 % CI)")
    for ax, (s, by_method) in zip(axes[0][len(scen):], tiers.items()):
        budgets = sorted({b for v in by_method.values() for b in v.get("budgets", {})}, key=budget_order)
        xs = list(range(len(budgets)))
        for i, (m, v) in enumerate(by_method.items()):
            ivs = [v.get("budgets", {}).get(b, {}).get("selected") for b in budgets]
            ys = [iv["mean"] if iv else float("nan") for iv in ivs]
            shift = (i - (len(by_method) - 1) / 2) * 0.06
            ax.errorbar([x + shift for x in xs], ys, yerr=_yerr(ivs), marker="o", capsize=2, label=m,
                        linewidth=2.5 if m in HEADLINE_METHODS else 1.2)
        ax.set_xticks(xs, [_budget_name(b) for b in budgets], fontsize=8)
        ax.set_title(f"{s}: score by compute budget")
        ax.set_xlabel("budget (model a client of that tier runs)")
        ax.set_ylabel("test score, selected round (95 % CI)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


VERDICT_COLOR = {HOLDS: "tab:green", DOES_NOT_HOLD: "tab:red"}


def _plot_forest(results: dict, path: Path) -> None:
    """One row per (claim, budget) with a number: the selected round's difference and interval (filled, coloured
    by verdict) and the last round's (hollow, grey), a zero line, rows grouped by scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    claims = [c for c in results["claims"] if any(c[kind].get("diff") is not None for kind in ROUND_KINDS)]
    rows, labels, group_rows = [], [], []  # (y, claim), ytick labels, (y, scenario) headers
    y = 0.0
    for scen in dict.fromkeys(c["scenario"] for c in claims):
        group_rows.append((y, scen))
        y -= 1
        for c in (c for c in claims if c["scenario"] == scen):
            budget = "" if c["budget"] is None and not _tiered(results, c) else \
                "  [own budgets]" if c["budget"] is None else f"  [{_budget_name(c['budget'])}]"
            rows.append((y, c))
            labels.append(f"{c['a']} − {c['b']}" + (" (best baseline)" if c["b_rule"] else "") + budget)
            y -= 1
        y -= 0.4
    fig, ax = plt.subplots(figsize=(9, 0.34 * (-y) + 1.6))
    for yy, c in rows:
        for kind, dy in zip(ROUND_KINDS, (0.0, -0.3)):
            r = c[kind]
            if r.get("diff") is None:
                continue
            lo, hi = r["ci95"]
            filled = kind == "selected"
            color = VERDICT_COLOR.get(r["verdict"], "tab:gray") if filled else "0.55"
            ax.plot([lo, hi], [yy + dy] * 2, color=color, linewidth=2 if filled else 1)
            ax.plot([r["diff"]], [yy + dy], "o", color=color, markerfacecolor=color if filled else "white",
                    markersize=6 if filled else 5)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks([yy for yy, _ in rows], labels, fontsize=8)
    for yy, scen in group_rows:
        ax.text(0.0, yy, f"scenario {scen}", transform=ax.get_yaxis_transform(), ha="right", va="center",
                fontsize=9, fontweight="bold")
    ax.set_ylim(y + 0.4, 0.8)
    ax.set_xlabel("paired difference A − B of the test score (x100), 95 % bootstrap interval")
    ax.legend(handles=[Line2D([], [], color="tab:green", marker="o", label="selected round: holds"),
                       Line2D([], [], color="tab:red", marker="o", label="selected round: does not hold"),
                       Line2D([], [], color="tab:gray", marker="o", label="selected round: cannot tell"),
                       Line2D([], [], color="0.55", marker="o", markerfacecolor="white", label="last round")],
              fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
