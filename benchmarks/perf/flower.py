"""Round wall time through Flower's simulation engine vs the in-process engine, side by side in one run.

SmolLM2-135M-Instruct, FedAMoLE, 4 clients (one WordNet task each), the same config through both engines
(`train.num_threads=1`, checkpoints every round). For each engine:

- `wall`: the whole call as the user sees it (for flower-sim: Ray start, actors, ServerApp, shutdown);
- `setup_and_round_1`: the run's wall time at the end of round 1 (data, model load, round 1), and
  `round_2`: the steady-state wall time of round 2 (difference of the checkpoints' wall clocks);
- `outside_run`: `wall` minus the run's own wall time (for flower-sim: Ray and Flower start-up and shutdown).

Then where the difference goes:

- `imports_per_process` and `model_load_per_process`: starting a Python process with torch/transformers/flwr
  and building the client runtime (tokenizer + SmolLM2 + adapters), which every ClientApp process (Ray actor)
  pays once more than the in-process engine, where server and clients share one runtime;
- `data_load_per_client`: loading and partitioning the data set, which a ClientApp does for each client it
  first serves (the in-process engine does it once for all clients);
- `serialisation`: one round's payloads and replies turned into Flower records and protobuf bytes and back
  (what every message costs on top of the in-process engine, which passes tensors by reference), with sizes;
- `round_2_overhead`: flower-sim's round 2 minus in-process round 2, and the part of it explained by
  serialisation.

    python -m benchmarks.perf.flower [--rounds 2] [--steps 1] [--actors 1] [--repeats 1] [--model smollm2-135m]

With `--repeats N` the engines run alternately (A B, B A, ...) and medians are reported, so drift in the
machine's load hits both alike; the 1-minute load average before each run is recorded (on a shared machine
a single pair of runs is noisy).

Writes the result under "flower" in benchmarks/results/perf.json. CPU heavy: minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import record
from fedmole.config_io import load_config

ROOT = Path(__file__).resolve().parents[2]


def _config(args):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name={args.model}", "federation.num_clients=4", f"federation.rounds={args.rounds}",
        "algorithm.num_experts=8", "algorithm.expert_choices=2", "algorithm.max_experts=6",
        f"train.local_steps={args.steps}", "train.num_threads=1", "data.max_examples=800",
        "eval.max_examples=4", "eval.generation.max_new_tokens=4", "eval.every=1000",
        "checkpoint.every=1", "checkpoint.keep_last=null", "output.progress=none",
        f"flower.sim_actors={args.actors}",
    ])


def _round_walls(run_dir: Path) -> list[float]:
    """Wall seconds of the run at the end of each round (from the checkpoints)."""
    walls = []
    for ckpt in sorted((run_dir / "checkpoints").glob("round_*")):
        walls.append(json.loads((ckpt / "state.json").read_text())["wall_seconds"])
    return walls


def run_engine(engine: str, cfg, root: Path) -> dict:
    from fedmole.run import prepare_run_dir, run_experiment

    run_dir = prepare_run_dir(cfg, root / engine, None, False)
    t = time.perf_counter()
    if engine == "flower-sim":
        from fedmole.engines.flower.simulation import run_flower_sim

        summary = run_flower_sim(cfg, run_dir, "none")
    else:
        summary = run_experiment(cfg, run_dir, "none")
    wall = time.perf_counter() - t
    walls = _round_walls(run_dir)
    rounds = [b - a for a, b in zip(walls, walls[1:])]
    return {"wall": wall, "run_wall": summary["wall_seconds"], "outside_run": wall - summary["wall_seconds"],
            "setup_and_round_1": walls[0], "later_rounds": rounds,
            "round_2": rounds[0] if rounds else None, "state_digest": summary["state_digest"]}


def run_alternately(cfg, repeats: int) -> dict[str, dict]:
    """Each engine `repeats` times, alternating the order; per engine the median of every timing."""
    import os
    import statistics

    samples: dict[str, list[dict]] = {"inprocess": [], "flower-sim": []}
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        for i in range(repeats):
            order = list(samples) if i % 2 == 0 else list(samples)[::-1]
            for engine in order:
                load = os.getloadavg()[0]
                samples[engine].append({**run_engine(engine, cfg, Path(tmp) / f"{i}"), "load_1min_before": load})
    out = {}
    for engine, runs in samples.items():
        keys = ("wall", "run_wall", "outside_run", "setup_and_round_1", "round_2")
        out[engine] = {k: statistics.median(r[k] for r in runs) for k in keys}
        out[engine]["state_digest"] = runs[0]["state_digest"]
        out[engine]["runs"] = runs
    return out


def model_load_seconds(cfg) -> float:
    """Build one client's runtime the way a ClientApp process does: tokenizer, base model, adapters."""
    from fedmole.run import build_runtime

    t = time.perf_counter()
    build_runtime(cfg, [])
    return time.perf_counter() - t


