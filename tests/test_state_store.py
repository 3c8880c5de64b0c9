"""Client state off the heap: the in-process engine keeps its clients' states in files (client/store.py),
checkpoints link those files, and the run's logs keep only totals and means in memory. None of it may move a
number: a run with the store ends with the same digest, metrics, outcomes and checkpointed states as one that
keeps every state in a dict (how the engine worked before), and resumes to the same result."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fedmole.adapters.state import state_digest
from fedmole.client.store import StateStore, read_state
from fedmole.config_io import dump_config, load_config
from fedmole.engines.inprocess import InProcessEngine
from fedmole.messages import ClientState
from fedmole.reporting.metrics import MetricsLog, summarize
from fedmole.run import _execute, _setup, clients_digest, load_checkpoint, resume_experiment, sample_eval_clients

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# FedIT-FT under the deferred test: every client keeps snapshots (tensors) and a data cursor (meta) between
# rounds; 2 of 6 clients train per round and 3 evaluate the global model, so most states stay on disk
SCALE = ["federation.num_clients=6", "federation.clients_per_round=2", "eval.clients=3", "federation.rounds=3",
         "algorithm.personalize_by_finetune=true", "eval.test=selected", "train.local_steps=1",
         "eval.max_examples=2", "train.num_threads=1", "checkpoint.keep_last=null", "data.source=jsonl",
         "data.max_examples=null", "partition.scheme=iid"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    rows = [{"instruction": f"{['Define', 'Spell', 'Rhyme'][i % 3]} the word w{i}.", "context": "",
             "response": f"thing {i % 17}", "task": f"t{i % 3}", "domain": f"d{i % 2}"} for i in range(120)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(data, *extra):
    return load_config(SMOKE, [*SCALE, f"data.path={data}", *extra])


def _run(cfg, run_dir, engine=None):
    """A run whose in-process engine holds its states as `engine(procedure, run_dir)` says (default: the
    run's own store)."""
    run_dir.mkdir()
    dump_config(cfg, run_dir / "config.yaml")
    fed = _setup(cfg, run_dir, "none")
    if engine is not None:
        fed.engine = engine(fed.engine.procedure, run_dir)
    return _execute(fed, 1, 0.0), fed


def _lines(path):
    return path.read_text().splitlines()


def _same_states(a, b):
    assert sorted(a) == sorted(b)
    for c in a:
        assert a[c].meta == b[c].meta and a[c].tensors.keys() == b[c].tensors.keys()
        assert all(torch.equal(a[c].tensors[k], b[c].tensors[k]) for k in a[c].tensors)


# ------------------------------------------------------------------------------------------ the store
def test_store_reads_back_what_it_wrote_and_keeps_only_the_latest_in_memory(tmp_path):
    store = StateStore(tmp_path / "s", cache=2, fresh=True)
    for c in range(4):
        store[c] = ClientState({"x": torch.full((3,), float(c))}, {"cursor": {"epoch": 0, "pos": c}, 7: (1, 2)})
    assert list(store) == [0, 1, 2, 3] and len(store) == 4 and 5 not in store
    assert sorted(store._cache) == [2, 3]  # the two most recently used
    assert torch.equal(store[0].tensors["x"], torch.zeros(3))  # from disk
    assert list(store._cache) == [3, 0]  # oldest first
    # a state reads the same from memory and from disk: meta as JSON gives it back
    assert store[3].meta == read_state(store.path(3)).meta == {"cursor": {"epoch": 0, "pos": 3}, "7": [1, 2]}
    with pytest.raises(KeyError):
        store[9]
    del store[1]
    assert list(store) == [0, 2, 3] and not store.path(1).exists()
    assert list(StateStore(tmp_path / "s")) == [0, 2, 3]  # the files are the states
    assert list(StateStore(tmp_path / "s", fresh=True)) == []


def test_a_linked_checkpoint_keeps_the_state_it_was_made_with(tmp_path):
    store = StateStore(tmp_path / "s", cache=0, fresh=True)
    store[0] = ClientState({"x": torch.zeros(2)}, {"round": 1})
    store.link_into(tmp_path / "ckpt")
    assert os.stat(tmp_path / "ckpt" / "client-0.safetensors").st_ino == os.stat(store.path(0)).st_ino  # no copy
    store[0] = ClientState({"x": torch.ones(2)}, {"round": 2})  # the next round replaces the file
    kept = read_state(tmp_path / "ckpt" / "client-0.safetensors")
    assert kept.meta == {"round": 1} and torch.equal(kept.tensors["x"], torch.zeros(2))
    store.remove()
    assert not (tmp_path / "s").exists() and (tmp_path / "ckpt" / "client-0.safetensors").is_file()


def test_clients_digest_reads_one_client_at_a_time_in_the_digest_order():
    states = {c: ClientState({"B": torch.full((2,), float(c)), "A": torch.ones(1), "@eval/g/1/A": torch.ones(1)})
              for c in (1, 2, 10)}  # "client/10/" sorts between "client/1/" and "client/2/"
    flat = {f"client/{c}/{k}": v for c, st in states.items() for k, v in st.tensors.items() if not k.startswith("@")}
    assert clients_digest(states) == state_digest(flat)


def test_evaluation_clients_are_drawn_per_round_and_seeded(data_file):
    cfg = _cfg(data_file)
    draws = [sample_eval_clients(cfg, r) for r in range(1, 6)]
    assert all(len(d) == 3 and d == sorted(set(d)) for d in draws) and len({tuple(d) for d in draws}) > 1
    assert draws == [sample_eval_clients(cfg, r) for r in range(1, 6)]
    assert sample_eval_clients(_cfg(data_file, "eval.clients=null"), 1) == list(range(6))


# ----------------------------------------------------------------------------------------- a whole run
def test_the_store_changes_no_number_and_resumes_exactly(tmp_path, data_file):
    cfg = _cfg(data_file)
    ref, ref_fed = _run(cfg, tmp_path / "dict", lambda proc, run_dir: InProcessEngine(proc))
    got, fed = _run(cfg, tmp_path / "store",  # no cache: every state is read from disk
                    lambda proc, run_dir: InProcessEngine(proc, StateStore(run_dir / "client_states", fresh=True)))
    timing = {"wall_seconds", "cpu_seconds", "seconds"}  # where the time went differs from run to run
    assert got["state_digest"] == ref["state_digest"] and got == {**ref, **{k: got[k] for k in timing}}
    assert got["seconds"].keys() == ref["seconds"].keys() == {"setup", "train", "evaluate", "other"}
    for name in ("metrics.jsonl", "outcomes.jsonl", "comm.jsonl"):
        assert _lines(tmp_path / "store" / name) == _lines(tmp_path / "dict" / name), name
    for rnd in (1, 2, 3):
        ckpt = f"checkpoints/round_{rnd:04d}"
        _same_states(load_checkpoint(tmp_path / "store" / ckpt, True)[2], load_checkpoint(tmp_path / "dict" / ckpt, True)[2])
    last = load_checkpoint(tmp_path / "store" / "checkpoints/round_0003", True)[2]
    assert len(last) == 6 and any(k.startswith("@eval/") for st in last.values() for k in st.tensors)
    assert not (tmp_path / "store" / "client_states").exists()

    # what stays in memory: the means over clients, running comm totals
    assert fed.metrics.means and all(r["client"] is None for r in fed.metrics.means)
    assert fed.metrics.count == len(_lines(tmp_path / "store" / "metrics.jsonl")) and not hasattr(fed.comm, "records")
    records = [json.loads(x) for x in _lines(tmp_path / "store" / "metrics.jsonl")]
    assert summarize(fed.metrics.summary_records("val_score"), "val_score") == summarize(records, "val_score")
    evaluated = {r["round"]: {x["client"] for x in records if x["round"] == r["round"] and x["model"] == "global"
                              and x["split"] == "val" and x["client"] is not None}
                 for r in records if r["model"] == "global"}
    assert all(len(clients) == 3 for clients in evaluated.values())

    # interrupted after round 1: the resumed run (with the default store) ends the same
    run_dir = tmp_path / "store"
    for rnd in (2, 3):
        shutil.rmtree(run_dir / "checkpoints" / f"round_{rnd:04d}")
    (run_dir / "summary.json").unlink()
    resumed = resume_experiment(run_dir, progress_mode="none")
    assert resumed["state_digest"] == ref["state_digest"] and resumed["personalized"] == ref["personalized"]
    assert resumed["seconds"]["train"] > 0 and resumed["seconds"].keys() == ref["seconds"].keys()  # kept over a resume
    assert _lines(run_dir / "metrics.jsonl") == _lines(tmp_path / "dict" / "metrics.jsonl")
    _same_states(load_checkpoint(run_dir / "checkpoints/round_0003", True)[2],
                 load_checkpoint(tmp_path / "dict" / "checkpoints/round_0003", True)[2])


def test_the_metrics_log_rebuilds_its_totals_from_the_file(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.add([{"round": 1, "client": 0, "model": "local", "split": "train", "metric": "dp_groups", "value": 3},
             {"round": 1, "client": 2, "model": None, "split": "round", "metric": "client_dropped", "value": 1},
             {"round": 1, "client": None, "model": "global", "split": "val", "metric": "score", "value": 0.5}])
    again = MetricsLog(tmp_path / "m.jsonl")
    for m in (log, again):
        assert (m.count, m.dp_groups, m.round_counts["client_dropped"], len(m.means)) == (3, 3, 1, 1)
    again.truncate(1)
    assert (again.count, again.dp_groups, again.round_counts["client_dropped"], again.means) == (1, 3, 0, [])
    assert len(_lines(tmp_path / "m.jsonl")) == 1
