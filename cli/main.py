"""The ``selfment-label`` command: a thin Typer front end over the library."""

from __future__ import annotations

import typer

from selfment_label import __version__

from . import eval_cmd, review_cmd, run_cmd, train_cmd

app = typer.Typer(
    name="selfment-label",
    help="Object masks for a folder of images, with no labels and no supervised model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"selfment-label {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Self-supervised ViT features -> Normalized Cut -> IPO -> COCO masks."""


run_cmd.register(app)
eval_cmd.register(app)
train_cmd.register(app)
review_cmd.register(app)
