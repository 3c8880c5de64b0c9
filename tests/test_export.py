"""`fedmole export`, `fedmole.load_model`, `fedmole eval` and `fedmole generate` on tiny 2-round runs.

The reference ("before export") model of every logits check is built independently of the exporter: a fresh
tiny base, the method's adapters, and the tensors read straight from the run's checkpoint files (server state,
client states) and from what the run itself wrote about its clients (summary.json's architecture and tiers).
"""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import fedmole
from fedmole.algorithms import get_algorithm
from fedmole.cli import app
from fedmole.config_io import validate_config
from fedmole.errors import UserError
from fedmole.export import export_run
from fedmole.export.source import resolve_round
from fedmole.generate import format_prompt, generate
from fedmole.models.tiny import tiny_llama, tiny_olmoe
from fedmole.reeval import evaluate_run
from fedmole.run import prepare_run_dir, run_experiment

CHOICES = ["noun", "verb", "adjective"]


def _write_data(path: Path) -> Path:
    """120 small instruction examples: two generation tasks and one classification task."""
    rng = random.Random(0)
    words = ["cat", "run", "blue", "tree", "jump", "green", "house", "swim", "quick", "river", "sing", "small"]
    lines = []
    for i in range(120):
        w = rng.choice(words)
        kind = i % 3
        if kind == 0:
            row = {"instruction": f"Define the word {w}.", "response": f"{w} is a common word", "task": "define"}
        elif kind == 1:
            row = {"instruction": f"Use {w} in a sentence.", "response": f"I saw the {w} today", "task": "usage"}
        else:
            label = (i // 3) % 3
            row = {"instruction": f"Part of speech of {w}?", "response": CHOICES[label], "task": "pos",
                   "choices": CHOICES, "label": label}
        row.setdefault("choices", None)  # an empty choices cell: a generation example
        row.setdefault("label", None)
        row["domain"] = "d" + str(i % 4)
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(data: Path, algorithm: dict, model: str = "tiny-llama", prompt: str = "alpaca", **sections) -> dict:
    return {
        "model": {"name": model},
        "data": {"source": "jsonl", "path": str(data), "columns": {"choices": "choices", "label": "label"},
                 "prompt": prompt},
        "partition": {"scheme": "iid", "splits": {"train": 0.7, "aux": 0.1, "val": 0.1, "test": 0.1}},
        "algorithm": algorithm,
        "federation": {"num_clients": 3, "rounds": 2, "seed": 7},
        "train": {"local_steps": 2, "batch_size": 4, "lr": 5e-3, "max_length": 64},
        "eval": {"max_examples": 3, "batch_size": 8, "generation": {"max_new_tokens": 4}},
        "output": {"progress": "none"},
        **sections,
    }


def _run(root: Path, name: str, cfg: dict) -> Path:
    config = validate_config(cfg)
    run_dir = prepare_run_dir(config, root / name, None, overwrite=False)
    run_experiment(config, run_dir, "none")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    data = _write_data(root / "data.jsonl")
    return {
        "fedit": _run(root, "fedit", _config(data, {"name": "fedit", "rank": 4, "alpha": 8,
                                                    "personalize_by_finetune": True})),
        "fedamole": _run(root, "fedamole", _config(data, {"name": "fedamole", "num_experts": 4, "expert_choices": 2,
                                                          "min_experts": 2, "max_experts": 4, "top_k": 2, "rank": 4,
                                                          "alpha": 8})),
        # trained with the plain prompt template: eval and generate must use it, not alpaca or a chat template
        "local": _run(root, "local", _config(data, {"name": "local", "rank": 4, "alpha": 8}, prompt="plain")),
        "flame": _run(root, "flame", _config(data, {"name": "flame", "experts": "pretrained", "rank": 4, "alpha": 8},
                                             model="tiny-olmoe", tiers={"per_client": [1, 2, 4]})),
    }


# ----------------------------------------------------------------------------------- references
def _checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("round_*"))[-1]


def _client_tensors(run_dir: Path, cid: int) -> dict:
    return load_file(_checkpoint(run_dir) / "clients" / f"client-{cid}.safetensors")


def _reference(run_dir: Path, tensors: dict, vocab: int, k: int | None = None):
    """A fresh base with the method's adapters holding `tensors` (what the run's model holds)."""
    cfg = validate_config(_resolved(run_dir))
    model = tiny_llama(vocab) if cfg.model.name == "tiny-llama" else tiny_olmoe(vocab)
    adapters = get_algorithm(cfg.algorithm.name).build_adapters(model, cfg)
    adapters.load(tensors)
    if k is not None:
        for _, mod in adapters:
            if hasattr(mod, "set_active_experts"):
                mod.set_active_experts(k)
    return model.eval()


