"""``selfment-label review`` (FiftyOne dataset + App) and ``selfment-label export``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from selfment_label.config import (
    APP_ADDRESS,
    APP_PORT,
    DEFAULT_EXPORT_FORMAT,
    DEFAULT_EXPORT_MEDIA,
    DEVICE_HELP,
    EXPORT_FORMATS,
    EXPORT_MEDIA,
    EXPORT_SPLIT_SEED,
    EXPORT_VAL_FRACTION,
    PRECISION_HELP,
    PRECISION_NAMES,
    YOLO_MIN_PIECE_AREA,
    RunConfig,
)

from .console import (
    EXIT_USAGE,
    console,
    describe_error,
    fail,
    make_progress,
    print_dataset,
    require_choice,
    setup_logging,
    user_errors,
)
from .options import offline_option, verbose_option


def add_embeddings(
    dataset: Any,
    run_dir: Path,
    weights: Path | None,
    device: str,
    precision: str,
    allow_download: bool,
) -> None:
    """Compute the run's image embeddings into the dataset's brain runs, with progress."""
    from selfment_label.review.embeddings import compute_embeddings

    with make_progress() as progress:
        task = progress.add_task("backbone features", total=None)
        summary = compute_embeddings(
            dataset,
            run_dir,
            weights=weights,
            device=device,
            precision=precision,
            allow_download=allow_download,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(
        f"embedded {summary.samples} samples ({summary.dim} dims, features in {summary.cache}): "
        f"brain runs [bold]{summary.visualization_key}[/] (Embeddings panel) and "
        f"[bold]{summary.similarity_key}[/] (sort by similarity)"
    )


def print_status(run_dir: Path, name: str | None) -> None:
    """Print how the review of a run stands, without opening the App."""
    from selfment_label.review.status import review_status

    with user_errors():
        status = review_status(run_dir, name)
    table = Table(title=f"review of {run_dir} in dataset {status.dataset}", show_header=False)
    rows = [
        ("samples", status.samples),
        ("tagged approved", status.approved),
        ("tagged rejected", status.rejected),
        ("untouched (neither tag)", status.untouched),
        ("masks the run wrote", status.run_masks),
        ("masks deleted since the run", status.deleted),
        ("masks edited since the run", status.edited),
        ("masks added by the reviewer", status.added),
        ("images no longer in the dataset", status.samples_gone),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    console.print(table)
    views = ", ".join(f"'{view}'" for view in status.saved_views) or "none"
    console.print(f"saved views: {views}")


def review(
    run_dir: Path = typer.Argument(..., help="Run folder (annotations.json and run.json)."),
    name: str = typer.Option(
        None,
        "--name",
        help="Dataset name (default: the one recorded in RUN_DIR/review.json, else derived "
        "from the run folder).",
    ),
    gt: Path = typer.Option(None, "--gt", help="Folder of ground-truth masks to compare with."),
    port: int = typer.Option(APP_PORT, "--port", help="Port of the FiftyOne App."),
    address: str = typer.Option(
        APP_ADDRESS, "--address", help="Address the App listens on (0.0.0.0: all interfaces)."
    ),
    no_launch: bool = typer.Option(False, "--no-launch", help="Only build the dataset."),
    embeddings: bool = typer.Option(
        False,
        "--embeddings",
        help="Embed the images with the run's backbone features (RUN_DIR/features, computed "
        "there when missing) for the App's Embeddings panel and sort by similarity.",
    ),
    weights: Path = typer.Option(
        None,
        "--weights",
        help="With --embeddings: backbone weights, if features must be computed \\[default: "
        "the run's file, then SELFMENT_WEIGHTS].",
    ),
    device: str = typer.Option(
        RunConfig.device, help=f"With --embeddings: backbone device: {DEVICE_HELP}."
    ),
    precision: str = typer.Option(
        RunConfig.precision, help=f"With --embeddings: {PRECISION_HELP.lower()}."
    ),
    offline: bool = offline_option(),
    status: bool = typer.Option(
        False,
        "--status",
        help="Only print how the review stands (tags, masks deleted or edited, saved views); "
        "the App is not opened.",
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Build (or update) the run's FiftyOne dataset and open it in the FiftyOne App."""
    setup_logging(verbose)
    from selfment_label.device import resolve_device
    from selfment_label.review.app import app_url, launch_app
    from selfment_label.review.dataset import GT_FIELD, build_dataset
    from selfment_label.review.embeddings import embeddings_space

    if status:
        print_status(run_dir, name)
        return
    require_choice(precision, PRECISION_NAMES, "--precision")
    if gt is not None and not gt.is_dir():
        raise fail(f"--gt {gt} is not a folder")
    with user_errors(), console.status("building the FiftyOne dataset"):
        dataset = build_dataset(run_dir, name, gt)
    if embeddings:
        with user_errors():
            add_embeddings(
                dataset, run_dir, weights, str(resolve_device(device)), precision, not offline
            )
    print_dataset(dataset)
    if gt is not None:
        with_gt = len(dataset.exists(GT_FIELD)) if dataset.has_sample_field(GT_FIELD) else 0
        console.print(
            f"ground truth from {gt} added as field [bold]{GT_FIELD}[/] "
            f"({with_gt} of {len(dataset)} samples have it)"
        )
    if no_launch:
        return
    spaces = embeddings_space() if embeddings else None
    with console.status("starting the FiftyOne App"):
        session = launch_app(dataset, port=port, address=address, spaces=spaces)
    try:
        typer.echo(app_url(session, dataset))
        console.print("Tag samples (e.g. approved / rejected) in the App; Ctrl-C to stop.")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("closing the App")
    finally:
        session.close()