def data_load_seconds(cfg) -> float:
    """Load and partition the config's data set once: what a ClientApp does for each client it first serves
    (`fedmole.engines.flower.clientapp.own_partition` loads the whole data set and keeps that client's part)."""
    from fedmole.run import load_federated_data

    t = time.perf_counter()
    load_federated_data(cfg)
    return time.perf_counter() - t


def import_seconds() -> float:
    """Cold start of a Python process that imports what a ClientApp needs (torch, transformers, flwr, fedmole)."""
    import subprocess
    import sys

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, flwr, fedmole.engines.flower.clientapp, "
                    "fedmole.algorithms.fedamole"], check=True)
    return time.perf_counter() - t


def serialisation(cfg) -> dict:
    """One round's messages through Flower records + protobuf bytes and back: seconds and megabytes."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from fedmole.algorithms import get_algorithm
    from fedmole.engines.flower.records import parse_reply, payload_content, reply_content, tensors_of
    from fedmole.messages import Reply
    from fedmole.run import build_runtime, sample_clients

    runtime = build_runtime(cfg, [])
    strategy = get_algorithm(cfg.algorithm.name).Server(cfg, runtime.adapters)
    plans = strategy.configure_train(1, sample_clients(cfg, 1), False)
    seconds, down, up = 0.0, 0, 0
    for cid, payload in plans.items():
        t = time.perf_counter()
        wire = recorddict_to_proto(payload_content(cid, payload)).SerializeToString()  # server -> client
        back = recorddict_from_proto(ProtoRecordDict.FromString(wire))
        tensors = tensors_of(back.array_records.get("arrays"))
        reply = Reply(tensors=tensors, num_examples=100, metrics={"loss": 1.0})  # reply of the same size
        wire_up = recorddict_to_proto(reply_content(reply)).SerializeToString()  # client -> server
        parse_reply(recorddict_from_proto(ProtoRecordDict.FromString(wire_up)))
        seconds += time.perf_counter() - t
        down, up = down + len(wire), up + len(wire_up)
    return {"messages": len(plans), "seconds_per_round": seconds, "mb_down_per_round": down / 2 ** 20,
            "mb_up_per_round": up / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--actors", type=int, default=1, help="flower-sim Ray actors (capped at the cores)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per engine, alternating the order")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = _config(args)
    engines = run_alternately(cfg, args.repeats)
    load = model_load_seconds(cfg)
    data = data_load_seconds(cfg)
    imports = import_seconds()
    ser = serialisation(cfg)
    ip, fl = engines["inprocess"], engines["flower-sim"]
    result = {
        "config": f"{args.model}, fedamole, 4 clients, {args.rounds} rounds x {args.steps} local steps, "
                  f"1 torch thread, {args.actors} Ray actor(s), median of {args.repeats} alternating run(s) each",
        "engines": engines,
        "ratio_wall": fl["wall"] / ip["wall"],
        "ratio_round_2": fl["round_2"] / ip["round_2"] if ip["round_2"] else None,
        "same_state_digest": len({r["state_digest"] for e in engines.values() for r in e["runs"]}) == 1,
        "where_the_difference_goes": {
            "total_extra_wall": fl["wall"] - ip["wall"],
            "startup_outside_run": fl["outside_run"] - ip["outside_run"],
            "setup_and_round_1_extra": fl["setup_and_round_1"] - ip["setup_and_round_1"],
            "model_load_per_process": load,
            "imports_per_process": imports,
            "data_load_per_client": data,
            "data_load_all_clients": data * cfg.federation.num_clients,
            "serialisation": ser,
            "round_2_overhead": (fl["round_2"] - ip["round_2"]) if ip["round_2"] else None,
        },
    }
    path = record("flower", result)
    w = result["where_the_difference_goes"]
    print(f"{result['config']}")
    print(f"{'':24}{'inprocess':>12}{'flower-sim':>12}")
    for key in ("wall", "outside_run", "setup_and_round_1", "round_2"):
        print(f"{key:24}{ip[key]:12.1f}{fl[key]:12.1f}")
    print(f"ratio flower-sim / inprocess: wall {result['ratio_wall']:.2f}x, round 2 "
          f"{result['ratio_round_2']:.2f}x; same state_digest: {result['same_state_digest']}")
    print(f"extra wall {w['total_extra_wall']:.1f} s = start-up/shutdown outside the run "
          f"{w['startup_outside_run']:.1f} s + setup & round 1 {w['setup_and_round_1_extra']:.1f} s "
          f"+ later rounds")
    print(f"  per ClientApp process: imports {imports:.1f} s, model load {load:.1f} s; per client it first serves: "
          f"data load + partition {data:.1f} s (x {cfg.federation.num_clients} clients = "
          f"{data * cfg.federation.num_clients:.1f} s)")
    print(f"serialisation per round: {ser['seconds_per_round']:.2f} s for {ser['messages']} messages "
          f"({ser['mb_down_per_round']:.1f} MB down, {ser['mb_up_per_round']:.1f} MB up); round-2 overhead "
          f"{w['round_2_overhead']:.1f} s")
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
