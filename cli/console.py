"""Shared rich helpers of the CLI: console, logging, progress bars, errors (and the advice
the CLI adds to them), a run's summary, a review dataset."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from selfment_label.runfolder.record import ProgressCallback, RunSummary

console = Console(stderr=True)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING_LABELLED = 3


class _State:
    verbose = False


def setup_logging(verbose: bool) -> None:
    """Route the library's logging through rich (warnings only unless ``verbose``)."""
    _State.verbose = verbose
    level = logging.DEBUG if verbose else logging.WARNING
    handler = RichHandler(console=console, show_path=False, show_time=False)
    # The handler's own level filters what other packages' loggers pass up to the root
    # (FiftyOne logs its App banner at INFO with a handler of its own: shown once, by it).
    handler.setLevel(level)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


class RateColumn(ProgressColumn):
    """Items per second: for a task with a ``labelled_now`` field, those items over the time
    since the task began (images a run resumes count as done, not in the rate; nor does a
    burst of one batch's images inflate it); for others, rich's recent speed."""

    def __init__(self, unit: str = "img"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        """Show the task's rate."""
        labelled = task.fields.get("labelled_now")
        if labelled is None:
            speed = task.finished_speed or task.speed
        else:
            speed = labelled / task.elapsed if task.elapsed else None
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="cyan")


class LabelProgress:
    """The progress callback of a labelling call: moves the bar over every image (resumed ones
    included) and counts the images done by this invocation for the rate.

    Arguments:
      progress: the bar's ``Progress``.
    """

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = progress.add_task("loading model…", total=None)
        self.resumed: int | None = None

    def __call__(self, done: int, total: int, name: str, reason: str | None) -> None:
        """Called after every image with ``(done, total, file name, skip reason)``."""
        if self.resumed is None:
            self.resumed = done - 1
        self.progress.update(
            self.task,
            completed=done,
            total=total,
            description="labelling",
            labelled_now=done - self.resumed,
        )


def make_progress(unit: str = "img") -> Progress:
    """A progress bar with count, rate and ETA."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def require_choice(value: str, choices: Iterable[str], option: str) -> None:
    """Raise a usage error naming ``option`` when ``value`` is not one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise typer.BadParameter(f"choose one of {', '.join(choices)}", param_hint=option)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error and return the ``typer.Exit`` to raise."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def describe_os_error(error: OSError) -> str:
    """One sentence for a file-system error the user can fix (disk full, read-only, ...)."""
    where = f" ({error.filename})" if error.filename else ""
    what = WRITE_ERRORS.get(error.errno or 0, error.strerror or str(error))
    advice = ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = (
            "; free some space and run the same command again (finished work is kept in the"
            " run's journal)"
        )
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = "; choose an --out you can write to"
    return f"cannot use a file{where}: {what}{advice}"


@contextmanager
def invalid_options() -> Iterator[None]:
    """Turn a ``ValueError`` from building a config into a one-line usage error (exit 2)."""
    try:
        yield
    except ValueError as error:
        raise fail(f"invalid option: {error}", EXIT_USAGE) from None


ADVICE = {
    "overwrite": "use --overwrite to replace it, or choose another --out",
    "out_dir": "choose another --out",
    "name": "choose another --name",
    "review": "review the run first with `selfment-label review {run_dir}`",
    "review_named": "review the run first with `selfment-label review {run_dir} --name {name}`",
    "export_overwrite": "use --overwrite to replace its contents (a previous export only), or "
    "choose another folder",
    "export_target": "choose an empty or new folder",
    "head_weights": "pass --weights with the weights file the head was made with",
    "lr": "train again with a lower --lr",
    "mode": "use --mode single",
    "run_dir": "make one with `selfment-label run IMAGES --out RUN_DIR`",
    "input_dir": "copy the images down (for example `aws s3 sync URI ./images`) and run "
    "`selfment-label run ./images --out RUN_DIR` with the run's options (images whose size "
    "and modification time match the journal are not labelled again)",
    "weights": "pass a local weights file with --weights FILE (or set $SELFMENT_WEIGHTS)",
    "backbone": "choose that --backbone, or pass the weights of yours with --weights",
    "device": "choose another --device (auto, cpu, cuda or cuda:N)",
    "refine": "or choose another --refine (guided needs no extra)",
    "ray_address": "`ray start --head` prints a cluster's address; leave out --ray-address "
    "for a local instance",
}
"""What to do at the command line, for each ``SelfmentError.remedy``: the library states the
fact, the CLI names its flags."""


