"""The round loop end to end: run directory, summary, reproducibility, the data stream."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmole.client.data import BatchStream
from fedmole.config_io import load_config
from fedmole.run import sample_clients

from conftest import metrics_records, run_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _run(tmp_path, name, *overrides):
    return run_config(SMOKE, overrides, tmp_path / name)


def test_smoke_run_through_the_cli(tmp_path):
    run_dir = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), "--out", str(run_dir),
                           "--progress", "none"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "state_digest" in proc.stdout and "global (headline)" in proc.stdout
    for name in ("config.yaml", "partition.json", "metrics.jsonl", "summary.json", "run.log"):
        assert (run_dir / name).is_file(), name
    ckpt = run_dir / "checkpoints" / "round_0002"
    assert {p.name for p in ckpt.iterdir()} == {"server.safetensors", "clients", "state.json", "manifest.json"}
    assert {p.name for p in (ckpt / "clients").iterdir()} == {f"client-{c}.safetensors" for c in range(10)}
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert not (run_dir / "client_states").exists()  # the engine's store is gone; the checkpoint holds the states

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "fedit" and summary["rounds_completed"] == 2
    assert summary["personalized"] is None and summary["global"]["selected_round"] in (1, 2)
    assert set(summary["global"]["per_client"]) == {str(c) for c in range(10)}
    assert len(summary["state_digest"]) == 64

    records = metrics_records(run_dir)
    assert all(set(r) == {"round", "client", "model", "split", "metric", "value"} for r in records)
    losses = [r for r in records if r["split"] == "train" and r["metric"] == "loss"]
    assert len(losses) == 2 * 10  # every client, every round
    tests = [r for r in records if r["model"] == "global" and r["split"] == "test" and r["client"] is not None
             and r["metric"] == "score"]
    assert {r["round"] for r in tests} == {1, 2} and len(tests) == 20

    manifest = json.loads((run_dir / "partition.json").read_text())
    assert len(manifest["clients"]) == 10


def test_same_seed_same_digest_and_another_seed_differs(tmp_path):
    fast = ["federation.num_clients=3", "eval.every=2", "eval.max_examples=2"]
    a, _ = _run(tmp_path, "a", *fast)
    b, _ = _run(tmp_path, "b", *fast)
    c, _ = _run(tmp_path, "c", *fast, "federation.seed=7")
    assert a["state_digest"] == b["state_digest"]
    assert a["global"]["per_client"] == b["global"]["per_client"]
    assert c["state_digest"] != a["state_digest"]


def test_local_reports_personalized_only_and_fedit_ft_reports_both(tmp_path):
    fast = ["federation.num_clients=3", "federation.rounds=1", "eval.max_examples=2"]
    local, _ = _run(tmp_path, "local", *fast, "algorithm.name=local")
    assert local["global"] is None and local["headline"] == "personalized"
    assert set(local["personalized"]["per_client"]) == {"0", "1", "2"}
    ft, run_dir = _run(tmp_path, "ft", *fast, "algorithm.personalize_by_finetune=true")
    assert ft["headline"] == "personalized" and ft["global"] is not None and ft["personalized"] is not None
    recs = metrics_records(run_dir)
    assert {r["model"] for r in recs if r["split"] == "test"} == {"personalized", "global"}


def test_batch_stream_resumes_from_its_cursor_and_reshuffles_per_epoch():
    full = BatchStream(10, 4, seed=1, client_id=3)
    seq = [full.next() for _ in range(6)]  # 2 epochs: 4 + 4 + 2 per epoch
    assert sorted(i for b in seq[:3] for i in b) == list(range(10))
    assert seq[0] + seq[1] + seq[2] != seq[3] + seq[4] + seq[5]  # a new permutation each epoch
    part = BatchStream(10, 4, seed=1, client_id=3)
    for _ in range(4):
        part.next()
    resumed = BatchStream(10, 4, seed=1, client_id=3, cursor=part.cursor)
    assert [resumed.next() for _ in range(2)] == seq[4:]
    assert BatchStream(10, 4, seed=1, client_id=4).next() != seq[0]


def test_client_sampling_is_seeded_per_round():
    cfg = load_config(SMOKE, ["federation.clients_per_round=4"])
    r1 = sample_clients(cfg, 1)
    assert len(r1) == 4 and r1 == sorted(set(r1)) and r1 == sample_clients(cfg, 1)
    assert any(sample_clients(cfg, r) != r1 for r in range(2, 6))
    assert sample_clients(load_config(SMOKE), 1) == list(range(10))


def test_existing_run_directory_is_refused_without_overwrite(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".fedmole-run").write_text("{}")
    (tmp_path / "r" / "summary.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (tmp_path / "r" / "summary.json").read_text() == "{}"


def test_a_changed_partition_is_refused_with_its_consequence(tmp_path):
    """Resume and re-evaluation share one check: a run directory whose partition.json no longer matches the
    data is refused, and an unchanged one passes and yields the same text."""
    from fedmole.errors import UserError
    from fedmole.run import check_partition, load_federated_data

    cfg = load_config(SMOKE, ["data.max_examples=600", "federation.num_clients=4"])
    clients = load_federated_data(cfg)
    text = check_partition(cfg, clients, tmp_path, "nothing")  # no partition.json yet: accepted
    (tmp_path / "partition.json").write_text(text)
    assert check_partition(cfg, clients, tmp_path, "nothing") == text
    changed = json.loads(text)
    changed["clients"][0]["sizes"]["train"] += 1
    (tmp_path / "partition.json").write_text(json.dumps(changed, indent=1))
    with pytest.raises(UserError, match="data partition differs.*so the run cannot be resumed"):
        check_partition(cfg, clients, tmp_path, "the run cannot be resumed")
