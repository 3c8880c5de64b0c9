"""Prompt templates, label masks, truncation and left-padding collation."""

from __future__ import annotations

import pytest
import torch

from fedmole.data.prompts import render_prompt
from fedmole.data.schema import Example
from fedmole.data.tokenize import IGNORE_INDEX, collate, encode_candidates, encode_prompt, encode_train
from fedmole.errors import UserError
from fedmole.models.tiny import tiny_tokenizer

GEN = Example(instruction="Define the word 'noun'.", response="a word that names a person or thing")
WITH_INPUT = Example(instruction="Translate to French.", response="Bonjour.", context="Good morning.")
CLS = Example(
    instruction="Which part of speech is 'run'?",
    response="verb",
    choices=["noun", "verb", "adjective", "adverb"],
    label=1,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smol():
    from fedmole.config import ModelConfig
    from fedmole.models import load_tokenizer

    try:
        return load_tokenizer(ModelConfig(name="smollm2-135m"))
    except Exception as err:  # noqa: BLE001 - the packaged model may be absent on a bare machine
        pytest.skip(f"SmolLM2 tokenizer not available: {err}")


def test_alpaca_template_with_and_without_input():
    assert render_prompt(GEN, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDefine the word 'noun'.\n\n### Response:\n"
    )
    assert render_prompt(WITH_INPUT, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\nGood morning.\n\n### Response:\n"
    )


def test_plain_template_is_instruction_context_newline():
    assert render_prompt(WITH_INPUT, "plain") == "Translate to French.\nGood morning.\n"
    assert render_prompt(GEN, "plain", system_prompt="Be brief.") == "Be brief.\nDefine the word 'noun'.\n"


def test_chat_template_without_one_suggests_alpaca(tok):
    with pytest.raises(UserError, match="no chat template; use data.prompt=alpaca"):
        render_prompt(GEN, "chat", tok)


def test_chat_template_renders_through_smollm2(smol):
    text = render_prompt(WITH_INPUT, "chat", smol, system_prompt="You translate.")
    assert text == (
        "<|im_start|>system\nYou translate.<|im_end|>\n<|im_start|>user\nTranslate to French.\n\nGood morning."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    enc = encode_train(WITH_INPUT, smol, "chat", max_length=128)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids[:3] == smol(text, add_special_tokens=False)["input_ids"][:3]  # no extra BOS in front
    assert ids[-1] == smol.eos_token_id == smol.convert_tokens_to_ids("<|im_end|>")
    target = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert smol.decode(target) == "Bonjour.<|im_end|>"


def test_train_labels_mask_prompt_and_keep_target_and_eos(tok):
    enc = encode_train(GEN, tok, "alpaca", max_length=512)
    prompt = tok(render_prompt(GEN, "alpaca"))["input_ids"]
    target = tok(GEN.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert prompt[0] == tok.bos_token_id
    assert enc["input_ids"] == prompt + target
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + target
    assert enc["labels"][-1] == tok.eos_token_id


def test_truncation_forces_eos(tok):
    prompt_len = len(tok(render_prompt(GEN, "alpaca"))["input_ids"])
    enc = encode_train(GEN, tok, "alpaca", max_length=prompt_len + 3)
    assert len(enc["input_ids"]) == len(enc["labels"]) == prompt_len + 3
    assert enc["input_ids"][-1] == enc["labels"][-1] == tok.eos_token_id
    assert enc["labels"][prompt_len:-1] == tok(GEN.response, add_special_tokens=False)["input_ids"][:2]


def test_prompt_too_long_returns_none(tok):
    prompt_len = len(tok(render_prompt(GEN, "alpaca"))["input_ids"])
    assert encode_train(GEN, tok, "alpaca", max_length=prompt_len) is None
    assert encode_train(GEN, tok, "alpaca", max_length=prompt_len + 1) is not None
    assert encode_candidates(CLS, tok, "alpaca", max_length=8) == []


def test_candidates_score_each_choice_plus_eos(tok):
    encs = encode_candidates(CLS, tok, "plain", max_length=256)
    prompt = tok(render_prompt(CLS, "plain"))["input_ids"]
    assert len(encs) == 4
    for choice, enc in zip(CLS.choices, encs):
        target = tok(choice, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert enc["input_ids"] == prompt + target
        assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + target


def test_encode_prompt_keeps_the_end(tok):
    full = tok(render_prompt(GEN, "alpaca"))["input_ids"]
    assert encode_prompt(GEN, tok, "alpaca", max_prompt_length=1024) == full
    assert encode_prompt(GEN, tok, "alpaca", max_prompt_length=5) == full[-5:]


def test_collate_pads_on_the_left():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_without_labels_has_no_labels_key():
    batch = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_id=9)
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].tolist() == [[1, 2], [9, 3]]
