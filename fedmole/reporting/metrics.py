"""Metrics records, model selection on validation, and the run summary.

`metrics.jsonl` holds one JSON object per measurement (`MetricRecord`, built by `metric_record`):
`{"round", "client" (int or null for a mean over clients), "model" (personalized | global | local),
"split" (train | val | test | round), "metric", "value"}`. `model: local` marks measurements taken during
local training (the training loss); `split: round` marks facts about a round (failures, assignments...,
`round_record`, `fact_record`).

Selection: for each evaluated model kind, the reported round is the one with the best mean validation
score (or lowest validation loss, per `eval.select_on`); test is reported for that round and for the last.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import NotRequired, TypedDict


class MetricRecord(TypedDict):
    """One line of metrics.jsonl."""

    round: int
    client: int | None  # None: a mean over clients, or a fact about the whole round
    model: str | None
    split: str
    metric: str
    value: float
    reason: NotRequired[str]  # why a reply was rejected (`client_rejected`, `eval_rejected`)


def metric_record(rnd: int, client: int | None, model: str | None, split: str, metric: str,
                  value: float) -> MetricRecord:
    """A metrics.jsonl record, its keys in the file's order."""
    return {"round": rnd, "client": client, "model": model, "split": split, "metric": metric, "value": value}


def round_record(rnd: int, metric: str, value: float, client: int | None = None,
                 reason: str | None = None) -> MetricRecord:
    """A fact about round `rnd` (`split: round`, no model): of one client, or of the round when `client` is
    None; `reason` says why a reply was rejected."""
    rec = metric_record(rnd, client, None, "round", metric, value)
    if reason is not None:
        rec["reason"] = reason
    return rec


def fact_record(rnd: int, fact: dict) -> MetricRecord:
    """A strategy's fact about round `rnd` (`Strategy.round_records`: `{"client", "metric", "value"}`) as a
    record. Its keys keep the order these records have always had in metrics.jsonl (round, model, split,
    then the fact's): readers do not depend on it, logs that compare byte for byte do."""
    return {"round": rnd, "model": None, "split": "round", **fact}


class MetricsLog:
    """Appends records to `metrics.jsonl`. In memory it keeps what the round loop reads while the run goes
    and what the summary selects on: the number of records, the records with `client: null` (means over
    clients and facts about rounds), how often each `split: round` metric was recorded (failures per kind)
    and the largest `dp_groups` (None before any). Records of single clients stay in the file (a run of
    many clients over many rounds writes millions); `summary_records` reads back the few the summary
    reports."""

    def __init__(self, path: Path):
        self.path = path
        self._reset()
        for r in iter_jsonl(path):
            self._keep(r)

    def _reset(self) -> None:
        self.count = 0
        self.means: list[dict] = []
        self.round_counts: Counter[str] = Counter()
        self.dp_groups: int | None = None

    def _keep(self, r: dict) -> None:
        self.count += 1
        if r["client"] is None:
            self.means.append(r)
        if r["split"] == "round":
            self.round_counts[r["metric"]] += 1
        if r["metric"] == "dp_groups":
            value = int(r["value"])
            self.dp_groups = value if self.dp_groups is None else max(self.dp_groups, value)

    def add(self, records: list[MetricRecord]) -> None:
        if not records:
            return
        with self.path.open("a") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
            fh.flush()
        for r in records:
            self._keep(r)

    def log_evals(self, rnd: int, per_client: dict[int, list[dict]]) -> None:
        """Per-client eval results plus, per (model, split, metric), their unweighted mean over clients."""
        self.add(eval_records(rnd, per_client))

    def truncate(self, n_records: int) -> None:
        """Keep the first `n_records` records (used when resuming from a checkpoint)."""
        kept = list(itertools.islice(iter_jsonl(self.path), n_records))
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._reset()
        for r in kept:
            self._keep(r)

    def records(self) -> Iterator[dict]:
        """Every record, read from the file."""
        return iter_jsonl(self.path)

    def summary_records(self, select_on: str) -> list[dict]:
        """The means, plus the per-client test records of the rounds `select_model` reports for each model
        (the selected and the last round): enough for `summarize` and `select_model`, read in one pass."""
        wanted = set()
        for model in {r["model"] for r in self.means if r["split"] == "test"}:
            sel = select_model(self.means, model, select_on)
            if sel is not None:
                wanted |= {(model, sel["selected_round"]), (model, sel["last_round"])}
        return self.means + [r for r in iter_jsonl(self.path) if r["client"] is not None and r["split"] == "test"
                             and (r["model"], r["round"]) in wanted]


