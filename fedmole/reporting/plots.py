"""The report's figures (matplotlib, Agg backend). Each function takes a loaded run (`RunData`, see
report.py) and returns a Figure, or None when the run lacks the data (the report then notes why).
"""

from __future__ import annotations

import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MAX_MODULES = 8  # assignment heatmaps show at most this many modules (evenly spaced over the model)
MAX_GROUPS = 12  # partition histogram: the largest groups, the rest summed as "other"


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside a name by value: layers.2 before layers.12."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _fig(ncols: int = 1, nrows: int = 1, width: float = 5.5, height: float = 3.6, **kw):
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)


def _rounds_axis(ax, grid: bool = False, legend: bool = False) -> None:
    """Integer round ticks; optionally the light grid and the small legend every per-round figure uses."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if grid:
        ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _mean_line(ax, x, y) -> None:
    ax.plot(x, y, "k-o", lw=2.2, ms=4, label="mean over clients")


def _client_color(i: int, n: int):
    """A distinct colour per client: tab10 / tab20 while they last, then evenly spaced over turbo."""
    if n <= 10:
        return plt.get_cmap("tab10")(i)
    if n <= 20:
        return plt.get_cmap("tab20")(i)
    return plt.get_cmap("turbo")(i / max(n - 1, 1))


def _client_legend(ax, n_clients: int) -> None:
    """The legend naming every client line (and the mean), outside the axes on the right."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + n_clients // 16,
              frameon=False, handlelength=1.5)


def _series(records, model, split, metric, client):
    pts = sorted((r["round"], r["value"]) for r in records if r["model"] == model and r["split"] == split
                 and r["metric"] == metric and r["client"] == client)
    return [p[0] for p in pts], [p[1] for p in pts]


def _clients(records, model, split, metric) -> list[int]:
    return sorted({r["client"] for r in records if r["model"] == model and r["split"] == split
                   and r["metric"] == metric and r["client"] is not None})


def metric_curves(run, model: str) -> Figure | None:
    """Val and test of `model` (personalized / global / ...) per round: each client a thin labelled line, the
    mean thick. The y label says what the score averages (`run.score_label`)."""
    metric = run.metric
    if not _series(run.metrics, model, "test", metric, None)[0]:
        return None
    fig, axes = _fig(2, width=6.2)
    for ax, split in zip(axes[0], ("val", "test")):
        clients = _clients(run.metrics, model, split, metric)
        for i, cid in enumerate(clients):
            ax.plot(*_series(run.metrics, model, split, metric, cid), lw=1.0, alpha=0.75,
                    color=_client_color(i, len(clients)), label=f"client {cid}")
        x, y = _series(run.metrics, model, split, metric, None)
        _mean_line(ax, x, y)
        ax.set(title=f"{model} · {split}", xlabel="round", ylabel=run.score_label if metric == "score" else metric)
        _rounds_axis(ax, grid=True)
        _client_legend(ax, len(clients))
    fig.tight_layout()
    return fig


def train_loss(run) -> Figure | None:
    clients = _clients(run.metrics, "local", "train", "loss")
    if not clients:
        return None
    fig, axes = _fig(width=6.2)
    ax = axes[0][0]
    per_round = defaultdict(list)
    for i, cid in enumerate(clients):
        x, y = _series(run.metrics, "local", "train", "loss", cid)
        ax.plot(x, y, lw=1.0, alpha=0.75, color=_client_color(i, len(clients)), label=f"client {cid}")
        for r, v in zip(x, y):
            per_round[r].append(v)
    rounds = sorted(per_round)
    _mean_line(ax, rounds, [np.mean(per_round[r]) for r in rounds])
    ax.set(title="local training loss", xlabel="round", ylabel="loss")
    _rounds_axis(ax, grid=True)
    _client_legend(ax, len(clients))
    fig.tight_layout()
    return fig


