"""``selfment-label run``: label a folder of images."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from selfment_label.config import (
    DEVICE_HELP,
    MODE_OPTIONS,
    MODES,
    PRECISION_HELP,
    PRECISION_NAMES,
    RAY_CPU_THREADS_PER_ACTOR,
    REFINE_METHODS,
    EntitiesConfig,
    InstancesConfig,
    RayConfig,
    RunConfig,
    SingleConfig,
    mode_config,
    modes_using,
)
from selfment_label.features.presets import PRESETS

from .console import (
    EXIT_NOTHING_LABELLED,
    EXIT_USAGE,
    LabelProgress,
    console,
    fail,
    invalid_options,
    make_progress,
    require_choice,
    setup_logging,
    user_errors,
)

if TYPE_CHECKING:
    from selfment_label.runfolder.pipeline import Executor, ProgressCallback, RunSummary

IMAGES_HELP = (
    "Folder of images (searched recursively), or an object storage prefix "
    "(s3://bucket/prefix; needs the ray extra)."
)
RAY_HELP = "Run on a Ray cluster with Ray Data (needs the ray extra)."
RAY_ADDRESS_HELP = (
    "With --ray: the cluster (auto, ray://host:port, host:port) \\[default: $RAY_ADDRESS, "
    "else a local Ray instance for this run]."
)
RAY_ACTORS_HELP = (
    "With --ray: model replicas \\[default: one per GPU; CPU-only: one per "
    f"{RAY_CPU_THREADS_PER_ACTOR} CPUs]."
)


def ray_executor(
    ray: bool, address: str | None, actors: int | None, verbose: bool = False
) -> Executor | None:
    """The executor ``--ray``/``--ray-address``/``--ray-actors`` ask for (None: this process).

    Ray's own log lines (start-up notices, Ray Data's execution reports) show only with
    ``verbose``. Exits with one sentence when Ray is not installed or the options do not go
    together.
    """
    if not ray:
        if address or actors:
            raise fail("--ray-address and --ray-actors apply to a Ray run: pass --ray too")
        return None
    with invalid_options():
        options = RayConfig(address=address, actors=actors)
    from selfment_label.distributed.ray_run import RayExecutor

    with user_errors():
        executor = RayExecutor(options)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    return executor


def refuse_options_of_other_modes(context: typer.Context, mode: str) -> None:
    """Exit with a usage error (2) when the command line gives an option ``mode`` does not use
    (``--max-instances`` with ``--mode single``): it would be ignored without a word."""
    for name in MODE_OPTIONS:
        source = context.get_parameter_source(name)
        given = source is not None and source.name == "COMMANDLINE"
        users = modes_using(name)
        if given and mode not in users:
            option = "--" + name.replace("_", "-")
            modes = " or ".join(f"--mode {user}" for user in users)
            raise fail(
                f"{option} is an option of {modes}, not of --mode {mode}: leave it out, or "
                "choose that mode",
                EXIT_USAGE,
            )


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


LABEL_ERRORS = (FileNotFoundError, NotADirectoryError)
"""Besides every ``SelfmentError``: a missing input folder is a sentence too."""


def refine_option() -> Any:
    """The ``--refine`` option, shared by ``run`` and ``apply``."""
    return typer.Option(
        RunConfig.refine,
        help=f"Edge refinement of the masks, guided by the image: {', '.join(REFINE_METHODS)} "
        "(guided filter; dense CRF, needs the crf extra).",
    )


def precision_option() -> Any:
    """The ``--precision`` option, shared by ``run``, ``apply``, ``train`` and ``review``."""
    return typer.Option(RunConfig.precision, help=f"{PRECISION_HELP}.")


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


def run(
    context: typer.Context,
    images: str = typer.Argument(..., help=IMAGES_HELP),
    out: Path = typer.Option(
        None, "--out", "-o", help="Run folder \\[default: ./<folder>-selfment]."
    ),
    backbone: str = typer.Option(
        RunConfig.backbone, help=f"Backbone preset: {', '.join(PRESETS)}."
    ),
    weights: Path = typer.Option(
        None,
        help="Local weights (.safetensors/.pth, timm or official layout). Env: SELFMENT_WEIGHTS.",
    ),
    resolution: int = typer.Option(
        RunConfig.resolution, help="Pixels on the long side fed to the backbone."
    ),
    tau: float = typer.Option(
        SingleConfig.tau, help="Cosine threshold of the NCut affinity graph (single, instances)."
    ),
    ipo_iters: int = typer.Option(
        SingleConfig.ipo_iters,
        help="Iterative Patch Optimization rounds, 0 disables IPO (single, instances).",
    ),
    border_prior: bool = typer.Option(
        SingleConfig.border_prior,
        help="Swap a mask for its complement when it holds a larger share of the frame's "
        "border than of the image (single; the first instance of instances).",
    ),
    device: str = typer.Option(RunConfig.device, help=f"{DEVICE_HELP}."),
    precision: str = precision_option(),
    batch_size: int = typer.Option(RunConfig.batch_size, min=1, help="Images per backbone batch."),
    workers: int = typer.Option(RunConfig.workers, min=1, help="Decoding threads."),
    save_scores: bool = typer.Option(
        RunConfig.save_scores, help="Also save soft score maps (for threshold-sweep eval)."
    ),
    max_pixels: int = typer.Option(
        RunConfig.max_pixels, help="Skip larger images (decompression bombs)."
    ),
    refine: str = refine_option(),
    offline: bool = typer.Option(False, help="Never download weights from the hub."),
    mode: str = typer.Option(
        SingleConfig.mode,
        help=f"{', '.join(MODES)}: one object, several objects, or entities + parts.",
    ),
    max_instances: int = typer.Option(
        InstancesConfig.max_instances, min=1, help="Most instances per image (instances)."
    ),
    min_area: float = typer.Option(
        InstancesConfig.min_area,
        help="Smallest instance/entity/part, fraction of the image (instances, entities).",
    ),
    merge_floor: float = typer.Option(
        EntitiesConfig.merge_floor, help="Lowest merge similarity explored (entities)."
    ),
    persistence: float = typer.Option(
        EntitiesConfig.persistence,
        help="Similarity range an entity or part must survive (entities).",
    ),
    overwrite: bool = typer.Option(False, help="Replace a run folder made with other options."),
    ray: bool = typer.Option(False, "--ray", help=RAY_HELP),
    ray_address: str = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_actors: int = typer.Option(None, "--ray-actors", help=RAY_ACTORS_HELP),
    self_train: bool = typer.Option(
        False,
        "--self-train",
        help="Single mode: label with NCut+IPO into OUT/stage1, train the head on those "
        "masks (OUT/head.pt), relabel the folder with it into OUT (about 3x the time).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details."),
) -> None:
    """Find the main object in every image and write annotations.json (COCO) + run.json."""
    setup_logging(verbose)
    require_choice(mode, MODES, "--mode")
    refuse_options_of_other_modes(context, mode)
    require_choice(precision, PRECISION_NAMES, "--precision")
    require_choice(refine, REFINE_METHODS, "--refine")
    with invalid_options():
        segment = mode_config(
            mode,
            tau=tau,
            ipo_iters=ipo_iters,
            border_prior=border_prior,
            max_instances=max_instances,
            min_area=min_area,
            merge_floor=merge_floor,
            persistence=persistence,
        )
        config = RunConfig(
            backbone=backbone,
            weights=str(weights) if weights else None,
            resolution=resolution,
            device=device,
            precision=precision,
            batch_size=batch_size,
            workers=workers,
            save_scores=save_scores,
            max_pixels=max_pixels,
            allow_download=not offline,
            refine=refine,
            segment=segment,
        )
    if self_train:
        if ray:
            raise fail("--self-train runs in this process: drop --ray")
        _self_train(images, out, config, overwrite)
        return
    executor = ray_executor(ray, ray_address, ray_actors, verbose)
    from selfment_label.runfolder.pipeline import label_folder

    label_with_progress(
        lambda progress: label_folder(
            images, out, config, overwrite=overwrite, progress=progress, executor=executor
        )
    )


def _self_train(images: str, out: Path | None, config: RunConfig, overwrite: bool) -> None:
    """``run --self-train``: the three stages under one progress bar, then where each is."""
    from selfment_label.runfolder.pipeline import default_out_dir
    from selfment_label.selftrain import self_train_folder

    out = out or default_out_dir(images)
    done = {}

    def label(progress: ProgressCallback) -> RunSummary:
        done["summary"] = self_train_folder(
            images, out, config, overwrite=overwrite, progress=progress
        )
        return done["summary"].final

    label_with_progress(label)
    summary = done["summary"]
    trained = "trained" if summary.head_trained else "kept from an earlier run"
    console.print(
        f"stage 1 (NCut+IPO): {summary.stage1.annotations} masks in {summary.stage1.out_dir}; "
        f"head {trained}: {summary.head} ({summary.train_seconds:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(run)
