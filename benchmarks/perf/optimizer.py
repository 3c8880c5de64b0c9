"""The clients' optimiser update under each `train.optimizer_impl`: one step over LoRA factors shaped like
FLAME's dense variant on SmolLM2-135M (8 experts of rank 64 on every linear of 30 blocks: 157 M numbers, every
one updated every step, since FLAME trains every expert), and over the suite's LoRA (r = 8 on q, v: 0.46 M).

    python -m benchmarks.perf.optimizer [--optimizer adamw] [--repeats 5] [--scale 1.0]

Every implementation updates the same parameters with the same gradients (each keeps its own moments), in
turn so drift hits all alike; the median step time is reported, and how far foreach and fused land from the
loop after three identical steps on a copy (float rounding). `--scale` shrinks the expert count for a quick
check. Writes "optimizer" in benchmarks/results/perf.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, median, record
from fedmole.client.train import make_optimizer
from fedmole.config import TrainConfig

IMPLS = ("auto", "loop", "foreach", "fused")
HIDDEN, KV, INTERMEDIATE, LAYERS = 576, 192, 1536, 30  # SmolLM2-135M
MODULES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
           "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}


def factors(modules: list[str], experts: int, rank: int) -> list[torch.nn.Parameter]:
    """A (r, d_in) and B (d_out, r) per expert, module and block."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(LAYERS):
        for m in modules:
            d_in, d_out = MODULES[m]
            for _ in range(experts):
                out += [torch.nn.Parameter(torch.randn(rank, d_in, generator=gen) * 0.01),
                        torch.nn.Parameter(torch.randn(d_out, rank, generator=gen) * 0.01)]
    return out


def rounding_gap(params: list[torch.nn.Parameter], optimizer: str, impl: str) -> float:
    """Max |impl - loop| over the first 20 tensors after 3 identical steps from the same start."""
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in params[:20]] for _ in range(3)]
    ends = {}
    for name in ("loop", impl):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params[:20]]
        opt = make_optimizer(ps, TrainConfig(optimizer=optimizer, optimizer_impl=name, weight_decay=0.01), 1e-4)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        ends[name] = ps
    return max((a - b).abs().max().item() for a, b in zip(ends["loop"], ends[impl]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", default="adamw", choices=["adam", "adamw", "sgd"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of FLAME's 8 experts (quick checks)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = {"flame_all_linear": (list(MODULES), max(1, round(8 * args.scale)), 64),
                "suite_lora_qv": (["q", "v"], 1, 8)}
    result = {"optimizer": args.optimizer, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "settings": {}}
    for name, (modules, experts, rank) in settings.items():
        params = factors(modules, experts, rank)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        cfg = {impl: TrainConfig(optimizer=args.optimizer, optimizer_impl=impl, weight_decay=0.01) for impl in IMPLS}
        opts = {impl: make_optimizer(params, cfg[impl], 1e-4) for impl in IMPLS}
        fns = {impl: opts[impl].step for impl in IMPLS}
        for fn in fns.values():  # warm-up: allocates the moments
            fn()
        step_s = {impl: median(t) for impl, t in interleaved(fns, args.repeats).items()}
        result["settings"][name] = {
            "tensors": len(params), "numbers": sum(p.numel() for p in params),
            "layout": f"{experts} expert(s) of rank {rank} on {','.join(modules)} x {LAYERS} blocks",
            "step_seconds": step_s,
            "speedup_over_auto": {impl: step_s["auto"] / step_s[impl] for impl in IMPLS},
            "max_abs_gap_to_loop_after_3_steps": {impl: rounding_gap(params, args.optimizer, impl)
                                                  for impl in ("foreach", "fused")},
        }
        del opts, fns, params
    out = record("optimizer", result)
    print(f"{args.optimizer} step, {result['threads']} threads, median of {args.repeats}:")
    for name, e in result["settings"].items():
        print(f"  {name}: {e['numbers'] / 1e6:.1f} M numbers in {e['tensors']} tensors ({e['layout']})")
        for impl in IMPLS:
            print(f"    {impl:<8} {e['step_seconds'][impl]:8.4f} s  ({e['speedup_over_auto'][impl]:.2f}x auto)")
        print(f"    gap to the loop after 3 steps: {e['max_abs_gap_to_loop_after_3_steps']}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
