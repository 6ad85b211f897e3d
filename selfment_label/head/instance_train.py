"""Train the instance head on a run folder's masks, with self-correction rounds.

Every top-level annotation of a run (an ``instances`` run's instances, an ``entities`` run's
entities; parts are not learnt) becomes one pseudo-mask on the backbone's patch grid (area
fractions, as the single head's target). The tokens come from the feature cache and are held
in memory while training. Round 0 trains on the pseudo-masks; each further round
(``selfment_label.head.rounds``) lets the previous round's model correct them and trains on,
from its weights. Deterministic given ``config.seed``; the caller's RNG state is left alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DEFAULT_PRECISION, InstanceTrainConfig
from ..data.images import grid_for
from ..device import small_kernel_threads
from ..features.backbone import Backbone
from ..features.cache import FeatureProgress
from ..runfolder.coco import RleError, decode_rle
from ..runfolder.layout import RunFolder, RunFolderError, read_run
from .checkpoint import HeadError, save_checkpoint
from .features import run_features
from .instance_model import THREADS, InstanceHead, image_losses
from .model import patch_targets
from .rounds import RoundChange, correct_targets
from .train import _check_finite, check_train_outputs, feature_meta, with_features

logger = logging.getLogger(__name__)

INSTANCE_TASK = "instances"
LevelMasks = tuple[str, int, int, list[np.ndarray], list[np.ndarray]]
"""``(file name, width, height, [height, width] object masks, part masks)`` of one image."""
RoundProgress = Callable[[int, int, int, dict[str, float]], None]
"""Called after every step with ``(round, step, steps of the round, loss terms)``."""
RoundDone = Callable[[int, InstanceHead], None]
"""Called after every round with ``(round, the head as the round left it)``."""


@dataclass
class InstanceImage:
    """One training image: its cached tokens and its current pseudo-masks.

    Arguments:
      file_name: image path relative to the run's input folder.
      tokens: ``[rows, cols, D]`` tokens (float16, as cached).
      targets: ``[K, rows, cols]`` pseudo-masks (patch area fractions; K may be 0).
      parts: ``[P, rows, cols]`` pseudo-masks of parts (an ``entities`` run's; none: no
        part is learnt from this image).
    """

    file_name: str
    tokens: torch.Tensor
    targets: torch.Tensor
    parts: torch.Tensor | None = None


def level_masks(run: RunFolder) -> Iterator[LevelMasks]:
    """``(file name, width, height, objects, parts)`` of every labelled image: its
    annotations without a ``parent_id`` (an ``instances`` run's instances, an ``entities``
    run's entities) and those with one (an ``entities`` run's parts).

    Raises:
      RunFolderError: an annotation's RLE is corrupt or not the image's size.
    """
    for image, anns in run.images():
        width, height = int(image["width"]), int(image["height"])
        objects, parts = [], []
        for ann in anns:
            try:
                mask = decode_rle(ann["segmentation"], (height, width))
            except RleError as error:
                raise RunFolderError(
                    f"annotation {ann.get('id')} of {image['file_name']}: {error}"
                ) from None
            (objects if ann.get("parent_id") is None else parts).append(mask)
        yield image["file_name"], width, height, objects, parts


def train_rounds(
    images: list[InstanceImage],
    config: InstanceTrainConfig,
    device: torch.device | str = "cpu",
    progress: RoundProgress | None = None,
    round_done: RoundDone | None = None,
) -> tuple[InstanceHead, list[dict[str, Any]]]:
    """Train the instance head, then run ``config.rounds`` self-correction rounds.

    Arguments:
      images: training images (their targets are replaced by each round's corrections;
        with ``config.token_flip`` each is learnt mirrored too).
      config: training and round options.
      device: where the head trains.
      progress: called after every step.
      round_done: called after every round (e.g. to keep each round's model).

    Returns:
      The head (eval mode, CPU) and one record per round: pseudo-masks, what the round
      changed, thresholds, final losses and seconds.
    """
    if not images:
        raise HeadError("no training images")
    if config.token_flip:
        images = images + [mirrored(image) for image in images]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        has_parts = any(image.parts is not None and len(image.parts) for image in images)
        head = InstanceHead(
            images[0].tokens.shape[-1],
            config.hidden,
            config.queries,
            config.layers,
            config.heads,
            config.part_queries if has_parts else 0,
        )
    head.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    change = RoundChange()
    for round_index in range(config.rounds + 1):
        start = time.perf_counter()
        with small_kernel_threads(torch.device(device), THREADS):
            if round_index:
                change = correct_targets(head, images, config, device)
                logger.info("round %d: %s", round_index, change)
            losses = _train_epochs(head, images, config, generator, device, round_index, progress)
        history.append(
            {
                "round": round_index,
                "images": len(images),
                "pseudo_masks": sum(len(image.targets) for image in images),
                **asdict(change),
                "keep_score": config.keep_score,
                "drop_score": config.drop_score,
                "match_iou": config.match_iou,
                "losses": losses,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        if round_done:
            round_done(round_index, head)
    return head.cpu().eval(), history


def mirrored(image: InstanceImage) -> InstanceImage:
    """``image`` mirrored on the patch grid: its tokens and masks flipped left to right (not
    the tokens of the mirror image, which a ViT computes otherwise: no backbone pass)."""
    parts = None if image.parts is None else image.parts.flip(-1)
    return InstanceImage(
        f"{image.file_name} (mirrored)", image.tokens.flip(1), image.targets.flip(-1), parts
    )


def _train_epochs(
    head: InstanceHead,
    images: list[InstanceImage],
    config: InstanceTrainConfig,
    generator: torch.Generator,
    device: torch.device | str,
    round_index: int,
    progress: RoundProgress | None,
) -> dict[str, float]:
    """``config.epochs`` passes over the images; the mean loss terms of the last one."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(images) // config.batch_size)
    total = steps_per_epoch * config.epochs
    head.train()
    step = 0
    sums: dict[str, float] = {}
    for _ in range(config.epochs):
        order = torch.randperm(len(images), generator=generator).tolist()
        sums = {}
        for first in range(0, len(order), config.batch_size):
            batch = [images[i] for i in order[first : first + config.batch_size]]
            losses = _batch_losses(head, batch, config, device)
            _check_finite(losses["total"], step + 1, total, config.lr)
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
            step += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            if progress:
                progress(round_index, step, total, values)
    head.eval()
    return {k: v / steps_per_epoch for k, v in sums.items()}


def _batch_losses(
    head: InstanceHead,
    batch: list[InstanceImage],
    config: InstanceTrainConfig,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Mean loss terms over a batch (one forward per image: images differ in grid); a head
    with part queries adds the part set's terms (matched to the image's parts) to each."""
    sums: dict[str, torch.Tensor] = {}
    split = head.object_queries
    for image in batch:
        objectness, logits = head(image.tokens.to(device).float()[None])
        terms = [
            image_losses(objectness[0, :split], logits[0, :split], image.targets.to(device), config)
        ]
        if head.part_queries is not None:
            parts = image.parts if image.parts is not None else image.targets[:0]
            terms.append(
                image_losses(objectness[0, split:], logits[0, split:], parts.to(device), config)
            )
        for term in terms:
            for key, value in term.items():
                sums[key] = sums.get(key, 0.0) + value / len(batch)
    sums["total"] = sum(sums.values())
    return sums


@dataclass
class InstanceDistilResult:
    """What ``distil_instances`` made.

    Arguments:
      checkpoint: the saved head.
      images: training images used.
      pseudo_masks: pseudo-masks of the run learnt from (round 0).
      rounds: the per-round records (see ``train_rounds``).
      cache_dir: the feature cache used.
      left_out: file name -> reason for run images not used.
    """

    checkpoint: Path
    images: int
    pseudo_masks: int
    rounds: list[dict[str, Any]]
    cache_dir: Path
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, float]:
        """Mean loss terms of the last epoch of the last round."""
        return self.rounds[-1]["losses"]


def grid_targets(masks: list[np.ndarray], grid: tuple[int, int]) -> torch.Tensor:
    """``[K, rows, cols]`` patch targets of full-size masks (K may be 0)."""
    targets = [patch_targets(mask, grid) for mask in masks]
    return torch.stack(targets) if targets else torch.zeros(0, *grid)


def _no_mask_error(images: int) -> HeadError:
    return HeadError(
        f"none of the run's {images} images has a mask: an instance head learnt "
        "from them would find no object; label with other options first"
    )


def distil_instances(
    run_dir: str | Path,
    out: str | Path,
    config: InstanceTrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    allow_download: bool = True,
    backbone: Backbone | None = None,
    feature_progress: FeatureProgress | None = None,
    train_progress: RoundProgress | None = None,
    round_done: RoundDone | None = None,
    targets: Iterable[LevelMasks] | None = None,
    data: dict[str, Any] | None = None,
) -> InstanceDistilResult:
    """Train an instance head on a run folder's top-level masks and save its checkpoint.

    Arguments:
      run_dir: a finished run folder (annotations.json + run.json), best an ``instances``
        or ``entities`` run.
      out: checkpoint file to write (atomically).
      config: training and self-correction options.
      cache_dir: feature cache folder (default ``RUN_DIR/features``).
      weights: backbone weights file, when features must be computed.
      device: device of the backbone (features) and of training.
      precision: backbone precision of the features (``auto``: from the hardware).
      allow_download: whether hub downloads are allowed.
      backbone: a ready backbone (tests); must match the run's.
      feature_progress: called with ``(done, total)`` while features are gathered.
      train_progress: called with ``(round, step, total, losses)`` while training.
      round_done: called with ``(round, head)`` after every round.
      targets: the pseudo-masks instead of the run's (``train --reviewed``: those of a
        reviewed dataset, ``ReviewedTargets.instances``); images of the run's input folder.
      data: more keys for the checkpoint's ``data`` record (where the targets came from).

    Raises:
      RunFolderError: the run folder cannot be read.
      HeadError: the run gave no training image or no mask, or the training diverged.
      HeadMismatch: the backbone does not match the run's.
      CacheError: features are neither cached nor computable.
      OutputError: ``out`` or ``cache_dir`` must not or cannot be written (before any work).
    """
    config = config or InstanceTrainConfig()
    check_train_outputs(run_dir, out, cache_dir)
    source = read_run(run_dir)
    masks = list(level_masks(source) if targets is None else targets)
    if masks and not any(objects for *_, objects, _ in masks):
        raise _no_mask_error(len(masks))  # before any feature is computed
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
    )
    settings = cache.settings
    usable, left_out = with_features(masks, entries)
    images = []
    for name, width, height, objects, parts in usable:
        cached = cache.load(entries[name], name)
        if cached is None:
            raise HeadError(f"the cached features of {name} cannot be read")
        grid = grid_for(width, height, settings.resolution, settings.patch_size)
        images.append(
            InstanceImage(
                name, cached.tokens.half(), grid_targets(objects, grid), grid_targets(parts, grid)
            )
        )
    pseudo_masks = sum(len(image.targets) for image in images)
    if images and not pseudo_masks:
        raise _no_mask_error(len(images))
    head, rounds = train_rounds(images, config, device, train_progress, round_done)
    meta = {
        **feature_meta(settings),
        "task": INSTANCE_TASK,
        "feature_dim": head.dim,
        "hidden": config.hidden,
        "model": head.config(),
        "training": asdict(config),
        "rounds": rounds,
        "data": {
            "run_dir": str(source.path.resolve()),
            "input_dir": str(source.input_dir),
            "run_mode": source.mode,
            "images": len(images),
            "pseudo_masks": pseudo_masks,
            "parts": sum(len(image.parts) for image in images),
            **(data or {}),
        },
        "final_losses": rounds[-1]["losses"],
    }
    out = Path(out)
    save_checkpoint(out, head, meta)
    return InstanceDistilResult(out, len(images), pseudo_masks, rounds, cache.root, left_out)
