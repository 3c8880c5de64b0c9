"""`fedmole export RUN_DIR --client ID | --global --out DIR [--round N] [--merge]`.

Formats (every export directory also holds the tokenizer and `fedmole_export.json`, which records the format,
the run, the round, the client, the method and the fully resolved run config):

- `peft` (LoRA methods): `adapter_config.json` + `adapter_model.safetensors`, loaded by
  `peft.PeftModel.from_pretrained(base, DIR)` (`fedmole.export.peft_format`);
- `merged` (LoRA methods, `--merge`): a full Hugging Face model directory (fp32 weights W0 + ΔW, config,
  tokenizer) that `AutoModelForCausalLM.from_pretrained(DIR)` loads with no peft and no fedmole;
- `fedmole` (FedAMoLE, FLAME): `adapter.safetensors` (the model's adapter tensors in fedmole's
  `module/expert/tensor` vocabulary) + the JSON, which `fedmole.load_model(DIR)` restores exactly.

The directory is written next to its final place and renamed into it, so an interrupted export leaves
nothing half-written under DIR.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from fedmole.errors import UserError
from fedmole.export.source import (
    LORA_METHODS,
    NATIVE_METHODS,
    RunCheckpoint,
    apply_state,
    check_client,
    load_base,
    model_state,
    open_checkpoint,
    strategy_at,
)

MANIFEST = "fedmole_export.json"
NATIVE_WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


def base_reference(cfg) -> str:
    """What peft's `base_model_name_or_path` should name: a path plain transformers can load when there is
    one (the converted SmolLM2 cache), else the configured name."""
    if cfg.model.name == "smollm2-135m":
        from fedmole.models.loader import smollm2_dir

        return str(smollm2_dir())
    return cfg.model.name


def manifest(ckpt: RunCheckpoint, fmt: str, client: int | None, extra: dict | None = None) -> dict:
    return {
        "format": fmt,
        "version": FORMAT_VERSION,
        "method": ckpt.cfg.algorithm.name,
        "model": "global" if client is None else "client",
        "client": client,
        "round": ckpt.round,
        "run_dir": str(ckpt.run_dir.resolve()),
        "base_model": ckpt.cfg.model.model_dump(),
        "config": ckpt.cfg.to_dict(),
        **(extra or {}),
    }


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary directory next to `out`. `out` may be missing or empty; `--overwrite` replaces only
    an earlier export (it holds fedmole_export.json), never a file or another directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose a directory path for the export")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise UserError(f"export directory {out} is not empty and is not a fedmole export (no {MANIFEST}), so "
                            f"fedmole will not replace it, even with --overwrite; choose another --out")
        if not overwrite:
            raise UserError(f"export directory {out} already holds an export; choose another --out or pass "
                            f"--overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot write the export next to {out}: {err.strerror}; choose another --out") from None
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for f in tmp.rglob("*"):  # safetensors writes 0600 files; an export is meant to be shared like any file
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
    if out.exists():  # an empty directory or an earlier export (`_prepare_out`)
        shutil.rmtree(out)
    tmp.rename(out)


def check_request(method: str, client: int | None, merge: bool) -> None:
    if method not in LORA_METHODS + NATIVE_METHODS:
        known = ", ".join(LORA_METHODS + NATIVE_METHODS)
        raise UserError(f"export does not know algorithm {method}; exportable: {known}")
    if merge and method not in LORA_METHODS:
        raise UserError(f"--merge folds a LoRA into the base weights, but {method}'s experts are routed per token and "
                        f"cannot be merged; export without --merge and load with fedmole.load_model")


def export_run(run_dir: str | Path, out: str | Path, client: int | None = None, rnd: str | int | None = None,
               merge: bool = False, overwrite: bool = False) -> dict:
    """Export the global model (`client` None) or client `client`'s model of a run; returns the manifest."""
    out = Path(out)
    ckpt = open_checkpoint(run_dir, rnd)
    cfg = ckpt.cfg
    check_request(cfg.algorithm.name, client, merge)
    check_client(cfg, client, need_global=True)
    tmp = _prepare_out(out, overwrite)
    try:
        tokenizer, model, adapters = load_base(cfg, device="cpu", precision="fp32")
        state = model_state(ckpt, strategy_at(ckpt, adapters), client)
        if cfg.algorithm.name in NATIVE_METHODS:
            info = _write_native(tmp, ckpt, adapters, state, client)
        else:
            info = _write_peft(tmp, ckpt, state, client, merge, model)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _write_peft(tmp: Path, ckpt: RunCheckpoint, state, client, merge: bool, model) -> dict:
    from fedmole.export.peft_format import export_peft
    from fedmole.models import load_model

    cfg = ckpt.cfg

    def fresh():  # `model` carries fedmole's adapters; peft builds on (and merges into) a copy of the plain base
        return load_model(cfg.model, "fp32", "cpu", vocab_size=model.config.vocab_size)

    if not merge:
        export_peft(state.tensors, cfg.algorithm, tmp, base_model=base_reference(cfg), base_factory=fresh)
        return manifest(ckpt, "peft", client)
    from peft import PeftModel

    adapter_dir = tmp / ".adapter"
    export_peft(state.tensors, cfg.algorithm, adapter_dir, base_model=base_reference(cfg), base_factory=fresh)
    base = fresh()
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True  # a standalone model for inference
    merged.save_pretrained(tmp)
    shutil.rmtree(adapter_dir)
    return manifest(ckpt, "merged", client)


def _write_native(tmp: Path, ckpt: RunCheckpoint, adapters, state, client) -> dict:
    apply_state(adapters, state)  # refuses tensors the method's adapters cannot hold, before writing
    save_file({k: v.contiguous() for k, v in sorted(state.tensors.items())}, tmp / NATIVE_WEIGHTS)
    extra: dict = {}
    if ckpt.cfg.algorithm.name == "fedamole":
        extra["experts"] = {path: mod.held.tolist() for path, mod in adapters}
    else:
        extra["k"] = state.k
        extra["rescaler_s"] = {k: float(v.exp()) for k, v in sorted(state.tensors.items()) if "/rescaler/" in k}
    return manifest(ckpt, "fedmole", client, extra)
