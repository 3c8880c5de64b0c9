"""fedmole's local training loop vs a plain transformers + peft loop.

SmolLM2-135M-Instruct, LoRA r=8 (alpha 16) on q_proj and v_proj, batch 4 x 128 tokens, Adam, fp32 on CPU.
Both loops see identical batches; they run alternately in one process and the median time per step is
compared. Target (issue 2): fedmole / plain <= 1.10.

    python -m benchmarks.perf.train_loop [--steps 4] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, median, record
from fedmole.adapters import LoRALinear, inject
from fedmole.client.data import BatchStream
from fedmole.client.train import Batches, local_train
from fedmole.config import ModelConfig, TrainConfig
from fedmole.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    cfg_model = ModelConfig(name=args.model)
    ours = load_model(cfg_model)
    adapters = inject(ours, ["q_proj", "v_proj"], lambda p, lin: LoRALinear(lin, 8, 16.0, 0.05))
    adapters.load(adapters.init_state(0))
    params = list(adapters.parameters().values())
    plain = get_peft_model(load_model(cfg_model), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                           target_modules=["q_proj", "v_proj"]))
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(p.numel() for p in plain_params)

    vocab = ours.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    encoded = []
    for _ in range(64):
        ids = torch.randint(0, vocab, (128,), generator=gen).tolist()
        encoded.append({"input_ids": ids, "labels": [-100] * 64 + ids[64:]})
    train_cfg = TrainConfig(lr=1e-4, batch_size=4)
    stream = BatchStream(len(encoded), 4, seed=0, client_id=0)
    device = torch.device("cpu")

    def fedmole_loop():
        local_train(ours, params, Batches(encoded, stream, 0, device), args.steps, 1e-4, train_cfg)

    batches = [torch.tensor([encoded[i]["input_ids"] for i in range(j, j + 4)]) for j in range(0, 64, 4)]
    labels = [torch.tensor([encoded[i]["labels"] for i in range(j, j + 4)]) for j in range(0, 64, 4)]
    cursor = {"i": 0}

    def plain_loop():
        opt = torch.optim.Adam(plain_params, lr=1e-4)
        plain.train()
        for _ in range(args.steps):
            i = cursor["i"] % len(batches)
            cursor["i"] += 1
            loss = plain(input_ids=batches[i], attention_mask=torch.ones_like(batches[i]), labels=labels[i]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    fedmole_loop(), plain_loop()  # warm-up
    times = interleaved({"fedmole": fedmole_loop, "plain": plain_loop}, args.repeats)
    per_step = {k: median(v) / args.steps for k, v in times.items()}
    ratio = per_step["fedmole"] / per_step["plain"]
    print(f"step time  fedmole {per_step['fedmole']:.3f} s   transformers+peft {per_step['plain']:.3f} s   "
          f"ratio {ratio:.3f} (target <= 1.10)")
    path = record("train_loop", {
        "model": args.model, "batch": "4 x 128 tokens", "lora": "r=8 alpha=16 on q_proj, v_proj",
        "steps_per_repeat": args.steps, "repeats": args.repeats,
        "seconds_per_step": per_step, "ratio_fedmole_over_plain": ratio, "target": "<= 1.10",
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
