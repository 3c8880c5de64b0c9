"""Communication accounting: the exact serialised bytes of every message, optional transfer compression,
and an optional cumulative budget.

A message is the tensors of a payload (server -> client, `down`) or of a reply (client -> server, `up`),
serialised as one safetensors blob: an 8-byte length, a JSON header naming every tensor with its dtype,
shape and offsets (padded with spaces to a multiple of 8), then the raw tensor data. `message_size`
computes the length of that blob from the names, shapes and dtypes alone (no copy of the data); a test
checks it against `safetensors.torch.save`. A message without tensors (a payload of `local`, a reply to a
global evaluation) counts 0. The JSON instructions of a payload (round, lr, steps...) and the metrics of a
reply are not counted: they are a few hundred bytes that no method changes.

Every message becomes one record of `comm.jsonl`:
`{"round", "client", "phase" (train | evaluate), "direction" (down | up), "dtype", "bytes", "header_bytes",
"tensors", "kinds": {kind: bytes}, "groups": {"module/expert": bytes}}` where `groups` holds the tensor data
bytes by adapter state key (`module/expert/name`, see adapters/state.py) without the tensor name, and
`kinds` the same bytes by what the tensors are (experts, shared, router, embeddings, lora, rescaler,
other) plus `header`. `bytes` = sum of `kinds` = the blob's length.

`comm.dtype` (fp16 / bf16) casts every floating tensor to that dtype for the transfer, both ways, and back
to its own dtype on arrival; the accounting counts the cast tensors. `comm.budget_mb` stops the run before
a training round whose worst case (the exact download plus the largest upload its clients may send, per
the strategy's `reply_spec`) would take the cumulative training traffic past the budget. Evaluation
messages (the global model sent to every client for measurement) are recorded with `phase: evaluate` but
do not count against the budget.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from fedmole.adapters.state import SEP, parse_key

MB = 1_000_000  # budgets and reports use decimal megabytes
TRANSFER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# safetensors dtype names, in the library's order of precedence: tensors are laid out by dtype (this order)
# then by name, which fixes the offsets written in the header
_ST_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.uint32: "U32", torch.int32: "I32",
    torch.float32: "F32", torch.uint16: "U16", torch.int16: "I16", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
SENDABLE = frozenset(_ST_DTYPES)  # dtypes a message can carry
_ST_ORDER = ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
             "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
_ST_RANK = {name: i for i, name in enumerate(_ST_ORDER)}
EMBEDDINGS = ("t", "u")  # tensor names of uploaded statistics (FedAMoLE's RSEA embeddings)
KINDS = ("experts", "shared", "router", "embeddings", "lora", "rescaler", "other", "header")

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


# ------------------------------------------------------------------------------------------- sizes
def specs_of(tensors: dict[str, torch.Tensor]) -> Spec:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def wire_dtype(dtype: torch.dtype, transfer: str) -> torch.dtype:
    """The dtype a tensor travels in: floating tensors take the transfer dtype unless it is fp32 (= off)."""
    return TRANSFER_DTYPES[transfer] if transfer != "fp32" and dtype.is_floating_point else dtype


def message_size(spec: Spec) -> tuple[int, int]:
    """(total bytes, header bytes) of the safetensors serialisation of tensors with these names, shapes and
    dtypes: 8 + JSON header padded to a multiple of 8 + data."""
    order = sorted(spec, key=lambda k: (_ST_RANK[_ST_DTYPES[spec[k][1]]], k.encode()))
    entries, offset = [], 0
    for k in order:
        shape, dtype = spec[k]
        n = _numel(shape) * _itemsize(dtype)
        entries.append(f'{json.dumps(k, ensure_ascii=False)}:{{"dtype":"{_ST_DTYPES[dtype]}","shape":'
                       f'[{",".join(str(int(d)) for d in shape)}],"data_offsets":[{offset},{offset + n}]}}')
        offset += n
    header = len(("{" + ",".join(entries) + "}").encode())
    header += -header % 8
    return 8 + header + offset, 8 + header


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kind_of(k: str) -> str:
    """What a tensor of the trainable state is, from its key `module/expert/name`."""
    if k.count(SEP) < 2:
        return "other"
    _, expert, name = parse_key(k)
    if name in EMBEDDINGS:
        return "embeddings"
    if expert.isdigit():
        return "experts"
    if expert in ("shared", "router", "rescaler"):
        return expert
    if expert in ("lora", "merged"):
        return "lora"
    return "other"


def group_of(k: str) -> str:
    """`module/expert` of a state key (the key itself when it is not of that form)."""
    return k.rsplit(SEP, 1)[0] if k.count(SEP) >= 2 else k


def message_record(rnd: int, cid: int, phase: str, direction: str, spec: Spec, transfer: str) -> dict:
    wire = {k: (shape, wire_dtype(dtype, transfer)) for k, (shape, dtype) in spec.items()}
    total, header = message_size(wire) if wire else (0, 0)  # no tensors, nothing to serialise
    kinds: dict[str, int] = defaultdict(int)
    groups: dict[str, int] = defaultdict(int)
    for k, (shape, dtype) in sorted(wire.items()):
        n = _numel(shape) * _itemsize(dtype)
        kinds[kind_of(k)] += n
        groups[group_of(k)] += n
    kinds["header"] = header
    return {"round": rnd, "client": cid, "phase": phase, "direction": direction, "dtype": transfer,
            "bytes": total, "header_bytes": header, "tensors": len(wire), "kinds": dict(kinds),
            "groups": dict(groups)}


# ------------------------------------------------------------------------------------- compression
def transfer(tensors: dict[str, torch.Tensor], dtype: str, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors as the receiver gets them: cast to the transfer dtype and back (identity for fp32).
    `cache` (id -> cast tensor) avoids casting a tensor shared by several payloads more than once."""
    if dtype == "fp32":
        return tensors
    cache = {} if cache is None else cache
    out = {}
    for k, t in tensors.items():
        if not t.is_floating_point() or t.dtype == TRANSFER_DTYPES[dtype]:
            out[k] = t
            continue
        if id(t) not in cache:
            cache[id(t)] = (t, t.to(TRANSFER_DTYPES[dtype]).to(t.dtype))  # keep t alive: ids stay unique
        out[k] = cache[id(t)][1]
    return out


