"""The GPU check: every algorithm's smoke run on CUDA against the same run on the CPU, in fp32 and bf16, and the
AMoLE and SMoE layers on the GPU against their naive loops. `benchmarks/device/check.sh` installs what the
GPU machine lacks and runs this; without a GPU the same checks run on the CPU (the fallback the test suite
runs), where the "device" run is a second CPU run.

    python -m benchmarks.device.check [--quick] [--configs NAME ...] [--set KEY=VALUE ...] [--out FILE]

1. Runs. Each smoke config (`RUNS`: every algorithm) runs through `fedmole run` twice per precision, on the CPU
   (one torch thread) and on `cuda:0`, with fewer rounds and steps than the smoke configs so that 40 runs fit the
   time budget. The CUDA run's metric records must match the CPU run's record by record (`TOLERANCE`):
   every `loss` within a relative tolerance (fp32 2e-3, bf16 5e-2), and at most a share of the per-example
   scores (accuracy, ROUGE-L F, score) different at all (fp32 10 %, bf16 30 %: an argmax over a near tie may
   flip). The largest differences and the final global states' largest difference are reported.
2. Layers, forward + backward, batched vs a Python loop over experts, median of repeats after a warm-up:
   AMoLE at SmolLM2-135M q_proj shapes (2048 tokens, d = 576, r = 8, 8 held of 30 experts, top-2) and the
   adapted SMoE block at OLMoE-1B-7B shapes (4096 tokens, d = 2048, I = 1024, 64 experts, top-8, r = 8);
   `--quick` (and the CPU) use small shapes. Both implementations must agree before they are timed.

Prints one JSON result and writes it to `--out` (default: benchmarks/results/device.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RUNS = {  # name -> (config file, overrides): every algorithm
    "fedit": ("smoke.yaml", []),
    "local": ("smoke.yaml", ["algorithm.name=local"]),
    "fdlora": ("smoke.yaml", ["algorithm.name=fdlora", "algorithm.sync_freq=1"]),
    "ffa_lora": ("smoke.yaml", ["algorithm.name=ffa_lora"]),
    "flexlora": ("smoke.yaml", ["algorithm.name=flexlora"]),
    "flora": ("smoke.yaml", ["algorithm.name=flora"]),
    "hetlora": ("smoke.yaml", ["algorithm.name=hetlora"]),
    "fedamole": ("smoke_fedamole.yaml", []),
    "flame": ("smoke_flame.yaml", []),
    "flame_dense": ("smoke_flame_dense.yaml", []),
}
SHORT = ["federation.rounds=2", "train.local_steps=2", "eval.max_examples=4", "output.progress=none"]
TOLERANCE = {  # loss: relative (to max(|cpu|, 1)); scores: share of records that may differ
    "fp32": {"loss_rtol": 2e-3, "score_share": 0.10},
    "bf16": {"loss_rtol": 5e-2, "score_share": 0.30},
}
SCORES = ("score", "accuracy", "rouge_l")


# ------------------------------------------------------------------------------------------------ runs
def run_one(name: str, device: str, precision: str, out: Path, extra: list[str]) -> dict:
    """One `fedmole run` in a child process; (wall seconds, return code, the tail of its output)."""
    config, overrides = RUNS[name]
    sets = [*overrides, *SHORT, f"train.device={device}", f"train.precision={precision}", *extra]
    if device == "cpu":
        sets.append("train.num_threads=1")
    cmd = [sys.executable, "-m", "fedmole.cli", "run", str(CONFIGS / config), "--out", str(out), "--overwrite",
           "--progress", "none", *[a for s in sets for a in ("--set", s)]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    return {"seconds": round(time.perf_counter() - start, 2), "returncode": proc.returncode,
            "tail": (proc.stdout + proc.stderr)[-2000:] if proc.returncode else ""}


def records(run_dir: Path) -> dict[tuple, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if isinstance(r["value"], (int, float)) and r["split"] != "round":
            out[(r["round"], r["client"], r["model"], r["split"], r["metric"])] = float(r["value"])
    return out


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    return load_file(last / "server.safetensors")


def compare(cpu_dir: Path, dev_dir: Path, precision: str) -> dict:
    """The CUDA run against the CPU run, record by record, under `TOLERANCE[precision]`."""
    tol = TOLERANCE[precision]
    a, b = records(cpu_dir), records(dev_dir)
    missing = sorted(set(a) ^ set(b))
    loss_keys = [k for k in a if k in b and k[4] == "loss"]
    score_keys = [k for k in a if k in b and k[4] in SCORES]
    loss_err = max((abs(a[k] - b[k]) / max(abs(a[k]), 1.0) for k in loss_keys), default=0.0)
    differ = sum(abs(a[k] - b[k]) > 1e-6 for k in score_keys)
    share = differ / len(score_keys) if score_keys else 0.0
    sa, sb = final_state(cpu_dir), final_state(dev_dir)
    state_err = max(((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if k in sb and sa[k].numel()),
                    default=0.0)
    ok = not missing and bool(loss_keys) and loss_err <= tol["loss_rtol"] and share <= tol["score_share"]
    return {"ok": ok, "records": len(a), "missing_records": len(missing), "loss_max_rel_diff": loss_err,
            "scores_differing": f"{differ}/{len(score_keys)}", "state_max_abs_diff": state_err}


def check_runs(names: list[str], precisions: list[str], device: str, extra: list[str], work: Path) -> dict:
    jobs = [(n, d, p) for n in names for p in precisions for d in ("cpu", device)]
    if device == "cpu":  # fallback: the "device" run is a second CPU run in its own directory
        jobs = [(n, d, p) for n in names for p in precisions for d in ("cpu", "cpu-again")]
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2, 8))
    with ThreadPoolExecutor(workers) as pool:
        done = dict(zip(jobs, pool.map(
            lambda j: run_one(j[0], "cpu" if j[1] == "cpu-again" else j[1], j[2], work / f"{j[0]}-{j[2]}-{j[1]}", extra),
            jobs)))
    out = {}
    for n in names:
        for p in precisions:
            cpu, dev = (n, "cpu", p), next(j for j in jobs if j[0] == n and j[2] == p and j[1] != "cpu")
            entry = {"cpu_seconds": done[cpu]["seconds"], "device_seconds": done[dev]["seconds"]}
            failed = [done[j]["tail"] for j in (cpu, dev) if done[j]["returncode"]]
            if failed:
                entry.update(ok=False, error=failed[0])
            else:
                entry.update(compare(work / f"{n}-{p}-cpu", work / f"{n}-{p}-{dev[1]}", p))
            out[f"{n}/{p}"] = entry
            print(f"{n:12s} {p}  {'ok  ' if entry['ok'] else 'FAIL'}  " + (
                f"loss rel diff {entry['loss_max_rel_diff']:.1e}  scores differing {entry['scores_differing']}  "
                f"state diff {entry['state_max_abs_diff']:.1e}" if "error" not in entry else entry["error"][-300:]),
                flush=True)
    return out


# ---------------------------------------------------------------------------------------------- layers
def looped_smoe(layer, hidden: torch.Tensor) -> torch.Tensor:
    """The adapted SMoE block's output computed expert by expert in a Python loop (gather each expert's
    tokens, run its projections with their LoRA, scatter back weighted by the gate): the naive dispatch."""
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])  # (N, d)
    W_g = layer.W_r if layer.router_trainable else layer.router.weight
    g, idx = layer.route(F.linear(x.to(W_g.dtype), W_g))  # (N, k)
    W_gate, W_up = layer.experts.gate_up_proj.chunk(2, dim=1)

    def proj(name, W, v, j):
        out = v @ W[j].t()
        if name not in layer.A:
            return out
        lora = ((v.to(layer.A[name].dtype) @ layer.A[name][j].t()) * layer.scaling) @ layer.B[name][j].t()
        return out + lora.to(out.dtype)

    y = torch.zeros_like(x)
    for j in range(layer.M):
        tok, slot = (idx == j).nonzero(as_tuple=True)
        if len(tok):
            v = x[tok]
            inner = layer.experts.act_fn(proj("gate", W_gate, v, j)) * proj("up", W_up, v, j)
            out = proj("down", layer.experts.down_proj, inner, j)
            y = y.index_add(0, tok, out * (g[tok, slot] * layer.s).unsqueeze(-1).to(out.dtype))
    return y.view(shape)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each fn, alternating, after one warm-up each."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    _sync(device)
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench_amole(device: torch.device, quick: bool, repeats: int) -> dict:
    from benchmarks.perf.amole import looped_forward
    from fedmole.adapters.mole import AMoLELinear

    tokens, d, pool, held = (256, 64, 8, 4) if quick else (2048, 576, 30, 8)
    torch.manual_seed(0)
    layer = AMoLELinear(torch.nn.Linear(d, d, bias=False).requires_grad_(False), pool, 8, 16.0, 0.0, top_k=2)
    gen = torch.Generator().manual_seed(1)
    share = {k: (torch.randn(v.shape, generator=gen) * 0.02 if k[1] == "B" else v)
             for k, v in layer.init_tensors(gen).items() if not k[0].isdigit() or int(k[0]) < held}
    layer.set_tensors(share)
    layer.to(device)
    params = list(layer.trainable_parameters().values())
    for p in params:
        p.requires_grad_(True)
    x, w = torch.randn(1, tokens, d, device=device), torch.randn(1, tokens, d, device=device)
    fast, slow = layer(x), looped_forward(layer, x)
    err = (fast - slow).abs().max().item()
    assert err < 1e-3, f"AMoLE batched and looped outputs differ by {err}"

    def step(fn):
        return lambda: torch.autograd.grad((fn(layer, x) * w).sum(), params)

    sec = time_pair({"batched": step(type(layer).__call__), "expert_loop": step(looped_forward)}, device, repeats)
    return {"shape": f"{tokens} tokens, {d} -> {d}, r=8, {held} held of {pool}, top-2", "max_abs_diff": err,
            "seconds_fwd_bwd": sec, "speedup_batched_over_loop": sec["expert_loop"] / sec["batched"]}


def bench_smoe(device: torch.device, quick: bool, repeats: int) -> dict:
    from fedmole.adapters.smoe import MoEContext, SparseMoELoRA
    from fedmole.models.tiny import tiny_olmoe

    tokens, d, inter, experts, k = (256, 64, 128, 8, 4) if quick else (4096, 2048, 1024, 64, 8)
    torch.manual_seed(0)
    model = tiny_olmoe(64, num_experts=experts, top_k=k, hidden_size=d, intermediate_size=inter, num_layers=1)
    layer = SparseMoELoRA(model.model.layers[0].mlp, 8, 16.0, 0.0, MoEContext())
    gen = torch.Generator().manual_seed(1)
    layer.set_tensors({key: (torch.randn(v.shape, generator=gen) * 0.02 if key[1].endswith("B") else v)
                       for key, v in layer.init_tensors(gen).items()})
    layer.to(device)
    params = [p for (expert, _), p in layer.trainable_parameters().items() if expert != "rescaler"]
    for p in params:
        p.requires_grad_(True)
    x, w = torch.randn(1, tokens, d, device=device), torch.randn(1, tokens, d, device=device)
    fast, slow = layer(x), looped_smoe(layer, x)
    err = (fast - slow).abs().max().item()
    assert err < 1e-3 * max(1.0, slow.abs().max().item()), f"SMoE batched and looped outputs differ by {err}"

    def step(fn):
        return lambda: torch.autograd.grad((fn(layer, x) * w).sum(), params)

    sec = time_pair({"batched": step(type(layer).__call__), "expert_loop": step(looped_smoe)}, device, repeats)
    return {"shape": f"{tokens} tokens, d={d}, I={inter}, {experts} experts, top-{k}, r=8 on gate/up/down",
            "max_abs_diff": err, "seconds_fwd_bwd": sec, "speedup_batched_over_loop": sec["expert_loop"] / sec["batched"]}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fp32 only, small layer shapes (the CPU fallback's test)")
    ap.add_argument("--configs", nargs="*", default=list(RUNS), choices=list(RUNS), help="which runs (default all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra override for every run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "device.json")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = "cuda:0" if gpu else "cpu"
    precisions = ["fp32"] if args.quick else ["fp32", "bf16"]
    print(f"device: {torch.cuda.get_device_name(0) if gpu else 'no GPU: CPU fallback'}  torch {torch.__version__}",
          flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmole-device-") as work:
        runs = check_runs(args.configs, precisions, device, args.overrides, Path(work))
    dev = torch.device(device)
    small = args.quick or not gpu
    layers = {"amole": bench_amole(dev, small, args.repeats), "smoe": bench_smoe(dev, small, args.repeats)}
    for name, r in layers.items():
        print(f"{name:6s} layer  batched {r['seconds_fwd_bwd']['batched'] * 1e3:.2f} ms  expert loop "
              f"{r['seconds_fwd_bwd']['expert_loop'] * 1e3:.2f} ms  speedup {r['speedup_batched_over_loop']:.1f}x  "
              f"({r['shape']})", flush=True)
    ok = all(r["ok"] for r in runs.values())
    result = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (fallback: no GPU)", "torch": torch.__version__,
              "cuda": torch.version.cuda, "ok": ok, "tolerance": TOLERANCE, "runs": runs, "layers": layers,
              "seconds": round(time.perf_counter() - start, 1), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{'all runs match' if ok else 'MISMATCH'} ({result['seconds']} s); wrote {args.out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
