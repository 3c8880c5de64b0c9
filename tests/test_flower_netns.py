"""Flower's deployment engine across hosts: the SuperLink and two SuperNodes each in a Linux network namespace of
their own (three machines on one virtual LAN), TLS and SuperNode authentication, the run submitted from a client
machine over the network, two FedAMoLE rounds that end with the in-process digest.

The test builds the network itself (`ip netns`, a bridge on the SuperLink's host, a veth pair per client host;
root needed) and skips with the reason where namespaces cannot be made. Whatever happens, it stops every
process it started (by PID) before it deletes the namespaces. docs/deployment.md walks through the same steps
on two real machines.

    superlink host (fmns-<pid>-link)     br0 10.77.0.1/24  (flower-superlink --host 0.0.0.0 --port 8000)
    client host 0  (fmns-<pid>-node0)    eth0 10.77.0.2/24 (flower-supernode, and `fedmole run` submitting)
    client host 1  (fmns-<pid>-node1)    eth0 10.77.0.3/24 (flower-supernode)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

import fedmole
from fedmole.config_io import load_config
from fedmole.engines.flower.procs import FlowerProcesses, make_auth_keys, make_certificates, terminate_then_kill

ROOT = Path(fedmole.__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke_fedamole.yaml"
RUN_TIMEOUT = 900  # seconds; a failure if hit, not a timing assert
START_TIMEOUT = 300  # seconds for a Flower process to answer (imports are slow on a loaded 2-core machine)
PREFIX = "fmns-"
SUPERLINK_IP, PORT = "10.77.0.1", 8000
# FedAMoLE on the tiny Llama with 2 clients (one WordNet task each): 4 experts per module, 2 per client
TWO_CLIENTS = [
    "federation.num_clients=2", "federation.rounds=2", "algorithm.num_experts=4", "algorithm.expert_choices=1",
    "algorithm.min_experts=2", "algorithm.max_experts=2", "train.local_steps=1", "data.max_examples=200",
    "eval.max_examples=2", "eval.generation.max_new_tokens=2", "output.progress=none",
]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _remove_stale() -> None:
    """Namespaces an earlier run of this test left when it was killed (its PID is gone)."""
    for name in _namespaces():
        if name.startswith(PREFIX) and not psutil.pid_exists(int(name.split("-")[1])):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


@pytest.fixture
def network():
    """{"link": namespace, "nodes": [namespace, namespace]} on one virtual LAN; deleted afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    _remove_stale()
    tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    link, nodes = f"{tag}-link", [f"{tag}-node{i}" for i in range(2)]
    made: list[str] = []
    try:
        for ns in (link, *nodes):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", link, "link", "add", "br0", "type", "bridge")
        _ip("-n", link, "addr", "add", f"{SUPERLINK_IP}/24", "dev", "br0")
        _ip("-n", link, "link", "set", "br0", "up")
        for i, ns in enumerate(nodes):  # a cable from each client host to the switch on the SuperLink's host
            _ip("link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{i}", "netns", link)
            _ip("-n", link, "link", "set", f"port{i}", "master", "br0")
            _ip("-n", link, "link", "set", f"port{i}", "up")
            _ip("-n", ns, "addr", "add", f"10.77.0.{2 + i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
    except RuntimeError as err:
        for ns in made:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        pytest.skip(f"cannot build a virtual network here: {err}")
    try:
        yield {"link": link, "nodes": nodes}
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def _run_tree(cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """(exit code, output) of `cmd`; on timeout or error it is stopped with every process it started."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            root = psutil.Process(proc.pid)
            terminate_then_kill([root, *root.children(recursive=True)])
            proc.communicate()


def _callers(superlink_log: str) -> set[str]:
    """The addresses the SuperLink's HTTP server logged requests from (uvicorn's access lines)."""
    return set(re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+ - \"(?:GET|POST) ", superlink_log))


def test_superlink_and_supernodes_on_three_hosts_with_tls_and_authentication(tmp_path, network):
    from fedmole.run import prepare_run_dir, run_experiment

    link, nodes = network["link"], network["nodes"]
    certs = make_certificates(tmp_path / "certs", hosts=[SUPERLINK_IP, "127.0.0.1"])  # SuperExec dials 127.0.0.1
    keys = [make_auth_keys(tmp_path / "keys", f"node{i}") for i in range(2)]
    run_dir = tmp_path / "run"
    with FlowerProcesses(tmp_path / "flower", certs=certs, host=SUPERLINK_IP, pythonpath=ROOT,
                         cli_netns=nodes[0]) as fl:
        fl.start_superlink(port=PORT, supernode_auth=True, netns=link, listen="0.0.0.0", timeout=START_TIMEOUT)
        for i, ns in enumerate(nodes):
            assert "registered successfully" in fl.register_supernode(keys[i][1], START_TIMEOUT).stdout  # host 0
            fl.start_supernode(i, 2, state_dir=tmp_path / f"state-{i}", auth_key=keys[i][0], port=9094, netns=ns,
                               timeout=START_TIMEOUT)
        # the operator on client host 0 submits the run with TLS, as docs/deployment.md shows
        cmd = ["ip", "netns", "exec", nodes[0], sys.executable, "-m", "fedmole.cli", "run", str(SMOKE),
               *[a for o in TWO_CLIENTS for a in ("--set", o)], "--engine", "flower-deploy",
               "--superlink", f"{SUPERLINK_IP}:{PORT}", "--root-certificates", str(certs.ca), "--out", str(run_dir)]
        code, output = _run_tree(cmd, fl.env, RUN_TIMEOUT)
        assert code == 0, output[-5000:]
        assert all(p.alive() for p in fl.procs if p.role != "flwr")
        callers = _callers(fl.superlink.log.read_text())
    assert fl.survivors() == [] and len(fl.seen) >= 3
    assert {"10.77.0.2", "10.77.0.3"} <= callers  # the nodes reached the SuperLink over the LAN

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "flower-deploy" and summary["rounds_completed"] == 2
    assert summary["skipped"]["dropped"] == summary["skipped"]["late"] == 0
    assert list((tmp_path / "state-1").rglob("client-1.safetensors"))  # client 1's state stayed on its host
    cfg = load_config(SMOKE, TWO_CLIENTS)
    ref = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "ref", None, False))
    assert summary["state_digest"] == ref["state_digest"]
    assert summary["personalized"]["per_client"] == ref["personalized"]["per_client"]