class OutcomesLog:
    """`outcomes.jsonl`: one record per scored test example, `{"round", "model", "client", "split", "uid",
    "gold", "pred", "choice_scores", "correct", "rouge_l", "value"}` (client/evaluate.py `outcome`), so that
    methods can be paired example by example. Only the record count is kept in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        if path.exists():
            with path.open() as fh:
                self.count = sum(1 for line in fh if line.strip())

    def add(self, rnd: int, client: int, evals: list[dict]) -> None:
        lines = [json.dumps({"round": e.get("round", rnd), "model": e["model"], "client": client,
                             "split": e["split"], **x}) for e in evals for x in e.get("examples", ())]
        if lines:
            with self.path.open("a") as fh:
                fh.write("".join(line + "\n" for line in lines))
            self.count += len(lines)

    def truncate(self, n_records: int) -> None:
        """Keep the first `n_records` records (used when resuming from a checkpoint)."""
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()][:n_records]
            self.path.write_text("".join(line + "\n" for line in lines))
        self.count = min(self.count, n_records)


def iter_jsonl(path: Path) -> Iterator[dict]:
    """The records of a JSON-lines file, one at a time (none when the file does not exist)."""
    if not path.exists():
        return
    with path.open() as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def eval_records(rnd: int, per_client: dict[int, list[dict]]) -> list[MetricRecord]:
    """Records of per-client eval results plus, per (model, split, metric), their unweighted mean over clients."""
    recs, groups = [], defaultdict(list)
    for cid, evals in sorted(per_client.items()):
        for e in evals:
            for metric, value in e["metrics"].items():
                if metric == "n":
                    continue
                recs.append(metric_record(rnd, cid, e["model"], e["split"], metric, value))
                groups[(e["model"], e["split"], metric)].append(value)
    for (model, split, metric), values in sorted(groups.items()):
        recs.append(metric_record(rnd, None, model, split, metric, sum(values) / len(values)))
    return recs


def _mean_by_round(records, model, split, metric) -> dict[int, float]:
    return {r["round"]: r["value"] for r in records
            if r["client"] is None and r["model"] == model and r["split"] == split and r["metric"] == metric}


def _per_client(records, model, split, metric, rnd) -> dict[str, float]:
    return {str(r["client"]): r["value"] for r in records
            if r["client"] is not None and r["round"] == rnd and r["model"] == model and r["split"] == split
            and r["metric"] == metric}


SCORE_PARTS = {"accuracy": "accuracy", "rouge_l": "ROUGE-L F"}  # what `score` may average, by record name


def score_parts(records: list[dict]) -> list[str]:
    """Which per-example metrics the run's `score` averages: `accuracy` (classification examples, 1/0),
    `rouge_l` (generation examples, ROUGE-L F), or both when the evaluated examples mix the two kinds."""
    seen = {r["metric"] for r in records if r["split"] in ("val", "test") and r["metric"] in SCORE_PARTS}
    return [m for m in SCORE_PARTS if m in seen]


def primary_metric(records: list[dict]) -> str:
    """The score reported: `score` when any evaluation produced it, else `loss`."""
    return "score" if any(r["metric"] == "score" and r["split"] == "test" for r in records) else "loss"


def selection_metric(records: list[dict], model: str, select_on: str) -> str:
    """The validation quantity that picks `model`'s reported round: the mean score when `select_on` is
    val_score and the model's validation produced one, else the mean loss."""
    if select_on == "val_score" and any(r["model"] == model and r["split"] == "val" and r["metric"] == "score"
                                        for r in records):
        return "score"
    return "loss"


def best_val_round(records: list[dict], model: str, select_on: str, rounds=None) -> int | None:
    """The round (among `rounds`, default all) with the best mean validation score (highest) or loss (lowest);
    ties go to the earliest round. None when `model` has no validation in those rounds."""
    metric = selection_metric(records, model, select_on)
    val = _mean_by_round(records, model, "val", metric)
    candidates = [r for r in val if rounds is None or r in rounds]
    if not candidates:
        return None
    sign = 1 if metric == "score" else -1
    return max(candidates, key=lambda r: (sign * val[r], -r))


def select_model(records: list[dict], model: str, select_on: str) -> dict | None:
    """Selection and test results for one model kind, or None when it was never evaluated."""
    metric = primary_metric(records)
    test = _mean_by_round(records, model, "test", metric)
    if not test:
        return None
    val = _mean_by_round(records, model, "val", selection_metric(records, model, select_on))
    selected = best_val_round(records, model, select_on, set(test)) if any(r in val for r in test) else min(test)
    last = max(test)
    return {
        "metric": metric,
        "selected_round": selected,
        "val": val.get(selected),
        "mean": test[selected],
        "per_client": _per_client(records, model, "test", metric, selected),
        "last_round": last,
        "last_mean": test[last],
        "last_per_client": _per_client(records, model, "test", metric, last),
    }


def summarize(records: list[dict], select_on: str) -> dict:
    out = {"metric": primary_metric(records)}
    for model in ("personalized", "global"):
        out[model] = select_model(records, model, select_on)
    return out
