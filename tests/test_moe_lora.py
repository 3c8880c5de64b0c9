"""LoRA on the fused experts of a pretrained MoE block for the LoRA methods (`adapters.moe_lora.MoELoRA`)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmole.adapters.moe_lora import MoELoRA
from fedmole.adapters.smoe import MoEContext, SparseMoELoRA, find_moe_blocks
from fedmole.algorithms.lora_common import build_lora_adapters
from fedmole.algorithms.lora_ops import from_pairs, lora_pairs, merged_key
from fedmole.config_io import validate_config
from fedmole.models.tiny import tiny_olmoe

from conftest import tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe

VOCAB = 200


def _olmoe():
    return tiny_olmoe(VOCAB)


FAMILIES = {"olmoe": _olmoe, "qwen2_moe": lambda: tiny_qwen2_moe(VOCAB), "qwen3_moe": lambda: tiny_qwen3_moe(VOCAB),
            "mixtral": lambda: tiny_mixtral(VOCAB)}


def _model(name):
    torch.manual_seed(0)
    model = FAMILIES[name]()
    for module in model.modules():  # random experts and a peaked router (the library initialises lazily)
        for p in ("gate_up_proj", "down_proj"):
            if isinstance(getattr(module, p, None), torch.nn.Parameter):
                torch.nn.init.normal_(getattr(module, p), std=0.2)
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.5)
    return model.eval()


def _block(name):
    model = _model(name)
    (path, block), *_ = find_moe_blocks(model).items()
    return model, path, block


def _random_state(layer, seed=0, rank=None, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    state = layer.init_tensors(gen, rank=rank)
    return {k: (torch.randn(v.shape, generator=gen) * scale if k[1].endswith("B") else v) for k, v in state.items()}


def _reference(block, state, x, scale, dW=None):
    """The block's MoE output written expert by expert from the transformers weights and the fedmole tensors:
    each token's top-K experts, each projection W v + dW v + scale B A v, summed with the router weights."""
    W_gu, W_down = block.experts.gate_up_proj, block.experts.down_proj
    inter = W_down.shape[2]
    top_k = block.gate.top_k
    renorm = type(block).__name__.startswith("Mixtral") or bool(getattr(block.gate, "norm_topk_prob", False))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = torch.softmax(block.gate.weight @ x[t], -1)
        g, idx = torch.topk(p, top_k)
        if renorm:
            g = g / g.sum()
        for g_j, j in zip(g, idx.tolist()):
            def proj(name, W, v):
                y = W @ v
                if (str(j), f"{name}_A") in state:
                    y = y + scale * state[(str(j), f"{name}_B")] @ (state[(str(j), f"{name}_A")] @ v)
                if dW is not None and (str(j), f"{name}_dW") in dW:
                    y = y + dW[(str(j), f"{name}_dW")] @ v
                return y
            h = torch.nn.functional.silu(proj("gate", W_gu[j, :inter], x[t])) * proj("up", W_gu[j, inter:], x[t])
            out[t] += g_j * proj("down", W_down[j], h)
    if getattr(block, "shared_expert", None) is not None:
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zero_B_block_equals_the_transformers_block(name):
    _, _, block = _block(name)
    d = block.gate.weight.shape[1]
    x = torch.randn(2, 5, d)
    expected = block(x)
    layer = MoELoRA(block, 2, 4.0, 0.0)
    layer.set_tensors(layer.init_tensors(torch.Generator().manual_seed(0)))
    layer.eval()
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert expected.abs().max() > 1e-3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapted_block_equals_expert_by_expert_reference(name):
    _, _, block = _block(name)
    d = block.gate.weight.shape[1]
    layer = MoELoRA(block, 3, 6.0, 0.0).eval()
    state = _random_state(layer)
    layer.set_tensors(state)
    x = torch.randn(1, 9, d)
    with torch.no_grad():
        expected = _reference(block, state, x[0], 6.0 / 3)
        got = layer(x)[0]
        plain = block(x)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the LoRA really contributes


