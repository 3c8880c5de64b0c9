"""Progress display: a rich live bar on a terminal, plain log lines elsewhere.

Shows round, client, step, loss and ETA. The ETA comes from rich's speed estimate over all planned local
steps (rounds x clients per round x local steps).
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    def __init__(self, mode: str, total_steps: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self.total = total_steps
        self.rnd = self.rounds = 0
        self.client = None
        self.phase = ""
        self.steps = 0
        self._last_plain = 0.0
        self._progress = None
        if mode == "rich":
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("training", total=total_steps, status="")
            self._progress.start()

    def _update(self, status: str, advance: int = 0) -> None:
        desc = f"round {self.rnd}/{self.rounds}"
        if self._progress is not None:
            self._progress.update(self._task, description=desc, status=status, advance=advance)
        elif self.mode == "plain" and time.monotonic() - self._last_plain > 5.0:
            self._last_plain = time.monotonic()
            self.console.print(f"{desc} {status} [{self.steps}/{self.total} steps]", highlight=False)

    def round(self, rnd: int, rounds: int) -> None:
        self.rnd, self.rounds = rnd, rounds
        self._update("")

    def client_phase(self, phase: str, client: int) -> None:
        self.phase, self.client = phase, client
        self._last_plain = 0.0
        self._update(f"client {client} · {phase}")

    def step(self, step: int, loss: float) -> None:
        self.steps += 1
        self._update(f"client {self.client} · step {step} · loss {loss:.4f}", advance=1)

    def client_done(self, client: int, steps: int) -> None:
        """A client that trains in another process (Flower) finished `steps` local steps."""
        self.steps += steps
        self._update(f"client {client} · done", advance=steps)

    def message(self, text: str) -> None:
        if self.mode != "none":
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
