"""Session set-up (offline, one thread) and the helpers several test files share.

Test files import the plain helpers directly: `from conftest import metrics_records, run_config`.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never reach the network and never touch the user's Hugging Face cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_HOME" not in os.environ:
    _HF_HOME = os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="fedmole-hf-")  # removed when the session ends
else:
    _HF_HOME = None
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny test models gain nothing from a second thread, and OpenMP spin-waits badly on a busy machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionfinish(session, exitstatus):
    if _HF_HOME is not None:
        shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_tok():
    from fedmole.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return tok


# ---------------------------------------------------------------------------------------- shared helpers
ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, outcomes.jsonl, ...), in file order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def metrics_records(run_dir: Path, split: str | None = None) -> list[dict]:
    """A run directory's metrics.jsonl records, in file order; only those of `split` when given."""
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    return records if split is None else [r for r in records if r["split"] == split]


def canonical_lines(path: Path) -> list[str]:
    """A JSON-lines file as sorted, key-sorted JSON strings: two runs' logs compare equal whatever order
    their records (and the keys in them) were written in."""
    return sorted(json.dumps(rec, sort_keys=True) for rec in read_jsonl(path))


def run_config(config: Path | None, overrides, run_dir: Path, exist_ok: bool = False) -> tuple[dict, Path]:
    """Load `config` with `overrides`, run it in-process into a new `run_dir` (no progress output):
    (summary, run_dir)."""
    from fedmole.config_io import load_config
    from fedmole.run import run_experiment

    cfg = load_config(config, list(overrides))
    run_dir.mkdir(parents=exist_ok, exist_ok=exist_ok)
    return run_experiment(cfg, run_dir, "none"), run_dir


# one-layer mixture-of-experts models of three more transformers families (6 experts, top-2, random weights)
def tiny_qwen2_moe(vocab: int):
    """Qwen2-MoE with a shared expert and no top-k renormalisation."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False))


def tiny_qwen3_moe(vocab: int):
    """Qwen3-MoE with top-k renormalisation."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True))


def tiny_mixtral(vocab: int):
    """Mixtral (always renormalises its top-k)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2))


def fedamole_server(tok, *overrides):
    """(config, FedAMoLE server) for configs/smoke_fedamole.yaml with `overrides`, on a tiny Llama."""
    from fedmole.algorithms import fedamole
    from fedmole.config_io import load_config
    from fedmole.models.tiny import tiny_llama

    cfg = load_config(ROOT / "configs" / "smoke_fedamole.yaml", list(overrides))
    return cfg, fedamole.Server(cfg, fedamole.build_adapters(tiny_llama(len(tok)), cfg))
