"""Evaluation of one model on one client's split.

- loss: mean per-token cross-entropy over response tokens (+EOS), token-weighted over the split; a
  classification example's is its gold choice's, taken from the choice scoring below (the same sequence);
- accuracy (classification examples): each candidate verbaliser + EOS is scored by its mean per-token CE
  and the lowest wins (not the sum, not the first-token logit); the prompt runs once per example and its
  key/value cache serves every choice;
- ROUGE-L F (generation examples): decoding with `eval.generation` (greedy by default), prompt stripped,
  special tokens skipped, scored with `rouge-score`'s ROUGE-L F against the reference response;
- score: the mean over examples of the per-example result (1/0 for classification, ROUGE-L F for
  generation), x100. With `eval.metric: accuracy` or `rouge_l` only that kind contributes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from fedmole.client.train import takes_logits_to_keep, response_logits, to_device
from fedmole.config import EvalConfig
from fedmole.data.schema import Example
from fedmole.data.tokenize import collate, encode_candidates, encode_prompt, encode_train, prompt_ids, target_ids


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F in [0, 1]; an empty prediction scores 0."""
    if not prediction.strip():
        return 0.0
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


@torch.no_grad()
def sequence_ce(model, features: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of token CE over labelled positions, number of labelled positions)."""
    logits, target = response_logits(model, to_device(collate(features, pad_id), device))
    mask = target != -100
    ce = F.cross_entropy(logits.float().transpose(1, 2), target.clamp(min=0), reduction="none") * mask
    return ce.sum(-1).cpu(), mask.sum(-1).cpu()


@torch.no_grad()
def candidate_ce(
    model, prompts: list[list[int]], choices: list[list[list[int]]], pad_id: int, device
) -> list[tuple[list[float], list[int]]]:
    """Per example, (sum of token CE of each choice, number of tokens of each choice) after its prompt.

    The prompt is run once per example and its key/value cache shared by the example's choices, which then
    cost only their own few tokens: the same numbers as scoring every prompt + choice sequence in full
    (`sequence_ce` on `encode_candidates`), for about 1/len(choices) of the compute. The prompt's last logits
    score every choice's first token; the choices of each length run together on a copy of the cache, without
    padding and without their last token (EOS is predicted, never fed), so only real choice tokens cost."""
    batch = to_device(collate([{"input_ids": p} for p in prompts], pad_id), device)
    keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    out = model(**batch, use_cache=True, **keep)
    first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): predicts each choice's first token
    lengths = batch["attention_mask"].sum(-1)  # (B,)
    flat = [(i, c) for i, cs in enumerate(choices) for c in cs]
    ce = [0.0] * len(flat)
    by_length: dict[int, list[int]] = {}
    for j, (_, c) in enumerate(flat):
        by_length.setdefault(len(c), []).append(j)
    for width, js in sorted(by_length.items()):
        rows = torch.tensor([flat[j][0] for j in js], device=device)
        ids = torch.tensor([flat[j][1] for j in js], device=device)  # (R, width), no padding
        total = -first[rows, ids[:, 0]]  # (R,)
        if width > 1:
            logits = model(
                input_ids=ids[:, :-1], attention_mask=torch.cat([batch["attention_mask"][rows],
                                                                 torch.ones_like(ids[:, :-1])], dim=1),
                position_ids=lengths[rows, None] + torch.arange(width - 1, device=device),
                past_key_values=_select_rows(out.past_key_values, rows), use_cache=True,
            ).logits.float()  # (R, width - 1, V): position t predicts ids[:, t + 1]
            total = total + F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(-1)
        for j, v in zip(js, total.cpu().tolist()):
            ce[j] = v
    out_lists, at = [], 0
    for cs in choices:
        out_lists.append((ce[at : at + len(cs)], [len(c) for c in cs]))
        at += len(cs)
    return out_lists


def _select_rows(cache, rows: torch.Tensor):
    """A cache holding `rows` of `cache`'s batch, leaving `cache` itself untouched (the layers' tensors are
    replaced, never written into, by selection and by the forward that extends them)."""
    if not hasattr(cache, "layers"):
        cache = copy.deepcopy(cache)
    else:
        cache = copy.copy(cache)
        cache.layers = [copy.copy(layer) for layer in cache.layers]
    cache.batch_select_indices(rows)
    return cache


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _token_batches(shared: list[tuple], size: int, max_tokens: int):
    """Chunks of at most `size` (index, prompt, choice targets) items whose choices, padded to the longest,
    hold at most `max_tokens` tokens (always at least one item)."""
    chunk: list[tuple] = []
    for item in shared:
        grown = chunk + [item]
        rows = sum(len(t) for _, _, t in grown)
        width = max(len(c) for _, _, t in grown for c in t)
        if chunk and (len(grown) > size or rows * width > max_tokens):
            yield chunk
            grown = [item]
        chunk = grown
    if chunk:
        yield chunk


@dataclass
class ChoiceScores:
    """One classification example's choices: summed token cross-entropy and token count of each (choice +
    EOS after the prompt), and whether the gold choice's sequence is exactly the example's training sequence
    (nothing truncated), so that its cross-entropy is the example's evaluation loss."""

    ce: list[float]
    tokens: list[int]
    gold_is_train: bool

    @property
    def best(self) -> int:
        """The choice with the lowest mean per-token cross-entropy."""
        means = [c / max(n, 1) for c, n in zip(self.ce, self.tokens)]
        return means.index(min(means))


