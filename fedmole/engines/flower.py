"""The Flower engine: the same round loop and algorithm objects, with clients on Flower SuperNodes.

Server side, the `ServerApp` runs `fedmole.run.run_experiment` with a `FlowerEngine`: the round loop, the
strategy, checkpoints and the run directory are exactly those of the in-process engine; the engine only turns
each client's `Payload` into a Flower `Message` for the node that holds that client and the reply back into a
`Reply` (or a failure of a kind in `fedmole.run.FAILURE_KINDS`).

Client side, the `ClientApp` learns its client id from the node config (`partition-id`, checked against
`num-partitions`), loads only its own partition (or a node-local `data-path` file), builds the runtime once per
process and runs `fedmole.client.execute.execute` for each message, as the in-process engine does.

Message contents (one message per client, so payloads differ per node: expert sets, ranks, k):

  server -> client  "arrays": ArrayRecord (payload tensors), "config": ConfigRecord {client, payload (JSON)}
  client -> server  "arrays": ArrayRecord (reply tensors), "metrics": MetricRecord (numeric metrics +
                    num-examples), "config": ConfigRecord {reply (JSON: num_examples, metrics, evals, extra)}
                    or {failure (JSON: [kind, message])}

Client state (data cursor, FLAME rescaler, private adapters, personalised parts) lives on the node in
`<state dir>/run-<run id>/client-<id>.safetensors` (tensors + JSON meta in the file's metadata, written to a
temporary file and renamed; the format of client/store.py), so it survives a fresh process per message. The
state dir is the node config's `state-dir`, else the run config's `state-dir`, else `<system temp
dir>/fedmole-flower-state`. The server gathers the states with a `query` message when it writes a checkpoint
(`FlowerEngine.client_states`), so a checkpoint of a Flower run holds every client's state, like an
in-process checkpoint, and `load_client_states` pushes states back to the nodes (resume).

Run config keys (`context.run_config`, or bound by `make_server_app` / `make_client_app`): `config` (the
fedmole config as YAML text), `out` (run directory; server only), `overwrite` (bool), `state-dir`,
`engine-name` (the `engine` written to summary.json).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmole.algorithms.base import ClientState, Payload, Reply
from fedmole.client.store import file_name, read_state, save_states, write_state
from fedmole.comm import wire_dtype
from fedmole.config import Config
from fedmole.config_io import parse_yaml, validate_config
from fedmole.errors import RunFailed, UserError

log = logging.getLogger("fedmole")

TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
HELLO, GET_STATE, SET_STATE = "hello", "get_state", "set_state"
# Flower error codes (flwr.common.constant.ErrorCode) that mean the node or its reply went away
_GONE_CODES = {3, 4, 5}  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE
_CRASHED_CODES = {8}  # CLIENT_APP_CRASHED


# ------------------------------------------------------------------------------------------ records
# dtypes numpy (and so ArrayRecord) cannot hold travel bit for bit as an integer view, named `key@dtype`
_VIEWS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}
_BY_NAME = {str(d).removeprefix("torch."): d for d in _VIEWS}


def arrays(tensors: dict[str, torch.Tensor], transfer: str = "fp32") -> ArrayRecord:
    """Tensors as an ArrayRecord. With `comm.dtype` fp16/bf16 (`transfer`), floating tensors travel in that
    dtype, named `key#dtype` with the dtype they are restored to on arrival (the round loop has already
    rounded them through it, so the round trip is exact and the bytes on the wire are what comm.jsonl counts)."""
    if not tensors:
        return ArrayRecord()
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        wire = wire_dtype(v.dtype, transfer)
        if wire != v.dtype:
            k, v = f"{k}#{str(v.dtype).removeprefix('torch.')}", v.to(wire)
        if v.dtype in _VIEWS:
            out[f"{k}@{str(v.dtype).removeprefix('torch.')}"] = v.view(_VIEWS[v.dtype])
        else:
            out[k] = v
    return ArrayRecord(torch_state_dict=out)


def tensors_of(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    if record is None or len(record) == 0:
        return {}
    out = {}
    for k, v in record.to_torch_state_dict().items():
        name, _, dtype = k.rpartition("@")
        if name and dtype in _BY_NAME:
            k, v = name, v.view(_BY_NAME[dtype])
        name, _, restore = k.rpartition("#")
        if name and hasattr(torch, restore) and isinstance(getattr(torch, restore), torch.dtype):
            k, v = name, v.to(getattr(torch, restore))
        out[k] = v
    return out


def config_text(cfg: Config) -> str:
    """The config as YAML text: what travels in the run config under `config`. Only the keys that were set
    are written (some checks depend on what the user named, e.g. optional data columns), unless that would
    lose a value set on the object after loading; then the whole resolved config."""
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    if validate_config(yaml.safe_load(text) or {}).to_dict() != cfg.to_dict():
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return text


def config_from_text(text: str) -> Config:
    """The config from the run config's `config`: YAML text, or the path of a YAML file on this machine."""
    if "\n" not in text.strip() and text.strip().endswith((".yaml", ".yml")):
        from fedmole.config_io import load_config

        return load_config(text.strip())
    return validate_config(parse_yaml(text, "the run config key `config`") or {})


