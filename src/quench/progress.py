"""Progress bars (rich) on stderr: shown on a terminal, silent otherwise or when disabled."""

from __future__ import annotations

import sys


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Bar:
    """A progress bar for ``total`` items (or bytes with ``unit="bytes"``); a no-op when off."""

    def __init__(
        self, description: str, total: int | None, enabled: bool = True, unit: str = "items"
    ) -> None:
        self._progress = None
        if enabled and stderr_is_tty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            counts = (
                [DownloadColumn(), TransferSpeedColumn()]
                if unit == "bytes"
                else [MofNCompleteColumn(), TimeElapsedColumn()]
            )
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                *counts,
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=unit != "bytes",
            )
            self._task = self._progress.add_task(description, total=total)

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def __enter__(self) -> Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and n:
            self._progress.advance(self._task, n)