def test_loading_another_rank_resizes_every_expert_and_scales_by_alpha_over_r():
    _, _, block = _block("olmoe")
    layer = MoELoRA(block, 4, 8.0, 0.0, projections=("gate", "down")).eval()
    state = _random_state(layer, seed=3, rank=2)
    layer.set_tensors(state)
    assert layer.rank == 2 and layer.scaling == 4.0 and layer.A["gate"].shape == (8, 2, 64)
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x)[0], _reference(block, state, x[0], 8.0 / 2), atol=1e-5)
    partial = {k: v for k, v in _random_state(layer, rank=3).items() if k[0] != "5"}
    with pytest.raises(ValueError, match="needs every expert's factors"):
        layer.set_tensors(partial)
    with pytest.raises(KeyError, match="not one of this block's"):
        layer.set_tensors({("0", "up_A"): torch.zeros(2, 64)})  # up is not adapted here


def test_merged_update_adds_dW_per_expert_and_a_dW_only_state_zeroes_B():
    _, _, block = _block("olmoe")
    layer = MoELoRA(block, 2, 4.0, 0.0, merged=True).eval()
    state = _random_state(layer, seed=1)
    gen = torch.Generator().manual_seed(7)
    dW = {(j, f"{m}_dW"): torch.randn(layer.dims[m], generator=gen) * 0.05
          for j in map(str, range(8)) for m in ("gate", "up", "down")}
    layer.set_tensors({**state, **dW})
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x)[0], _reference(block, state, x[0], 2.0, dW), atol=1e-5)
        layer.set_tensors(dW)  # FlexLoRA's global model: the merged update alone
        zero_B = {k: (torch.zeros_like(v) if k[1].endswith("B") else v) for k, v in state.items()}
        assert torch.allclose(layer(x)[0], _reference(block, zero_B, x[0], 2.0, dW), atol=1e-5)
        layer.set_tensors(state)  # no dW in the state: the merged update is dropped
        assert layer.dW is None
    plain = MoELoRA(block, 2, 4.0, 0.0)
    with pytest.raises(KeyError, match="no merged update"):
        plain.set_tensors(dW)


def test_same_tensors_compute_what_flame_computes_at_full_k():
    """Like for like: a LoRA method's expert block and FLAME's at k = K, s = 1 are one function of one state."""
    _, _, block = _block("olmoe")
    ours = MoELoRA(block, 4, 8.0, 0.0).eval()
    flame = SparseMoELoRA(block, 4, 8.0, 0.0, MoEContext()).eval()
    state = _random_state(ours, seed=5)
    ours.set_tensors(state)
    flame.set_tensors({**state, ("rescaler", "log_s"): torch.zeros(1)})
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), flame(x))
    assert ours.init_tensors(torch.Generator().manual_seed(9)).keys() <= \
        flame.init_tensors(torch.Generator().manual_seed(9)).keys()
    for k, v in ours.init_tensors(torch.Generator().manual_seed(9)).items():  # the same seeded start
        assert torch.equal(v, flame.init_tensors(torch.Generator().manual_seed(9))[k])


def test_state_lists_expert_by_expert_each_projections_factors_then_its_merged_update():
    """The key order of the state (what payloads and checkpoints list), of what trains, and of a fresh draw
    (projection by projection, one (M, r, d_in) A each); FLAME's block lists the same factors in the same
    orders, then its router and rescaler."""
    _, _, block = _block("olmoe")
    layer = MoELoRA(block, 2, 4.0, 0.0, merged=True)
    dW = {(str(j), f"{m}_dW"): torch.zeros(layer.dims[m]) for j in range(8) for m in ("gate", "up", "down")}
    layer.set_tensors({**layer.init_tensors(torch.Generator().manual_seed(0)), **dW})
    keys = list(layer.get_tensors())
    assert keys == [(str(j), f"{m}_{t}") for j in range(8) for m in ("gate", "up", "down") for t in ("A", "B", "dW")]
    assert list(layer.trainable_parameters()) == [("experts", f"{m}_{f}") for m in ("gate", "up", "down") for f in "AB"]
    flame = SparseMoELoRA(block, 2, 4.0, 0.0, MoEContext(), train_router=True)
    factors = [k for k in keys if not k[1].endswith("_dW")]
    assert list(flame.get_tensors()) == [*factors, ("router", "W"), ("rescaler", "log_s")]
    drawn = [(str(j), f"{m}_{f}") for m in ("gate", "up", "down") for j in range(8) for f in "AB"]
    assert list(flame.init_tensors(torch.Generator().manual_seed(0))) == [*drawn, ("router", "W"), ("rescaler", "log_s")]
    assert list(layer.init_tensors(torch.Generator().manual_seed(0))) == drawn


