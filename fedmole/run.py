"""Orchestration: the one round loop every engine runs, the run directory, checkpoints and the summary.

Round r (1-based):
  1. sample the round's clients (seeded by (seed, r); all clients by default);
  2. the strategy plans one payload per client; the engine runs local training and returns the replies
     (failed clients are recorded and left out);
  3. the strategy aggregates the replies into the global state;
  4. if evaluation is due, the global model (when the method has one) is evaluated on every client;
     personalised evaluations arrive inside the training replies;
  5. metrics are appended and an atomic checkpoint is written.

Run directory: config.yaml (resolved), partition.json, metrics.jsonl, summary.json, run.log,
checkpoints/round_NNNN/ (written to a temporary directory, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedmole.adapters.state import state_digest
from fedmole.algorithms.base import ClientState, Reply
from fedmole.config import Config, dump_config
from fedmole.errors import UserError
from fedmole.paths import atomic_write_text
from fedmole.reporting.metrics import MetricsLog, select_model, summarize
from fedmole.reporting.progress import RunProgress

log = logging.getLogger("fedmole")


# ------------------------------------------------------------------------------------------- helpers
def sample_clients(cfg: Config, rnd: int) -> list[int]:
    n, k = cfg.federation.num_clients, cfg.clients_per_round
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng([cfg.federation.seed, rnd, 0x5A])
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def eval_due(cfg: Config, rnd: int) -> bool:
    return rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds


def prepare_run_dir(cfg: Config, out: str | Path | None, config_path: str | Path | None, overwrite: bool) -> Path:
    if out is None:
        name = cfg.output.name or f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(cfg.output.dir) / name
    run_dir = Path(out)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"run directory {run_dir} already holds a run; choose another --out, pass --overwrite to replace it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    return handler


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: Path, rnd: int, strategy, engine, metrics: MetricsLog, keep_last: int | None) -> Path:
    """Write checkpoints/round_NNNN atomically (temp dir + rename) and prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"round_{rnd:04d}"
    tmp = root / f".tmp-round_{rnd:04d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    server_tensors, server_meta = strategy.state_dict()
    save_file({k: v.contiguous() for k, v in server_tensors.items()}, tmp / "server.safetensors")
    client_tensors, client_meta = {}, {}
    for cid, st in engine.client_states().items():
        client_meta[str(cid)] = st.meta
        for k, v in st.tensors.items():
            client_tensors[f"{cid}::{k}"] = v.contiguous()
    save_file(client_tensors, tmp / "clients.safetensors")
    meta = {"round": rnd, "metrics_records": len(metrics.records), "server": server_meta, "clients": client_meta}
    (tmp / "state.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in sorted(root.glob("round_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict, dict[int, ClientState]]:
    """(meta, server tensors, client states) of a checkpoint directory."""
    meta = json.loads((path / "state.json").read_text())
    server = load_file(path / "server.safetensors")
    states: dict[int, ClientState] = {int(c): ClientState({}, m) for c, m in meta["clients"].items()}
    for k, v in load_file(path / "clients.safetensors").items():
        cid, name = k.split("::", 1)
        states.setdefault(int(cid), ClientState()).tensors[name] = v
    return meta, server, states


# ---------------------------------------------------------------------------------------- round loop
class Federation:
    def __init__(self, cfg: Config, run_dir: Path, strategy, engine, progress: RunProgress):
        self.cfg = cfg
        self.run_dir = run_dir
        self.strategy = strategy
        self.engine = engine
        self.progress = progress
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.failures = 0

    def _record_train(self, rnd: int, replies: dict[int, Reply], failures: dict[int, str], info: dict) -> None:
        recs = []
        for cid, reply in sorted(replies.items()):
            for metric, value in reply.metrics.items():
                recs.append({"round": rnd, "client": cid, "model": "local", "split": "train", "metric": metric,
                             "value": value})
        for cid in sorted(failures):
            recs.append({"round": rnd, "client": cid, "model": None, "split": "round", "metric": "client_failed",
                         "value": 1})
        for metric, value in info.items():
            recs.append({"round": rnd, "client": None, "model": None, "split": "round", "metric": metric,
                         "value": value})
        self.metrics.add(recs)
        self.metrics.log_evals(rnd, {c: r.evals for c, r in replies.items() if r.evals})

    def evaluate_global(self, rnd: int) -> None:
        plans = self.strategy.configure_evaluate(rnd, list(range(self.cfg.federation.num_clients)))
        if not plans:
            return
        replies, failures = self.engine.evaluate(rnd, plans)
        self.failures += len(failures)
        self.metrics.log_evals(rnd, {c: r.evals for c, r in replies.items()})

    def run_round(self, rnd: int) -> None:
        cfg = self.cfg
        self.progress.round(rnd, cfg.federation.rounds)
        clients = sample_clients(cfg, rnd)
        due = eval_due(cfg, rnd)
        plans = self.strategy.configure_train(rnd, clients, due)
        replies, failures = self.engine.train(rnd, plans)
        self.failures += len(failures)
        if not replies:
            first = next(iter(failures.values()), "no client was planned")
            raise RuntimeError(f"round {rnd}: every client failed, the global state is unchanged; first error: {first}")
        info = self.strategy.aggregate_train(rnd, replies) or {}
        self._record_train(rnd, replies, failures, {"clients_replied": len(replies), **info})
        self.metrics.add([{"round": rnd, "model": None, "split": "round", **r} for r in self.strategy.round_records(rnd)])
        self.write_artifacts(rnd)
        if due:
            self.evaluate_global(rnd)
        if rnd % cfg.checkpoint.every == 0 or rnd == cfg.federation.rounds:
            save_checkpoint(self.run_dir, rnd, self.strategy, self.engine, self.metrics, cfg.checkpoint.keep_last)

    def write_artifacts(self, rnd: int) -> None:
        for name, record in self.strategy.artifacts(rnd).items():
            with (self.run_dir / name).open("a") as fh:
                fh.write(json.dumps({"round": rnd, **record}) + "\n")

    def run(self, start_round: int = 1) -> None:
        if start_round == 1:
            self.write_artifacts(0)
            if self.cfg.eval.init:
                self.evaluate_global(0)
        for rnd in range(start_round, self.cfg.federation.rounds + 1):
            self.run_round(rnd)

    def final_state(self) -> dict[str, torch.Tensor]:
        """The state the digest covers: the global trainable state, or, for methods without one (local),
        every client's state under `client/{id}/...`."""
        if self.strategy.has_global:
            return self.strategy.global_state
        return {f"client/{cid}/{k}": v for cid, st in self.engine.client_states().items() for k, v in st.tensors.items()}