def describe_error(error: BaseException) -> str:
    """The sentence the CLI prints for a user's error: the library's fact, then the advice of
    its remedy in command-line terms (``ADVICE``)."""
    advice = ADVICE.get(getattr(error, "remedy", None) or "")
    if not advice:
        return str(error)
    return f"{error}; {advice.format_map(_Named(getattr(error, 'context', {})))}"


class _Named(dict):
    """An error's context for its advice: a value it lacks reads as its name (``RUN_DIR``)."""

    def __missing__(self, key: str) -> str:
        return key.upper()


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn a library error (``SelfmentError``) or one of the listed exceptions into a clean
    error message and exit code 1.

    Any other exception is a bug: its traceback is shown with ``-v``, else one line that
    says how to see it.
    """
    from selfment_label.errors import SelfmentError

    try:
        yield
    except (SelfmentError, *kinds) as error:
        raise fail(describe_error(error)) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as error:
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            raise fail(describe_os_error(error)) from None
        if _State.verbose:
            console.print_exception()
            raise typer.Exit(EXIT_ERROR) from None
        raise fail(
            f"unexpected {type(error).__name__}: {error} (run again with -v for the traceback)"
        ) from None


def print_summary(summary: RunSummary) -> None:
    """The final table: counts, seconds per stage, throughput."""
    title = f"selfment-label -> {summary.out_dir}"
    table = Table(title=title, show_header=False, min_width=len(title))  # the title on one line
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("images found", str(summary.total))
    table.add_row("labelled now", str(summary.labelled))
    if summary.resumed:
        table.add_row("already done (resumed)", str(summary.resumed))
    table.add_row("skipped", str(len(summary.skipped)))
    table.add_row("annotations", str(summary.annotations))
    for note in sorted({key for notes in summary.notes.values() for key in notes}):
        count = sum(note in notes for notes in summary.notes.values())
        table.add_row(f"{note} noted (run.json)", str(count))
    for stage, seconds in summary.stages.items():
        table.add_row(f"{stage} s", f"{seconds:.2f}")
    table.add_row("wall s (all)", f"{summary.wall_seconds:.2f}")
    table.add_row("images/s", f"{summary.images_per_second:.2f}")
    console.print(table)
    if summary.skipped:
        skipped = Table(title="skipped images")
        skipped.add_column("file")
        skipped.add_column("reason")
        for name, reason in summary.skipped.items():
            skipped.add_row(name, reason)
        console.print(skipped)
        from selfment_label.data.images import TOO_LARGE

        if any(reason.startswith(TOO_LARGE) for reason in summary.skipped.values()):
            console.print(f"images {TOO_LARGE}: raise the limit with --max-pixels to label them")


LABEL_ERRORS = (FileNotFoundError, NotADirectoryError)
"""Besides every ``SelfmentError``: a missing input folder is a sentence too."""


def label_with_progress(label: Callable[[ProgressCallback], RunSummary]) -> RunSummary:
    """Run a labelling call under a progress bar, print its summary and return it.

    Arguments:
      label: called with the progress callback; returns the run's summary. Its library
        errors (``SelfmentError``) and a missing input folder are reported as a sentence.
    """
    with user_errors(*LABEL_ERRORS), make_progress() as progress:
        summary = label(LabelProgress(progress))
    print_summary(summary)
    if summary.total and len(summary.skipped) == summary.total:
        raise fail(
            f"nothing was labelled: all {summary.total} images were skipped "
            "(reasons in the table above)",
            EXIT_NOTHING_LABELLED,
        )
    return summary


def print_dataset(dataset: Any) -> None:
    """Print a review dataset's name, size, label fields and saved views."""
    fields = ", ".join(dataset.info["selfment"]["label_fields"])
    console.print(
        f"dataset [bold]{dataset.name}[/]: {len(dataset)} samples, labels in [bold]{fields}[/]"
    )
    views = ", ".join(f"'{view}'" for view in dataset.list_saved_views())
    console.print(f"saved views: {views}")
