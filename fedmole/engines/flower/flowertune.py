"""FlowerTune LLM Leaderboard projects: `fedmole flower app CONFIG --flowertune TASK --out DIR`.

The project has the layout and the run-config keys of Flower's FlowerTune template apps (`flwr new
@flwrlabs/flowertune-llm-<task>`, app version 1.1.2, and the rules in flwr's benchmarks/flowertune-llm), and its
ServerApp / ClientApp run fedmole's FedIT, FedAMoLE or FLAME on Flower (`fedmole.engines.flower`):

- layout: `README.md`, `pyproject.toml`, and a package with `server_app.py` and `client_app.py` (the template's
  `dataset.py`, `models.py` and `strategy.py` hold its FedAvg baseline; here that work is fedmole's, see the
  project README);
- `[tool.flwr.app.config.static]`: `dataset.name`, the challenge's data set by its Hugging Face hub name (fixed by
  the rules), loaded as the template does: the `train` split, shuffled with seed 42 and cut into one IID share per
  SuperNode (`flwr_datasets.FederatedDataset` + `IidPartitioner`; fedmole's `iid` partition with seed 42 gives
  the same shares, tested);
- the federation's SuperNode count, fixed by the rules: 20 (general NLP), 50 (finance), 20 (medical), 10 (code);
  `federation.num_clients` is that count, so each SuperNode's `partition-id` is a fedmole client;
- `[tool.flwr.app.config]`: the template's keys that fedmole has a setting for (`TEMPLATE_KEYS`), each setting
  one fedmole key; the rest of the fedmole config travels as YAML in `config`, as in `fedmole flower app`.

The ServerApp writes the run directory (`out`, default `results/<time>` in its working directory, as the
template), then one model directory per kept checkpoint whose round is a multiple of `train.save-every-round`
or the last: `peft_<round>` (FedIT: the global LoRA in peft's format, what the leaderboard's evaluation loads)
or `fedmole_<round>` (FedAMoLE, FLAME: `fedmole.load_model` format), and `flowertune.json` naming the model to
submit and the communication cost counted as the template counts it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmole.config import Config
from fedmole.config_io import validate_config
from fedmole.engines.flower import serverapp
from fedmole.engines.flower.clientapp import make_client_app
from fedmole.engines.flower.procs import toml_value
from fedmole.engines.flower.runconfig import config_text
from fedmole.errors import UserError, did_you_mean
from fedmole.export import export_run
from fedmole.export.source import checkpoint_rounds

METHODS = ("fedit", "fedamole", "flame")
MIB = 1024**2  # the template's CommunicationTracker counts MB as 1024**2 bytes
BUDGET_MIB = 200_000  # its limit: "Communication budget: used ... / 200,000 MB"


@dataclass(frozen=True)
class Challenge:
    """One FlowerTune LLM challenge as its template app defines it."""

    name: str
    dataset: str  # Hugging Face hub name, [tool.flwr.app.config.static] dataset.name
    supernodes: int  # options.num-supernodes, fixed by the rules
    fraction_train: float  # strategy.fraction-train of the template
    columns: dict  # data.columns: the template's `reformat` of this data set

    @property
    def package(self) -> str:
        return "fedmole_" + self.name.replace("-", "")


# instruction / input / output rows; the template renames output to response, and for medical uses the input
# (the question) as the instruction (its instruction column is one constant sentence)
_ALPACA = {"instruction": "instruction", "context": "input", "response": "output", "task": None, "domain": None}
CHALLENGES = {
    "general-nlp": Challenge("general-nlp", "flwrlabs/alpaca-gpt4", 20, 0.1, _ALPACA),
    "finance": Challenge("finance", "flwrlabs/fingpt-sentiment-train", 50, 0.1, _ALPACA),
    "medical": Challenge("medical", "flwrlabs/medical-meadow-medical-flashcards", 20, 0.1,
                         {**_ALPACA, "instruction": "input", "context": None}),
    "code": Challenge("code", "flwrlabs/code-alpaca-20k", 10, 0.2, _ALPACA),
}

# the template's [tool.flwr.app.config] keys fedmole reads -> the fedmole key each one sets, and the
# template's value (strategy.fraction-train: per challenge)
TEMPLATE_KEYS = {
    "model.name": ("model.name", "mistralai/Mistral-7B-v0.3"),
    "model.lora.peft-lora-r": ("algorithm.rank", 32),
    "model.lora.peft-lora-alpha": ("algorithm.alpha", 64),
    "train.save-every-round": ("checkpoint.every", 5),
    "train.learning-rate-max": ("train.lr", 5e-5),
    "train.learning-rate-min": ("train.lr_min", 1e-6),
    "train.seq-length": ("train.max_length", 512),
    "train.training-arguments.per-device-train-batch-size": ("train.batch_size", 16),
    "train.training-arguments.max-steps": ("train.local_steps", 10),
    "strategy.fraction-train": ("federation.clients_per_round", None),
    "num-server-rounds": ("federation.rounds", 200),
}
# template keys fedmole has no setting for, and why (the project README lists them)
NOT_READ = {
    "model.quantization": "fedmole keeps the frozen base in train.precision (bf16/fp16/fp32), no 4/8-bit "
                          "training (the leaderboard's quantization=4 applies to its evaluation, which loads your "
                          "model itself)",
    "model.gradient-checkpointing": "not implemented in fedmole's training loop",
    "train.dynamic-data-seed": "each fedmole client reads its shuffled data as a stream that continues across "
                               "rounds (a new order each epoch)",
    "train.training-arguments.* (others)": "Hugging Face Trainer settings; fedmole's loop runs max-steps steps of "
                                           "per-device-train-batch-size examples at a constant rate within a round",
    "strategy.fraction-evaluate": "fedmole evaluates on the clients' own val/test splits every eval.every rounds "
                                  "(fedmole config)",
}
STATIC_KEY = "static.dataset.name"
SPLIT_SEED = 42  # FederatedDataset's shuffle seed


def clients_per_round(num_clients: int, fraction: float) -> int:
    """Flower FedAvg's sample size: max(int(N * fraction), min_train_nodes = 2), at most N."""
    if not 0 < fraction <= 1:
        raise UserError(f"strategy.fraction-train={fraction}: fedmole trains a share of the SuperNodes every round; "
                        f"use a value in (0, 1] (the template's is 0.1, 0.2 for code)")
    return min(num_clients, max(int(num_clients * fraction), 2))


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, dotted: str, default=None):
    for p in dotted.split("."):
        if not isinstance(tree, dict) or p not in tree:
            return default
        tree = tree[p]
    return tree


