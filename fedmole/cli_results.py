"""The commands that use a run's results: `fedmole export`, `fedmole eval`, `fedmole generate`
(registered on the app in `fedmole.cli`; the work is done in `fedmole.export`, `fedmole.reeval` and
`fedmole.generate`)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedmole.errors import UserError

out = Console(width=None if sys.stdout.isatty() else 120)
ROUND_HELP = "Checkpoint round: a number, last (default) or selected (the round chosen on validation)."


def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    out_dir: Path = typer.Option(..., "--out", help="Export directory to write."),
    client: int | None = typer.Option(None, "--client", help="Export this client's personalised model."),
    global_: bool = typer.Option(False, "--global", help="Export the global model."),
    round_: str | None = typer.Option(None, "--round", help=ROUND_HELP),
    merge: bool = typer.Option(False, "--merge", help="LoRA methods: a full model with the LoRA merged in."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export directory."),
) -> None:
    """Export a client's or the global model (peft, merged HF model, or fedmole format); see docs/export.md."""
    if (client is None) == (not global_):
        raise UserError("choose exactly one of --client ID (a client's personalised model) and --global")
    from fedmole.export import export_run

    info = export_run(run_dir, out_dir, client, round_, merge, overwrite)
    who = "global model" if client is None else f"client {client}"
    out.print(f"exported {info['method']} {who} of round {info['round']} as {info['format']} -> {out_dir}")


def eval_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    round_: str | None = typer.Option(None, "--round", help=ROUND_HELP),
    split: str = typer.Option("test", "--split", help="test or val."),
    client: int | None = typer.Option(None, "--client", help="Only this client."),
) -> None:
    """Re-evaluate a checkpoint without training; writes eval_round_N_SPLIT.json into the run directory."""
    from fedmole.reeval import evaluate_run, result_rows

    result = evaluate_run(run_dir, round_, split, client)
    table = Table(title=f"{result['algorithm']} · round {result['round']} · {split} "
                        f"(re-evaluated; recorded = metrics.jsonl)")
    for col in ("model", "client", "score", "loss", "recorded score", "recorded loss"):
        table.add_column(col, justify="left" if col == "model" else "right")
    fmt = lambda v: "" if v is None else f"{v:.4f}"
    for row in result_rows(result):
        table.add_row(row["model"], "mean" if row["client"] is None else str(row["client"]), fmt(row.get("score")),
                      fmt(row.get("loss")), fmt(row.get("recorded_score")), fmt(row.get("recorded_loss")))
    out.print(table)
    for cid, why in result["failures"].items():
        out.print(f"client {cid} failed: {why}")
    out.print(f"written: {result['path']}")


def generate_cmd(
    path: Path = typer.Argument(..., help="Export directory, or a run directory with --client."),
    prompt: str = typer.Option(..., "--prompt", help="The instruction to answer."),
    client: int | None = typer.Option(None, "--client", help="With a run directory: this client's model."),
    round_: str | None = typer.Option(None, "--round", help=ROUND_HELP),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    template: str = typer.Option("auto", "--template",
                                 help="auto (the template the run trained with), chat, alpaca, plain, raw."),
    sample: bool = typer.Option(False, "--sample", help="Sample (temperature 0.7, top-p 0.9) instead of greedy."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda (default: the run's)."),
) -> None:
    """Generate with a personalised model, streaming the answer to the terminal."""
    from fedmole.generate import TEMPLATES, format_prompt, generate, load_for_generation

    if template not in TEMPLATES:
        raise UserError(f"--template {template!r} is not one of {', '.join(TEMPLATES)}")
    model, tokenizer, cfg = load_for_generation(path, client, round_, device)
    generate(model, tokenizer, format_prompt(prompt, tokenizer, cfg, template), max_new_tokens, stream=True,
             sample=sample)