# --------------------------------------------------------------------------------------------- log
class CommLog:
    """comm.jsonl: one record per message, appended as it is sent; in memory only the running totals that
    the budget and summary.json need (so a long run with many clients holds no record)."""

    def __init__(self, path: Path, dtype: str = "fp32", budget_mb: float | None = None):
        self.path, self.dtype, self.budget_mb = path, dtype, budget_mb
        self.load()

    def load(self) -> None:
        """(Re)compute the totals from the file, e.g. after a resume truncated it to the checkpoint's round."""
        self.messages = 0
        self.by_dir: dict[str, int] = defaultdict(int)
        self.by_phase: dict[str, int] = defaultdict(int)
        self.by_kind: dict[str, int] = defaultdict(int)
        self.by_client: dict[str, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
        if self.path.exists():
            with self.path.open() as fh:
                for line in fh:
                    if line.strip():
                        self._count(json.loads(line))

    def _count(self, r: dict) -> None:
        self.messages += 1
        self.by_dir[r["direction"]] += r["bytes"]
        self.by_phase[r["phase"]] += r["bytes"]
        self.by_client[str(r["client"])][r["direction"]] += r["bytes"]
        for k, v in r["kinds"].items():
            self.by_kind[k] += v

    def add(self, records: list[dict]) -> None:
        if not records:
            return
        with self.path.open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
        for r in records:
            self._count(r)

    def log(self, rnd: int, phase: str, direction: str, tensors_by_client: dict[int, dict[str, torch.Tensor]]) -> None:
        self.add([message_record(rnd, cid, phase, direction, specs_of(t), self.dtype)
                  for cid, t in sorted(tensors_by_client.items())])

    # budget -------------------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_mb is None else int(self.budget_mb * MB)

    def train_bytes(self) -> int:
        return self.by_phase["train"]

    def worst_case(self, downloads: dict[int, Spec], uploads: dict[int, Spec]) -> int:
        """Bytes of a training round if every client uploads everything its reply spec allows."""
        size = lambda spec: message_record(0, 0, "train", "down", spec, self.dtype)["bytes"]  # noqa: E731
        return sum(size(s) for s in downloads.values()) + sum(size(s) for s in uploads.values())

    def fits(self, round_bytes: int) -> bool:
        budget = self.budget_bytes
        return budget is None or self.train_bytes() + round_bytes <= budget

    # totals -------------------------------------------------------------------------------------
    def totals(self) -> dict:
        """summary.json's `comm`: bytes per direction, phase, client and kind, and overall."""
        total = sum(self.by_dir.values())
        return {
            "dtype": self.dtype,
            "budget_mb": self.budget_mb,
            "bytes": total,
            "megabytes": total / MB,
            "messages": self.messages,
            "down": self.by_dir["down"],
            "up": self.by_dir["up"],
            "by_phase": {p: self.by_phase[p] for p in ("train", "evaluate")},
            "by_client": {c: dict(self.by_client[c]) for c in sorted(self.by_client, key=int)},
            "by_kind": {k: self.by_kind[k] for k in KINDS if self.by_kind.get(k)},
        }
