"""WordNet parsing and the five derived tasks."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest

from fedmole.data import wordnet
from fedmole.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "data" / "wordnet"
REAL = Path(wordnet.DEFAULT_WORDNET_DIR)

# measured on Debian wordnet-base 1:3.0 (WordNet 3.0)
REAL_COUNTS = {"definition": 117659, "pos": 117659, "hypernym": 95322, "synonym": 53811, "usage": 32881}


@pytest.fixture(scope="module")
def excerpt() -> dict[str, object]:
    return {ex.uid: ex for ex in wordnet.build_wordnet(FIXTURE)}


@pytest.fixture(scope="module")
def real_cache():
    """The real database through its cache in the fedmole cache directory (built there on first use):
    (examples, seconds that loading the cache took)."""
    if not (REAL / "data.noun").is_file():
        pytest.skip("WordNet 3.0 is not installed (apt-get install wordnet-base)")
    wordnet.build_wordnet_cache(wordnet_dir=REAL)
    start = time.perf_counter()
    examples = wordnet.load_wordnet(REAL)
    return examples, time.perf_counter() - start


def test_definition_and_pos_read_first_lemma_and_gloss(excerpt):
    d = excerpt["wn:definition:n:00001930"]
    assert (d.instruction, d.response, d.task, d.domain) == (
        "Define the word 'physical entity'.",
        "an entity that has physical existence",
        "definition",
        "noun.Tops",
    )
    p = excerpt["wn:pos:n:00001930"]
    assert p.instruction == (
        "Which part of speech is 'physical entity' in the sense: an entity that has physical existence?"
    )
    assert p.choices == ["noun", "verb", "adjective", "adverb"] and p.label == 0 and p.response == "noun"


def test_adjective_satellite_is_an_adjective_and_markers_are_stripped(excerpt):
    p = excerpt["wn:pos:a:00014358"]
    assert p.label == 2 and p.response == "adjective" and p.extra == {"pos": "adjective"}
    assert excerpt["wn:synonym:a:00014358"].response == "galore"  # galore(ip) in the file


def test_hypernym_and_instance_hypernym_resolve_target_lemma(excerpt):
    assert excerpt["wn:hypernym:n:00001930"].instruction == "'physical entity' is a kind of what?"
    assert excerpt["wn:hypernym:n:00001930"].response == "entity"
    tange = excerpt["wn:hypernym:n:11330963"]
    assert (tange.instruction, tange.response) == ("'Tange' is an instance of what?", "architect")
    assert tange.domain == "noun.person"
    assert excerpt["wn:hypernym:v:02650552"].response == "populate"


def test_usage_is_first_example_without_quotes_or_attribution(excerpt):
    assert excerpt["wn:usage:a:00009046"].response == (
        "the pleasures of the table, never of much consequence to one naturally abstemious"
    )
    # an example that itself contains "; " stays whole
    assert excerpt["wn:usage:v:01961992"].response == (
        "European children learn the breast stroke; they often don't know how to crawl"
    )
    assert excerpt["wn:usage:r:00001740"].instruction == "Write a sentence using the word 'a cappella'."


def test_definition_joins_non_example_parts(excerpt):
    assert excerpt["wn:definition:r:00468587"].response == "together with all that; besides"
    assert excerpt["wn:definition:a:00001740"].response.startswith("(usually followed by `to') having")


def test_split_gloss_keeps_unbalanced_examples_apart():
    definition, examples = wordnet.split_gloss('having toes; "long-toed; "five-toed"')
    assert definition == "having toes" and examples == ["long-toed", "five-toed"]


def test_excerpt_task_counts(excerpt):
    counts = Counter(ex.task for ex in excerpt.values())
    # 13 synsets; hypernyms whose target is outside the excerpt are skipped
    assert counts == {"definition": 13, "pos": 13, "synonym": 5, "hypernym": 3, "usage": 9}


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="apt-get install wordnet-base.*FEDMOLE_WORDNET_DIR"):
        wordnet.build_wordnet(tmp_path)


def test_env_var_selects_directory(monkeypatch):
    monkeypatch.setenv("FEDMOLE_WORDNET_DIR", str(FIXTURE))
    assert len(wordnet.build_wordnet()) == 43


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOLE_CACHE", str(tmp_path))
    path = wordnet.build_wordnet_cache(wordnet_dir=FIXTURE)
    assert path.parent == tmp_path / "data" and wordnet.CACHE_FORMAT in path.name
    assert path == wordnet.wordnet_cache_path(FIXTURE)
    assert wordnet.load_wordnet(FIXTURE) == wordnet.build_wordnet(FIXTURE)
    stamp = path.stat().st_mtime_ns
    wordnet.build_wordnet_cache(wordnet_dir=FIXTURE)  # present: not rewritten
    assert path.stat().st_mtime_ns == stamp


def test_real_wordnet_counts_within_one_percent(real_cache):
    examples, _ = real_cache
    counts = Counter(ex.task for ex in examples)
    for task, expected in REAL_COUNTS.items():
        assert abs(counts[task] - expected) <= 0.01 * expected, (task, counts[task])
    assert len({ex.domain for ex in examples}) == 45
    assert len({ex.uid for ex in examples}) == len(examples)


def test_real_cache_loads_in_seconds(real_cache):
    examples, seconds = real_cache
    assert len(examples) > 400_000 and seconds < 10.0


# ------------------------------------------------------------------------------ classification tasks
def test_choice_tasks_load_only_when_named():
    plain = wordnet.load_wordnet(FIXTURE)
    assert {ex.task for ex in plain} == set(wordnet.TASKS)
    mixed = wordnet.load_wordnet(FIXTURE, ["pos", "isa"])
    assert {ex.task for ex in mixed} >= {"pos"} and set(wordnet.CHOICE_TASKS) & {ex.task for ex in mixed}
    # merged in synset order, then task order: the five tasks keep their relative order
    assert [ex.uid for ex in mixed if ex.task in wordnet.TASKS] == [ex.uid for ex in plain]


def test_unknown_wordnet_task_lists_every_task():
    with pytest.raises(UserError, match=r"synonym_choise.*did you mean.*synonym_choice"):
        wordnet.load_wordnet(FIXTURE, ["synonym_choise"])


@pytest.fixture(scope="module")
def real_choices():
    if not (REAL / "data.noun").is_file():
        pytest.skip("WordNet 3.0 is not installed (apt-get install wordnet-base)")
    return wordnet.build_wordnet(REAL, choice_tasks=True)


def test_choice_examples_are_well_formed_and_deterministic(real_choices):
    by_task = {}
    for ex in real_choices:
        by_task.setdefault(ex.task, []).append(ex)
    assert set(by_task) == set(wordnet.CHOICE_TASKS)
    for task, exs in by_task.items():
        for ex in exs[::97]:
            assert ex.response == ex.choices[ex.label] and len(set(ex.choices)) == len(ex.choices)
    # category: the label is the synset's lexicographer file among the eight noun categories
    for ex in by_task["category"][::97]:
        assert ex.domain == "noun." + wordnet.CATEGORIES[ex.label]
    # isa asks about the true hypernym for about half of the synsets; the wrong word is never the true one
    hyper = {ex.uid.split(":", 2)[2]: ex.response for ex in wordnet.build_wordnet(REAL) if ex.task == "hypernym"}
    truths = [ex.label for ex in by_task["isa"]]
    assert abs(sum(truths) / len(truths) - 0.5) < 0.01
    for ex in by_task["isa"][::97]:
        asked = re.search(r" (?:a kind of|an instance of) '(.*)'\?$", ex.instruction).group(1)
        assert (asked == hyper[ex.uid.split(":", 2)[2]]) == bool(ex.label)
    # the gold position is spread over the four choices
    positions = Counter(ex.label for ex in by_task["synonym_choice"])
    assert all(abs(n / len(by_task["synonym_choice"]) - 0.25) < 0.01 for n in positions.values())
    # the wrong words come from the synset's own lexicographer file
    same_file = {ex.domain: set() for ex in real_choices}
    for ex in real_choices:
        if ex.task == "hypernym_choice":
            same_file[ex.domain].add(ex.response)
    for ex in by_task["hypernym_choice"][::97]:
        assert all(c in same_file[ex.domain] for c in ex.choices)
    again = wordnet.build_wordnet(REAL, choice_tasks=True)
    assert [(e.uid, e.choices, e.label) for e in again[::501]] == [(e.uid, e.choices, e.label) for e in real_choices[::501]]
