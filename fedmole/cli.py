"""The `fedmole` command line.

    fedmole run CONFIG [--set key=value ...] [--out RUN_DIR] [--overwrite] [--engine inprocess|flower-sim|flower-deploy]
                       [--superlink HOST:PORT [--root-certificates CA_PEM]]    (flower-deploy)
    fedmole resume RUN_DIR [--config CONFIG] [--set key=value ...] [--engine ENGINE]
    fedmole report RUN_DIR [RUN_DIR ...] [--out DIR] [--csv] [--rounds 1,3]
    fedmole data build wordnet [--force]
    fedmole data partition CONFIG [--set key=value ...]
    fedmole export RUN_DIR (--client ID | --global) --out DIR [--round N] [--merge]
    fedmole eval RUN_DIR [--round N] [--split test|val] [--client ID]
    fedmole generate DIR --prompt TEXT [--max-new-tokens N]   (or RUN_DIR --client ID)
    fedmole flower app CONFIG --out DIR [--set key=value ...] [--flowertune general-nlp|finance|medical|code]
    fedmole flower certs --out DIR [--host IP_OR_NAME ...]
    fedmole flower keys --out DIR [--name NAME ...]

A user error (bad config, missing file, unknown model...) prints one message and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedmole import cli_results
from fedmole.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Federated fine-tuning of LLMs with mixtures of LoRA experts.")
data_app = typer.Typer(no_args_is_help=True, help="Build datasets and inspect partitions.")
app.add_typer(data_app, name="data")
flower_app = typer.Typer(no_args_is_help=True, help="Flower apps of fedmole configs.")
app.add_typer(flower_app, name="flower")

# pipes and log files get a fixed, wide layout instead of rich's 80-column default
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

SET_HELP = "Override a config value, e.g. --set train.lr=1e-4 (repeatable)."
ENGINES = ("inprocess", "flower-sim", "flower-deploy")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        from fedmole.errors import did_you_mean

        raise UserError(f'unknown engine "{engine}"{did_you_mean(engine, ENGINES)}; choose one of: '
                        + ", ".join(ENGINES))
    return engine


SUPERLINK_HELP = "flower-deploy: the SuperLink's HOST:PORT."
ROOT_CERTS_HELP = ("flower-deploy: CA certificate (PEM) of the SuperLink's TLS certificate; without it the connection "
                   "is insecure (no TLS).")


def check_deploy_options(engine: str, superlink: str | None, root_certificates: Path | None) -> None:
    """--superlink / --root-certificates: required and checked for flower-deploy, refused otherwise."""
    if engine == "flower-deploy":
        from fedmole.engines.flower.deploy import check_superlink

        check_superlink(superlink, root_certificates)
    elif superlink is not None or root_certificates is not None:
        raise UserError("--superlink and --root-certificates only apply to --engine flower-deploy")


def run_deploy(cfg, run_dir: Path, superlink: str, root_certificates: Path | None, resume: bool = False) -> dict:
    """`--engine flower-deploy`: run the ServerApp against a running SuperLink; returns the summary. With
    `resume`, `cfg` is the run's own config (`fedmole.run.check_resumable`) and the run continues."""
    from fedmole.engines.flower.deploy import run_flower_deploy

    return run_flower_deploy(cfg, run_dir, superlink, root_certificates, resume=resume,
                             echo=lambda line: print(line, flush=True))


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    out_dir: Path | None = typer.Option(None, "--out", help="Run directory (default: output.dir/<name>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    progress: str | None = typer.Option(None, "--progress", help="auto, rich, plain or none."),
    engine: str = typer.Option("inprocess", "--engine", help="inprocess, flower-sim or flower-deploy."),
    superlink: str | None = typer.Option(None, "--superlink", help=SUPERLINK_HELP),
    root_certificates: Path | None = typer.Option(None, "--root-certificates", help=ROOT_CERTS_HELP),
) -> None:
    """Run a federated fine-tuning experiment."""
    from fedmole.config_io import load_config

    check_engine(engine)
    check_deploy_options(engine, superlink, root_certificates)
    cfg = load_config(config, set_)
    if progress is not None:
        cfg.output.progress = progress
    from fedmole.rundir import claim, claimed
    from fedmole.run import run_dir_path, run_experiment

    run_dir = run_dir_path(cfg, out_dir, config)
    if engine == "flower-deploy":  # the ServerApp, another process, writes the run directory and locks it
        claim(run_dir, overwrite)
        announce(cfg, run_dir)
        summary = run_deploy(cfg, run_dir, superlink, root_certificates)
    else:
        with claimed(run_dir, overwrite):  # held from the check of the directory to the end of the run
            announce(cfg, run_dir)
            if engine == "flower-sim":
                from fedmole.engines.flower.simulation import run_flower_sim

                summary = run_flower_sim(cfg, run_dir)
            else:
                summary = run_experiment(cfg, run_dir)
    print_results(summary, run_dir)


