"""The wire codec: payloads, replies and failures <-> Flower message contents (one message per client).

  server -> client  "arrays": ArrayRecord (payload tensors), "config": ConfigRecord {client, payload (JSON)}
  client -> server  "arrays": ArrayRecord (reply tensors), "metrics": MetricRecord (numeric metrics +
                    num-examples), "config": ConfigRecord {reply (JSON: num_examples, metrics, evals, extra)}
                    or {failure (JSON: [kind, message])}

`query` messages carry an `action` in their config record: `hello` (which client does this node hold?),
`get_state` / `set_state` (the client's persistent state, for checkpoints and resume).
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmole.comm import wire_dtype
from fedmole.messages import Payload, Reply

TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
HELLO, GET_STATE, SET_STATE = "hello", "get_state", "set_state"

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
    """The tensors of an `arrays` record, in their own dtypes again."""
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
