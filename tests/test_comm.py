"""Communication accounting: exact bytes per message, fp16 transfer, the cumulative budget, resume."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from fedmole.adapters.state import parse_key, state_digest
from fedmole.comm import MB, message_size, specs_of
from fedmole.config_io import load_config
from fedmole.errors import UserError
from fedmole.run import resume_experiment

from conftest import run_config

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.max_examples=300", "train.local_steps=2", "eval.max_examples=2", "eval.generation.max_new_tokens=2",
        "federation.rounds=2"]
FEDIT = ["federation.num_clients=3", "partition.min_size=10", *FAST]
FEDAMOLE = ["federation.num_clients=4", "data.max_examples=400", *FAST[1:]]
# tiny-llama (fedmole/models/tiny.py): hidden 64, 4 heads of 16, 2 KV heads, MLP 128, 2 layers
DIMS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}  # (d_in, d_out)
LAYERS = 2


def _run(root: Path, name: str, config: str, overrides: list[str]) -> tuple[dict, Path]:
    return run_config(ROOT / "configs" / config, overrides, root / name)


def _comm(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "comm.jsonl").read_text().splitlines()]


def _data_bytes(rec: dict) -> int:
    return rec["bytes"] - rec["header_bytes"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("comm")
    return {
        "fedit": _run(root, "fedit", "smoke.yaml", FEDIT),
        "fp16": _run(root, "fp16", "smoke.yaml", [*FEDIT, "comm.dtype=fp16"]),
        "fedamole": _run(root, "fedamole", "smoke_fedamole.yaml", FEDAMOLE),
        "root": root,
    }


def test_message_size_equals_the_safetensors_serialisation():
    rng = random.Random(0)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
              torch.bool]
    for _ in range(100):
        tensors = {f"model.layers.{rng.randint(0, 30)}.q_proj/{rng.choice(['3', 'shared', 'router'])}/"
                   f"{rng.choice('ABu')}{i}": torch.zeros([rng.randint(0, 9) for _ in range(rng.randint(0, 3))],
                                                          dtype=rng.choice(dtypes))
                   for i in range(rng.randint(0, 10))}
        total, header = message_size(specs_of(tensors))
        blob = save(tensors)
        assert total == len(blob)
        assert header == 8 + int.from_bytes(blob[:8], "little")


def test_fedit_bytes_equal_hand_computed_lora_sizes(runs):
    summary, run_dir = runs["fedit"]
    recs = _comm(run_dir)
    r = 8  # smoke.yaml rank; q_proj and v_proj adapted
    per_layer = sum(r * d_in + d_out * r for d_in, d_out in (DIMS["q_proj"], DIMS["v_proj"]))
    expected = LAYERS * per_layer * 4  # fp32
    train = [x for x in recs if x["phase"] == "train"]
    assert len(train) == 2 * 3 * 2  # rounds x clients x directions
    for x in train:
        assert _data_bytes(x) == expected == 14336
        assert x["kinds"] == {"lora": expected, "header": x["header_bytes"]}
        assert x["groups"]["model.layers.1.self_attn.v_proj/lora"] == (r * 64 + 32 * r) * 4
    # the download is exactly the checkpointed global state, serialised
    server = load_file(run_dir / "checkpoints" / "round_0002" / "server.safetensors")
    assert train[0]["bytes"] == len(save(server))
    # global evaluation: the global model down, a reply without tensors (0 bytes) up
    evals = [x for x in recs if x["phase"] == "evaluate"]
    assert {x["bytes"] for x in evals if x["direction"] == "up"} == {0}
    assert [_data_bytes(x) for x in evals if x["direction"] == "down"] == [expected] * 2 * 3
    totals = summary["comm"]
    assert totals["bytes"] == sum(x["bytes"] for x in recs) == totals["down"] + totals["up"]
    assert totals["by_phase"]["train"] == sum(x["bytes"] for x in train)
    assert sum(c["down"] + c["up"] for c in totals["by_client"].values()) == totals["bytes"]
    assert totals["by_kind"]["lora"] == 2 * 3 * 2 * expected + 2 * 3 * expected  # train both ways + eval down


def test_fedamole_bytes_follow_each_clients_experts(runs):
    summary, run_dir = runs["fedamole"]
    cfg = json.loads(json.dumps(load_config(run_dir / "config.yaml").to_dict()))
    a = cfg["algorithm"]
    r = a["rank"]
    assignments = {x["round"]: x["experts"] for x in map(json.loads, (run_dir / "assignments.jsonl").open())}
    recs = [x for x in _comm(run_dir) if x["phase"] == "train"]
    assert len(recs) == 2 * 4 * 2
    for x in recs:
        experts = assignments[x["round"]]
        down = up_extra = 0
        for module, per_client in experts.items():
            d_in, d_out = DIMS[module.rsplit(".", 1)[1]]
            n = len(per_client[str(x["client"])])
            down += (n + 1) * (r * d_in + d_out * r) + r * d_in  # its experts + shared (A, B) + router W_t
            up_extra += (n + 1) * r  # RSEA embeddings: router t and one u per held expert
            # the groups name exactly the experts the client holds, plus shared and router
            held = {parse_key(g + "/x").expert for g in x["groups"] if g.startswith(module + "/")}
            assert held == {*map(str, per_client[str(x["client"])]), "shared", "router"}
        embeds = x["round"] < 2  # embeddings are asked for in every round but the last
        expected = 4 * (down + (up_extra if x["direction"] == "up" and embeds else 0))
        assert _data_bytes(x) == expected, x["round"]
        assert x["kinds"].get("embeddings", 0) == (4 * up_extra if x["direction"] == "up" and embeds else 0)
    assert summary["comm"]["by_kind"]["experts"] > 0 and summary["comm"]["by_kind"]["router"] > 0


def test_fp16_transfer_halves_the_tensor_bytes(runs):
    full, fp16 = _comm(runs["fedit"][1]), _comm(runs["fp16"][1])
    assert len(full) == len(fp16)
    for a, b in zip(full, fp16, strict=True):
        assert (a["round"], a["client"], a["phase"], a["direction"]) == (b["round"], b["client"], b["phase"],
                                                                         b["direction"])
        assert b["dtype"] == "fp16" and 2 * _data_bytes(b) == _data_bytes(a)
        assert b["bytes"] < 0.6 * a["bytes"] or a["bytes"] == 0
    s_full, s_fp16 = runs["fedit"][0], runs["fp16"][0]
    assert s_fp16["comm"]["bytes"] < 0.6 * s_full["comm"]["bytes"]
    # the transfer is lossy, so the trained state differs, but it trains to a comparable loss
    assert s_fp16["state_digest"] != s_full["state_digest"]
    assert s_fp16["global"]["mean"] == pytest.approx(s_full["global"]["mean"], abs=0.25)


def test_budget_stops_cleanly_after_the_last_round_that_fits(runs):
    full_summary, full_dir = runs["fedit"]
    train = [x for x in _comm(full_dir) if x["phase"] == "train"]
    round1 = sum(x["bytes"] for x in train if x["round"] == 1)
    budget_mb = 1.5 * round1 / MB  # round 1 fits, round 2 would not
    summary, run_dir = _run(runs["root"], "budget", "smoke.yaml", [*FEDIT, f"comm.budget_mb={budget_mb}"])
    assert summary["stopped"] == "comm budget" and summary["rounds_completed"] == 1
    assert summary["comm"]["by_phase"]["train"] == round1 <= budget_mb * MB
    assert {x["round"] for x in _comm(run_dir)} == {1}
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["round_0001"]
    # the state is exactly the uninterrupted run's after round 1
    server = load_file(full_dir / "checkpoints" / "round_0001" / "server.safetensors")
    assert summary["state_digest"] == state_digest(server) != full_summary["state_digest"]
    # resuming stops again at once: the same summary, nothing appended
    files = {n: (run_dir / n).read_text() for n in ("comm.jsonl", "metrics.jsonl")}
    resumed = resume_experiment(run_dir, progress_mode="none")
    timing = {"wall_seconds", "cpu_seconds", "seconds"}  # a resume spends its own set-up time
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in summary.items() if k not in timing}
    assert files == {n: (run_dir / n).read_text() for n in files}
    # a larger budget continues the run to its end: exactly the uninterrupted run
    with pytest.raises(UserError, match="train.lr"):
        resume_experiment(run_dir, overrides=["train.lr=0.5"], progress_mode="none")
    done = resume_experiment(run_dir, overrides=["comm.budget_mb=1000"], progress_mode="none")
    assert "stopped" not in done or done["stopped"] is None
    assert done["state_digest"] == full_summary["state_digest"]
    assert done["global"] == full_summary["global"] and done["comm"]["bytes"] == full_summary["comm"]["bytes"]
    assert load_config(run_dir / "config.yaml").comm.budget_mb == 1000


def test_budget_smaller_than_one_round_is_a_user_error(runs):
    with pytest.raises(UserError, match="too small for a single round"):
        _run(runs["root"], "tiny-budget", "smoke.yaml", [*FEDIT, "comm.budget_mb=0.01"])


def test_resume_truncates_comm_records_of_rounds_after_the_checkpoint(runs):
    summary, run_dir = runs["fedit"]
    cut = runs["root"] / "cut"
    shutil.copytree(run_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "round_0002")
    (cut / "summary.json").unlink()
    resumed = resume_experiment(cut, progress_mode="none")
    assert (cut / "comm.jsonl").read_text() == (run_dir / "comm.jsonl").read_text()
    assert resumed["comm"] == summary["comm"] and resumed["state_digest"] == summary["state_digest"]


def test_local_training_communicates_nothing(runs):
    summary, run_dir = _run(runs["root"], "local", "smoke.yaml",
                            [*FEDIT, "algorithm.name=local", "federation.rounds=1"])
    recs = _comm(run_dir)
    assert len(recs) == 3 * 2 and all(x["bytes"] == 0 and x["tensors"] == 0 for x in recs)
    assert summary["comm"]["bytes"] == 0


def test_the_shipped_budget_config_stops_cleanly_under_its_cap_through_the_cli(tmp_path):
    """configs/comm_budget.yaml does what its header says: fp16 on the wire, training traffic never past
    0.5 MB, a clean early stop reported by the CLI, TensorBoard files written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(ROOT / "configs" / "comm_budget.yaml"),
                           "--out", str(out), "--progress", "none"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "comm budget" and 1 <= summary["rounds_completed"] < 10
    assert f"stopped early (comm budget) after round {summary['rounds_completed']}" in proc.stdout
    recs = _comm(out)
    assert {r["dtype"] for r in recs} == {"fp16"}
    assert 0 < sum(r["bytes"] for r in recs if r["phase"] == "train") <= 0.5 * MB
    assert max(r["round"] for r in recs) == summary["rounds_completed"]
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