def _resolved(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _logits(model, vocab: int) -> torch.Tensor:
    x = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=x).logits


# ---------------------------------------------------------------------------------- LoRA: peft
def test_fedit_exports_load_in_peft_and_fedmole_with_the_same_logits(runs, tmp_path, tiny_tok):
    run, vocab = runs["fedit"], len(tiny_tok)
    server = load_file(_checkpoint(run) / "server.safetensors")
    cases = {"global": (None, server), "client": (1, _client_tensors(run, 1))}
    refs = {}
    for name, (cid, tensors) in cases.items():
        out = tmp_path / name
        info = export_run(run, out, client=cid)
        assert info["format"] == "peft" and info["round"] == 2
        assert {"adapter_config.json", "adapter_model.safetensors", "fedmole_export.json", "tokenizer.json"} <= {
            p.name for p in out.iterdir()}
        refs[name] = _logits(_reference(run, tensors, vocab), vocab)
        plain = PeftModel.from_pretrained(tiny_llama(vocab), out).eval()  # peft alone, no fedmole loader
        loaded, tok = fedmole.load_model(out)
        assert len(tok) == vocab
        assert (_logits(plain, vocab) - refs[name]).abs().max().item() < 1e-6
        assert torch.equal(_logits(loaded, vocab), refs[name])  # bitwise
    # FedIT-FT: the client's model is its own fine-tuned adapter, not the global one
    assert (refs["client"] - refs["global"]).abs().max().item() > 1e-4


def test_merged_export_is_a_plain_hugging_face_model(runs, tmp_path, tiny_tok):
    run, vocab = runs["fedit"], len(tiny_tok)
    out = tmp_path / "merged"
    assert export_run(run, out, client=2, merge=True)["format"] == "merged"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and "adapter_config.json" not in names
    ref = _logits(_reference(run, _client_tensors(run, 2), vocab), vocab)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (_logits(merged, vocab) - ref).abs().max().item() < 1e-5
    loaded, _ = fedmole.load_model(out)
    assert (_logits(loaded, vocab) - ref).abs().max().item() < 1e-5
    assert (ref - _logits(tiny_llama(vocab).eval(), vocab)).abs().max().item() > 1e-4  # the LoRA is in there


# ------------------------------------------------------------------------------ fedmole format
def test_fedamole_client_export_restores_its_experts_exactly(runs, tmp_path, tiny_tok):
    run, vocab = runs["fedamole"], len(tiny_tok)
    arch = json.loads((run / "summary.json").read_text())["architecture"]
    server = load_file(_checkpoint(run) / "server.safetensors")
    logits = {}
    for cid in (0, 1):
        out = tmp_path / f"c{cid}"
        info = export_run(run, out, client=cid)
        assert info["format"] == "fedmole" and info["experts"] == arch[str(cid)]
        keep = {m: {"shared", "router", *map(str, ids)} for m, ids in arch[str(cid)].items()}
        mine = {k: v for k, v in server.items() if not k.startswith("rsea/")
                and k.rsplit("/", 2)[1] in keep[k.rsplit("/", 2)[0]]}
        ref = _logits(_reference(run, mine, vocab), vocab)
        model, _ = fedmole.load_model(out)
        held = {p: m.held.tolist() for p, m in model.named_modules() if hasattr(m, "held")}
        assert held == arch[str(cid)]
        logits[cid] = _logits(model, vocab)
        assert torch.equal(logits[cid], ref)  # bitwise
    assert (logits[0] - logits[1]).abs().max().item() > 1e-5  # two clients, two different models


def test_flame_client_export_restores_k_and_its_rescaler_exactly(runs, tmp_path, tiny_tok):
    run, vocab = runs["flame"], len(tiny_tok)
    tiers = json.loads((run / "summary.json").read_text())["flame"]["tiers"]
    server = load_file(_checkpoint(run) / "server.safetensors")
    cid = tiers.index(1)  # the k = 1 client
    own = _client_tensors(run, cid)  # its learned rescaler, kept on the client
    assert own and all("/rescaler/" in k for k in own)
    out = tmp_path / "flame-client"
    info = export_run(run, out, client=cid)
    assert info["k"] == 1 and info["rescaler_s"] == {k: pytest.approx(float(v.exp())) for k, v in own.items()}
    ref = _logits(_reference(run, {**server, **own}, vocab, k=1), vocab)
    model, _ = fedmole.load_model(out)
    client_logits = _logits(model, vocab)
    assert torch.equal(client_logits, ref)  # bitwise
    export_run(run, tmp_path / "flame-global", client=None)
    global_model, _ = fedmole.load_model(tmp_path / "flame-global")
    assert torch.equal(_logits(global_model, vocab), _logits(_reference(run, server, vocab, k=4), vocab))
    assert (client_logits - _logits(global_model, vocab)).abs().max().item() > 1e-4


