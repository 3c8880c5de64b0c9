"""Federated methods. Each module defines `build_adapters(model, cfg)`, `Server` (a Strategy) and
`Client` (a ClientProcedure); `get_algorithm(name)` returns the module."""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {
    "fedit": "fedmole.algorithms.fedit",
    "local": "fedmole.algorithms.local",
    "ffa_lora": "fedmole.algorithms.ffa_lora",
    "hetlora": "fedmole.algorithms.hetlora",
    "flexlora": "fedmole.algorithms.flexlora",
    "flora": "fedmole.algorithms.flora",
    "fdlora": "fedmole.algorithms.fdlora",
    "fedamole": "fedmole.algorithms.fedamole",
    "flame": "fedmole.algorithms.flame",
}


def get_algorithm(name: str) -> ModuleType:
    return importlib.import_module(MODULES[name])
