"""`fedmole flower app CONFIG --out DIR`: a standard Flower app directory for `flwr run DIR [FEDERATION]`.

Its components are fedmole's ServerApp and ClientApp (`fedmole.engines.flower.server_app` / `client_app`);
its run config carries the fedmole config (`runconfig.py`). The flower-deploy launcher (`deploy.py`) writes
one per run.
"""

from __future__ import annotations

from pathlib import Path

from fedmole.config import Config
from fedmole.engines.flower.procs import toml_value
from fedmole.engines.flower.runconfig import config_text


def write_app(cfg: Config, out_dir: str | Path, run_out: str = "", engine_name: str = "flower",
              extra_run_config: dict | None = None) -> Path:
    """Write a standard Flower app directory for `cfg`: pyproject.toml (components, run config carrying the
    fedmole config, a local-simulation federation) and a two-line `fedmole_app` package whose `app` objects
    are fedmole's ServerApp and ClientApp. Operators then use `flwr run DIR [FEDERATION]`.
    Returns the path of the pyproject.toml."""
    out = Path(out_dir)
    pkg = out / "fedmole_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""fedmole Flower app (written by `fedmole flower app`)."""\n')
    for side in ("server", "client"):  # a plain assignment: Flower finds `app` by reading the file
        (pkg / f"{side}_app.py").write_text(f"from fedmole.engines import flower\n\napp = flower.{side}_app\n")
    (out / "fedmole.yaml").write_text(config_text(cfg))  # for reading; the run config below is what runs
    run_config = {"config": config_text(cfg), "out": run_out, "overwrite": False, "state-dir": "",
                  "engine-name": engine_name, "progress": "plain", **(extra_run_config or {})}
    n = cfg.federation.num_clients
    lines = [
        "# Written by `fedmole flower app`. Run: flwr run . local-simulation  (set `out` first, e.g.",
        "#   flwr run . local-simulation --run-config \"out='runs/flower-1'\")",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "fedmole-app"', 'version = "1.0.0"', 'description = "fedmole federation on Flower"',
        'license = "Apache-2.0"', 'dependencies = ["fedmole"]', "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "fedmole"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedmole_app.server_app:app"',
        'clientapp = "fedmole_app.client_app:app"', "",
        "[tool.flwr.app.config]", *[f"{k} = {toml_value(v)}" for k, v in run_config.items()], "",
        "[tool.flwr.federations]", 'default = "local-simulation"', "",
        "[tool.flwr.federations.local-simulation]", f"options.num-supernodes = {n}",
        "options.backend.client-resources.num-cpus = 1",
        f"options.backend.client-resources.num-gpus = {float(cfg.flower.gpus_per_client or 0.0)}", "",
    ]
    path = out / "pyproject.toml"
    path.write_text("\n".join(lines))
    return path
