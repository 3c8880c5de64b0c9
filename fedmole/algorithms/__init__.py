"""Federated methods. Each module defines `build_adapters(model, cfg)`, `Server` (a Strategy) and
`Client` (a ClientProcedure); `get_algorithm(name)` returns the module.

A method is registered once, by the `@algorithm(name, module=...)` decorator on its config section in
fedmole/config.py: the schema of its keys and the module implementing it come from that one registry."""

from __future__ import annotations

import importlib
from types import ModuleType

from fedmole.config import ALGORITHMS


def get_algorithm(name: str) -> ModuleType:
    return importlib.import_module(ALGORITHMS[name].module)
