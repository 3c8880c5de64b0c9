"""Hostile and careless input: every case ends in a clear error or a rejected reply, never a traceback, and
loses nothing (docs/reliability.md gives the count of these cases, computed from the tables below).

Kinds: hostile replies at the server (every field of a reply, per method, and malformed Flower messages),
evaluation replies, careless command lines and files (exit 2 with one message, before any model loads,
nothing deleted), run directories (ownership, --overwrite, the lock), verified resume (damaged checkpoints,
an edited config.yaml, torn JSONL lines), property-based tests of the config loader and of the server, and
the processes and temporary files of a killed Flower simulation.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmole import cli
from fedmole.adapters.state import state_digest
from fedmole.config import ALGORITHMS, Config
from fedmole.config_io import load_config, validate_config
from fedmole.errors import UserError
from fedmole.messages import Reply
from fedmole.run import _attach_log_file, _setup, latest_checkpoint, log

from conftest import metrics_records, run_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# two clients, one local step; round 1 of 2 is neither evaluated nor checkpointed
FAST = ["federation.num_clients=2", "data.max_examples=200", "partition.min_size=10", "train.local_steps=1",
        "eval.max_examples=2", "federation.rounds=2", "eval.every=2", "checkpoint.every=2", "train.num_threads=1"]
METHODS = {
    "fedit": (SMOKE, []),
    "flame": (ROOT / "configs" / "smoke_flame.yaml", ["data.max_examples=240"]),
    "fedamole": (ROOT / "configs" / "smoke_fedamole.yaml", ["federation.num_clients=4", "data.max_examples=400"]),
}


# ===================================================================================== hostile replies
def _first(r: Reply, pred=lambda k: True) -> str:
    return next(k for k in sorted(r.tensors) if pred(k))


def _set(name_of, value_of):
    """A corruption that replaces tensor `name_of(reply)` with `value_of(old tensor)`."""
    def corrupt(r: Reply) -> None:
        k = name_of(r)
        r.tensors[k] = value_of(r.tensors[k])
    return corrupt


def _field(attr: str, value):
    def corrupt(r: Reply) -> None:
        setattr(r, attr, value(r) if callable(value) else value)
    return corrupt


def _extra(key: str, value):
    def corrupt(r: Reply) -> None:
        r.extra[key] = value(r.extra) if callable(value) else value
    return corrupt


def _drop(name_of):
    def corrupt(r: Reply) -> None:
        del r.tensors[name_of(r)]
    return corrupt


def _sparse(t):
    return t.to_sparse()


# every method: (corruption of client 1's honest reply, words the rejection reason must contain)
REPLY_ATTACKS = {
    "NaN values": (_set(_first, lambda t: torch.full_like(t, math.nan)), "NaN"),
    "infinite values": (_set(_first, lambda t: torch.full_like(t, math.inf)), "infinite"),
    "values of 1e38": (_set(_first, lambda t: torch.full_like(t, 1e38)), "allowed"),
    "wrong shape": (_set(_first, lambda t: torch.zeros(3, 3)), "shape"),
    "wrong dtype": (_set(_first, lambda t: t.double()), "dtype"),
    "integer tensor": (_set(_first, lambda t: t.long()), "dtype"),
    "complex tensor": (_set(_first, lambda t: t.to(torch.complex64)), "cannot be sent"),
    "sparse tensor": (_set(_first, _sparse), "dense"),
    "meta tensor": (_set(_first, lambda t: torch.empty(t.shape, device="meta")), "meta"),
    "numpy array": (_set(_first, lambda t: t.numpy()), "not a tensor"),
    "list instead of a tensor": (_set(_first, lambda t: t.tolist()), "not a tensor"),
    "None instead of a tensor": (_set(_first, lambda t: None), "not a tensor"),
    "unknown tensor name": (lambda r: r.tensors.update({"model.layers.0.self_attn.q_proj/lora/C": torch.zeros(2)}),
                            "unexpected tensors"),
    "expert not assigned": (lambda r: r.tensors.update({"model.layers.0.mlp/99/A": torch.zeros(2)}),
                            "not assigned"),
    "non-string tensor name": (lambda r: r.tensors.update({7: torch.zeros(2)}), "not a string"),
    "tensors as a list": (_field("tensors", lambda r: list(r.tensors.values())), "mapping"),
    "tensors None": (_field("tensors", None), "mapping"),
    "a required tensor missing": (_drop(lambda r: _first(r, lambda k: "/rescaler/" in k or not k.split("/")[-2]
                                                         .isdigit())), "missing tensors"),
    "zero samples": (_field("num_examples", 0), "positive integer"),
    "negative samples": (_field("num_examples", -3), "positive integer"),
    "fractional samples": (_field("num_examples", 2.5), "positive integer"),
    "boolean samples": (_field("num_examples", True), "positive integer"),
    "samples as text": (_field("num_examples", "80"), "positive integer"),
    "samples None": (_field("num_examples", None), "positive integer"),
    "10**18 samples": (_field("num_examples", 10**18), "exceeds"),
    "more samples than its train split": (_field("num_examples", lambda r: r.num_examples * 10), "exceeds"),
    "metrics as a list": (_field("metrics", [1.0, 2.0]), "mapping"),
    "metrics None": (_field("metrics", None), "mapping"),
    "NaN metric": (lambda r: r.metrics.update(loss=math.nan), "finite number"),
    "text metric": (lambda r: r.metrics.update(loss="low"), "finite number"),
    "negative loss": (lambda r: r.metrics.update(loss=-1.0), "outside"),
    "metric name with spaces": (lambda r: r.metrics.update({"rm -rf /": 1.0}), "not a short word"),
    "ten thousand metrics": (lambda r: r.metrics.update({f"m{i}": 1.0 for i in range(10_000)}), "at most"),
    "dp_groups of 10**9": (lambda r: r.metrics.update(dp_groups=10**9), "dp_groups"),
    "evaluations not asked for": (_field("evals", [{"model": "global", "split": "test", "metrics": {"loss": 1.0}}]),
                                  "did not ask"),
    "evals as a mapping": (_field("evals", {"model": "global"}), "list"),
    "extra as a list": (_field("extra", [1, 2]), "mapping"),
    "unknown extra field": (lambda r: r.extra.update(backdoor=1), "unexpected extra"),
}


def _expert(r: Reply) -> str:
    return _first(r, lambda k: k.split("/")[-2].isdigit())


def _module(r: Reply) -> str:
    return sorted(r.extra["counts"])[0]


def _counts(change):
    def corrupt(r: Reply) -> None:
        counts = r.extra["counts"][_module(r)]
        r.extra["counts"][_module(r)] = change(list(counts), r.extra)
    return corrupt


FLAME_ATTACKS = {
    "NaN activation counts": (_counts(lambda c, e: [math.nan] * len(c)), "integer"),
    "counts missing": (lambda r: r.extra.pop("counts"), "extra.counts is missing"),
    "counts as a list": (_extra("counts", [1, 2, 3]), "mapping"),
    "counts of an unknown layer": (_extra("counts", lambda e: {"model.layers.9.mlp": [1] * 8}), "keys differ"),
    "counts list too short": (_counts(lambda c, e: c[:-1]), "list of"),
    "negative count": (_counts(lambda c, e: [-1] + c[1:]), "must be in"),
    "count above the tokens": (_counts(lambda c, e: [e["tokens"] + 1] + c[1:]), "more tokens"),
    "counts summing above k tokens": (_counts(lambda c, e: [e["tokens"]] * len(c)), "more tokens"),
    "tokens as text": (_extra("tokens", "many"), "integer"),
    "tokens missing": (lambda r: r.extra.pop("tokens"), "extra.tokens is missing"),
    "tokens beyond what the steps hold": (_extra("tokens", 10**9), "must be in"),
    "steps differ from the plan": (_extra("steps", 99), "what the server sent"),
    "k differs from the tier": (_extra("k", lambda e: e["k"] + 1), "what the server sent"),
    "k as a float": (_extra("k", lambda e: float(e["k"])), "what the server sent"),
    "rescaler log s of 50": (_set(lambda r: _first(r, lambda k: "/rescaler/" in k), lambda t: torch.full_like(t, 50.0)),
                             "allowed"),
    "rescaler missing": (_drop(lambda r: _first(r, lambda k: "/rescaler/" in k)), "missing tensors"),
    "expert NaN": (_set(_expert, lambda t: torch.full_like(t, math.nan)), "NaN"),
}

FEDAMOLE_ATTACKS = {
    "embedding without its router vector": (_drop(lambda r: _first(r, lambda k: k.endswith("/router/t"))),
                                            "incomplete group"),
    "one expert embedding missing": (_drop(lambda r: _first(r, lambda k: k.endswith("/u"))), "incomplete group"),
    "router vector of the wrong shape": (_set(lambda r: _first(r, lambda k: k.endswith("/router/t")),
                                              lambda t: torch.zeros(t.numel() + 1)), "shape"),
    "embedding of 1e30": (_set(lambda r: _first(r, lambda k: k.endswith("/u")), lambda t: torch.full_like(t, 1e30)),
                          "allowed"),
    "domain expert missing": (_drop(lambda r: _first(r, lambda k: k.split("/")[-2].isdigit() and k.endswith("/A"))),
                              "missing tensors"),
}

METHOD_ATTACKS = {"fedit": {}, "flame": FLAME_ATTACKS, "fedamole": FEDAMOLE_ATTACKS}


class Arena:
    """One method's federation, with client 1's honest round-1 reply trained once; `round(corrupt)` replays
    round 1 with that reply corrupted, from the same server state, and reports what happened."""

    def __init__(self, method: str, root: Path):
        config, extra = METHODS[method]
        self.run_dir = root / method
        self.run_dir.mkdir()
        self.fed = _setup(load_config(config, FAST + extra), self.run_dir, "none")
        self.handler = _attach_log_file(self.run_dir)
        tensors, meta = self.fed.strategy.state_dict()
        self.snapshot = ({k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta))
        clients = list(range(self.fed.cfg.federation.num_clients))
        plans = self.fed._plan(1, self.fed.strategy.configure_train(1, clients, False))
        self.honest, failures = self.fed.engine.train(1, plans)
        assert not failures and set(self.honest) == set(clients)
        self.reference = self.digest_after({c: r for c, r in self.honest.items() if c != 1},
                                           {1: ("dropped", "left out for the reference")})

    def digest_after(self, replies: dict, failures: dict) -> str:
        self.fed.strategy.load_state_dict(*copy.deepcopy(self.snapshot))
        self.fed.metrics.truncate(0)
        self.fed.engine.train = lambda rnd, plans: ({c: copy.deepcopy(r) for c, r in replies.items()}, dict(failures))
        self.fed.run_round(1)
        return state_digest(self.fed.strategy.state_dict()[0])

    def round(self, corrupt) -> tuple[str, list[dict]]:
        hostile = copy.deepcopy(self.honest)
        corrupt(hostile[1])
        digest = self.digest_after(hostile, {})
        return digest, [r for r in self.fed.metrics.records() if r["metric"] == "client_rejected"]

    def close(self) -> None:
        log.removeHandler(self.handler)
        self.handler.close()


@pytest.fixture(scope="module")
def arenas(tmp_path_factory):
    root = tmp_path_factory.mktemp("arenas")
    made: dict[str, Arena] = {}

    def get(method: str) -> Arena:
        if method not in made:
            made[method] = Arena(method, root)
        return made[method]

    yield get
    for a in made.values():
        a.close()


def _check_rejected(arena: Arena, corrupt, words: str, what: str) -> None:
    digest, rejected = arena.round(corrupt)
    assert [r["client"] for r in rejected] == [1], (what, rejected)
    assert words in rejected[0]["reason"], (what, rejected[0]["reason"])
    assert digest == arena.reference, what  # the global state is what the honest reply alone gives
    assert f"reply of client 1 rejected: {rejected[0]['reason']}" in (arena.run_dir / "run.log").read_text()


@pytest.mark.parametrize("method", list(METHODS))
def test_honest_replies_are_accepted(arenas, method):
    arena = arenas(method)
    digest, rejected = arena.round(lambda r: None)
    assert rejected == [] and digest != arena.reference  # client 1's reply counts


@pytest.mark.parametrize("method", list(METHODS))
def test_every_kind_of_hostile_reply_is_rejected_and_the_round_goes_on(arenas, method):
    arena = arenas(method)
    attacks = {**REPLY_ATTACKS, **METHOD_ATTACKS[method]}
    for what, (corrupt, words) in attacks.items():
        _check_rejected(arena, corrupt, words, what)


# evaluation replies (the global model's evaluation on every client)
OUTCOME = {"uid": "words:3", "gold": 1, "pred": 0, "choice_scores": [2.1, 1.7], "correct": 0, "rouge_l": None,
           "value": 0.0}  # one scored test example, as client/evaluate.py `outcome` writes it
EVAL_ATTACKS = {
    "evals as a mapping": ({"model": "global"}, "list"),
    "an eval that is a number": ([1], "mapping with exactly"),
    "an eval without metrics": ([{"model": "global", "split": "test"}], "mapping with exactly"),
    "split train": ([{"model": "global", "split": "train", "metrics": {}}], "split must be"),
    "NaN score": ([{"model": "global", "split": "test", "metrics": {"score": math.nan}}], "finite number"),
    "score of 1e9": ([{"model": "global", "split": "test", "metrics": {"score": 1e9}}], "outside"),
    "model label with a path": ([{"model": "../../etc", "split": "test", "metrics": {}}], "model label"),
    "metrics as text": ([{"model": "global", "split": "val", "metrics": "good"}], "mapping"),
    "a round outside a deferred test": ([{"model": "global", "split": "test", "metrics": {}, "round": 1}],
                                        "only results of a deferred test"),
    "outcomes of a val split": ([{"model": "global", "split": "val", "metrics": {}, "examples": []}], "only a test"),
    "outcomes as a mapping": ([{"model": "global", "split": "test", "metrics": {}, "examples": {}}], "list"),
    "more outcomes than scored": ([{"model": "global", "split": "test", "metrics": {"n": 1.0},
                                    "examples": [OUTCOME, OUTCOME]}], "more than the 1 examples scored"),
    "more outcomes than test examples": ([{"model": "global", "split": "test", "metrics": {},
                                           "examples": [OUTCOME] * 10_000}], "test examples of this client"),
    "an outcome with a NaN value": ([{"model": "global", "split": "test", "metrics": {},
                                      "examples": [{**OUTCOME, "value": math.nan}]}], "malformed value"),
    "an outcome with an unknown field": ([{"model": "global", "split": "test", "metrics": {},
                                           "examples": [{**OUTCOME, "path": "/etc"}]}], "mapping with exactly"),
    "an outcome with a score as text": ([{"model": "global", "split": "test", "metrics": {},
                                          "examples": [{**OUTCOME, "choice_scores": ["1.0"]}]}], "choice_scores"),
}


def test_every_kind_of_hostile_evaluation_reply_is_rejected(arenas):
    fed = arenas("fedit").fed
    honest = {"model": "global", "split": "test", "metrics": {"score": 50.0, "loss": 1.0}}
    for what, (evals, words) in EVAL_ATTACKS.items():
        fed.metrics.truncate(0)
        fed.engine.evaluate = lambda rnd, plans, evals=evals: ({0: Reply(evals=[honest]), 1: Reply(evals=evals)}, {})
        fed.evaluate_global(1)
        rejected = [r for r in fed.metrics.records() if r["metric"] == "eval_rejected"]
        assert [r["client"] for r in rejected] == [1] and words in rejected[0]["reason"], (what, rejected)
        assert any(r["client"] == 0 and r["metric"] == "score" for r in fed.metrics.records()), what


TESTED = {"model": "global", "split": "test", "metrics": {"score": 50.0, "n": 1.0}, "examples": [OUTCOME]}
DEFERRED_ATTACKS = {"a round not asked for": ({**TESTED, "round": 1}, "must be one of the rounds"),
                    "no round": (TESTED, "must be one of the rounds"),
                    "a round as text": ({**TESTED, "round": "2"}, "must be one of the rounds")}


def test_a_deferred_test_reply_names_a_snapshot_round_the_server_asked_for(arenas):
    """eval.test: selected: the test phase asks for the snapshots of some rounds (here round 2); a result of
    another round, or of none, is rejected; one of round 2 with its per-example outcomes is accepted."""
    fed = arenas("fedit").fed
    for what, (bad, words) in DEFERRED_ATTACKS.items():
        fed.metrics.truncate(0)
        replies = {0: Reply(evals=[{**TESTED, "round": 2}]), 1: Reply(evals=[bad])}
        accepted = fed._receive(3, "evaluate", replies, rounds={"global": [2]})
        rejected = [r for r in fed.metrics.records() if r["metric"] == "eval_rejected"]
        assert list(accepted) == [0] and [r["client"] for r in rejected] == [1], what
        assert words in rejected[0]["reason"], (what, rejected[0]["reason"])


# malformed Flower messages: the reply body a ClientApp sends as JSON
WIRE_ATTACKS = {
    "reply body not JSON": ({"reply": "{not json"}, "unreadable reply"),
    "reply body a list": ({"reply": "[1, 2]"}, "exactly"),
    "reply body missing evals": ({"reply": json.dumps({"num_examples": 1, "metrics": {}, "extra": {}})}, "exactly"),
    "reply body with an extra field": ({"reply": json.dumps({"num_examples": 1, "metrics": {}, "evals": [],
                                                             "extra": {}, "x": 1})}, "exactly"),
    "failure of an unknown kind": ({"failure": json.dumps(["rejected_by_me", "x"])}, "unreadable failure"),
    "failure that is not a pair": ({"failure": json.dumps("boom")}, "unreadable"),
    "no reply and no failure": ({"other": "x"}, "unreadable reply"),
}


def test_every_kind_of_malformed_flower_reply_becomes_a_rejection():
    from flwr.app import ConfigRecord, RecordDict

    from fedmole.engines.flower.records import parse_reply

    for what, (conf, words) in WIRE_ATTACKS.items():
        reply, failure = parse_reply(RecordDict({"config": ConfigRecord(conf)}))
        assert reply is None and failure[0] == "rejected" and words in failure[1], (what, failure)


def test_norm_bounding_scales_a_huge_update_down_to_the_bound(arenas):
    arena = arenas("fedit")
    fed, bound = arena.fed, 0.5
    fed.cfg.replies.max_update_norm = bound
    try:
        plans = fed.strategy.configure_train(1, [0, 1], False)
        replies = copy.deepcopy(arena.honest)
        sent = plans[1].tensors
        replies[1].tensors = {k: v + 10.0 for k, v in replies[1].tensors.items()}  # norm 10 sqrt(numel)
        accepted, rejected = fed._accept(1, plans, replies)
        assert not rejected
        update = math.sqrt(sum(float((accepted[1].tensors[k].double() - sent[k].double()).pow(2).sum()) for k in sent))
        assert update == pytest.approx(bound, rel=1e-5) and accepted[1].metrics["update_norm"] > 1e3 * bound
        assert accepted[0].metrics["update_norm"] < bound  # a small honest update is left as it is
        assert all(torch.equal(accepted[0].tensors[k], arena.honest[0].tensors[k]) for k in sent)
    finally:
        fed.cfg.replies.max_update_norm = None


# ------------------------------------------------------------------- property-based: hostile replies
RANDOM_REPLIES = 40  # per method
TENSOR_CHANGES = st.sampled_from([
    lambda t: t * 1e30, lambda t: t * math.inf, lambda t: t * math.nan, lambda t: t.reshape(-1),
    lambda t: t.half(), lambda t: t[:0], lambda t: t.to_sparse(), lambda t: t.numpy(), lambda t: -t,
    lambda t: t + 1e-3, lambda t: t.double(), lambda t: t.unsqueeze(0),
])


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


@st.composite
def mutations(draw, honest: Reply):
    """A list of random changes to one reply's fields."""
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(["tensor", "drop", "add", "num_examples", "metrics", "evals", "extra",
                                      "extra_field"]))
        if field == "tensor":
            steps.append(("tensor", draw(st.sampled_from(sorted(honest.tensors))), draw(TENSOR_CHANGES)))
        elif field == "drop":
            steps.append(("drop", draw(st.sampled_from(sorted(honest.tensors))), None))
        elif field == "add":
            steps.append(("add", draw(st.text(max_size=30)), None))
        elif field == "extra_field":
            keys = sorted(honest.extra) or ["x"]
            steps.append(("extra_field", draw(st.sampled_from(keys)), draw(JSON)))
        else:
            steps.append((field, None, draw(JSON)))
    return steps