def partition_histogram(run) -> Figure | None:
    """Per client, its examples by the partition column (stacked), largest groups first."""
    part = run.partition
    if not part or not part.get("clients"):
        return None
    totals = defaultdict(int)
    for c in part["clients"]:
        for g, n in c["histogram"].items():
            totals[g] += n
    top = sorted(totals, key=lambda g: (-totals[g], g))[:MAX_GROUPS]
    clients = [c["client"] for c in part["clients"]]
    fig, axes = _fig(width=max(5.5, 0.35 * len(clients) + 3))
    ax = axes[0][0]
    bottom = np.zeros(len(clients))
    colors = plt.get_cmap("tab20").colors
    for i, g in enumerate([*top, "other"]):
        if g == "other":
            vals = np.array([sum(n for k, n in c["histogram"].items() if k not in top) for c in part["clients"]])
            if not vals.any():
                continue
        else:
            vals = np.array([c["histogram"].get(g, 0) for c in part["clients"]])
        ax.bar(clients, vals, bottom=bottom, label=g or f"(no {part.get('by')})",
               color=colors[i % len(colors)] if g != "other" else "0.7")
        bottom += vals
    ax.set(title=f"partition by {part.get('by')}", xlabel="client", ylabel="examples")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def experts_per_client(run) -> Figure | None:
    """FedAMoLE: mean domain experts per module that each client holds, per round (assignments.jsonl)."""
    if not run.assignments:
        return None
    fig, axes = _fig()
    ax = axes[0][0]
    clients = sorted({int(c) for a in run.assignments for per in a["experts"].values() for c in per})
    for i, cid in enumerate(clients):
        xs, ys = [], []
        for a in run.assignments:
            counts = [len(per[str(cid)]) for per in a["experts"].values() if str(cid) in per]
            if counts:
                xs.append(a["round"])
                ys.append(np.mean(counts))
        ax.plot(xs, ys, "-o", ms=3, color=_client_color(i, len(clients)), label=f"client {cid}")
    ax.set(title="experts per client (mean over modules)", xlabel="round (0 = initial assignment)",
           ylabel="domain experts held")
    _rounds_axis(ax, grid=True)
    _client_legend(ax, len(clients))
    fig.tight_layout()
    return fig


def chosen_modules(modules) -> list[str]:
    """The modules in model order (layer numbers by value), at most MAX_MODULES evenly spaced over the model."""
    modules = sorted(modules, key=natural_key)
    if len(modules) <= MAX_MODULES:
        return modules
    idx = np.linspace(0, len(modules) - 1, MAX_MODULES).round().astype(int)
    return [modules[i] for i in sorted(set(idx))]