# ------------------------------------------------------------------------------------------- the run
def load_federated_data(cfg: Config):
    """Examples -> per-client partitions (before any model is loaded, so data errors come first)."""
    from fedmole.data.partition import partition
    from fedmole.data.sources import load_examples

    examples = load_examples(cfg.data, cfg.partition_seed)
    return partition(examples, cfg.partition, cfg.federation.num_clients, cfg.partition_seed)


def build_runtime(cfg: Config, clients):
    """Tokenizer + frozen base model + the method's adapters + every client's encoded data."""
    from fedmole.algorithms import get_algorithm
    from fedmole.client.runtime import ClientRuntime
    from fedmole.models import load_model, load_tokenizer, resolve_device

    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.train.precision, cfg.train.device, vocab_size=len(tokenizer))
    adapters = get_algorithm(cfg.algorithm.name).build_adapters(model, cfg)
    runtime = ClientRuntime(cfg, model, tokenizer, adapters, device)
    runtime.add_clients(clients)
    return runtime


def run_experiment(cfg: Config, run_dir: Path, progress_mode: str | None = None) -> dict:
    """Run a whole federation in-process and write the run directory; returns the summary."""
    from fedmole.algorithms import get_algorithm
    from fedmole.data.partition import manifest
    from fedmole.engines.inprocess import InProcessEngine

    t0 = time.time()
    handler = _attach_log_file(run_dir)
    try:
        dump_config(cfg, run_dir / "config.yaml")
        clients = load_federated_data(cfg)
        atomic_write_text(run_dir / "partition.json", json.dumps(manifest(clients, cfg.partition.by), indent=1))
        runtime = build_runtime(cfg, clients)
        algo = get_algorithm(cfg.algorithm.name)
        strategy = algo.Server(cfg, runtime.adapters)
        engine = InProcessEngine(algo.Client(cfg, runtime))
        total = cfg.federation.rounds * cfg.clients_per_round * cfg.train.local_steps
        progress = RunProgress(progress_mode or cfg.output.progress, total)
        runtime.on_step = progress.step
        engine.on_client = lambda phase, cid, rnd: progress.client_phase(phase, cid)
        fed = Federation(cfg, run_dir, strategy, engine, progress)
        try:
            fed.run()
        finally:
            progress.close()
        summary = write_summary(fed, time.time() - t0, engine.name)
        return summary
    finally:
        log.removeHandler(handler)
        handler.close()


def write_summary(fed: Federation, wall: float, engine_name: str) -> dict:
    cfg, strategy = fed.cfg, fed.strategy
    sel = summarize(fed.metrics.records, cfg.eval.select_on)
    head = sel.get(strategy.headline)
    summary = {
        "algorithm": cfg.algorithm.name,
        "engine": engine_name,
        "metric": sel["metric"],
        "headline": strategy.headline,
        "rounds_completed": cfg.federation.rounds,
        "selected_round": head["selected_round"] if head else None,
        "personalized": sel["personalized"],
        "global": sel["global"],
        "clients_failed": fed.failures,
        "wall_seconds": round(wall, 2),
        "state_digest": state_digest(fed.final_state()),
        **strategy.summary_extra(),
    }
    # models evaluated under other labels (e.g. FLAME's tier-wise `global_k2`), selected the same way
    other = sorted({r["model"] for r in fed.metrics.records if r["split"] == "test"}
                   - {None, "local", "personalized", "global"})
    if other:
        summary["other_models"] = {m: select_model(fed.metrics.records, m, cfg.eval.select_on) for m in other}
    atomic_write_text(fed.run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
