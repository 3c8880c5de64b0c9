"""FlowerTune LLM Leaderboard projects (`fedmole flower app CONFIG --flowertune TASK`): the template's layout and
keys, every key read, the template's data shares and learning-rate schedule, the submitted models, and one
project run end to end with `flwr run` on Flower's managed local SuperLink (simulation), offline, on the tiny
model and a local copy of the data set."""

import json
import math
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import psutil
import pytest

import fedmole
from fedmole.config_io import load_config, validate_config
from fedmole.engines.flower import flowertune, simulation
from fedmole.errors import UserError

from conftest import metrics_records

ROOT = Path(fedmole.__file__).resolve().parents[1]
CONFIGS = {m: ROOT / "configs" / f"flowertune_{m}.yaml" for m in ("fedamole", "fedit", "flame")}

# Facts of Flower's FlowerTune template apps (flwr new @flwrlabs/flowertune-llm-<task>, app version 1.1.2),
# written out here independently of fedmole's tables: data set (static section), SuperNodes, fraction-train.
CHALLENGES = {
    "general-nlp": ("flwrlabs/alpaca-gpt4", 20, 0.1),
    "finance": ("flwrlabs/fingpt-sentiment-train", 50, 0.1),
    "medical": ("flwrlabs/medical-meadow-medical-flashcards", 20, 0.1),
    "code": ("flwrlabs/code-alpaca-20k", 10, 0.2),
}
# every key of the template's [tool.flwr.app.config] with its value
TEMPLATE_CONFIG = {
    "model.name": "mistralai/Mistral-7B-v0.3", "model.quantization": 4, "model.gradient-checkpointing": True,
    "model.lora.peft-lora-r": 32, "model.lora.peft-lora-alpha": 64, "train.save-every-round": 5,
    "train.dynamic-data-seed": False, "train.learning-rate-max": 5e-5, "train.learning-rate-min": 1e-6,
    "train.seq-length": 512, "train.training-arguments.output-dir": "",
    "train.training-arguments.learning-rate": "", "train.training-arguments.per-device-train-batch-size": 16,
    "train.training-arguments.gradient-accumulation-steps": 1, "train.training-arguments.logging-steps": 10,
    "train.training-arguments.num-train-epochs": 3, "train.training-arguments.max-steps": 10,
    "train.training-arguments.save-steps": 1000, "train.training-arguments.save-total-limit": 10,
    "train.training-arguments.gradient-checkpointing": True, "train.training-arguments.lr-scheduler-type": "constant",
    "strategy.fraction-train": None, "strategy.fraction-evaluate": 0.0, "num-server-rounds": 200,
}
TINY = ["model.name=tiny-llama", "algorithm.rank=4", "algorithm.alpha=8", "federation.rounds=2",
        "train.local_steps=2", "train.batch_size=2", "train.max_length=64", "checkpoint.every=1",
        "eval.max_examples=2", "eval.generation.max_new_tokens=2", "train.precision=fp32", "train.device=cpu",
        "train.num_threads=1"]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory) -> Path:
    """A local stand-in for a FlowerTune hub data set: a directory with train.jsonl in the alpaca columns."""
    root = tmp_path_factory.mktemp("hub") / "code-alpaca"
    root.mkdir()
    rows = [{"instruction": f"Write code number {i}.", "input": "" if i % 3 else f"x = {i}",
             "output": f"print({i})"} for i in range(1000)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _project(tmp_path, challenge="general-nlp", method="fedamole", overrides=()):
    ch = flowertune.challenge_of(challenge)
    cfg, changed = flowertune.project_config(load_config(CONFIGS[method], list(overrides)), ch)
    path = flowertune.write_project(cfg, ch, tmp_path / f"{method}-{challenge}")
    return path, cfg, changed


# ------------------------------------------------------------------------------------ the project
@pytest.mark.parametrize("challenge", sorted(CHALLENGES))
def test_a_project_has_the_templates_layout_static_section_keys_and_supernodes(tmp_path, challenge):
    from flwr.cli.config_utils import load_and_validate

    dataset, supernodes, fraction = CHALLENGES[challenge]
    path, cfg, _ = _project(tmp_path, challenge)
    pkg = "fedmole_" + challenge.replace("-", "")
    assert {p.relative_to(path.parent).as_posix() for p in path.parent.rglob("*") if p.is_file()} == {
        "README.md", "pyproject.toml", f"{pkg}/__init__.py", f"{pkg}/server_app.py", f"{pkg}/client_app.py"}
    conf, _ = load_and_validate(path, check_module=True)  # Flower's own check; imports both components
    app = conf["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": f"{pkg}.server_app:app", "clientapp": f"{pkg}.client_app:app"}
    assert app["config"]["static"] == {"dataset": {"name": dataset}}  # the section the rules fix
    run_config = _flat({k: v for k, v in app["config"].items() if k != "static"})
    readme = (path.parent / "README.md").read_text()
    for key, value in TEMPLATE_CONFIG.items():  # each template key: with the template's value, or said why not
        if key in run_config:
            assert run_config[key] == (fraction if key == "strategy.fraction-train" else value), key
        else:
            assert f"`{key}`" in readme or key.startswith("train.training-arguments."), key
    assert "`train.training-arguments.* (others)`" in readme
    assert f"num-supernodes={supernodes}" in readme
    # what the project runs: one fedmole client per SuperNode, FedAvg's sample size, the template's IID shares
    run = flowertune.resolve({**run_config, "static.dataset.name": dataset})
    assert run.to_dict() == cfg.to_dict()
    assert run.federation.num_clients == supernodes
    assert run.federation.clients_per_round == max(int(supernodes * fraction), 2)
    assert (run.data.source, run.data.path, run.data.split) == ("hf", dataset, "train")
    assert (run.partition.scheme, run.partition.seed) == ("iid", 42)
    assert (run.train.lr_schedule, run.train.lr, run.train.lr_min) == ("cosine", 5e-5, 1e-6)
    assert run.comm.budget_mb == pytest.approx(200_000 * 1024**2 / 1e6, abs=0.1)  # the 200,000 MB (MiB) limit


@pytest.mark.parametrize("method", ["fedit", "flame"])
def test_fedit_and_flame_projects_are_written_from_their_configs(tmp_path, method):
    path, cfg, _ = _project(tmp_path, "medical", method)
    assert cfg.algorithm.name == method and cfg.data.columns.instruction == "input"  # the template's medical
    assert flowertune.resolve(_flat(tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"])).to_dict() \
        == cfg.to_dict()


def test_every_template_key_sets_its_fedmole_key(tmp_path):
    """No dead keys: changing any run-config key of the project changes exactly the fedmole setting it names."""
    path, cfg, _ = _project(tmp_path)
    base = _flat(tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"])
    changes = {"model.name": ("tiny-olmoe", "model.name", "tiny-olmoe"),
               "model.lora.peft-lora-r": (8, "algorithm.rank", 8),
               "model.lora.peft-lora-alpha": (16, "algorithm.alpha", 16.0),
               "train.save-every-round": (2, "checkpoint.every", 2),
               "train.learning-rate-max": (1e-4, "train.lr", 1e-4),
               "train.learning-rate-min": (0.0, "train.lr_min", 0.0),
               "train.seq-length": (256, "train.max_length", 256),
               "train.training-arguments.per-device-train-batch-size": (4, "train.batch_size", 4),
               "train.training-arguments.max-steps": (3, "train.local_steps", 3),
               "strategy.fraction-train": (0.2, "federation.clients_per_round", 4),
               "num-server-rounds": (7, "federation.rounds", 7),
               "static.dataset.name": ("/data/copy", "data.path", "/data/copy")}
    assert set(changes) == {k for k in base if k not in ("challenge", "config", "out", "overwrite", "resume",
                                                         "state-dir", "engine-name", "progress")}
    before = cfg.to_dict()
    for key, (value, field, expected) in changes.items():
        after = flowertune.resolve({**base, key: value}).to_dict()
        section, name = field.split(".")
        assert after[section][name] == expected, key
        assert {s for s in before if before[s] != after[s]} == {section}, key
    with pytest.raises(UserError, match="lacks num-server-rounds"):
        flowertune.resolve({k: v for k, v in base.items() if k != "num-server-rounds"})
    with pytest.raises(UserError, match=r"train.batch_size.*run config key "
                                        r"train.training-arguments.per-device-train-batch-size"):
        flowertune.resolve({**base, "train.training-arguments.per-device-train-batch-size": 0})


def test_the_cosine_schedule_is_the_templates_learning_rate_per_round():
    from fedmole.algorithms import get_algorithm
    from fedmole.client.train import round_lr
    from fedmole.models.tiny import tiny_llama

    def template(rnd, total, hi, lo):  # flowertune_*/models.py cosine_annealing, written out
        return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * rnd / total))

    cfg = validate_config({"train": {"lr_schedule": "cosine", "lr": 5e-5, "lr_min": 1e-6},
                           "federation": {"rounds": 200}})
    for rnd in (1, 2, 100, 199, 200):
        assert round_lr(cfg.train, rnd, 200) == pytest.approx(template(rnd, 200, 5e-5, 1e-6), rel=1e-12)
    assert round_lr(cfg.train, 200, 200) == pytest.approx(1e-6)
    server = get_algorithm("fedit").Server(cfg, get_algorithm("fedit").build_adapters(tiny_llama(64), cfg))
    assert server.train_config(3, False)["lr"] == pytest.approx(template(3, 200, 5e-5, 1e-6))
    exponential = validate_config({"train": {"lr": 1e-3, "lr_decay": 0.5}})
    assert round_lr(exponential.train, 3, 200) == pytest.approx(2.5e-4)
    with pytest.raises(UserError, match="lr_min=0.1 exceeds train.lr=0.01"):
        validate_config({"train": {"lr_schedule": "cosine", "lr": 0.01, "lr_min": 0.1}})


def test_fedmole_iid_shares_are_the_templates_flwr_datasets_partitions(hub_copy):
    """The template loads FederatedDataset(dataset.name, partitioners={"train": IidPartitioner(N)}) (shuffled with
    seed 42); fedmole's partition of the same rows gives every client the same examples in the same order."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    from fedmole.data.partition import SCHEMES
    from fedmole.data.sources import load_examples

    cfg = flowertune.resolve({**_flat(tomllib.loads(_project_text("code"))["tool"]["flwr"]["app"]["config"]),
                              "static.dataset.name": str(hub_copy)})
    examples = load_examples(cfg.data, cfg.partition_seed)
    shares = SCHEMES["iid"](examples, cfg.partition, cfg.federation.num_clients, cfg.partition_seed)
    fds = FederatedDataset(dataset=str(hub_copy), partitioners={"train": IidPartitioner(num_partitions=10)})
    for cid in range(10):
        theirs = fds.load_partition(cid, "train")
        assert [examples[i].instruction for i in shares[cid]] == theirs["instruction"]
        assert [examples[i].context for i in shares[cid]] == theirs["input"]
        assert [examples[i].response for i in shares[cid]] == theirs["output"]


def _project_text(challenge: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return _project(Path(tmp), challenge)[0].read_text()


def test_the_writer_says_what_the_challenge_replaces_and_refuses_what_it_cannot_run(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke_fedamole.yaml",
                      ["algorithm.num_experts=10", "algorithm.expert_choices=1", "algorithm.max_experts=8"])
    _, changed = flowertune.project_config(cfg, flowertune.challenge_of("code"))
    text = "\n".join(changed)
    assert "federation.num_clients: 4 -> 10 (the code challenge has 10 SuperNodes)" in text
    assert "partition.scheme: meta -> iid" in text and "data.max_examples, data.source: replaced by" in text
    with pytest.raises(UserError, match=r'--flowertune "finanse" \(did you mean "finance"\?\)'):
        flowertune.challenge_of("finanse")
    with pytest.raises(UserError, match="--flowertune runs fedit, fedamole, flame; .*algorithm.name=hetlora"):
        flowertune.project_config(load_config(ROOT / "configs" / "smoke.yaml", ["algorithm.name=hetlora"]),
                                  flowertune.challenge_of("code"))
    with pytest.raises(UserError, match=r"cannot assign experts .* \(for the general-nlp challenge: 20 clients, "
                                        r"2 per round\)"):
        flowertune.project_config(load_config(ROOT / "configs" / "smoke_fedamole.yaml"),
                                  flowertune.challenge_of("general-nlp"))


def test_a_fedit_run_leaves_peft_adapters_the_leaderboard_evaluation_loads(tmp_path, hub_copy):
    """FedIT's submitted model is the global LoRA as peft_<round>: what the leaderboard's eval.py loads with
    PeftModel.from_pretrained(base, path); its logits are fedmole's global model's."""
    import torch
    from peft import PeftModel

    from fedmole.models import load_model, load_tokenizer
    from fedmole.run import run_experiment

    path, _, _ = _project(tmp_path, "code", "fedit", TINY)
    run_config = _flat(tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"])
    cfg = flowertune.resolve({**run_config, "static.dataset.name": str(hub_copy)})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_experiment(cfg, run_dir, "none")
    assert [p.name for p in flowertune.model_dirs(run_dir, cfg)] == ["peft_1", "peft_2"]
    tok = load_tokenizer(cfg.model)
    base = load_model(cfg.model, "fp32", "cpu", vocab_size=len(tok))
    peft_model = PeftModel.from_pretrained(base, run_dir / "peft_2").eval()
    ours, _ = fedmole.load_model(run_dir / "peft_2")
    x = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-6)


# ----------------------------------------------------------------------------------- flwr run
def _marked(mark: str) -> list:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDMOLE_TEST_MARK") == mark:
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_a_generated_fedamole_project_runs_with_flwr_run_offline(tmp_path, hub_copy):
    """The user's steps: write the project, then `flwr run . local --federation-config num-supernodes=10`, which
    starts Flower's managed local SuperLink and runs the simulation (Ray). Offline: a local copy of the data set
    replaces the hub name, the tiny model replaces Mistral-7B."""
    from fedmole.engines.flower.procs import free_port, terminate_then_kill

    project = tmp_path / "fedmole-code"
    sets = [a for o in TINY for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    made = subprocess.run([sys.executable, "-m", "fedmole.cli", "flower", "app", str(CONFIGS["fedamole"]),
                           "--flowertune", "code", "--out", str(project), *sets],
                          capture_output=True, text=True, timeout=300, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "flwr run . local --stream --federation-config \"num-supernodes=10\"" in " ".join(made.stdout.split())
    static = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]["static"]
    assert static == {"dataset": {"name": "flwrlabs/code-alpaca-20k"}}

    mark, home = uuid.uuid4().hex, tmp_path / "flwr-home"
    home.mkdir()
    env.update(simulation.FLOWER_ENV)
    env.update({"FLWR_HOME": str(home), "FEDMOLE_TEST_MARK": mark, "OMP_NUM_THREADS": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())})
    run_dir = tmp_path / "results"
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", ".", "local", "--stream",
                               "--federation-config", "num-supernodes=10 client-resources-num-cpus=1",
                               "--run-config", f"out='{run_dir}' static.dataset.name='{hub_copy}'"],
                              capture_output=True, text=True, timeout=900, env=env, cwd=project)
    finally:
        terminate_then_kill(_marked(mark))  # the managed SuperLink outlives `flwr run` (detached)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert _marked(mark) == []
    assert "Communication budget: used" in out and "model to submit" in out, out[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "fedamole" and summary["rounds_completed"] == 2
    assert len(json.loads((run_dir / "partition.json").read_text())["clients"]) == 10  # one per SuperNode
    records = metrics_records(run_dir)
    for rnd in (1, 2):  # strategy.fraction-train = 0.2 of 10 SuperNodes
        assert len({r["client"] for r in records if r["round"] == rnd and r["split"] == "train"}) == 2
    info = json.loads((run_dir / "flowertune.json").read_text())
    assert info["challenge"] == "code" and info["num_supernodes"] == 10 and info["models"] == ["fedmole_1",
                                                                                                "fedmole_2"]
    assert info["model"]["path"] == "fedmole_2" and info["model"]["format"] == "fedmole"
    train_bytes = sum(r["bytes"] for r in map(json.loads, (run_dir / "comm.jsonl").read_text().splitlines())
                      if r["phase"] == "train")
    assert info["communication"]["train_mib"] == round(train_bytes / 1024**2, 2) > 0
    model, _ = fedmole.load_model(run_dir / "fedmole_2")  # the submitted model: the whole expert pool
    export = json.loads((run_dir / "fedmole_2" / "fedmole_export.json").read_text())
    assert export["model"] == "global" and all(len(ids) == 10 for ids in export["experts"].values())
