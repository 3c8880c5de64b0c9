"""The Flower engine without Ray: the app writer, the CLI's engine choice, and the FlowerEngine + ClientApp
over an in-memory Grid that calls the real ClientApp for each message (optionally in a 'fresh process':
the per-process runtime cache is emptied before every message, as in Flower's deployment engine)."""

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import fedmole
from fedmole.client.store import read_state
from fedmole.config import ALGORITHMS
from fedmole.config_io import load_config
from fedmole.engines.flower import clientapp, simulation
from fedmole.engines.flower.app import write_app
from fedmole.engines.flower.clientapp import make_client_app
from fedmole.engines.flower.engine import STOP, EngineStopped, FlowerEngine
from fedmole.engines.flower.records import arrays, tensors_of
from fedmole.engines.flower.runconfig import config_from_text, config_text
from fedmole.engines.flower.simulation import sim_backend_config
from fedmole.errors import UserError
from fedmole.messages import ClientState, Payload
from fedmole.run import latest_checkpoint, load_checkpoint, resume_experiment, run_experiment

from conftest import canonical_lines, metrics_records

ROOT = Path(fedmole.__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FLAME = ROOT / "configs" / "smoke_flame.yaml"
FAST = ["eval.max_examples=2", "partition.min_size=10", "train.local_steps=2", "train.num_threads=1",
        "federation.rounds=2"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small JSONL data set: loads in milliseconds, so rebuilding a client per message stays cheap."""
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    rows = [{"instruction": f"Define the word w{i}.", "context": "", "response": f"thing number {i % 17}",
             "task": "definition", "domain": f"d{i % 3}"} for i in range(150)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(base, data_file, *overrides):
    return load_config(base, [*FAST, "data.source=jsonl", f"data.path={data_file}", "data.max_examples=null",
                              "partition.scheme=iid", *overrides])


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps instruction messages with the identity of the ServerApp task; outside a Flower runtime
    the test plays that task."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LocalGrid(Grid):
    """A Grid whose nodes are the real fedmole ClientApp called in this process. `node_config` adds per-client
    node settings; clients in `silent` never reply (as past a deadline); `fresh` empties the runtime cache
    before every message."""

    def __init__(self, n, config_text, tmp, node_config=None, silent=(), fresh=False, num_partitions=None):
        self.app = make_client_app({"config": config_text})
        self.nodes = {100 + 7 * c: c for c in range(n)}  # node ids unlike client ids
        self.node_config = node_config or {}
        self.silent, self.fresh, self.tmp = set(silent), fresh, str(tmp)
        self.num_partitions = n if num_partitions is None else num_partitions
        self.messages = 0
        self.pending = {}  # message id -> reply not pulled yet

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Deliver each message to its node's ClientApp at once; replies wait until pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = f"m{len(self.pending)}-{self.messages}"
            node = msg.metadata.dst_node_id
            cid = self.nodes[node]
            ctx = Context(run_id=5, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": cid, "num-partitions": self.num_partitions,
                                       "state-dir": self.tmp, **self.node_config.get(cid, {})})
            if self.fresh:
                clientapp._RUNTIMES.clear()
            self.messages += 1
            try:
                reply = self.app(msg, ctx)
            except Exception as err:  # what a SuperNode does with an exception in the ClientApp
                reply = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if cid not in self.silent or msg.metadata.message_type == "query":
                self.pending[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(mid) for mid in list(message_ids) if mid in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError  # the engine polls push/pull itself, so that it can be stopped


def _flower_run(cfg, run_dir, grid):
    run_dir.mkdir()
    return run_experiment(cfg, run_dir, "none", make_engine=lambda c: FlowerEngine(grid, c, "flower-local"))


# ------------------------------------------------------------------------------------------ the app
def test_app_writer_writes_a_flower_app_whose_components_import_and_carry_the_config(tmp_path, monkeypatch):
    from flwr.cli.config_utils import load_and_validate

    cfg = load_config(SMOKE, ["federation.num_clients=3", "train.lr=0.25"])
    path = write_app(cfg, tmp_path / "app", run_out="runs/x")
    doc = tomllib.loads(path.read_text())
    comps = doc["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "fedmole_app.server_app:app", "clientapp": "fedmole_app.client_app:app"}
    run_config = doc["tool"]["flwr"]["app"]["config"]
    assert run_config["out"] == "runs/x"
    assert config_from_text(run_config["config"]).to_dict() == cfg.to_dict()
    fed = doc["tool"]["flwr"]["federations"]
    assert fed["default"] == "local-simulation"
    assert fed["local-simulation"]["options"]["num-supernodes"] == 3
    assert fed["local-simulation"]["options"]["backend"]["client-resources"]["num-cpus"] == 1
    # Flower's own validation of the project (it imports both components from the app directory)
    conf, warnings = load_and_validate(path, check_module=True)  # raises on an invalid app
    assert conf["tool"]["flwr"]["app"]["components"] == comps
    monkeypatch.syspath_prepend(str(tmp_path / "app"))
    assert isinstance(importlib.import_module("fedmole_app.server_app").app, ServerApp)
    assert isinstance(importlib.import_module("fedmole_app.client_app").app, ClientApp)


def test_cli_writes_the_app_and_refuses_to_overwrite_it(tmp_path):
    env_path = {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedmole.cli", "flower", "app", str(SMOKE), "--out", str(tmp_path / "app")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**_env(), **env_path})
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "app" / "pyproject.toml").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**_env(), **env_path})
    assert again.returncode == 2 and "already holds a pyproject.toml" in again.stderr


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_unknown_engine_is_a_clear_error_before_anything_runs(tmp_path):
    run_dir = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), "--engine", "flwr-sim",
                           "--out", str(run_dir)], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert 'unknown engine "flwr-sim"' in err and 'did you mean "flower-sim"' in err
    assert "inprocess, flower-sim, flower-deploy" in err and "Traceback" not in proc.stderr
    assert not run_dir.exists()


# ------------------------------------------------------------------------- engine over a local grid
def test_flame_over_flower_messages_with_a_fresh_process_per_message_equals_inprocess(tmp_path, data_file):
    """FLAME keeps per-client state (data cursor, rescalers); here every message rebuilds the client runtime and
    reads the state from the node's disk, and the run still equals the in-process one bit for bit."""
    cfg = _cfg(FLAME, data_file, "federation.num_clients=3", "tiers.per_client=[1,2,4]", "checkpoint.keep_last=null")
    ref_dir = tmp_path / "inprocess"
    ref_dir.mkdir()
    ref = run_experiment(cfg, ref_dir, "none")
    grid = LocalGrid(3, config_text(cfg), tmp_path / "nodes", fresh=True)
    got = _flower_run(cfg, tmp_path / "flower", grid)
    assert got["engine"] == "flower-local" and ref["engine"] == "inprocess"
    assert got["state_digest"] == ref["state_digest"]
    assert canonical_lines(tmp_path / "flower" / "metrics.jsonl") == canonical_lines(ref_dir / "metrics.jsonl")
    for name in ("round_0001", "round_0002"):  # checkpoints gather every client's state from its node
        _, _, sa = load_checkpoint(ref_dir / "checkpoints" / name)
        _, _, sb = load_checkpoint(tmp_path / "flower" / "checkpoints" / name)
        assert sorted(sa) == sorted(sb) == [0, 1, 2]
        for c in sa:
            assert sa[c].meta == sb[c].meta and sa[c].tensors.keys() == sb[c].tensors.keys() != set()
            assert all(torch.equal(sa[c].tensors[k], sb[c].tensors[k]) for k in sa[c].tensors)
        assert sa[2].meta["cursor"]["pos"] > 0
    # the node-local state file is what the last checkpoint holds
    on_disk = read_state(tmp_path / "nodes" / "run-5" / "client-2.safetensors")
    assert on_disk.meta == sb[2].meta and on_disk.tensors.keys() == sb[2].tensors.keys()
    assert all(torch.equal(v, sb[2].tensors[k]) for k, v in on_disk.tensors.items())

    # a Flower checkpoint resumes (in-process) to the uninterrupted result
    run_dir = tmp_path / "flower"
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "round_0002")
    (run_dir / "summary.json").unlink()
    assert latest_checkpoint(run_dir).name == "round_0001"
    assert resume_experiment(run_dir)["state_digest"] == ref["state_digest"]
    # and through Flower, on nodes that start empty: the engine writes the checkpointed states to them
    shutil.rmtree(run_dir / "checkpoints" / "round_0002")
    (run_dir / "summary.json").unlink()
    fresh_nodes = LocalGrid(3, config_text(cfg), tmp_path / "new-nodes", fresh=True)
    again = resume_experiment(run_dir, make_engine=lambda c: FlowerEngine(fresh_nodes, c, "flower-local"))
    assert again["engine"] == "flower-local" and again["state_digest"] == ref["state_digest"]
    assert canonical_lines(run_dir / "metrics.jsonl") == canonical_lines(ref_dir / "metrics.jsonl")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_through_flower_messages_exactly_as_in_process(tmp_path, data_file, name):
    """The engine is algorithm-agnostic: every registered method, with its defaults on the smoke federation,
    ends through Flower messages (fresh client runtime per message) with the in-process digest and metrics."""
    cfg = _cfg(SMOKE, data_file, f"algorithm.name={name}")
    ref_dir = tmp_path / "inprocess"
    ref_dir.mkdir()
    ref = run_experiment(cfg, ref_dir, "none")
    grid = LocalGrid(cfg.federation.num_clients, config_text(cfg), tmp_path / "nodes", fresh=True)
    got = _flower_run(cfg, tmp_path / "flower", grid)
    assert got["state_digest"] == ref["state_digest"]
    assert canonical_lines(tmp_path / "flower" / "metrics.jsonl") == canonical_lines(ref_dir / "metrics.jsonl")
    assert not any(got["skipped"].values()), got["skipped"]


def test_client_errors_and_missing_replies_become_recorded_failures(tmp_path, data_file):
    """Client 1's node raises (its data file does not exist), client 2's node never replies within the round
    deadline; the run completes on client 0 and records both, with the failure kinds of the in-process engine."""
    cfg = _cfg(SMOKE, data_file, "federation.num_clients=3", "federation.rounds=1", "federation.round_deadline=1")
    grid = LocalGrid(3, config_text(cfg), tmp_path / "nodes", silent={2},
                     node_config={1: {"data-path": str(tmp_path / "missing.jsonl")}})
    summary = _flower_run(cfg, tmp_path / "run", grid)
    recs = metrics_records(tmp_path / "run")
    facts = {(r["metric"], r["client"]): r["value"] for r in recs if r["round"] == 1 and r["split"] == "round"}
    assert facts[("client_failed", 1)] == 1 and facts[("client_late", 2)] == 1
    assert facts[("clients_replied", None)] == 1 and ("round_skipped", None) not in facts
    assert facts[("eval_failed", 1)] == 1 and facts[("eval_late", 2)] == 1  # the global evaluation too
    assert summary["skipped"]["failed"] == 1 and summary["skipped"]["late"] == 1
    assert {r["client"] for r in recs if r["split"] == "train"} == {0}
    assert "missing.jsonl" in (tmp_path / "run" / "run.log").read_text()


def test_a_node_with_the_wrong_num_partitions_is_refused_with_the_numbers(tmp_path):
    cfg = load_config(SMOKE, ["federation.num_clients=2"])
    grid = LocalGrid(2, config_text(cfg), tmp_path, num_partitions=5)
    with pytest.raises(UserError, match=r"num-partitions=5 .* federation.num_clients=2"):
        FlowerEngine(grid, cfg)


def test_a_stopped_engine_stops_waiting_for_replies(tmp_path):
    cfg = load_config(SMOKE, ["federation.num_clients=2", "federation.round_deadline=600"])
    grid = LocalGrid(2, config_text(cfg), tmp_path, silent={1})
    engine = FlowerEngine(grid, cfg)
    engine.poll_interval = 0.01
    import threading

    threading.Timer(0.3, STOP.set).start()  # as run_flower_sim does after Ctrl-C
    try:
        with pytest.raises(EngineStopped):
            engine.train(1, {1: Payload({}, {"round": 1})})  # client 1 never replies
    finally:
        STOP.clear()


def test_client_states_round_trip_through_the_nodes(tmp_path):
    cfg = load_config(SMOKE, ["federation.num_clients=3"])
    grid = LocalGrid(3, config_text(cfg), tmp_path)
    engine = FlowerEngine(grid, cfg)
    assert engine.node_of == {0: 100, 1: 107, 2: 114}
    assert engine.client_states() == {}
    states = {0: ClientState({"a/b": torch.arange(6.0).reshape(2, 3)}, {"cursor": [1, 4]}),
              2: ClientState({}, {"cursor": [0, 2]})}
    engine.load_client_states(states)
    engine.states = {}  # forget the local copy: what comes back is read from the nodes' files
    got = engine.client_states()
    assert sorted(got) == [0, 2] and got[0].meta == {"cursor": [1, 4]} and got[2].meta == {"cursor": [0, 2]}
    assert torch.equal(got[0].tensors["a/b"], states[0].tensors["a/b"]) and got[2].tensors == {}
    engine.load_client_states({2: states[2]})  # client 0 has no state any more
    assert sorted(engine.client_states()) == [2]


def test_a_node_local_data_file_is_the_clients_whole_data(tmp_path, data_file):
    cfg = _cfg(SMOKE, data_file, "federation.num_clients=2")
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps({"instruction": f"Local question {i}?", "response": "yes"}) + "\n"
                           for i in range(40)))
    client = clientapp.own_partition(cfg, 1, str(own))
    texts = [ex.instruction for split in (client.train, client.aux, client.val, client.test) for ex in split]
    assert client.client_id == 1 and len(texts) == 40 and all(t.startswith("Local question") for t in texts)
    shared = clientapp.own_partition(cfg, 1, None)  # without data-path: this client's share of the shared data set
    assert all(ex.instruction.startswith("Define the word") for ex in shared.train)
    with pytest.raises(UserError, match="data-path=.*nope.jsonl is not a file"):
        clientapp.own_partition(cfg, 1, str(tmp_path / "nope.jsonl"))


