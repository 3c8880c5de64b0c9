"""FLAME compute per tier: training step time at k active experts, side by side in one run.

    python -m benchmarks.perf.flame                       # tiny OLMoE scaled to 16 experts, top-8 (CPU)
    python -m benchmarks.perf.flame --model allenai/OLMoE-1B-7B-0924 --device cuda --seq 512

One training step = forward + backward + AdamW step over the expert LoRA (r = 8 on gate/up/down of every
expert) and the rescaler, on a fixed random batch. Tiers are measured round-robin (k = K, K/2, ..., 1, then
again) so that drift hits every tier alike; the median over repeats is reported. The headline is the ratio
of the step time at k = 1 to the step time at k = K (target: at most 0.6). For context the script also times
the forward pass of transformers' own MoE block implementations at k = K (no LoRA) next to ours.
Writes the result under "flame" in benchmarks/results/perf.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, median, record
from fedmole.algorithms.flame import RoutedLayers, build_adapters, flops_per_token
from fedmole.config import ModelConfig
from fedmole.config_io import load_config
from fedmole.models import load_model
from fedmole.models.tiny import tiny_olmoe
from fedmole.tiers import default_levels


def _model(args):
    if args.model == "tiny":
        model = tiny_olmoe(args.vocab, num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden,
                           intermediate_size=args.intermediate, num_layers=args.layers)
        model.config.use_cache = False
        model.requires_grad_(False)
        return model.to(args.device).eval()
    return load_model(ModelConfig(name=args.model), args.precision, args.device)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _synced(fn, device):
    def run():
        fn()
        _sync(device)
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (scaled tiny-olmoe) or a model name/path")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = _model(args)
    cfg = load_config(None, ["algorithm.name=flame", "algorithm.experts=pretrained", "algorithm.dropout=0"])
    adapters = build_adapters(model, cfg)
    adapters.load({k: v.to(args.device) for k, v in adapters.init_state(0).items()})
    layers = RoutedLayers(adapters)
    K = layers.K
    tiers = default_levels(K)
    params = [{"params": layers.trainable(), "lr": 1e-4}, {"params": layers.rescaler_parameters(), "lr": 1e-3}]
    for group in params:
        for p in group["params"]:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def at(k):
        def run():
            layers.set_k(k)
            step()
        return _synced(run, args.device)

    model.train()
    fns = {k: at(k) for k in tiers}
    for fn in fns.values():  # warm-up
        fn()
    step_s = {k: median(t) for k, t in interleaved(fns, args.repeats).items()}
    model.eval()
    flops = {k: flops_per_token(model, layers, k)["train"] for k in tiers}

    # forward of one MoE block at k = K: ours (with LoRA) next to transformers' implementations (no LoRA)
    layer = next(iter(layers.layers.values()))
    hidden = torch.randn(args.batch, args.seq, layer.router.weight.shape[1], device=args.device,
                         dtype=layer.experts.down_proj.dtype)
    layers.set_k(K)
    with torch.no_grad():
        def transformers_impl(impl):
            def run():
                model.config._experts_implementation = impl
                _, weights, index = layer.router(hidden)
                return layer.experts(hidden.view(-1, hidden.shape[-1]), index, weights)
            return run
        contenders = {"fedmole": lambda: layer(hidden), "transformers_eager": transformers_impl("eager"),
                      "transformers_grouped_mm": transformers_impl("grouped_mm")}
        contenders = {n: _synced(f, args.device) for n, f in contenders.items()}
        for fn in contenders.values():
            fn()
        block = {n: median(t) for n, t in interleaved(contenders, args.repeats).items()}

    result = {
        "model": args.model if args.model != "tiny" else {
            "name": "tiny-olmoe (scaled)", "experts": args.experts, "top_k": args.top_k, "hidden": args.hidden,
            "intermediate": args.intermediate, "layers": args.layers, "vocab": args.vocab},
        "device": args.device, "precision": args.precision,
        "batch": f"{args.batch} x {args.seq} tokens", "repeats": args.repeats, "K": K,
        "lora": "r=8 alpha=16 on gate/up/down of every expert, learned rescaler, AdamW",
        "step_seconds": {str(k): step_s[k] for k in tiers},
        "step_ratio_to_K": {str(k): step_s[k] / step_s[K] for k in tiers},
        "analytic_train_flops_ratio_to_K": {str(k): flops[k] / flops[K] for k in tiers},
        "ratio_k1_over_kK": step_s[1] / step_s[K],
        "target": "ratio_k1_over_kK <= 0.6",
        "moe_block_forward_seconds_at_K": block,
        "moe_block_forward_ratio_to_transformers_eager": {n: t / block["transformers_eager"] for n, t in block.items()},
    }
    out = record("flame", result)

    print(f"FLAME training step per tier ({result['model'] if args.model != 'tiny' else 'tiny-olmoe scaled'}, "
          f"{args.batch}x{args.seq} tokens, {args.device}):")
    for k in tiers:
        print(f"  k={k:<3} {step_s[k] * 1e3:9.1f} ms   ratio to k=K {step_s[k] / step_s[K]:.3f}   "
              f"(analytic FLOPs ratio {flops[k] / flops[K]:.3f})")
    print(f"  ratio k=1 / k=K = {result['ratio_k1_over_kK']:.3f} (target <= 0.6)")
    print("MoE block forward at k=K: " + ", ".join(
        f"{n} {t * 1e3:.2f} ms ({t / block['transformers_eager']:.2f}x eager)" for n, t in block.items()))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
