"""``selfment-label train`` for the instance head: progress per round and the rounds' table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from selfment_label.config import InstanceTrainConfig

from .console import console, user_errors
from .train_progress import training_bars

if TYPE_CHECKING:
    from selfment_label.review.targets import ReviewedTargets


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
    reviewed: ReviewedTargets | None = None,
) -> None:
    """Train an instance head (with its self-correction rounds) under progress bars and print
    what every round did; on a reviewed dataset's masks when ``reviewed`` is given."""
    from selfment_label.device import resolve_device
    from selfment_label.head.instance_train import distil_instances

    phases = [f"round {index}" for index in range(config.rounds + 1)]
    with user_errors(FileNotFoundError), training_bars(phases) as bars:
        result = distil_instances(
            run_dir,
            out,
            config,
            cache_dir=cache,
            weights=weights,
            device=str(resolve_device(device)),
            precision=precision,
            allow_download=not offline,
            feature_progress=bars.features,
            train_progress=bars.step,
            targets=reviewed.instances if reviewed else None,
            data={"review": reviewed.provenance()} if reviewed else None,
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
