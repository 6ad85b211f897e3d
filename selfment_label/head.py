"""The distilled patch head: learn a run's masks on frozen backbone tokens, then label fast.

The head is Linear(D,128)-ReLU-Linear(128,128) (a patch embedding) then Linear(128,2). It is
trained on a run folder's masks: each image's union of masks gives, per patch of the
backbone's grid, the fraction of the patch's area inside the mask. The loss is BCE on
logit 1 + Dice on softmax[:,1] + 0.1 x a supervised contrastive loss over (a subsample of)
the patch embeddings, temperature 0.05; Adam, lr 1e-3, weight decay 1e-5. Training runs on
the CPU from cached tokens and is deterministic given the seed.

A checkpoint records the head and everything needed to use it safely (backbone preset, timm
id, weights sha256, resolution, feature dimension, tool version, training options, data
size). ``HeadSegmenter`` plugs the head into the labelling pipeline, so ``apply_head``
writes the same run folder as ``run``; it refuses a backbone other than the one the head
was trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import __version__
from .atomic import atomic_path
from .backbone import Backbone, build_backbone, file_sha256, get_preset
from .coco import decode_rle, load_coco, masks_by_image
from .features_cache import CacheSettings, FeatureCache, FeatureProgress, ensure_features
from .images import grid_for
from .masks import THRESHOLD
from .run import (
    ANNOTATIONS_NAME,
    RUN_NAME,
    ProgressCallback,
    RunConfig,
    RunSummary,
    backbone_for,
    label_folder,
)
from .segment import PatchMask
from .timing import StageTimer

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "selfment-label-head/1"
HIDDEN = 128
CACHE_DIR_NAME = "features"

TrainProgress = Callable[[int, int, dict[str, float]], None]


class HeadError(RuntimeError):
    """A run folder or checkpoint cannot be used to train or apply a head."""


class HeadMismatch(HeadError):
    """The head was trained on another backbone's features than the one it would run on."""


class PatchHead(nn.Module):
    """Per-patch foreground classifier with an embedding for the contrastive loss.

    Arguments:
      dim: backbone token dimension.
      hidden: embedding width.
    """

    def __init__(self, dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.classify = nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [..., 2], embeddings [..., hidden])`` of ``[..., D]`` tokens."""
        embeddings = self.embed(tokens)
        return self.classify(embeddings), embeddings

    def foreground(self, tokens: torch.Tensor) -> torch.Tensor:
        """Foreground probability softmax[..., 1] of ``[..., D]`` tokens."""
        logits, _ = self(tokens)
        return logits.softmax(-1)[..., 1]


@dataclass
class TrainConfig:
    """Options of head training.

    Arguments:
      epochs: passes over the training images.
      lr: Adam learning rate.
      weight_decay: Adam weight decay.
      batch_size: images per optimisation step.
      seed: seeds initialisation, shuffling and the contrastive subsample.
      contrastive_weight: weight of the supervised contrastive term.
      temperature: temperature of the supervised contrastive term.
      contrastive_patches: patches subsampled per step for the contrastive term.
      target_threshold: binarise the patch targets at this area fraction (None keeps the
        soft area fractions).
    """

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 8
    seed: int = 0
    contrastive_weight: float = 0.1
    temperature: float = 0.05
    contrastive_patches: int = 256
    target_threshold: float | None = None


def patch_targets(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch's area that lies inside a full-size mask.

    Arguments:
      mask: ``[H, W]`` boolean mask at the image's displayed size.
      grid: ``(rows, cols)`` patch grid of the image.

    Returns:
      ``[rows, cols]`` float32 fractions in [0, 1].
    """
    full = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(full, grid)[0, 0]


