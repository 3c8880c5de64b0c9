"""Metrics for other tools: `metrics.csv` (every run) and TensorBoard event files (`output.tensorboard`).

Both are written from the run directory's files at the end of a run (and again after a resume), so they
always match `metrics.jsonl` and `comm.jsonl`.

TensorBoard tags: `{model}/{split}/{metric}` for means over clients (e.g. `global/test/score`),
`clients/{model}/{split}/{metric}/{client}` per client (local training loss: `clients/local/train/loss/3`),
`round/{metric}` for facts about a round (clients replied, ...), and `comm/down_bytes`, `comm/up_bytes`,
`comm/cumulative_bytes` per round. The step is the round.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

CSV_COLUMNS = ("round", "client", "model", "split", "metric", "value")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_metrics_csv(records: list[dict], path: Path, runs: list[str] | None = None) -> Path:
    """The metrics records as CSV (one row per record; empty cells for nulls). `runs` (one name per record)
    adds a first column `run`, for the records of several runs in one file."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow((("run",) if runs is not None else ()) + CSV_COLUMNS)
        for i, r in enumerate(records):
            row = ["" if r.get(c) is None else r[c] for c in CSV_COLUMNS]
            writer.writerow(([runs[i]] if runs is not None else []) + row)
    return path


def tensorboard_scalars(metrics: list[dict], comm: list[dict]) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every scalar written to TensorBoard."""
    out = []
    for r in metrics:
        if not isinstance(r["value"], (int, float)):
            continue
        if r["split"] == "round":
            tag = f"round/{r['metric']}" if r["client"] is None else f"clients/round/{r['metric']}/{r['client']}"
        elif r["client"] is None:
            tag = f"{r['model']}/{r['split']}/{r['metric']}"
        else:
            tag = f"clients/{r['model']}/{r['split']}/{r['metric']}/{r['client']}"
        out.append((tag, float(r["value"]), int(r["round"])))
    per_round: dict[int, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
    for r in comm:
        per_round[r["round"]][r["direction"]] += r["bytes"]
    total = 0
    for rnd in sorted(per_round):
        total += per_round[rnd]["down"] + per_round[rnd]["up"]
        out += [("comm/down_bytes", float(per_round[rnd]["down"]), rnd),
                ("comm/up_bytes", float(per_round[rnd]["up"]), rnd),
                ("comm/cumulative_bytes", float(total), rnd)]
    return out


def write_tensorboard(run_dir: Path) -> Path:
    """run_dir/tensorboard/: one event file with every scalar (replaced when rewritten)."""
    from torch.utils.tensorboard import SummaryWriter

    out = run_dir / "tensorboard"
    shutil.rmtree(out, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(out))
    try:
        for tag, value, step in tensorboard_scalars(read_jsonl(run_dir / "metrics.jsonl"),
                                                    read_jsonl(run_dir / "comm.jsonl")):
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return out
