"""Data sources: local files in the real formats, filters, sampling and user-facing errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmole.config import ColumnMap, DataConfig
from fedmole.data.sources import load_examples, map_columns
from fedmole.errors import UserError

from conftest import metrics_records

DATA = Path(__file__).parent / "fixtures" / "data"


def load(**kwargs):
    return load_examples(DataConfig(**kwargs), seed=0)


def test_dolly_category_is_task_and_domain():
    examples = load(source="dolly", path=str(DATA / "dolly.jsonl"))
    assert len(examples) == 6
    second = examples[1]
    assert second.task == second.domain == "summarization"
    assert second.context.startswith("Bees collect nectar")
    assert second.response == "Bees make honey from nectar and store it to survive the winter."


def test_snli_drops_unlabelled_rows_and_uses_reference_prompt():
    examples = load(source="snli", path=str(DATA / "snli.jsonl"))
    assert len(examples) == 4  # the label -1 row is gone
    assert [ex.label for ex in examples] == [2, 1, 0, 0]
    first = examples[0]
    assert first.instruction == (
        'Suppose A woman in a yellow coat waits at a bus stop. Can we infer that "The woman is asleep in bed."? '
        "Yes, No, or Maybe?"
    )
    assert first.choices == ["Yes", "Maybe", "No"] and first.response == "No"
    assert first.task == first.domain == "snli"


def test_natural_instructions_keeps_largest_tasks_in_string_order():
    examples = load(source="natural_instructions", path=str(DATA / "ni"), ni_num_tasks=2)
    # task1000 (4 instances) and task101 (3) are kept, task001 (2) is not; "task1000" sorts before "task101"
    assert [ex.task for ex in examples] == ["task1000"] * 4 + ["task101"] * 2  # one instance has no output
    first = examples[0]
    assert (first.instruction, first.context, first.response, first.domain) == (
        "Copy the input sentence exactly.",
        "sentence 0",
        "sentence 0",  # the first output only
        "Translation",
    )
    assert first.uid == "ni:task1000-0000"


def test_natural_instructions_without_directory_says_what_is_needed(tmp_path):
    with pytest.raises(UserError, match="train_tasks.txt"):
        load(source="natural_instructions", path=str(tmp_path))


def test_alpaca_input_is_context():
    examples = load(source="alpaca", path=str(DATA / "alpaca.json"))
    assert [ex.context for ex in examples] == ["", "Good morning.", "4 and 5"]
    assert examples[1].response == "Bonjour." and examples[1].task == "alpaca"


def test_csv_maps_columns_with_json_choices_and_text_or_index_labels():
    cols = ColumnMap(
        instruction="question", response="answer", choices="options", label="gold", task="kind", domain="topic"
    )
    examples = load(source="csv", path=str(DATA / "table.csv"), columns=cols, tasks=["yesno", "pick"])
    assert [(ex.choices, ex.label, ex.response) for ex in examples] == [
        (["No", "Yes"], 1, "Yes"),
        (["No", "Yes"], 0, "No"),
        (["carrot", "apple", "leek"], 1, "apple"),
    ]
    assert examples[2].domain == "food"
    free = load(source="csv", path=str(DATA / "table.csv"), columns=cols, tasks=["free"])
    assert [(ex.choices, ex.label, ex.response) for ex in free] == [(None, None, "Green")]


def test_jsonl_without_optional_columns_has_empty_context_task_domain():
    examples = load(source="jsonl", path=str(DATA / "dolly.jsonl"), columns=ColumnMap(domain="category"))
    assert examples[0].instruction == "What is the capital of France?"
    assert examples[0].task == "" and examples[0].domain == "open_qa"


def test_malformed_jsonl_names_file_and_line():
    with pytest.raises(UserError, match=r"malformed\.jsonl:3: not valid JSON"):
        load(source="jsonl", path=str(DATA / "malformed.jsonl"))


def test_missing_required_column_lists_present_columns():
    present = "columns present: instruction, context, response, category"
    with pytest.raises(UserError, match=rf"no column 'prompt'.*{present}"):
        load(source="jsonl", path=str(DATA / "dolly.jsonl"), columns=ColumnMap(instruction="prompt"))


def test_explicitly_named_optional_column_must_exist():
    with pytest.raises(UserError, match="no column 'topic'"):
        load(source="jsonl", path=str(DATA / "dolly.jsonl"), columns=ColumnMap(domain="topic"))


def test_a_resolved_config_still_loads_files_without_the_optional_default_columns(tmp_path):
    """config.yaml spells out every default (context, task, domain); resume and eval re-load it."""
    from fedmole.config_io import dump_config, load_config, validate_config

    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"instruction": "q", "response": "a"}) + "\n")
    dump_config(validate_config({"data": {"source": "jsonl", "path": str(path)}}), tmp_path / "config.yaml")
    cfg = load_config(tmp_path / "config.yaml")
    assert {"context", "task", "domain"} <= cfg.data.columns.model_fields_set
    assert [(e.instruction, e.context, e.task) for e in load_examples(cfg.data, seed=0)] == [("q", "", "")]


def test_label_outside_choices_is_a_user_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "q", "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(UserError, match=r"record 1: label 5 is neither an index 0..1"):
        load(source="jsonl", path=str(path), columns=ColumnMap(choices="choices", label="label"))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(source="jsonl", path=str(tmp_path / "nope.jsonl"))


def test_unknown_task_lists_known_ones_with_suggestion():
    expected = r'unknown task "open_q" \(did you mean "open_qa"\?\); available: brainstorming, '
    with pytest.raises(UserError, match=expected):
        load(source="dolly", path=str(DATA / "dolly.jsonl"), tasks=["open_q"])


def test_domain_filter_keeps_only_those_domains():
    examples = load(source="dolly", path=str(DATA / "dolly.jsonl"), domains=["open_qa", "closed_qa"])
    assert sorted(ex.domain for ex in examples) == ["closed_qa", "open_qa", "open_qa"]


def test_max_examples_samples_by_seed_in_source_order():
    cfg = DataConfig(source="dolly", path=str(DATA / "dolly.jsonl"), max_examples=3)
    a, b = load_examples(cfg, seed=1), load_examples(cfg, seed=1)
    uids = [ex.uid for ex in a]
    assert uids == [ex.uid for ex in b] and len(uids) == 3
    assert uids == sorted(uids, key=lambda u: int(u.split(":")[1]))
    others = {tuple(ex.uid for ex in load_examples(cfg, seed=s)) for s in range(2, 12)}
    assert len(others) > 1


def test_wordnet_source_reads_the_directory_in_data_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOLE_CACHE", str(tmp_path))
    examples = load(source="wordnet", path=str(DATA / "wordnet"), tasks=["hypernym"], domains=["noun.person"])
    assert [ex.response for ex in examples] == ["architect"]


def test_hf_dataset_not_available_offline_is_a_user_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="could not be loaded offline.*set data.path to a local copy"):
        load(source="dolly", path="fedmole-tests/no-such-dataset")


# ------------------------------------------------------------------------ mixed-task data sets
def _mixed_rows(n: int) -> list[dict]:
    """Natural Instructions-style mixture: only the classification rows carry choices and a label."""
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"instruction": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2, "task": "parity"})
        else:
            rows.append({"instruction": f"Spell the number {i}.", "response": f"number {i}", "task": "spell"})
    return rows


MIXED = ColumnMap(choices="choices", label="label")


def test_rows_without_choices_are_generation_examples_in_a_mixed_jsonl(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _mixed_rows(4)))
    examples = load(source="jsonl", path=str(path), columns=MIXED)
    assert [(ex.task, ex.choices, ex.label, ex.response) for ex in examples] == [
        ("spell", None, None, "number 0"), ("parity", ["yes", "no"], 1, "no"),
        ("spell", None, None, "number 2"), ("parity", ["yes", "no"], 1, "no"),
    ]


def test_a_mixed_hf_dataset_with_null_or_empty_choices_loads_both_kinds(tmp_path):
    import datasets

    rows = [{"instruction": "Is 1 even?", "response": "", "choices": ["yes", "no"], "label": 1},
            {"instruction": "Spell 2.", "response": "two", "choices": None, "label": None},
            {"instruction": "Spell 3.", "response": "three", "choices": [], "label": None}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    examples = map_columns(datasets.load_from_disk(str(tmp_path / "ds")).to_list(), MIXED, "ds", "ds")
    assert [(ex.choices, ex.label, ex.response) for ex in examples] == [
        (["yes", "no"], 1, "no"), (None, None, "two"), (None, None, "three")]


def test_a_generation_row_of_a_mixture_without_response_names_the_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [_mixed_rows(2)[1], {"instruction": "Spell 4."}]))
    with pytest.raises(UserError, match=r"record 2 has no column 'response' \(a row without choices is a "
                                        r"generation example\)"):
        load(source="jsonl", path=str(path), columns=MIXED)


def test_a_choices_column_no_record_has_is_a_user_error(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _mixed_rows(4)))
    with pytest.raises(UserError, match=r"no record has the choices column 'options'.*instruction, response"):
        load(source="jsonl", path=str(path), columns=ColumnMap(choices="options", label="label"))


def test_a_mixed_task_jsonl_runs_end_to_end_and_reports_accuracy_and_rouge_l_apart(tmp_path, capsys):
    from fedmole.config_io import load_config
    from fedmole.run import load_federated_data, run_experiment

    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _mixed_rows(120)))
    cfg = load_config(Path(__file__).parents[1] / "configs" / "smoke.yaml", [
        "data.source=jsonl", f"data.path={path}", "data.max_examples=null", "data.columns.choices=choices",
        "data.columns.label=label", "partition.scheme=iid", "federation.num_clients=2", "federation.rounds=1",
        "train.local_steps=1", "eval.max_examples=20", "eval.generation.max_new_tokens=2", "train.num_threads=1"])
    (tmp_path / "run").mkdir()
    summary = run_experiment(cfg, tmp_path / "run", "none")
    records = metrics_records(tmp_path / "run")
    test = {(r["client"], r["metric"]): r["value"] for r in records if r["split"] == "test" and r["model"] == "global"}
    for client in load_federated_data(cfg):
        kinds = [ex.is_classification for ex in client.test[: cfg.eval.max_examples]]
        n_cls, n_gen = sum(kinds), len(kinds) - sum(kinds)
        assert n_cls and n_gen  # both kinds in every client's test split
        acc, rouge = test[(client.client_id, "accuracy")], test[(client.client_id, "rouge_l")]
        assert round(acc * n_cls / 100, 6) == int(round(acc * n_cls / 100))  # a share of the n_cls answers
        # score: the per-example mean over both kinds, each example counted once with its own metric
        assert test[(client.client_id, "score")] == pytest.approx((acc * n_cls + rouge * n_gen) / (n_cls + n_gen))
    assert {(None, "accuracy"), (None, "rouge_l"), (None, "score")} <= set(test)
    assert summary["metric"] == "score"
    # the command line's results say what the score averages and give each part
    from fedmole.cli import print_results

    print_results(summary, tmp_path / "run")
    printed = " ".join(capsys.readouterr().out.split())
    head = summary["headline"]
    assert (f"score averages accuracy (classification examples) and ROUGE-L F (generation examples) per example; "
            f"{head} test @ round 1: accuracy {test[(None, 'accuracy')]:.2f}, ROUGE-L F "
            f"{test[(None, 'rouge_l')]:.2f}") in printed