def _settings(context: Context, bound: dict | None) -> dict:
    settings = {**dict(context.run_config), **(bound or {})}
    if "config" not in settings:
        raise UserError("the Flower run config has no `config` key (the fedmole config as YAML text); write the "
                        "app with `fedmole flower app CONFIG --out DIR`")
    return settings


def payload_content(cid: int, payload: Payload, transfer: str = "fp32") -> RecordDict:
    return RecordDict({"arrays": arrays(payload.tensors, transfer),
                       "config": ConfigRecord({"client": cid, "payload": json.dumps(payload.config)})})


def reply_content(reply: Reply, transfer: str = "fp32") -> RecordDict:
    numeric = {k: v for k, v in reply.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    body = {"num_examples": reply.num_examples, "metrics": reply.metrics, "evals": reply.evals, "extra": reply.extra}
    return RecordDict({"arrays": arrays(reply.tensors, transfer),
                       "metrics": MetricRecord({**numeric, "num-examples": int(reply.num_examples)}),
                       "config": ConfigRecord({"reply": json.dumps(body)})})


def failure_content(kind: str, message: str) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"failure": json.dumps([kind, message])})})


REPORTED_FAILURES = ("dropped", "crashed", "late", "failed")  # what a ClientApp may report about itself
REPLY_FIELDS = ("num_examples", "metrics", "evals", "extra")


def parse_reply(content: RecordDict) -> tuple[Reply | None, tuple[str, str] | None]:
    """(reply, None) or (None, (kind, message)) from a client's reply content. A reply that cannot be read
    is a failure of kind `rejected` (the server's checks of a readable reply come later, in the round loop)."""
    conf = content.config_records.get("config")
    if conf is None:
        return None, ("failed", "the reply has no `config` record (not a fedmole ClientApp?)")
    try:
        if "failure" in conf:
            kind, message = json.loads(conf["failure"])
            if kind not in REPORTED_FAILURES or not isinstance(message, str):
                return None, ("rejected", f"unreadable failure report {str(conf['failure'])[:120]!r}")
            return None, (kind, message)
        body = json.loads(conf["reply"])
        if not isinstance(body, dict) or set(body) != set(REPLY_FIELDS):
            return None, ("rejected", f"the reply body must hold exactly {', '.join(REPLY_FIELDS)}")
        tensors = tensors_of(content.array_records.get("arrays"))
    except (KeyError, TypeError, ValueError) as err:
        return None, ("rejected", f"unreadable reply ({type(err).__name__}: {str(err)[:200]})")
    return Reply(tensors=tensors, **body), None


# ------------------------------------------------------------------------------- node-local state
def state_root(context: Context, settings: dict) -> Path:
    root = context.node_config.get("state-dir") or settings.get("state-dir")
    root = Path(root) if root else Path(tempfile.gettempdir()) / "fedmole-flower-state"
    return root / f"run-{context.run_id}"


def state_path(context: Context, settings: dict, cid: int) -> Path:
    return state_root(context, settings) / file_name(cid)


# ------------------------------------------------------------------------------------ client side
_RUNTIMES: dict[str, tuple] = {}  # config digest -> (cfg, procedure): one runtime per process and config


