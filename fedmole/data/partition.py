"""Splitting a dataset across clients, and each client's data into train / aux / val / test.

Schemes (`partition.scheme`), over the column `partition.by` (task, domain, label or a key of `extra`):

- `iid`: a seeded shuffle cut into nearly equal parts (flwr-datasets `IidPartitioner`).
- `dirichlet`: per group of `by`, client shares drawn from Dir(alpha); a client already above the average
  size gets no more (the reference's balancing trick); redrawn until every client has `min_size`
  examples (flwr-datasets `DirichletPartitioner` with `self_balancing=True`, at most 11 draws).
  Small alpha gives clients few groups each; large alpha approaches iid.
- `meta`: the sorted distinct values of `by`; client i gets every example of values i*k ... (i+1)*k-1 with
  k = `groups_per_client` (flwr-datasets `GroupedNaturalIdPartitioner`). Values past C*k are unused.
- `quantity_skew`: client sizes min_size + a Dir(alpha) share of the rest; content iid
  (flwr-datasets `SizePartitioner` over a seeded shuffle).

Each client's examples are then shuffled (seeded by the partition seed and the client id) and cut into
contiguous train / aux / val / test slices by `partition.splits` (normalised to sum 1), and aux / val /
test are capped at `partition.caps`. Everything is driven by NumPy generators seeded from `seed`, so the
same inputs give the same partition in every process.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
from rich.table import Table

from fedmole.config import PartitionConfig
from fedmole.data.schema import Example
from fedmole.errors import UserError, did_you_mean

SPLITS = ("train", "aux", "val", "test")
BUILTIN_COLUMNS = ("task", "domain", "label")


@dataclass
class ClientData:
    """One client's examples, split for local training, expert-assignment statistics (aux), model
    selection (val) and the reported score (test)."""

    client_id: int
    train: list[Example]
    aux: list[Example]
    val: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLITS}


def partition(examples: list[Example], cfg: PartitionConfig, num_clients: int, seed: int) -> list[ClientData]:
    """Split `examples` across `num_clients` clients by `cfg.scheme`, then split each client's share."""
    if num_clients > len(examples):
        raise UserError(
            f"cannot split {len(examples)} examples across {num_clients} clients; use at most "
            f"{len(examples)} clients (federation.num_clients) or more data (data.max_examples)"
        )
    check_column(examples, cfg.by)  # also for iid: the manifest histograms use it
    seed32 = seed % 2**32  # NumPy seeds must be non-negative
    shares = SCHEMES[cfg.scheme](examples, cfg, num_clients, seed32)
    return [
        split_client(client_id, [examples[i] for i in rows], cfg, seed32)
        for client_id, rows in enumerate(shares)
    ]


# -------------------------------------------------------------------------------------- the column
def group_value(ex: Example, by: str):
    """The value of column `by` for one example (None when the example lacks it)."""
    if by in ("task", "domain"):
        return getattr(ex, by)
    if by == "label":
        return ex.label
    return ex.extra.get(by)


def check_column(examples: list[Example], by: str) -> None:
    """`by` must be task, domain, label or a key of the examples' `extra`."""
    if by in BUILTIN_COLUMNS or any(by in ex.extra for ex in examples):
        return
    known = list(BUILTIN_COLUMNS) + sorted(examples[0].extra)
    raise UserError(f'partition.by: unknown column "{by}"{did_you_mean(by, known)}; allowed: {", ".join(known)}')


def column_values(examples: list[Example], by: str) -> list:
    """The `by` value of every example, all ints or all strings (a partitioner needs one type)."""
    values = [group_value(ex, by) for ex in examples]
    missing = sum(v is None for v in values)
    if missing:
        what = "gold label (only classification examples have one)" if by == "label" else f'value for "{by}"'
        raise UserError(
            f"partition.by={by}: {missing} of {len(values)} examples have no {what}; partition by a column "
            f"every example has, e.g. partition.by=task or partition.by=domain"
        )
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return values
    return [str(v) for v in values]


