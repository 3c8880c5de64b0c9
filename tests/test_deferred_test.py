"""`eval.test: selected`: rounds evaluate validation only, clients keep snapshots of the models they
validated, and after the last round the test split is evaluated on the snapshots of the round selected on
validation and of the last round. It must test exactly the models that testing at every round tests at those
rounds, for every kind of model a method evaluates: the same predictions example by example, and the same
numbers up to float rounding (testing every round puts val and test examples in shared batches, whose
padding changes the last digits)."""

import json
import shutil
from pathlib import Path

import pytest

from fedmole.config_io import load_config
from fedmole.run import load_checkpoint, resume_experiment, run_experiment

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
BASE = ["federation.num_clients=4", "federation.rounds=3", "data.max_examples=700", "eval.max_examples=5",
        "checkpoint.keep_last=null", "train.local_steps=3", "train.lr=5e-3"]
METHODS = {
    # personalised model after local training + the global model after aggregation
    "fedit_ft": ["algorithm.name=fedit", "algorithm.personalize_by_finetune=true"],
    # heterogeneous expert sets; the dispatched model (global) and the trained one (personalized)
    "fedamole": ["algorithm.name=fedamole", "algorithm.num_experts=6"],
    # the personalised (fused) model is built in the evaluation phase from the client's private adapter
    "fdlora": ["algorithm.name=fdlora", "algorithm.sync_freq=1"],
    # tier-wise models: the active experts k are a setting of the layers, not a tensor
    "flame": ["algorithm.name=flame", "algorithm.experts=lora", "algorithm.num_experts=4", "algorithm.top_k=4",
              "tiers.per_client=[4,2,1,4]"],
}