def node_identity(context: Context, cfg: Config) -> int:
    """The client id of this node (`partition-id`), checked against the config."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise UserError("this SuperNode has no `partition-id` in its node config; start it with "
                        "--node-config 'partition-id=N num-partitions=M'")
    cid, n = int(nc["partition-id"]), int(nc.get("num-partitions", cfg.federation.num_clients))
    if n != cfg.federation.num_clients:
        raise UserError(f"node config num-partitions={n} but the fedmole config has federation.num_clients="
                        f"{cfg.federation.num_clients}; start the SuperNodes with num-partitions="
                        f"{cfg.federation.num_clients}")
    if not 0 <= cid < n:
        raise UserError(f"node config partition-id={cid} is outside 0..{n - 1}")
    return cid


def own_partition(cfg: Config, cid: int, data_path: str | None):
    """This client's data only: the deterministic partition of the shared data set, or a node-local file
    (JSONL/JSON/CSV, same columns as data.columns) split into train/aux/val/test like any partition."""
    if data_path:
        from fedmole.data.partition import split_client
        from fedmole.data.sources import load_examples

        path = Path(data_path)
        if not path.is_file():
            raise UserError(f"node config data-path={data_path} is not a file")
        fmt = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}.get(path.suffix)
        if fmt is None:
            raise UserError(f"node config data-path={data_path}: use a .jsonl, .json or .csv file")
        data_cfg = cfg.data.model_copy(update={"source": fmt, "path": str(path)})
        return split_client(cid, load_examples(data_cfg, cfg.partition_seed), cfg.partition, cfg.partition_seed)
    from fedmole.run import load_federated_data

    return load_federated_data(cfg)[cid]


def _file_stamp(path: str | None) -> list:
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return [path]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def cached_partition(cfg: Config, cid: int, data_path: str | None, root: Path):
    """`own_partition`, stored once per node as JSON under `root`: in the deployment engine every message
    runs in a fresh process, and re-reading and re-partitioning the data set (seconds for WordNet) would be
    paid per message. The key covers everything the partition depends on, data files' size and mtime too."""
    from fedmole.data.partition import ClientData
    from fedmole.data.schema import Example

    basis = {"data": cfg.data.model_dump(mode="json"), "partition": cfg.partition.model_dump(mode="json"),
             "clients": cfg.federation.num_clients, "seed": cfg.partition_seed, "client": cid,
             "shared": _file_stamp(cfg.data.path), "local": _file_stamp(data_path)}
    key = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:20]
    path = root / f"partition-{cid}-{key}.json"
    splits = ("train", "aux", "val", "test")
    if path.is_file():
        d = json.loads(path.read_text())
        return ClientData(cid, *([Example.from_dict(e) for e in d[k]] for k in splits))
    client = own_partition(cfg, cid, data_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: [e.to_dict() for e in getattr(client, k)] for k in splits}))
    os.replace(tmp, path)
    return client


def client_procedure(settings: dict, context: Context, cid: int):
    """(cfg, procedure) of this process, built once per config; the node's client data is added once."""
    from fedmole.algorithms import get_algorithm
    from fedmole.run import build_runtime

    data_path = context.node_config.get("data-path") or None
    key = hashlib.sha256(settings["config"].encode()).hexdigest()
    if key not in _RUNTIMES:
        cfg = config_from_text(settings["config"])
        runtime = build_runtime(cfg, [])
        _RUNTIMES[key] = (cfg, get_algorithm(cfg.algorithm.name).Client(cfg, runtime))
    cfg, procedure = _RUNTIMES[key]
    if cid not in procedure.runtime.clients:
        root = state_root(context, settings)
        procedure.runtime.add_clients([cached_partition(cfg, cid, data_path, root)])
    return cfg, procedure


