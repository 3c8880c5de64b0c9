"""Client states on disk: one safetensors file per client, and a small in-memory cache of the latest used.

A simulation of 1,000 clients that samples 10 per round should hold about what 10 clients hold, so the
in-process engine keeps its clients' states (data cursors, private adapters, FLAME rescalers, the snapshots
of `eval.test: selected`) here rather than in a dict: a state is read when its client is sampled and written
back after the client finished.

File format, the same for the in-process engine's store (`<run dir>/client_states/`), the state a Flower
node keeps (`<state-dir>/run-<run id>/`) and a checkpoint's clients (`checkpoints/round_NNNN/clients/`):
`client-<id>.safetensors` holds the state's tensors, and its JSON meta under the file's metadata key `meta`.
A file is written under a temporary name and renamed, so a reader sees the old file or the new one, never
half of one, and a hard link to the old file (a checkpoint) keeps the old content: a checkpoint links the
store's files instead of copying them.

The cache keeps each state as it would be read back from its file (meta through JSON), so results do not
depend on whether a state came from memory or from disk.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from fedmole.messages import ClientState

PREFIX, SUFFIX = "client-", ".safetensors"


def file_name(cid: int) -> str:
    return f"{PREFIX}{cid}{SUFFIX}"


def write_state(path: Path, state: ClientState) -> None:
    """Tensors + JSON meta in one safetensors file, written to a temporary name and renamed (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}, tmp,
              metadata={"meta": json.dumps(state.meta)})
    os.replace(tmp, path)


def read_state(path: Path) -> ClientState | None:
    """The state in `path`, or None when there is no such file."""
    try:
        with safe_open(path, "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
            return ClientState({k: fh.get_tensor(k) for k in fh.keys()}, meta)
    except FileNotFoundError:
        return None


def client_ids(root: Path) -> set[int]:
    """The clients that have a state file in `root`."""
    ids = set()
    for p in root.glob(f"{PREFIX}*{SUFFIX}"):
        number = p.name[len(PREFIX):-len(SUFFIX)]
        if number.isdigit():
            ids.add(int(number))
    return ids


def save_states(root: Path, states: Mapping[int, ClientState]) -> None:
    """Write every state of `states` into `root` (one file per client)."""
    root.mkdir(parents=True, exist_ok=True)
    for cid, state in states.items():
        write_state(root / file_name(cid), state)


class MemoryStore(dict[int, ClientState]):
    """Client states in a dict, with a `StateStore`'s interface (tests, re-evaluation: no run directory)."""

    def link_into(self, root: Path) -> None:
        save_states(root, self)

    def remove(self) -> None:
        self.clear()


class StateStore(MutableMapping[int, ClientState]):
    """The states of the clients in the files of `root`, a mapping client id -> ClientState read on access.

    Setting a client's state writes its file (atomically) and keeps the state among the `cache` most
    recently used ones in memory. `fresh=True` empties `root` first (a new engine); otherwise the files
    already there are the states (reading a checkpoint)."""

    def __init__(self, root: str | Path, cache: int = 0, fresh: bool = False):
        self.root = Path(root)
        if fresh:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache_size = cache
        self._ids = client_ids(self.root)
        self._cache: OrderedDict[int, ClientState] = OrderedDict()

    def path(self, cid: int) -> Path:
        return self.root / file_name(cid)

    # Mapping --------------------------------------------------------------------------------------
    def __getitem__(self, cid: int) -> ClientState:
        if cid in self._cache:
            self._cache.move_to_end(cid)
            return self._cache[cid]
        state = read_state(self.path(cid)) if cid in self._ids else None
        if state is None:
            raise KeyError(cid)
        self._remember(cid, state)
        return state

    def __contains__(self, cid: object) -> bool:
        return cid in self._ids

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    # writing --------------------------------------------------------------------------------------
    def __setitem__(self, cid: int, state: ClientState) -> None:
        """Store `state` as client `cid`'s: written to disk now; the cache holds it as a read would return it."""
        state = ClientState(dict(state.tensors), json.loads(json.dumps(state.meta)))
        write_state(self.path(cid), state)
        self._ids.add(cid)
        self._remember(cid, state)

    def __delitem__(self, cid: int) -> None:
        if cid not in self._ids:
            raise KeyError(cid)
        self.path(cid).unlink(missing_ok=True)
        self._ids.discard(cid)
        self._cache.pop(cid, None)

    def link_into(self, root: Path) -> None:
        """Put every client's current file into `root` as a hard link (a copy where the file system has no
        links): a checkpoint of every state without copying data. Later `put`s replace the store's files by
        renaming, so the links keep the content they were made with."""
        root.mkdir(parents=True, exist_ok=True)
        for cid in self._ids:
            target = root / file_name(cid)
            try:
                os.link(self.path(cid), target)
            except OSError:
                shutil.copyfile(self.path(cid), target)

    def remove(self) -> None:
        """Delete the store's directory (the states live on in the checkpoints that link them)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._ids.clear()
        self._cache.clear()

    def _remember(self, cid: int, state: ClientState) -> None:
        if self.cache_size <= 0:
            return
        self._cache[cid] = state
        self._cache.move_to_end(cid)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
