"""``selfment-label train`` and ``selfment-label apply``: distil a run into a head, then use it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from selfment_label.config import (
    DEVICE_HELP,
    HEAD_FLIP,
    HEAD_TASKS,
    PRECISION_NAMES,
    REVIEW_EXCLUDE_TAGS,
    InstanceApplyConfig,
    InstanceTrainConfig,
    TrainConfig,
    default_task,
)

from .console import (
    console,
    fail,
    invalid_options,
    label_with_progress,
    print_dataset,
    require_choice,
    setup_logging,
    user_errors,
)
from .instance_cmd import train_instances
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
from .train_progress import training_bars

if TYPE_CHECKING:
    from selfment_label.review.targets import ReviewedTargets

LOSS_TERMS = ("bce", "dice", "contrastive", "total")


def _reviewed(
    run_dir: Path, name: str | None, tags: list[str] | None, exclude_tags: list[str]
) -> ReviewedTargets:
    """The reviewed dataset's masks to learn from, announced."""
    from selfment_label.review.targets import reviewed_targets

    with user_errors(), console.status("reading the review"):
        source = reviewed_targets(run_dir, name, tags, exclude_tags)
    console.print(
        f"dataset [bold]{source.dataset}[/]: {len(source.instances)} samples to learn from"
    )
    return source


def _layers(text: str | None) -> tuple[int, ...] | None:
    """``--layers 8,11`` as block indices."""
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise fail(
            f"--layers takes block numbers separated by commas (e.g. 8,11), not {text!r}"
        ) from None


def _run_task(run_dir: Path) -> str:
    """The head a run trains by default (``default_task`` of its mode)."""
    from selfment_label.runfolder.layout import read_run

    with user_errors():
        return default_task(read_run(run_dir).mode)


