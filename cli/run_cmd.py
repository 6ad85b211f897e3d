"""``selfment-label run``: label a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from selfment_label.config import (
    MODE_OPTIONS,
    MODES,
    EntitiesConfig,
    InstancesConfig,
    RunConfig,
    SingleConfig,
    mode_config,
    modes_using,
)
from selfment_label.features.presets import PRESETS

from .console import (
    EXIT_USAGE,
    console,
    fail,
    invalid_options,
    label_with_progress,
    require_choice,
    setup_logging,
)
from .options import (
    batch_size_option,
    device_option,
    images_argument,
    labelling_config,
    offline_option,
    overwrite_run_option,
    precision_option,
    ray_actors_option,
    ray_address_option,
    ray_executor,
    ray_option,
    refine_option,
    run_folder_option,
    save_scores_option,
    verbose_option,
    workers_option,
    zoom_crop_option,
    zoom_fraction,
    zoom_option,
)

if TYPE_CHECKING:
    from selfment_label.runfolder.record import ProgressCallback, RunSummary


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


def run(
    context: typer.Context,
    images: str = images_argument(),
    out: Path = run_folder_option(),
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
    device: str = device_option(),
    precision: str = precision_option(),
    batch_size: int = batch_size_option(),
    workers: int = workers_option(),
    save_scores: bool = save_scores_option(),
    max_pixels: int = typer.Option(
        RunConfig.max_pixels, help="Skip larger images (decompression bombs)."
    ),
    refine: str = refine_option(),
    offline: bool = offline_option(),
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
    zoom: bool = zoom_option("MaskCut (--mode instances only)"),
    zoom_crop: float = zoom_crop_option(),
    overwrite: bool = overwrite_run_option(),
    ray: bool = ray_option(),
    ray_address: str = ray_address_option(),
    ray_actors: int = ray_actors_option(),
    self_train: bool = typer.Option(
        False,
        "--self-train",
        help="Single mode: label with NCut+IPO into OUT/stage1, train a head on each half's "
        "masks (OUT/head.fold0.pt, head.fold1.pt), relabel each half with the other half's "
        "head into OUT (about 3x the time; 20 images at least).",
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Find the main object in every image and write annotations.json (COCO) + run.json."""
    setup_logging(verbose)
    require_choice(mode, MODES, "--mode")
    refuse_options_of_other_modes(context, mode)
    zoomed = zoom_fraction(context, zoom, zoom_crop)
    if zoomed is not None and mode != "instances":
        raise fail(
            f"--zoom merges the flat, disjoint instances of --mode instances; --mode {mode} "
            "labels the full view only",
            EXIT_USAGE,
        )
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
    config = labelling_config(
        weights=weights,
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        save_scores=save_scores,
        offline=offline,
        refine=refine,
        backbone=backbone,
        resolution=resolution,
        max_pixels=max_pixels,
        segment=segment,
        zoom=zoomed,
    )
    if self_train:
        if ray:
            raise fail("--self-train runs in this process: drop --ray")
        _self_train(images, out, config, overwrite)
        return
    executor = ray_executor(ray, ray_address, ray_actors, verbose)
    from selfment_label.runfolder.label import label_folder

    label_with_progress(
        lambda progress: label_folder(
            images, out, config, overwrite=overwrite, progress=progress, executor=executor
        )
    )


def _self_train(images: str, out: Path | None, config: RunConfig, overwrite: bool) -> None:
    """``run --self-train``: the three stages under one progress bar, then where each is."""
    from selfment_label.runfolder.label import default_out_dir
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
    heads = ", ".join(
        f"{head} ({'trained' if fresh else 'kept from an earlier run'})"
        for head, fresh in zip(summary.heads, summary.heads_trained, strict=True)
    )
    console.print(
        f"stage 1 (NCut+IPO): {summary.stage1.annotations} masks in {summary.stage1.out_dir}; "
        f"one head per half, each labelling the other half: {heads} "
        f"({summary.train_seconds:.1f} s of training)"
    )


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(run)
