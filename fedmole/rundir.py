"""Owning a run directory: a marker says fedmole made it, a lock says who is writing it.

- Marker: `.fedmole-run` (JSON: what wrote it and when), written when a run directory is created. Only a
  directory that carries it (or, written by an earlier fedmole, holds a config.yaml and nothing but the files
  a run writes) is ever emptied by `--overwrite`; anything else (a user's folder, `..`, a home directory) is
  refused with exit code 2 and left untouched.
- Lock: an exclusive `fcntl.flock` on `.fedmole.lock` inside the directory, held for the whole run or resume.
  A second run or resume of the same directory exits with code 2 instead of interleaving its files. The OS
  releases the lock when the holding process dies, so a killed run never leaves a stale lock behind. The lock
  is re-entrant within one process (the CLI holds it and the run it starts takes it again, also from the
  Flower simulation's server thread). The lock file itself is never deleted, so a waiting process can never
  lock a different file than the holder.
- Torn JSONL lines: a process killed while appending to metrics.jsonl or comm.jsonl can leave a partial last
  line; `repair_jsonl` cuts it back to the last complete record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedmole.errors import UserError

MARKER = ".fedmole-run"
LOCK = ".fedmole.lock"
OWN = {MARKER, LOCK}  # what a fresh run directory holds before anything is written

log = logging.getLogger("fedmole")

_held: dict[Path, list] = {}  # resolved run dir -> [fd, depth]: the locks this process holds
_guard = threading.Lock()


# what a run writes: a directory written before markers existed is recognised by holding only these
RUN_ENTRIES = {"config.yaml", "partition.json", "metrics.jsonl", "metrics.csv", "comm.jsonl", "summary.json",
               "run.log", "checkpoints", "report", "tensorboard", "flowertune.json", MARKER, LOCK}
RUN_PATTERNS = ("eval_round_*.json", "peft_[0-9]*", "fedmole_[0-9]*")  # FlowerTune's model dirs: peft_/fedmole_<round>


def _run_entry(name: str) -> bool:
    return (name in RUN_ENTRIES or name.endswith(".jsonl") or any(fnmatch.fnmatch(name, p) for p in RUN_PATTERNS)
            or (name.startswith(".") and name.endswith(".tmp")))


def is_run_dir(path: Path) -> bool:
    """Whether fedmole wrote `path`: it carries the marker, or (a run of an earlier fedmole) it holds a
    config.yaml and nothing but what a run writes."""
    if (path / MARKER).is_file():
        return True
    return (path / "config.yaml").is_file() and all(_run_entry(p.name) for p in path.iterdir())


def has_content(path: Path) -> bool:
    """Whether `path` holds anything besides the marker and the lock file of a fresh run directory."""
    return path.is_dir() and any(p.name not in OWN for p in path.iterdir())


def write_marker(run_dir: Path) -> None:
    if not is_run_dir(run_dir):
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version("fedmole")
        except PackageNotFoundError:
            release = None
        (run_dir / MARKER).write_text(json.dumps({"fedmole": release, "kind": "run",
                                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (re-entrant within this process); a UserError when another process
    holds it or the directory cannot be written."""
    key = Path(run_dir).resolve()
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_lock(key), 1]
    try:
        yield
    finally:
        with _guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                os.close(_held.pop(key)[0])  # closing the descriptor releases the lock


def _lock(run_dir: Path) -> int:
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot write in run directory {run_dir}: {err.strerror}; choose a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"run directory {run_dir} is in use by another fedmole process (run or resume); wait "
                            f"for it to end, or choose another --out") from None
        raise UserError(f"cannot lock run directory {run_dir}: {err.strerror}") from None
    return fd


def lock_is_free(path: Path) -> bool:
    """Whether no process holds the lock on `path` (a missing file counts as free)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the probe's own lock


@contextlib.contextmanager
def claimed(run_dir: Path, overwrite: bool) -> Iterator[None]:
    """Make `run_dir` an empty fedmole run directory carrying the marker, and hold its lock until the block
    ends: created if missing, emptied when it holds an earlier fedmole run and `overwrite` is set. Refused
    (UserError, nothing changed) for a file, a directory that is not a fedmole run, an existing run without
    `overwrite`, one in use by another process, or a path that cannot be created."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {run_dir} is a file, not a directory; choose a directory path")
        occupied = has_content(run_dir)
    except OSError as err:
        raise UserError(f"cannot use {run_dir} as a run directory: {err.strerror}; choose another --out") from None
    if occupied:
        if not is_run_dir(run_dir):
            raise UserError(f"{run_dir} is not empty and is not a fedmole run directory (it has no {MARKER} marker), "
                            f"so fedmole will not write into it or delete it, even with --overwrite; choose another "
                            f"--out (or empty it yourself)")
        if not overwrite:
            raise UserError(f"run directory {run_dir} already holds a run; choose another --out, pass --overwrite "
                            f"to replace it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run directory {run_dir}: {err.strerror}; choose another --out") from None
    with hold(run_dir):
        if overwrite and is_run_dir(run_dir):
            for p in run_dir.iterdir():
                if p.name != LOCK:  # the lock file stays: another process may be waiting on it
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        try:
            write_marker(run_dir)
        except OSError as err:
            raise UserError(f"cannot write in run directory {run_dir}: {err.strerror}; choose a writable --out") \
                from None
        yield


def claim(run_dir: Path, overwrite: bool) -> None:
    """`claimed` without keeping the lock (the run takes it again)."""
    with claimed(run_dir, overwrite):
        pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (no newline, or not JSON) off a JSONL file; returns the bytes removed. A bad
    line before the last is not a torn write: a UserError names it."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends in a newline
    keep = len(data) - len(tail)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not a complete JSON record (the file was changed by hand?); "
                                f"repair or remove that line, then resume") from None
            keep -= len(line) + 1
    if keep == len(data):
        return 0
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    log.warning("%s: cut a torn last line (%d bytes) left by an interrupted write", path, len(data) - keep)
    return len(data) - keep