def train(
    run_dir: Path = typer.Argument(..., help="A run folder made by `selfment-label run`."),
    out: Path = typer.Option(Path("head.pt"), "--out", "-o", help="Checkpoint file to write."),
    epochs: int = typer.Option(
        None,
        min=1,
        help=f"Passes over the run's images (per round) \\[default: {TrainConfig.epochs}, "
        f"instance head {InstanceTrainConfig.epochs}].",
    ),
    lr: float = typer.Option(
        None,
        help=f"Learning rate \\[default: {TrainConfig.lr}, instance head "
        f"{InstanceTrainConfig.lr}].",
    ),
    weight_decay: float = typer.Option(TrainConfig.weight_decay, help="Adam weight decay."),
    batch_size: int = typer.Option(
        TrainConfig.batch_size, min=1, help="Images per optimisation step."
    ),
    seed: int = typer.Option(
        TrainConfig.seed, help="Seed of initialisation, shuffling and subsampling."
    ),
    cache: Path = typer.Option(None, help="Feature cache folder \\[default: RUN_DIR/features]."),
    weights: Path = typer.Option(
        None,
        help="Backbone weights, if features must be computed \\[default: the run's file, "
        "then SELFMENT_WEIGHTS].",
    ),
    device: str = device_option(f"Backbone device for feature extraction: {DEVICE_HELP}."),
    precision: str = precision_option(),
    offline: bool = offline_option(),
    overwrite: bool = typer.Option(False, help="Replace an existing checkpoint file."),
    reviewed: bool = typer.Option(
        False,
        "--reviewed",
        help="Learn from the run's reviewed FiftyOne dataset (tags, deletions and edits "
        "honoured) instead of its annotations.json.",
    ),
    name: str = typer.Option(
        None,
        "--name",
        help="With --reviewed: the dataset \\[default: the one recorded by `review`].",
    ),
    tags: list[str] = typer.Option(
        None, "--tags", help="With --reviewed: keep only samples with any of these tags."
    ),
    exclude_tags: list[str] = typer.Option(
        list(REVIEW_EXCLUDE_TAGS),
        "--exclude-tags",
        help="With --reviewed: leave out samples with any of these tags.",
    ),
    task: str = typer.Option(
        None,
        "--task",
        help="single (one mask per image: the union of the run's masks) or instances (a "
        "scored set of masks per image) \\[default: instances for instances and entities "
        "runs, else single].",
    ),
    rounds: int = typer.Option(
        None,
        min=0,
        help="Self-correction rounds (the last model's confident masks replace, add to and "
        f"drop pseudo-masks, then training goes on) \\[default: {TrainConfig.rounds}, "
        f"instance head {InstanceTrainConfig.rounds}; 0 with --reviewed: a reviewer's masks "
        "are not corrected].",
    ),
    layers: str = typer.Option(
        None,
        "--layers",
        help="Single head: backbone blocks (from 0, comma-separated, e.g. 8,11) whose "
        "tokens it reads side by side \\[default: the last block only].",
    ),
    token_flip: bool = typer.Option(
        None,
        "--token-flip/--no-token-flip",
        help="Instance head: also learn every image mirrored on the patch grid (tokens and "
        "masks flipped; no backbone pass) \\[default: "
        f"{'on' if InstanceTrainConfig.token_flip else 'off'}].",
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Train a head on a run's masks (features are cached, training is on the CPU): the
    single-object patch head, or the instance head on instances and entities runs."""
    setup_logging(verbose)
    from selfment_label.device import resolve_device
    from selfment_label.head.train import check_train_outputs, distil

    require_choice(precision, PRECISION_NAMES, "--precision")
    if not reviewed and (name or tags):
        raise fail("--name and --tags choose a reviewed dataset: pass --reviewed too")
    with user_errors():
        check_train_outputs(run_dir, out, cache)
    if out.exists() and not overwrite:
        raise fail(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if reviewed and rounds is None:
        rounds = 0  # a reviewer's verdicts and edits are the truth, not pseudo-masks to correct
    chosen = {"epochs": epochs, "lr": lr, "rounds": rounds}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    task = task or _run_task(run_dir)
    require_choice(task, HEAD_TASKS, "--task")
    if task == "instances" and layers:
        raise fail("--layers is an option of the single head (--task single)")
    if token_flip is not None:
        if task != "instances":
            raise fail("--token-flip is an option of the instance head (--task instances)")
        chosen["token_flip"] = token_flip
    with invalid_options():
        options = {**chosen, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed}
        config = (
            InstanceTrainConfig(**options)
            if task == "instances"
            else TrainConfig(**options, layers=_layers(layers))
        )
    source = _reviewed(run_dir, name, tags, exclude_tags) if reviewed else None
    if isinstance(config, InstanceTrainConfig):
        train_instances(
            run_dir,
            out,
            config,
            cache=cache,
            weights=weights,
            device=device,
            precision=precision,
            offline=offline,
            reviewed=source,
        )
        return
    with user_errors(FileNotFoundError), training_bars(["training"]) as bars:
        result = distil(
            run_dir,
            out,
            config,
            cache_dir=cache,
            weights=weights,
            device=str(resolve_device(device)),
            precision=precision,
            allow_download=not offline,
            feature_progress=bars.features,
            train_progress=lambda step, total, losses: bars.step(0, step, total, losses),
            targets=source.targets if source else None,
            data={"review": source.provenance()} if source else None,
        )
    table = Table(title=f"head -> {result.checkpoint}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("training images", str(result.images))
    table.add_row("training patches", str(result.patches))
    table.add_row("left out", str(len(result.left_out)))
    table.add_row("feature cache", str(result.cache_dir))
    for record in result.rounds[1:]:
        table.add_row(
            f"round {record['round']}",
            f"{record['replaced']} replaced, {record['dropped']} dropped, {record['added']} added",
        )
    for term in LOSS_TERMS:
        table.add_row(f"final {term} loss", f"{result.losses[term]:.4f}")
    console.print(table)


def apply(
    context: typer.Context,
    head: Path = typer.Argument(..., help="A head checkpoint made by `selfment-label train`."),
    images: str = images_argument(),
    out: Path = run_folder_option(),
    weights: Path = typer.Option(
        None,
        help="Backbone weights (must be the head's) \\[default: the file the head was "
        "trained with, if unchanged; then SELFMENT_WEIGHTS].",
    ),
    device: str = device_option(),
    precision: str = precision_option(),
    batch_size: int = batch_size_option(),
    workers: int = workers_option(),
    save_scores: bool = save_scores_option(),
    refine: str = refine_option(),
    offline: bool = offline_option(),
    overwrite: bool = overwrite_run_option(),
    review: bool = typer.Option(
        False,
        "--review",
        help="Then add the new labels to a FiftyOne dataset for review (see --name).",
    ),
    name: str = typer.Option(
        None,
        "--name",
        help="With --review: an existing dataset to add to (e.g. the one the head learnt "
        "from) \\[default: the run folder's own dataset].",
    ),
    ray: bool = ray_option(),
    ray_address: str = ray_address_option(),
    ray_actors: int = ray_actors_option(),
    max_instances: int = typer.Option(
        InstanceApplyConfig.max_instances, min=1, help="Instance head: most masks per image."
    ),
    min_score: float = typer.Option(
        InstanceApplyConfig.min_score, help="Instance head: masks scored below are not written."
    ),
    nms_iou: float = typer.Option(
        InstanceApplyConfig.nms_iou,
        help="Instance head: a mask overlapping a better one by more than this IoU is dropped.",
    ),
    flip: bool = typer.Option(
        HEAD_FLIP,
        "--flip/--no-flip",
        help="Single head: test-time flip (the mirror image too, logits averaged; about "
        "twice the backbone's time).",
    ),
    zoom: bool = zoom_option("the instance head (one without parts)"),
    zoom_crop: float = zoom_crop_option(),
    verbose: bool = verbose_option(),
) -> None:
    """Label a folder with a trained head: same run folder as `run`, one forward pass."""
    setup_logging(verbose)
    from selfment_label.head.apply import apply_head

    config = labelling_config(
        weights=weights,
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        save_scores=save_scores,
        offline=offline,
        refine=refine,
        zoom=zoom_fraction(context, zoom, zoom_crop),
    )
    with invalid_options():
        instances = InstanceApplyConfig(
            max_instances=max_instances, min_score=min_score, nms_iou=nms_iou
        )
    if name and not review:
        raise fail("--name names the dataset to review in: pass --review too")
    executor = ray_executor(ray, ray_address, ray_actors, verbose)
    summary = label_with_progress(
        lambda progress: apply_head(
            head,
            images,
            out,
            config,
            overwrite=overwrite,
            progress=progress,
            executor=executor,
            instances=instances,
            flip=flip,
        ),
    )
    if review:
        from selfment_label.review.dataset import build_dataset

        with user_errors(), console.status("adding to FiftyOne"):
            dataset = build_dataset(summary.out_dir, name, add=name is not None)
        print_dataset(dataset)
        console.print(f"review it with `selfment-label review {summary.out_dir}`")


def register(app: typer.Typer) -> None:
    """Add the commands to the app."""
    app.command()(train)
    app.command()(apply)
