"""Distil a run folder's masks into a head: gather cached features, train, save a checkpoint.

Training runs on the CPU from cached tokens and is deterministic given the seed; the
caller's global RNG state is left as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .. import __version__
from ..config import DEFAULT_PRECISION, TrainConfig
from ..data.images import grid_for
from ..features.backbone import Backbone
from ..features.cache import CacheSettings, FeatureCache, FeatureProgress
from ..outputs import check_output, run_input_protection
from ..runfolder.layout import FEATURES_DIR, RunFolder, read_run, union_mask
from .checkpoint import CHECKPOINT_FORMAT, HeadError, save_checkpoint
from .features import run_features
from .instance_model import Prediction
from .model import HIDDEN, PatchHead, head_losses, mask_score, patch_targets
from .rounds import RoundChange, correct_image

logger = logging.getLogger(__name__)

TrainProgress = Callable[[int, int, dict[str, float]], None]
MaskTarget = tuple[str, int, int, np.ndarray]
"""``(file name relative to the run's input folder, width, height, [height, width] mask)``."""


def run_targets(run: RunFolder) -> Iterator[MaskTarget]:
    """The union of every labelled image's masks, as the run wrote them."""
    for image, anns in run.images():
        width, height = int(image["width"]), int(image["height"])
        yield image["file_name"], width, height, union_mask(width, height, anns, image["file_name"])


@dataclass
class TrainingImage:
    """One training image: where its tokens are cached and its patch targets.

    Arguments:
      file_name: image path relative to the run's input folder.
      entry: its cache entry.
      target: ``[rows, cols]`` patch targets.
    """

    file_name: str
    entry: Path
    target: torch.Tensor


def train_head(
    images: list[TrainingImage],
    cache: FeatureCache,
    config: TrainConfig,
    progress: TrainProgress | None = None,
) -> tuple[PatchHead, dict[str, float]]:
    """Train a head on cached tokens (CPU, deterministic given ``config.seed``).

    Arguments:
      images: training images with their cache entries and targets.
      cache: the feature cache the entries belong to.
      config: training options.
      progress: called after every step with ``(step, total steps, loss terms)``.

    Returns:
      The trained head (eval mode) and the mean loss terms of the last epoch.

    Raises:
      HeadError: no image, unreadable cached features, or a non-finite loss (diverged).
    """
    if not images:
        raise HeadError("no training images")
    generator = torch.Generator().manual_seed(config.seed)
    first = _tokens(cache, images[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = PatchHead(first.shape[-1])
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(images) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    step = 0
    last_epoch: dict[str, float] = {}
    head.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(images), generator=generator).tolist()
        sums: dict[str, float] = {}
        for start in range(0, len(order), config.batch_size):
            batch = [images[i] for i in order[start : start + config.batch_size]]
            tokens, target, index = _batch_tensors(batch, cache, config.target_threshold)
            losses = head_losses(head, tokens, target, index, config, generator)
            _check_finite(losses["total"], step + 1, total_steps, config.lr)
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
            step += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            if progress:
                progress(step, total_steps, values)
        last_epoch = {k: v / steps_per_epoch for k, v in sums.items()}
    head.eval()
    return head, last_epoch


def _check_finite(loss: torch.Tensor, step: int, total_steps: int, lr: float) -> None:
    """Stop a diverged training before it writes a head of NaN weights."""
    if not torch.isfinite(loss):
        raise HeadError(
            f"the training diverged at step {step} of {total_steps} (the loss is "
            f"{loss.item()}, the learning rate {lr:g})",
            remedy="lr",
        )


def train_rounds(
    images: list[TrainingImage],
    cache: FeatureCache,
    config: TrainConfig,
    progress: TrainProgress | None = None,
) -> tuple[PatchHead, list[dict[str, Any]]]:
    """Train a head, then ``config.rounds`` self-correction rounds, each training a new head
    on the targets the last one corrected (``correct_single_targets``).

    Arguments:
      images: training images (their targets are replaced by each round's corrections).
      cache: the feature cache the entries belong to.
      config: training and round options.
      progress: called after every step of every round's training.

    Returns:
      The last head and one record per round: images, foreground patches of the targets,
      what the round changed, its thresholds, final losses and seconds.
    """
    history: list[dict[str, Any]] = []
    head: PatchHead | None = None
    for round_index in range(config.rounds + 1):
        start = time.perf_counter()
        change = RoundChange()
        if head is not None:
            change = correct_single_targets(head, images, cache, config)
            logger.info("round %d: %s", round_index, change)
        head, losses = train_head(images, cache, config, progress)
        history.append(
            {
                "round": round_index,
                "images": len(images),
                "foreground_patches": round(sum(float(i.target.sum()) for i in images), 1),
                **asdict(change),
                "keep_score": config.keep_score,
                "drop_score": config.drop_score,
                "match_iou": config.match_iou,
                "losses": losses,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    return head, history


@torch.inference_mode()
def correct_single_targets(
    head: PatchHead, images: list[TrainingImage], cache: FeatureCache, config: TrainConfig
) -> RoundChange:
    """Replace every image's target by the head's correction of it (in place).

    The instance head's rules (``rounds.correct_image``) on the one mask per image: the
    head's mask, scored as ``apply`` scores it, replaces the target when it scores at least
    ``keep_score`` and matches it (patch IoU >= ``match_iou``); a target it does not match
    with a score of at least ``drop_score`` is dropped (the image becomes a no-object
    example); a confident mask that matches no target adds its patches.

    Returns:
      The summed changes over all images.
    """
    total = RoundChange()
    for image in images:
        probability = head.foreground(_tokens(cache, image))
        prediction = Prediction(probability[None], mask_score(probability[None]))
        corrected, change = correct_image(image.target[None], prediction, config)
        image.target = corrected.amax(0) if len(corrected) else torch.zeros_like(image.target)
        total.replaced += change.replaced
        total.dropped += change.dropped
        total.added += change.added
    return total


def _tokens(cache: FeatureCache, image: TrainingImage) -> torch.Tensor:
    """``[rows, cols, D]`` cached tokens of a training image."""
    cached = cache.load(image.entry, image.file_name)
    if cached is None:
        raise HeadError(f"the cached features of {image.file_name} cannot be read")
    return cached.tokens


def _batch_tensors(
    batch: list[TrainingImage], cache: FeatureCache, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, targets, index = [], [], []
    for i, image in enumerate(batch):
        tokens_of_image = _tokens(cache, image)
        flat = tokens_of_image.reshape(-1, tokens_of_image.shape[-1])
        target = image.target.reshape(-1)
        if threshold is not None:
            target = (target > threshold).float()
        tokens.append(flat)
        targets.append(target)
        index.append(torch.full((len(flat),), i, dtype=torch.long))
    return torch.cat(tokens), torch.cat(targets), torch.cat(index)


def _check_some_mask(masks: list[MaskTarget], what: str) -> None:
    """Refuse targets without a single foreground pixel.

    A head learnt from them is background everywhere: it labels every image with no mask,
    which no user wants, so the training is refused rather than written with a warning.
    """
    if masks and not any(mask.any() for *_, mask in masks):
        raise HeadError(
            f"none of {what} ({len(masks)}) has a mask: a head learnt from them would find "
            "no object in any image; label with other options (see each image's "
            "no_mask_reason in review) or review the masks first"
        )


Named = TypeVar("Named", bound=tuple)
"""A training record whose first field is the image's file name."""


def with_features(
    records: Iterable[Named], entries: dict[str, Path]
) -> tuple[list[Named], dict[str, str]]:
    """The records whose image has cached features, and file name -> reason for the others
    (each logged).

    Arguments:
      records: training records, each starting with the image's file name.
      entries: file name -> cache entry (``run_features``).
    """
    usable, left_out = [], {}
    for record in records:
        if record[0] in entries:
            usable.append(record)
        else:
            left_out[record[0]] = "no features (the image could not be decoded)"
            logger.warning("left out %s: %s", record[0], left_out[record[0]])
    return usable, left_out


def feature_meta(settings: CacheSettings) -> dict[str, Any]:
    """What every head checkpoint records about the features it learnt from: the format,
    the tool version, the backbone's identity, the resolution and the precision."""
    return {
        "format": CHECKPOINT_FORMAT,
        "tool_version": __version__,
        "backbone": {
            "backbone": settings.backbone,
            "timm_id": settings.timm_id,
            "patch_size": settings.patch_size,
            "weights_sha256": settings.weights_sha256,
        },
        "resolution": settings.resolution,
        "feature_precision": settings.precision,
    }


def check_train_outputs(
    run_dir: str | Path, out: str | Path, cache_dir: str | Path | None = None
) -> None:
    """Refuse, before any work, a checkpoint or feature cache path ``distil`` must not write
    (``outputs.check_output``: inside the run's input folder, a run folder's own file, ...).

    Raises:
      OutputError: with the reason.
    """
    protected = run_input_protection(run_dir)
    check_output(out, "the head checkpoint", protected=protected)
    if cache_dir is not None:
        check_output(
            cache_dir, "the feature cache", folder=True, protected=protected, run_file=FEATURES_DIR
        )


@dataclass
class DistilResult:
    """What ``distil`` made.

    Arguments:
      checkpoint: the saved head.
      images: training images used.
      patches: training patches used.
      losses: mean loss terms of the last epoch.
      cache_dir: the feature cache used.
      left_out: file name -> reason for run images not used.
      rounds: one record per training round (``train_rounds``).
    """

    checkpoint: Path
    images: int
    patches: int
    losses: dict[str, float]
    cache_dir: Path
    left_out: dict[str, str] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def distil(
    run_dir: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    allow_download: bool = True,
    backbone: Backbone | None = None,
    feature_progress: FeatureProgress | None = None,
    train_progress: TrainProgress | None = None,
    targets: Iterable[MaskTarget] | None = None,
    data: dict[str, Any] | None = None,
) -> DistilResult:
    """Train a head on a run folder's masks (or on given targets) and save its checkpoint.

    By default every image of the run counts with the union of its masks (runs of other
    modes contribute their union too; images with no mask are all-background examples).

    Arguments:
      run_dir: a finished run folder (annotations.json + run.json).
      out: checkpoint file to write (atomically).
      config: training options.
      cache_dir: feature cache folder (default ``RUN_DIR/features``).
      weights: backbone weights file, when features must be computed (default: the file
        recorded in run.json, then ``$SELFMENT_WEIGHTS``, then the hub).
      device: device of the backbone, when features must be computed.
      precision: backbone precision of the features (``auto``: from the hardware).
      allow_download: whether hub downloads are allowed.
      backbone: a ready backbone (tests); must match the run's.
      feature_progress: called with ``(done, total)`` while features are gathered.
      train_progress: called with ``(step, total, losses)`` while training.
      targets: the training targets instead of the run's masks (``train --reviewed``: those
        of a reviewed dataset); images of the run's input folder at their full size.
      data: more keys for the checkpoint's ``data`` record (where the targets came from).

    Raises:
      OutputError: ``out`` or ``cache_dir`` must not or cannot be written (before any work).
      RunFolderError: the run folder cannot be read.
      HeadError: the run gave no training image, no image has a mask, or the training
        diverged (non-finite loss; nothing is written).
      HeadMismatch: the backbone does not match the run's.
      CacheError: features are neither cached nor computable.
    """
    config = config or TrainConfig()
    check_train_outputs(run_dir, out, cache_dir)
    source = read_run(run_dir)
    masks = list(run_targets(source) if targets is None else targets)
    _check_some_mask(masks, "the reviewed dataset's samples" if targets else "the run's images")
    cache, entries = run_features(
        source,
        [name for name, *_ in masks],
        cache_dir=cache_dir,
        weights=weights,
        device=device,
        precision=precision,
        allow_download=allow_download,
        backbone=backbone,
        progress=feature_progress,
        layers=config.layers,
    )
    settings = cache.settings
    usable, left_out = with_features(masks, entries)
    images = [
        TrainingImage(
            name,
            entries[name],
            patch_targets(mask, grid_for(width, height, settings.resolution, settings.patch_size)),
        )
        for name, width, height, mask in usable
    ]
    head, rounds = train_rounds(images, cache, config, train_progress)
    losses = rounds[-1]["losses"]
    feature_dim = head.embed[0].in_features
    patches = sum(image.target.numel() for image in images)
    meta = {
        **feature_meta(settings),
        "feature_dim": feature_dim,
        "layers": list(config.layers) if config.layers else None,
        "hidden": HIDDEN,
        "training": asdict(config),
        "data": {
            "run_dir": str(source.path.resolve()),
            "input_dir": str(source.input_dir),
            "run_mode": source.mode,
            "images": len(images),
            "patches": patches,
            **(data or {}),
        },
        "rounds": rounds,
        "final_losses": losses,
    }
    out = Path(out)
    save_checkpoint(out, head, meta)
    return DistilResult(out, len(images), patches, losses, cache.root, left_out, rounds)
