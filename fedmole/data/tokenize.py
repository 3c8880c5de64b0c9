"""Token ids for training, candidate scoring and generation, and the left-padding collator.

Loss is taken on the response and EOS only: prompt positions carry the label -100, which PyTorch's
cross-entropy ignores. The prompt keeps the tokenizer's usual BOS behaviour; a rendered chat template
already holds its special tokens, so it is tokenized without adding more. The response is tokenized on
its own (no BOS) and closed with EOS.
"""

from __future__ import annotations

import torch

from fedmole.data.prompts import render_prompt
from fedmole.data.schema import Example

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips


def prompt_ids(ex: Example, tokenizer, template: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the rendered prompt."""
    text = render_prompt(ex, template, tokenizer, system_prompt)
    return tokenizer(text, add_special_tokens=template != "chat")["input_ids"]


def target_ids(text: str, tokenizer) -> list[int]:
    """Token ids of a response: no BOS, EOS appended."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]


def encode_train(
    ex: Example, tokenizer, template: str, max_length: int, system_prompt: str | None = None
) -> dict | None:
    """`{"input_ids", "labels"}` for one training example, or None when the prompt alone fills
    `max_length` (the caller drops the example). Longer sequences are cut at `max_length` and end in EOS."""
    prompt = prompt_ids(ex, tokenizer, template, system_prompt)
    if len(prompt) >= max_length:
        return None
    target = target_ids(ex.response, tokenizer)
    input_ids = (prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
    input_ids[-1] = labels[-1] = _eos_id(tokenizer)  # a no-op unless truncated
    return {"input_ids": input_ids, "labels": labels}


def encode_candidates(
    ex: Example, tokenizer, template: str, max_length: int, system_prompt: str | None = None
) -> list[dict]:
    """One `{"input_ids", "labels"}` per choice of a classification example: prompt + choice + EOS, with
    labels only on choice + EOS, so that the mean per-token cross-entropy scores the choice.

    Returns [] when the prompt alone fills `max_length` (as in training, the example is dropped). A longer
    sequence loses tokens from the left, so that every choice token is still scored.
    """
    if not ex.choices:
        raise ValueError(f"example {ex.uid or ex.instruction[:40]!r} has no choices to score")
    prompt = prompt_ids(ex, tokenizer, template, system_prompt)
    if len(prompt) >= max_length:
        return []
    out = []
    for choice in ex.choices:
        target = target_ids(choice, tokenizer)
        input_ids = (prompt + target)[-max_length:]
        labels = ([IGNORE_INDEX] * len(prompt) + target)[-max_length:]
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def encode_prompt(
    ex: Example, tokenizer, template: str, max_prompt_length: int, system_prompt: str | None = None
) -> list[int]:
    """Prompt ids for generation, keeping the last `max_prompt_length` tokens (the end leads into the answer)."""
    return prompt_ids(ex, tokenizer, template, system_prompt)[-max_prompt_length:]


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch: input_ids with `pad_id`, attention_mask 0 and labels -100 on the padding.

    Left padding puts every sequence's last real token in the final column, which generation needs.
    `labels` is in the batch only when the features have it.
    """
    width = max(len(f["input_ids"]) for f in features)
    pads = [width - len(f["input_ids"]) for f in features]
    batch = {
        "input_ids": torch.tensor([[pad_id] * p + f["input_ids"] for f, p in zip(features, pads)]),
        "attention_mask": torch.tensor([[0] * p + [1] * len(f["input_ids"]) for f, p in zip(features, pads)]),
    }
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([[IGNORE_INDEX] * p + f["labels"] for f, p in zip(features, pads)])
    return batch


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    return tokenizer.eos_token_id
