"""`fedmole run --engine flower-sim` (Flower's simulation engine on Ray) against the in-process engine.

Two simulations only (each starts Ray: about 5 s and 1.5-3 GiB): FedAMoLE, whose clients get different expert
sets (heterogeneous payloads), and FedIT with injected drops and crashes. Both engines run the same config with
`train.num_threads=1` and must end with the same state digest and the same metric records, bit for bit: every
client computation is seeded by (seed, round, client, phase) and runs the same code on the same tensors; only
the process it runs in differs. Each simulation runs through the CLI in a subprocess marked by a unique
environment variable, and afterwards no process carrying that mark may be left."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

import fedmole
from fedmole.config_io import load_config
from fedmole.run import run_experiment

from conftest import canonical_lines

pytestmark = pytest.mark.slow  # each test starts Ray
ROOT = Path(fedmole.__file__).resolve().parents[1]
FAST = ["federation.num_clients=3", "federation.rounds=2", "train.local_steps=2", "eval.max_examples=2",
        "train.num_threads=1", "data.source=jsonl", "data.max_examples=null"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    rows = [{"instruction": f"{['Define', 'Spell', 'Rhyme'][i % 3]} the word w{i}.", "context": "",
             "response": f"thing {i % 17}", "task": f"t{i % 3}", "domain": f"d{i % 2}"} for i in range(180)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _marked_processes(mark: str) -> list[int]:
    pids = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDMOLE_TEST_MARK") == mark:
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def _both(tmp_path, config, overrides):
    """(summary, run dir) of the in-process run and of the flower-sim run through the CLI."""
    cfg = load_config(config, overrides)
    ref_dir = tmp_path / "inprocess"
    ref_dir.mkdir()
    ref = run_experiment(cfg, ref_dir, "none")

    mark = uuid.uuid4().hex
    sim_dir = tmp_path / "sim"
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDMOLE_TEST_MARK": mark, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(config), *args, "--engine", "flower-sim",
                           "--out", str(sim_dir), "--progress", "none"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    left = _marked_processes(mark)
    assert left == [], f"processes left by the simulation: {left}"
    return ref, ref_dir, json.loads((sim_dir / "summary.json").read_text()), sim_dir


def test_fedamole_through_flower_sim_equals_inprocess(tmp_path, data_file):
    overrides = [*FAST, f"data.path={data_file}"]
    ref, ref_dir, sim, sim_dir = _both(tmp_path, ROOT / "configs" / "smoke_fedamole.yaml", overrides)
    assert sim["engine"] == "flower-sim" and ref["engine"] == "inprocess"
    assert sim["state_digest"] == ref["state_digest"]
    assert canonical_lines(sim_dir / "metrics.jsonl") == canonical_lines(ref_dir / "metrics.jsonl")
    assert canonical_lines(sim_dir / "assignments.jsonl") == canonical_lines(ref_dir / "assignments.jsonl")
    assert (sim_dir / "partition.json").read_text() == (ref_dir / "partition.json").read_text()
    sim_cfg, ref_cfg = (yaml.safe_load((d / "config.yaml").read_text()) for d in (sim_dir, ref_dir))
    assert sim_cfg.pop("output")["progress"] == "none"  # the CLI run was asked for --progress none
    ref_cfg.pop("output")
    assert sim_cfg == ref_cfg
    # the payloads really were heterogeneous: clients held different expert sets
    last = json.loads((sim_dir / "assignments.jsonl").read_text().splitlines()[-1])
    module_sets = next(iter(last["experts"].values()))
    assert len({tuple(v) for v in module_sets.values()}) == 3
    per_client = sim["personalized"]["per_client"] if sim["personalized"] else sim["global"]["per_client"]
    assert set(per_client) == {"0", "1", "2"}


def test_fedit_with_injected_drops_and_crashes_through_flower_sim_equals_inprocess(tmp_path, data_file):
    overrides = [*FAST, f"data.path={data_file}", "faults.drop_probability=0.25", "faults.crash_probability=0.25",
                 "faults.seed=3", "partition.scheme=iid"]
    ref, ref_dir, sim, sim_dir = _both(tmp_path, ROOT / "configs" / "smoke.yaml", overrides)
    assert ref["skipped"]["dropped"] + ref["skipped"]["crashed"] > 0, "the fault seed must inject some faults"
    assert sim["skipped"] == ref["skipped"]
    assert sim["state_digest"] == ref["state_digest"]
    assert canonical_lines(sim_dir / "metrics.jsonl") == canonical_lines(ref_dir / "metrics.jsonl")


def test_an_error_in_the_server_app_surfaces_and_leaves_no_process(tmp_path, data_file):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / ".fedmole-run").write_text("{}")  # a fedmole run directory: the ServerApp refuses to overwrite it
    (run_dir / "metrics.jsonl").write_text("")
    mark = uuid.uuid4().hex
    script = ("import sys; from pathlib import Path\n"
              "from fedmole.config_io import load_config\n"
              "from fedmole.engines.flower.simulation import run_flower_sim\n"
              "from fedmole.errors import UserError\n"
              f"cfg = load_config({str(ROOT / 'configs' / 'smoke.yaml')!r}, {[*FAST, f'data.path={data_file}']!r})\n"
              "try:\n"
              f"    run_flower_sim(cfg, Path({str(run_dir)!r}), 'none')\n"
              "except UserError as err:\n"
              "    print('USER ERROR:', err); sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDMOLE_TEST_MARK": mark, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "USER ERROR:" in proc.stdout and "already holds a run" in proc.stdout
    assert _marked_processes(mark) == []
