"""The ClientApp: one fedmole client per Flower node, its data and its state on that node.

The ClientApp learns its client id from the node config (`partition-id`, checked against `num-partitions`),
loads only its own partition (or a node-local `data-path` file), builds the runtime once per process and runs
`fedmole.client.execute.execute` for each message, as the in-process engine does.

Client state (data cursor, FLAME rescaler, private adapters, personalised parts) lives on the node in
`<state dir>/run-<run id>/client-<id>.safetensors` (tensors + JSON meta in the file's metadata, written to a
temporary file and renamed; the format of client/store.py), so it survives a fresh process per message. The
state dir is the node config's `state-dir`, else the run config's `state-dir`, else `<system temp
dir>/fedmole-flower-state`. `query` messages read and write it for the server's checkpoints and resume.

Like the ServerApp, this is an application of the round loop's building blocks: it builds its runtime and
data with `fedmole.run` (`build_runtime`, `load_federated_data`), so it sits above `run` in the layers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmole.algorithms import get_algorithm
from fedmole.client.execute import execute
from fedmole.client.store import file_name, read_state, write_state
from fedmole.config import Config
from fedmole.data.partition import ClientData, split_client
from fedmole.data.schema import Example
from fedmole.data.sources import load_examples
from fedmole.engines.flower.records import (GET_STATE, HELLO, QUERY, SET_STATE, arrays, failure_content,
                                            reply_content, tensors_of)
from fedmole.engines.flower.runconfig import config_from_text, run_settings
from fedmole.errors import UserError
from fedmole.messages import ClientState, Payload
from fedmole.run import build_runtime, load_federated_data


# ------------------------------------------------------------------------------- node-local state
def state_root(context: Context, settings: dict) -> Path:
    """This run's state directory on this node (see the module docstring for where it is)."""
    root = context.node_config.get("state-dir") or settings.get("state-dir")
    root = Path(root) if root else Path(tempfile.gettempdir()) / "fedmole-flower-state"
    return root / f"run-{context.run_id}"


def state_path(context: Context, settings: dict, cid: int) -> Path:
    return state_root(context, settings) / file_name(cid)


# ---------------------------------------------------------------------------------------- the client
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
        path = Path(data_path)
        if not path.is_file():
            raise UserError(f"node config data-path={data_path} is not a file")
        fmt = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}.get(path.suffix)
        if fmt is None:
            raise UserError(f"node config data-path={data_path}: use a .jsonl, .json or .csv file")
        data_cfg = cfg.data.model_copy(update={"source": fmt, "path": str(path)})
        return split_client(cid, load_examples(data_cfg, cfg.partition_seed), cfg.partition, cfg.partition_seed)
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
    settings = run_settings(context.run_config, bound)
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


# the object a Flower app's pyproject points at (`flwr run`): settings come from the run config
client_app = make_client_app()