def _cfg(targets, name="fedit"):
    return validate_config({"model": {"name": "tiny-olmoe"}, "algorithm": {"name": name, "rank": 4,
                                                                           "target_modules": targets}})


def test_expert_projection_names_adapt_every_expert_with_flames_keys():
    model = tiny_olmoe(VOCAB)
    adapters = build_lora_adapters(model, _cfg(["gate_proj", "up_proj", "down_proj"]))
    assert list(adapters.modules) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    keys = set(adapters.state())
    assert len(keys) == 2 * 8 * 3 * 2 and "model.layers.1.mlp/7/down_B" in keys
    pairs = lora_pairs(adapters.state())
    assert "model.layers.0.mlp/3/gate" in pairs and pairs["model.layers.0.mlp/3/gate"][0].shape == (4, 64)
    assert set(from_pairs(pairs)) == keys
    assert merged_key("model.layers.0.mlp/3/gate") == "model.layers.0.mlp/3/gate_dW"
    # the trainable parameters are the batched tensors, six per block
    assert len(adapters.parameters()) == 2 * 6


def test_attention_names_still_adapt_linear_layers_on_a_moe_model():
    model = tiny_olmoe(VOCAB)
    adapters = build_lora_adapters(model, _cfg(["q_proj", "down_proj"]))
    assert sorted(adapters.modules) == ["model.layers.0.mlp", "model.layers.0.self_attn.q_proj",
                                        "model.layers.1.mlp", "model.layers.1.self_attn.q_proj"]
    assert {k.rsplit("/", 1)[1] for k in adapters.state() if "mlp" in k} == {"down_A", "down_B"}


def test_qwen2_shared_expert_stays_frozen_like_flames():
    model = _model("qwen2_moe")
    reference = copy.deepcopy(model)
    adapters = build_lora_adapters(model, _cfg(["gate_proj", "up_proj", "down_proj"]))
    assert list(adapters.modules) == ["model.layers.0.mlp"]  # not mlp.shared_expert.gate_proj
    adapters.load(adapters.init_state(0))
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


# ------------------------------------------------------------------------------------- export (peft)
def _trained(adapters, seed, rank=None):
    gen = torch.Generator().manual_seed(seed)
    state = adapters.init_state(seed, rank=rank)
    return {k: (torch.randn(v.shape, generator=gen) * 0.1 if k.endswith("B") else v) for k, v in state.items()}


@pytest.mark.parametrize("case", ["lora_and_attention", "down_only_low_rank", "merged_dW"])
def test_expert_lora_exported_in_peft_format_gives_the_same_logits(tmp_path, case):
    from peft import PeftModel

    from fedmole.export import export_peft

    targets = {"lora_and_attention": ["q_proj", "gate_proj", "up_proj", "down_proj"],
               "down_only_low_rank": ["down_proj"], "merged_dW": ["gate_proj", "up_proj", "down_proj"]}[case]
    cfg = _cfg(targets, "flexlora" if case == "merged_dW" else "hetlora")
    model = tiny_olmoe(VOCAB)
    adapters = build_lora_adapters(model, cfg, merged=case == "merged_dW")
    model.eval()  # the injected adapters too (their dropout)
    state = _trained(adapters, 1, rank=2 if case == "down_only_low_rank" else None)
    if case == "merged_dW":  # FlexLoRA's global model: a dense update per expert, of different ranks
        gen = torch.Generator().manual_seed(4)
        state = {merged_key(m): torch.randn(B.shape[0], j + 1, generator=gen) @ torch.randn(j + 1, A.shape[1],
                                                                                           generator=gen) * 0.02
                 for m, (A, B) in lora_pairs(state).items() for j in [int(m.split("/")[1]) % 3]}
    adapters.load(state)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        plain = tiny_olmoe(VOCAB)(ids).logits
    out = export_peft(adapters.state(), cfg.algorithm, tmp_path / "adapter", base_model="tiny-olmoe",
                      base_factory=lambda: tiny_olmoe(VOCAB))
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
        for p in (("down_proj",) if case == "down_only_low_rank" else ("down_proj", "gate_up_proj")))
    assert config["lora_dropout"] == 0.0 and config["base_model_name_or_path"] == "tiny-olmoe"
    peft_model = PeftModel.from_pretrained(tiny_olmoe(VOCAB), out).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - plain).abs().max() > 1e-3
    assert (ours - theirs).abs().max() < 1e-5
    if case == "lora_and_attention":  # --merge: peft folds every expert's update into the fused weights
        merged = peft_model.merge_and_unload()
        with torch.no_grad():
            assert (merged(ids).logits - ours).abs().max() < 1e-4


