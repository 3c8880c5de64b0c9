"""A run directory's checkpoint as the source of a model: open it, pick the round, rebuild the server
strategy and the client states, and put the global model or one client's model on a base model.

Which tensors make "client c's model" is each method's `Strategy.export_state(cid, client_state)`:

| method | client c's model | global model |
|---|---|---|
| fedit (+ `personalize_by_finetune`) | its adapter right after its last local training (FedIT-FT) | the global LoRA |
| fedit, ffa_lora | the global LoRA (there is no per-client model) | the global LoRA |
| local | its own LoRA | none |
| hetlora, flexlora | the global LoRA at the client's tier rank | the full-rank global LoRA |
| flora | the merged global update (the fresh local LoRA is not kept) | the same |
| fdlora | shared + private adapter fused with its searched weights | the shared adapter |
| fedamole | shared expert + router + its last dispatched domain experts (aggregated values) | the whole pool |
| flame | the global experts at its k_i with its own rescaler | the global experts at k = K, s = 1 |

Everything a user can get wrong (the directory, the round, the client id) is checked here, before any model
is loaded. Like the CLI, export/ is an application on top of `run` (docs/design.md, Layers): checkpoints are
read with run's own loader, so an export holds exactly what the run saved.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedmole.config import Config
from fedmole.config_io import load_config
from fedmole.errors import UserError
from fedmole.messages import ClientState, Tensors

LORA_METHODS = ("fedit", "local", "ffa_lora", "hetlora", "flexlora", "flora", "fdlora")  # peft format
NATIVE_METHODS = ("fedamole", "flame")  # fedmole's own format (safetensors + JSON)


@dataclass
class RunCheckpoint:
    """One checkpoint of a run: the resolved config, the round, and the saved server and client states."""

    run_dir: Path
    cfg: Config
    round: int
    path: Path
    meta: dict
    server: Tensors = field(repr=False)
    clients: Mapping[int, ClientState] = field(repr=False)  # read one state at a time


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds of the complete checkpoints of a run directory, ascending."""
    done = [p for p in (run_dir / "checkpoints").glob("round_*") if (p / "state.json").is_file()]
    return sorted(int(p.name.split("_")[1]) for p in done)


def resolve_round(run_dir: Path, rnd: str | int | None) -> int:
    """`None` / "last": the newest checkpoint; "selected": summary.json's selected round; or a number."""
    available = checkpoint_rounds(run_dir)
    if not available:
        raise UserError(f"{run_dir} has no complete checkpoint (checkpoints/round_NNNN/); the run wrote none yet")
    listed = ", ".join(map(str, available))
    if rnd is None or str(rnd) == "last":
        return available[-1]
    if str(rnd) == "selected":
        summary = run_dir / "summary.json"
        if not summary.is_file():
            raise UserError(f"--round selected needs {summary}, which the run has not written (it did not finish); "
                            f"use --round last or one of the checkpointed rounds: {listed}")
        selected = json.loads(summary.read_text()).get("selected_round")
        if selected is None or selected not in available:
            raise UserError(f"the round selected on validation ({selected}) has no checkpoint in {run_dir} "
                            f"(checkpoint.keep_last prunes old ones); checkpointed rounds: {listed}")
        return int(selected)
    try:
        number = int(rnd)
    except ValueError:
        raise UserError(f'--round {rnd!r} is not a round number, "last" or "selected"') from None
    if number not in available:
        raise UserError(f"round {number} has no checkpoint in {run_dir}; checkpointed rounds: {listed} "
                        f"(keep more with checkpoint.keep_last)")
    return number


def open_checkpoint(run_dir: str | Path, rnd: str | int | None = None) -> RunCheckpoint:
    """Load the config and the checkpoint of round `rnd` (see `resolve_round`) of a run directory."""
    from fedmole.run import checkpoint_problem, load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the directory `fedmole run` wrote (--out)")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a fedmole run directory (no config.yaml); pass the directory "
                        f"`fedmole run` wrote")
    cfg = load_config(run_dir / "config.yaml")
    number = resolve_round(run_dir, rnd)
    path = run_dir / "checkpoints" / f"round_{number:04d}"
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is damaged ({problem}); choose another --round")
    meta, server, clients = load_checkpoint(path)
    return RunCheckpoint(run_dir, cfg, number, path, meta, server, clients)


def check_client(cfg: Config, client: int | None, need_global: bool = False) -> None:
    """A client id in range; for the global model, a method that has one."""
    n = cfg.federation.num_clients
    if client is not None and not 0 <= client < n:
        raise UserError(f"client {client} does not exist: this run has {n} clients, ids 0..{n - 1}")
    if client is None and need_global and cfg.algorithm.name == "local":
        raise UserError("algorithm local trains no global model; choose a client with --client ID")


# ------------------------------------------------------------------------------------- models
def load_base(cfg: Config, device: str | None = None, precision: str | None = None):
    """(tokenizer, frozen base model, the method's injected adapters) as the run built them."""
    from fedmole.algorithms import get_algorithm
    from fedmole.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, precision or cfg.train.precision, device or cfg.train.device,
                       vocab_size=len(tokenizer))
    adapters = get_algorithm(cfg.algorithm.name).build_adapters(model, cfg)
    model.eval()  # the injected adapters too (their dropout)
    return tokenizer, model, adapters


def strategy_at(ckpt: RunCheckpoint, adapters):
    """The method's server strategy with the checkpoint's state loaded."""
    from fedmole.algorithms import get_algorithm

    strategy = get_algorithm(ckpt.cfg.algorithm.name).Server(ckpt.cfg, adapters)
    strategy.load_state_dict(ckpt.server, ckpt.meta["server"])
    return strategy


@dataclass
class ModelState:
    """The adapter tensors of one model and how to set it up: `k` active experts (FLAME), the label."""

    tensors: Tensors
    label: str  # "global" or "client"
    k: int | None = None


def model_state(ckpt: RunCheckpoint, strategy, client: int | None) -> ModelState:
    """The global model (`client` None) or client `client`'s model of this checkpoint."""
    check_client(ckpt.cfg, client, need_global=True)
    state = ckpt.clients.get(client) if client is not None else None
    tensors = strategy.export_state(client, state)
    if not tensors:
        raise UserError(f"{ckpt.cfg.algorithm.name}: client {client} has no trained adapter in the checkpoint of "
                        f"round {ckpt.round} (it took part in no round yet); choose another client or round")
    k = strategy.active_experts(client) if hasattr(strategy, "active_experts") else None
    return ModelState(tensors, "global" if client is None else "client", k)


def apply_state(adapters, state: ModelState) -> None:
    """Load the tensors into the injected adapters and set the model's knobs (FLAME's k)."""
    adapters.load(state.tensors)
    if state.k is not None:
        from fedmole.algorithms.flame import RoutedLayers

        RoutedLayers(adapters).set_k(state.k)
