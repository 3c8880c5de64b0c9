"""Server-side checks of client replies, before anything is counted or aggregated.

Every field of a reply is checked against what the server asked that client for. A strategy declares it
(`Strategy.reply_rules(cid, payload)` -> `ReplyRules`):

- `tensors`: name -> (shape, dtype) of every tensor the client may upload (by default exactly those it was
  sent, so a tensor of an expert not assigned to it is rejected); `required`: the names it must upload;
  `together`: groups of names uploaded all together or not at all (FedAMoLE's embeddings);
  `ranges`: the allowed values of some tensors (FLAME's log rescaler); `statistics`: names that are
  statistics rather than model parameters (left out of the update-norm bound);
- `extra`: the method's JSON fields (FLAME's activation counts, tokens, steps, k; HetLoRA's pruned rank),
  each a `Check` (`Integer`, `Equal`, `ListOf`, `MapOf`, `Optional`), plus `relations` between them;
- `evals`: whether evaluation results may be attached.

Common to every reply (`Limits`): a dense, finite tensor of the expected shape and dtype whose values stay
within `replies.max_value`, a total size within `replies.max_mb`, a sample count that is an integer between 1
and what the client was asked to train on (its train split), metrics that are named finite numbers, and
evaluation results of the form `{"model", "split": val|test, "metrics": {name: finite number}}`, a test result
optionally with its per-example outcomes (`examples`, at most the client's test split, each of the form
`client/evaluate.py` `outcome` writes) and, in the deferred test (`eval.test: selected`), the `round` of the
snapshot it tested, one the server asked for.

A rejected reply is logged with its reason, recorded in metrics.jsonl (`client_rejected`, with `reason`)
and never touches the global state. `bound_update` optionally scales an accepted update down to
`replies.max_update_norm`.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fedmole.comm import SENDABLE

if TYPE_CHECKING:
    from fedmole.messages import Reply

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]

MAX_METRICS = 256  # metric names a reply may carry (per reply and per evaluation)
MAX_EVALS = 64  # evaluation results a reply may carry
EVAL_KEYS = frozenset({"model", "split", "metrics"})  # every evaluation result; optionally `examples`, `round`
OUTCOME_KEYS = frozenset({"uid", "gold", "pred", "choice_scores", "correct", "rouge_l", "value"})
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # metric names and model labels
SPLITS = ("val", "test")
# metrics whose range is known: evaluation scores are percentages, losses and counts are not negative
METRIC_RANGES = {"accuracy": (0.0, 100.0), "rouge_l": (0.0, 100.0), "score": (0.0, 100.0), "loss": (0.0, math.inf),
                 "n": (0.0, math.inf), "steps": (0.0, math.inf), "tokens": (0.0, math.inf)}


def spec_of(tensors: dict[str, torch.Tensor]) -> Spec:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _few(names: list[str]) -> str:
    more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
    return ", ".join(_show(n, 120) for n in names[:3]) + more


# ------------------------------------------------------------------------------------------- checks
class Check(ABC):
    """A declared constraint on one JSON value; `problem` says what is wrong with `value` (None: fine)."""

    @abstractmethod
    def problem(self, value) -> str | None:
        """What is wrong with `value`, or None when it is fine."""


@dataclass(frozen=True)
class Integer(Check):
    lo: int
    hi: int

    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {_show(value)}"
        if not self.lo <= value <= self.hi:
            return f"must be in {self.lo}..{self.hi}, got {value}"
        return None


@dataclass(frozen=True)
class Equal(Check):
    value: object

    def problem(self, value):
        if type(value) is not type(self.value) or value != self.value:
            return f"must be {self.value!r} (what the server sent), got {_show(value)}"
        return None


@dataclass(frozen=True)
class ListOf(Check):
    item: Check
    length: int

    def problem(self, value):
        if not isinstance(value, list) or len(value) != self.length:
            return f"must be a list of {self.length} values, got {_show(value)}"
        for i, v in enumerate(value):
            if (why := self.item.problem(v)) is not None:
                return f"[{i}] {why}"
        return None


@dataclass(frozen=True)
class MapOf(Check):
    keys: frozenset[str]
    value: Check

    def problem(self, value):
        if not isinstance(value, dict):
            return f"must be a mapping, got {_show(value)}"
        if set(value) != self.keys:
            missing, unknown = sorted(self.keys - set(value)), sorted(set(value) - self.keys, key=str)
            return f"keys differ from the expected ones (missing {_show(missing)}, unexpected {_show(unknown)})"
        for k, v in value.items():
            if (why := self.value.problem(v)) is not None:
                return f"[{k!r}] {why}"
        return None


@dataclass(frozen=True)
class Optional(Check):
    """A field the client may leave out; when present it must pass `check`."""

    check: Check

    def problem(self, value):
        return self.check.problem(value)


# -------------------------------------------------------------------------------------------- rules
@dataclass
class ReplyRules:
    """What the server accepts from one client in answer to one payload (see the module docstring)."""

    tensors: Spec
    required: frozenset[str] | None = None  # None: every name in `tensors`
    together: tuple[frozenset[str], ...] = ()
    statistics: frozenset[str] = frozenset()
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    extra: dict[str, Check] = field(default_factory=dict)
    relations: tuple[Callable[[dict], str | None], ...] = ()  # checks across `extra` fields, after each passed
    evals: bool = False
    eval_rounds: dict[str, list[int]] | None = None  # deferred test: the snapshot rounds asked for, per label

    def must_send(self) -> frozenset[str]:
        return frozenset(self.tensors) if self.required is None else self.required


@dataclass(frozen=True)
class Limits:
    """The bounds every reply is held to: `replies.max_mb`, `replies.max_value` and the client's sample count."""

    max_mb: float
    max_value: float = math.inf
    max_examples: int | None = None  # the client's train split; None: no upper bound known
    max_outcomes: int | None = None  # the client's test split: per-example outcomes of one test result