def announce(cfg, run_dir: Path) -> None:
    out.print(f"fedmole: {cfg.algorithm.name} on {cfg.model.name}, {cfg.federation.num_clients} clients, "
              f"{cfg.federation.rounds} rounds -> {run_dir}")


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory of an interrupted run."),
    config: Path | None = typer.Option(None, "--config", help="Config to check against the run's own."),
    set_: list[str] = typer.Option([], "--set", help="Overrides to check against the run's config."),
    progress: str | None = typer.Option(None, "--progress", help="auto, rich, plain or none."),
    engine: str = typer.Option("inprocess", "--engine", help="inprocess, flower-sim or flower-deploy."),
    superlink: str | None = typer.Option(None, "--superlink", help=SUPERLINK_HELP),
    root_certificates: Path | None = typer.Option(None, "--root-certificates", help=ROOT_CERTS_HELP),
) -> None:
    """Continue a run from its last complete checkpoint (exactly: same final state and metrics)."""
    from fedmole.rundir import hold
    from fedmole.run import check_resumable, resume_experiment

    check_engine(engine)
    check_deploy_options(engine, superlink, root_certificates)
    out.print(f"fedmole: resuming {run_dir}")
    if engine == "flower-deploy":  # the ServerApp, another process, resumes the run and locks it
        summary = run_deploy(check_resumable(run_dir, config, set_), run_dir, superlink, root_certificates,
                             resume=True)
    elif engine == "flower-sim":
        cfg = check_resumable(run_dir, config, set_)
        with hold(run_dir):
            from fedmole.engines.flower.simulation import run_flower_sim

            summary = run_flower_sim(cfg, run_dir, progress, resume=True)
    else:
        summary = resume_experiment(run_dir, config, set_, progress)
    print_results(summary, run_dir)


