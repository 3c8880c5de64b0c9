"""Shared bits of the benchmarks: where results go, machine facts, robust timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def record(name: str, result: dict, file: str = "perf.json") -> Path:
    """Merge `result` under `name` into benchmarks/results/<file> (one file for the whole suite)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / file
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each fn, run alternately `repeats` times so drift hits every contender alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