# ------------------------------------------------------------------------------------------ schemes
def _dataset(rows: list[int], groups: list[int] | None = None):
    """A `datasets.Dataset` of row indices (and their group code) for a flwr-datasets partitioner to split.

    Arrow format: columns come back as Arrow arrays; the default format would build them row by row
    (seconds for 400k rows)."""
    from datasets import Dataset

    columns = {"row": rows} if groups is None else {"row": rows, "group": groups}
    return Dataset.from_dict(columns).with_format("arrow")


def _rows_of(partitioner, num_clients: int) -> list[list[int]]:
    return [partitioner.load_partition(i)["row"].to_pylist() for i in range(num_clients)]


def _codes(values: list) -> tuple[list[int], list]:
    """Each value's index in the sorted distinct values (integer groups compare fast), and those values."""
    groups = sorted(set(values))
    index = {v: i for i, v in enumerate(groups)}
    return [index[v] for v in values], groups


def _iid(examples, cfg: PartitionConfig, num_clients: int, seed: int) -> list[list[int]]:
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = _dataset(np.random.default_rng(seed).permutation(len(examples)).tolist())
    return _rows_of(partitioner, num_clients)


def _dirichlet(examples, cfg: PartitionConfig, num_clients: int, seed: int) -> list[list[int]]:
    from flwr_datasets.partitioner import DirichletPartitioner

    codes, groups = _codes(column_values(examples, cfg.by))
    # shuffled first, so which examples of a group go to which client is random too
    order = np.random.default_rng(seed).permutation(len(examples)).tolist()
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="group",
        alpha=float(cfg.alpha),
        min_partition_size=cfg.min_size,
        self_balancing=True,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = _dataset(order, [codes[i] for i in order])
    try:
        with warnings.catch_warnings():  # each redraw warns; failing after the last one is reported below
            warnings.simplefilter("ignore")
            return _rows_of(partitioner, num_clients)
    except ValueError:
        raise UserError(
            f"partition.scheme=dirichlet: no draw out of 11 gave each of the {num_clients} clients at least "
            f"partition.min_size={cfg.min_size} examples ({len(examples)} examples, {len(groups)} values "
            f"of {cfg.by}, alpha={cfg.alpha}); raise partition.alpha, lower partition.min_size, or use fewer "
            f"clients"
        ) from None


def _meta(examples, cfg: PartitionConfig, num_clients: int, seed: int) -> list[list[int]]:
    from flwr_datasets.partitioner import GroupedNaturalIdPartitioner

    codes, groups = _codes(column_values(examples, cfg.by))
    k = cfg.groups_per_client
    if num_clients * k > len(groups):
        raise UserError(
            f"partition.scheme=meta needs num_clients x groups_per_client = {num_clients} x {k} = "
            f"{num_clients * k} distinct values of {cfg.by}, but the data has {len(groups)}; use fewer clients "
            f"(federation.num_clients), a smaller partition.groups_per_client, or a column with more values"
        )
    partitioner = GroupedNaturalIdPartitioner(
        partition_by="group", group_size=k, mode="drop-reminder", sort_unique_ids=True
    )
    partitioner.dataset = _dataset(list(range(len(examples))), codes)
    return _rows_of(partitioner, num_clients)


def _quantity_skew(examples, cfg: PartitionConfig, num_clients: int, seed: int) -> list[list[int]]:
    from flwr_datasets.partitioner import SizePartitioner

    n = len(examples)
    if n < num_clients * cfg.min_size:
        raise UserError(
            f"partition.scheme=quantity_skew: {num_clients} clients x partition.min_size={cfg.min_size} needs "
            f"{num_clients * cfg.min_size} examples, but there are {n}; lower partition.min_size, use fewer "
            f"clients, or more data (data.max_examples)"
        )
    rng = np.random.default_rng(seed)
    sizes = _skewed_sizes(n, num_clients, cfg.min_size, cfg.alpha, rng)
    partitioner = SizePartitioner(partition_sizes=sizes)
    partitioner.dataset = _dataset(rng.permutation(n).tolist())
    return _rows_of(partitioner, num_clients)


