"""The Flower engine: the same round loop and algorithm objects, with clients on Flower SuperNodes.

Server side, the ServerApp runs `fedmole.run.run_experiment` with a `FlowerEngine`: the round loop, the
strategy, checkpoints and the run directory are exactly those of the in-process engine; the engine only turns
each client's `Payload` into a Flower `Message` for the node that holds that client and the reply back into a
`Reply` (or a failure). Client side, the ClientApp runs `fedmole.client.execute.execute` for each message on
the node's own client, as the in-process engine does, with the client's state kept on the node.

Modules, below `fedmole.run` first:

  records.py     the wire codec: payloads, replies and failures <-> Flower records
  runconfig.py   what the Flower run config carries (the fedmole config as YAML, `out`, `state-dir`, ...)
  engine.py      FlowerEngine: the engine interface over a Flower `Grid`
  app.py         `fedmole flower app`: a Flower app directory for `flwr run`
  procs.py       starting and stopping Flower's processes by PID (deployment, tests, flower-sim's tracker)
  watchdog.py    stops a simulation's processes when the process that started them is killed
  deploy.py      `--engine flower-deploy`: submit the app to a running SuperLink

and the applications of the round loop, above `fedmole.run`:

  serverapp.py   the ServerApp (`server_main`): a fedmole run with the clients on Flower nodes
  clientapp.py   the ClientApp (`handle_message`): one fedmole client per node, its data and state there
  simulation.py  `--engine flower-sim`: both apps on Flower's simulation engine (Ray) in this process
  flowertune.py  FlowerTune LLM Leaderboard projects (their own ServerApp, the same ClientApp)

`server_app` and `client_app`, the objects a written Flower app's components point at
(`from fedmole.engines import flower; app = flower.server_app`), are attributes of this package.
"""

from __future__ import annotations

__all__ = ["client_app", "server_app"]


def __getattr__(name: str):
    """`server_app` / `client_app`, imported on first use: they import `fedmole.run`, torch and Flower, which
    the light modules of this package (`procs`, `watchdog`, `app`, `deploy`) and their processes do without."""
    if name == "server_app":
        from fedmole.engines.flower.serverapp import server_app

        return server_app
    if name == "client_app":
        from fedmole.engines.flower.clientapp import client_app

        return client_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
