"""Prompt templates: how an example's instruction and context become the text the model continues.

The response is never part of the prompt; `fedmole.data.tokenize` appends it (plus EOS) as the target.

- `alpaca`: the standard Stanford Alpaca template, with-input variant when `context` is non-empty.
- `plain`:  the instruction (and context) followed by a newline, e.g. the reference's SNLI prompt.
- `chat`:   the tokenizer's own chat template with one user turn and the generation prompt.

`system_prompt` is the system message of `chat`, replaces the preamble of `alpaca`, and is a first line
of `plain`.
"""

from __future__ import annotations

from fedmole.data.schema import Example
from fedmole.errors import UserError

TEMPLATES = ("alpaca", "chat", "plain")

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def render_prompt(ex: Example, template: str, tokenizer=None, system_prompt: str | None = None) -> str:
    """The prompt text of `ex` under `template` (alpaca, plain or chat; chat needs the tokenizer)."""
    if template == "alpaca":
        return _alpaca(ex, system_prompt)
    if template == "plain":
        text = ex.instruction + (f"\n{ex.context}" if ex.context else "") + "\n"
        return f"{system_prompt}\n{text}" if system_prompt else text
    if template == "chat":
        return _chat(ex, tokenizer, system_prompt)
    raise UserError(f'unknown prompt template "{template}"; allowed: {", ".join(TEMPLATES)} (data.prompt)')


def _alpaca(ex: Example, system_prompt: str | None) -> str:
    if ex.context:
        preamble = system_prompt or ALPACA_PREAMBLE_INPUT
        return (
            f"{preamble}\n\n### Instruction:\n{ex.instruction}\n\n### Input:\n{ex.context}\n\n### Response:\n"
        )
    preamble = system_prompt or ALPACA_PREAMBLE
    return f"{preamble}\n\n### Instruction:\n{ex.instruction}\n\n### Response:\n"


def _chat(ex: Example, tokenizer, system_prompt: str | None) -> str:
    if tokenizer is None:
        raise ValueError("render_prompt(template='chat') needs the tokenizer whose chat template to apply")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"data.prompt=chat, but the tokenizer {name} has no chat template; "
            f"use data.prompt=alpaca (or plain), or a model whose tokenizer ships a chat template"
        )
    user = ex.instruction + (f"\n\n{ex.context}" if ex.context else "")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
