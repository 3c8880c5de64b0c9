"""FedAMoLE performance: the batched AMoLE layer, a full SmolLM2 training step, and RSEA.

1. Layer, at SmolLM2-135M q_proj shapes (2048 tokens, d = 576, r = 8, n = 8 held experts, top-2):
   forward + backward of the batched layer vs a loop over experts in Python (gather each expert's tokens,
   compute it, scatter back: how the reference implementation dispatches). Target: >= 2x faster.
2. A full SmolLM2-135M training step (batch 4 x 128 tokens, q_proj + v_proj, Adam, fp32 CPU) with AMoLE
   (8 held experts of 30 + shared + router) vs a single LoRA r=8. Target: <= 1.3x the LoRA step.
3. RSEA for N = 30 experts, 60 modules (SmolLM2: 30 layers x q, v), C in {10, 100, 1000} clients, with the
   smallest feasible k_c (min 2, max 8 experts per client): seconds per round. Target: C = 1000 under 5 s.

    python -m benchmarks.perf.amole [--repeats 5] [--steps 3] [--skip-model]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from benchmarks.common import interleaved, median, record
from fedmole.adapters import LoRALinear, inject
from fedmole.adapters.mole import AMoLELinear
from fedmole.algorithms import rsea


def looped_forward(layer: AMoLELinear, x: torch.Tensor) -> torch.Tensor:
    """The same AMoLE output, dispatched token groups expert by expert in a Python loop."""
    y = layer.base(x)
    X = x.reshape(-1, x.shape[-1])
    p, top, _ = layer.route(X)
    g = p.gather(-1, top)
    g = g / g.sum(-1, keepdim=True)
    out = (X @ layer.A_s.t()) @ layer.B_s.t()
    for i in range(layer.num_held):
        tok, slot = (top == i).nonzero(as_tuple=True)
        if len(tok):
            contrib = ((X[tok] @ layer.A[i].t()) @ layer.B[i].t()) * g[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, contrib)
    return y + layer.scaling * out.view(*x.shape[:-1], -1)


def bench_layer(repeats: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(576, 576, bias=False).requires_grad_(False)
    layer = AMoLELinear(base, 30, 8, 16.0, 0.0, top_k=2)
    gen = torch.Generator().manual_seed(1)
    pool = layer.init_tensors(gen)
    share = {k: (torch.randn(v.shape, generator=gen) * 0.02 if k[1] == "B" else v) for k, v in pool.items()
             if not k[0].isdigit() or int(k[0]) < 8}
    layer.set_tensors(share)
    x = torch.randn(1, 2048, 576)
    params = list(layer.trainable_parameters().values())
    for p in params:
        p.requires_grad_(True)
    w = torch.randn(1, 2048, 576)
    fast, loop = (layer(x) * w).sum(), (looped_forward(layer, x) * w).sum()
    gf, gl = torch.autograd.grad(fast, params), torch.autograd.grad(loop, params)
    assert abs(fast.item() - loop.item()) < 1e-2 * max(1.0, abs(loop.item()))
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(gf, gl))

    def step(fn):
        return lambda: torch.autograd.grad((fn(layer, x) * w).sum(), params)

    times = interleaved({"batched": step(AMoLELinear.__call__), "expert_loop": step(looped_forward)}, repeats)
    sec = {k: median(v) for k, v in times.items()}
    return {"shape": "2048 tokens, 576 -> 576, r=8, n=8 held, top-2", "seconds_fwd_bwd": sec,
            "speedup_batched_over_loop": sec["expert_loop"] / sec["batched"], "target": ">= 2.0"}


def bench_model(repeats: int, steps: int) -> dict:
    from fedmole.client.data import BatchStream
    from fedmole.client.train import Batches, TrainHooks, local_train
    from fedmole.config import ModelConfig, TrainConfig
    from fedmole.models import load_model

    targets = ["q_proj", "v_proj"]
    lora_model = load_model(ModelConfig(name="smollm2-135m"))
    lora = inject(lora_model, targets, lambda p, lin: LoRALinear(lin, 8, 16.0, 0.05))
    lora.load(lora.init_state(0))
    mole_model = load_model(ModelConfig(name="smollm2-135m"))
    mole = inject(mole_model, targets, lambda p, lin: AMoLELinear(lin, 30, 8, 16.0, 0.05, top_k=2))
    mole.load({k: v for k, v in mole.init_state(0).items() if not k.split("/")[1].isdigit() or int(k.split("/")[1]) < 8})
    lb = [m for m in mole.modules.values()]

    def extra():
        return 1e-3 * torch.stack([m.pop_load_balance() for m in lb]).sum()

    vocab = lora_model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    encoded = []
    for _ in range(64):
        ids = torch.randint(0, vocab, (128,), generator=gen).tolist()
        encoded.append({"input_ids": ids, "labels": [-100] * 64 + ids[64:]})
    cfg = TrainConfig(lr=1e-4, batch_size=4)
    device = torch.device("cpu")
    streams = {"lora": BatchStream(64, 4, 0, 0), "amole": BatchStream(64, 4, 0, 0)}

    def run(model, adapters, name, extra_loss=None):
        return lambda: local_train(model, list(adapters.parameters().values()), Batches(encoded, streams[name], 0, device),
                                   steps, 1e-4, cfg, TrainHooks(extra_loss))

    fns = {"lora_r8": run(lora_model, lora, "lora"), "amole": run(mole_model, mole, "amole", extra)}
    for fn in fns.values():
        fn()  # warm-up
    times = interleaved(fns, repeats)
    per_step = {k: median(v) / steps for k, v in times.items()}
    return {"model": "smollm2-135m", "batch": "4 x 128 tokens", "adapters": "q_proj, v_proj (60 modules)",
            "amole": "8 held of 30 experts + shared + router, top-2, r=8", "seconds_per_step": per_step,
            "ratio_amole_over_lora": per_step["amole"] / per_step["lora_r8"], "target": "<= 1.3"}


def bench_rsea(repeats: int) -> dict:
    N, modules, r, lo, hi = 30, 60, 8, 2, 8
    out = {}
    for C in (10, 100, 1000):
        k = max(2, math.ceil(C * lo / N))  # the smallest feasible expert_choices
        assert rsea.feasibility_problem(N, k, C, lo, hi) is None
        rng = np.random.default_rng(C)
        walls, cpus = [], []
        for _ in range(repeats):
            U, T = rng.normal(size=(modules, N, r)), rng.normal(size=(modules, C, r))
            w0, c0 = time.perf_counter(), time.process_time()
            X = rsea.solve_assignment(rsea.affinity(U, T), k, lo, hi)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            assert (X.sum(-1) == k).all() and (X.sum(-2) >= lo).all() and (X.sum(-2) <= hi).all()
        out[str(C)] = {"expert_choices": k, "seconds_per_round": median(walls), "cpu_seconds_per_round": median(cpus)}
    return {"experts": N, "modules": modules, "bounds": [lo, hi], "by_clients": out, "target": "C=1000 < 5 s"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-model", action="store_true", help="skip the SmolLM2 training-step comparison")
    args = ap.parse_args()

    result = {"layer": bench_layer(args.repeats)}
    lay = result["layer"]
    print(f"layer fwd+bwd  batched {lay['seconds_fwd_bwd']['batched'] * 1e3:.1f} ms   expert loop "
          f"{lay['seconds_fwd_bwd']['expert_loop'] * 1e3:.1f} ms   speedup {lay['speedup_batched_over_loop']:.2f}x "
          f"(target >= 2)")
    if not args.skip_model:
        result["train_step"] = m = bench_model(args.repeats, args.steps)
        print(f"SmolLM2 step   AMoLE {m['seconds_per_step']['amole']:.3f} s   LoRA r=8 "
              f"{m['seconds_per_step']['lora_r8']:.3f} s   ratio {m['ratio_amole_over_lora']:.2f} (target <= 1.3)")
    result["rsea"] = rs = bench_rsea(max(1, args.repeats // 2))
    for C, v in rs["by_clients"].items():
        print(f"RSEA C={C:>4} k_c={v['expert_choices']:>2}  {v['seconds_per_round']:.2f} s/round wall, "
              f"{v['cpu_seconds_per_round']:.2f} s CPU (60 modules, N=30)")
    print(f"wrote {record('amole', result)}")


if __name__ == "__main__":
    main()
