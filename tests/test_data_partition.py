"""Partitions across clients and per-client splits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
from rich.console import Console

from fedmole.config import PartitionConfig
from fedmole.data.partition import SPLITS, manifest, partition, partition_table, split_sizes
from fedmole.data.schema import Example
from fedmole.errors import UserError

DOMAINS = [f"d{i}" for i in range(8)]


def make_examples(n: int = 2000) -> list[Example]:
    """n classification examples over 8 domains, 4 tasks and 3 labels, in a fixed interleaving."""
    return [
        Example(
            instruction=f"q{i}",
            response=["a", "b", "c"][i % 3],
            choices=["a", "b", "c"],
            label=i % 3,
            task=f"t{i % 4}",
            domain=DOMAINS[(i * 7) % 8],
            uid=str(i),
            extra={"source": f"s{i % 5}"},
        )
        for i in range(n)
    ]


EXAMPLES = make_examples()
NO_CAPS = {"aux": None, "val": None, "test": None}


def uids(clients) -> list[list[str]]:
    return [[ex.uid for name in SPLITS for ex in getattr(c, name)] for c in clients]


def entropy(histogram: dict) -> float:
    total = sum(histogram.values())
    return -sum(c / total * math.log(c / total) for c in histogram.values())


def test_iid_sizes_sum_to_total_and_are_balanced():
    clients = partition(EXAMPLES, PartitionConfig(scheme="iid", caps=NO_CAPS), num_clients=7, seed=3)
    totals = [sum(c.sizes().values()) for c in clients]
    assert sum(totals) == len(EXAMPLES) and max(totals) - min(totals) <= 1
    assert sorted(u for client in uids(clients) for u in client) == sorted(ex.uid for ex in EXAMPLES)


def test_dirichlet_skew_grows_as_alpha_falls():
    def mean_entropy(alpha: float) -> float:
        cfg = PartitionConfig(scheme="dirichlet", by="domain", alpha=alpha, min_size=20, caps=NO_CAPS)
        rows = manifest(partition(EXAMPLES, cfg, num_clients=8, seed=0), "domain")["clients"]
        return sum(entropy(r["histogram"]) for r in rows) / len(rows)

    low, high = mean_entropy(0.1), mean_entropy(100.0)
    assert low < high - 0.5 and high > 0.95 * math.log(len(DOMAINS))


def test_dirichlet_respects_min_size():
    cfg = PartitionConfig(scheme="dirichlet", by="label", alpha=0.3, min_size=60, caps=NO_CAPS)
    clients = partition(EXAMPLES, cfg, num_clients=10, seed=5)
    assert min(sum(c.sizes().values()) for c in clients) >= 60
    assert sum(sum(c.sizes().values()) for c in clients) == len(EXAMPLES)


def test_dirichlet_impossible_min_size_is_a_user_error():
    cfg = PartitionConfig(scheme="dirichlet", by="domain", alpha=0.01, min_size=240)
    with pytest.raises(UserError, match="raise partition.alpha, lower partition.min_size"):
        partition(EXAMPLES, cfg, num_clients=8, seed=0)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "meta", "quantity_skew"])
def test_same_seed_same_partition_other_seed_differs(scheme):
    cfg = PartitionConfig(scheme=scheme, by="domain", alpha=0.5, splits={"aux": 0.05})
    first = uids(partition(EXAMPLES, cfg, num_clients=4, seed=11))
    assert first == uids(partition(EXAMPLES, cfg, num_clients=4, seed=11))
    assert first != uids(partition(EXAMPLES, cfg, num_clients=4, seed=12))


def test_partition_does_not_depend_on_hash_seed():
    code = (
        "import json, sys; sys.path.insert(0, 'tests');"
        "from test_data_partition import EXAMPLES, uids;"
        "from fedmole.config import PartitionConfig; from fedmole.data.partition import partition;"
        "cfg = PartitionConfig(scheme='dirichlet', by='task', alpha=0.5);"
        "print(json.dumps(uids(partition(EXAMPLES, cfg, 4, 7))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = uids(partition(EXAMPLES, PartitionConfig(scheme="dirichlet", by="task", alpha=0.5), 4, 7))
    assert json.loads(out.stdout) == here


def test_meta_gives_exactly_the_requested_groups_per_client():
    cfg = PartitionConfig(scheme="meta", by="domain", groups_per_client=2, caps=NO_CAPS)
    clients = partition(EXAMPLES, cfg, num_clients=3, seed=0)
    groups = [sorted(manifest([c], "domain")["clients"][0]["histogram"]) for c in clients]
    assert groups == [["d0", "d1"], ["d2", "d3"], ["d4", "d5"]]
    assert Counter(ex.domain for ex in EXAMPLES)["d0"] == 250
    assert [sum(c.sizes().values()) for c in clients] == [500, 500, 500]


def test_meta_with_too_few_groups_says_the_numbers():
    cfg = PartitionConfig(scheme="meta", by="task", groups_per_client=2)
    with pytest.raises(UserError, match=r"3 x 2 = 6 distinct values of task, but the data has 4"):
        partition(EXAMPLES, cfg, num_clients=3, seed=0)


def test_quantity_skew_sizes_vary_with_content_iid():
    cfg = PartitionConfig(scheme="quantity_skew", alpha=0.5, min_size=50, caps=NO_CAPS)
    clients = partition(EXAMPLES, cfg, num_clients=5, seed=2)
    totals = [sum(c.sizes().values()) for c in clients]
    assert sum(totals) == len(EXAMPLES) and min(totals) >= 50 and max(totals) > 2 * min(totals)


def test_partition_by_extra_key_and_label():
    meta = PartitionConfig(scheme="meta", by="source")
    assert {ex.extra["source"] for ex in partition(EXAMPLES, meta, 2, 0)[1].train} == {"s1"}
    by_label = PartitionConfig(scheme="meta", by="label")
    assert {ex.label for ex in partition(EXAMPLES, by_label, 3, 0)[2].train} == {2}


def test_unknown_column_is_a_user_error():
    expected = r'unknown column "domian" \(did you mean "domain"\?\); allowed: task, domain, label, source'
    with pytest.raises(UserError, match=expected):
        partition(EXAMPLES, PartitionConfig(scheme="dirichlet", by="domian"), 4, 0)


def test_label_column_needs_classification_examples():
    generation = [Example(instruction=f"q{i}", response="r", task="t", uid=str(i)) for i in range(100)]
    with pytest.raises(UserError, match=r"100 of 100 examples have no gold label.*partition.by=task"):
        partition(generation, PartitionConfig(scheme="dirichlet", by="label"), 2, 0)


def test_split_ratios_and_caps_are_respected():
    cfg = PartitionConfig(
        scheme="iid",
        splits={"train": 0.76, "aux": 0.04, "val": 0.1, "test": 0.1},
        caps={"aux": 200, "val": 30, "test": 20},
    )
    assert split_sizes(500, cfg) == {"train": 380, "aux": 20, "val": 50, "test": 50}
    client = partition(EXAMPLES[:1000], cfg, num_clients=2, seed=0)[0]
    assert client.sizes() == {"train": 380, "aux": 20, "val": 30, "test": 20}
    seen = [ex.uid for name in SPLITS for ex in getattr(client, name)]
    assert len(seen) == len(set(seen))


def test_small_positive_splits_get_at_least_one_example():
    cfg = PartitionConfig(splits={"train": 0.9, "aux": 0.01, "val": 0.05, "test": 0.04})
    assert split_sizes(12, cfg) == {"train": 9, "aux": 1, "val": 1, "test": 1}


def test_empty_split_names_the_client():
    cfg = PartitionConfig(scheme="iid", splits={"aux": 0.05})
    with pytest.raises(UserError, match=r"client 0 got 3 examples, too few for a non-empty train split.*fewer clients"):
        partition(EXAMPLES[:12], cfg, num_clients=4, seed=0)


def test_more_clients_than_examples_is_a_user_error():
    with pytest.raises(UserError, match="cannot split 5 examples across 6 clients"):
        partition(EXAMPLES[:5], PartitionConfig(), 6, 0)


def test_manifest_is_json_and_totals_add_up():
    clients = partition(EXAMPLES, PartitionConfig(scheme="iid", splits={"aux": 0.05}), 4, 0)
    m = json.loads(json.dumps(manifest(clients, "task")))
    assert m["by"] == "task" and m["num_clients"] == 4
    assert m["totals"] == {name: sum(c.sizes()[name] for c in clients) for name in SPLITS}
    first = m["clients"][0]
    assert sum(first["histogram"].values()) == sum(first["sizes"].values())
    assert list(first["histogram"].values()) == sorted(first["histogram"].values(), reverse=True)


def test_partition_table_has_one_row_per_client():
    clients = partition(EXAMPLES, PartitionConfig(scheme="meta", by="domain"), 3, 0)
    table = partition_table(manifest(clients, "domain"))
    assert table.row_count == 3
    console = Console(width=120, record=True)
    console.print(table)
    assert "d1 (" in console.export_text()
