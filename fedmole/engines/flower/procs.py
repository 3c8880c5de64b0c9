"""Starting and stopping Flower's deployment processes on this machine (SuperLink, SuperNodes, `flwr run`).

Used by the tests, the `flower-deploy` launcher, the operator helpers (`fedmole flower certs|keys`) and the
benchmark. Everything a `FlowerProcesses` starts runs with:

- a private `FLWR_HOME` (Flower's state, installed apps and the `config.toml` of SuperLink connections),
  never the user's own;
- the offline environment (no telemetry, no update check, no runtime dependency installation, Hugging Face
  offline) and a `PYTHONPATH` that puts the fedmole package first;
- its own process group and a log file per process.

`stop()` ends exactly the processes it started and the processes they spawned (Flower detaches its SuperExec,
`flwr-serverapp` and `flwr-clientapp` processes into new sessions, so the tree is read by parent PID):
SIGTERM, a grace period, then SIGKILL. It runs on error and
on exit (context manager and `atexit`). Nothing is ever matched by name. `ProcessTracker` does the same for a
process that runs Flower in-process (flower-sim, `simulation.py`): it records every process started below
this one while it runs and stops the survivors by PID at the end.

TLS: `make_certificates` writes a self-signed CA and a server certificate signed by it (SAN = the server's
IPs / DNS names) with the `cryptography` package (a dependency of flwr). SuperNode authentication:
`make_auth_keys` writes an EC key pair in the OpenSSH format Flower 1.41 reads.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import fedmole
from fedmole.errors import UserError

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else the SuperLink `uv sync`s the app's deps
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
CONNECTION = "fedmole"  # name of the SuperLink connection written into FLWR_HOME/config.toml


def package_root() -> Path:
    """The directory holding the `fedmole` package this process imports (a worktree or site-packages)."""
    return Path(fedmole.__file__).resolve().parents[1]


def flower_bin(name: str) -> str:
    """A Flower executable of this Python environment (`flower-superlink`, `flwr`, ...)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise UserError(f"`{name}` not found next to {sys.executable}; install Flower into this environment "
                        f"(pip install 'flwr[simulation]==1.41.0')")
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, netns: str | None = None) -> bool:
    """Whether a TCP connection to host:port succeeds, from this machine or from inside network namespace
    `netns` (where the address may exist only there)."""
    if netns is not None:
        probe = [*netns_exec(netns), "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]
        return subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def netns_exec(netns: str | None) -> list[str]:
    """The command prefix that runs a program inside Linux network namespace `netns` (none for None)."""
    return [] if netns is None else ["ip", "netns", "exec", netns]


def flower_env(flwr_home: Path, pythonpath: Path | None = None, extra: dict | None = None) -> dict[str, str]:
    """The environment of every Flower process: offline, a private FLWR_HOME, fedmole first on PYTHONPATH."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    root = str(pythonpath or package_root())
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # flower-superexec
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                 if p and p != root]])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def terminate_then_kill(procs: list, grace: float = 5.0) -> None:
    """SIGTERM every process, SIGKILL those still alive after `grace` seconds, and reap them."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


class ProcessTracker:
    """Remembers every process started below this one while it runs (a background poll, so processes that
    are re-parented later are still known), and stops the survivors by PID at the end."""

    def __init__(self, interval: float = 0.5):
        self._me = psutil.Process()
        self._before = {p.pid for p in self._me.children(recursive=True)}
        self.seen: dict[int, float] = {}  # pid -> create_time (guards against PID reuse)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _scan(self) -> None:
        for p in self._me.children(recursive=True):
            if p.pid not in self._before and p.pid not in self.seen:
                try:
                    self.seen[p.pid] = p.create_time()
                except psutil.Error:
                    pass

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self._scan()

    def __enter__(self) -> "ProcessTracker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()
        self.stop_all()

    def alive(self) -> list:
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def stop_all(self, grace: float = 5.0) -> None:
        terminate_then_kill(self.alive(), grace)


# ------------------------------------------------------------------------------------------------ TLS

@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA certificate every client trusts, and the server's certificate and private key."""

    ca: Path
    cert: Path
    key: Path


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_certificates(out_dir: str | Path, hosts: tuple[str, ...] | list[str] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> Certificates:
    """Write `ca.crt`, `server.pem` and `server.key` into `out_dir`: a self-signed CA (EC P-256) and a server
    certificate signed by it, valid for every name in `hosts` (IP addresses become IP SANs, the rest DNS SANs).
    The SuperLink serves `server.pem`/`server.key`; SuperNodes and `flwr` verify it with `ca.crt`."""
    if not hosts:
        raise UserError("a server certificate needs at least one host name or IP address (e.g. 127.0.0.1)")
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmole federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    files = Certificates(out / "ca.crt", out / "server.pem", out / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(files.key, key)
    _write_key(out / "ca.key", ca_key)
    return files


def make_auth_keys(out_dir: str | Path, name: str = "supernode") -> tuple[Path, Path]:
    """Write an EC (P-384) key pair for SuperNode authentication in OpenSSH format: `name` (private, given to
    `flower-supernode --auth-supernode-private-key`) and `name.pub` (registered with `flwr supernode register`).
    Returns (private, public)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def write_connection(flwr_home: Path, address: str, root_certificates: str | Path | None = None,
                     name: str = CONNECTION) -> None:
    """Write `FLWR_HOME/config.toml` with one SuperLink connection `name` (TLS when a CA file is given)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    else:
        lines.append("insecure = true")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ processes
@dataclass
class Proc:
    """One started process: its role, command line, log file and handle."""

    role: str
    args: list[str]
    log: Path
    popen: subprocess.Popen
    port: int | None = None
    node_config: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class FlowerProcesses:
    """A SuperLink and SuperNodes on this machine, started and stopped by PID.

        with FlowerProcesses(workdir, certs=make_certificates(d)) as fl:
            fl.start_superlink()
            for i in range(2):
                fl.start_supernode(i, 2)
            fl.run_app(app_dir, timeout=300)
    """

    def __init__(self, workdir: str | Path | None = None, certs: Certificates | None = None,
                 host: str = "127.0.0.1", pythonpath: Path | None = None, env: dict | None = None,
                 cli_netns: str | None = None):
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedmole-flower-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.flwr_home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.host = host
        self.env = flower_env(self.flwr_home, pythonpath, env)
        self.procs: list[Proc] = []
        self.seen: set[psutil.Process] = set()  # every process stopped or killed, for `survivors()`
        self.superlink: Proc | None = None
        self.address: str | None = None
        self.cli_netns = cli_netns  # the network namespace `flwr` commands run in (an operator's machine)
        atexit.register(self.stop)

    # -------------------------------------------------------------------------------------- starting
    def _tls_args(self, role: str) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if role == "superlink":
            return ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert),
                    "--ssl-keyfile", str(self.certs.key)]
        return ["--root-certificates", str(self.certs.ca)]

    def _start(self, role: str, args: list[str], port: int | None = None, netns: str | None = None, **kw) -> Proc:
        n = sum(p.role == role for p in self.procs)
        log = self.logs / (f"{role}.log" if n == 0 else f"{role}.{n}.log")
        fh = log.open("ab")
        args = [*netns_exec(netns), *args]  # `ip netns exec` execs the program: the PID stays the program's
        try:
            popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.workdir, start_new_session=True)
        finally:
            fh.close()
        proc = Proc(role, args, log, popen, port, **kw)
        self.procs.append(proc)
        return proc

    def start_superlink(self, port: int | None = None, supernode_auth: bool = False,
                        timeout: float = 60.0, netns: str | None = None, listen: str | None = None) -> Proc:
        """Start `flower-superlink` (Fleet + Control APIs on `listen:port`, default `host:port`) and wait until
        it accepts connections at `host:port`; writes that connection into FLWR_HOME/config.toml. With
        `netns`, inside that Linux network namespace (another host on a virtual network: give `port`)."""
        port = port or free_port(self.host)
        args = [flower_bin("flower-superlink"), *self._tls_args("superlink"),
                "--host", listen or self.host, "--port", str(port),
                "--disable-runtime-dependency-installation", "--database", str(self.workdir / "superlink.db")]
        if supernode_auth:
            args.append("--enable-supernode-auth")
        self.superlink = self._start("superlink", args, port, netns)
        self.address = f"{self.host}:{port}"
        write_connection(self.flwr_home, self.address, self.certs.ca if self.certs else None)
        self._wait(lambda: port_open(self.host, port, netns), timeout, self.superlink,
                   f"the SuperLink on {self.address}")
        return self.superlink

    def start_supernode(self, partition_id: int, num_partitions: int, data_path: str | Path | None = None,
                        state_dir: str | Path | None = None, auth_key: str | Path | None = None,
                        port: int | None = None, extra_config: dict | None = None, wait: bool = True,
                        netns: str | None = None, timeout: float = 60.0) -> Proc:
        """Start `flower-supernode` for client `partition_id` of `num_partitions`, connected to the SuperLink,
        and (`wait`) wait until its local API is up. `data_path` / `state_dir` go into the node config
        (node-local data and client state); `auth_key` is its private key when SuperNode auth is on. With
        `netns`, inside that Linux network namespace (a client machine on a virtual network: give `port`)."""
        if self.address is None:
            raise RuntimeError("start the SuperLink before the SuperNodes")
        cfg = {"partition-id": partition_id, "num-partitions": num_partitions, **(extra_config or {})}
        if data_path is not None:
            cfg["data-path"] = str(data_path)
        if state_dir is not None:
            cfg["state-dir"] = str(state_dir)
        local = "127.0.0.1" if netns is not None else self.host  # its local API, on its own machine
        port = port or free_port(local)
        args = [flower_bin("flower-supernode"), *self._tls_args("supernode"), "--superlink", self.address,
                "--host", local, "--port", str(port), "--node-config", node_config_arg(cfg)]
        if auth_key is not None:
            args += ["--auth-supernode-private-key", str(auth_key)]
        proc = self._start(f"supernode-{partition_id}", args, port, netns, node_config=cfg)
        if wait:
            self._wait(lambda: port_open(local, port, netns), timeout, proc, f"SuperNode {partition_id}")
        return proc

    def _wait(self, ready, timeout: float, proc: Proc, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{what} exited with code {proc.popen.returncode}; its log "
                                   f"({proc.log}) ends with:\n{proc.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} was not ready after {timeout:.0f} s; its log ({proc.log}) ends with:\n"
                           f"{proc.log_tail()}")

    # ------------------------------------------------------------------------------------ flwr CLI
    def connect(self, address: str, root_certificates: str | Path | None = None) -> None:
        """Use a SuperLink started elsewhere: write its connection into this FLWR_HOME's config.toml."""
        self.address = address
        write_connection(self.flwr_home, address, root_certificates)

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True, echo=None
             ) -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against the SuperLink; its output goes to logs/flwr.log (and, line by line,
        to `echo(line)` when given). On timeout or Ctrl-C the command and its children are stopped."""
        cmd = [*netns_exec(self.cli_netns), flower_bin("flwr"), *args]
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 env=self.env, cwd=self.workdir, start_new_session=True)
        proc = Proc("flwr", cmd, self.logs / "flwr.log", popen)
        self.procs.append(proc)
        lines: list[str] = []

        def pump() -> None:
            with proc.log.open("a") as fh:
                fh.write(f"$ {shlex.join(cmd)}\n")
                for line in popen.stdout:
                    lines.append(line)
                    fh.write(line)
                    fh.flush()
                    if echo is not None:
                        echo(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._terminate([proc])
            reader.join(5)
            raise TimeoutError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s; last output:\n"
                               f"{_tail(''.join(lines))}") from None
        except BaseException:
            self._terminate([proc])
            raise
        reader.join(10)
        output = "".join(lines)
        result = subprocess.CompletedProcess(cmd, popen.returncode, output, "")
        if check and popen.returncode != 0:
            raise RuntimeError(f"`flwr {' '.join(args)}` failed with code {popen.returncode}:\n{_tail(output)}")
        return result

    def run_app(self, app_dir: str | Path, timeout: float = 600.0, run_config: dict | None = None, echo=None,
                check: bool = True) -> subprocess.CompletedProcess:
        """`flwr run APP_DIR <connection> --stream [--run-config ...]`: submit the app to the SuperLink and
        wait until the run ends (its log streams into logs/flwr.log)."""
        args = ["run", str(app_dir), CONNECTION, "--stream"]
        if run_config:  # a TOML file: values may hold quotes, spaces and newlines
            overrides = self.workdir / "run-config.toml"
            overrides.write_text("\n".join(f"{k} = {toml_value(v)}" for k, v in run_config.items()) + "\n")
            args += ["--run-config", str(overrides)]
        return self.flwr(*args, timeout=timeout, echo=echo, check=check)

    def register_supernode(self, public_key: str | Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`flwr supernode register PUBLIC_KEY`: allow a SuperNode to join (SuperNode authentication)."""
        return self.flwr("supernode", "register", str(public_key), CONNECTION, timeout=timeout)

    # -------------------------------------------------------------------------------------- stopping
    def tree(self, proc: Proc) -> list[psutil.Process]:
        """`proc` and every process it spawned that is still running (Flower detaches its SuperExec and app
        processes into their own sessions, so process groups are not enough; the tree is read from /proc)."""
        try:
            root = psutil.Process(proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> list[psutil.Process]:
        """Send `sig` to `proc` and all its descendants at once (a machine that dies); returns them."""
        victims = self.tree(proc)
        self.seen.update(victims)
        for p in victims:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        if sig == signal.SIGKILL:
            psutil.wait_procs(victims, timeout=10)
            proc.popen.poll()
        return victims

    def _terminate(self, procs: list[Proc], grace: float = 5.0) -> None:
        victims = [p for proc in procs for p in self.tree(proc)]
        self.seen.update(victims)
        terminate_then_kill(victims, grace)
        for proc in procs:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        """Stop every process started here and everything they spawned: SuperNodes and `flwr` first, the
        SuperLink last (SIGTERM, a grace period, then SIGKILL)."""
        self._terminate([p for p in self.procs if p.role != "superlink"])
        self._terminate([p for p in self.procs if p.role == "superlink"])
        atexit.unregister(self.stop)

    def survivors(self) -> list[psutil.Process]:
        """Processes started here (or spawned by them) that still run; empty after `stop()`."""
        return [p for p in self.seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> FlowerProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def toml_value(v) -> str:
    """A Python bool, number or string as a TOML value (strings as basic strings; JSON's escapes are TOML's)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def node_config_arg(cfg: dict) -> str:
    """The `--node-config` value: space-separated `key=value` pairs (no value may contain a space or quote)."""
    for k, v in cfg.items():
        if isinstance(v, str) and any(c in v for c in " '\""):
            raise UserError(f"node config {k}={v!r}: Flower's --node-config cannot hold spaces or quotes; use a "
                            f"path without them")
    return " ".join(f"{k}={toml_value(v)}" for k, v in cfg.items())


def _tail(text: str, n: int = 30) -> str:
    return "\n".join((text or "").splitlines()[-n:])