# ------------------------------------------------------------------------------------------ replies
def wire_problem(reply) -> str | None:
    """Whether the reply's tensors are a mapping of names to dense tensors the server can measure and cast;
    the traffic accounting only looks at replies without a problem here (the others are rejected)."""
    tensors = getattr(reply, "tensors", None)
    if not isinstance(tensors, dict):
        return f"tensors must be a mapping of names to tensors, got {type(tensors).__name__}"
    for k, t in tensors.items():
        if not isinstance(k, str):
            return f"tensor name {_show(k)} is not a string"
        name = _show(k, 120)
        if not isinstance(t, torch.Tensor):
            return f"{name}: not a tensor ({type(t).__name__})"
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            return f"{name}: a {t.layout} tensor; only dense tensors are accepted"
        if t.device.type == "meta":
            return f"{name}: a meta tensor (it holds no values)"
        if t.dtype not in SENDABLE:
            return f"{name}: dtype {t.dtype} cannot be sent"
    return None


def check_reply(reply: "Reply", rules: ReplyRules, limits: Limits) -> str | None:
    """None if a reply to a training payload is acceptable, else the reason it is rejected."""
    for check in (_check_count, _check_tensors, _check_metrics, _check_evals, _check_extra):
        why = check(reply, rules, limits)
        if why is not None:
            return why
    return None


def check_evaluation(reply: "Reply", limits: Limits, rounds: dict[str, list[int]] | None = None) -> str | None:
    """None if a reply to a global evaluation is acceptable: evaluation results only (its sample count is
    not used). `rounds`: the snapshots a deferred test asked for (model label -> rounds); each result then
    names the round of one of them."""
    rules = ReplyRules({}, evals=True, eval_rounds=rounds)
    for check in (_check_tensors, _check_metrics, _check_evals, _check_extra):
        why = check(reply, rules, limits)
        if why is not None:
            return why
    return None


def _check_count(reply, rules, limits) -> str | None:
    n = reply.num_examples
    hi = limits.max_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"sample count must be a positive integer, got {_show(n)}"
    if hi is not None and n > hi:
        return f"sample count {n} exceeds the {hi} training examples this client holds"
    return None


