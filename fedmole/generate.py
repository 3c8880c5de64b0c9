"""`fedmole generate DIR --prompt TEXT` (an export directory) or `fedmole generate RUN_DIR --client ID --prompt
TEXT` (a client's model straight from a run's checkpoint): text generation with a personalised model,
streamed to the terminal token by token.

The prompt is formatted with `--template`: `auto` (default) uses the template the run trained with, as the
run's config.yaml or the export's fedmole_export.json records it (`data.prompt` and `data.system_prompt`), so
the model is prompted in the format it was trained on; `chat`, `alpaca` and `plain` force one; `raw` passes
the text as is. Decoding is greedy unless `--sample`.
"""

from __future__ import annotations

from pathlib import Path

from fedmole.errors import UserError

TEMPLATES = ("auto", "chat", "alpaca", "plain", "raw")


def load_for_generation(path: str | Path, client: int | None = None, rnd: str | int | None = None,
                        device: str | None = None):
    """(model, tokenizer, config) from an export directory, or from a run directory and a client id."""
    from fedmole.config_io import validate_config
    from fedmole.export.load import load_model, read_manifest

    path = Path(path)
    if client is None:
        if (path / "config.yaml").is_file() and not (path / "fedmole_export.json").is_file():
            raise UserError(f"{path} is a run directory: pass --client ID to generate with that client's model, "
                            f"or an export directory")
        model, tokenizer = load_model(path, device=device)
        return model, tokenizer, validate_config(read_manifest(path)["config"])

    from fedmole.export.source import apply_state, check_client, load_base, model_state, open_checkpoint, strategy_at

    ckpt = open_checkpoint(path, rnd)
    check_client(ckpt.cfg, client)
    tokenizer, model, adapters = load_base(ckpt.cfg, device=device)
    apply_state(adapters, model_state(ckpt, strategy_at(ckpt, adapters), client))
    return model, tokenizer, ckpt.cfg


def format_prompt(text: str, tokenizer, cfg, template: str = "auto") -> list[int]:
    """Token ids of the prompt for `text` under `template` (see the module docstring)."""
    from fedmole.data.schema import Example
    from fedmole.data.tokenize import prompt_ids

    if template not in TEMPLATES:
        raise UserError(f"--template {template!r} is not one of {', '.join(TEMPLATES)}")
    if template == "raw":
        return tokenizer(text)["input_ids"]
    if template == "auto":
        template = cfg.data.prompt  # the run's own: a tokenizer's chat template is not what an alpaca run saw
    example = Example(instruction=text, context="", response="")
    return prompt_ids(example, tokenizer, template, cfg.data.system_prompt)


def generate(model, tokenizer, input_ids: list[int], max_new_tokens: int = 128, stream: bool = True,
             sample: bool = False, temperature: float = 0.7, top_p: float = 0.9) -> str:
    """The decoded continuation of `input_ids` (prompt stripped, special tokens skipped). With `stream`, the
    text is printed to stdout as it is generated."""
    import torch
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    kwargs = {"do_sample": sample}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             use_cache=True, streamer=streamer, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
