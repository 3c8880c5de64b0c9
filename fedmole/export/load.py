"""`fedmole.load_model(DIR)`: an exported model, ready for inference, from any of the three export formats.

- `fedmole` (FedAMoLE, FLAME): the base model the run used (`config.model`), the method's adapters injected
  exactly as in the run, the saved tensors loaded (for FedAMoLE the held expert ids come with them), FLAME's
  k set; the result computes the same logits as the run's model of that client;
- `peft`: the base model + `peft.PeftModel.from_pretrained(base, DIR)`;
- `merged`: `AutoModelForCausalLM.from_pretrained(DIR)`.

The tokenizer is the one saved in DIR, with fedmole's padding conventions (a pad token, left padding).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmole.errors import UserError


def read_manifest(path: str | Path) -> dict:
    from fedmole.export.run_export import MANIFEST

    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / "config.yaml").is_file():
            raise UserError(f"{path} is a run directory, not an export; export a model first "
                            f"(fedmole export {path} --client ID --out DIR) or pass --client ID")
        raise UserError(f"{path} is not a fedmole export directory (no {MANIFEST}); create one with fedmole export")
    info = json.loads((path / MANIFEST).read_text())
    if info.get("format") not in ("peft", "merged", "fedmole"):
        raise UserError(f"{path / MANIFEST} names an unknown format {info.get('format')!r}")
    return info


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str | Path, device: str | None = None, precision: str | None = None):
    """(model, tokenizer) of an export directory, in eval mode with no gradients. `device` (auto, cpu, cuda)
    and `precision` (fp32, bf16, fp16) default to the run's `train.device` and `train.precision`; merged
    models load in fp32."""
    from fedmole.config_io import validate_config
    from fedmole.models import resolve_device
    from fedmole.models import load_model as load_base_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-tensor loading bars
    path = Path(path)
    info = read_manifest(path)
    cfg = validate_config(info["config"])
    device = device or cfg.train.device
    tokenizer = _tokenizer(path)
    if info["format"] == "merged":
        from transformers import AutoModelForCausalLM

        from fedmole.models.loader import DTYPES

        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision or "fp32"])
        model.to(resolve_device(device))
    else:
        model = load_base_model(cfg.model, precision or cfg.train.precision, device, vocab_size=len(tokenizer))
        if info["format"] == "peft":
            import warnings

            from peft import PeftModel

            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5 (FutureWarning)
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, path)
        else:
            _load_native(model, cfg, info, path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _load_native(model, cfg, info: dict, path: Path) -> None:
    from safetensors.torch import load_file

    from fedmole.algorithms import get_algorithm
    from fedmole.export.run_export import NATIVE_WEIGHTS
    from fedmole.export.source import ModelState, apply_state

    adapters = get_algorithm(cfg.algorithm.name).build_adapters(model, cfg)
    state = ModelState(load_file(path / NATIVE_WEIGHTS), info["model"], info.get("k"))
    apply_state(adapters, state)
