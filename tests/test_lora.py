"""LoRA layer, injection and expert-addressed state."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedmole.adapters import LoRALinear, inject, key, parse_key, state_digest
from fedmole.adapters.merged import MergedLoRALinear
from fedmole.errors import UserError
from fedmole.models.tiny import tiny_llama


def _adapted(tok, rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj")):
    model = tiny_llama(len(tok))
    return model, inject(model, list(targets), lambda p, lin: LoRALinear(lin, rank, alpha, dropout))


def test_lora_output_matches_peft(tiny_tok):
    model, adapters = _adapted(tiny_tok)
    state = adapters.init_state(0)
    gen = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=gen) if k.endswith("/B") else v) for k, v in state.items()}
    adapters.load(state)

    peft_model = get_peft_model(
        tiny_llama(len(tiny_tok)), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    peft_sd = {f"base_model.model.{parse_key(k).module}.lora_{parse_key(k).name}.default.weight": v for k, v in state.items()}
    result = peft_model.load_state_dict(peft_sd, strict=False)
    assert not result.unexpected_keys
    x = torch.randint(0, len(tiny_tok), (3, 12))
    ours, theirs = model(x).logits, peft_model(x).logits
    assert (ours - theirs).abs().max().item() < 1e-6
    assert (ours - tiny_llama(len(tiny_tok))(x).logits).abs().max().item() > 1e-3  # B != 0 really changes output


def test_fresh_lora_equals_base_model(tiny_tok):
    model, adapters = _adapted(tiny_tok)
    adapters.load(adapters.init_state(3))
    x = torch.randint(0, len(tiny_tok), (2, 9))
    assert torch.equal(model(x).logits, tiny_llama(len(tiny_tok))(x).logits)


def test_init_state_is_seeded_and_kaiming_bounded(tiny_tok):
    _, adapters = _adapted(tiny_tok)
    a, b = adapters.init_state(7), adapters.init_state(7)
    assert state_digest(a) == state_digest(b)
    assert state_digest(a) != state_digest(adapters.init_state(8))
    for k, v in a.items():
        if k.endswith("/A"):
            assert v.abs().max() <= 1 / v.shape[1] ** 0.5
        else:
            assert torch.count_nonzero(v) == 0


def test_state_keys_name_module_expert_tensor(tiny_tok):
    _, adapters = _adapted(tiny_tok)
    keys = sorted(adapters.state())
    assert keys[0] == key("model.layers.0.self_attn.q_proj", "lora", "A")
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert parse_key(keys[0]).module == "model.layers.0.self_attn.q_proj"


def test_loading_another_rank_resizes_and_rescales(tiny_tok):
    _, adapters = _adapted(tiny_tok, rank=4)
    low = adapters.init_state(0, rank=2)
    adapters.load(low)
    mod = adapters.modules["model.layers.0.self_attn.q_proj"]
    assert mod.rank == 2 and mod.scaling == pytest.approx(8.0 / 2)
    assert adapters.state()[key("model.layers.0.self_attn.q_proj", "lora", "A")].shape == (2, 64)


def test_a_merged_update_is_state_but_never_trains(tiny_tok):
    model = tiny_llama(len(tiny_tok))
    adapters = inject(model, ["q_proj"], lambda p, lin: MergedLoRALinear(lin, 4, 8.0))
    path = "model.layers.0.self_attn.q_proj"
    adapters.load({**adapters.init_state(0), **{key(p, "merged", "dW"): torch.full((64, 64), 0.01) for p in adapters.modules}})
    mod = adapters.modules[path]
    assert list(mod.get_tensors()) == [("lora", "A"), ("lora", "B"), ("merged", "dW")]
    assert list(mod.trainable_parameters()) == [("lora", "A"), ("lora", "B")]
    assert mod.trainable_parameters()[("lora", "A")] is mod.A
    assert list(adapters.parameters()) == [key(p, "lora", n) for p in sorted(adapters.modules) for n in ("A", "B")]


def test_a_layer_without_run_time_settings_reports_none_and_refuses_some(tiny_tok):
    _, adapters = _adapted(tiny_tok)
    assert adapters.settings() == {}
    adapters.apply_settings({"model.layers.0.self_attn.q_proj": {}})
    with pytest.raises(ValueError, match="LoRALinear has no run-time settings; got \\['k'\\]"):
        adapters.apply_settings({"model.layers.0.self_attn.q_proj": {"k": 2}})


def test_target_modules_that_match_nothing_list_the_linear_names(tiny_tok):
    with pytest.raises(UserError, match="q_proj.*v_proj|matches no linear layer"):
        _adapted(tiny_tok, targets=("qproj",))


def test_regex_target_pattern(tiny_tok):
    _, adapters = _adapted(tiny_tok, targets=(r"^model\.layers\.1\.self_attn\.(q|k)_proj$",))
    assert sorted(adapters.modules) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


def test_digest_depends_on_values_names_and_dtype():
    t = {"m/lora/A": torch.ones(2, 2)}
    assert state_digest(t) == state_digest({"m/lora/A": torch.ones(2, 2)})
    assert state_digest(t) != state_digest({"m/lora/B": torch.ones(2, 2)})
    assert state_digest(t) != state_digest({"m/lora/A": torch.ones(2, 2, dtype=torch.float64)})
    assert state_digest(t) != state_digest({"m/lora/A": torch.ones(2, 2) * 1.0000001})
