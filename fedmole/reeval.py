"""`fedmole eval RUN_DIR [--round N] [--split test|val] [--client ID]`: re-evaluate a checkpoint, no training.

It rebuilds the run's data partition, base model and adapters from `config.yaml`, loads the server and
client states of the checkpoint, and evaluates with the run's own code path:

1. the method's evaluation plan (`Strategy.configure_evaluate` run through the in-process engine and
   `client.execute`, reseeded per (round, client, phase) exactly as in the run): the global model, the
   tier-wise `global_k{k}` (FLAME, HetLoRA, FlexLoRA), FDLoRA's fused personalised model; these equal what
   `metrics.jsonl` recorded for a round evaluated after aggregation;
2. each client's own model (`fedmole export --client`'s model) unless it is the global model step 1 evaluated
   or FDLoRA's personalised one (a lower-tier HetLoRA/FlexLoRA client's is its `global_k{k}` model again):
   labelled `personalized` where the checkpoint keeps exactly the model the run evaluated under that label
   (local, FedIT-FT), otherwise `client` (FedAMoLE: the aggregated experts of the client's architecture,
   HetLoRA/FlexLoRA: the global LoRA at the client's rank, FLAME: k_i with the client's rescaler).

Both splits are evaluated, as in the run: they share batches, so only then are the numbers the run's exactly.
Writes `eval_round_N_SPLIT.json` (`eval_round_N_SPLIT_client_C.json` with --client) into the run directory:
the records in metrics.jsonl's format, their means, and the values recorded by the run for the same round.

Like the CLI, this is an application on top of `run` (docs/design.md, Layers): it rebuilds the data and the
runtime with run's own functions, so the numbers come from the code path that produced them.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmole.adapters.state import state_digest
from fedmole.algorithms.base import GLOBAL, PERSONALIZED
from fedmole.errors import UserError
from fedmole.export.source import apply_state, check_client, model_state, open_checkpoint, strategy_at
from fedmole.paths import atomic_write_text
from fedmole.reporting.metrics import eval_records

SPLITS = ("test", "val")
KEEPS_PERSONALIZED = ("local", "fedit")  # the client state holds exactly the model evaluated as personalized
CLIENT = "client"


def _check_partition(ckpt, clients) -> None:
    from fedmole.run import check_partition

    check_partition(ckpt.cfg, clients, ckpt.run_dir, "a re-evaluation would not measure the same examples")


def _client_models(ckpt, strategy, runtime, ids: list[int], evals: dict[int, list[dict]]) -> None:
    """Evaluate each client's own model unless the plan evaluated it already (as the global model, or as
    FDLoRA's personalised one)."""
    global_key = None
    if strategy.has_global:
        g = model_state(ckpt, strategy, None)
        global_key = (state_digest(g.tensors), g.k)
    label = PERSONALIZED if ckpt.cfg.algorithm.name in KEEPS_PERSONALIZED else CLIENT
    for c in ids:
        if any(e["model"] == PERSONALIZED for e in evals.get(c, [])):
            continue  # the plan already evaluated its personalised model (FDLoRA)
        try:
            st = model_state(ckpt, strategy, c)
        except UserError:
            continue  # no model of its own in this checkpoint (it never trained)
        if (state_digest(st.tensors), st.k) == global_key and any(e["model"] == GLOBAL for e in evals.get(c, [])):
            continue  # the same model was just evaluated as the global one
        runtime.seed(ckpt.round, c, "evaluate")
        apply_state(runtime.adapters, st)
        evals.setdefault(c, []).extend(runtime.evaluate(c, label))


def _recorded(run_dir: Path, rnd: int, keys: set[tuple]) -> dict[tuple, float]:
    """Values metrics.jsonl holds for the same (round, client, model, split, metric)."""
    path = run_dir / "metrics.jsonl"
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        k = (r["client"], r["model"], r["split"], r["metric"])
        if r["round"] == rnd and k in keys:
            out[k] = r["value"]
    return out


def evaluate_run(run_dir: str | Path, rnd: str | int | None = None, split: str = "test",
                 client: int | None = None) -> dict:
    """Re-evaluate round `rnd` (default: the last checkpoint) of a run; writes and returns the result."""
    from fedmole.algorithms import get_algorithm
    from fedmole.engines.inprocess import InProcessEngine
    from fedmole.run import build_runtime, load_federated_data

    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    ckpt = open_checkpoint(run_dir, rnd)
    cfg = ckpt.cfg
    check_client(cfg, client)
    clients = load_federated_data(cfg)
    _check_partition(ckpt, clients)
    runtime = build_runtime(cfg, clients)  # evaluates val and test together, as the run did (shared batches)
    strategy = strategy_at(ckpt, runtime.adapters)
    engine = InProcessEngine(get_algorithm(cfg.algorithm.name).Client(cfg, runtime))
    engine.load_client_states(ckpt.clients)
    ids = [client] if client is not None else list(range(cfg.federation.num_clients))

    replies, failures = engine.evaluate(ckpt.round, strategy.configure_evaluate(ckpt.round, ids))
    evals = {c: list(r.evals) for c, r in replies.items()}
    _client_models(ckpt, strategy, runtime, ids, evals)
    evals = {c: [e for e in es if e["split"] == split] for c, es in evals.items()}

    records = eval_records(ckpt.round, evals)
    keys = {(r["client"], r["model"], r["split"], r["metric"]) for r in records}
    recorded = _recorded(ckpt.run_dir, ckpt.round, keys)
    subset = len(ids) < cfg.federation.num_clients  # the run's means are over every client
    for r in records:
        mean_of_subset = subset and r["client"] is None
        r["recorded"] = None if mean_of_subset else recorded.get((r["client"], r["model"], r["split"], r["metric"]))
    result = {
        "run_dir": str(ckpt.run_dir),
        "algorithm": cfg.algorithm.name,
        "round": ckpt.round,
        "split": split,
        "clients": ids,
        "models": sorted({r["model"] for r in records}),
        "failures": {str(c): f"{kind}: {msg}" for c, (kind, msg) in sorted(failures.items())},
        "records": records,
    }
    name = f"eval_round_{ckpt.round}_{split}" + (f"_client_{client}" if client is not None else "") + ".json"
    result["path"] = str(ckpt.run_dir / name)
    atomic_write_text(ckpt.run_dir / name, json.dumps(result, indent=1))
    return result


def result_rows(result: dict) -> list[dict]:
    """One row per (model, client) with score and loss, means first; for the CLI table."""
    rows: dict[tuple, dict] = {}
    for r in result["records"]:
        if r["metric"] not in ("score", "loss"):
            continue
        row = rows.setdefault((r["model"], r["client"]), {"model": r["model"], "client": r["client"]})
        row[r["metric"]] = r["value"]
        row[f"recorded_{r['metric']}"] = r["recorded"]
    order = {GLOBAL: 0, PERSONALIZED: 1}
    return sorted(rows.values(), key=lambda x: (order.get(x["model"], 2), x["model"],
                                                -1 if x["client"] is None else x["client"]))