def print_results(summary: dict, run_dir: Path) -> None:
    metric = summary["metric"]
    table = Table(title=f"{summary['algorithm']} · {metric} (test; round selected on validation)")
    for col in ("model", "selected round", "val", "test @ selected", "last round", "test @ last"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for model in ("personalized", "global"):
        res = summary.get(model)
        if not res:
            continue
        label = model + (" (headline)" if model == summary["headline"] else "")
        val = "" if res["val"] is None else f"{res['val']:.2f}"
        table.add_row(label, str(res["selected_round"]), val, f"{res['mean']:.2f}", str(res["last_round"]),
                      f"{res['last_mean']:.2f}")
    out.print(table)
    head = summary.get(summary["headline"])
    if head and metric == "score":
        print_score_parts(run_dir, summary["headline"], head["selected_round"])
    if head and head["per_client"]:
        per = Table(title=f"per client ({summary['headline']}, round {head['selected_round']})")
        per.add_column("client")
        per.add_column(f"test {metric}", justify="right")
        for cid, value in sorted(head["per_client"].items(), key=lambda kv: int(kv[0])):
            per.add_row(cid, f"{value:.2f}")
        out.print(per)
    out.print(f"run directory: {run_dir}  (summary.json, metrics.jsonl, partition.json, checkpoints/)")
    if summary.get("stopped"):
        out.print(f"stopped early ({summary['stopped']}) after round {summary['rounds_completed']}")
    skipped = {k: v for k, v in summary.get("skipped", {}).items() if v}
    if skipped:
        out.print("skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + "  (details in run.log)")
    if "dp" in summary:
        dp = summary["dp"]
        out.print(f"differential privacy: epsilon {dp['epsilon']:.2f} at delta {dp['delta']:g}")
    if "dp_embeddings" in summary:
        emb = summary["dp_embeddings"]
        nominal = "  (nominal: the clip bound comes from the data)" if emb["clip"] is None else ""
        out.print(f"embedding DP: epsilon up to {emb['epsilon_max']:.4g} per client (delta 0){nominal}")
    out.print(f"state_digest: {summary['state_digest']}  ·  {summary['wall_seconds']:.1f} s")


def print_score_parts(run_dir: Path, model: str, rnd: int) -> None:
    """When the tasks mix classification and generation, what `score` averages and each part's value."""
    from fedmole.reporting.metrics import SCORE_PARTS, score_parts
    from fedmole.reporting.scalars import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    if len(score_parts(records)) < 2:
        return
    alone = {r["metric"]: r["value"] for r in records if r["metric"] in SCORE_PARTS and r["client"] is None
             and r["round"] == rnd and r["model"] == model and r["split"] == "test"}
    parts = ", ".join(f"{SCORE_PARTS[m]} {alone[m]:.2f}" for m in SCORE_PARTS if m in alone)
    out.print(f"score averages accuracy (classification examples) and ROUGE-L F (generation examples) per example; "
              f"{model} test @ round {rnd}: {parts}", highlight=False)


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN_DIR/report for one "
                                        "run, ./fedmole-report for several)."),
    csv: bool = typer.Option(False, "--csv", help="Also write metrics.csv (every run, with a `run` column)."),
    rounds: str | None = typer.Option(None, "--rounds", help="Rounds of the expert-assignment heatmaps, e.g. 1,3 "
                                      "(default: first, middle and last)."),
) -> None:
    """Write report.html (self-contained, images embedded) and the figures as PNGs."""
    from fedmole.reporting.report import write_report

    chosen = None
    if rounds is not None:
        try:
            chosen = [int(x) for x in rounds.split(",") if x.strip()]
        except ValueError:
            raise UserError(f'--rounds "{rounds}" must be round numbers separated by commas, e.g. 1,3') from None
    path = write_report(run_dirs, out_dir, csv, chosen)
    out.print(f"report: {path}")


