"""Flower's deployment engine on 127.0.0.1: a real SuperLink and two real SuperNodes (separate processes, free
ports, a private FLWR_HOME), the fedmole app submitted with `flwr run`, FedAMoLE on the tiny model.

Each run is bounded by a generous timeout that fails the test (never a timing assert), and every process the
test started, and every process those spawned, is checked to be gone afterwards.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import fedmole
from fedmole.config_io import load_config
from fedmole.engines.flower.deploy import check_superlink, run_flower_deploy
from fedmole.engines.flower.procs import FlowerProcesses, make_auth_keys, make_certificates, node_config_arg
from fedmole.errors import UserError

from conftest import metrics_records

ROOT = Path(fedmole.__file__).resolve().parents[1]
PYTHONPATH = ROOT  # the fedmole the Flower processes import: this checkout's
SMOKE = ROOT / "configs" / "smoke_fedamole.yaml"
RUN_TIMEOUT = 900  # seconds; generous for a loaded 2-core machine, and a failure (not a timing assert) if hit

# FedAMoLE on the tiny Llama with 2 clients (one WordNet task each): 4 experts per module, 2 per client
TWO_CLIENTS = [
    "federation.num_clients=2", "algorithm.num_experts=4", "algorithm.expert_choices=1",
    "algorithm.min_experts=2", "algorithm.max_experts=2", "train.local_steps=1", "data.max_examples=200",
    "eval.max_examples=2", "eval.generation.max_new_tokens=2", "checkpoint.every=2", "output.progress=none",
]


def _cfg(*overrides):
    return load_config(SMOKE, [*TWO_CLIENTS, *overrides])


def _round_value(records, rnd, metric, client=None):
    return [r["value"] for r in records
            if r["round"] == rnd and r["split"] == "round" and r["metric"] == metric and r["client"] == client]


def _assert_all_stopped(fl: FlowerProcesses) -> None:
    assert len(fl.seen) >= 3  # the SuperLink, two SuperNodes (and their SuperExec / app processes)
    assert fl.survivors() == []
    for p in fl.seen:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p


# --------------------------------------------------------------------------------------- unit checks
def test_certificates_chain_to_the_ca_and_name_the_loopback_address(tmp_path):
    from cryptography import x509

    certs = make_certificates(tmp_path, hosts=["127.0.0.1", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct(certs.key.stat().st_mode & 0o777) == "0o600"


def test_auth_keys_are_openssh_ec_keys_on_a_nist_curve(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    private, public = make_auth_keys(tmp_path, "node0")
    key = load_ssh_private_key(private.read_bytes(), None)
    pub = load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()


def test_node_config_refuses_values_flower_cannot_parse():
    assert node_config_arg({"partition-id": 1, "num-partitions": 2, "data-path": "/d/c1.jsonl"}) == \
        'partition-id=1 num-partitions=2 data-path="/d/c1.jsonl"'
    with pytest.raises(UserError, match="spaces or quotes"):
        node_config_arg({"data-path": "/my data/c1.jsonl"})


@pytest.mark.parametrize("address,ca,match", [
    (None, None, "needs the SuperLink's address"),
    ("127.0.0.1", None, "is not HOST:PORT"),
    ("127.0.0.1:99999", None, "is not HOST:PORT"),
    ("127.0.0.1:8000", "/nonexistent/ca.crt", "no such file"),
])
def test_flower_deploy_rejects_a_bad_superlink_before_loading_anything(address, ca, match):
    with pytest.raises(UserError, match=match):
        check_superlink(address, ca)


# ------------------------------------------------------------------------------------- end to end
def test_deploy_two_supernodes_runs_fedamole_like_inprocess_and_resumes(tmp_path):
    from fedmole.run import prepare_run_dir, run_experiment

    cfg = _cfg("federation.rounds=2", "checkpoint.every=1")
    run_dir = tmp_path / "run"
    with FlowerProcesses(tmp_path / "flower", pythonpath=PYTHONPATH) as fl:
        fl.start_superlink()
        for i in range(2):
            fl.start_supernode(i, 2, state_dir=tmp_path / f"state-{i}")
        summary = run_flower_deploy(cfg, run_dir, fl.address, timeout=RUN_TIMEOUT, echo=None)
        records = metrics_records(run_dir)
        # interrupted after round 1 (its checkpoint is the last one): resuming on the nodes ends the same
        shutil.rmtree(run_dir / "checkpoints" / "round_0002")
        (run_dir / "summary.json").unlink()
        resumed = run_flower_deploy(cfg, run_dir, fl.address, timeout=RUN_TIMEOUT, echo=None, resume=True)
        assert all(p.alive() for p in fl.procs if p.role != "flwr")  # nothing died on the way
    _assert_all_stopped(fl)

    assert summary["engine"] == "flower-deploy" and summary["rounds_completed"] == 2
    assert [_round_value(records, r, "clients_replied") for r in (1, 2)] == [[2], [2]]
    assert set(summary["personalized"]["per_client"]) == {"0", "1"}
    # each node's state lives in its own node-local state dir
    assert list((tmp_path / "state-0").rglob("client-0.safetensors"))
    assert list((tmp_path / "state-1").rglob("client-1.safetensors"))
    assert resumed["state_digest"] == summary["state_digest"]
    assert resumed["personalized"] == summary["personalized"]
    # the same records (replies of one round may arrive in another order)
    assert sorted(map(json.dumps, metrics_records(run_dir))) == sorted(map(json.dumps, records))

    # the same config in-process ends in the same global state
    ref = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "ref", None, False))
    assert summary["state_digest"] == ref["state_digest"]
    assert summary["personalized"]["per_client"] == ref["personalized"]["per_client"]


def test_deploy_with_tls_and_supernode_authentication(tmp_path):
    certs = make_certificates(tmp_path / "certs", hosts=["127.0.0.1"])
    keys = [make_auth_keys(tmp_path / "keys", f"node{i}") for i in range(3)]
    overrides = [*TWO_CLIENTS, "federation.rounds=1"]  # the transport differs from the test above; one round shows it
    with FlowerProcesses(tmp_path / "flower", certs=certs, pythonpath=PYTHONPATH) as fl:
        fl.start_superlink(supernode_auth=True)
        host, port = fl.address.split(":")
        # the SuperLink speaks TLS with our certificate: verified with our CA, refused without it
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection((host, int(port)), 10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname=host)

        for i in range(2):  # only the registered public keys may join
            assert "registered successfully" in fl.register_supernode(keys[i][1]).stdout
            fl.start_supernode(i, 2, state_dir=tmp_path / f"state-{i}", auth_key=keys[i][0])
        intruder = fl.start_supernode(1, 2, auth_key=keys[2][0], wait=False)  # a key nobody registered
        # through the command line, as an operator runs it
        cmd = [sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), *[a for o in overrides for a in ("--set", o)],
               "--engine", "flower-deploy", "--superlink", fl.address, "--root-certificates", str(certs.ca),
               "--out", str(tmp_path / "run")]
        done = subprocess.run(cmd, env=fl.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "state_digest" in done.stdout  # the results table was printed
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert intruder.popen.wait(timeout=120) != 0  # refused by the SuperLink, it gave up
        assert "could not establish a connection" in intruder.log.read_text()
    _assert_all_stopped(fl)

    assert summary["engine"] == "flower-deploy" and summary["rounds_completed"] == 1
    assert _round_value(metrics_records(tmp_path / "run"), 1, "clients_replied") == [2]
    assert summary["skipped"]["dropped"] == summary["skipped"]["late"] == 0
    assert set(summary["personalized"]["per_client"]) == {"0", "1"}


def _started_at(p: psutil.Process) -> float:
    """When `p` started, on the wall clock. psutil's `create_time()` adds the start tick to the kernel's boot time
    rounded down to whole seconds, so it reads up to 1 s early: a process started just after a file was written
    looked older than the file. The boot time from /proc/uptime keeps its hundredths."""
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return p.create_time() - psutil.boot_time() + boot


def _new_clientapp(fl: FlowerProcesses, node, since: float, timeout: float) -> bool:
    """Wait until a ClientApp process started after `since` (wall clock) runs under `node` (the node works on a
    message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in fl.tree(node):
            try:
                if "clientapp" in p.name() and _started_at(p) > since:
                    return True
            except psutil.Error:
                pass
        time.sleep(0.1)
    return False


def test_a_supernode_killed_mid_round_is_dropped_and_the_round_completes(tmp_path):
    cfg = _cfg("federation.rounds=1", "federation.round_deadline=60", "federation.min_replies=1")
    run_dir = tmp_path / "run"
    with FlowerProcesses(tmp_path / "flower", pythonpath=PYTHONPATH) as fl:
        fl.start_superlink()
        nodes = [fl.start_supernode(i, 2, state_dir=tmp_path / f"state-{i}") for i in range(2)]
        result: dict = {}

        def launch():
            try:
                result["summary"] = run_flower_deploy(cfg, run_dir, fl.address, timeout=RUN_TIMEOUT, echo=None)
            except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
                result["error"] = err

        runner = threading.Thread(target=launch)
        runner.start()
        # round 1 starts right after the round-0 expert assignment is written; then node 1 gets its train message
        round0 = run_dir / "assignments.jsonl"
        deadline = time.monotonic() + RUN_TIMEOUT
        while not round0.exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert round0.exists(), result.get("error")
        working = _new_clientapp(fl, nodes[1], round0.stat().st_mtime, timeout=60)
        killed = fl.kill(nodes[1], signal.SIGKILL)  # the machine dies mid-round: node and ClientApp at once
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in killed)
        runner.join(RUN_TIMEOUT)
        assert not runner.is_alive(), "the run did not finish after the node was killed"
        if "error" in result:
            raise result["error"]
        assert nodes[0].alive()
    _assert_all_stopped(fl)

    summary, records = result["summary"], metrics_records(run_dir)
    assert working, "node 1 never started on its round-1 message"
    assert summary["rounds_completed"] == 1
    assert _round_value(records, 1, "clients_replied") == [1]
    lost = [r["metric"] for r in records if r["round"] == 1 and r["client"] == 1 and r["split"] == "round"
            and r["metric"].startswith("client_")]
    assert len(lost) == 1 and lost[0] in ("client_dropped", "client_late"), lost
    assert summary["skipped"]["dropped"] + summary["skipped"]["late"] >= 1
    # the remaining node trained and was aggregated
    assert any(r["round"] == 1 and r["client"] == 0 and r["model"] == "local" for r in records)
    assert _round_value(records, 1, "round_skipped") == []
