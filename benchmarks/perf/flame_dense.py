"""FLAME's dense variant (LoRA-expert pools on a dense model): training step time per tier, masked vs sparse
dispatch.

    python -m benchmarks.perf.flame_dense                    # SmolLM2-135M, both settings below (CPU)
    python -m benchmarks.perf.flame_dense --model tiny-llama --batch 2 --seq 32 --repeats 1   # a quick check
    python -m benchmarks.perf.flame_dense --settings all_linear --dispatches sparse --tiers 1 --repeats 45 \
        --name flame_dense_paired_fused          # the k = 1 / k = K ratio of the shipped setting, precisely
    python -m benchmarks.perf.flame_dense --settings all_linear --dispatches sparse --tiers 1 --repeats 45 \
        --optimizer-impl auto --name flame_dense_paired_auto            # the same with torch's default AdamW

Two settings, each measured with `dispatch: dense` (the masked computation: every expert's A_j x, the
unchosen weighted 0) and `dispatch: sparse` (only the chosen experts run):

- `suite`: the accuracy suite's tier scenario, 8 LoRA experts of rank 8 on q_proj and v_proj, top-4 at full
  compute, tiers k = 4, 2, 1. The experts are a small share of the step here (the frozen model dominates), so
  the ratio k=1 / k=K cannot fall far whatever the dispatch;
- `all_linear`: the shipped `configs/flame_dense_sparse.yaml` (its experts, rank, target modules, top-k, tiers
  and `train.optimizer_impl` are read from it): 8 LoRA experts of rank 64 (or `--rank`) on every linear layer
  of every block (q, k, v, o, gate, up, down), top-8 at full compute, tiers k = 8, 4, 2, 1, the fused AdamW:
  the experts carry a large share of the step, the setting where the issue's target (k=1 at most 0.6 of k=K)
  is reachable. Both settings step with lr 1e-4 and weight decay 0.01 (the shipped config has none: one more
  pass over the factors per step here, the same at every k).

One training step = forward + backward + AdamW over the pools' LoRA factors and routers and the rescaler (made
by the clients' own `make_optimizer` with the setting's `train.optimizer_impl`, `fused` (one kernel) for
`all_linear` as its config says, torch's default for `suite` (on CPU a loop over the parameters), or
`--optimizer-impl` for both), on a
fixed random batch whose last `--labelled` positions carry labels (the loss projects only those onto the
vocabulary, as fedmole's training does for response tokens), plus the load-balancing term, as FLAME's loop
adds it. Dropout 0. Settings, dispatches and tiers run round-robin so drift hits all alike; the median over
`--repeats` is reported, and for each dispatch the k = 1 / k = K ratio within each repeat (the two steps run
next to each other) with a bootstrap 95 % interval of its median. The script also records the routing imbalance
M * C / (N * k) of the routers after the timed steps (C: the busiest expert's token count; 1 = perfectly
balanced): the padding the sparse dispatch would need without its grouped kernel (it pads only where that
kernel does not apply); at k = M the sparse dispatch computes as the masked one. Writes the result under
`--name` (default "flame_dense") in benchmarks/results/perf.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import RESULTS, interleaved, median, record
from fedmole.adapters.smoe import LoRAExpertPool
from fedmole.algorithms.flame import RoutedLayers, build_adapters, flops_per_token
from fedmole.client.train import make_optimizer
from fedmole.config import ModelConfig, TrainConfig
from fedmole.config_io import load_config
from fedmole.models import load_model

SHIPPED = RESULTS.parents[1] / "configs" / "flame_dense_sparse.yaml"  # the set-up `all_linear` measures


def settings(rank: int | None = None) -> dict[str, dict]:
    shipped = load_config(SHIPPED)
    a = shipped.algorithm
    return {
        "suite": {"targets": "[q_proj,v_proj]", "experts": 8, "top_k": 4, "rank": 8, "tiers": [4, 2, 1],
                  "optimizer_impl": "auto"},
        "all_linear": {"targets": f"[{','.join(a.target_modules)}]", "experts": a.num_experts, "top_k": a.top_k,
                       "rank": rank or a.rank, "tiers": list(shipped.tiers.levels),
                       "optimizer_impl": shipped.train.optimizer_impl},
    }


def median_ci95(xs: list[float], resamples: int = 4000) -> list[float]:
    """Percentile bootstrap 95 % interval of the median of `xs` (seeded: the same numbers give the same
    interval); with fewer than 3 values, [min, max]."""
    if len(xs) < 3:
        return [min(xs), max(xs)]
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor(xs, dtype=torch.float64)
    meds = t[torch.randint(len(xs), (resamples, len(xs)), generator=gen)].median(dim=1).values
    return [float(meds.quantile(0.025)), float(meds.quantile(0.975))]


class Contender:
    """One (setting, dispatch): a fresh base model with the pools injected, its optimiser and batch."""

    def __init__(self, args, spec: dict, dispatch: str):
        torch.manual_seed(0)
        model = load_model(ModelConfig(name=args.model), "fp32", args.device)
        model.config.use_cache = False
        cfg = load_config(None, ["algorithm.name=flame", "algorithm.experts=lora", "algorithm.dropout=0",
                                 f"algorithm.target_modules={spec['targets']}", f"algorithm.rank={spec['rank']}",
                                 f"algorithm.alpha={2 * spec['rank']}", f"algorithm.num_experts={spec['experts']}",
                                 f"algorithm.top_k={spec['top_k']}", f"algorithm.dispatch={dispatch}"])
        self.adapters = build_adapters(model, cfg)
        self.adapters.load({k: v.to(args.device) for k, v in self.adapters.init_state(0).items()})
        self.model, self.layers = model, RoutedLayers(self.adapters)
        # the load-balancing term, taken after every forward pass as FLAME's training loop takes it (left in the
        # context, each pass's term would keep that pass's whole graph alive: memory grew by ~0.5 GB per step)
        self.aux_loss = self.layers.aux_loss(cfg.algorithm.router_aux_loss_coef)
        groups = [{"params": self.layers.trainable()}, {"params": self.layers.rescaler_parameters(), "lr_scale": 10}]
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        train = TrainConfig(optimizer="adamw", weight_decay=0.01, optimizer_impl=spec["optimizer_impl"])
        self.opt = make_optimizer(groups, train, lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
        labels = ids.clone()
        labels[:, : args.seq - args.labelled] = -100
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": args.labelled + 1}
        self.labels = labels  # not given to the model: it would compute its own loss over all positions
        self.device = args.device

    def step_at(self, k: int):
        def run():
            self.layers.set_k(k)
            self.model.train()
            out = self.model(**self.batch)
            logits = out.logits[:, :-1].float()
            target = self.labels[:, -logits.shape[1]:]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
            loss = loss + self.aux_loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    @torch.no_grad()
    def imbalance(self, k: int) -> float:
        """Mean over pools of M * C / (N * k) for the batch at k (the busiest expert's share over a fair share)."""
        factors = []
        original = LoRAExpertPool.route

        def spy(pool, logits):
            g, idx = original(pool, logits)
            counts = torch.bincount(idx.reshape(-1), minlength=pool.M)
            factors.append(float(pool.M * counts.max()) / idx.numel())
            return g, idx

        LoRAExpertPool.route = spy
        try:
            self.layers.set_k(k)
            self.model.eval()
            self.model(**self.batch)
        finally:
            LoRAExpertPool.route = original
        return sum(factors) / len(factors)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a fedmole model name (smollm2-135m, tiny-llama, ...)")
    ap.add_argument("--settings", default="suite,all_linear", help="comma-separated: suite, all_linear")
    ap.add_argument("--rank", type=int, default=None,
                    help="LoRA rank of the all_linear setting (default: its config's, 64)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--labelled", type=int, default=16, help="labelled (loss) positions at the end of each row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimizer-impl", default=None, choices=["auto", "loop", "foreach", "fused"],
                    help="train.optimizer_impl of the clients' AdamW in every setting (default: each setting's own, "
                         "fused for all_linear, auto = torch's default for suite)")
    ap.add_argument("--name", default="flame_dense", help="the key of the result in perf.json")
    ap.add_argument("--dispatches", default="dense,sparse", help="comma-separated: dense, sparse")
    ap.add_argument("--tiers", default=None, help="comma-separated k to measure (default: each setting's tiers; "
                    "1 and K are always measured)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    specs = {name: spec for name, spec in settings(args.rank).items() if name in args.settings.split(",")}
    for spec in specs.values():
        spec["optimizer_impl"] = args.optimizer_impl or spec["optimizer_impl"]
    if args.tiers:
        for spec in specs.values():
            wanted = {1, spec["top_k"], *map(int, args.tiers.split(","))}
            spec["tiers"] = [k for k in spec["tiers"] if k in wanted]
    dispatches = [d for d in ("dense", "sparse") if d in args.dispatches.split(",")]
    contenders = {(name, d): Contender(args, spec, d) for name, spec in specs.items() for d in dispatches}
    fns = {(name, d, k): c.step_at(k) for (name, d), c in contenders.items() for k in specs[name]["tiers"]}
    for fn in fns.values():  # warm-up
        fn()
    times = interleaved(fns, args.repeats)
    step_s = {key: median(t) for key, t in times.items()}

    result = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
              "batch": f"{args.batch} x {args.seq} tokens, loss on the last {args.labelled}",
              "repeats": args.repeats, "settings": {}}
    for name, spec in specs.items():
        K, tiers = spec["top_k"], spec["tiers"]
        probe = contenders[(name, dispatches[-1])]  # the flops, pools and routing are the same in both
        flops = {k: flops_per_token(probe.model, probe.layers, k)["train"] for k in tiers}
        entry = {"pools": f"{spec['experts']} LoRA experts of rank {spec['rank']} (alpha {2 * spec['rank']}) on "
                          f"{spec['targets']}, top-{K} at full compute, {len(probe.layers.layers)} pools",
                 "optimizer_impl": spec["optimizer_impl"],
                 "trainable_parameters": sum(p.numel() for p in probe.layers.trainable())}
        for d in dispatches:
            s = {k: step_s[(name, d, k)] for k in tiers}
            # k = 1 over k = K within each repeat (measured next to each other): the spread of the ratio
            paired = [a / b for a, b in zip(times[(name, d, 1)], times[(name, d, K)])]
            entry[d] = {"step_seconds": {str(k): s[k] for k in tiers},
                        "step_ratio_to_K": {str(k): s[k] / s[K] for k in tiers},
                        "ratio_k1_over_kK": s[1] / s[K],
                        "ratio_k1_over_kK_per_repeat": paired,
                        "ratio_k1_over_kK_median_ci95": median_ci95(paired)}
        if len(dispatches) == 2:
            entry["sparse_k1_over_dense_kK"] = step_s[(name, "sparse", 1)] / step_s[(name, "dense", K)]
        entry["analytic_train_flops_ratio_to_K"] = {str(k): flops[k] / flops[K] for k in tiers}
        entry["routing_imbalance"] = {str(k): probe.imbalance(k) for k in tiers}
        result["settings"][name] = entry
    result["target"] = "sparse ratio_k1_over_kK <= 0.6 where the experts carry enough of the step (all_linear)"
    out = record(args.name, result)

    print(f"FLAME dense variant, training step per tier ({args.model}, {result['batch']}, {args.device}, "
          f"{result['threads']} threads):")
    for name, entry in result["settings"].items():
        print(f"  {name}: {entry['pools']}, optimizer_impl {entry['optimizer_impl']}")
        for k in specs[name]["tiers"]:
            cells = [f"{d} {entry[d]['step_seconds'][str(k)]:7.3f} s ({entry[d]['step_ratio_to_K'][str(k)]:.3f})"
                     for d in dispatches]
            print(f"    k={k:<2} " + "   ".join(cells) + f"   imbalance {entry['routing_imbalance'][str(k)]:.2f}"
                  f"   analytic FLOPs ratio {entry['analytic_train_flops_ratio_to_K'][str(k)]:.3f}")
        for d in dispatches:
            lo, hi = entry[d]["ratio_k1_over_kK_median_ci95"]
            print(f"    ratio k=1 / k=K, {d}: {entry[d]['ratio_k1_over_kK']:.3f} (paired per repeat: median 95 % "
                  f"interval [{lo:.3f}, {hi:.3f}])")
        if "sparse_k1_over_dense_kK" in entry:
            print(f"    sparse k=1 / dense k=K {entry['sparse_k1_over_dense_kK']:.3f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