# ----------------------------------------------------------------------------------- bad input
def test_bad_run_dirs_clients_and_rounds_are_clear_user_errors(runs, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "missing", tmp_path / "o", client=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a fedmole run directory"):
        export_run(tmp_path / "empty", tmp_path / "o", client=0)
    with pytest.raises(UserError, match=r"client 3 does not exist: this run has 3 clients, ids 0\.\.2"):
        export_run(runs["fedit"], tmp_path / "o", client=3)
    with pytest.raises(UserError, match=r"round 7 has no checkpoint .* checkpointed rounds: 1, 2"):
        export_run(runs["fedit"], tmp_path / "o", client=0, rnd=7)
    selected = json.loads((runs["fedit"] / "summary.json").read_text())["selected_round"]
    assert resolve_round(runs["fedit"], "selected") == selected and resolve_round(runs["fedit"], None) == 2
    with pytest.raises(UserError, match="not a round number"):
        resolve_round(runs["fedit"], "first")
    with pytest.raises(UserError, match="cannot be merged"):
        export_run(runs["fedamole"], tmp_path / "o", client=0, merge=True)
    with pytest.raises(UserError, match="not a fedmole export"):
        fedmole.load_model(tmp_path / "empty")
    with pytest.raises(UserError, match="is a run directory"):
        fedmole.load_model(runs["fedit"])
    assert not (tmp_path / "o").exists()  # nothing half-written

    cli = CliRunner()
    res = cli.invoke(app, ["export", str(runs["fedit"]), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, UserError) and "exactly one of --client ID" in str(res.exception)
    res = cli.invoke(app, ["eval", str(tmp_path / "missing")])
    assert isinstance(res.exception, UserError) and "does not exist" in str(res.exception)
    # the real command line: one message, exit code 2, no traceback
    env = {**os.environ, "PYTHONPATH": str(Path(fedmole.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "export", str(runs["fedit"]), "--client", "9",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "client 9 does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- re-evaluation
def _compare_with_recorded(result: dict) -> int:
    compared = 0
    for r in result["records"]:
        if r["recorded"] is not None:
            assert r["value"] == r["recorded"], r
            compared += 1
    return compared


def test_eval_of_the_last_round_reproduces_the_recorded_metrics(runs):
    result = evaluate_run(runs["fedit"])
    assert result["round"] == 2 and set(result["models"]) == {"global", "personalized"}
    # every client x {global, personalized} x {loss, score, accuracy, rouge_l} plus the means: all recorded
    assert all(r["recorded"] is not None for r in result["records"])
    assert _compare_with_recorded(result) >= 3 * 2 * 2
    written = json.loads((runs["fedit"] / "eval_round_2_test.json").read_text())
    assert written["records"] == result["records"]

    val = evaluate_run(runs["fedit"], rnd=2, split="val", client=1)
    assert {r["split"] for r in val["records"]} == {"val"} and {r["client"] for r in val["records"]} == {1, None}
    assert _compare_with_recorded(val) >= 2 * 2
    assert (runs["fedit"] / "eval_round_2_val_client_1.json").is_file()


def test_local_models_export_per_client_and_re_evaluate_exactly(runs, tmp_path, tiny_tok):
    run, vocab = runs["local"], len(tiny_tok)
    with pytest.raises(UserError, match="no global model"):
        export_run(run, tmp_path / "g", client=None)
    export_run(run, tmp_path / "c0", client=0)
    model, _ = fedmole.load_model(tmp_path / "c0")
    assert torch.equal(_logits(model, vocab), _logits(_reference(run, _client_tensors(run, 0), vocab), vocab))
    result = evaluate_run(run)
    assert result["models"] == ["personalized"]
    assert all(r["recorded"] is not None for r in result["records"])
    # the run trained and evaluated with the plain template; eval reproduces it only by using that template too
    assert _resolved(run)["data"]["prompt"] == "plain"
    assert _compare_with_recorded(result) >= 3 * 2


def test_eval_of_flame_reproduces_global_and_tierwise_and_adds_client_models(runs):
    result = evaluate_run(runs["flame"])
    assert {"global", "global_k1", "global_k2", "client"} <= set(result["models"])
    assert _compare_with_recorded(result) >= 3 * 2  # global at K and the tier-wise global models
    clients = {r["client"] for r in result["records"] if r["model"] == "client" and r["client"] is not None}
    tiers = json.loads((runs["flame"] / "summary.json").read_text())["flame"]["tiers"]
    assert clients == {c for c, k in enumerate(tiers) if k < 4}  # at k = K with s = 1 it is the global model


def test_eval_of_fedamole_measures_every_clients_exported_model(runs):
    """FedAMoLE evaluates before aggregation, so no checkpoint holds the recorded models; eval measures the
    aggregated experts on each client's architecture (labelled `client`) and claims no recorded value."""
    result = evaluate_run(runs["fedamole"], client=None)
    assert result["models"] == ["client"]
    losses = {r["client"]: r["value"] for r in result["records"] if r["metric"] == "loss"}
    assert set(losses) == {0, 1, 2, None} and all(0 < v < 20 for v in losses.values())
    assert all(r["recorded"] is None for r in result["records"])


# ------------------------------------------------------------------------------------- generate
def test_generate_streams_exactly_the_greedy_output(runs, tmp_path):
    out = tmp_path / "gen"
    export_run(runs["fedit"], out, client=0)
    res = CliRunner().invoke(app, ["generate", str(out), "--prompt", "the dog of", "--template", "raw",
                                   "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    model, tok = fedmole.load_model(out)
    cfg = validate_config(json.loads((out / "fedmole_export.json").read_text())["config"])
    ids = format_prompt("the dog of", tok, cfg, "raw")
    expected = generate(model, tok, ids, 8, stream=False)
    assert expected.strip() and res.output.strip() == expected.strip()
    greedy = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert tok.decode(greedy[0, len(ids):], skip_special_tokens=True) == expected

    # a run directory and a client id give the same model as its export
    direct = CliRunner().invoke(app, ["generate", str(runs["fedit"]), "--client", "0", "--prompt", "the dog of",
                                      "--template", "raw", "--max-new-tokens", "8"])
    assert direct.exit_code == 0 and direct.output == res.output


CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


def test_auto_prompts_use_the_runs_own_template_even_when_the_tokenizer_has_a_chat_template(tiny_tok):
    chat = copy.deepcopy(tiny_tok)
    chat.chat_template = CHAT
    alpaca = validate_config({"data": {"prompt": "alpaca"}})
    assert "### Instruction:\nDefine cat." in chat.decode(format_prompt("Define cat.", chat, alpaca))
    assert chat.decode(format_prompt("Define cat.", chat, alpaca, "chat")) == "<|user|>Define cat.\n<|assistant|>"
    trained_on_chat = validate_config({"data": {"prompt": "chat", "system_prompt": "Be brief."}})
    assert chat.decode(format_prompt("Define cat.", chat, trained_on_chat)) == (
        "<|system|>Be brief.\n<|user|>Define cat.\n<|assistant|>")
    plain = validate_config({"data": {"prompt": "plain"}})
    assert tiny_tok.decode(format_prompt("Define cat.", tiny_tok, plain), skip_special_tokens=True) == "Define cat.\n"
    with pytest.raises(UserError, match="--template"):
        format_prompt("x", chat, plain, "jinja")


def test_generate_prompts_an_export_with_the_template_its_run_trained_with(runs, tmp_path):
    """The `local` run trained with `plain`; its export's tokenizer is given a chat template, which the default
    (`--template auto`) must not use."""
    from transformers import AutoTokenizer

    out = tmp_path / "plain-export"
    export_run(runs["local"], out, client=1)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT
    tok.save_pretrained(out)

    def answer(*template):
        res = CliRunner().invoke(app, ["generate", str(out), "--prompt", "Define the word cat.",
                                       "--max-new-tokens", "6", *template])
        assert res.exit_code == 0, res.output
        return res.output

    model, tok = fedmole.load_model(out)
    cfg = validate_config(json.loads((out / "fedmole_export.json").read_text())["config"])
    ids = format_prompt("Define the word cat.", tok, cfg)
    # the run's plain template, not the chat template
    assert tok.decode(ids, skip_special_tokens=True) == "Define the word cat.\n"
    assert answer() == answer("--template", "plain")
    assert answer().strip() == generate(model, tok, ids, 6, stream=False).strip()
    assert format_prompt("Define the word cat.", tok, cfg, "chat") != ids
