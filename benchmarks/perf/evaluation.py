"""Evaluation cost: choice scoring on a shared prompt cache vs full sequences, and response-only logits.

SmolLM2-135M-Instruct with LoRA r=8 on q_proj and v_proj (random non-zero B), fp32 on CPU, on real WordNet
examples. Each pair runs alternately in one process (median of the repeats):

- choice scoring of `pos` examples (4 choices each): `score_choices` (the prompt runs once, its key/value
  cache serves the choices) vs scoring every prompt + choice sequence in full, 8 sequences per pass (what
  evaluation did before);
- choice scoring of the word-level choice tasks (`synonym_choice`, `hypernym_choice`: four multi-token words):
  `score_choices` (each choice length runs unpadded on its own copy of the prompt cache, EOS predicted but not
  fed) vs the earlier shared-cache scorer (every choice right-padded to the longest, EOS fed; kept below as
  `padded_choice_ce`);
- the evaluation loss pass over `definition` examples: `sequence_ce` (vocabulary projection only where a
  response token is predicted) vs the same cross-entropy from the full logits.

The largest difference between the two ways' numbers is printed with the times.

    python -m benchmarks.perf.evaluation [--examples 16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved, median, record
from fedmole.adapters import LoRALinear, inject
from fedmole.client.evaluate import score_choices, sequence_ce
from fedmole.client.train import to_device
from fedmole.config import ModelConfig
from fedmole.data.tokenize import collate, encode_candidates, encode_train, prompt_ids, target_ids
from fedmole.data.wordnet import load_wordnet
from fedmole.models import load_model, load_tokenizer

BATCH, MAX_LENGTH, TEMPLATE = 8, 128, "chat"


@torch.no_grad()
def padded_choice_ce(model, prompts, choices, pad_id, device):
    """The earlier shared-cache scorer (reference): all choices of a batch right-padded to the longest and fed
    whole, EOS included, on one selection of the prompt cache. Returns each example's mean CE per choice."""
    batch = to_device(collate([{"input_ids": p} for p in prompts], pad_id), device)
    out = model(**batch, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float()
    rows = torch.tensor([i for i, cs in enumerate(choices) for _ in cs])
    flat = [c for cs in choices for c in cs]
    width = max(len(c) for c in flat)
    ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in flat])
    real = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in flat])
    cache = out.past_key_values
    cache.batch_select_indices(rows)
    lengths = batch["attention_mask"].sum(-1)[rows]
    logits = model(input_ids=ids, attention_mask=torch.cat([batch["attention_mask"][rows], real], dim=1),
                   position_ids=lengths[:, None] + torch.arange(width), past_key_values=cache,
                   use_cache=True).logits.float()
    logits = torch.cat([first[rows, None], logits[:, :-1]], dim=1)
    ce = (F.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * real).sum(-1) / real.sum(-1)
    out_lists, at = [], 0
    for cs in choices:
        out_lists.append(ce[at : at + len(cs)].tolist())
        at += len(cs)
    return out_lists


