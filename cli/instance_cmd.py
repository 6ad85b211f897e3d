"""``selfment-label train`` for the instance head: progress per round and the rounds' table."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from selfment_label.config import InstanceTrainConfig

from .console import console, make_progress, user_errors

LOSS_TERMS = ("bce", "dice", "objectness", "total")


def _loss_text(losses: dict[str, float]) -> str:
    return "  ".join(f"{k} {losses[k]:.4f}" for k in LOSS_TERMS if k in losses)


def train_instances(
    run_dir: Path,
    out: Path,
    config: InstanceTrainConfig,
    *,
    cache: Path | None,
    weights: Path | None,
    device: str,
    precision: str,
    offline: bool,
) -> None:
    """Train an instance head (with its self-correction rounds) under progress bars and print
    what every round did."""
    from selfment_label.device import resolve_device
    from selfment_label.head.instance_train import distil_instances

    with user_errors(FileNotFoundError), make_progress() as progress:
        features = progress.add_task("features", total=None)
        rounds = [
            progress.add_task(f"round {index}", total=None, start=False)
            for index in range(config.rounds + 1)
        ]

        def on_feature(done: int, total: int) -> None:
            progress.update(features, completed=done, total=total)

        def on_step(round_index: int, step: int, total: int, losses: dict[str, float]) -> None:
            task = rounds[round_index]
            progress.start_task(task)
            progress.update(
                task,
                completed=step,
                total=total,
                description=f"round {round_index} {_loss_text(losses)}",
            )

        result = distil_instances(
            run_dir,
            out,
            config,
            cache_dir=cache,
            weights=weights,
            device=str(resolve_device(device)),
            precision=precision,
            allow_download=not offline,
            feature_progress=on_feature,
            train_progress=on_step,
        )
    table = Table(
        title=f"instance head -> {result.checkpoint} ({result.images} images, "
        f"{result.pseudo_masks} pseudo-masks, {len(result.left_out)} left out)"
    )
    for column in ("round", "pseudo-masks", "replaced", "dropped", "added", "loss", "seconds"):
        table.add_column(column, justify="right")
    for record in result.rounds:
        table.add_row(
            str(record["round"]),
            str(record["pseudo_masks"]),
            str(record["replaced"]),
            str(record["dropped"]),
            str(record["added"]),
            f"{record['losses']['total']:.4f}",
            f"{record['seconds']:.1f}",
        )
    console.print(table)
    console.print(f"feature cache: {result.cache_dir}")
