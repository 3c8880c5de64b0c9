"""peft-format export: `PeftModel.from_pretrained` loads the directory and computes the same logits."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedmole.adapters import LoRALinear, inject
from fedmole.adapters.merged import MergedLoRALinear
from fedmole.algorithms.lora_ops import merged_key
from fedmole.config_io import validate_config
from fedmole.errors import UserError
from fedmole.export import export_peft
from fedmole.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tok):
    path = tmp_path_factory.mktemp("tiny-llama-base")
    tiny_llama(len(tiny_tok)).save_pretrained(path)
    return path


def _trained_state(adapters, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    state = adapters.init_state(seed, rank=rank)
    return {k: (torch.randn(v.shape, generator=gen) * 0.05 if k.endswith("/B") else v) for k, v in state.items()}


def _compare(model, base_dir, out, vocab):
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    peft_model.eval()
    x = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    ours, theirs = model(x).logits, peft_model(x).logits
    changed = (ours - tiny_llama(vocab)(x).logits).abs().max().item()
    return (ours - theirs).abs().max().item(), changed


def test_exported_lora_loads_in_peft_with_identical_logits(tmp_path, tiny_tok, base_dir):
    cfg = validate_config({"algorithm": {"name": "fedit", "rank": 4, "alpha": 8.0}})
    model = tiny_llama(len(tiny_tok))
    adapters = inject(model, ["q_proj", "v_proj"], lambda p, lin: LoRALinear(lin, 4, 8.0))
    adapters.load(_trained_state(adapters, 4, 1))
    out = export_peft(adapters.state(), cfg.algorithm, tmp_path / "adapter", base_model=str(base_dir))
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    diff, changed = _compare(model, base_dir, out, len(tiny_tok))
    assert changed > 1e-3 and diff < 1e-5


def test_a_low_rank_client_exports_at_its_own_rank(tmp_path, tiny_tok, base_dir):
    cfg = validate_config({"algorithm": {"name": "hetlora", "rank": 8}})
    model = tiny_llama(len(tiny_tok))
    adapters = inject(model, ["q_proj", "v_proj"], lambda p, lin: LoRALinear(lin, 8, 16.0))
    adapters.load(_trained_state(adapters, 2, 2))  # a rank-2 client: scale alpha/2
    out = export_peft(adapters.state(), cfg.algorithm, tmp_path / "client", base_model=str(base_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 16.0 and config["peft_type"] == "LORA"
    diff, changed = _compare(model, base_dir, out, len(tiny_tok))
    assert changed > 1e-3 and diff < 1e-5


def test_a_merged_dense_update_is_exported_exactly(tmp_path, tiny_tok, base_dir):
    """FLoRA/FlexLoRA: dW (rank up to Σ r_i) plus the local LoRA become one peft LoRA per matrix."""
    cfg = validate_config({"algorithm": {"name": "flora", "rank": 4}})
    model = tiny_llama(len(tiny_tok))
    adapters = inject(model, ["q_proj", "v_proj"], lambda p, lin: MergedLoRALinear(lin, 4, 16.0))
    state = _trained_state(adapters, 4, 3)
    gen = torch.Generator().manual_seed(4)
    for i, (m, mod) in enumerate(adapters):
        rank = 6 if i % 2 else 64  # a low-rank and a full-rank merged update
        shape = (mod.base.out_features, mod.base.in_features)
        state[merged_key(m)] = 0.02 * torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)
    adapters.load(state)
    out = export_peft(adapters.state(), cfg.algorithm, tmp_path / "merged", base_model=str(base_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(set(config["rank_pattern"].values()) | {config["r"]}) == [6 + 4, 64 + 4]
    diff, changed = _compare(model, base_dir, out, len(tiny_tok))
    assert changed > 1e-3 and diff < 1e-4


def test_methods_without_lora_or_state_are_refused(tmp_path):
    cfg = validate_config({"algorithm": {"name": "fedit"}})
    with pytest.raises(UserError, match="no adapter state"):
        export_peft({}, cfg.algorithm, tmp_path)
