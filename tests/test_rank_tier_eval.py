"""Tier-wise evaluation of the rank baselines (HetLoRA, FlexLoRA, `tier_eval: own`): each client below the
highest tier is also evaluated on the model it can run, the global LoRA at its own rank, labelled
`global_k{k}` like FLAME's tier-wise evaluation."""

from pathlib import Path

import pytest

from fedmole.algorithms.lora_common import TIER_PREFIX
from fedmole.algorithms.lora_ops import lora_pairs
from fedmole.config_io import load_config
from fedmole.reeval import evaluate_run

from conftest import metrics_records, run_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = ["federation.num_clients=4", "federation.rounds=1", "tiers.per_client=[8,4,2,1]", "eval.max_examples=2",
        "eval.generation.max_new_tokens=2"]
OWN = {1: "global_k4", 2: "global_k2", 3: "global_k1"}  # client -> label; client 0 is at the top tier


def _run(tmp_path, name, *extra):
    summary, run_dir = run_config(SMOKE, [f"algorithm.name={name}", *FAST, *extra], tmp_path / name)
    recs = metrics_records(run_dir)
    return summary, run_dir, [r for r in recs if r["split"] == "test" and r["client"] is not None]


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_each_client_below_the_top_tier_is_evaluated_on_its_own_rank_model(tmp_path, name):
    summary, run_dir, recs = _run(tmp_path, name)
    for c in range(4):
        labels = {r["model"] for r in recs if r["client"] == c}
        assert labels == {"global", OWN[c]} if c in OWN else labels == {"global"}, (c, labels)
    assert set(summary["other_models"]) == set(OWN.values())

    loss = {(r["client"], r["model"]): r["value"] for r in recs if r["metric"] == "loss"}
    # a rank-1 model is not the rank-8 global model
    assert loss[(3, "global_k1")] != loss[(3, "global")]
    # the evaluated own-rank model is the client's exported model: re-evaluating the checkpoint's `client`
    # model (export_state, no payload involved) gives exactly the recorded tier-wise values
    again = evaluate_run(run_dir, split="test")
    client = {r["client"]: r["value"] for r in again["records"] if r["model"] == "client" and r["metric"] == "loss"}
    for c, label in OWN.items():
        assert client[c] == loss[(c, label)]


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_the_payload_carries_the_own_rank_model_only_below_the_top_tier(tiny_tok, name):
    from fedmole.algorithms import get_algorithm
    from fedmole.models.tiny import tiny_llama

    cfg = load_config(SMOKE, [f"algorithm.name={name}", *FAST])
    algo = get_algorithm(name)
    server = algo.Server(cfg, algo.build_adapters(tiny_llama(len(tiny_tok)), cfg))
    plans = server.configure_evaluate(1, [0, 1, 2, 3])
    assert "tier_label" not in plans[0].config and not any(k.startswith(TIER_PREFIX) for k in plans[0].tensors)
    for c, label in OWN.items():
        assert plans[c].config["tier_label"] == label
        own = {k[len(TIER_PREFIX):]: v for k, v in plans[c].tensors.items() if k.startswith(TIER_PREFIX)}
        expected = server.export_state(c)
        assert own.keys() == expected.keys() and all((own[k] == expected[k]).all() for k in own)
        assert {A.shape[0] for A, _ in lora_pairs(own).values()} == {server.ranks[c]} == {8 * int(label[8:]) // 8}


def test_tier_eval_none_evaluates_only_the_global_model(tmp_path):
    summary, _, recs = _run(tmp_path, "hetlora", "algorithm.tier_eval=none")
    assert {r["model"] for r in recs} == {"global"}
    assert not summary.get("other_models")


@pytest.mark.parametrize("name,extra", [("hetlora", []), ("flexlora", []),
                                        ("flame", ["algorithm.experts=lora", "algorithm.top_k=8"])])
def test_tier_eval_budget_evaluates_each_client_once_on_the_model_its_budget_runs(tmp_path, name, extra):
    """`tier_eval: budget`: the top tier on the full model, every other client only at its own tier; the numbers
    are those the `own` evaluation gives the same models."""
    summary, _, recs = _run(tmp_path, name, *extra, "algorithm.tier_eval=budget")
    for c in range(4):
        assert {r["model"] for r in recs if r["client"] == c} == {OWN.get(c, "global")}, c
    (tmp_path / "own").mkdir()
    _, _, own = _run(tmp_path / "own", name, *extra, "algorithm.tier_eval=own")
    key = lambda r: (r["client"], r["model"], r["metric"])  # noqa: E731
    expected = {key(r): r["value"] for r in own}
    assert {key(r): r["value"] for r in recs} == {k: v for k, v in expected.items() if k in {key(r) for r in recs}}
