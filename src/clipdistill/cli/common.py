"""What every command module shares: the error console, the user-error decorator, the exit on a
stop signal, the metrics table and the dataset options.

``cli/main.py`` builds the app and registers the commands of ``cli/*_cmd.py``; those modules
import what they share from here, never from ``main``, so no command module imports back
from the module that imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape  # messages hold paths and fields like images[0] or [train]

from clipdistill.errors import UserError

if TYPE_CHECKING:
    from clipdistill.train.state import TrainingStopped

# soft_wrap: never break paths or values inside error messages. emoji=False: names users choose
# are printed as written (rich would turn a dataset called "mine:train:" into "mine🚋").
console = Console(stderr=True, soft_wrap=True, emoji=False)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors() -> tuple[type[BaseException], ...]:
    """What a command reports as ``error: ...`` (exit status 2) instead of a traceback:
    :class:`~clipdistill.errors.UserError`, a missing file, and the user errors that do not yet
    subclass ``UserError`` (imported only when an error is being handled: ``search`` must run
    without torch)."""
    from clipdistill.data.dataset import DatasetError
    from clipdistill.distill.cache import CacheError
    from clipdistill.export.onnx import ExportConfigError
    from clipdistill.models.fusion import FusionError
    from clipdistill.serve.embed import EmbedError
    from clipdistill.serve.encoders import ExportError
    from clipdistill.serve.index import IndexBuildError
    from clipdistill.serve.preprocess import ImageInputError
    from clipdistill.serve.search import QueryError

    not_yet_user_errors = (
        DatasetError,
        CacheError,
        FusionError,
        EmbedError,
        ExportError,
        ExportConfigError,
        IndexBuildError,
        ImageInputError,
        QueryError,
    )
    return (UserError, FileNotFoundError, *not_yet_user_errors)


def print_error(error: BaseException) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, markup=True)


def reports_user_errors(command: F) -> F:
    """Turn the user errors we raise on purpose into ``error: ...`` and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except user_errors() as error:
            print_error(error)
            raise typer.Exit(code=2) from error

    return wrapper  # type: ignore[return-value]


def exit_stopped(stopped: TrainingStopped, message: str) -> NoReturn:
    """Print ``message`` and exit with the shell's code for the signal that stopped training
    (128 + signal number), so scripts and schedulers see a stop, not a crash."""
    import signal

    console.print(message, highlight=False)
    raise typer.Exit(code=128 + getattr(signal, stopped.signal_name)) from None


def print_metrics(title: str, metrics: dict[str, float], fmt: str = ".2f") -> None:
    """One row of metrics under ``title`` on stdout, each value formatted with ``fmt``. The title
    holds names users chose (model specs, dataset names, paths), so it is plain text: no markup,
    no emoji codes."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), min_width=len(title))  # a title wider than the columns stays whole
    for key in metrics:
        table.add_column(Text(key), justify="right")
    table.add_row(*(format(value, fmt) for value in metrics.values()))
    Console(emoji=False).print(table)


DataOpt = Annotated[
    Path,
    typer.Option(
        "--data", help="Dataset: a folder with dataset.json, a Karpathy JSON, a CSV/TSV or an image+txt folder."
    ),
]
ImagesOpt = Annotated[
    Path | None, typer.Option("--images", help="Image root for a Karpathy JSON or CSV (default: its folder).")
]
ValDataOpt = Annotated[
    Path | None, typer.Option("--val-data", help="A file/folder that is the val split (--data is then train).")
]
TestDataOpt = Annotated[
    Path | None, typer.Option("--test-data", help="A file/folder that is the test split (--data is then train).")
]
SplitSeedOpt = Annotated[int, typer.Option("--split-seed", help="Seed of the splits carved from train.")]
GroupByOpt = Annotated[
    str | None,
    typer.Option("--group-by", help="CSV column (or Karpathy 'concept') whose groups a carved split keeps whole."),
]


def split_options(val_data: Path | None, test_data: Path | None, split_seed: int, group_by: str | None) -> Any:
    """The :class:`~clipdistill.data.splits.SplitOptions` the four split flags give: every command
    that reads a dataset carves missing splits the same way (``data/splits.py``)."""
    from clipdistill.data.splits import SplitOptions

    return SplitOptions(val_data=val_data, test_data=test_data, seed=split_seed, group_by=group_by)
