"""flower-sim: the federation on Flower's simulation engine (Ray), inside the CLI process.

`run_flower_sim` binds the fedmole settings into the ServerApp and ClientApp and runs them with
`flwr.simulation.run_simulation`: `flower.sim_actors` Ray actors of one CPU each (never more CPUs than the
machine has) and, on GPUs, `flower.gpus_per_client` of a GPU each. Everything the simulation writes outside the
run directory (FLWR_HOME, the client states, Ray's session files) lives in one temporary directory, and every
process it starts is stopped by PID at the end (`procs.ProcessTracker`), also when this process is killed
(`watchdog.py`). It runs the ServerApp, so like it this module sits above `fedmole.run`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from fedmole.config import Config
from fedmole.engines.flower.clientapp import make_client_app
from fedmole.engines.flower.engine import STOP
from fedmole.engines.flower.procs import ProcessTracker
from fedmole.engines.flower.runconfig import config_text
from fedmole.engines.flower.serverapp import make_server_app
from fedmole.engines.flower.watchdog import SimulationGuard
from fedmole.errors import RunFailed, UserError

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}


def sim_backend_config(cfg: Config) -> dict:
    """Ray resources: `flower.sim_actors` actors of one CPU each, never more CPUs than the machine has (asking
    Ray for more than exists leaves an empty actor pool and a hung simulation), and `gpus_per_client` of a GPU
    each (`gpus_for_actors`): Ray then places the actors over every visible GPU and sets each actor's
    CUDA_VISIBLE_DEVICES to its own, so a client's `cuda` is its actor's GPU."""
    cores = os.cpu_count() or 1
    actors = max(1, min(cfg.flower.sim_actors, cores, cfg.federation.num_clients))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per_actor = gpus_for_actors(cfg, actors, visible)
    return {"client_resources": {"num_cpus": 1, "num_gpus": per_actor},
            "init_args": {"num_cpus": actors, "num_gpus": visible if per_actor else 0, "include_dashboard": False}}


def gpus_for_actors(cfg: Config, actors: int, visible: int) -> float:
    """The GPUs (a fraction below 1, or whole GPUs) Ray reserves for each of `actors` actors when `visible` GPUs
    are visible: `flower.gpus_per_client`, or by default an even spread (1 when there are GPUs enough, else
    1/ceil(actors/GPUs), rounded down to Ray's resource precision of 1e-4), or 0 on the CPU."""
    per = cfg.flower.gpus_per_client
    if per is None:
        if cfg.train.device == "cpu" or visible == 0:
            return 0.0
        per = math.floor(1e4 / math.ceil(actors / visible)) / 1e4
    if per == 0:
        return 0.0
    if visible == 0:
        raise UserError(f"flower.gpus_per_client={per} but no CUDA GPU is visible here; set "
                        f"flower.gpus_per_client=0 (or null) to run the simulation on the CPU")
    if int(visible / per + 1e-9) < 1:
        raise UserError(f"flower.gpus_per_client={per} asks for more GPUs per actor than the {visible} visible; "
                        f"use at most {visible}")
    if cfg.train.device.startswith("cuda:") and cfg.train.device != "cuda:0":
        raise UserError(f"train.device={cfg.train.device} with flower-sim on GPUs: Ray gives each actor its own GPU, "
                        f"which the actor sees as cuda:0; set train.device=cuda (or auto)")
    return per


def run_flower_sim(cfg: Config, run_dir: Path, progress_mode: str | None = None, resume: bool = False) -> dict:
    """Run the federation on Flower's simulation engine (Ray) in this process; every process it started is
    stopped by PID at the end, also on error or Ctrl-C, and by a watchdog when this process is killed
    (`watchdog.py`). Returns the summary (written to run_dir). `resume`: continue the run in
    `run_dir` from its last checkpoint (`cfg` must be that run's config)."""
    # Flower's simulation engine and Ray take seconds to import: only when a simulation runs (Flower's first,
    # which may set up Ray's environment before Ray is imported)
    from flwr.simulation import run_simulation
    import ray

    saved_env = {k: os.environ.get(k) for k in [*FLOWER_ENV, "FLWR_HOME", "OMP_NUM_THREADS"]}
    with SimulationGuard() as guard:
        home, state_dir, ray_dir = (guard.path / name for name in ("flwr", "state", "ray"))
        for d in (home, state_dir, ray_dir):
            d.mkdir()
        backend = sim_backend_config(cfg)
        backend["init_args"]["_temp_dir"] = str(ray_dir)  # Ray's session files
        os.environ.update(FLOWER_ENV)
        os.environ["FLWR_HOME"] = str(home)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        bound = {"config": config_text(cfg), "out": str(run_dir), "overwrite": False, "state-dir": str(state_dir),
                 "engine-name": "flower-sim", "progress": progress_mode or cfg.output.progress, "resume": resume}
        STOP.clear()
        try:
            with ProcessTracker():
                try:
                    run_simulation(server_app=make_server_app(bound), client_app=make_client_app(bound),
                                   num_supernodes=cfg.federation.num_clients, backend_config=backend)
                finally:
                    STOP.set()  # after Ctrl-C the ServerApp thread would otherwise wait for replies forever
                    if ray.is_initialized():
                        ray.shutdown()
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise RunFailed(f"the Flower simulation ended without writing {summary}; see {run_dir / 'run.log'}")
    return json.loads(summary.read_text())
