"""Load time of the built-in SmolLM2-135M-Instruct: first use (GGUF dequantisation + safetensors cache)
and later loads from the cache. Target (issue 2): a cached load under 2 s.

    python -m benchmarks.perf.model_load
"""

from __future__ import annotations

import os
import tempfile
import time

from benchmarks.common import record


def main() -> None:
    from fedmole.config import ModelConfig
    from fedmole.models import load_model, load_tokenizer

    cfg = ModelConfig(name="smollm2-135m")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FEDMOLE_CACHE"] = cache  # measure the first conversion in a fresh cache
        t = time.perf_counter()
        load_tokenizer(cfg)
        load_model(cfg)
        first = time.perf_counter() - t
        cached = []
        for _ in range(3):
            t = time.perf_counter()
            load_tokenizer(cfg)
            load_model(cfg)
            cached.append(time.perf_counter() - t)
    best = min(cached)
    print(f"smollm2-135m: first load {first:.1f} s (converts once), cached load {best:.2f} s (target < 2 s)")
    print(f"wrote {record('model_load', {'first_load_s': first, 'cached_load_s': best, 'target': 'cached < 2 s'})}")


if __name__ == "__main__":
    main()