def _pop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p, {})
    tree.pop(leaf, None)


# ------------------------------------------------------------------------------------------ run config
def resolve(run_config: dict) -> Config:
    """The fedmole config of a FlowerTune project's run: the YAML in `config`, with every template key
    (`TEMPLATE_KEYS`) and the static data set applied. The ServerApp and every ClientApp resolve the same one."""
    missing = [k for k in ("config", STATIC_KEY, *TEMPLATE_KEYS) if k not in run_config]
    if missing:
        raise UserError(f"this FlowerTune project's run config lacks {', '.join(missing)}; restore them in "
                        f"pyproject.toml [tool.flwr.app.config] or write the project again with `fedmole flower app "
                        f"CONFIG --flowertune TASK`")
    try:
        data = yaml.safe_load(run_config["config"]) or {}
    except yaml.YAMLError as err:
        raise UserError(f"the run config key `config` is not valid YAML: {err}") from None
    for key, (field, _) in TEMPLATE_KEYS.items():
        value = run_config[key]
        if key == "strategy.fraction-train":
            value = clients_per_round(_get(data, "federation.num_clients", 1), float(value))
        _set(data, field, value)
    _set(data, "train.lr_schedule", "cosine")  # learning-rate-max -> learning-rate-min, as the template
    _set(data, "data.path", run_config[STATIC_KEY])
    try:
        return validate_config(data)
    except UserError as err:
        named = [k for k, (field, _) in TEMPLATE_KEYS.items() if re.search(rf"\b{re.escape(field)}\b", str(err))]
        hint = f" (in this project: the run config key {', '.join(named)})" if named else ""
        raise UserError(f"{err}{hint}") from None


