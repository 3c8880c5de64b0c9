"""Injection of adapter modules into a frozen base model, and the set of injected adapters.

`inject(model, target_modules, factory)` replaces every `nn.Linear` whose path matches one of the patterns
(peft semantics: a pattern matches a module path equal to it or ending in `.pattern`; a pattern starting
with `^` is a regular expression that must match the whole path) by `factory(path, linear)`.

An adapter module exposes its trainable tensors by expert id through three methods:
`get_tensors()`, `set_tensors(tensors)` and `init_tensors(generator)`, each keyed by `(expert, name)`.
`AdapterSet` turns these into the flat `"{module}/{expert}/{name}"` vocabulary of `adapters.state`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fedmole.adapters.state import key, parse_key
from fedmole.errors import UserError


def matches(path: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if pat.startswith("^"):
            if re.fullmatch(pat, path):
                return True
        elif path == pat or path.endswith("." + pat):
            return True
    return False


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def inject(model: nn.Module, target_modules: list[str], factory: Callable[[str, nn.Linear], nn.Module]) -> "AdapterSet":
    targets = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and matches(name, target_modules)]
    if not targets:
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(
            f"algorithm.target_modules={target_modules} matches no linear layer of this model; "
            f"its linear layers are named: {', '.join(linears)}"
        )
    modules = {}
    for path in targets:
        adapter = factory(path, model.get_submodule(path))
        _set_submodule(model, path, adapter)
        modules[path] = adapter
    return AdapterSet(model, modules)


class AdapterSet:
    """The adapters injected into one model, addressed by flat expert keys."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]):
        self.model = model
        self.modules = dict(sorted(modules.items()))

    def __iter__(self):
        return iter(self.modules.items())

    def parameters(self) -> dict[str, nn.Parameter]:
        """Every trainable tensor the adapters currently hold, by flat key.

        A module whose storage differs from its per-expert tensors (several experts batched in one tensor)
        lists its real parameters with an optional `trainable_parameters()`, keyed like `get_tensors()`."""
        out = {}
        for path, mod in self.modules.items():
            tensors = mod.trainable_parameters() if hasattr(mod, "trainable_parameters") else mod.get_tensors()
            for (expert, name), t in tensors.items():
                if isinstance(t, nn.Parameter):
                    out[key(path, expert, name)] = t
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """A detached fp32 CPU copy of every tensor the adapters hold."""
        out = {}
        for path, mod in self.modules.items():
            for (expert, name), t in mod.get_tensors().items():
                out[key(path, expert, name)] = t.detach().to("cpu", torch.float32, copy=True)
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set adapter tensors from flat keys; each module receives all of its keys at once."""
        grouped: dict[str, dict] = defaultdict(dict)
        for k, v in state.items():
            module, expert, name = parse_key(k)
            if module not in self.modules:
                raise KeyError(f"state key {k} names no adapted module")
            grouped[module][(expert, name)] = v
        for module, tensors in grouped.items():
            self.modules[module].set_tensors(tensors)
        for p in self.parameters().values():  # frozen until a training loop asks for gradients
            p.requires_grad_(False)

    def settings(self) -> dict[str, dict]:
        """Run-time settings that change what the adapters compute but are not tensors (FLAME's active
        experts k), by module path: with `state()`, everything needed to rebuild the current model."""
        return {path: mod.settings() for path, mod in self.modules.items() if hasattr(mod, "settings")}

    def apply_settings(self, settings: dict[str, dict]) -> None:
        for path, values in settings.items():
            self.modules[path].apply_settings(values)

    def init_state(self, seed: int, **kwargs) -> dict[str, torch.Tensor]:
        """Fresh initial adapter state from one seeded generator, in sorted module order (device-independent)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for path, mod in self.modules.items():
            for (expert, name), t in mod.init_tensors(gen, **kwargs).items():
                out[key(path, expert, name)] = t
        return out

    def train(self, mode: bool = True) -> None:
        for mod in self.modules.values():
            mod.train(mode)