def _skewed_sizes(n: int, num_clients: int, min_size: int, alpha: float, rng) -> list[int]:
    """min_size each plus a Dir(alpha) share of the rest, rounded by largest remainder to sum to n."""
    spare = n - num_clients * min_size
    exact = rng.dirichlet([alpha] * num_clients) * spare
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: spare - int(sizes.sum())]:
        sizes[i] += 1
    return [int(s) + min_size for s in sizes]


SCHEMES = {"iid": _iid, "dirichlet": _dirichlet, "meta": _meta, "quantity_skew": _quantity_skew}


# ------------------------------------------------------------------------------ per-client splits
def split_sizes(n: int, cfg: PartitionConfig) -> dict[str, int]:
    """Slice lengths for n examples: aux / val / test get their share of n, rounded, and at least one
    example when their ratio is positive; train gets the rest (possibly none, which `split_client`
    reports)."""
    ratios = cfg.splits.model_dump()
    total = sum(ratios.values())
    sizes = {
        name: max(1, math.floor(ratios[name] / total * n + 0.5)) if ratios[name] > 0 else 0
        for name in SPLITS[1:]
    }
    return {"train": max(0, n - sum(sizes.values())), **sizes}


def split_client(client_id: int, examples: list[Example], cfg: PartitionConfig, seed: int) -> ClientData:
    """Shuffle one client's examples (seeded by seed and client id), cut train / aux / val / test, cap."""
    order = np.random.default_rng([seed, client_id]).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    sizes = split_sizes(len(examples), cfg)
    parts, start = {}, 0
    for name in SPLITS:
        parts[name] = shuffled[start : start + sizes[name]]
        start += sizes[name]
    caps = cfg.caps.model_dump()
    for name in SPLITS[1:]:
        if caps[name] is not None:
            parts[name] = parts[name][: caps[name]]
    client = ClientData(client_id, **parts)
    _check_not_empty(client, len(examples), cfg)
    return client


SKEW_FIXES = {
    "iid": "",
    "dirichlet": ", or a larger partition.alpha or partition.min_size",
    "quantity_skew": ", or a larger partition.alpha or partition.min_size",
    "meta": ", or more groups per client (partition.groups_per_client)",
}


def _check_not_empty(client: ClientData, n: int, cfg: PartitionConfig) -> None:
    ratios = cfg.splits.model_dump()
    for name, size in client.sizes().items():
        if size == 0 and (name != "aux" or ratios["aux"] > 0):
            skew = SKEW_FIXES[cfg.scheme]
            raise UserError(
                f"client {client.client_id} got {n} examples, too few for a non-empty {name} split "
                f"(partition.splits {ratios}); use fewer clients (federation.num_clients) or more data "
                f"(data.max_examples){skew}"
            )


# ------------------------------------------------------------------------------------------- report
def manifest(clients: list[ClientData], by: str) -> dict:
    """JSON-able summary: per client the split sizes and the histogram of `by` over all its examples."""
    rows = []
    for c in clients:
        counts = Counter(
            "(none)" if (v := group_value(ex, by)) is None else str(v) for name in SPLITS for ex in getattr(c, name)
        )
        histogram = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        rows.append({"client": c.client_id, "sizes": c.sizes(), "histogram": histogram})
    totals = {name: sum(r["sizes"][name] for r in rows) for name in SPLITS}
    return {"by": by, "num_clients": len(clients), "clients": rows, "totals": totals}


def partition_table(manifest: dict, top: int = 3) -> Table:
    """A rich table of a manifest: one row per client with its split sizes and its largest groups."""
    table = Table(title=f"Clients (groups by {manifest['by']})")
    table.add_column("client", justify="right")
    for name in SPLITS:
        table.add_column(name, justify="right")
    table.add_column("groups", justify="right")
    table.add_column(f"top {manifest['by']}")
    for row in manifest["clients"]:
        hist = row["histogram"]
        shown = ", ".join(f"{k} ({v})" for k, v in list(hist.items())[:top])
        more = f", +{len(hist) - top} more" if len(hist) > top else ""
        table.add_row(str(row["client"]), *(str(row["sizes"][s]) for s in SPLITS), str(len(hist)), shown + more)
    return table
