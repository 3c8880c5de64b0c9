"""Evaluation: ROUGE-L, candidate scoring by mean per-token CE, padding-invariant scoring."""

import pytest
import torch
import torch.nn.functional as F

from fedmole.client.evaluate import evaluate_examples, rouge_l, sequence_ce
from fedmole.config import DataConfig, EvalConfig
from fedmole.data.schema import Example
from fedmole.data.tokenize import encode_candidates
from fedmole.models.tiny import tiny_llama


def test_rouge_l_on_known_strings():
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 1, R = 1/2, F = 2/3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("on the mat the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert rouge_l("identical text", "identical text") == pytest.approx(1.0)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("   ", "anything") == 0.0
    assert rouge_l("dog", "cat") == 0.0


def _unpadded_mean_ce(model, feature):
    ids = torch.tensor([feature["input_ids"]])
    labels = torch.tensor([feature["labels"]])
    logits = model(ids).logits[0, :-1]
    target = labels[0, 1:]
    mask = target != -100
    return F.cross_entropy(logits[mask], target[mask]).item()


def test_left_padded_scoring_equals_unpadded(tiny_tok):
    model = tiny_llama(len(tiny_tok)).eval()
    ex = Example(instruction="Which part of speech is 'run'?", response="verb",
                 choices=["noun", "verb", "adjective and more words"], label=1)
    feats = encode_candidates(ex, tiny_tok, "alpaca", 256)
    assert len({len(f["input_ids"]) for f in feats}) > 1  # the batch really needs padding
    s, n = sequence_ce(model, feats, tiny_tok.pad_token_id, torch.device("cpu"))
    for i, f in enumerate(feats):
        assert (s[i] / n[i]).item() == pytest.approx(_unpadded_mean_ce(model, f), abs=1e-4)


def test_prediction_is_lowest_mean_ce_not_lowest_sum(tiny_tok):
    """Find choice pairs where the sum and the mean of the token CE disagree; accuracy must follow the mean."""
    model = tiny_llama(len(tiny_tok)).eval()
    words = ["a", "b", "cat", "noun", "x y z w", "the great big animal", "q", "verb phrase here"]
    cfg = EvalConfig(metric="accuracy", batch_size=8)
    data_cfg = DataConfig()
    checked = 0
    for i, w1 in enumerate(words):
        for w2 in words[i + 1 :]:
            ex = Example(instruction="Pick one.", response=w1, choices=[w1, w2], label=0)
            feats = encode_candidates(ex, tiny_tok, "alpaca", 256)
            ce = [_unpadded_mean_ce(model, f) for f in feats]
            sums = [c * sum(1 for t in f["labels"][1:] if t != -100) for c, f in zip(ce, feats)]
            by_mean, by_sum = ce.index(min(ce)), sums.index(min(sums))
            if by_mean == by_sum:
                continue
            checked += 1
            for label in (0, 1):
                ex.label, ex.response = label, ex.choices[label]
                acc = evaluate_examples(model, tiny_tok, [ex], data_cfg, 256, cfg, torch.device("cpu"))["accuracy"]
                assert acc == (100.0 if label == by_mean else 0.0)
    assert checked >= 1, "no pair where sum and mean disagree; extend the word list"


def test_metrics_keys_follow_example_kinds(tiny_tok):
    model = tiny_llama(len(tiny_tok)).eval()
    cls = Example(instruction="Yes or no?", response="Yes", choices=["Yes", "No"], label=0)
    gen = Example(instruction="Define 'cat'.", response="a small domestic feline")
    cfg = EvalConfig(batch_size=4)
    cfg.generation.max_new_tokens = 4
    out = evaluate_examples(model, tiny_tok, [cls, gen], DataConfig(), 128, cfg, torch.device("cpu"))
    assert set(out) == {"loss", "n", "accuracy", "rouge_l", "score"}
    assert out["score"] == pytest.approx((out["accuracy"] + out["rouge_l"]) / 2)
    only_loss = evaluate_examples(model, tiny_tok, [cls, gen], DataConfig(), 128, EvalConfig(metric="loss"),
                                  torch.device("cpu"))
    assert set(only_loss) == {"loss", "n"} and only_loss["loss"] == pytest.approx(out["loss"])