def dice_loss(probability: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per image, averaged over images.

    Arguments:
      probability: ``[N]`` foreground probabilities of all patches of a batch.
      target: ``[N]`` targets in [0, 1].
      index: ``[N]`` image index of each patch (0..B-1).
    """
    n_images = int(index.max()) + 1
    inter = torch.zeros(n_images).index_add(0, index, probability * target)
    total = torch.zeros(n_images).index_add(0, index, probability + target)
    return (1.0 - (2.0 * inter + 1.0) / (total + 1.0)).mean()


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over patch embeddings.

    Arguments:
      embeddings: ``[N, E]`` embeddings (normalised here).
      labels: ``[N]`` boolean foreground labels; same label = positive pair.
      temperature: softmax temperature.

    Returns:
      The mean over anchors that have at least one positive (0 when none has).
    """
    unit = F.normalize(embeddings, dim=-1)
    logits = unit @ unit.T / temperature
    self_mask = torch.eye(len(unit), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    anchors = counts > 0
    if not anchors.any():
        return embeddings.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[anchors] / counts[anchors]
    return -mean_log_prob.mean()


def head_losses(
    head: PatchHead,
    tokens: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch.

    Arguments:
      head: the head being trained.
      tokens: ``[N, D]`` tokens of all patches of the batch's images.
      target: ``[N]`` patch targets in [0, 1].
      index: ``[N]`` image index of each patch.
      config: training options (loss weights, temperature, subsample size).
      generator: draws the contrastive subsample.

    Returns:
      ``bce``, ``dice``, ``contrastive`` and their weighted sum ``total``.
    """
    logits, embeddings = head(tokens)
    bce = F.binary_cross_entropy_with_logits(logits[:, 1], target)
    dice = dice_loss(logits.softmax(-1)[:, 1], target, index)
    take = torch.randperm(len(tokens), generator=generator)[: config.contrastive_patches]
    contrastive = supervised_contrastive_loss(
        embeddings[take], target[take] > THRESHOLD, config.temperature
    )
    total = bce + dice + config.contrastive_weight * contrastive
    return {"bce": bce, "dice": dice, "contrastive": contrastive, "total": total}


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
    """
    if not images:
        raise HeadError("no training images")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    first = cache.load(images[0].entry, images[0].file_name)
    if first is None:
        raise HeadError(f"the cached features of {images[0].file_name} cannot be read")
    head = PatchHead(first.tokens.shape[-1])
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


def _batch_tensors(
    batch: list[TrainingImage], cache: FeatureCache, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, targets, index = [], [], []
    for i, image in enumerate(batch):
        cached = cache.load(image.entry, image.file_name)
        if cached is None:
            raise HeadError(f"the cached features of {image.file_name} cannot be read")
        flat = cached.tokens.reshape(-1, cached.tokens.shape[-1])
        target = image.target.reshape(-1)
        if threshold is not None:
            target = (target > threshold).float()
        tokens.append(flat)
        targets.append(target)
        index.append(torch.full((len(flat),), i, dtype=torch.long))
    return torch.cat(tokens), torch.cat(targets), torch.cat(index)


@dataclass
class RunSource:
    """What a run folder offers for training.

    Arguments:
      run_dir: the run folder.
      input_dir: the folder its images came from.
      backbone: the backbone identity recorded in run.json.
      resolution: the run's resolution.
      options: the run's options.
      coco: the run's annotations.json.
    """

    run_dir: Path
    input_dir: Path
    backbone: dict[str, Any]
    resolution: int
    options: dict[str, Any]
    coco: dict[str, Any]


def load_run(run_dir: str | Path) -> RunSource:
    """Read a run folder's run.json and annotations.json.

    Raises:
      HeadError: the folder is not a finished run.
    """
    run_dir = Path(run_dir)
    for name in (RUN_NAME, ANNOTATIONS_NAME):
        if not (run_dir / name).is_file():
            raise HeadError(
                f"{run_dir} is not a finished run folder: {name} is missing "
                "(make one with `selfment-label run IMAGES --out RUN_DIR`)"
            )
    try:
        provenance = json.loads((run_dir / RUN_NAME).read_text(encoding="utf-8"))
        coco = load_coco(run_dir / ANNOTATIONS_NAME)
        return RunSource(
            run_dir=run_dir,
            input_dir=Path(provenance["input_dir"]),
            backbone=provenance["backbone"],
            resolution=int(provenance["options"]["resolution"]),
            options=provenance["options"],
            coco=coco,
        )
    except (ValueError, KeyError, TypeError) as error:
        raise HeadError(f"cannot read the run in {run_dir}: {error}") from error


def union_masks(image: dict[str, Any], annotations: list[dict[str, Any]]) -> np.ndarray:
    """The union of an image's annotation masks (all levels), ``[height, width]`` boolean."""
    union = np.zeros((image["height"], image["width"]), dtype=bool)
    for ann in annotations:
        mask = decode_rle(ann["segmentation"])
        if mask.shape != union.shape:
            raise HeadError(
                f"annotation {ann.get('id')} of {image['file_name']} is {mask.shape[1]}x"
                f"{mask.shape[0]} but the image is {image['width']}x{image['height']}"
            )
        union |= mask
    return union


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
    """

    checkpoint: Path
    images: int
    patches: int
    losses: dict[str, float]
    cache_dir: Path
    left_out: dict[str, str] = field(default_factory=dict)


def distil(
    run_dir: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
    allow_download: bool = True,
    backbone: Backbone | None = None,
    feature_progress: FeatureProgress | None = None,
    train_progress: TrainProgress | None = None,
) -> DistilResult:
    """Train a head on a run folder's masks and save its checkpoint.

    Every image of the run counts with the union of its masks (runs of other modes
    contribute their union too; images with no mask are all-background examples).

    Arguments:
      run_dir: a finished run folder (annotations.json + run.json).
      out: checkpoint file to write (atomically).
      config: training options.
      cache_dir: feature cache folder (default ``RUN_DIR/features``).
      weights: backbone weights file, when features must be computed (default: the file
        recorded in run.json, then ``$SELFMENT_WEIGHTS``, then the hub).
      device: device of the backbone, when features must be computed.
      allow_download: whether hub downloads are allowed.
      backbone: a ready backbone (tests); must match the run's.
      feature_progress: called with ``(done, total)`` while features are gathered.
      train_progress: called with ``(step, total, losses)`` while training.

    Raises:
      HeadError: the run folder cannot be used.
      HeadMismatch: the backbone does not match the run's.
      CacheError: features are neither cached nor computable.
    """
    config = config or TrainConfig()
    source = load_run(run_dir)
    identity = source.backbone
    preset = get_preset(identity["backbone"])
    if preset.timm_id != identity.get("timm_id"):
        raise HeadMismatch(
            f"the run used {identity.get('timm_id')} but preset {preset.name} is now "
            f"{preset.timm_id}"
        )

    recorded = identity.get("weights_file")
    if weights is None and recorded and Path(recorded).is_file():
        weights = recorded

    def make_backbone() -> Backbone:
        built = backbone or build_backbone(
            preset.name, weights, device, allow_download=allow_download
        )
        _check_identity(identity, built, "the run's masks were made with")
        return built

    settings = CacheSettings(
        backbone=preset.name,
        timm_id=preset.timm_id,
        weights_sha256=identity.get("weights_sha256"),
        resolution=source.resolution,
        patch_size=preset.patch_size,
    )
    cache_root = Path(cache_dir) if cache_dir else source.run_dir / CACHE_DIR_NAME
    cache = FeatureCache(cache_root, settings)
    pairs = list(masks_by_image(source.coco))
    entries = ensure_features(
        cache,
        source.input_dir,
        [image["file_name"] for image, _ in pairs],
        make_backbone,
        progress=feature_progress,
    )
    images, left_out = [], {}
    for image, anns in pairs:
        name = image["file_name"]
        if name not in entries:
            left_out[name] = "no features (the image could not be decoded)"
            continue
        grid = grid_for(image["width"], image["height"], settings.resolution, settings.patch_size)
        target = patch_targets(union_masks(image, anns), grid)
        images.append(TrainingImage(name, entries[name], target))
    for name, reason in left_out.items():
        logger.warning("left out %s: %s", name, reason)
    head, losses = train_head(images, cache, config, train_progress)
    feature_dim = head.embed[0].in_features
    patches = sum(image.target.numel() for image in images)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "tool_version": __version__,
        "backbone": {
            "backbone": preset.name,
            "timm_id": preset.timm_id,
            "patch_size": preset.patch_size,
            "weights_sha256": settings.weights_sha256,
        },
        "resolution": settings.resolution,
        "feature_dim": feature_dim,
        "hidden": HIDDEN,
        "training": asdict(config),
        "data": {
            "run_dir": str(source.run_dir.resolve()),
            "input_dir": str(source.input_dir),
            "run_mode": source.options.get("mode", "single"),
            "images": len(images),
            "patches": patches,
        },
        "final_losses": losses,
    }
    out = Path(out)
    save_checkpoint(out, head, meta)
    return DistilResult(out, len(images), patches, losses, cache_root, left_out)


def _check_identity(expected: dict[str, Any], backbone: Backbone, what: str) -> None:
    """Raise ``HeadMismatch`` unless ``backbone`` is the one ``expected`` describes."""
    actual = backbone.identity()
    problems = [
        f"{key} {expected.get(key)!r} vs {actual.get(key)!r}"
        for key in ("backbone", "timm_id", "weights_sha256")
        if expected.get(key) != actual.get(key)
    ]
    if problems:
        raise HeadMismatch(
            f"{what} another backbone than the one loaded ({'; '.join(problems)}). "
            "Pass --weights with the weights file it was made with."
        )


def save_checkpoint(path: Path, head: PatchHead, meta: dict[str, Any]) -> None:
    """Write the head's weights and metadata atomically."""
    with atomic_path(path) as tmp:
        torch.save({"meta": meta, "state_dict": head.state_dict()}, tmp)


@dataclass
class HeadCheckpoint:
    """A loaded head and its metadata.

    Arguments:
      head: the head (eval mode, CPU).
      meta: what ``distil`` recorded (backbone, resolution, feature_dim, training, data).
      sha256: sha256 of the checkpoint file.
    """

    head: PatchHead
    meta: dict[str, Any]
    sha256: str

    def check_backbone(self, backbone: Backbone) -> None:
        """Raise ``HeadMismatch`` unless ``backbone`` gives the features the head learnt on."""
        _check_identity(self.meta["backbone"], backbone, "this head was trained on")
        if backbone.embed_dim != self.meta["feature_dim"]:
            raise HeadMismatch(
                f"this head expects {self.meta['feature_dim']}-dimensional features but "
                f"the backbone gives {backbone.embed_dim}"
            )


def load_checkpoint(path: str | Path) -> HeadCheckpoint:
    """Read a head checkpoint.

    Raises:
      HeadError: the file is missing or not a selfment-label head.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = payload["meta"]
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        head = PatchHead(int(meta["feature_dim"]), int(meta["hidden"]))
        head.load_state_dict(payload["state_dict"])
    except Exception as error:  # torch/pickle errors come in many types
        raise HeadError(f"{path} is not a selfment-label head checkpoint: {error}") from error
    head.eval().requires_grad_(False)
    return HeadCheckpoint(head=head, meta=meta, sha256=file_sha256(path))


@dataclass
class HeadSegmenter:
    """Segmenter that runs a trained head on patch tokens (one mask per image).

    The patch scores are softmax[:, 1]; the mask's score is the mean foreground probability
    of the patches above 0.5 (0 when there are none).

    Arguments:
      head: the trained head, on the backbone's device.
      head_sha256: sha256 of its checkpoint (recorded, and compared when a run resumes).
    """

    head: PatchHead
    head_sha256: str

    def options(self) -> dict[str, Any]:
        """Options that decide the masks."""
        return {"mode": "head", "head_sha256": self.head_sha256}

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """One ``PatchMask`` per image of a ``[B, rows, cols, D]`` batch."""
        with timer.stage("head"):
            probability = self.head.foreground(tokens.float())
            inside = probability > THRESHOLD
            count = inside.flatten(1).sum(1)
            total = (probability * inside).flatten(1).sum(1)
            score = torch.where(count > 0, total / count.clamp(min=1), 0.0).tolist()
        return [[PatchMask(scores=probability[i], score=score[i])] for i in range(len(score))]


def apply_head(
    checkpoint: str | Path,
    input_dir: str | Path,
    out_dir: str | Path | None = None,
    config: RunConfig | None = None,
    *,
    overwrite: bool = False,
    backbone: Backbone | None = None,
    progress: ProgressCallback | None = None,
) -> RunSummary:
    """Label a folder with a trained head; writes the same run folder as ``run``.

    The backbone preset and resolution come from the checkpoint (those of ``config`` are
    replaced); the weights from ``config.weights`` or ``$SELFMENT_WEIGHTS`` or the hub.

    Arguments:
      checkpoint: a head saved by ``distil``.
      input_dir: the image folder.
      out_dir: the run folder.
      config: run options (device, batch size, workers, save_scores, weights...).
      overwrite: replace a run folder made with other options.
      backbone: a ready backbone (tests); must match the head's.
      progress: called after every image with ``(done, total, file_name, skip_reason)``.

    Raises:
      HeadError / HeadMismatch: unusable checkpoint, or a backbone other than the head's.
      Everything ``label_folder`` raises.
    """
    loaded = load_checkpoint(checkpoint)
    meta = loaded.meta
    config = replace(
        config or RunConfig(),
        backbone=meta["backbone"]["backbone"],
        resolution=int(meta["resolution"]),
    )
    if backbone is None:
        backbone = backbone_for(config)
    loaded.check_backbone(backbone)
    segmenter = HeadSegmenter(loaded.head.to(backbone.device), loaded.sha256)
    provenance = {
        "head": {
            "checkpoint": str(Path(checkpoint).resolve()),
            "sha256": loaded.sha256,
            "training": meta["training"],
            "data": meta["data"],
            "tool_version": meta["tool_version"],
        }
    }
    return label_folder(
        input_dir,
        out_dir,
        config,
        overwrite=overwrite,
        backbone=backbone,
        segmenter=segmenter,
        progress=progress,
        extra_provenance=provenance,
    )