def handle_message(msg: Message, context: Context, bound: dict | None = None) -> Message:
    """The ClientApp: run one train/evaluate/query message for this node's client."""
    from fedmole.client.execute import execute

    settings = _settings(context, bound)
    cfg = config_from_text(settings["config"])
    cid = node_identity(context, cfg)
    kind = msg.metadata.message_type
    conf = msg.content.config_records.get("config", ConfigRecord())
    path = state_path(context, settings, cid)
    if kind.startswith(QUERY):
        action = conf.get("action")
        if action == HELLO:
            return Message(RecordDict({"config": ConfigRecord({"client": cid})}), reply_to=msg)
        if action == GET_STATE:
            state = read_state(path)
            body = {"client": cid, "present": state is not None, "meta": json.dumps(state.meta if state else {})}
            return Message(RecordDict({"arrays": arrays(state.tensors if state else {}),
                                       "config": ConfigRecord(body)}), reply_to=msg)
        if action == SET_STATE:
            if conf.get("present"):
                write_state(path, ClientState(tensors_of(msg.content.array_records.get("arrays")),
                                              json.loads(conf["meta"])))
            elif path.exists():
                path.unlink()
            return Message(RecordDict({"config": ConfigRecord({"client": cid})}), reply_to=msg)
        raise ValueError(f"unknown query action {action!r}")
    if int(conf["client"]) != cid:
        raise ValueError(f"message for client {conf['client']} reached the node of client {cid}")
    cfg, procedure = client_procedure(settings, context, cid)
    payload = Payload(tensors_of(msg.content.array_records.get("arrays")), json.loads(conf["payload"]))
    state = read_state(path) or ClientState()
    work = ClientState(dict(state.tensors), copy.deepcopy(state.meta))
    out = execute(procedure, kind, cid, payload, work)
    if out.commit:
        write_state(path, work)
    content = (reply_content(out.reply, cfg.comm.dtype) if out.reply is not None
               else failure_content(*out.failure))
    return Message(content, reply_to=msg)


def make_client_app(bound: dict | None = None, bind: Callable[[Context], dict] | None = None) -> ClientApp:
    """A ClientApp; `bound` settings, or those `bind(context)` derives from the run config (FlowerTune
    projects), take precedence over the run config (`bound` is used by `flower-sim`)."""
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        return handle_message(msg, context, bind(context) if bind is not None else bound)

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


# ------------------------------------------------------------------------------------ server side
STOP = threading.Event()  # set: every FlowerEngine of this process stops waiting (Ctrl-C, simulation ended)


class EngineStopped(RuntimeError):
    """The Flower run was stopped while the server waited for replies."""


