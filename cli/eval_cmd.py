"""``selfment-label eval``: pseudo-label quality of a run folder against ground-truth masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from .console import console, fail, make_progress, setup_logging, user_errors
from .options import verbose_option

if TYPE_CHECKING:
    from selfment_label.evaluate import EvalReport, ImageResult

LABELS = {
    "max_f": "maxF (beta^2=0.3)",
    "mean_f": "mean F",
    "adaptive_f": "adaptive F",
    "iou": "IoU @0.5",
    "accuracy": "accuracy @0.5",
    "s_measure": "S-measure",
    "max_e": "max E-measure",
    "mean_e": "mean E-measure",
    "weighted_f": "weighted F",
    "mae": "MAE (lower is better)",
}
MAX_LISTED = 10


def metrics_table(report: EvalReport, title: str) -> Table:
    """The metrics and counts of a report as a rich table.

    Arguments:
      report: the evaluation result.
      title: the table's title.
    """
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for name, label in LABELS.items():
        table.add_row(label, f"{report.metrics[name]:.4f}")
    table.add_row("images evaluated", str(report.evaluated))
    table.add_row("GT without prediction (as empty)", str(len(report.gt_without_prediction)))
    table.add_row("predictions without GT", str(len(report.predictions_without_gt)))
    table.add_row("errors (left out)", str(len(report.errors)))
    return table


def _print_report(report: EvalReport, title: str) -> None:
    console.print(metrics_table(report, title))
    if report.errors:
        errors = Table(title="images left out")
        errors.add_column("ground truth")
        errors.add_column("reason")
        for name, reason in list(report.errors.items())[:MAX_LISTED]:
            errors.add_row(name, reason)
        if len(report.errors) > MAX_LISTED:
            errors.add_row("...", f"{len(report.errors) - MAX_LISTED} more")
        console.print(errors)
    for label, names in (
        ("GT without prediction", report.gt_without_prediction),
        ("predictions without GT", report.predictions_without_gt),
    ):
        if names:
            shown = ", ".join(names[:MAX_LISTED])
            more = f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
            console.print(f"[yellow]{label}:[/] {shown}{more}")


def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder holding annotations.json."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth mask images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    per_image: Path = typer.Option(
        None, "--per-image", help="Write per-image scores to this CSV file."
    ),
    score_maps: bool = typer.Option(
        True, help="Use the soft score maps the run saved (--no-score-maps: binary masks)."
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Score a run's masks against ground truth (maxF, IoU, S-measure, E-measure, MAE...)."""
    setup_logging(verbose)
    from selfment_label.atomic import atomic_write_text
    from selfment_label.evaluate import evaluate_run, per_image_csv
    from selfment_label.outputs import check_output, run_input_protection

    if per_image:
        with user_errors():
            check_output(per_image, "the per-image CSV", protected=run_input_protection(run_dir))
    with user_errors(), make_progress() as progress:
        task = progress.add_task("evaluating", total=None)

        def on_image(done: int, total: int, result: ImageResult) -> None:
            progress.update(task, completed=done, total=total)

        report = evaluate_run(run_dir, gt, use_score_maps=score_maps, progress=on_image)
    if per_image:
        atomic_write_text(per_image, per_image_csv(report))
    if as_json:
        summary = {"run": str(run_dir), "gt": str(gt), **report.as_dict()}
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_report(report, f"{run_dir} vs {gt}")
    if per_image:
        console.print(f"per-image scores: {per_image}")
    if report.evaluated == 0:
        raise fail("no image could be evaluated")


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("eval")(evaluate)