def test_records_carry_every_tensor_dtype_bit_for_bit():
    t = {"m/0/A": torch.randn(2, 3), "m/0/B": torch.randn(3, 4)[:, :2], "half": torch.randn(5).bfloat16(),
         "idx": torch.arange(3), "mask": torch.tensor([True, False]), "f16": torch.randn(2).half()}
    back = tensors_of(arrays(t))
    assert list(back) == list(t)
    assert all(back[k].dtype == t[k].dtype and back[k].shape == t[k].shape and torch.equal(back[k], t[k]) for k in t)
    assert tensors_of(arrays({})) == {}


@pytest.mark.parametrize("transfer", ["fp16", "bf16"])
def test_compressed_transfer_puts_half_the_bytes_on_the_wire_and_restores_dtypes(transfer):
    from fedmole.comm import transfer as round_through

    t = {"m/0/A": torch.randn(64, 8), "m/0/B": torch.randn(8, 64), "idx": torch.arange(3)}
    sent = round_through(t, transfer)  # what the round loop hands the engine: already rounded, still fp32
    record = arrays(sent, transfer)
    on_wire = {k: v for k, v in record.items()}
    float_bytes = sum(a.numpy().nbytes for k, a in on_wire.items() if not k.startswith("idx"))
    assert float_bytes == (64 * 8 * 2) * 2  # two 512-element tensors at 2 bytes each, not 4
    back = tensors_of(record)
    assert list(back) == list(t)
    assert all(back[k].dtype == t[k].dtype and torch.equal(back[k], sent[k]) for k in t)
    assert not torch.equal(back["m/0/A"], t["m/0/A"])  # the values did go through the transfer dtype