class FlowerEngine:
    """The engine interface of `InProcessEngine` on top of a Flower `Grid`."""

    def __init__(self, grid: Grid, cfg: Config, name: str = "flower-sim", connect_timeout: float | None = None):
        self.grid = grid
        self.cfg = cfg
        self.name = name
        self.deadline = cfg.federation.round_deadline
        self.states: dict[int, ClientState] = {}
        self.on_client: Callable[[str, int, int], None] | None = None  # (phase, client, round) -> None
        self.on_steps: Callable[[int, int], None] | None = None  # (client, local steps done) -> None
        self.poll_interval = 0.1  # seconds between polls for replies
        timeout = cfg.flower.connect_timeout if connect_timeout is None else connect_timeout
        self.node_of = self.discover(timeout)

    # ------------------------------------------------------------------------------ transport
    def _exchange(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """`Grid.send_and_receive`, but it gives up when `STOP` is set (so a stopped simulation's server
        thread ends instead of waiting forever)."""
        ids = {i for i in self.grid.push_messages(msgs) if i}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while ids:
            if STOP.is_set():
                raise EngineStopped("the Flower run was stopped while waiting for replies")
            got = list(self.grid.pull_messages(ids))
            replies += got
            ids -= {r.metadata.reply_to_message_id for r in got}
            if not ids or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_interval)
        return replies

    def _send(self, message_type: str, group: str, contents: dict[int, RecordDict], timeout: float | None):
        """Send one message per client; returns {client: reply message or None (no reply in time)}."""
        msgs = [Message(content, self.node_of[cid], message_type, group_id=group)
                for cid, content in contents.items()]
        by_node = {r.metadata.src_node_id: r for r in self._exchange(msgs, timeout)} if msgs else {}
        return {cid: by_node.get(self.node_of[cid]) for cid in contents}

    def discover(self, timeout: float) -> dict[int, int]:
        """Ask every node once which client it holds ("hello"); {client id: node id}."""
        n = self.cfg.federation.num_clients
        start = time.monotonic()
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= n or time.monotonic() - start > timeout:
                break
            if STOP.wait(1.0):
                raise EngineStopped("the Flower run was stopped while waiting for nodes")
        if len(nodes) < n:
            raise UserError(f"only {len(nodes)} Flower nodes connected within {timeout:.0f} s but the config has "
                            f"federation.num_clients={n}; start one SuperNode per client")
        hello = RecordDict({"config": ConfigRecord({"action": HELLO})})
        msgs = [Message(RecordDict(hello), node, QUERY, group_id="hello") for node in nodes]
        replies = self._exchange(msgs, timeout)
        node_of: dict[int, int] = {}
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                raise UserError(f"Flower node {node} refused the run: {r.error.reason}")
            cid = int(r.content.config_records["config"]["client"])
            if cid in node_of:
                raise UserError(f"two Flower nodes ({node_of[cid]} and {node}) hold partition-id={cid}; give "
                                f"every SuperNode its own partition-id")
            node_of[cid] = node
        missing = sorted(set(range(n)) - set(node_of))
        if missing:
            raise UserError(f"no Flower node answered for client(s) {missing}; start a SuperNode with "
                            f"partition-id for each")
        log.info("flower: client -> node %s", node_of)
        return node_of

    # ------------------------------------------------------------------------------ engine API
    def _run(self, phase: str, rnd: int, plans: dict[int, Payload]):
        replies: dict[int, Reply] = {}
        failures: dict[int, tuple[str, str]] = {}
        if self.on_client is not None:
            for cid in plans:
                self.on_client(phase, cid, rnd)
        contents = {cid: payload_content(cid, p, self.cfg.comm.dtype) for cid, p in plans.items()}
        got = self._send(phase, str(rnd), contents, self.deadline)
        for cid in plans:
            msg = got[cid]
            if msg is None:
                failure = ("late", f"client {cid} sent no reply within the {self.deadline} s round deadline")
            elif msg.has_error():
                code = int(msg.error.code)
                kind = "dropped" if code in _GONE_CODES else "crashed" if code in _CRASHED_CODES else "failed"
                failure = (kind, f"client {cid} (node {self.node_of[cid]}): {msg.error.reason}")
            else:
                reply, failure = parse_reply(msg.content)
                if reply is not None:
                    replies[cid] = reply
                    if phase == TRAIN and self.on_steps is not None:
                        self.on_steps(cid, int(plans[cid].config.get("steps", 0)))
                    continue
            failures[cid] = failure
            log.warning("round %s: client %s %s (%s): %s", rnd, cid, failure[0], phase, failure[1])
        return replies, failures

    def train(self, rnd: int, plans: dict[int, Payload]):
        return self._run(TRAIN, rnd, plans)

    def evaluate(self, rnd: int, plans: dict[int, Payload]):
        return self._run(EVALUATE, rnd, plans)

    def client_states(self) -> dict[int, ClientState]:
        """Every client's persistent state, fetched from the nodes (a `query` message each). A node that does
        not answer keeps its last fetched state (logged)."""
        ask = {cid: RecordDict({"config": ConfigRecord({"action": GET_STATE})}) for cid in self.node_of}
        for cid, msg in self._send(QUERY, "state", ask, self.deadline).items():
            if msg is None or msg.has_error():
                log.warning("flower: client %s did not return its state; the checkpoint keeps its last known "
                            "state", cid)
                continue
            conf = msg.content.config_records["config"]
            if conf["present"]:
                self.states[cid] = ClientState(tensors_of(msg.content.array_records.get("arrays")),
                                               json.loads(conf["meta"]))
            else:
                self.states.pop(cid, None)
        return {cid: self.states[cid] for cid in sorted(self.states)}

    def load_client_states(self, states: Mapping[int, ClientState]) -> None:
        """Write the given states to the nodes (resume); clients without a state start fresh."""
        contents = {}
        for cid in self.node_of:
            st = states.get(cid)
            conf = {"action": SET_STATE, "present": st is not None, "meta": json.dumps(st.meta if st else {})}
            contents[cid] = RecordDict({"arrays": arrays(st.tensors if st else {}), "config": ConfigRecord(conf)})
        for cid, msg in self._send(QUERY, "state", contents, None).items():
            if msg is None or msg.has_error():
                raise RuntimeError(f"client {cid} could not store its resumed state: "
                                   f"{msg.error.reason if msg is not None else 'no reply'}")
        self.states = {cid: states[cid] for cid in states}

    def save_client_states(self, root: Path) -> None:
        """Every client's state, fetched from the nodes, as `root/client-<id>.safetensors` (a checkpoint)."""
        save_states(root, self.client_states())

    def close(self) -> None:
        pass


