"""Evaluation: ROUGE-L, candidate scoring by mean per-token CE, padding-invariant scoring, choice scoring on a
shared prompt cache, and the response-only logits of the training and evaluation losses."""

import pytest
import torch
import torch.nn.functional as F

from fedmole.algorithms import get_algorithm
from fedmole.client.evaluate import evaluate_examples, evaluate_splits, rouge_l, score_choices, sequence_ce
from fedmole.client.train import causal_lm_loss, response_logits, to_device
from fedmole.config import DataConfig, EvalConfig
from fedmole.config_io import validate_config
from fedmole.data.schema import Example
from fedmole.data.tokenize import collate, encode_candidates, encode_train
from fedmole.models.tiny import tiny_llama, tiny_olmoe


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


# ------------------------------------------------------------- shared-prompt choice scoring, response logits
def _adapted(tok, name, model=tiny_llama, **alg):
    """A tiny model with `name`'s adapters holding random (non-zero) tensors, in eval mode."""
    cfg = validate_config({"algorithm": {"name": name, "rank": 4, "alpha": 8, **alg}, "federation": {"num_clients": 4},
                           "partition": {"splits": {"aux": 0.05}}})
    model = model(len(tok))
    adapters = get_algorithm(name).build_adapters(model, cfg)
    gen = torch.Generator().manual_seed(5)
    adapters.load({k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in adapters.state().items()})
    return model.eval()


ADAPTED = {
    "fedit": lambda tok: _adapted(tok, "fedit"),
    "fedamole": lambda tok: _adapted(tok, "fedamole", num_experts=4, expert_choices=2, min_experts=2, max_experts=4,
                                     top_k=2),
    "flame-lora": lambda tok: _adapted(tok, "flame", experts="lora", num_experts=4, top_k=2),
    "flame-olmoe": lambda tok: _adapted(tok, "flame", model=tiny_olmoe, experts="pretrained"),
}

CHOICE_EXAMPLES = [
    Example(instruction="Which part of speech is 'run' in the sense: move fast?", response="verb",
            choices=["noun", "verb", "adjective and more words", "adverb"], label=1),
    Example(instruction="Yes or no?", response="No", choices=["Yes", "No"], label=1),
    Example(instruction="Pick the colour of the sky on a clear day at noon, please.", response="blue",
            choices=["blue", "green as grass", "red"], label=0),
]