def _check_tensors(reply, rules, limits) -> str | None:
    why = wire_problem(reply)
    if why is not None:
        return why
    spec, sent = rules.tensors, set(reply.tensors)
    unknown = sorted(k for k in sent if k not in spec)
    if unknown:
        return f"unexpected tensors (unknown names or experts not assigned to this client): {_few(unknown)}"
    missing = sorted(rules.must_send() - sent)
    if missing:
        return f"missing tensors it must send: {_few(missing)}"
    for group in rules.together:
        part = group & sent
        if part and part != group:
            return f"incomplete group: sent {len(part)} of {len(group)} tensors that go together, e.g. missing " \
                   f"{sorted(group - part)[0]}"
    size = 0
    for k, t in reply.tensors.items():
        shape, dtype = spec[k]
        if tuple(t.shape) != shape:
            return f"{k}: shape {tuple(t.shape)}, expected {shape}"
        if t.dtype != dtype:
            return f"{k}: dtype {t.dtype}, expected {dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{k}: contains NaN or infinite values"
        lo, hi = rules.ranges.get(k, (-limits.max_value, limits.max_value))
        if t.numel() and (float(t.min()) < lo or float(t.max()) > hi):
            return f"{k}: values in [{float(t.min()):.4g}, {float(t.max()):.4g}], allowed [{lo:.4g}, {hi:.4g}]"
        size += t.numel() * t.element_size()
    if size > limits.max_mb * 2**20:
        return f"reply of {size / 2**20:.3g} MiB exceeds replies.max_mb={limits.max_mb}"
    return None


def _metric_problem(metrics, where: str) -> str | None:
    if not isinstance(metrics, dict):
        return f"{where} must be a mapping of names to numbers, got {type(metrics).__name__}"
    if len(metrics) > MAX_METRICS:
        return f"{where} holds {len(metrics)} entries, at most {MAX_METRICS} are accepted"
    for name, value in metrics.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            return f"{where}: name {_show(name)} is not a short word ({NAME.pattern})"
        if not is_finite_number(value):
            return f"{where}.{name} must be a finite number, got {_show(value)}"
        lo, hi = METRIC_RANGES.get(name, (-math.inf, math.inf))
        if not lo <= value <= hi:
            return f"{where}.{name}={value} is outside [{lo}, {hi}]"
    return None


def _check_metrics(reply, rules, limits) -> str | None:
    why = _metric_problem(reply.metrics, "metrics")
    groups = reply.metrics.get("dp_groups", 1) if why is None else 1
    if why is None and not (float(groups).is_integer() and 1 <= groups <= max(len(rules.tensors), 1)):
        # the DP accountant divides the noise by sqrt(groups): each group holds at least one tensor
        return f"metrics.dp_groups={groups} is not a count of 1..{max(len(rules.tensors), 1)} tensor groups"
    return why


def _check_evals(reply, rules, limits) -> str | None:
    evals = reply.evals
    if not isinstance(evals, list):
        return f"evals must be a list of evaluation results, got {type(evals).__name__}"
    if evals and not rules.evals:
        return "evaluation results the server did not ask for"
    if len(evals) > MAX_EVALS:
        return f"{len(evals)} evaluation results, at most {MAX_EVALS} are accepted"
    for i, e in enumerate(evals):
        if not isinstance(e, dict) or not EVAL_KEYS <= set(e) or set(e) - EVAL_KEYS - {"examples", "round"}:
            return f"evals[{i}] must be a mapping with exactly model, split and metrics (a test result may add " \
                   f"examples, a deferred test's its round), got {_show(e)}"
        if not isinstance(e["model"], str) or not NAME.fullmatch(e["model"]):
            return f"evals[{i}].model {_show(e['model'])} is not a model label"
        if e["split"] not in SPLITS:
            return f"evals[{i}].split must be one of {', '.join(SPLITS)}, got {_show(e['split'])}"
        why = (_metric_problem(e["metrics"], f"evals[{i}].metrics") or _round_problem(e, rules.eval_rounds, i)
               or _examples_problem(e, limits, i))
        if why is not None:
            return why
    return None


def _round_problem(e: dict, asked: dict[str, list[int]] | None, i: int) -> str | None:
    """A deferred test's result names the round of a snapshot the server asked for; no other result has one."""
    if asked is None:
        return f"evals[{i}].round: only results of a deferred test carry a round" if "round" in e else None
    rnd, allowed = e.get("round"), asked.get(e["model"], [])
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd not in allowed:
        return f"evals[{i}].round must be one of the rounds asked for model {e['model']!r} ({allowed}), " \
               f"got {_show(rnd)}"
    return None


