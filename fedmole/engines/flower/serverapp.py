"""The ServerApp: a fedmole run (same files as an in-process run) with the clients on Flower nodes.

`server_main` reads the fedmole config from the run config (`runconfig.py`), then runs
`fedmole.run.run_experiment` (or `resume_experiment`) with a `FlowerEngine`: the round loop, the strategy,
checkpoints and the run directory are exactly those of the in-process engine. An application of the round
loop, so this module sits above `fedmole.run`; the engine, the codec and the app writer sit below it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmole.engines.flower.engine import FlowerEngine
from fedmole.engines.flower.runconfig import config_from_text, run_settings
from fedmole.errors import UserError
from fedmole.run import prepare_run_dir, resume_experiment, run_experiment


def server_main(grid: Grid, context: Context, bound: dict | None = None) -> dict:
    """The ServerApp: a fedmole run (same files as an in-process run) with the clients on Flower nodes."""
    settings = run_settings(context.run_config, bound)
    cfg = config_from_text(settings["config"])
    if not settings.get("out"):
        raise UserError("the Flower run config has no `out` key (the run directory); pass --run-config "
                        "\"out='runs/NAME'\"")
    name = settings.get("engine-name", "flower-sim")
    make_engine = lambda c: FlowerEngine(grid, c, name)  # noqa: E731
    if settings.get("resume"):  # continue the run in `out` from its last checkpoint (its own config)
        return resume_experiment(Path(settings["out"]), progress_mode=settings.get("progress"),
                                 make_engine=make_engine)
    run_dir = prepare_run_dir(cfg, settings["out"], None, bool(settings.get("overwrite", False)))
    return run_experiment(cfg, run_dir, settings.get("progress"), make_engine=make_engine)


def make_server_app(bound: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(grid, context, bound)

    return app


# the object a Flower app's pyproject points at (`flwr run`): settings come from the run config
server_app = make_server_app()
