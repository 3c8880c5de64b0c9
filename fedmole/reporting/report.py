"""`fedmole report RUN_DIR [RUN_DIR ...]`: a self-contained report.html (every image embedded as a base64
data URI, no external resource) and the same figures as PNG files.

Per run: metric curves (val/test; personalised, global and any other evaluated model; each client and the
mean), local training loss, the partition histogram, FedAMoLE's experts per client and assignment
heatmaps for chosen rounds and its pool utilisation, FLAME's routing utilisation and activation frequencies
per tier, bytes per round. A figure whose data the run lacks is left out with a note saying why. With
several runs: a comparison table (from summary.json) and overlaid mean curves and cumulative bytes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedmole.errors import UserError
from fedmole.reporting.metrics import SCORE_PARTS, score_parts
from fedmole.reporting.scalars import read_jsonl, write_metrics_csv

MODELS = ("personalized", "global")


@dataclass
class RunData:
    """Everything a report reads from one run directory."""

    name: str
    path: Path
    summary: dict | None
    config: dict
    metrics: list[dict]
    partition: dict | None
    comm: list[dict]
    assignments: list[dict]
    activations: list[dict]
    metric: str = "score"
    num_experts: int | None = None
    extra_models: list[str] = field(default_factory=list)
    score_parts: list[str] = field(default_factory=list)  # what `score` averages: accuracy and/or rouge_l

    @property
    def score_label(self) -> str:
        """`score` with what it averages, for axes and tables: "score (accuracy + ROUGE-L F)"."""
        if not self.score_parts:
            return "score"
        return f"score ({' + '.join(SCORE_PARTS[m] for m in self.score_parts)})"

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> "RunData":
        path = Path(path)
        if not (path / "metrics.jsonl").is_file():
            raise UserError(f"{path} is not a fedmole run directory (no metrics.jsonl); pass the directory that "
                            f"`fedmole run --out` wrote")
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
        partition = json.loads((path / "partition.json").read_text()) if (path / "partition.json").is_file() else None
        metrics = read_jsonl(path / "metrics.jsonl")
        if summary:
            metric = summary["metric"]
        else:
            metric = "score" if any(r["metric"] == "score" and r["split"] == "test" for r in metrics) else "loss"
        run = cls(name or path.name, path, summary, config or {}, metrics, partition, read_jsonl(path / "comm.jsonl"),
                  read_jsonl(path / "assignments.jsonl"), read_jsonl(path / "activations.jsonl"), metric)
        run.num_experts = (config or {}).get("algorithm", {}).get("num_experts")
        run.extra_models = sorted({r["model"] for r in metrics if r["split"] == "test"}
                                  - {None, "local", *MODELS})
        run.score_parts = score_parts(metrics)
        return run


@dataclass
class Figure:
    file: str
    title: str
    png: bytes


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: str = ""


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def default_rounds(run: RunData) -> list[int]:
    """Heatmap rounds: the first, a middle and the last round of assignments.jsonl."""
    rounds = [a["round"] for a in run.assignments]
    if not rounds:
        return []
    return sorted({rounds[0], rounds[len(rounds) // 2], rounds[-1]})


def run_section(run: RunData, prefix: str, rounds: list[int] | None) -> Section:
    from fedmole.reporting import plots

    sec = Section(f"Run {run.name}")
    sec.table = _summary_table(run)

    def add(key: str, title: str, fig, missing: str) -> None:
        if fig is None:
            sec.notes.append(f"{title}: not shown, {missing}.")
        else:
            sec.figures.append(Figure(f"{prefix}{key}.png", title, _png(fig)))

    for model in (*MODELS, *run.extra_models):
        fig = plots.metric_curves(run, model)
        if fig is not None or model in MODELS:
            add(f"curves_{model}", f"{model} model: {run.metric} per round (val, test)", fig,
                f"the run has no {model} evaluations")
    add("train_loss", "local training loss", plots.train_loss(run), "the run has no training-loss records")
    add("partition", "partition histogram", plots.partition_histogram(run), "the run has no partition.json")
    no_assign = "the run has no assignments.jsonl (FedAMoLE only)"
    add("experts_per_client", "experts per client per round", plots.experts_per_client(run), no_assign)
    wanted = rounds if rounds is not None else default_rounds(run)
    if run.assignments:
        for rnd in wanted:
            add(f"assignment_round{rnd}", f"expert assignment heatmap, round {rnd}", plots.assignment_heatmap(run, rnd),
                f"assignments.jsonl has no round {rnd}")
    else:
        sec.notes.append(f"expert assignment heatmaps: not shown, {no_assign}.")
    add("expert_holders", "expert pool utilisation (clients per expert)", plots.expert_holders(run), no_assign)
    no_act = "the run has no activations.jsonl (FLAME only)"
    add("routing", "routing utilisation", plots.routing_utilisation(run), no_act)
    add("activation_tiers", "activation frequencies per tier", plots.activation_by_tier(run), no_act)
    add("bytes", "bytes per round", plots.bytes_per_round(run), "the run has no comm.jsonl")
    return sec


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _row(cells, head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def score_note(run: RunData) -> str:
    """What the run's `score` averages, in words; with both kinds, the selected round's accuracy and ROUGE-L F
    of the headline model next to it."""
    parts = run.score_parts
    if run.metric != "score" or not parts:
        return f"metric: {run.metric}."
    if parts == ["accuracy"]:
        return "score = accuracy ×100: every evaluated example is a classification example (1 if the lowest-CE " \
               "choice is the gold one, else 0)."
    if parts == ["rouge_l"]:
        return "score = ROUGE-L F ×100: every evaluated example is a generation example."
    text = ("score = the mean over each client's evaluated examples of accuracy (classification examples, 1 or 0) "
            "and ROUGE-L F (generation examples), ×100: this run's tasks mix both kinds, so the score averages "
            "two metrics; metrics.jsonl also holds each alone (accuracy, rouge_l)")
    s = run.summary or {}
    head = s.get(s.get("headline") or "")
    if head:
        rnd = head["selected_round"]
        alone = {r["metric"]: r["value"] for r in run.metrics if r["metric"] in SCORE_PARTS and r["client"] is None
                 and r["round"] == rnd and r["model"] == s["headline"] and r["split"] == "test"}
        if alone:
            text += f". {s['headline']} test @ round {rnd}: " + ", ".join(
                f"{SCORE_PARTS[m]} {alone[m]:.2f}" for m in SCORE_PARTS if m in alone)
    return text + "."


def _summary_table(run: RunData) -> str:
    s = run.summary
    note = f"<p class=score-note>{html.escape(score_note(run))}</p>"
    if not s:
        return note + "<p class=note>No summary.json: the run did not finish (figures show what it recorded).</p>"
    rows = [_row(("model", "selected round", "val", "test @ selected", "last round", "test @ last"), True)]
    for model in MODELS:
        res = s.get(model)
        if res:
            label = model + (" (headline)" if model == s["headline"] else "")
            rows.append(_row((label, res["selected_round"], _fmt(res["val"]), _fmt(res["mean"]), res["last_round"],
                              _fmt(res["last_mean"]))))
    comm = s.get("comm") or {}
    facts = (f"{s['algorithm']} · engine {s.get('engine')} · metric {s['metric']} · rounds completed "
             f"{s['rounds_completed']}" + (f" (stopped: {s['stopped']})" if s.get("stopped") else "")
             + (f" · {comm['megabytes']:.3f} MB communicated ({comm['dtype']})" if comm else "")
             + f" · {s['wall_seconds']:.1f} s")
    return f"<p>{html.escape(facts)}</p>{note}<table>{''.join(rows)}</table>"


def comparison_rows(runs: list[RunData]) -> list[list]:
    """One row per run: name, algorithm, headline, metric (for `score`: what it averages), selected round, val,
    test @ selected, test @ last, rounds completed, stopped, MB communicated, wall seconds."""
    rows = []
    for run in runs:
        s = run.summary or {}
        head = s.get(s.get("headline") or "") or {}
        comm = s.get("comm") or {}
        metric = run.score_label if s.get("metric") == "score" else s.get("metric")
        rows.append([run.name, s.get("algorithm"), s.get("headline"), metric, head.get("selected_round"),
                     head.get("val"), head.get("mean"), head.get("last_mean"), s.get("rounds_completed"),
                     s.get("stopped"), comm.get("megabytes"), s.get("wall_seconds")])
    return rows


COMPARISON_HEADER = ("run", "algorithm", "headline", "metric", "selected round", "val", "test @ selected",
                     "test @ last", "rounds", "stopped", "MB sent", "wall s")


def comparison_section(runs: list[RunData]) -> Section:
    from fedmole.reporting import plots

    sec = Section("Comparison")
    rows = [_row(COMPARISON_HEADER, True)] + [_row([_fmt(c) for c in r]) for r in comparison_rows(runs)]
    sec.table = f"<table>{''.join(rows)}</table>"
    for model in MODELS:
        for split in ("val", "test"):
            fig = plots.compare_curves(runs, model, split)
            if fig is None:
                sec.notes.append(f"{model} · {split} curves: not shown, no run has {model} evaluations.")
            else:
                sec.figures.append(Figure(f"compare_{model}_{split}.png", f"{model} · {split}, all runs", _png(fig)))
    fig = plots.compare_bytes(runs)
    if fig is None:
        sec.notes.append("cumulative bytes: not shown, no run has comm.jsonl.")
    else:
        sec.figures.append(Figure("compare_bytes.png", "cumulative communication, all runs", _png(fig)))
    return sec


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555}
img{max-width:100%;border:1px solid #eee}.note{color:#777;font-size:.9em}"""


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for sec in sections:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2>{sec.table}")
        for fig in sec.figures:
            data = base64.b64encode(fig.png).decode()
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(fig.title)}" '
                         f'data-file="{html.escape(fig.file)}"><figcaption>{html.escape(fig.title)}</figcaption>'
                         f"</figure>")
        if sec.notes:
            parts.append("<ul class=note>" + "".join(f"<li>{html.escape(n)}</li>" for n in sec.notes) + "</ul>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _names(paths: list[Path]) -> list[str]:
    """Distinct display names: the directory names, made unique with the parent's name or an index."""
    names = [p.resolve().name for p in paths]
    out = []
    for p, n in zip(paths, names):
        name = n if names.count(n) == 1 else f"{p.resolve().parent.name}/{n}"
        while name in out:
            name += "'"
        out.append(name)
    return out


def write_report(run_dirs: list[Path], out: Path | None = None, csv: bool = False,
                 rounds: list[int] | None = None) -> Path:
    """Write report.html and the PNGs into `out` (default: RUN_DIR/report for one run, ./fedmole-report for
    several); with `csv`, also metrics.csv (all runs, with a `run` column). Returns the report's path."""
    if not run_dirs:
        raise UserError("fedmole report needs at least one run directory")
    run_dirs = [Path(p) for p in run_dirs]
    for p in run_dirs:
        if not p.is_dir():
            raise UserError(f"run directory {p} does not exist")
    runs = [RunData.load(p, n) for p, n in zip(run_dirs, _names(run_dirs))]
    out = Path(out) if out is not None else (run_dirs[0] / "report" if len(runs) == 1 else Path("fedmole-report"))
    out.mkdir(parents=True, exist_ok=True)
    sections = [comparison_section(runs)] if len(runs) > 1 else []
    for i, run in enumerate(runs):
        prefix = "" if len(runs) == 1 else f"{i + 1}_{_slug(run.name)}_"
        sections.append(run_section(run, prefix, rounds))
    for sec in sections:
        for fig in sec.figures:
            (out / fig.file).write_bytes(fig.png)
    title = f"fedmole report: {runs[0].name}" if len(runs) == 1 else f"fedmole report: {len(runs)} runs"
    path = out / "report.html"
    path.write_text(render_html(title, sections))
    if csv:
        write_metrics_csv([r for run in runs for r in run.metrics], out / "metrics.csv",
                          [run.name for run in runs for _ in run.metrics])
    return path