def _examples_problem(e: dict, limits: Limits, i: int) -> str | None:
    """Per-example outcomes of a test result (written to outcomes.jsonl): a list of at most the client's test
    split, each with exactly the fields of `client/evaluate.py` `outcome`, of their types."""
    if "examples" not in e:
        return None
    examples, hi = e["examples"], limits.max_outcomes
    if e["split"] != "test":
        return f"evals[{i}].examples: only a test result carries per-example outcomes"
    if not isinstance(examples, list):
        return f"evals[{i}].examples must be a list of outcomes, got {type(examples).__name__}"
    if hi is not None and len(examples) > hi:
        return f"evals[{i}].examples holds {len(examples)} outcomes, more than the {hi} test examples of this client"
    if len(examples) > e["metrics"].get("n", math.inf):
        return f"evals[{i}].examples holds {len(examples)} outcomes, more than the {e['metrics']['n']:g} examples scored"
    for j, x in enumerate(examples):
        why = _outcome_problem(x)
        if why is not None:
            return f"evals[{i}].examples[{j}] {why}"
    return None


def _outcome_problem(x) -> str | None:
    if not isinstance(x, dict) or set(x) != OUTCOME_KEYS:
        return f"must be a mapping with exactly {', '.join(sorted(OUTCOME_KEYS))}, got {_show(x)}"
    scores = x["choice_scores"]
    checks = {
        "uid": isinstance(x["uid"], str),
        "gold": isinstance(x["gold"], str) or _is_index(x["gold"]),
        "pred": x["pred"] is None or isinstance(x["pred"], str) or _is_index(x["pred"]),
        "choice_scores": scores is None or (isinstance(scores, list) and all(is_finite_number(v) for v in scores)),
        "correct": x["correct"] is None or (_is_index(x["correct"]) and x["correct"] <= 1),
        "rouge_l": x["rouge_l"] is None or (is_finite_number(x["rouge_l"]) and 0.0 <= x["rouge_l"] <= 1.0),
        "value": is_finite_number(x["value"]) and 0.0 <= x["value"] <= 100.0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"has a malformed {bad[0]}: {_show(x[bad[0]])}" if bad else None


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_extra(reply, rules, limits) -> str | None:
    extra = reply.extra
    if not isinstance(extra, dict):
        return f"extra must be a mapping, got {type(extra).__name__}"
    unknown = sorted((k for k in extra if k not in rules.extra), key=str)
    if unknown:
        return f"unexpected extra fields {_show(unknown)}; this method accepts {sorted(rules.extra) or 'none'}"
    for name, check in rules.extra.items():
        if name not in extra:
            if isinstance(check, Optional):
                continue
            return f"extra.{name} is missing"
        why = check.problem(extra[name])
        if why is not None:
            return f"extra.{name} {why}"
    for relation in rules.relations:
        why = relation(extra)
        if why is not None:
            return why
    return None


# ----------------------------------------------------------------------------------- norm bounding
def update_norm(reply_tensors: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], statistics) -> float:
    """L2 norm of the update: each uploaded model tensor minus what the client was sent under its name
    (zero for a tensor it was not sent, e.g. FLoRA's fresh LoRA); statistics are left out."""
    total = 0.0
    for k, t in reply_tensors.items():
        if k in statistics or not t.is_floating_point():
            continue
        ref = sent.get(k)
        d = t.double() if ref is None or ref.shape != t.shape else t.double() - ref.double()
        total += float(d.pow(2).sum())
    return math.sqrt(total)


def bound_update(reply_tensors, sent, statistics, max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """(tensors, norm before bounding): the update scaled down to L2 norm `max_norm` when it is larger."""
    norm = update_norm(reply_tensors, sent, statistics)
    if norm <= max_norm:
        return reply_tensors, norm
    scale = max_norm / norm
    out = {}
    for k, t in reply_tensors.items():
        if k in statistics or not t.is_floating_point():
            out[k] = t
            continue
        ref = sent.get(k)
        ref = torch.zeros_like(t, dtype=torch.float64) if ref is None or ref.shape != t.shape else ref.double()
        out[k] = (ref + (t.double() - ref) * scale).to(t.dtype)
    return out, norm