def assignment_heatmap(run, rnd: int) -> Figure | None:
    """FedAMoLE: which client holds which expert, one panel per module, at round `rnd`."""
    rec = next((a for a in run.assignments if a["round"] == rnd), None)
    if rec is None:
        return None
    modules = chosen_modules(rec["experts"])
    n_experts = run.num_experts or 1 + max(e for per in rec["experts"].values() for ids in per.values() for e in ids)
    clients = sorted({int(c) for per in rec["experts"].values() for c in per})
    ncols = min(4, len(modules))
    nrows = -(-len(modules) // ncols)
    fig, axes = _fig(ncols, nrows, width=3.4, height=0.25 * len(clients) + 1.6)
    for ax in axes.flat[len(modules):]:
        ax.axis("off")
    for ax, module in zip(axes.flat, modules):
        grid = np.zeros((len(clients), n_experts))
        for i, cid in enumerate(clients):
            for e in rec["experts"][module].get(str(cid), []):
                grid[i, e] = 1
        ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(module.removeprefix("model."), fontsize=7)
        ax.set_yticks(range(len(clients)), [str(c) for c in clients], fontsize=6)
        ax.set_xlabel("expert id", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(f"expert assignment, round {rnd} (rows: clients)", fontsize=9)
    fig.tight_layout()
    return fig


def expert_holders(run) -> Figure | None:
    """FedAMoLE pool utilisation: how many clients hold each expert, per round (mean over modules)."""
    if not run.assignments:
        return None
    n_experts = run.num_experts or 1 + max(e for a in run.assignments for per in a["experts"].values()
                                           for ids in per.values() for e in ids)
    rounds = [a["round"] for a in run.assignments]
    grid = np.zeros((len(rounds), n_experts))
    for i, a in enumerate(run.assignments):
        for per in a["experts"].values():
            for ids in per.values():
                for e in ids:
                    grid[i, e] += 1 / len(a["experts"])
    fig, axes = _fig(width=max(5.5, 0.25 * n_experts + 2))
    ax = axes[0][0]
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(title="clients holding each expert (mean over modules)", xlabel="expert id", ylabel="round")
    ax.set_yticks(range(len(rounds)), [str(r) for r in rounds])
    fig.colorbar(im, ax=ax, label="clients")
    fig.tight_layout()
    return fig


def routing_utilisation(run) -> Figure | None:
    """FLAME: share of routed tokens each expert of each layer received in the last round (all clients)."""
    if not run.activations:
        return None
    last = run.activations[-1]
    layers = sorted({m for c in last["clients"] for m in c["counts"]}, key=natural_key)
    if not layers:
        return None
    n = max(len(c["counts"][m]) for c in last["clients"] for m in c["counts"])
    grid = np.zeros((len(layers), n))
    for c in last["clients"]:
        for i, m in enumerate(layers):
            grid[i, : len(c["counts"].get(m, []))] += c["counts"].get(m, [])
    grid = grid / np.maximum(grid.sum(1, keepdims=True), 1)
    fig, axes = _fig(width=max(5.5, 0.4 * n + 3), height=0.3 * len(layers) + 1.8)
    ax = axes[0][0]
    im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set(title=f"routing utilisation, round {last['round']} (share of routed tokens)", xlabel="expert")
    ax.set_yticks(range(len(layers)), [m.removeprefix("model.") for m in layers], fontsize=6)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def activation_by_tier(run) -> Figure | None:
    """FLAME: activation frequency a/S of each expert (tokens routed to it per token), per tier k, averaged
    over the layers and the clients of that tier, over all rounds."""
    if not run.activations:
        return None
    freq: dict[int, list[np.ndarray]] = defaultdict(list)
    for rec in run.activations:
        for c in rec["clients"]:
            if not c.get("tokens"):
                continue
            for counts in c["counts"].values():
                freq[int(c["k"])].append(np.asarray(counts, dtype=float) / c["tokens"])
    if not freq:
        return None
    n = max(len(v) for vs in freq.values() for v in vs)
    fig, axes = _fig(width=max(5.5, 0.45 * n + 2))
    ax = axes[0][0]
    tiers = sorted(freq, reverse=True)
    width = 0.8 / len(tiers)
    for i, k in enumerate(tiers):
        mean = np.mean([np.pad(v, (0, n - len(v))) for v in freq[k]], axis=0)
        ax.bar(np.arange(n) + (i - (len(tiers) - 1) / 2) * width, mean, width, label=f"k = {k}")
    ax.set(title="activation frequency a/S per tier", xlabel="expert",
           ylabel="activations per token")
    ax.set_xticks(range(n))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bytes_per_round(run) -> Figure | None:
    if not run.comm:
        return None
    parts = defaultdict(lambda: defaultdict(int))
    for r in run.comm:
        parts[f"{r['phase']} {r['direction']}"][r["round"]] += r["bytes"]
    rounds = sorted({r["round"] for r in run.comm})
    fig, axes = _fig()
    ax = axes[0][0]
    bottom = np.zeros(len(rounds))
    for name in ("train down", "train up", "evaluate down", "evaluate up"):
        if name in parts:
            vals = np.array([parts[name][r] for r in rounds]) / 1e6
            ax.bar(rounds, vals, bottom=bottom, label=name)
            bottom += vals
    ax.set(title=f"bytes per round ({run.comm[0]['dtype']} transfer)", xlabel="round", ylabel="MB")
    _rounds_axis(ax, legend=True)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- comparisons
def compare_curves(runs, model: str, split: str) -> Figure | None:
    drawn = [(run, _series(run.metrics, model, split, run.metric, None)) for run in runs]
    drawn = [(run, s) for run, s in drawn if s[0]]
    if not drawn:
        return None
    fig, axes = _fig()
    ax = axes[0][0]
    for run, (x, y) in drawn:
        ax.plot(x, y, "-o", ms=3, label=run.name)
    metrics = sorted({run.score_label if run.metric == "score" else run.metric for run, _ in drawn})
    ax.set(title=f"{model} · {split} (mean over clients)", xlabel="round", ylabel=" / ".join(metrics))
    _rounds_axis(ax, grid=True, legend=True)
    fig.tight_layout()
    return fig


def compare_bytes(runs) -> Figure | None:
    drawn = [run for run in runs if run.comm]
    if not drawn:
        return None
    fig, axes = _fig()
    ax = axes[0][0]
    for run in drawn:
        per = defaultdict(int)
        for r in run.comm:
            per[r["round"]] += r["bytes"]
        rounds = sorted(per)
        ax.plot(rounds, np.cumsum([per[r] for r in rounds]) / 1e6, "-o", ms=3, label=run.name)
    ax.set(title="cumulative communication", xlabel="round", ylabel="MB")
    _rounds_axis(ax, grid=True, legend=True)
    fig.tight_layout()
    return fig