def server_main(grid: Grid, context: Context, bound: dict | None = None) -> dict:
    """The ServerApp: a fedmole run (same files as an in-process run) with the clients on Flower nodes."""
    from fedmole.run import prepare_run_dir, resume_experiment, run_experiment

    settings = _settings(context, bound)
    cfg = config_from_text(settings["config"])
    if not settings.get("out"):
        raise UserError("the Flower run config has no `out` key (the run directory); pass --run-config "
                        "\"out='runs/NAME'\"")
    name = settings.get("engine-name", "flower-sim")
    make_engine = lambda c: FlowerEngine(grid, c, name)  # noqa: E731
    if settings.get("resume"):  # continue the run in `out` from its last checkpoint (its own config)
        return resume_experiment(Path(settings["out"]), progress_mode=settings.get("progress"),
                                 make_engine=make_engine)
    run_dir = prepare_run_dir(cfg, settings["out"], None, bool(settings.get("overwrite", False)))
    return run_experiment(cfg, run_dir, settings.get("progress"), make_engine=make_engine)


def make_server_app(bound: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(grid, context, bound)

    return app


# the objects a Flower app's pyproject points at (`flwr run`): settings come from the run config
server_app = make_server_app()
client_app = make_client_app()


# ------------------------------------------------------------------------------------ flower-sim
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}


class ProcessTracker:
    """Remembers every process started below this one while it runs (a background poll, so processes that
    are re-parented later are still known), and stops the survivors by PID at the end."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self._me = psutil.Process()
        self._before = {p.pid for p in self._me.children(recursive=True)}
        self.seen: dict[int, float] = {}  # pid -> create_time (guards against PID reuse)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _scan(self) -> None:
        import psutil

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
        import psutil

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
        from fedmole.engines.flower_procs import terminate_then_kill

        terminate_then_kill(self.alive(), grace)


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
    (`engines/watchdog.py`). Returns the summary (written to run_dir). `resume`: continue the run in
    `run_dir` from its last checkpoint (`cfg` must be that run's config)."""
    from flwr.simulation import run_simulation

    from fedmole.engines.watchdog import SimulationGuard

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
                    import ray

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


# ------------------------------------------------------------------------------------- app writer
def write_app(cfg: Config, out_dir: str | Path, run_out: str = "", engine_name: str = "flower",
              extra_run_config: dict | None = None) -> Path:
    """Write a standard Flower app directory for `cfg`: pyproject.toml (components, run config carrying the
    fedmole config, a local-simulation federation) and a two-line `fedmole_app` package whose `app` objects
    are fedmole's ServerApp and ClientApp. Operators then use `flwr run DIR [FEDERATION]`.
    Returns the path of the pyproject.toml."""
    from fedmole.engines.flower_procs import toml_value

    out = Path(out_dir)
    pkg = out / "fedmole_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""fedmole Flower app (written by `fedmole flower app`)."""\n')
    for side in ("server", "client"):  # a plain assignment: Flower finds `app` by reading the file
        (pkg / f"{side}_app.py").write_text(f"from fedmole.engines import flower\n\napp = flower.{side}_app\n")
    (out / "fedmole.yaml").write_text(config_text(cfg))  # for reading; the run config below is what runs
    run_config = {"config": config_text(cfg), "out": run_out, "overwrite": False, "state-dir": "",
                  "engine-name": engine_name, "progress": "plain", **(extra_run_config or {})}
    n = cfg.federation.num_clients
    lines = [
        "# Written by `fedmole flower app`. Run: flwr run . local-simulation  (set `out` first, e.g.",
        "#   flwr run . local-simulation --run-config \"out='runs/flower-1'\")",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "fedmole-app"', 'version = "1.0.0"', 'description = "fedmole federation on Flower"',
        'license = "Apache-2.0"', 'dependencies = ["fedmole"]', "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "fedmole"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedmole_app.server_app:app"',
        'clientapp = "fedmole_app.client_app:app"', "",
        "[tool.flwr.app.config]", *[f"{k} = {toml_value(v)}" for k, v in run_config.items()], "",
        "[tool.flwr.federations]", 'default = "local-simulation"', "",
        "[tool.flwr.federations.local-simulation]", f"options.num-supernodes = {n}",
        "options.backend.client-resources.num-cpus = 1",
        f"options.backend.client-resources.num-gpus = {float(cfg.flower.gpus_per_client or 0.0)}", "",
    ]
    path = out / "pyproject.toml"
    path.write_text("\n".join(lines))
    return path