def _run(tmp_path, name, *overrides):
    cfg = load_config(SMOKE, [*BASE, *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir()
    return run_experiment(cfg, run_dir, "none"), run_dir


def _records(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _outcomes(run_dir):
    return [json.loads(x) for x in (run_dir / "outcomes.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
def test_selected_test_equals_testing_every_round_at_the_selected_and_last_rounds(tmp_path, method):
    every, every_dir = _run(tmp_path, "every", *METHODS[method])
    sel, sel_dir = _run(tmp_path, "selected", *METHODS[method], "eval.test=selected")
    assert sel["state_digest"] == every["state_digest"]  # the protocol does not touch training
    _same_records(_records(sel_dir, "val"), _records(every_dir, "val"))
    labels = sorted({r["model"] for r in _records(every_dir, "val")})
    assert len(labels) >= 2
    tested = {}
    for label in labels:
        s = sel[label] if label in ("personalized", "global") else sel["other_models"][label]
        e = every[label] if label in ("personalized", "global") else every["other_models"][label]
        assert (s["selected_round"], s["last_round"]) == (e["selected_round"], e["last_round"])
        for k in ("mean", "last_mean"):
            assert s[k] == pytest.approx(e[k], rel=1e-5, abs=1e-6)
        for k in ("per_client", "last_per_client"):
            assert s[k].keys() == e[k].keys() and all(s[k][c] == pytest.approx(e[k][c], rel=1e-5, abs=1e-6)
                                                      for c in s[k])
        tested[label] = {s["selected_round"], s["last_round"]}
    # test records only at those rounds, equal to the every-round ones there, example by example too
    sel_test = _records(sel_dir, "test")
    assert {(r["model"], r["round"]) for r in sel_test} == {(m, r) for m, rs in tested.items() for r in rs}
    every_test = [r for r in _records(every_dir, "test") if r["round"] in tested[r["model"]]]
    _same_records(sel_test, every_test)
    every_out = [o for o in _outcomes(every_dir) if o["round"] in tested[o["model"]]]
    okey = lambda o: (o["model"], o["round"], o["client"], o["uid"])  # noqa: E731
    sel_out = sorted(_outcomes(sel_dir), key=okey)
    assert len(every_out) > 0 and len(sel_out) == len(every_out)
    for a, b in zip(sel_out, sorted(every_out, key=okey)):
        assert {k: v for k, v in a.items() if k not in ("choice_scores", "rouge_l", "value")} == \
               {k: v for k, v in b.items() if k not in ("choice_scores", "rouge_l", "value")}
        assert a["value"] == pytest.approx(b["value"], abs=1e-4)
        if a["choice_scores"]:
            assert a["choice_scores"] == pytest.approx(b["choice_scores"], rel=1e-4, abs=1e-5)


def _same_records(got, expected):
    """The same records (round, client, model, split, metric) with values equal up to float rounding."""
    key = lambda r: (r["model"], r["round"], str(r["client"]), r["split"], r["metric"])  # noqa: E731
    got, expected = sorted(got, key=key), sorted(expected, key=key)
    assert [key(r) for r in got] == [key(r) for r in expected]
    for a, b in zip(got, expected):
        assert a["value"] == pytest.approx(b["value"], rel=1e-5, abs=1e-6), key(a)


def test_outcomes_reproduce_each_clients_test_score(tmp_path):
    summary, run_dir = _run(tmp_path, "run", *METHODS["fedit_ft"], "eval.test=selected")
    head = summary["personalized"]
    rows = [o for o in _outcomes(run_dir) if o["model"] == "personalized" and o["round"] == head["selected_round"]]
    for cid, score in head["per_client"].items():
        values = [o["value"] for o in rows if o["client"] == int(cid)]
        assert values and sum(values) / len(values) == pytest.approx(score, abs=1e-9)
    assert all(o["split"] == "test" and o["uid"] for o in rows)


def test_a_client_holds_at_most_two_snapshots_per_model(tmp_path):
    _, run_dir = _run(tmp_path, "run", *METHODS["fedamole"], "eval.test=selected", "federation.rounds=4")
    for ckpt in sorted((run_dir / "checkpoints").glob("round_*")):
        _, _, states = load_checkpoint(ckpt, with_snapshots=True)
        for st in states.values():
            rounds = {}
            for k in st.tensors:
                if k.startswith("@eval/"):
                    label, rnd, _ = k[len("@eval/"):].split("/", 2)
                    rounds.setdefault(label, set()).add(int(rnd))
            assert set(rounds) == {"personalized", "global"}
            assert all(1 <= len(r) <= 2 for r in rounds.values()), rounds
        # without asking for them, a checkpoint's client states carry no snapshots (exports never see them)
        _, _, plain = load_checkpoint(ckpt)
        assert not any(k.startswith("@eval/") for st in plain.values() for k in st.tensors)
        assert not any("@eval" in st.meta for st in plain.values())


def test_resume_in_selected_mode_reproduces_the_uninterrupted_run(tmp_path):
    ref, run_dir = _run(tmp_path, "run", *METHODS["fedit_ft"], "eval.test=selected")
    for cut_round in ("round_0003", None):  # interrupted after round 2, and during the final test phase
        cut = tmp_path / f"cut-{cut_round}"
        shutil.copytree(run_dir, cut)
        if cut_round:
            shutil.rmtree(cut / "checkpoints" / cut_round)
        (cut / "summary.json").unlink()
        resumed = resume_experiment(cut, progress_mode="none")
        assert resumed["state_digest"] == ref["state_digest"]
        assert resumed["personalized"] == ref["personalized"] and resumed["global"] == ref["global"]
        for name in ("metrics.jsonl", "outcomes.jsonl"):
            assert (cut / name).read_text() == (run_dir / name).read_text(), name


def test_eval_models_limits_the_evaluated_labels(tmp_path):
    summary, run_dir = _run(tmp_path, "run", *METHODS["fdlora"], "eval.models=[personalized]")
    assert summary["global"] is None and summary["personalized"] is not None
    assert {r["model"] for r in _records(run_dir, "val")} == {"personalized"}
