"""Server aggregation time for 1000 clients on the tiny model, for every federated method.

For each method, one real round with 2 clients gives a template reply (its JSON extras: activation
counts, ranks...). The strategy is then built for 1000 clients; every client's reply is synthesised from
what it may upload (`Strategy.reply_spec`: the tensors it was sent, perturbed, plus method statistics
such as FedAMoLE's embeddings) and the template's extras. Timed: `aggregate_train` over all 1000
replies (for FedAMoLE this includes RSEA over all modules), median of a few repeats.

    python -m benchmarks.perf.aggregation [--clients 1000]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import median, record

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["fedit", "ffa_lora", "hetlora", "flexlora", "flora", "fdlora", "fedamole", "flame"]


def overrides(name: str, clients: int) -> list[str]:
    out = [f"algorithm.name={name}", f"federation.num_clients={clients}"]
    if name == "fedamole":  # C * min_experts <= N * k_c needs k_c >= 2C/N at this scale
        out.append(f"algorithm.expert_choices={max(2, -(-2 * clients // 30))}")
    return out


def template_reply(name: str):
    import fedmole.run as run
    from fedmole.config_io import load_config

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"algorithm.name={name}", "data.max_examples=600",
                                                         "train.local_steps=1"])
    with tempfile.TemporaryDirectory() as d:
        fed = run._setup(cfg, Path(d), "none")
        plans = fed.strategy.configure_train(1, list(range(cfg.federation.num_clients)), False)
        replies, failures = fed.engine.train(1, {c: plans[c] for c in (0, 1)})
    assert not failures, failures
    return replies[0], fed.engine.runtime


def synthetic_replies(strategy, plans, template, gen):
    from fedmole.messages import Reply

    out = {}
    for cid, payload in plans.items():
        tensors = {}
        for k, (shape, dtype) in strategy.reply_spec(cid, payload).items():
            base = payload.tensors.get(k)
            noise = torch.randn(shape, generator=gen) * 1e-3
            tensors[k] = (noise if base is None else base + noise).to(dtype)
        out[cid] = Reply(tensors, int(torch.randint(20, 200, (1,), generator=gen)), dict(template.metrics), [],
                         copy.deepcopy(template.extra))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    args = ap.parse_args()

    from fedmole.algorithms import get_algorithm
    from fedmole.config_io import load_config

    results = {}
    for name in args.methods:
        template, runtime = template_reply(name)
        cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides(name, args.clients))
        runtime.cfg = cfg
        times, state_mb = [], 0.0
        for rep in range(args.repeats):
            strategy = get_algorithm(name).Server(cfg, runtime.adapters)
            plans = strategy.configure_train(1, list(range(args.clients)), False)
            replies = synthetic_replies(strategy, plans, template, torch.Generator().manual_seed(rep))
            state_mb = sum(t.numel() * t.element_size() for r in replies.values() for t in r.tensors.values()) / 2**20
            t = time.perf_counter()
            strategy.aggregate_train(1, replies)
            times.append(time.perf_counter() - t)
        results[name] = {"seconds": median(times), "reply_mib_total": state_mb}
        print(f"{name:10s} aggregate {args.clients} replies ({state_mb:7.1f} MiB): {median(times):7.3f} s")
    print(f"wrote {record('aggregation_1000_clients', {'clients': args.clients, 'model': 'tiny-llama (smoke.yaml)', 'methods': results})}")


if __name__ == "__main__":
    main()