def score_choices(
    model, tokenizer, examples: list[Example], template: str, system: str | None, max_length: int, batch_size: int,
    device,
) -> list[ChoiceScores | None]:
    """`ChoiceScores` of each classification example, None when its prompt alone fills `max_length`.

    An example whose every prompt + choice fits in `max_length` runs its prompt once and scores the choices
    on the shared key/value cache (`candidate_ce`), up to `batch_size` prompts at a time and no more choice
    tokens than a batch of full-length sequences; one that does not is scored in full on `encode_candidates`
    (which cuts such sequences from the left), `batch_size` sequences at a time."""
    pad_id = tokenizer.pad_token_id
    out: list[ChoiceScores | None] = [None] * len(examples)
    shared, full = [], []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"example {ex.uid or ex.instruction[:40]!r} has no choices to score")
        prompt = prompt_ids(ex, tokenizer, template, system)
        if len(prompt) >= max_length:
            continue
        targets = [target_ids(c, tokenizer) for c in ex.choices]
        if len(prompt) + max(map(len, targets)) <= max_length:
            shared.append((i, prompt, targets))
        else:
            full.append((i, encode_candidates(ex, tokenizer, template, max_length, system)))
    for chunk in _token_batches(shared, batch_size, batch_size * max_length):
        results = candidate_ce(model, [p for _, p, _ in chunk], [t for _, _, t in chunk], pad_id, device)
        for (i, _, _), (ce, n) in zip(chunk, results):
            ex = examples[i]
            out[i] = ChoiceScores(ce, n, ex.response == ex.choices[ex.label])
    for i, feats in full:
        ce, n = [], []
        for part in _batches(feats, max(batch_size, 1)):
            s, k = sequence_ce(model, part, pad_id, device)
            ce, n = ce + s.tolist(), n + k.tolist()
        out[i] = ChoiceScores(ce, n, False)
    return out


def evaluate_examples(
    model, tokenizer, examples: list[Example], data_cfg, max_length: int, cfg: EvalConfig, device
) -> dict[str, float]:
    """Metrics of `model` on `examples` (see module docstring); keys: loss, score, accuracy, rouge_l, n."""
    return evaluate_splits(model, tokenizer, {"": examples}, data_cfg, max_length, cfg, device)[""]