def _apply(reply: Reply, steps) -> None:
    for field, name, value in steps:
        if field == "tensor":
            t = reply.tensors.get(name)
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                reply.tensors[name] = value(t)
        elif field == "drop":
            reply.tensors.pop(name, None)
        elif field == "add":
            reply.tensors[name] = torch.zeros(2)
        elif field == "extra_field":
            if isinstance(reply.extra, dict):
                reply.extra[name] = value
        else:
            setattr(reply, field, value)


def _finite_state(fed) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in fed.strategy.state_dict()[0].values() if v.is_floating_point())


@pytest.mark.parametrize("method", ["fedit", "flame"])
def test_random_malformed_replies_are_rejected_or_harmless(arenas, method):
    arena = arenas(method)

    @settings(max_examples=RANDOM_REPLIES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        steps = data.draw(mutations(arena.honest[1]))
        digest, rejected = arena.round(lambda r: _apply(r, steps))  # never raises
        if rejected:
            assert [r["client"] for r in rejected] == [1] and rejected[0]["reason"]
            assert digest == arena.reference  # the global state is untouched by the rejected reply
        else:
            assert _finite_state(arena.fed)

    check()


# ====================================================================================== careless input
@pytest.fixture
def fedmole_cli(monkeypatch, capsys):
    """Run the CLI in this process with model loading (and WordNet, the data set of the configs on which only
    config and run-directory mistakes are made) forbidden: (exit code, stderr). An error reported after
    that fails the test instead of passing as exit 2."""
    import fedmole.data.sources
    import fedmole.models

    def forbidden(what):
        def load(*a, **k):
            raise AssertionError(f"{what} was loaded before the input was checked")
        return load

    monkeypatch.setattr(fedmole.models, "load_model", forbidden("a model"))
    monkeypatch.setattr(fedmole.data.sources, "load_wordnet", forbidden("WordNet"))

    def call(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["fedmole", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as ended:
            cli.main()
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return ended.value.code, err

    return call


def _files(path: Path) -> dict[str, bytes]:
    """Everything under `path` (name -> bytes), to check that nothing was deleted or changed."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.exists() else {}


def _long_prompts(tmp: Path) -> Path:
    path = tmp / "long.jsonl"
    path.write_text("".join(json.dumps({"instruction": "word " * 200, "response": "ok"}) + "\n" for _ in range(80)))
    return path


def _jsonl(tmp: Path, name: str, records: list) -> Path:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _good(n: int = 40) -> list[dict]:
    return [{"instruction": f"say {i}", "response": f"{i}"} for i in range(n)]


def _config_file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


BOMB = b"".join(b"l%d: &l%d [%s]\n" % (i, i, b",".join([b"*l%d" % (i - 1)] * 9) if i else b"1") for i in range(9))
DATA = ["--set", "data.source=jsonl", "--set", "federation.num_clients=2", "--set", "partition.scheme=iid"]

# careless command lines: (arguments built in a temporary directory, words the one error message holds).
# `{out}` is a fresh path for --out; `M` forbids model loading so the error must come first.
CARELESS = {
    "lr .inf": (lambda t: ["run", SMOKE, "--set", "train.lr=.inf"], "`train.lr` (got inf): Input should be a finite"),
    "noise_multiplier .inf": (lambda t: ["run", SMOKE, "--set", "dp.enabled=true", "--set", "dp.noise_multiplier=.inf"],
                              "`dp.noise_multiplier` (got inf)"),
    "noise_multiplier 1e-300": (lambda t: ["run", SMOKE, "--set", "dp.enabled=true",
                                           "--set", "dp.noise_multiplier=1e-300"], "at least 0.001"),
    "split ratio NaN": (lambda t: ["run", SMOKE, "--set", "partition.splits.val=.nan"], "`partition.splits.val` (got nan)"),
    "split ratio inf": (lambda t: ["run", SMOKE, "--set", "partition.splits.train=.inf"], "`partition.splits.train`"),
    "tier share inf": (lambda t: ["run", SMOKE, "--set", "tiers.shares=[.inf, 1]"], "`tiers.shares.0` (got inf)"),
    "tier share NaN": (lambda t: ["run", SMOKE, "--set", "tiers.shares=[.nan, 1]"], "`tiers.shares.0` (got nan)"),
    "negative seed": (lambda t: ["run", SMOKE, "--set", "federation.seed=-1"], "`federation.seed` (got -1)"),
    "huge seed": (lambda t: ["run", SMOKE, "--set", f"federation.seed={2**70}"], "less than or equal to 4294967295"),
    "negative partition seed": (lambda t: ["run", SMOKE, "--set", "partition.seed=-5"], "`partition.seed`"),
    "config not UTF-8": (lambda t: ["run", _config_file(t, "latin.yaml", b"train:\n  lr: 0.1 # caf\xe9\n")],
                         "not UTF-8 text (byte 0xe9 on line 2)"),
    "YAML alias bomb": (lambda t: ["run", _config_file(t, "bomb.yaml", BOMB)], "expands to more than 100000"),
    "YAML alias holding itself": (lambda t: ["run", _config_file(t, "self.yaml", b"a: &a [*a]\n")], "refers to the value"),
    "empty YAML file": (lambda t: ["run", _config_file(t, "empty.yaml", b"")], "is empty"),
    "YAML of comments only": (lambda t: ["run", _config_file(t, "c.yaml", b"# nothing\n")], "is empty"),
    "YAML nested too deeply": (lambda t: ["run", _config_file(t, "deep.yaml", b"[" * 3000 + b"]" * 3000)],
                               "nested too deeply"),
    "YAML that is a list": (lambda t: ["run", _config_file(t, "list.yaml", b"- a\n- b\n")], "must be a mapping"),
    "config path a directory": (lambda t: ["run", ROOT / "configs"], "is a directory"),
    "config path missing": (lambda t: ["run", t / "nope.yaml"], "does not exist"),
    "data JSONL not UTF-8": (lambda t: ["run", SMOKE, *DATA, "--set", "data.path=" + str(_config_file(
        t, "d.jsonl", b'{"instruction": "a", "response": "b"}\n{"instruction": "\xff", "response": "b"}\n'))],
        "d.jsonl:2: not UTF-8 text"),
    "null response": (lambda t: ["run", SMOKE, *DATA, "--set", "data.path=" + str(_jsonl(
        t, "n.jsonl", _good() + [{"instruction": "a", "response": None}]))], "column 'response' must be text, got None"),
    "numeric response": (lambda t: ["run", SMOKE, *DATA, "--set", "data.path=" + str(_jsonl(
        t, "num.jsonl", _good() + [{"instruction": "a", "response": 42}]))], "must be text, got 42"),
    "null instruction": (lambda t: ["run", SMOKE, *DATA, "--set", "data.path=" + str(_jsonl(
        t, "ni.jsonl", [{"instruction": None, "response": "b"}] + _good()))], "column 'instruction' must be text"),
    "all examples longer than max_length": (lambda t: ["run", SMOKE, *DATA, "--set", f"data.path={_long_prompts(t)}",
                                                       "--set", "train.max_length=16"], "none of its"),
    "output.name ..": (lambda t: ["run", SMOKE, "--set", "output.name=..", "--set", f"output.dir={t / 'runs'}"],
                       "`output.name` (got '..')"),
    "output.name absolute": (lambda t: ["run", SMOKE, "--set", "output.name=/etc"], "`output.name` (got '/etc')"),
    "--out is a file": (lambda t: ["run", SMOKE, "--out", _config_file(t, "notes.txt", b"mine\n")], "is a file"),
    "--out below a file": (lambda t: ["run", SMOKE, "--out", _config_file(t, "f.txt", b"mine\n") / "run"],
                           "cannot create run directory"),
    "--out name too long": (lambda t: ["run", SMOKE, "--out", t / ("x" * 300)], "File name too long"),
    "--out a folder of the user, --overwrite": (lambda t: ["run", SMOKE, "--out", _user_folder(t), "--overwrite"],
                                                "is not a fedmole run directory"),
    "--out the parent folder, --overwrite": (lambda t: ["run", SMOKE, "--out", _user_folder(t) / "..", "--overwrite"],
                                             "is not a fedmole run directory"),
    "resume of a folder that is no run": (lambda t: ["resume", _user_folder(t)], "not a fedmole run directory"),
}


def _user_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    folder.mkdir(exist_ok=True)
    (folder / "thesis.tex").write_text("years of work\n")
    return folder


@pytest.mark.parametrize("case", list(CARELESS))
def test_careless_input_exits_2_with_one_message_before_any_model_loads(fedmole_cli, tmp_path, case):
    args = CARELESS[case][0](tmp_path)
    if "--out" not in args and args[0] == "run":
        args += ["--out", tmp_path / "out"]
    before = _files(tmp_path)
    code, err = fedmole_cli(*args)
    assert code == 2, (case, err)
    assert CARELESS[case][1] in err and err.count("error:") == 1, (case, err)
    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, case  # nothing deleted or changed
    out = tmp_path / "out"  # not created, or left as claimed (marker and lock), so the next try may use it
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == [".fedmole-run", ".fedmole.lock"], case


def test_a_read_only_out_directory_exits_2(fedmole_cli, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes anywhere; the immutable attribute stops it too
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available")
    else:
        out.chmod(0o555)
    try:
        code, err = fedmole_cli("run", SMOKE, "--out", out)
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        out.chmod(0o755)
    assert code == 2 and "cannot write in run directory" in err and list(out.iterdir()) == []


def test_a_user_error_exits_2_from_a_real_process(tmp_path):
    """The in-process cases above, end to end once: exit status 2, one message, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), "--set", "train.lr=.inf", "--out",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "`train.lr` (got inf)" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- property-based: the config loader
RANDOM_CONFIGS = 150  # each tried as a mapping and as --set overrides
RANDOM_ALGORITHM_SECTIONS = 100
RANDOM_FILES = 100
LEAVES = sorted(
    [f"{section}.{key}" for section, fld in Config.model_fields.items() if section != "algorithm"
     for key in fld.annotation.model_fields] + ["algorithm.name", "algorithm.rank", "algorithm.top_k", "nope.key"]
)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
                   st.lists(st.floats() | st.integers(-5, 5), max_size=4), st.dictionaries(st.text(max_size=5),
                                                                                          st.integers(), max_size=2))


def _check_config(make) -> None:
    try:
        cfg = make()
    except UserError as err:
        assert str(err).strip()
        return
    floats = []

    def walk(x):
        if isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, list):
            [walk(v) for v in x]
        elif isinstance(x, float):
            floats.append(x)

    walk(cfg.to_dict())
    assert all(math.isfinite(f) for f in floats)
    assert 0 <= cfg.federation.seed <= 2**32 - 1