def _token_counter(model):
    """Count the tokens the model's forward passes see (input_ids elements)."""
    seen = []

    def count(module, args, kwargs):
        seen.append(kwargs["input_ids"].numel() if "input_ids" in kwargs else args[0].numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    return seen


def _prompt_length(ex, tok, max_length=256):
    return sum(1 for t in encode_candidates(ex, tok, "alpaca", max_length)[0]["labels"] if t == -100)


@pytest.mark.parametrize("name", list(ADAPTED))
def test_shared_prompt_choice_scores_equal_full_sequences(tiny_tok, name):
    """Every choice's (CE sum, tokens) from the shared key/value cache equals that choice's full prompt + choice
    sequence scored alone, unpadded: routed adapters (AMoLE, FLAME) route per token, so the cache is exact."""
    model = ADAPTED[name](tiny_tok)
    seen = _token_counter(model)
    scores = score_choices(model, tiny_tok, CHOICE_EXAMPLES, "alpaca", None, 256, 8, torch.device("cpu"))
    seen = list(seen)
    for ex, sc in zip(CHOICE_EXAMPLES, scores):
        feats = encode_candidates(ex, tiny_tok, "alpaca", 256)
        for i, f in enumerate(feats):
            assert sc.tokens[i] == sum(1 for t in f["labels"] if t != -100)
            assert sc.ce[i] / sc.tokens[i] == pytest.approx(_unpadded_mean_ce(model, f), abs=1e-4)
        assert sc.gold_is_train and sc.best == min(range(len(feats)), key=lambda i: sc.ce[i] / sc.tokens[i])
    # the prompts ran once, as one left-padded batch, then only the choices' own tokens: the choices of each
    # length together, unpadded, without their last token (EOS is predicted from the token before it, never fed)
    rows = [t for sc in scores for t in sc.tokens]
    by_width = {w: rows.count(w) for w in sorted(set(rows)) if w > 1}
    assert seen == [len(CHOICE_EXAMPLES) * max(_prompt_length(ex, tiny_tok) for ex in CHOICE_EXAMPLES),
                    *[n * (w - 1) for w, n in by_width.items()]]


def test_choice_scoring_falls_back_to_full_sequences_when_a_choice_does_not_fit(tiny_tok):
    """A prompt that fits but leaves no room for its longest choice is scored on `encode_candidates`' left-cut
    sequences, as before, and its gold sequence is not the training one (which is cut from the right)."""
    model = ADAPTED["fedit"](tiny_tok)
    ex = CHOICE_EXAMPLES[0]
    max_length = _prompt_length(ex, tiny_tok) + 3  # "adjective and more words" + EOS needs more than 3
    (sc,) = score_choices(model, tiny_tok, [ex], "alpaca", None, max_length, 8, torch.device("cpu"))
    s, n = sequence_ce(model, encode_candidates(ex, tiny_tok, "alpaca", max_length), tiny_tok.pad_token_id,
                       torch.device("cpu"))
    assert sc.tokens == n.tolist() and sc.ce == pytest.approx(s.tolist(), abs=1e-4)
    assert not sc.gold_is_train
    prompt_only = _prompt_length(ex, tiny_tok)
    assert score_choices(model, tiny_tok, [ex], "alpaca", None, prompt_only, 8, torch.device("cpu")) == [None]


def test_evaluation_loss_equals_the_response_cross_entropy_of_every_example(tiny_tok):
    """The loss takes classification examples' gold-choice scores instead of a second pass: it must still be
    the token-weighted CE of every example's training sequence, computed here one unpadded sequence at a time
    (one example is cut at max_length, one does not fit at all, one has a response that is not its gold
    verbaliser)."""
    model = ADAPTED["fedamole"](tiny_tok)
    odd = Example(instruction="Yes or no?", response="no", choices=["Yes", "No"], label=1)  # response != choice
    gen = Example(instruction="Define 'cat'.", response="a small domestic feline that purrs and hunts mice")
    examples = [*CHOICE_EXAMPLES, odd, gen]
    max_length = _prompt_length(CHOICE_EXAMPLES[0], tiny_tok) + 3
    cfg = EvalConfig(batch_size=3)
    cfg.generation.max_new_tokens = 2
    out = evaluate_examples(model, tiny_tok, examples, DataConfig(), max_length, cfg, torch.device("cpu"))
    ce, tokens = 0.0, 0
    feats = [encode_train(ex, tiny_tok, "alpaca", max_length) for ex in examples]
    assert feats[2] is None  # the long prompt does not fit: dropped, as in training
    for f in filter(None, feats):
        n = sum(1 for t in f["labels"][1:] if t != -100)
        ce, tokens = ce + _unpadded_mean_ce(model, f) * n, tokens + n
    assert out["loss"] == pytest.approx(ce / tokens, abs=1e-5)
    assert out["loss"] == pytest.approx(evaluate_examples(model, tiny_tok, examples, DataConfig(), max_length,
                                                          EvalConfig(metric="loss"), torch.device("cpu"))["loss"])


def _left_padded_batch(tok):
    feats = [encode_train(ex, tok, "alpaca", 256) for ex in CHOICE_EXAMPLES]
    return to_device(collate(feats, tok.pad_token_id), torch.device("cpu"))


def test_training_loss_equals_the_models_own_and_projects_only_response_positions(tiny_tok):
    model = ADAPTED["fedit"](tiny_tok)
    batch = _left_padded_batch(tiny_tok)
    params = [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    for p in params:
        p.requires_grad_(True)
    reference = model(**batch).loss
    ref_grads = torch.autograd.grad(reference, params)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    loss = causal_lm_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    # one column before the earliest response token (of the longest response) to the end, not the whole width
    width = batch["labels"].shape[1]
    first = int((batch["labels"] != -100).any(0).nonzero()[0])
    assert rows == [width - first + 1] and rows[0] < width


def test_response_logits_of_a_model_without_logits_to_keep(tiny_tok):
    """A causal LM whose forward lacks `logits_to_keep` gets the same (logits, targets) by slicing."""
    model = ADAPTED["fedit"](tiny_tok)

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    batch = _left_padded_batch(tiny_tok)
    with torch.no_grad():
        logits, targets = response_logits(model, batch)
        plain_logits, plain_targets = response_logits(Plain(model), batch)
    assert torch.equal(targets, plain_targets) and targets.shape[1] < batch["labels"].shape[1] - 1
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)


def test_splits_evaluated_together_give_each_splits_own_metrics(tiny_tok, monkeypatch):
    """val and test share batches (one generate call for both here) and still report their own numbers."""
    model = ADAPTED["fedit"](tiny_tok)
    gens = [Example(instruction=f"Define '{w}'.", response=f"a word about {w}") for w in ("cat", "dog", "sun", "tree")]
    splits = {"val": [CHOICE_EXAMPLES[0], gens[0], gens[1]], "test": [gens[2], CHOICE_EXAMPLES[1], gens[3]],
              "aux": []}
    cfg = EvalConfig(batch_size=8)
    cfg.generation.max_new_tokens = 3
    calls = []
    original = type(model).generate
    monkeypatch.setattr(type(model), "generate", lambda self, **kw: calls.append(kw["input_ids"].shape[0]) or
                        original(self, **kw))
    together = evaluate_splits(model, tiny_tok, splits, DataConfig(), 128, cfg, torch.device("cpu"))
    assert calls == [4]
    for name, exs in splits.items():
        alone = evaluate_examples(model, tiny_tok, exs, DataConfig(), 128, cfg, torch.device("cpu"))
        assert together[name].keys() == alone.keys()
        for key in alone:
            assert together[name][key] == pytest.approx(alone[key], abs=1e-5), (name, key)
    assert together["aux"]["n"] == 0 and together["val"]["n"] == 3
    assert together["val"]["accuracy"] in (0.0, 100.0) and "rouge_l" in together["test"]
