"""Orchestration: the one round loop every engine runs, the run directory, checkpoints and the summary.

Round r (1-based):
  1. sample the round's clients (seeded by (seed, r); all clients by default);
  2. the strategy plans one payload per client; the engine runs local training and returns the replies
     (failed clients are recorded and left out);
  3. the strategy aggregates the replies into the global state;
  4. if evaluation is due, the global model (when the method has one) is evaluated on every client (or on
     `eval.clients` of them); personalised evaluations arrive inside the training replies;
  5. metrics are appended and an atomic checkpoint is written.

With `eval.test: selected` the rounds evaluate validation only and the clients keep snapshots of what they
evaluated (client/snapshots.py); after the last round every client tests, per model, the snapshot of the
round selected on validation and of the last round. Test results carry per-example outcomes
(outcomes.jsonl), in either mode.

Every message's serialised bytes are recorded in comm.jsonl (fedmole/comm.py); with `comm.budget_mb` a
round whose worst-case traffic would pass the budget is not started and the run ends after the previous one.

Run directory: config.yaml (resolved), partition.json, metrics.jsonl, metrics.csv, comm.jsonl, summary.json,
outcomes.jsonl, run.log, checkpoints/round_NNNN/ (written to a temporary directory, then renamed; the
clients' states in clients/, one file each), and while an in-process run goes, client_states/ (its clients'
states on disk, client/store.py; removed at the end, the last checkpoint holds them).

Memory does not grow with the number of clients beyond their data and a few numbers per client: client
states are on disk (the round's clients cached), the logs keep running totals and the means over clients in
memory, a checkpoint links the states' files, and `eval.clients` bounds the global evaluation (design.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedmole.adapters.state import digest_items, state_digest
from fedmole.algorithms.validate import Limits, bound_update, check_evaluation, check_reply, wire_problem
from fedmole.comm import MB, CommLog, specs_of, transfer
from fedmole.config import Config
from fedmole.config_io import dump_config
from fedmole.errors import UserError
from fedmole.faults import plan_fault
from fedmole.messages import ClientState, Payload, Reply
from fedmole.paths import atomic_write_text
from fedmole.client import snapshots
from fedmole.client.store import StateStore
from fedmole.engines.base import Engine
from fedmole.reporting.metrics import (
    MetricsLog,
    OutcomesLog,
    best_val_round,
    fact_record,
    metric_record,
    round_record,
    select_model,
    summarize,
)
from fedmole.reporting.progress import RunProgress
from fedmole.rundir import claim, hold, repair_jsonl, sha256_file, write_marker

if TYPE_CHECKING:
    from fedmole.client.runtime import ClientRuntime

log = logging.getLogger("fedmole")
CLIENTS = "clients"  # a checkpoint's directory of client states
STATES = "client_states"  # the in-process engine's store in the run directory


# ------------------------------------------------------------------------------------------- helpers
def sample_clients(cfg: Config, rnd: int) -> list[int]:
    n, k = cfg.federation.num_clients, cfg.clients_per_round
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng([cfg.federation.seed, rnd, 0x5A])
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def sample_eval_clients(cfg: Config, rnd: int) -> list[int]:
    """The clients that evaluate the global model after round `rnd`: `eval.clients` of them drawn (seeded by
    (seed, rnd)), or every client."""
    n, k = cfg.federation.num_clients, cfg.eval.clients
    if k is None or k >= n:
        return list(range(n))
    rng = np.random.default_rng([cfg.federation.seed, rnd, 0xE7])
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def eval_due(cfg: Config, rnd: int) -> bool:
    return rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds


def split_sizes(run_dir: Path) -> dict[int, dict[str, int]]:
    """Each client's split sizes in the run's partition (partition.json): its train split bounds the sample
    count of its replies, its test split the per-example outcomes of a test result; {} when the run directory
    has none."""
    path = run_dir / "partition.json"
    if not path.is_file():
        return {}
    clients = json.loads(path.read_text())["clients"]
    return {int(c["client"]): {k: int(v) for k, v in c["sizes"].items()} for c in clients}


def reply_limits(cfg: Config, sizes: dict[str, int] | None) -> Limits:
    """The bounds every reply is held to; the sample count's is `replies.max_examples` when set, else the
    client's train split, and a test result's outcomes are at most its test split (`sizes`, as `split_sizes`
    gives them; None: unknown). A set `replies.max_examples` says the clients hold node-local data, which
    the partition does not describe."""
    r, sizes = cfg.replies, sizes or {}
    if r.max_examples is not None:
        return Limits(r.max_mb, r.max_value, r.max_examples)
    return Limits(r.max_mb, r.max_value, sizes.get("train"), sizes.get("test"))


def run_dir_path(cfg: Config, out: str | Path | None, config_path: str | Path | None) -> Path:
    """`--out`, else output.dir/output.name (default: the config's name and a timestamp)."""
    if out is not None:
        return Path(out)
    name = cfg.output.name or f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output.dir) / name