def test_the_run_config_may_name_a_config_file_instead_of_holding_it(tmp_path):
    path = tmp_path / "fed.yaml"
    path.write_text("federation: {num_clients: 4}\ntrain: {lr: 0.5}\n")
    from_file = config_from_text(str(path))
    assert from_file.federation.num_clients == 4 and from_file.train.lr == 0.5
    assert config_from_text(path.read_text()).to_dict() == from_file.to_dict()
    with pytest.raises(UserError, match="does not exist"):
        config_from_text(str(tmp_path / "missing.yaml"))


def test_simulation_resources_never_exceed_the_machine(monkeypatch):
    """Asking Ray for more CPUs than exist leaves an empty actor pool and a simulation that never ends."""
    monkeypatch.setattr(simulation.os, "cpu_count", lambda: 2)
    for actors, clients, expect in [(1, 4, 1), (8, 4, 2), (8, 1, 1), (2, 3, 2)]:
        cfg = load_config(SMOKE, [f"flower.sim_actors={actors}", f"federation.num_clients={clients}"])
        backend = sim_backend_config(cfg)
        assert backend["client_resources"]["num_cpus"] == 1
        assert backend["init_args"]["num_cpus"] == expect <= 2


def test_simulation_actors_spread_over_every_visible_gpu(monkeypatch):
    """Ray places actors by the resources they ask for: with 8 GPUs and 16 actors at the default share, each GPU
    holds two (0.5 each); an explicit share is taken as given; what cannot be placed is refused."""
    monkeypatch.setattr(simulation.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(simulation.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(simulation.torch.cuda, "device_count", lambda: 8)

    def resources(*overrides):
        cfg = load_config(SMOKE, ["federation.num_clients=100", "train.device=cuda", *overrides])
        b = sim_backend_config(cfg)
        return b["init_args"]["num_cpus"], b["init_args"]["num_gpus"], b["client_resources"]["num_gpus"]

    assert resources("flower.sim_actors=16") == (16, 8, 0.5)
    assert resources("flower.sim_actors=8") == (8, 8, 1.0)
    assert resources("flower.sim_actors=3") == (3, 8, 1.0)
    assert resources("flower.sim_actors=12") == (12, 8, 0.5)  # at most two per GPU: every GPU is used
    assert resources("flower.sim_actors=16", "flower.gpus_per_client=0.25") == (16, 8, 0.25)
    assert resources("flower.sim_actors=4", "flower.gpus_per_client=2") == (4, 8, 2)
    assert resources("flower.sim_actors=16", "train.device=auto", "flower.gpus_per_client=0") == (16, 0, 0.0)
    b = sim_backend_config(load_config(SMOKE, ["flower.sim_actors=16", "federation.num_clients=8",
                                                      "train.device=auto"]))
    assert b["init_args"] == {"num_cpus": 8, "num_gpus": 8, "include_dashboard": False}  # 8 clients: 8 actors,
    assert b["client_resources"]["num_gpus"] == 1.0  # not 16 at half a GPU each
    with pytest.raises(UserError, match="which the actor sees as cuda:0"):
        resources("flower.sim_actors=8", "train.device=cuda:3")
    with pytest.raises(UserError, match="more GPUs per actor than the 8 visible"):
        resources("flower.gpus_per_client=16")
    with pytest.raises(UserError, match="fractions below 1"):
        load_config(SMOKE, ["flower.gpus_per_client=1.5"])
    with pytest.raises(UserError, match="clients that train on train.device=cpu"):
        load_config(SMOKE, ["flower.gpus_per_client=0.5", "train.device=cpu"])
    monkeypatch.setattr(simulation.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(simulation.torch.cuda, "device_count", lambda: 0)
    assert resources("flower.sim_actors=4")[1:] == (0, 0.0)  # no GPU: the CPU
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        resources("flower.gpus_per_client=0.5")


def test_a_node_partitions_the_data_once_and_reuses_it_from_disk(tmp_path, data_file, monkeypatch):
    cfg = _cfg(SMOKE, data_file, "federation.num_clients=3")
    first = clientapp.cached_partition(cfg, 2, None, tmp_path)
    assert first == clientapp.own_partition(cfg, 2, None) and len(list(tmp_path.glob("partition-2-*.json"))) == 1
    calls = []
    monkeypatch.setattr(clientapp, "own_partition", lambda *a: calls.append(a) or first)
    assert clientapp.cached_partition(cfg, 2, None, tmp_path) == first and calls == []  # read back, not recomputed
    other = _cfg(SMOKE, data_file, "federation.num_clients=3", "partition.seed=9")
    clientapp.cached_partition(other, 2, None, tmp_path)  # another partition config is another entry
    assert len(calls) == 1