@torch.no_grad()
def full_sequence_ce(model, features, pad_id, device):
    """(CE sum, labelled tokens) per sequence from the logits of every position."""
    batch = to_device(collate(features, pad_id), device)
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    ce = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none") * mask
    return ce.sum(-1), mask.sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    cfg_model = ModelConfig(name=args.model)
    tok = load_tokenizer(cfg_model)
    model = load_model(cfg_model, vocab_size=len(tok))
    adapters = inject(model, ["q_proj", "v_proj"], lambda p, lin: LoRALinear(lin, 8, 16.0))
    gen = torch.Generator().manual_seed(0)
    adapters.load({k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in adapters.state().items()})
    model.eval()
    device, pad = torch.device("cpu"), tok.pad_token_id

    examples = load_wordnet(tasks=["pos", "definition", "synonym_choice", "hypernym_choice"])
    choice = [ex for ex in examples if ex.task == "pos"][:: 997][: args.examples]
    words = [ex for ex in examples if ex.task in ("synonym_choice", "hypernym_choice")][:: 997][: 2 * args.examples]
    word_prompts = [prompt_ids(ex, tok, TEMPLATE) for ex in words]
    word_choices = [[target_ids(c, tok) for c in ex.choices] for ex in words]
    generation = [ex for ex in examples if ex.task == "definition"][:: 997][: args.examples]
    feats = [encode_candidates(ex, tok, TEMPLATE, MAX_LENGTH) for ex in choice]
    per_pass = max(1, BATCH // len(choice[0].choices))
    train_feats = [f for ex in generation if (f := encode_train(ex, tok, TEMPLATE, MAX_LENGTH))]

    def shared():
        return score_choices(model, tok, choice, TEMPLATE, None, MAX_LENGTH, BATCH, device)

    def full():
        out = []
        for i in range(0, len(feats), per_pass):
            chunk = feats[i : i + per_pass]
            s, n = full_sequence_ce(model, [f for fs in chunk for f in fs], pad, device)
            at = 0
            for fs in chunk:
                out.append((s[at : at + len(fs)] / n[at : at + len(fs)]).tolist())
                at += len(fs)
        return out

    def words_by_length():
        return score_choices(model, tok, words, TEMPLATE, None, MAX_LENGTH, 2 * BATCH, device)

    def words_padded():
        out = []
        for i in range(0, len(words), 2 * BATCH):
            out += padded_choice_ce(model, word_prompts[i : i + 2 * BATCH], word_choices[i : i + 2 * BATCH], pad,
                                    device)
        return out

    def loss_kept():
        return [sequence_ce(model, train_feats[i : i + BATCH], pad, device) for i in range(0, len(train_feats), BATCH)]

    def loss_full():
        return [full_sequence_ce(model, train_feats[i : i + BATCH], pad, device)
                for i in range(0, len(train_feats), BATCH)]

    diff_choice = max(abs(c / n - r) for sc, ref in zip(shared(), full())
                      for c, n, r in zip(sc.ce, sc.tokens, ref))
    diff_loss = max(float((a[0] - b[0]).abs().max()) for a, b in zip(loss_kept(), loss_full()))
    diff_words = max(abs(c / n - r) for sc, ref in zip(words_by_length(), words_padded())
                     for c, n, r in zip(sc.ce, sc.tokens, ref))
    times = interleaved({"shared": shared, "full": full, "loss_kept": loss_kept, "loss_full": loss_full,
                         "words_by_length": words_by_length, "words_padded": words_padded}, args.repeats)
    t = {k: median(v) for k, v in times.items()}
    n_choice, n_loss = len(choice), len(train_feats)
    print(f"choice scoring ({n_choice} pos examples, 4 choices): shared prompt {t['shared'] / n_choice:.3f} s vs "
          f"full sequences {t['full'] / n_choice:.3f} s per example: {t['full'] / t['shared']:.2f}x faster "
          f"(max |mean CE difference| {diff_choice:.1e})")
    n_words = len(words)
    print(f"word choices ({n_words} synonym/hypernym examples, 4 words): by length {t['words_by_length'] / n_words:.3f}"
          f" s vs padded {t['words_padded'] / n_words:.3f} s per example: "
          f"{t['words_padded'] / t['words_by_length']:.2f}x faster (max |mean CE difference| {diff_words:.1e})")
    print(f"loss pass ({n_loss} definition examples): response logits {t['loss_kept'] / n_loss:.3f} s vs full "
          f"logits {t['loss_full'] / n_loss:.3f} s per example: {t['loss_full'] / t['loss_kept']:.2f}x faster "
          f"(max |CE sum difference| {diff_loss:.1e})")
    path = record("evaluation", {
        "model": args.model, "lora": "r=8 alpha=16 on q_proj, v_proj", "template": TEMPLATE,
        "batch_sequences": BATCH, "repeats": args.repeats,
        "choice_scoring": {"examples": n_choice, "seconds_per_example": {"shared": t["shared"] / n_choice,
                                                                         "full": t["full"] / n_choice},
                           "speedup": t["full"] / t["shared"], "max_abs_mean_ce_difference": diff_choice},
        "word_choices": {"examples": n_words, "seconds_per_example": {"by_length": t["words_by_length"] / n_words,
                                                                      "padded": t["words_padded"] / n_words},
                         "speedup": t["words_padded"] / t["words_by_length"], "max_abs_mean_ce_difference": diff_words},
        "loss_pass": {"examples": n_loss, "seconds_per_example": {"response_logits": t["loss_kept"] / n_loss,
                                                                  "full_logits": t["loss_full"] / n_loss},
                      "speedup": t["loss_full"] / t["loss_kept"], "max_abs_ce_sum_difference": diff_loss},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