def project_config(cfg: Config, challenge: Challenge) -> tuple[Config, list[str]]:
    """`cfg` for a challenge: the template's values for the template keys the config did not set, and what the
    challenge fixes (data set, SuperNode count, IID shares with seed 42, the cosine schedule, the communication
    limit). Returns the config and one line per setting of `cfg` that was replaced."""
    if cfg.algorithm.name not in METHODS:
        raise UserError(f"--flowertune runs {', '.join(METHODS)}; the config has algorithm.name="
                        f"{cfg.algorithm.name}")
    data = yaml.safe_load(config_text(cfg)) or {}
    for key, (field, default) in TEMPLATE_KEYS.items():
        if _get(data, field) is None and default is not None:
            _set(data, field, default)
    fixed = {
        "federation.num_clients": (challenge.supernodes, f"the {challenge.name} challenge has "
                                                         f"{challenge.supernodes} SuperNodes"),
        "federation.clients_per_round": (clients_per_round(challenge.supernodes, challenge.fraction_train),
                                         f"strategy.fraction-train={challenge.fraction_train} of the template; "
                                         f"change it in the project's pyproject.toml"),
        "partition.scheme": ("iid", "the template's IidPartitioner"),
        "partition.seed": (SPLIT_SEED, "the template's FederatedDataset shuffle seed"),
        "train.lr_schedule": ("cosine", "the template's cosine annealing over rounds"),
    }
    changed = []
    for field, (value, why) in fixed.items():
        old = _get(data, field)
        if old is not None and old != value:
            changed.append(f"{field}: {old} -> {value} ({why})")
        _set(data, field, value)
    old_data = data.get("data", {})
    data["data"] = {"source": "hf", "path": challenge.dataset, "split": "train", "columns": challenge.columns,
                    **{k: old_data[k] for k in ("prompt", "system_prompt") if k in old_data}}
    dropped = sorted(set(old_data) - {"prompt", "system_prompt"})
    if dropped:
        changed.append(f"data.{', data.'.join(dropped)}: replaced by the challenge's data set {challenge.dataset} "
                       f"([tool.flwr.app.config.static])")
    budget = BUDGET_MIB * MIB / 1e6  # comm.budget_mb counts 10^6 bytes
    if _get(data, "comm.budget_mb") is None or _get(data, "comm.budget_mb") > budget:
        _set(data, "comm.budget_mb", round(budget, 1))
    try:
        return validate_config(data), changed
    except UserError as err:
        raise UserError(f"{err} (for the {challenge.name} challenge: {challenge.supernodes} clients, "
                        f"{data['federation']['clients_per_round']} per round)") from None


def run_config_of(cfg: Config, challenge: Challenge, run_out: str = "") -> dict:
    """The project's [tool.flwr.app.config] (flat dotted keys) for a `project_config`; `resolve` inverts it."""
    resolved = cfg.to_dict()
    data = yaml.safe_load(config_text(cfg))  # the keys that were set, not every default
    out: dict = {}
    for key, (field, _) in TEMPLATE_KEYS.items():
        out[key] = challenge.fraction_train if key == "strategy.fraction-train" else _get(resolved, field)
        _pop(data, field)
    # the fedmole config without what the template keys and the static data set carry (one home per setting)
    _pop(data, "data.path")
    _pop(data, "train.lr_schedule")
    text = yaml.safe_dump({k: v for k, v in data.items() if v != {}}, sort_keys=False)
    out.update({"challenge": challenge.name, "config": text, "out": run_out, "overwrite": False, "resume": False,
                "state-dir": "", "engine-name": "flower", "progress": "plain", STATIC_KEY: challenge.dataset})
    if resolve(out).to_dict() != cfg.to_dict():  # the project must run exactly this config
        raise RuntimeError("the FlowerTune run config does not resolve to the config it was written from")
    return out


def challenge_of(name: str) -> Challenge:
    if name not in CHALLENGES:
        raise UserError(f'--flowertune "{name}"{did_you_mean(name, CHALLENGES)}: the FlowerTune LLM challenges are '
                        f"{', '.join(CHALLENGES)}")
    return CHALLENGES[name]


# ------------------------------------------------------------------------------------------ the apps
def client_settings(context: Context) -> dict:
    return {"config": config_text(resolve(dict(context.run_config)))}


client_app = make_client_app(bind=client_settings)


def model_dirs(run_dir: Path, cfg: Config) -> list[Path]:
    """Export the global model of every kept checkpoint whose round is a multiple of train.save-every-round
    (checkpoint.every) or the last: `peft_<round>` for FedIT, `fedmole_<round>` for FedAMoLE and FLAME."""
    rounds = checkpoint_rounds(run_dir)
    prefix = "peft" if cfg.algorithm.name == "fedit" else "fedmole"
    out = []
    for rnd in rounds:
        if rnd % cfg.checkpoint.every == 0 or rnd == rounds[-1]:
            path = run_dir / f"{prefix}_{rnd}"
            export_run(run_dir, path, client=None, rnd=rnd, overwrite=True)
            out.append(path)
    return out


SUBMITTED = {
    "fedit": "the global LoRA adapter (peft format; the leaderboard's evaluation loads it with "
             "PeftModel.from_pretrained)",
    "fedamole": "the aggregated expert pool after the last round: every domain expert, the shared expert and the "
                "router, each averaged over the clients that trained it, routing every token top-k among all "
                "experts (fedmole.load_model; the model every client's dispatched mixture is a part of)",
    "flame": "the global expert pool at full compute k = K with rescaler s = 1 (fedmole.load_model)",
}


