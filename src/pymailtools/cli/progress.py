"""A rich progress bar for long queue runs on a terminal (sendmail -q, postqueue -f)."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pymailtools.qmgr.runner import Progress as RunnerProgress
from pymailtools.qmgr.runner import Stats


class Bar(RunnerProgress):
    """Messages done out of those due, with the delivered/deferred/bounced counts so far.

    Use as a context manager around Runner.run(); it draws on stderr only."""

    def __init__(self, description: str = "queue run") -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=False)
        self._task = self._progress.add_task(description, total=0, counts="")

    def __enter__(self) -> "Bar":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def add_total(self, n: int) -> None:
        task = self._progress.tasks[0]
        self._progress.update(self._task, total=(task.total or 0) + n)

    def advance(self, stats: Stats) -> None:
        counts = (f"[green]{stats.delivered} delivered[/] [yellow]{stats.deferred} deferred[/] "
                  f"[red]{stats.bounced} bounced[/]")
        self._progress.update(self._task, advance=1, counts=counts)