def test_per_expert_export_without_a_base_factory_is_refused(tmp_path):
    from fedmole.export import export_peft

    cfg = _cfg(["down_proj"])
    adapters = build_lora_adapters(tiny_olmoe(VOCAB), cfg)
    with pytest.raises(ValueError, match="base_factory"):
        export_peft(adapters.state(), cfg.algorithm, tmp_path / "x")


# --------------------------------------------------------------------------------- runs through the CLI
ROOT = Path(__file__).resolve().parents[1]
SMOKE_MOE = ROOT / "configs" / "smoke_moe_lora.yaml"
CLI_METHODS = ("flame", "fedit", "hetlora", "flexlora", "flora")


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """`fedmole run configs/smoke_moe_lora.yaml --set algorithm.name=NAME` for FLAME and four LoRA methods
    (one round, a shorter evaluation), then one `fedmole report` over all of them."""
    root = tmp_path_factory.mktemp("moe-runs")
    sets = ["federation.rounds=1", "eval.max_examples=2", "eval.generation.max_new_tokens=2"]
    for name in CLI_METHODS:
        _cli("run", SMOKE_MOE, *[a for s in [f"algorithm.name={name}", *sets] for a in ("--set", s)],
             "--out", root / name, "--progress", "none")
    _cli("report", *[root / name for name in CLI_METHODS], "--out", root / "report")
    return root


@pytest.mark.parametrize("name", CLI_METHODS[1:])
def test_lora_methods_train_per_expert_lora_on_the_experts_flame_adapts(moe_runs, name):
    from safetensors.torch import load_file

    summary = json.loads((moe_runs / name / "summary.json").read_text())
    flame = json.loads((moe_runs / "flame" / "summary.json").read_text())
    assert not any(summary["skipped"].values())
    assert summary["adapted"] == flame["adapted"] == {f"model.layers.{i}.mlp": "8 experts x gate, up, down"
                                                      for i in (0, 1)}
    server = load_file(moe_runs / name / "checkpoints" / "round_0001" / "server.safetensors")
    suffix = "dW" if name in ("flexlora", "flora") else "B"  # the merged per-expert update, or the LoRA's B
    trained = {k: v for k, v in server.items() if k.endswith(f"_{suffix}") and "server_opt" not in k}
    assert set(trained) == {f"model.layers.{i}.mlp/{j}/{p}_{suffix}" for i in (0, 1) for j in range(8)
                            for p in ("gate", "up", "down")}
    assert any(v.abs().max() > 0 for v in trained.values())  # the experts' adapters trained (B / dW start at 0)
    if name == "hetlora":
        assert sorted(set(summary["ranks"].values())) == [1, 2, 4]  # ranks 4/2/1 per expert from tiers 4/2/1


def test_the_report_shows_the_same_adapted_weights_for_every_method(moe_runs):
    page = (moe_runs / "report" / "report.html").read_text()
    assert page.count("adapted: 2 x mlp: 8 experts x gate, up, down") == len(CLI_METHODS)
