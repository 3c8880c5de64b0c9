"""`fedmole run CONFIG --engine flower-deploy --superlink HOST:PORT`: a run on Flower's deployment engine.

The SuperLink and the SuperNodes (one per client, `--node-config 'partition-id=i num-partitions=n'`) are
already running, possibly on other machines (docs/deployment.md). This launcher writes the Flower app of the
config (`app.write_app`) into a temporary directory, points a private FLWR_HOME at the SuperLink
(TLS when a CA certificate is given), submits the app with `flwr run APP fedmole --stream` and waits for the
run to end. The ServerApp runs on the SuperLink's machine and writes the run directory there (`out` in the
run config is this run directory's absolute path): on one machine, or with a shared file system, the summary is
read back here; otherwise it stays on the SuperLink machine.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from fedmole.config import Config
from fedmole.engines.flower.app import write_app
from fedmole.engines.flower.procs import FlowerProcesses
from fedmole.errors import RunFailed, UserError

ENGINE_NAME = "flower-deploy"


def check_superlink(address: str | None, root_certificates: str | Path | None) -> tuple[str, Path | None]:
    """(address, CA path) after checking them, or a UserError saying what to pass."""
    if not address:
        raise UserError("--engine flower-deploy needs the SuperLink's address: --superlink HOST:PORT "
                        "(the --host/--port of `flower-superlink`, 127.0.0.1:8000 by default)")
    m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", address.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"--superlink {address!r} is not HOST:PORT (e.g. 127.0.0.1:8000 or superlink.example.org:8000)")
    ca = None
    if root_certificates is not None:
        ca = Path(root_certificates).expanduser().resolve()
        if not ca.is_file():
            raise UserError(f"--root-certificates {root_certificates}: no such file; pass the CA certificate (PEM) "
                            f"that signed the SuperLink's certificate (`fedmole flower certs` writes ca.crt)")
        if b"BEGIN CERTIFICATE" not in ca.read_bytes()[:4096]:
            raise UserError(f"--root-certificates {root_certificates} is not a PEM certificate")
    return address.strip(), ca


def run_flower_deploy(cfg: Config, run_dir: Path, superlink: str | None, root_certificates: str | Path | None = None,
                      timeout: float | None = None, echo=print, resume: bool = False) -> dict:
    """Run `cfg` on the SuperLink at `superlink` and return the summary written to `run_dir`. With `resume`,
    the ServerApp continues the run in `run_dir` from its last checkpoint (`cfg` is that run's config).

    `timeout` (seconds, None = no limit) bounds the whole `flwr run`; on timeout, error or Ctrl-C the `flwr`
    process is stopped (the run on the SuperLink is then stopped with `flwr stop`)."""
    address, ca = check_superlink(superlink, root_certificates)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedmole-app-") as app_dir, FlowerProcesses() as fl:
        summary = run_dir / "summary.json"
        before = summary.stat().st_mtime_ns if summary.is_file() else None  # a summary from an earlier session
        write_app(cfg, app_dir, str(run_dir), ENGINE_NAME, {"resume": True} if resume else None)
        fl.connect(address, ca)
        try:
            result = fl.run_app(app_dir, timeout=timeout or 10 ** 7, echo=echo, check=False)
        except BaseException:
            _stop_runs(fl)
            raise
        written = summary.is_file() and summary.stat().st_mtime_ns != before
        if result.returncode != 0 or not written:
            detail = "\n".join(result.stdout.splitlines()[-25:])
            where = (f"{summary} was not written" if result.returncode == 0 else
                     f"`flwr run` failed with code {result.returncode}")
            raise RunFailed(f"the Flower run on {address} did not complete: {where}. If the SuperLink runs on "
                               f"another machine, the run directory is there ({run_dir}). Last output:\n{detail}")
    return json.loads(summary.read_text())


def _stop_runs(fl: FlowerProcesses) -> None:
    """Stop the runs this launcher submitted (`flwr stop RUN_ID`), so an interrupted launch leaves no ServerApp."""
    log = fl.logs / "flwr.log"
    ids = re.findall(r"Successfully started run (\d+)", log.read_text()) if log.exists() else []
    for run_id in ids:
        try:
            fl.flwr("stop", run_id, "fedmole", timeout=60, check=False)
        except (TimeoutError, OSError):
            pass