def server_main(grid: Grid, context: Context) -> dict:
    """The ServerApp: a fedmole run on the SuperNodes, then the model directories and flowertune.json."""
    run_config = dict(context.run_config)
    cfg = resolve(run_config)
    out = run_config.get("out") or str(Path("results") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    run_dir = Path(out).resolve()
    summary = serverapp.server_main(grid, context, {"config": config_text(cfg), "out": str(run_dir)})
    models = model_dirs(run_dir, cfg)
    train_mib = summary["comm"]["by_phase"]["train"] / MIB
    info = {"challenge": run_config.get("challenge"), "dataset": run_config[STATIC_KEY],
            "num_supernodes": cfg.federation.num_clients, "method": cfg.algorithm.name,
            "model": {"path": models[-1].name if models else None,
                      "round": int(models[-1].name.rsplit("_", 1)[1]) if models else None,
                      "format": "peft" if cfg.algorithm.name == "fedit" else "fedmole",
                      "what": SUBMITTED[cfg.algorithm.name]},
            "communication": {"train_mib": round(train_mib, 2), "limit_mib": BUDGET_MIB,
                              "counted": "training messages both ways (tensors), as the template's "
                                         "CommunicationTracker; evaluation messages are not counted"},
            "models": [p.name for p in models]}
    (run_dir / "flowertune.json").write_text(json.dumps(info, indent=1))
    # the ServerApp's output is what `flwr run --stream` shows
    print(f"Communication budget: used {train_mib:.2f} MB / {BUDGET_MIB:,} MB (MB = 1024^2 bytes of training "
          f"messages, as the FlowerTune template counts)", flush=True)
    print(f"FlowerTune: model to submit: {models[-1] if models else None} ({info['model']['what']}); details in "
          f"{run_dir / 'flowertune.json'}", flush=True)
    return summary


server_app = ServerApp()


@server_app.main()
def _server(grid: Grid, context: Context) -> None:
    server_main(grid, context)


# ---------------------------------------------------------------------------------------- the writer
def _toml(v) -> str:
    """A TOML value; multi-line text as a literal multi-line string (readable YAML), when it can be one."""
    if isinstance(v, str) and "\n" in v and "'''" not in v:
        return "'''\n" + v + "'''"
    return toml_value(v)


def write_project(cfg: Config, challenge: Challenge, out_dir: str | Path, run_out: str = "") -> Path:
    """Write the FlowerTune project for `cfg` (a `project_config`); returns the pyproject.toml path."""
    out = Path(out_dir)
    pkg = out / challenge.package
    pkg.mkdir(parents=True, exist_ok=True)
    run_config = run_config_of(cfg, challenge, run_out)
    (pkg / "__init__.py").write_text(f'"""fedmole {cfg.algorithm.name} for the FlowerTune LLM {challenge.name} '
                                     f'challenge (written by `fedmole flower app --flowertune`)."""\n')
    for side in ("server", "client"):  # a plain assignment: Flower finds `app` by reading the file
        (pkg / f"{side}_app.py").write_text(f'"""The {side.capitalize()}App: fedmole\'s, see '
                                            f'fedmole/engines/flower/flowertune.py."""\n\nfrom fedmole.engines.flower '
                                            f'import flowertune\n\napp = flowertune.{side}_app\n')
    assigned = {k: f"{k} = {_toml(run_config[k])}" for k in TEMPLATE_KEYS}
    width = max(map(len, assigned.values())) + 2
    template = [line.ljust(width) + f"# fedmole: {TEMPLATE_KEYS[k][0]}" for k, line in assigned.items()]
    own = [f"{k} = {_toml(run_config[k])}" for k in ("challenge", "out", "overwrite", "resume", "state-dir",
                                                    "engine-name", "progress", "config")]
    lines = [
        f"# Written by `fedmole flower app --flowertune {challenge.name}`: a FlowerTune LLM Leaderboard project whose",
        f"# ServerApp and ClientApp run fedmole's {cfg.algorithm.name}. Read README.md before you run or submit it.",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "fedmole-flowertune-{challenge.name}"', 'version = "1.0.0"',
        f'description = "fedmole {cfg.algorithm.name} for the {challenge.name} challenge of the FlowerTune LLM '
        f'Leaderboard"', 'license = "Apache-2.0"',
        f'dependencies = ["fedmole=={version("fedmole")}", "flwr[simulation]==1.41.0", "flwr-datasets==0.6.1"]', "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "fedmole"', "",
        "[tool.flwr.app.components]", f'serverapp = "{challenge.package}.server_app:app"',
        f'clientapp = "{challenge.package}.client_app:app"', "",
        "# The FlowerTune template's keys that fedmole reads (each sets the fedmole key named on its right; they",
        "# override that key in `config`), then fedmole's own: `config` holds the rest of the fedmole config (YAML).",
        "[tool.flwr.app.config]", *template, *own, "",
        "# Dataset config (static for FlowerTune LLM Leaderboard): the rules forbid changing it for a submission",
        "[tool.flwr.app.config.static]", f"dataset.name = {_toml(challenge.dataset)}", "",
    ]
    path = out / "pyproject.toml"
    path.write_text("\n".join(lines))
    (out / "README.md").write_text(project_readme(cfg, challenge))
    return path


def project_readme(cfg: Config, challenge: Challenge) -> str:
    n, pkg, method = challenge.supernodes, challenge.package, cfg.algorithm.name
    rows = "\n".join(f"| `{k}` | `{field}` |" for k, (field, _) in TEMPLATE_KEYS.items())
    not_read = "\n".join(f"| `{k}` | {why} |" for k, why in NOT_READ.items())
    prefix = "peft" if method == "fedit" else "fedmole"
    return f"""# fedmole {method} on the FlowerTune LLM {challenge.name} challenge

Written by `fedmole flower app --flowertune {challenge.name}`. The ServerApp and ClientApp are fedmole's
(`fedmole.engines.flower.flowertune`): the server runs the {method} strategy and the round loop, each SuperNode is one
fedmole client training on its IID share of [{challenge.dataset}](https://huggingface.co/datasets/{challenge.dataset}).

## Fixed by the leaderboard rules

- `[tool.flwr.app.config.static]` `dataset.name = "{challenge.dataset}"`: do not change it for a submission.
- **{n} SuperNodes**: run the simulation with `num-supernodes={n}`; fedmole's config has `federation.num_clients =
  {n}`, and a SuperNode whose `num-partitions` differs is refused with both numbers.

## Run

```bash
pip install -e .      # fedmole and Flower, as pinned in pyproject.toml
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0   # the SuperLink installs nothing
flwr run . local --stream \\
  --federation-config "num-supernodes={n} client-resources-num-cpus=6 client-resources-num-gpus=1.0" \\
  --run-config "out='/abs/path/results/{method}-{challenge.name}'"
```

`local` is Flower's managed local SuperLink (simulation). The template's way, a `[superlink.flowertune]`
connection in `~/.flwr/config.toml` with `options.num-supernodes = {n}`, works too (`flwr run . flowertune`).
Without `out`, the run directory is `results/<time>` in the working directory of the ServerApp.

## Settings

`[tool.flwr.app.config]` holds the template's keys that fedmole reads; each sets one fedmole key:

| template key | fedmole key |
|---|---|
{rows}

`strategy.fraction-train` samples max(int({n} × fraction), 2) SuperNodes per round, as Flower's FedAvg. The
learning rate falls from `train.learning-rate-max` to `train.learning-rate-min` by the template's cosine schedule.
Everything else (the method's own keys, evaluation, the communication dtype...) is the fedmole YAML in `config`.
Template keys fedmole does not read, so this project does not have them:

| template key | why |
|---|---|
{not_read}

## What to submit

The ServerApp writes the fedmole run directory (metrics.jsonl, summary.json, checkpoints) and, for every
kept checkpoint whose round is a multiple of `train.save-every-round` or the last, the global model as
`{prefix}_<round>`. `flowertune.json` names the model to submit and the communication cost:

- model: {SUBMITTED[method]};
- communication: training messages both ways, in MB of 1024² bytes as the template's tracker counts them
  (`communication.train_mib`; limit {BUDGET_MIB:,} MB, which `comm.budget_mb` enforces: the run ends before a
  round that could pass it). The same number is the ServerApp's last `Communication budget:` log line.

Evaluate the model with the leaderboard's evaluation code (`benchmarks/flowertune-llm/evaluation` in the Flower
repository). See fedmole's docs/flowertune.md for the steps and for what FedAMoLE and FLAME models need there.

## Where the template's files went

`{pkg}/server_app.py` and `{pkg}/client_app.py` are the components. The template's other modules hold its
FedAvg baseline; here fedmole does that work: `dataset.py` (load and partition the data set, the prompt) is
`fedmole.data.sources` (`source: hf`) with `fedmole.data.partition` (`iid`, seed 42: the same shares) and
`fedmole.data.prompts` (`data.prompt`); `models.py` (base model, LoRA, cosine learning rate) is `fedmole.models`,
the method's adapters and `fedmole.client.train`; `strategy.py` (FedAvg and the communication tracker) is
`fedmole.algorithms.{method}` and `fedmole.comm`.
"""
