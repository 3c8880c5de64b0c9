"""One LoRA-expert pool (FLAME's dense variant) in isolation: forward + backward time by dispatch and k, against
the price of a single LoRA of the same rank over the same rows (what k = 1 would cost with no routing and no
grouping), on the shapes of SmolLM2-135M's linear layers.

    python -m benchmarks.perf.pool_dispatch                   # 512 rows (batch 4 x 128), rank 64, 8 experts
    python -m benchmarks.perf.pool_dispatch --repeats 20      # a quick look

`flame_dense` measures the whole training step, where a pool's own cost hides under the frozen model's; this
separates it. For each shape (d_in -> d_out) it times, interleaved: the frozen linear alone (its input
gradient only), the linear plus one trainable rank-r LoRA, the pool with `dispatch: sparse` at k = 1, 2, 4
and with the masked computation at k = M. The pool includes its router (softmax, top-k, activation counts,
the load-balancing term). Loss = sum of the output; medians over `--repeats`. Writes "pool_dispatch" in
benchmarks/results/perf.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, median, record
from fedmole.adapters.smoe import LoRAExpertPool, MoEContext

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}


def pool(d_in: int, d_out: int, experts: int, rank: int, dispatch: str, k: int) -> LoRAExpertPool:
    gen = torch.Generator().manual_seed(0)
    layer = LoRAExpertPool(torch.nn.Linear(d_in, d_out, bias=False), experts, experts, rank, 2.0 * rank, 0.0,
                           MoEContext(), dispatch)
    layer.set_tensors({**{(str(j), name): torch.randn(*shape, generator=gen) * 0.02 for j in range(experts)
                          for name, shape in (("A", (rank, d_in)), ("B", (d_out, rank)))},
                       ("router", "W"): torch.randn(experts, d_in, generator=gen),
                       ("rescaler", "log_s"): torch.zeros(1)})
    for p in (layer.A, layer.B, layer.W_r, layer.log_s):
        p.requires_grad_(True)
    layer.set_active_experts(k)
    return layer.train()


def contenders(d_in: int, d_out: int, rows: int, experts: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, d_in, generator=gen, requires_grad=True)
    base = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    A = (torch.randn(rank, d_in, generator=gen) * 0.02).requires_grad_(True)
    B = (torch.randn(d_out, rank, generator=gen) * 0.02).requires_grad_(True)
    fns = {"frozen linear": lambda: base(x).sum().backward(),
           "linear + one LoRA": lambda: (base(x) + (x @ A.t()) @ B.t()).sum().backward()}
    for k in (1, 2, 4):
        layer = pool(d_in, d_out, experts, rank, "sparse", k)
        fns[f"sparse k={k}"] = lambda layer=layer: layer(x).sum().backward()
    masked = pool(d_in, d_out, experts, rank, "dense", experts)
    fns[f"masked k={experts}"] = lambda: masked(x).sum().backward()
    return fns


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512, help="tokens per step (batch x sequence)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {}
    for name, (d_in, d_out) in SHAPES.items():
        fns = contenders(d_in, d_out, args.rows, args.experts, args.rank)
        interleaved(fns, 3)  # warm-up
        ms = {k: round(median(v) * 1e3, 3) for k, v in interleaved(fns, args.repeats).items()}
        ideal = ms["linear + one LoRA"]
        shapes[name] = {"d_in": d_in, "d_out": d_out, "ms": ms,
                        "sparse_k1_over_one_lora": round(ms["sparse k=1"] / ideal, 3),
                        "sparse_k1_over_masked": round(ms["sparse k=1"] / ms[f"masked k={args.experts}"], 3)}
        print(f"{name:8s} {d_in:5d} -> {d_out:5d}  " + "  ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    result = {"rows": args.rows, "experts": args.experts, "rank": args.rank, "repeats": args.repeats,
              "shapes": shapes}
    record("pool_dispatch", result)
    return result


if __name__ == "__main__":
    main()