@data_app.command("build")
def data_build(
    name: str = typer.Argument(..., help="Dataset to build: wordnet."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
) -> None:
    """Build and cache a derived dataset."""
    if name != "wordnet":
        raise UserError(f'unknown dataset "{name}"; buildable datasets: wordnet')
    from fedmole.data.wordnet import build_wordnet_cache

    path = build_wordnet_cache(force=force)
    out.print(f"wordnet: {path}")


@data_app.command("partition")
def data_partition(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the partition a config produces (per-client split sizes and group histogram), without training."""
    from fedmole.config_io import load_config
    from fedmole.data.partition import manifest, partition_table
    from fedmole.run import load_federated_data

    cfg = load_config(config, set_)
    out.print(partition_table(manifest(load_federated_data(cfg), cfg.partition.by)))


app.command("export")(cli_results.export_cmd)
app.command("eval")(cli_results.eval_cmd)
app.command("generate")(cli_results.generate_cmd)


@flower_app.command("app")
def flower_write_app(
    config: Path = typer.Argument(..., help="YAML config file."),
    out_dir: Path = typer.Option(..., "--out", help="Directory to write the Flower app to."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    run_out: str = typer.Option("", "--run-out", help="Run directory the ServerApp writes (run config `out`)."),
    flowertune: str | None = typer.Option(None, "--flowertune", help="Write a FlowerTune LLM Leaderboard project "
                                          "for this challenge: general-nlp, finance, medical or code "
                                          "(docs/flowertune.md)."),
) -> None:
    """Write a Flower app directory (pyproject.toml + components) for `flwr run DIR [FEDERATION]`."""
    from fedmole.config_io import load_config

    cfg = load_config(config, set_)
    if out_dir.exists() and (out_dir / "pyproject.toml").exists():
        raise UserError(f"{out_dir} already holds a pyproject.toml; choose another --out")
    run_out = str(Path(run_out).resolve()) if run_out else ""
    if flowertune is not None:
        write_flowertune(cfg, flowertune, out_dir, run_out)
        return
    from fedmole.engines.flower.app import write_app

    path = write_app(cfg, out_dir, run_out)
    n = cfg.federation.num_clients
    out.print(f"Flower app: {path}\n"
              f"  simulate: flwr run {out_dir} local-simulation --run-config \"out='/abs/runs/NAME'\"\n"
              f"  deploy:   flwr run {out_dir} FEDERATION --run-config \"out='/abs/runs/NAME' "
              f"engine-name='flower-deploy'\"\n            with one SuperNode per client: "
              f"--node-config 'partition-id=I num-partitions={n}'")


def write_flowertune(cfg, challenge: str, out_dir: Path, run_out: str) -> None:
    from fedmole.engines.flower import flowertune

    ch = flowertune.challenge_of(challenge)
    cfg, changed = flowertune.project_config(cfg, ch)
    path = flowertune.write_project(cfg, ch, out_dir, run_out)
    for line in changed:
        out.print(f"  set for the challenge: {line}", highlight=False)
    out.print(f"FlowerTune {ch.name} project ({cfg.algorithm.name}, {cfg.model.name}): {path}\n"
              f"  run:  cd {out_dir} && flwr run . local --stream "
              f"--federation-config \"num-supernodes={ch.supernodes}\""
              f"\n  submit: see {out_dir / 'README.md'} (the leaderboard fixes {ch.dataset} and {ch.supernodes} "
              f"SuperNodes)", highlight=False)


@flower_app.command("certs")
def flower_certs(
    out_dir: Path = typer.Option(..., "--out", help="Directory for ca.crt, ca.key, server.pem, server.key."),
    host: list[str] = typer.Option([], "--host", help="IP address or DNS name SuperNodes use to reach the "
                                   "SuperLink (repeatable); 127.0.0.1 and localhost are always included."),
    days: int = typer.Option(365, "--days", help="Validity in days."),
) -> None:
    """Write a self-signed CA and a SuperLink TLS certificate signed by it (docs/deployment.md)."""
    from fedmole.engines.flower.procs import make_certificates

    if days < 1:
        raise UserError(f"--days {days}: a certificate must be valid for at least 1 day")
    if (out_dir / "server.pem").exists():
        raise UserError(f"{out_dir} already holds server.pem; choose another --out or delete the old files")
    # the SuperLink's own SuperExec reaches it on 127.0.0.1 (also when it listens on 0.0.0.0)
    hosts = list(dict.fromkeys([*host, "127.0.0.1", "localhost"]))
    c = make_certificates(out_dir, hosts, days)
    out.print(f"CA certificate: {c.ca}  (give it to every SuperNode and to `flwr`: --root-certificates)\n"
              f"SuperLink certificate: {c.cert}, key: {c.key}  (for {', '.join(hosts)}; keep the keys private)")


@flower_app.command("keys")
def flower_keys(
    out_dir: Path = typer.Option(..., "--out", help="Directory for the key pairs."),
    name: list[str] = typer.Option(["supernode"], "--name", help="Key pair name, one per SuperNode (repeatable)."),
) -> None:
    """Write EC key pairs for SuperNode authentication (NAME private, NAME.pub for `flwr supernode register`)."""
    from fedmole.engines.flower.procs import make_auth_keys

    for n in name:
        if (out_dir / n).exists():
            raise UserError(f"{out_dir / n} already exists; choose another --name or --out")
        private, public = make_auth_keys(out_dir, n)
        out.print(f"{n}: private {private} (flower-supernode --auth-supernode-private-key), public {public} "
                  f"(flwr supernode register)")


def main() -> None:
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