def prepare_run_dir(cfg: Config, out: str | Path | None, config_path: str | Path | None, overwrite: bool) -> Path:
    """The run directory, created empty with its marker; an earlier fedmole run there is replaced only with
    `overwrite` (see `fedmole.rundir.claimed`)."""
    run_dir = run_dir_path(cfg, out, config_path)
    claim(run_dir, overwrite)
    return run_dir


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # run warnings go to run.log; the console shows progress and the summary
    return handler


# ---------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_FILES = ("server.safetensors", "state.json")  # and the client states, see checkpoint_files
MANIFEST = "manifest.json"  # sha256 of every checkpoint file and of the resolved config


def resumable_config(cfg_dict: dict) -> dict:
    """The part of a resolved config a resume must keep: everything but `output` (where and how progress
    is shown) and `comm.budget_mb` (a cap decides only where a run stops, so a stopped run may go on)."""
    out = {k: v for k, v in cfg_dict.items() if k != "output"}
    out["comm"] = {**out.get("comm", {}), "budget_mb": None}
    return out


def config_digest(cfg_dict: dict) -> str:
    return hashlib.sha256(json.dumps(resumable_config(cfg_dict), sort_keys=True).encode()).hexdigest()


def save_checkpoint(run_dir: Path, rnd: int, strategy, engine: Engine, metrics: MetricsLog, keep_last: int | None,
                    wall_seconds: float = 0.0, outcomes_records: int = 0, cpu_seconds: float = 0.0,
                    seconds: dict | None = None) -> Path:
    """Write checkpoints/round_NNNN atomically (temp dir + rename) and prune old ones: server.safetensors,
    state.json and clients/client-<id>.safetensors (client/store.py's format; the in-process engine links
    its store's files there, so a checkpoint costs no copy of the clients' data). Its manifest.json holds the
    sha256 of every file and of the resolved config (in state.json), which resume verifies."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"round_{rnd:04d}"
    tmp = root / f".tmp-round_{rnd:04d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    server_tensors, server_meta = strategy.state_dict()
    save_file({k: v.contiguous() for k, v in server_tensors.items()}, tmp / "server.safetensors")
    engine.save_client_states(tmp / CLIENTS)
    config = strategy.cfg.to_dict()
    meta = {"round": rnd, "metrics_records": metrics.count, "outcomes_records": outcomes_records,
            "server": server_meta, "wall_seconds": wall_seconds, "cpu_seconds": cpu_seconds,
            "seconds": seconds or {}, "config": config}
    (tmp / "state.json").write_text(json.dumps(meta))
    manifest = {"files": {name: sha256_file(tmp / name) for name in checkpoint_files(tmp)},
                "config_sha256": config_digest(config)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in sorted(root.glob("round_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, with_snapshots: bool = False) -> tuple[dict, dict, Mapping[int, ClientState]]:
    """(meta, server tensors, client states) of a checkpoint directory; the client states are read one at a
    time when asked for. The clients' snapshots of evaluated models (`eval.test: selected`) only
    `with_snapshots` (resume needs them; a client's model does not). Reads the earlier format too (every
    client in one clients.safetensors, their meta in state.json)."""
    meta = json.loads((path / "state.json").read_text())
    server = load_file(path / "server.safetensors")
    if (path / CLIENTS).is_dir():
        states: Mapping[int, ClientState] = StateStore(path / CLIENTS)
    else:
        states = {int(c): ClientState({}, dict(m)) for c, m in meta["clients"].items()}
        for k, v in load_file(path / "clients.safetensors").items():
            cid, name = k.split("::", 1)
            states.setdefault(int(cid), ClientState()).tensors[name] = v
    return meta, server, states if with_snapshots else snapshots.Without(states)


def checkpoint_files(path: Path) -> list[str]:
    """The files of a checkpoint, relative to it: server.safetensors, state.json and the client states (one
    file per client in clients/, or the earlier single clients.safetensors)."""
    names = list(CHECKPOINT_FILES)
    if (path / CLIENTS).is_dir():
        names += sorted(f"{CLIENTS}/{p.name}" for p in (path / CLIENTS).iterdir() if p.is_file())
    else:
        names.append("clients.safetensors")
    return names


def _records_its_config(path: Path) -> bool:
    """Whether the checkpoint's state.json holds the resolved config: written by a fedmole that also writes
    the manifest, so a missing manifest was removed (even when it is the run's only checkpoint)."""
    try:
        return "config" in json.loads((path / "state.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint in `path` cannot be trusted (a missing or changed file, a config that does not
    match its digest), or None. Checkpoints of a run written before checksums existed (no checkpoint of the
    run has a manifest) are accepted unverified."""
    if not (path / MANIFEST).is_file():
        if any((p / MANIFEST).is_file() for p in path.parent.glob("round_*")) or _records_its_config(path):
            return f"{MANIFEST} is missing"
        missing = [n for n in checkpoint_files(path) if not (path / n).is_file()]
        return f"missing {', '.join(missing)}" if missing else None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not set(CHECKPOINT_FILES) <= set(files):
            return f"{MANIFEST} does not list the checkpoint's files"
        for name in [*files, *(n for n in checkpoint_files(path) if n not in files)]:
            if not (path / name).is_file():
                return f"{name} is missing"
            if name not in files:
                return f"{name} is not in {MANIFEST} (added after the checkpoint was written)"
            if sha256_file(path / name) != files[name]:
                return f"{name} does not match its checksum (changed or damaged)"
        config = json.loads((path / "state.json").read_text()).get("config")
        if config is None or config_digest(config) != manifest["config_sha256"]:
            return "its config does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    return None


def intact_checkpoint(run_dir: Path) -> tuple[Path, dict, dict, dict[int, ClientState]]:
    """The newest checkpoint that passes its checksums and loads: (path, meta, server, client states).
    Newer damaged or incomplete ones are skipped with a warning; a UserError when none is intact."""
    found = sorted(p for p in (run_dir / "checkpoints").glob("round_*") if p.is_dir())
    if not found:
        raise UserError(f"{run_dir} has no complete checkpoint to resume from; start it again with "
                        f"`fedmole run CONFIG --out {run_dir} --overwrite`")
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                return (path, *load_checkpoint(path, with_snapshots=True))
            except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
                problem = f"it cannot be loaded ({type(err).__name__}: {str(err)[:200]})"
        _warn(f"checkpoint {path.name} is not intact ({problem}); falling back to an older one")
    raise UserError(f"no intact checkpoint in {run_dir / 'checkpoints'} (each is damaged or incomplete, see the "
                    f"warnings above); start the run again with `fedmole run CONFIG --out {run_dir} --overwrite`")


def _warn(message: str) -> None:
    """A warning the user should see now (stderr) and find later (run.log)."""
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- round loop
FAILURE_KINDS = ("dropped", "crashed", "late", "failed", "rejected")


class Federation:
    def __init__(self, cfg: Config, run_dir: Path, strategy, engine: Engine, progress: RunProgress,
                 runtime: ClientRuntime | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.strategy = strategy
        self.engine = engine
        self.progress = progress
        self.runtime = runtime  # the clients' runtime when they run in this process (in-process engine)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.outcomes = OutcomesLog(run_dir / "outcomes.jsonl")
        self.deferred = cfg.eval.test == "selected"  # test only the round selected on val and the last one
        self.comm = CommLog(run_dir / "comm.jsonl", cfg.comm.dtype, cfg.comm.budget_mb)
        self.wall_before, self.started = 0.0, time.time()
        self.setup_seconds = 0.0
        self.cpu_before, self.cpu_started = 0.0, time.process_time()
        self.seconds_before: dict[str, float] = {}  # where the time went in earlier sessions (resume)
        self.rounds_completed, self.last_checkpoint, self.stopped = 0, 0, None
        self.adapted: dict[str, str] = {}  # what each adapted module of the model adapts (AdapterSet.describe)

    def cpu_seconds(self) -> float:
        """CPU time of this process spent on the run so far (all threads), earlier sessions included; the
        clients' time when they run in this process (in-process engine), not that of other processes."""
        return self.cpu_before + time.process_time() - self.cpu_started

    def seconds(self) -> dict[str, float]:
        """Where the wall time went, earlier sessions included: set-up (data, model, adapters), the clients'
        local training and evaluation (in-process engine only: the clients run here), the rest (server work,
        messages, checkpoints, artefacts)."""
        out = dict(self.seconds_before)
        out["setup"] = out.get("setup", 0.0) + self.setup_seconds
        for k, v in (self.runtime.seconds if self.runtime is not None else {}).items():
            out[k] = out.get(k, 0.0) + v
        out["other"] = max(self.wall_seconds() - sum(v for k, v in out.items() if k != "other"), 0.0)
        return {k: round(v, 2) for k, v in out.items()}

    def wall_seconds(self) -> float:
        """Wall time of the run so far, earlier sessions (before a resume) included."""
        return self.wall_before + time.time() - self.started

    def _plan(self, rnd: int, plans: dict[int, Payload]) -> dict[int, Payload]:
        """Attach injected faults to the payloads (each client gets its own config copy)."""
        out = {}
        for cid, p in plans.items():
            fault = plan_fault(self.cfg, rnd, cid)
            out[cid] = Payload(p.tensors, {**p.config, "fault": fault}) if fault else p
        return self._keep_snapshots(out)

    # ------------------------------------------------------------------ deferred test (eval.test: selected)
    def validated_models(self) -> list[str]:
        return sorted({r["model"] for r in self.metrics.means if r["split"] == "val"})

    def best_rounds(self) -> dict[str, int]:
        """Per model label, the round with the best mean validation so far (the one `summary` will select)."""
        return {m: best_val_round(self.metrics.means, m, self.cfg.eval.select_on) for m in self.validated_models()}

    def _keep_snapshots(self, plans: dict[int, Payload]) -> dict[int, Payload]:
        """Deferred test: tell every client which snapshot of each model it still needs (the best so far)."""
        if not self.deferred:
            return plans
        keep = self.best_rounds()
        return {c: Payload(p.tensors, {**p.config, "snapshot_keep": keep}) for c, p in plans.items()}

    def test_selected(self) -> None:
        """Deferred test: every client evaluates the test split on its snapshots of the round selected on
        validation and of the last validated round, for every model label."""
        last = {m: max(r["round"] for r in self.metrics.means if r["model"] == m and r["split"] == "val")
                for m in self.validated_models()}
        wanted = {m: sorted({best, last[m]}) for m, best in self.best_rounds().items()}
        if not wanted:
            return
        rnd = self.rounds_completed
        plans = {c: Payload({}, {"round": rnd, "test_snapshots": wanted}) for c in range(self.cfg.federation.num_clients)}
        replies, failures = self.engine.evaluate(rnd, self._send(rnd, "evaluate", plans))
        replies = self._receive(rnd, "evaluate", replies, rounds=wanted)
        self.metrics.add([round_record(rnd, "test_failed", 1, cid) for cid in sorted(failures)])
        self._log_evals(rnd, {c: r.evals for c, r in replies.items()})

    def _log_evals(self, rnd: int, per_client: dict[int, list[dict]]) -> None:
        """Eval results as metric records (each at its own `round` when it carries one: deferred tests) and
        their per-example outcomes."""
        by_round: dict[int, dict[int, list[dict]]] = {}
        for cid, evals in sorted(per_client.items()):
            self.outcomes.add(rnd, cid, evals)
            for e in evals:
                by_round.setdefault(e.get("round", rnd), {}).setdefault(cid, []).append(e)
        for r, evals in sorted(by_round.items()):
            self.metrics.log_evals(r, evals)

    def _accept(self, rnd: int, plans: dict[int, Payload], replies: dict[int, Reply]) -> tuple[dict, dict]:
        """Replies that pass validation (`Strategy.reply_rules`; updates bounded to `replies.max_update_norm`
        when set), and the reasons of those that do not."""
        accepted, rejected = {}, {}
        sizes = split_sizes(self.run_dir)
        for cid, reply in sorted(replies.items()):
            rules = self.strategy.reply_rules(cid, plans[cid])
            reason = check_reply(reply, rules, reply_limits(self.cfg, sizes.get(cid)))
            if reason is None:
                accepted[cid] = self._bounded(rnd, cid, reply, plans[cid], rules)
            else:
                rejected[cid] = ("rejected", reason)
                log.warning("round %s: reply of client %s rejected: %s", rnd, cid, reason)
        return accepted, rejected

    def _bounded(self, rnd: int, cid: int, reply: Reply, plan: Payload, rules) -> Reply:
        """The reply with its update scaled down to `replies.max_update_norm` (when set); its norm before
        bounding is added to its metrics as `update_norm`."""
        bound = self.cfg.replies.max_update_norm
        if bound is None:
            return reply
        reply.tensors, norm = bound_update(reply.tensors, plan.tensors, rules.statistics, bound)
        reply.metrics = {**reply.metrics, "update_norm": norm}
        if norm > bound:
            log.info("round %s: update of client %s has norm %.4g; scaled down to replies.max_update_norm=%s",
                     rnd, cid, norm, bound)
        return reply

    def _send(self, rnd: int, phase: str, plans: dict[int, Payload]) -> dict[int, Payload]:
        """Record the payloads' bytes; return them as they arrive (after `comm.dtype` compression)."""
        self.comm.log(rnd, phase, "down", {c: p.tensors for c, p in plans.items()})
        cache: dict = {}
        return {c: Payload(transfer(p.tensors, self.comm.dtype, cache), p.config) for c, p in plans.items()}

    def _receive(self, rnd: int, phase: str, replies: dict[int, Reply],
                 rounds: dict[str, list[int]] | None = None) -> dict[int, Reply]:
        """Record the replies' bytes and cast them as `comm.dtype` does. A reply whose tensors cannot be
        measured is left as it is (training: `_accept` rejects it); evaluation replies are checked here
        (`rounds`: the snapshots a deferred test asked for)."""
        ok = {c: r for c, r in replies.items() if wire_problem(r) is None}
        self.comm.log(rnd, phase, "up", {c: r.tensors for c, r in ok.items()})
        for r in ok.values():
            r.tensors = transfer(r.tensors, self.comm.dtype)
        return self._accept_evaluations(rnd, replies, rounds) if phase == "evaluate" else replies

    def _accept_evaluations(self, rnd: int, replies: dict[int, Reply],
                            rounds: dict[str, list[int]] | None = None) -> dict[int, Reply]:
        """Replies to a global evaluation (or a deferred test of the snapshot `rounds`): evaluation results
        only; the others are logged and recorded (`eval_rejected`, with the reason) and left out."""
        sizes = split_sizes(self.run_dir)
        accepted, recs = {}, []
        for cid, reply in sorted(replies.items()):
            reason = check_evaluation(reply, reply_limits(self.cfg, sizes.get(cid)), rounds)
            if reason is None:
                accepted[cid] = reply
                continue
            recs.append(round_record(rnd, "eval_rejected", 1, cid, reason))
            log.warning("round %s: evaluation reply of client %s rejected: %s", rnd, cid, reason)
        self.metrics.add(recs)
        return accepted

    def _within_budget(self, rnd: int, plans: dict[int, Payload]) -> bool:
        """Whether the round's worst case (exact download, largest allowed upload) fits the budget."""
        if self.comm.budget_bytes is None:
            return True
        worst = self.comm.worst_case({c: specs_of(p.tensors) for c, p in plans.items()},
                                     {c: self.strategy.reply_spec(c, p) for c, p in plans.items()})
        if self.comm.fits(worst):
            return True
        spent = self.comm.train_bytes()
        if rnd == 1:
            raise UserError(f"comm.budget_mb={self.cfg.comm.budget_mb} is too small for a single round: round 1 "
                            f"may need {worst / MB:.3f} MB; raise comm.budget_mb (comm.dtype=fp16 halves the traffic)")
        log.warning("round %s not started: it may need %.3f MB and %.3f of the %s MB budget are spent; the run "
                    "ends after round %s", rnd, worst / MB, spent / MB, self.cfg.comm.budget_mb, rnd - 1)
        return False

    def evaluate_global(self, rnd: int) -> None:
        plans = self.strategy.configure_evaluate(rnd, sample_eval_clients(self.cfg, rnd))
        if not plans:
            return
        replies, failures = self.engine.evaluate(rnd, self._send(rnd, "evaluate", self._keep_snapshots(plans)))
        replies = self._receive(rnd, "evaluate", replies)
        self.metrics.add([round_record(rnd, f"eval_{kind}", 1, cid) for cid, (kind, _) in sorted(failures.items())])
        self._log_evals(rnd, {c: r.evals for c, r in replies.items()})

    def run_round(self, rnd: int) -> bool:
        """Run round `rnd`; False when the communication budget does not allow it (nothing changed)."""
        cfg = self.cfg
        self.progress.round(rnd, cfg.federation.rounds)
        due = eval_due(cfg, rnd)
        before = self.strategy.state_dict() if self.comm.budget_bytes is not None else None
        plans = self._plan(rnd, self.strategy.configure_train(rnd, sample_clients(cfg, rnd), due))
        if not self._within_budget(rnd, plans):
            self.strategy.load_state_dict(*before)  # planning may have touched it (e.g. FedAMoLE's architecture)
            self.stopped = "comm budget"
            return False
        replies, failures = self.engine.train(rnd, self._send(rnd, "train", plans))
        replies = self._receive(rnd, "train", replies)
        accepted, rejected = self._accept(rnd, plans, replies)
        failures = {**failures, **rejected}
        if not accepted and failures and all(kind == "failed" for kind, _ in failures.values()):
            first = next(iter(failures.values()))[1]
            raise RuntimeError(f"round {rnd}: every client failed with an error (see run.log); first: {first}")

        recs = [round_record(rnd, f"client_{kind}", 1, cid, why if kind == "rejected" else None)
                for cid, (kind, why) in sorted(failures.items())]
        for cid, reply in accepted.items():
            recs += [metric_record(rnd, cid, "local", "train", m, v) for m, v in reply.metrics.items()]
        recs.append(round_record(rnd, "clients_replied", len(accepted)))
        if len(accepted) >= cfg.federation.min_replies:
            info = self.strategy.aggregate_train(rnd, accepted) or {}
            recs += [round_record(rnd, m, v) for m, v in info.items()]
            recs += [fact_record(rnd, r) for r in self.strategy.round_records(rnd)]
        else:
            recs.append(round_record(rnd, "round_skipped", 1))
            log.warning("round %s skipped: %d accepted replies < federation.min_replies=%d; global state unchanged",
                        rnd, len(accepted), cfg.federation.min_replies)
        if cfg.dp.enabled:
            recs.append(round_record(rnd, "dp_epsilon", self.epsilon(rnd, accepted)))
        self.metrics.add(recs)
        self._log_evals(rnd, {c: r.evals for c, r in accepted.items() if r.evals})
        self.write_artifacts(rnd)
        if due:
            self.evaluate_global(rnd)
        self.rounds_completed = rnd
        if rnd % cfg.checkpoint.every == 0 or rnd == cfg.federation.rounds:
            self.checkpoint(rnd)
        return True

    def checkpoint(self, rnd: int) -> None:
        save_checkpoint(self.run_dir, rnd, self.strategy, self.engine, self.metrics, self.cfg.checkpoint.keep_last,
                        self.wall_seconds(), self.outcomes.count, self.cpu_seconds(), self.seconds())
        self.last_checkpoint = rnd

    def epsilon(self, rnd: int, accepted: dict[int, Reply] | None = None) -> float:
        from fedmole.privacy import epsilon

        groups = [int(r.metrics.get("dp_groups", 1)) for r in (accepted or {}).values()]
        if self.metrics.dp_groups is not None:
            groups.append(self.metrics.dp_groups)
        return epsilon(self.cfg, rnd, max(groups, default=1))

    def write_artifacts(self, rnd: int) -> None:
        for name, record in self.strategy.artifacts(rnd).items():
            with (self.run_dir / name).open("a") as fh:
                fh.write(json.dumps({"round": rnd, **record}) + "\n")

    def run(self, start_round: int = 1) -> None:
        self.comm.load()  # a resume has truncated comm.jsonl to the checkpoint's round
        self.rounds_completed = self.last_checkpoint = start_round - 1
        if start_round == 1:
            self.write_artifacts(0)
            if self.cfg.eval.init:
                self.evaluate_global(0)
        for rnd in range(start_round, self.cfg.federation.rounds + 1):
            if not self.run_round(rnd):
                break
        if self.rounds_completed > self.last_checkpoint:  # stopped early between two checkpoints
            self.checkpoint(self.rounds_completed)
        if self.deferred:
            self.test_selected()

    def skips(self) -> dict[str, int]:
        counts = {kind: self.metrics.round_counts[f"client_{kind}"] for kind in FAILURE_KINDS}
        counts["rounds_skipped"] = self.metrics.round_counts["round_skipped"]
        return counts

    def final_digest(self) -> str:
        """`state_digest` of the global trainable state, or, for methods without one (local), of every
        client's state (`clients_digest`)."""
        if self.strategy.has_global:
            return state_digest(self.strategy.global_state)
        return clients_digest(self.engine.client_states())


def clients_digest(states: Mapping[int, ClientState]) -> str:
    """`state_digest` of every client's tensors (snapshots aside) named `client/{id}/...`, reading one client's
    state at a time, in the order of those names."""
    def items():
        for cid in sorted(states, key=lambda c: f"client/{c}/"):  # no such prefix is a prefix of another
            tensors = states[cid].tensors
            for k in sorted(k for k in tensors if not k.startswith(snapshots.PREFIX)):
                yield f"client/{cid}/{k}", tensors[k]
    return digest_items(items())


# ------------------------------------------------------------------------------------------- the run
def load_federated_data(cfg: Config):
    """Examples -> per-client partitions (before any model is loaded, so data errors come first)."""
    from fedmole.data.partition import partition
    from fedmole.data.sources import load_examples

    examples = load_examples(cfg.data, cfg.partition_seed)
    return partition(examples, cfg.partition, cfg.federation.num_clients, cfg.partition_seed)


def check_partition(cfg: Config, clients, run_dir: Path, consequence: str) -> str:
    """The partition manifest of `clients` as partition.json text; a UserError naming `consequence` when the
    run directory's partition.json (if any) differs, i.e. the data files changed since the run started."""
    from fedmole.data.partition import manifest

    parts = json.dumps(manifest(clients, cfg.partition.by), indent=1)
    saved = run_dir / "partition.json"
    if saved.is_file() and saved.read_text() != parts:
        raise UserError(f"the data partition differs from the one this run started with ({saved}); the data "
                        f"files changed, so {consequence}")
    return parts


def check_trainable(cfg: Config, clients, tokenizer) -> None:
    """A UserError (before any model loads) for a client none of whose training examples fits
    `train.max_length`: training drops an example whose prompt alone fills it. Stops at the first example
    that fits, so it costs one tokenisation per client in the usual case."""
    from fedmole.data.tokenize import encode_train, prompt_ids

    d, limit = cfg.data, cfg.train.max_length
    for c in clients:
        if any(encode_train(ex, tokenizer, d.prompt, limit, d.system_prompt) is not None for ex in c.train):
            continue
        shortest = min((len(prompt_ids(ex, tokenizer, d.prompt, d.system_prompt)) for ex in c.train), default=0)
        raise UserError(f"client {c.client_id}: none of its {len(c.train)} training examples fits train.max_length="
                        f"{limit} tokens (its shortest prompt has {shortest} tokens), so it has nothing to train on; "
                        f"raise train.max_length above {shortest}, or shorten the prompts (data.prompt=plain)")


def build_runtime(cfg: Config, clients, check=None):
    """Tokenizer + frozen base model + the method's adapters + every client's encoded data. The clients in
    `check` (default: `clients`) are checked to have training data that fits, before the model loads."""
    from fedmole.algorithms import get_algorithm
    from fedmole.client.runtime import ClientRuntime
    from fedmole.models import load_model, load_tokenizer, resolve_device

    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels and allocations that name no device go to cuda:N too
    tokenizer = load_tokenizer(cfg.model)
    check_trainable(cfg, clients if check is None else check, tokenizer)
    model = load_model(cfg.model, cfg.train.precision, cfg.train.device, vocab_size=len(tokenizer))
    adapters = get_algorithm(cfg.algorithm.name).build_adapters(model, cfg)
    runtime = ClientRuntime(cfg, model, tokenizer, adapters, device)
    runtime.add_clients(clients)
    return runtime


def _setup(cfg: Config, run_dir: Path, progress_mode: str | None,
           make_engine: Callable[[Config], Engine] | None = None) -> Federation:
    """Data, runtime, strategy, engine and progress display of a run (fresh or resumed).

    `make_engine(cfg)` builds a remote engine (Flower): the clients then train elsewhere, so this process
    loads the model and adapters only for the server's strategy and encodes no client data. Default: the
    in-process engine, every client on this process's runtime."""
    from fedmole.algorithms import get_algorithm
    from fedmole.engines.inprocess import InProcessEngine

    clients = load_federated_data(cfg)
    parts = check_partition(cfg, clients, run_dir, "the run cannot be resumed exactly. Start a new run")
    atomic_write_text(run_dir / "partition.json", parts)
    runtime = build_runtime(cfg, clients if make_engine is None else [], check=clients)
    algo = get_algorithm(cfg.algorithm.name)
    strategy = algo.Server(cfg, runtime.adapters)
    if make_engine is None:  # the round's clients stay in memory, the others' states on disk
        store = StateStore(run_dir / STATES, cache=cfg.clients_per_round, fresh=True)
        engine = InProcessEngine(algo.Client(cfg, runtime), store)
    else:
        engine = make_engine(cfg)
    total = cfg.federation.rounds * cfg.clients_per_round * cfg.train.local_steps
    progress = RunProgress(progress_mode or cfg.output.progress, total)
    runtime.on_step = progress.step
    engine.on_client = lambda phase, cid, rnd: progress.client_phase(phase, cid)
    engine.on_steps = progress.client_done  # clients that train elsewhere: their steps count when they reply
    fed = Federation(cfg, run_dir, strategy, engine, progress, runtime if make_engine is None else None)
    fed.adapted = runtime.adapters.describe()
    return fed


def _execute(fed: Federation, start_round: int, wall_before: float, cpu_before: float = 0.0,
             setup_seconds: float = 0.0, seconds_before: dict | None = None) -> dict:
    fed.wall_before, fed.started = wall_before, time.time()
    fed.setup_seconds, fed.seconds_before = setup_seconds, dict(seconds_before or {})
    fed.cpu_before, fed.cpu_started = cpu_before, time.process_time()
    try:
        fed.run(start_round)
        summary = write_summary(fed, fed.wall_seconds(), fed.engine.name)
        write_exports(fed)
    finally:
        fed.progress.close()
        fed.engine.close()
    return summary


def write_exports(fed: Federation) -> None:
    """metrics.csv, and TensorBoard event files when `output.tensorboard` is set."""
    from fedmole.reporting.scalars import write_metrics_csv, write_tensorboard

    write_metrics_csv(fed.metrics.records(), fed.run_dir / "metrics.csv")
    if fed.cfg.output.tensorboard:
        write_tensorboard(fed.run_dir)


def run_experiment(cfg: Config, run_dir: Path, progress_mode: str | None = None,
                   make_engine: Callable[[Config], Engine] | None = None) -> dict:
    """Run a whole federation and write the run directory; returns the summary. The clients run in this
    process unless `make_engine(cfg)` supplies another engine (see `_setup`). The run directory's lock is
    held throughout (a second run or resume of it exits with code 2)."""
    with hold(run_dir):
        write_marker(run_dir)
        handler = _attach_log_file(run_dir)
        try:
            t0, cpu0 = time.time(), time.process_time()
            dump_config(cfg, run_dir / "config.yaml")
            try:
                fed = _setup(cfg, run_dir, progress_mode, make_engine)
            except UserError:  # nothing was computed: leave the directory as it was claimed, for the next try
                for name in ("config.yaml", "partition.json", "run.log"):
                    (run_dir / name).unlink(missing_ok=True)
                raise
            return _execute(fed, 1, time.time() - t0, time.process_time() - cpu0, time.time() - t0)
        finally:
            log.removeHandler(handler)
            handler.close()


# -------------------------------------------------------------------------------------------- resume
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a renamed directory; temporary ones are ignored)."""
    done = [p for p in sorted((run_dir / "checkpoints").glob("round_*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def _truncate_artifacts(run_dir: Path, last_round: int) -> None:
    """Drop records of rounds after the checkpoint from every per-round artefact file."""
    for path in run_dir.glob("*.jsonl"):
        if path.name in ("metrics.jsonl", "outcomes.jsonl"):  # cut by record count (their checkpoint meta)
            continue
        lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x).get("round", 0) <= last_round]
        atomic_write_text(path, "".join(x + "\n" for x in lines))


def check_resumable(run_dir: Path, config_path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of the run in `run_dir`, after checking that it can be resumed with the requested config
    from an intact checkpoint (a UserError otherwise); cheap, so engines call it before starting anything."""
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    with hold(run_dir):
        return _resume_plan(run_dir, config_path, overrides)[0]


def _require_run_dir(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a fedmole run directory (no config.yaml); check the path")


def _refuse(diff: list[str], why: str, fix: str) -> None:
    if diff:
        raise UserError(f"refusing to resume: {why} (the result would match neither run):\n  " + "\n  ".join(diff)
                        + f"\n{fix}")


def _resume_plan(run_dir: Path, config_path: Path | None, overrides: list[str] | None):
    """(the run's config, the requested config, the newest intact checkpoint as `intact_checkpoint` returns
    it), after refusing a config that differs from the run's (requested with --config/--set, or config.yaml
    edited since the checkpoint was written). Only `output.*` and `comm.budget_mb` may change; a new budget
    is written to config.yaml."""
    from fedmole.config_io import load_config, validate_config

    cfg = load_config(run_dir / "config.yaml")
    requested = load_config(config_path or run_dir / "config.yaml", overrides or [])
    _refuse(config_diff(resumable_config(cfg.to_dict()), resumable_config(requested.to_dict())),
            "the requested config differs from the run's", "Start a new run with `fedmole run` to change settings")
    ckpt = intact_checkpoint(run_dir)
    saved = ckpt[1].get("config")
    if saved is not None:  # checkpoints record the config they were written with
        _refuse(config_diff(resumable_config(validate_config(saved).to_dict()), resumable_config(cfg.to_dict())),
                f"{run_dir / 'config.yaml'} was changed after checkpoint {ckpt[0].name} was written",
                "Restore the values on the left in config.yaml, or start a new run with `fedmole run`")
    if requested.comm.budget_mb != cfg.comm.budget_mb:
        log.info("resume: comm.budget_mb %s -> %s", cfg.comm.budget_mb, requested.comm.budget_mb)
        cfg.comm.budget_mb = requested.comm.budget_mb
        dump_config(cfg, run_dir / "config.yaml")
    return cfg, requested, ckpt


def resume_experiment(run_dir: Path, config_path: Path | None = None, overrides: list[str] | None = None,
                      progress_mode: str | None = None, make_engine: Callable[[Config], Engine] | None = None) -> dict:
    """Continue a run from its newest intact checkpoint; the result equals the uninterrupted run.
    `make_engine` as in `run_experiment` (the clients' states are loaded into whichever engine runs).
    Holds the run directory's lock throughout; torn last lines of the JSONL files are cut first."""
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    with hold(run_dir):
        write_marker(run_dir)
        handler = _attach_log_file(run_dir)
        try:
            for path in sorted(run_dir.glob("*.jsonl")):
                repair_jsonl(path)
            cfg, requested, (ckpt, meta, server_tensors, client_states) = _resume_plan(run_dir, config_path, overrides)
            if meta["round"] >= cfg.federation.rounds and (run_dir / "summary.json").is_file():
                return json.loads((run_dir / "summary.json").read_text())
            log.info("resuming %s after round %s (%s)", run_dir, meta["round"], ckpt.name)
            t0 = time.time()
            fed = _setup(cfg, run_dir, progress_mode or requested.output.progress, make_engine)
            fed.strategy.load_state_dict(server_tensors, meta["server"])
            fed.engine.load_client_states(client_states)
            fed.metrics.truncate(meta["metrics_records"])
            fed.outcomes.truncate(meta.get("outcomes_records", 0))
            _truncate_artifacts(run_dir, meta["round"])
            fed.progress.steps = meta["round"] * cfg.clients_per_round * cfg.train.local_steps
            return _execute(fed, meta["round"] + 1, meta.get("wall_seconds", 0.0), meta.get("cpu_seconds", 0.0),
                            time.time() - t0, meta.get("seconds"))
        finally:
            log.removeHandler(handler)
            handler.close()


def write_summary(fed: Federation, wall: float, engine_name: str) -> dict:
    cfg, strategy = fed.cfg, fed.strategy
    records = fed.metrics.summary_records(cfg.eval.select_on)
    sel = summarize(records, cfg.eval.select_on)
    head = sel.get(strategy.headline)
    summary = {
        "algorithm": cfg.algorithm.name,
        "engine": engine_name,
        "metric": sel["metric"],
        "headline": strategy.headline,
        "rounds_completed": fed.rounds_completed,
        "stopped": fed.stopped,
        "selected_round": head["selected_round"] if head else None,
        "personalized": sel["personalized"],
        "global": sel["global"],
        "skipped": fed.skips(),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(fed.cpu_seconds(), 2),
        "seconds": fed.seconds(),
        "state_digest": fed.final_digest(),
        "comm": fed.comm.totals(),
        "adapted": fed.adapted,
        **strategy.summary_extra(),
    }
    if cfg.dp.enabled:
        summary["dp"] = {"epsilon": fed.epsilon(cfg.federation.rounds), "delta": cfg.dp.delta,
                         "noise_multiplier": cfg.dp.noise_multiplier, "clip_norm": cfg.dp.clip_norm,
                         "granularity": cfg.dp.granularity}
    # models evaluated under other labels (e.g. FLAME's tier-wise `global_k2`), selected the same way
    other = sorted({r["model"] for r in fed.metrics.means if r["split"] == "test"}
                   - {None, "local", "personalized", "global"})
    if other:
        summary["other_models"] = {m: select_model(records, m, cfg.eval.select_on) for m in other}
    atomic_write_text(fed.run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
