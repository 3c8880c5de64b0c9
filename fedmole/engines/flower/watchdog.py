"""Nothing of a Flower simulation outlives the process that started it, even when that process is killed.

`run_flower_sim` runs inside a `SimulationGuard`:

- one temporary directory `<tmp>/fedmole-sim-XXXXXXXX/` holds everything the simulation writes outside the
  run directory (FLWR_HOME, the client states, Ray's session files); its `.owner` file is locked
  (`fcntl.flock`) by the owning process for as long as the simulation runs, and the OS drops that lock when
  the process dies;
- at start, the `fedmole-sim-*` directories of earlier simulations whose `.owner` lock is free (their process
  died before it could clean up) are removed;
- a watchdog process (`python -m fedmole.engines.flower.watchdog PARENT_PID DIR`, in its own session so a signal to
  the terminal's process group does not take it along) records every descendant of the parent twice a
  second. When the parent dies, even by SIGKILL, it stops them (SIGTERM, a grace period, SIGKILL), with
  any process they started since, and removes the directory. After a normal end (or Ctrl-C) the parent
  stops its own processes and removes the directory, and the watchdog is stopped with them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fedmole.engines.flower.procs import package_root, terminate_then_kill
from fedmole.rundir import lock_is_free

PREFIX = "fedmole-sim-"
OWNER = ".owner"
INTERVAL = 0.5  # seconds between the watchdog's scans


def remove_stale(root: Path | None = None, min_age: float = 60.0) -> list[Path]:
    """Remove the simulation directories under `root` (default: the system temp dir) whose owner died;
    a directory without an `.owner` file yet counts only after `min_age` seconds (it may be starting)."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for d in root.glob(PREFIX + "*"):
        owner = d / OWNER
        if not d.is_dir() or (not owner.exists() and time.time() - d.stat().st_mtime < min_age):
            continue
        if lock_is_free(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class SimulationGuard:
    """The temporary directory (`.path`) and the watchdog of one simulation; see the module docstring."""

    def __init__(self, root: Path | None = None):
        remove_stale(root)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
        self._fd = os.open(self.path / OWNER, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "fedmole.engines.flower.watchdog", str(os.getpid()), str(self.path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONPATH": _pythonpath()})

    def __enter__(self) -> "SimulationGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.watchdog.poll() is None:
            self.watchdog.terminate()
            self.watchdog.wait(timeout=10)
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def _pythonpath() -> str:
    """The directory holding this fedmole package first, so the watchdog runs the same code."""
    root = str(package_root())
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return os.pathsep.join([root, *rest])


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def watch(parent: int, directory: Path, interval: float = INTERVAL) -> None:
    """Record the descendants of `parent` until it dies; then stop them and remove `directory`."""
    me = os.getpid()
    try:
        root = psutil.Process(parent)
    except psutil.Error:
        return
    seen: dict[int, float] = {}  # pid -> create time (a reused pid is not the same process)
    while True:
        try:
            alive = root.is_running() and root.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            break
        for p in _descendants(root):
            if p.pid != me and p.pid not in seen:
                try:
                    seen[p.pid] = p.create_time()
                except psutil.Error:
                    pass
        time.sleep(interval)
    victims: dict[int, psutil.Process] = {}
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                victims[pid] = p
                victims.update({c.pid: c for c in _descendants(p) if c.pid != me})
        except psutil.Error:
            pass
    terminate_then_kill(list(victims.values()), grace=3.0)
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
