"""One run of the accuracy suite, in a worker process (importable by name, as spawned workers need)."""

from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path

BASE = Path(__file__).resolve().parent / "base.yaml"


def run_one(run: dict, run_dir: str, extra: list[str] = ()) -> dict:
    """One run in this (worker) process: kept if finished, resumed if it has a checkpoint, else started anew."""
    from fedmole.config_io import load_config
    from fedmole.run import latest_checkpoint, resume_experiment, run_experiment

    run_dir = Path(run_dir)
    out = {"ok": True, "wall": 0.0, "cpu": 0.0, "error": None, "kind": "kept"}
    if (run_dir / "summary.json").is_file():
        return out
    t, c = time.perf_counter(), time.process_time()
    try:
        if run_dir.is_dir() and latest_checkpoint(run_dir) is not None:
            out["kind"] = "resumed"
            resume_experiment(run_dir, progress_mode="none")
        else:
            out["kind"] = "ran"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            run_experiment(load_config(BASE, [*run["overrides"], *extra]), run_dir, "none")
    except Exception:  # noqa: BLE001 - one failing run must not stop the suite
        out.update(ok=False, error=traceback.format_exc()[-3000:])
    out.update(wall=time.perf_counter() - t, cpu=time.process_time() - c)
    return out