def export(
    run_dir: Path = typer.Argument(..., help="Run folder whose dataset was reviewed."),
    target: Path = typer.Argument(..., help="Folder to write the dataset into."),
    fmt: str = typer.Option(
        DEFAULT_EXPORT_FORMAT, "--format", "-f", help=f"Output format: {', '.join(EXPORT_FORMATS)}."
    ),
    tags: list[str] = typer.Option(
        None, "--tags", help="Keep only samples with any of these tags (repeatable)."
    ),
    exclude_tags: list[str] = typer.Option(
        None, "--exclude-tags", help="Drop samples with any of these tags (repeatable)."
    ),
    polygons: bool = typer.Option(
        False, "--polygons", help="COCO polygons instead of exact compressed RLE."
    ),
    media: str = typer.Option(
        DEFAULT_EXPORT_MEDIA,
        "--media",
        help=f"How images go with the labels: {', '.join(EXPORT_MEDIA)}.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous export in TARGET (nothing else)."
    ),
    val_fraction: float = typer.Option(
        EXPORT_VAL_FRACTION,
        "--val-fraction",
        help="Share of images in the val split, by a hash of the file name (0: no val split).",
    ),
    split_seed: int = typer.Option(
        EXPORT_SPLIT_SEED, "--split-seed", help="Seed of the file-name hash split."
    ),
    split_by_tag: bool = typer.Option(
        False,
        "--split-by-tag",
        help="Split by the samples' train/val tags instead (untagged samples: train).",
    ),
    min_piece_area: int = typer.Option(
        YOLO_MIN_PIECE_AREA,
        "--min-piece-area",
        help="YOLO: drop mask pieces smaller than this many pixels (the largest is kept).",
    ),
    name: str = typer.Option(
        None, "--name", help="Dataset name (default: the one recorded by `review` for RUN_DIR)."
    ),
    unreviewed: bool = typer.Option(
        False,
        "--unreviewed",
        help="When no dataset reviews the run, build one from the run and export its labels "
        "as they are.",
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Export the reviewed labels (tags, deletions and edits honoured) as a training set."""
    setup_logging(verbose)
    from selfment_label.review.dataset import NotReviewed, load_run_dataset
    from selfment_label.review.export import (
        ExportError,
        check_options,
        check_target,
        export_dataset,
    )

    try:
        check_options(fmt, media, val_fraction, min_piece_area)
    except ExportError as error:
        raise fail(f"invalid option: {error}", EXIT_USAGE) from None
    with user_errors():
        check_target(target, overwrite, {})  # the run's folders are checked with the dataset
    with user_errors(), console.status("exporting"):
        try:
            dataset = load_run_dataset(run_dir, name, unreviewed=unreviewed)
        except NotReviewed as error:
            hint = "or pass --unreviewed to export the run's labels as they are"
            raise fail(f"{describe_error(error)}, {hint}") from None
        summary = export_dataset(
            dataset,
            target,
            fmt,
            tags=tags,
            exclude_tags=exclude_tags,
            polygons=polygons,
            media=media,
            overwrite=overwrite,
            val_fraction=val_fraction,
            split_seed=split_seed,
            split_by_tag=split_by_tag,
            min_piece_area=min_piece_area,
        )
    what = "mask PNGs" if summary.format == "masks" else "masks"
    splits = ", ".join(f"{n} {split}" for split, n in summary.splits.items())
    console.print(
        f"exported {summary.images} images ({splits}) and {summary.annotations} {what} "
        f"({summary.format}) to [bold]{summary.target}[/]"
    )
    if summary.skipped:
        console.print(f"[yellow]{len(summary.skipped)} image(s) left out:[/]")
        for reason in summary.skipped[:10]:
            console.print(f"  {reason}", markup=False, highlight=False)
        if len(summary.skipped) > 10:
            console.print(f"  ... and {len(summary.skipped) - 10} more")


def register(app: typer.Typer) -> None:
    """Add the commands to the app."""
    app.command("review")(review)
    app.command("export")(export)