@torch.no_grad()
def evaluate_splits(
    model, tokenizer, splits: dict[str, list[Example]], data_cfg, max_length: int, cfg: EvalConfig, device,
    outcomes: dict[str, list[dict]] | None = None,
) -> dict[str, dict[str, float]]:
    """`evaluate_examples` of each split, computed together: the splits' examples share batches of up to
    `eval.batch_size` (on a CPU a decoding step of 10 sequences costs about as much as one of 5, since it is
    bound by reading the weights), and each split's metrics are its own examples' alone.

    `outcomes`: for each split named as a key, the list is filled with one record per scored example (see
    `outcome`), so that methods can be compared example by example."""
    model.eval()
    pad_id = tokenizer.pad_token_id
    template, system = data_cfg.prompt, data_cfg.system_prompt
    examples = [ex for exs in splits.values() for ex in exs]
    scoring = cfg.metric in ("auto", "accuracy")
    cls = [i for i, ex in enumerate(examples) if ex.is_classification and scoring]
    gen = [] if cfg.metric in ("accuracy", "loss") else [
        i for i, ex in enumerate(examples) if not ex.is_classification or cfg.metric == "rouge_l"]

    # choices first: a classification example's loss is its gold choice's cross-entropy, already computed
    scores = score_choices(model, tokenizer, [examples[i] for i in cls], template, system, max_length,
                           cfg.batch_size, device)
    ce: dict[int, tuple[float, int]] = {}  # example -> (CE sum, tokens) of its training sequence
    correct: dict[int, float] = {}  # classification example -> 1/0
    rouge: dict[int, float] = {}  # generation example -> ROUGE-L F
    choice: dict[int, ChoiceScores] = {}
    for i, sc in zip(cls, scores):
        if sc is None:  # the prompt fills max_length: dropped, as in training
            continue
        choice[i] = sc
        correct[i] = float(sc.best == examples[i].label)
        if sc.gold_is_train:
            ce[i] = (sc.ce[examples[i].label], sc.tokens[examples[i].label])
    encoded = [(i, e) for i, ex in enumerate(examples)
               if i not in ce and (e := encode_train(ex, tokenizer, template, max_length, system)) is not None]
    for chunk in _batches(encoded, cfg.batch_size):
        s, n = sequence_ce(model, [e for _, e in chunk], pad_id, device)
        ce.update({i: (a, b) for (i, _), a, b in zip(chunk, s.tolist(), n.tolist())})
    predictions: dict[int, str] = {}
    if gen:
        predictions = dict(zip(gen, generate(model, tokenizer, [examples[i] for i in gen], data_cfg, max_length,
                                             cfg, device)))
        rouge.update({i: rouge_l(p, examples[i].response) for i, p in predictions.items()})

    out, start = {}, 0
    for name, exs in splits.items():
        idx = range(start, start + len(exs))
        start += len(exs)
        if outcomes is not None and name in outcomes:
            outcomes[name].extend(outcome(examples[i], choice.get(i), predictions.get(i), rouge.get(i))
                                  for i in idx if i in correct or i in rouge)
        total = [ce[i] for i in idx if i in ce]
        metrics = {"loss": sum(c for c, _ in total) / max(sum(t for _, t in total), 1), "n": float(len(exs))}
        out[name] = metrics
        if cfg.metric == "loss" or not exs:
            continue
        acc = [correct[i] for i in idx if i in correct]
        rl = [rouge[i] for i in idx if i in rouge]
        if acc:
            metrics["accuracy"] = 100.0 * sum(acc) / len(acc)
        if rl:
            metrics["rouge_l"] = 100.0 * sum(rl) / len(rl)
        if acc or rl:
            metrics["score"] = 100.0 * sum(acc + rl) / len(acc + rl)
    return out


def outcome(ex: Example, scores: ChoiceScores | None, prediction: str | None, rouge: float | None) -> dict:
    """One scored example: uid, gold and prediction (choice indices with each choice's mean token CE, or the
    reference and the generated text), correct (classification) or rouge_l (generation), and `value`, the
    example's share of the score (x100): a split's score is the mean of its examples' values."""
    if scores is not None:
        means = [c / max(n, 1) for c, n in zip(scores.ce, scores.tokens)]
        correct = int(scores.best == ex.label)
        return {"uid": ex.uid, "gold": ex.label, "pred": scores.best, "choice_scores": [round(m, 6) for m in means],
                "correct": correct, "rouge_l": None, "value": 100.0 * correct}
    return {"uid": ex.uid, "gold": ex.response, "pred": prediction, "choice_scores": None, "correct": None,
            "rouge_l": rouge, "value": 100.0 * rouge}


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], data_cfg, max_length: int, cfg: EvalConfig, device) -> list[str]:
    """Decoded continuations (prompt stripped) for each example, in order."""
    gen = cfg.generation
    max_prompt = max(max_length - gen.max_new_tokens, 8)
    texts: list[str] = []
    for chunk in _batches(examples, cfg.batch_size):
        feats = [
            {"input_ids": encode_prompt(ex, tokenizer, data_cfg.prompt, max_prompt, data_cfg.system_prompt)}
            for ex in chunk
        ]
        batch = collate(feats, tokenizer.pad_token_id)
        input_ids = batch["input_ids"].to(device)
        kwargs = {"do_sample": gen.do_sample, "num_beams": gen.num_beams}
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=gen.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **kwargs,
        )
        texts.extend(tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True))
    return [t.strip() for t in texts]