@settings(max_examples=RANDOM_CONFIGS, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(LEAVES), VALUES, min_size=1, max_size=4))
def test_random_config_values_give_a_config_or_one_clear_error(values):
    data: dict = {}
    for key, value in values.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    _check_config(lambda: validate_config(data))
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in values.items()]
    _check_config(lambda: load_config(None, overrides))


ALGORITHM_KEYS = sorted({k for cls in ALGORITHMS.values() for k in cls.model_fields if k != "name"})


@settings(max_examples=RANDOM_ALGORITHM_SECTIONS, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(ALGORITHMS)), st.dictionaries(st.sampled_from(ALGORITHM_KEYS), VALUES, max_size=3),
       st.dictionaries(st.sampled_from(["levels", "shares", "per_client"]), VALUES, max_size=2))
def test_random_algorithm_sections_give_a_config_or_one_clear_error(name, values, tiers):
    _check_config(lambda: validate_config({"algorithm": {"name": name, **values}, "tiers": tiers}))


@settings(max_examples=RANDOM_FILES, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_random_config_files_give_a_config_or_one_clear_error(content):
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fedmole-hypothesis-{os.getpid()}.yaml"
    path.write_bytes(content)
    try:
        _check_config(lambda: load_config(path))
    finally:
        path.unlink()


# ===================================================================================== run directories
def _run(run_dir: Path, *extra: str, method: str = "local") -> dict:
    return run_config(SMOKE, FAST + [f"algorithm.name={method}", *extra], run_dir, exist_ok=True)[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-round `local` run (client states are tensors), checkpoints of rounds 2 and 3 kept."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    summary = _run(run_dir, "federation.rounds=3", "checkpoint.every=1", "eval.every=1")
    return run_dir, summary


def test_a_run_directory_carries_its_marker_and_a_free_lock_after_the_run(finished):
    from fedmole.rundir import LOCK, MARKER, lock_is_free

    run_dir, _ = finished
    assert json.loads((run_dir / MARKER).read_text())["kind"] == "run"
    assert lock_is_free(run_dir / LOCK)


def test_overwrite_replaces_only_a_fedmole_run(tmp_path, finished):
    from fedmole.rundir import claim

    copy_dir = tmp_path / "old"
    shutil.copytree(finished[0], copy_dir)
    with pytest.raises(UserError, match="already holds a run"):
        claim(copy_dir, overwrite=False)
    claim(copy_dir, overwrite=True)  # an earlier fedmole run: replaced
    assert sorted(p.name for p in copy_dir.iterdir()) == [".fedmole-run", ".fedmole.lock"]
    legacy = tmp_path / "legacy"  # written before markers: config.yaml and only what a run writes
    shutil.copytree(finished[0], legacy)
    (legacy / ".fedmole-run").unlink()
    (legacy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a fedmole run directory"):
        claim(legacy, overwrite=True)
    assert (legacy / "notes.txt").read_text() == "mine" and (legacy / "checkpoints").is_dir()
    (legacy / "notes.txt").unlink()
    claim(legacy, overwrite=True)
    assert sorted(p.name for p in legacy.iterdir()) == [".fedmole-run", ".fedmole.lock"]


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fedmole.rundir import hold
    with hold(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_run_or_resume_of_a_directory_in_use_exits_2_until_the_holder_dies(fedmole_cli, tmp_path, finished):
    run_dir = tmp_path / "busy"
    shutil.copytree(finished[0], run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(run_dir)
        for args in (["run", SMOKE, "--out", run_dir, "--overwrite"], ["resume", run_dir]):
            code, err = fedmole_cli(*args)
            assert code == 2 and "in use by another fedmole process" in err, err
        assert _files(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock of a killed process
        holder.wait()
    from fedmole.rundir import claim

    claim(run_dir, overwrite=True)


EXPORT_CASES = {
    "--overwrite over a user's folder": (lambda t: _user_folder(t), True, "is not a fedmole export"),
    "--out is a file": (lambda t: _config_file(t, "model.bin", b"mine"), True, "is a file"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_overwrite_replaces_only_an_export(fedmole_cli, tmp_path, finished, case):
    make, overwrite, words = EXPORT_CASES[case]
    out = make(tmp_path)
    before = _files(tmp_path)
    code, err = fedmole_cli("export", finished[0], "--client", "0", "--out", out,
                            *(["--overwrite"] if overwrite else []))
    assert code == 2 and words in err, err
    assert _files(tmp_path) == before


# ===================================================================================== verified resume
def _interrupted(tmp: Path, finished, name: str) -> Path:
    """A copy of the finished run as if it had been killed after writing round 3's checkpoint."""
    run_dir = tmp / name
    shutil.copytree(finished[0], run_dir)
    (run_dir / "summary.json").unlink()
    return run_dir


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _a_client_state(ckpt: Path) -> Path:
    return sorted((ckpt / "clients").glob("client-*.safetensors"))[0]


RESUME_DAMAGE = {
    "a flipped byte in a client state": lambda c: _flip_byte(_a_client_state(c)),
    "a flipped byte in the server state": lambda c: _flip_byte(c / "server.safetensors"),
    "a client state deleted": lambda c: _a_client_state(c).unlink(),
    "a client state added": lambda c: shutil.copy(_a_client_state(c), c / "clients" / "client-99.safetensors"),
    "state.json cut in half": lambda c: (c / "state.json").write_text((c / "state.json").read_text()[:50]),
    "the manifest deleted": lambda c: (c / "manifest.json").unlink(),
    "the manifest garbled": lambda c: (c / "manifest.json").write_text("{"),
}


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_falls_back_from_a_damaged_newest_checkpoint_to_the_same_result(tmp_path, finished, damage, capsys):
    from fedmole.run import resume_experiment

    run_dir = _interrupted(tmp_path, finished, "r")
    RESUME_DAMAGE[damage](run_dir / "checkpoints" / "round_0003")
    summary = resume_experiment(run_dir, progress_mode="none")
    assert summary["state_digest"] == finished[1]["state_digest"], damage
    assert metrics_records(run_dir) == metrics_records(finished[0])
    assert "checkpoint round_0003 is not intact" in capsys.readouterr().err
    assert "falling back" in (run_dir / "run.log").read_text()


def test_resume_with_no_intact_checkpoint_exits_2_and_deletes_nothing(fedmole_cli, tmp_path, finished):
    run_dir = _interrupted(tmp_path, finished, "r")
    for ckpt in (run_dir / "checkpoints").glob("round_*"):
        _flip_byte(ckpt / "server.safetensors")
    before = _files(run_dir)
    code, err = fedmole_cli("resume", run_dir)
    assert code == 2 and "no intact checkpoint" in err
    assert {k: v for k, v in _files(run_dir).items() if k != "run.log"} == \
        {k: v for k, v in before.items() if k != "run.log"}


def test_a_removed_manifest_is_caught_even_on_the_runs_only_checkpoint(fedmole_cli, tmp_path, finished):
    run_dir = _interrupted(tmp_path, finished, "r")
    *older, newest = sorted((run_dir / "checkpoints").glob("round_*"))
    for ckpt in older:  # checkpoint.keep_last: 1 leaves one checkpoint
        shutil.rmtree(ckpt)
    (newest / "manifest.json").unlink()
    _flip_byte(newest / "server.safetensors")
    code, err = fedmole_cli("resume", run_dir)
    assert code == 2 and "no intact checkpoint" in err and "manifest.json is missing" in err


def test_resume_refuses_an_edited_config_yaml_with_the_diff(fedmole_cli, tmp_path, finished):
    run_dir = _interrupted(tmp_path, finished, "r")
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("lr: 0.001", "lr: 0.5"))
    before = _files(run_dir)
    code, err = fedmole_cli("resume", run_dir)
    assert code == 2 and "config.yaml was changed after checkpoint round_0003" in err and "train.lr: 0.001 -> 0.5" in err
    assert {k: v for k, v in _files(run_dir).items() if k != "run.log"} == \
        {k: v for k, v in before.items() if k != "run.log"}


TORN = {"metrics.jsonl": b'{"round": 4, "client": 0, "mo', "comm.jsonl": b'{"round": 4, "cli'}


@pytest.mark.parametrize("name", list(TORN))
def test_a_torn_last_jsonl_line_is_cut_back_on_resume(tmp_path, finished, name):
    from fedmole.run import resume_experiment

    run_dir = _interrupted(tmp_path, finished, "r")
    with open(run_dir / name, "ab") as fh:
        fh.write(TORN[name])
    summary = resume_experiment(run_dir, progress_mode="none")
    assert summary["state_digest"] == finished[1]["state_digest"]
    assert (run_dir / name).read_bytes() == (finished[0] / name).read_bytes()


# ======================================================================= processes and temporary files
def test_stale_simulation_directories_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    from fedmole.engines.flower.watchdog import OWNER, remove_stale

    stale, live, young = (tmp_path / f"fedmole-sim-{n}" for n in ("stale", "live", "young"))
    for d in (stale, live, young):
        d.mkdir()
    (stale / OWNER).touch()
    (live / OWNER).touch()
    fd = os.open(live / OWNER, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a running simulation holds its lock
    try:
        assert remove_stale(tmp_path) == [stale]
    finally:
        os.close(fd)
    assert live.exists() and young.exists()  # young: no owner file yet, may be starting


SIM = ["federation.num_clients=2", "data.max_examples=200", "partition.min_size=10", "train.local_steps=1",
       "eval.max_examples=2", "federation.rounds=50", "train.num_threads=1"]


@pytest.mark.slow
def test_a_killed_flower_simulation_leaves_no_process_and_no_temporary_directory(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="fm-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    try:
        _kill_simulation(tmp_path / "run", short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _kill_simulation(run_dir: Path, tmp: Path) -> None:
    import psutil

    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "fedmole.cli", "run", str(SMOKE), "--engine", "flower-sim",
                             "--progress", "none", "--out", str(run_dir), *sum((["--set", o] for o in SIM), [])],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    seen: dict[int, float] = {}
    try:
        deadline = time.time() + 900  # Ray starts slowly on a busy machine
        while latest_checkpoint(run_dir) is None:  # the simulation is running rounds
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline
            for p in me.children(recursive=True):
                seen.setdefault(p.pid, p.create_time())
            time.sleep(0.2)
        for p in me.children(recursive=True):
            seen.setdefault(p.pid, p.create_time())
        assert len(seen) >= 3 and list(tmp.glob("fedmole-sim-*"))
    finally:
        proc.send_signal(signal.SIGKILL)  # also when the test failed: the watchdog cleans up after it
        proc.wait()

    def survivors() -> list[int]:
        alive = []
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive

    end = time.time() + 30
    while (survivors() or list(tmp.glob("fedmole-sim-*"))) and time.time() < end:
        time.sleep(0.5)
    assert survivors() == [] and list(tmp.glob("fedmole-sim-*")) == []


# ================================================================================= the reliability figure
def hostile_cases() -> dict[str, int]:
    """Every hand-written bad input of this module, by kind (each one must be rejected)."""
    return {
        "hostile training replies": len(REPLY_ATTACKS) * len(METHODS) + len(FLAME_ATTACKS) + len(FEDAMOLE_ATTACKS),
        "hostile evaluation replies": len(EVAL_ATTACKS) + len(DEFERRED_ATTACKS),
        "malformed Flower replies": len(WIRE_ATTACKS),
        "careless command lines and files": len(CARELESS) + 1 + len(EXPORT_CASES),
        "a run directory in use": 2,
        "damaged checkpoints, an edited config.yaml, torn JSONL lines": len(RESUME_DAMAGE) + 2 + len(TORN),
    }


def random_cases() -> dict[str, int]:
    """The property-based examples of this module (each valid and harmless, or rejected)."""
    return {"configs": RANDOM_CONFIGS * 2 + RANDOM_ALGORITHM_SECTIONS, "config files": RANDOM_FILES,
            "replies": RANDOM_REPLIES * 2}


def reliability_figure() -> str:
    cases, random = hostile_cases(), random_cases()
    total = sum(cases.values())
    return (f"**{total} bad inputs tried, {total} rejected with a clear error, 0 tracebacks, 0 data lost** "
            f"({'; '.join(f'{k}: {v}' for k, v in cases.items())}), and {sum(random.values())} random ones "
            f"(property-based; {', '.join(f'{k}: {v}' for k, v in random.items())}), each accepted as valid "
            f"or rejected with a clear error, 0 tracebacks.")


def test_docs_give_the_figure_of_this_module():
    assert reliability_figure() in (ROOT / "docs" / "reliability.md").read_text(), reliability_figure()
