"""Evaluation of one model on one client's split.

- loss: mean per-token cross-entropy over response tokens (+EOS), token-weighted over the split;
- accuracy (classification examples): each candidate verbaliser + EOS is scored by its mean per-token CE
  and the lowest wins (not the sum, not the first-token logit);
- ROUGE-L F (generation examples): decoding with `eval.generation` (greedy by default), prompt stripped,
  special tokens skipped, scored with `rouge-score`'s ROUGE-L F against the reference response;
- score: the mean over examples of the per-example result (1/0 for classification, ROUGE-L F for
  generation), x100. With `eval.metric: accuracy` or `rouge_l` only that kind contributes.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from fedmole.client.train import to_device
from fedmole.config import EvalConfig
from fedmole.data.schema import Example
from fedmole.data.tokenize import collate, encode_candidates, encode_prompt, encode_train


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
    batch = to_device(collate(features, pad_id), device)
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()  # position t predicts token t+1
    target = labels[:, 1:]
    mask = target != -100
    ce = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none") * mask
    return ce.sum(-1).cpu(), mask.sum(-1).cpu()


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def evaluate_examples(
    model, tokenizer, examples: list[Example], data_cfg, max_length: int, cfg: EvalConfig, device
) -> dict[str, float]:
    """Metrics of `model` on `examples` (see module docstring); keys: loss, score, accuracy, rouge_l, n."""
    model.eval()
    pad_id = tokenizer.pad_token_id
    template, system = data_cfg.prompt, data_cfg.system_prompt

    encoded = [e for ex in examples if (e := encode_train(ex, tokenizer, template, max_length, system)) is not None]
    ce_sum, tok_sum = 0.0, 0
    for chunk in _batches(encoded, cfg.batch_size):
        s, n = sequence_ce(model, chunk, pad_id, device)
        ce_sum, tok_sum = ce_sum + float(s.sum()), tok_sum + int(n.sum())
    out: dict[str, float] = {"loss": ce_sum / max(tok_sum, 1), "n": float(len(examples))}
    if cfg.metric == "loss" or not examples:
        return out

    per_example: list[float] = []
    classification = [ex for ex in examples if ex.is_classification and cfg.metric != "rouge_l"]
    generation = [ex for ex in examples if not ex.is_classification or cfg.metric == "rouge_l"]
    if cfg.metric == "accuracy":
        generation = []

    correct = []
    # examples whose prompt fills max_length have no candidates; they are dropped, as in training
    scorable = [(ex, c) for ex in classification if (c := encode_candidates(ex, tokenizer, template, max_length, system))]
    per_batch = max(1, cfg.batch_size // max(len(scorable[0][1]), 1)) if scorable else 1
    for chunk in _batches(scorable, per_batch):
        feats = [f for _, cands in chunk for f in cands]
        s, n = sequence_ce(model, feats, pad_id, device)
        mean_ce = (s / n.clamp(min=1)).tolist()
        start = 0
        for ex, cands in chunk:
            scores = mean_ce[start : start + len(cands)]
            start += len(cands)
            correct.append(float(scores.index(min(scores)) == ex.label))
    if correct:
        out["accuracy"] = 100.0 * sum(correct) / len(correct)
        per_example.extend(correct)

    if generation:
        predictions = generate(model, tokenizer, generation, data_cfg, max_length, cfg, device)
        rouge = [rouge_l(p, ex.response) for p, ex in zip(predictions, generation)]
        out["rouge_l"] = 100.0 * sum(rouge) / len(rouge)
        per_example.extend(rouge)

    if per_example:
        out["score"] = 100.0 * sum(per_example) / len(per_example)
    return out


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
