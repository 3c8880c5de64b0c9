"""Injection of adapter modules into a frozen base model, and the set of injected adapters.

`inject(model, target_modules, factory)` replaces every `nn.Linear` whose path matches one of the patterns
(peft semantics: a pattern matches a module path equal to it or ending in `.pattern`; a pattern starting
with `^` is a regular expression that must match the whole path) by `factory(path, linear)`.

Every injected module is an `Adapter` (adapters/base.py): state by expert id (`get_tensors()`,
`set_tensors(tensors)`, `init_tensors(generator)`, each keyed by `(expert, name)`), its trainable parameters
and its run-time settings. `AdapterSet` turns these into the flat `"{module}/{expert}/{name}"` vocabulary of
`adapters.state`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from fedmole.adapters.base import Adapter
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


def inject(model: nn.Module, target_modules: list[str], factory: Callable[[str, nn.Linear], Adapter]) -> "AdapterSet":
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

    def __init__(self, model: nn.Module, modules: dict[str, Adapter]):
        self.model = model
        self.modules = dict(sorted(modules.items()))

    def __iter__(self) -> Iterator[tuple[str, Adapter]]:
        return iter(self.modules.items())

    def parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter the adapters train (`Adapter.trainable_parameters`), by flat key, module by module
        in path order: the order an optimiser receives them. Experts batched in one tensor appear once,
        under their collective expert id (`experts`, `held`)."""
        out = {}
        for path, mod in self.modules.items():
            for (expert, name), p in mod.trainable_parameters().items():
                out[key(path, expert, name)] = p
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

    def describe(self) -> dict[str, str]:
        """What each adapted module adapts, in words, from its tensor names: `8 experts x gate, up, down` (LoRA
        on those projections of every routed expert of a MoE block: FLAME's experts and the LoRA methods' alike),
        `linear` (one LoRA on a linear layer), `linear, 8 LoRA experts` (FLAME's dense pool), plus `router` /
        `shared` when the module trains one."""
        out = {}
        for path, mod in self.modules.items():
            names = [(expert, name) for expert, name in mod.get_tensors()]
            experts = {e for e, _ in names if e.isdigit()}
            projs = list(dict.fromkeys(n[: -len("_A")] for e, n in names if e.isdigit() and n.endswith("_A")))
            parts = []
            if projs:
                parts.append(f"{len(experts)} experts x {', '.join(projs)}")
            else:
                parts.append("linear")
                if experts:
                    parts.append(f"{len(experts)} LoRA experts")
            parts += sorted({e for e, _ in names if e in ("router", "shared")})
            out[path] = ", ".join(parts)
        return out

    def settings(self) -> dict[str, dict]:
        """Run-time settings that change what the adapters compute but are not tensors (FLAME's active
        experts k), by module path: with `state()`, everything needed to rebuild the current model."""
        return {path: values for path, mod in self.modules.items() if (values := mod.settings())}

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
