"""The Selfment loop in one call: label a folder with NCut+IPO, distil those masks into the
single-object head, relabel the folder with the head, cross-fitted.

A head relabelling the images it was trained on copies its teacher's mistakes there, so the
folder's images are split in two halves (sorted by name, alternating) and each half is
relabelled by the head trained on the other half's stage-1 masks. Everything lives in one
run folder ``OUT``:

    OUT/stage1/            the NCut+IPO run (a run folder of its own: resumable, reviewable)
    OUT/stage1/features/   the feature cache the heads train on
    OUT/head.fold0.pt      the head trained on half 0 (it labels half 1); fold1 alike
    OUT/                   the heads' labels (annotations.json, run.json, journal, score maps)

Each stage resumes: stage 1 and stage 3 from their journals, a head is kept when it was
trained on the same stage-1 annotations and fold with the same options. ``OUT/run.json``
records both stages and the folds (``self_train``). A folder whose halves are too small to
learn from is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import HEAD_FLIP, RunConfig, TrainConfig
from .engine import backbone_for
from .errors import SelfmentError
from .features.backbone import Backbone
from .head.apply import HeadSegmenter, head_segmenter
from .head.checkpoint import HeadError, load_checkpoint
from .head.train import TrainProgress, distil, run_targets
from .runfolder.label import check_run_target, clear_run, input_source, label_folder
from .runfolder.layout import JOURNAL_NAME, RunFolder, read_run
from .runfolder.record import ProgressCallback, RunSummary
from .segment.base import PatchMask
from .timing import StageTimer

logger = logging.getLogger(__name__)

STAGE1_DIR = "stage1"
FOLDS = 2
MIN_IMAGES = 10
"""Fewest images with a stage-1 mask each half learns from: a head trained on 10 ecssd-dev
images still beat NCut+IPO on 100 others (docs/head.md); the folder needs ``FOLDS`` times
as many."""


def head_name(fold: int) -> str:
    """The checkpoint file of the head trained on half ``fold``."""
    return f"head.fold{fold}.pt"


def fold_of(names: list[str]) -> dict[str, int]:
    """Each image's half: sorted by name, alternating (deterministic, and a folder of
    numbered photos splits evenly along its numbering)."""
    return {name: index % FOLDS for index, name in enumerate(sorted(names))}


class SelfTrainError(SelfmentError, RuntimeError):
    """The folder cannot be self-trained on (too few images, or too few masks to learn)."""


@dataclass
class SelfTrainSummary:
    """What ``self_train_folder`` did.

    Arguments:
      stage1: the NCut+IPO run (``OUT/stage1``).
      heads: the heads' checkpoints, by the half each was trained on.
      heads_trained: whether this invocation trained each (False: kept from an earlier one).
      train_seconds: seconds spent training (features included) by this invocation.
      final: the heads' run (``OUT``).
    """

    stage1: RunSummary
    heads: list[Path]
    heads_trained: list[bool]
    train_seconds: float
    final: RunSummary


@dataclass
class CrossFitSegmenter:
    """Labels each image with the head that was not trained on it.

    Arguments:
      heads: one head segmenter per half (same layers and flip).
      folds: each image's half (the head of that half never labels it); an image of
        neither (added to the folder after stage 1) is labelled by the head of half 0.
    """

    heads: list[HeadSegmenter]
    folds: dict[str, int]
    takes_file_names = True

    def options(self) -> dict[str, Any]:
        """Both heads and the split (a run labelled with others does not resume)."""
        return {
            **self.heads[0].options(),
            "head_sha256": [head.head_sha256 for head in self.heads],
            "folds_sha256": hashlib.sha256(
                json.dumps(self.folds, sort_keys=True).encode("utf-8")
            ).hexdigest(),
        }

    def to(self, device: torch.device | str) -> CrossFitSegmenter:
        """This segmenter with its heads on ``device``."""
        return CrossFitSegmenter([head.to(device) for head in self.heads], self.folds)

    def tokens(
        self, backbone: Backbone, pixels: torch.Tensor, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """The tokens both heads read (their layers, the mirror images with flip)."""
        return self.heads[0].tokens(backbone, pixels, dtype)

    def __call__(
        self, tokens: torch.Tensor, timer: StageTimer, *, names: list[str]
    ) -> list[list[PatchMask]]:
        """Each image's mask from the head of the other half (every head runs on the batch:
        a head costs little next to the backbone)."""
        masks = [head(tokens, timer) for head in self.heads]
        other = [(self.folds.get(name, FOLDS - 1) + 1) % FOLDS for name in names]
        return [masks[fold][index] for index, fold in enumerate(other)]


def _journal_header(out_dir: Path) -> dict[str, Any] | None:
    """The first line of ``OUT``'s journal (None without one; ``{}`` when unreadable)."""
    path = out_dir / JOURNAL_NAME
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as journal:
            header = json.loads(journal.readline())
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def _labelled_by_self_training(header: dict[str, Any]) -> bool:
    """Whether a journal header is that of a cross-fitted relabelling (its options name the
    split), not of a run made otherwise."""
    fingerprint = header.get("fingerprint")
    return isinstance(fingerprint, dict) and "folds_sha256" in fingerprint


def _check_final_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an ``OUT`` holding a run that self-training did not label
    (a plain ``run``, perhaps reviewed): only ``overwrite`` replaces it."""
    header = _journal_header(out_dir)
    if header is not None and not overwrite and not _labelled_by_self_training(header):
        raise SelfTrainError(
            f"{out_dir} holds a run that self-training did not label", remedy="overwrite"
        )


def _clear_stale_labels(out_dir: Path, input_uri: str) -> None:
    """Remove the labels of earlier heads from ``OUT`` (heads trained again make them
    stale), only when self-training labelled them from this same input."""
    header = _journal_header(out_dir)
    if header and _labelled_by_self_training(header) and header.get("input") == input_uri:
        clear_run(out_dir)


def _masks_sha256(run: RunFolder) -> str:
    """A digest of a run's images and masks (not of its date, which every resume rewrites)."""
    content = json.dumps([run.coco["images"], run.coco["annotations"]], sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _masks_per_fold(run: RunFolder, folds: dict[str, int]) -> list[int]:
    """How many images of each half have a stage-1 mask."""
    counts = [0] * FOLDS
    for image, anns in run.images():
        counts[folds[image["file_name"]]] += bool(anns)
    return counts


def _training_record(train: TrainConfig) -> dict[str, Any]:
    """The training options as a checkpoint stores them (JSON-normalised, to compare)."""
    return json.loads(json.dumps(asdict(train)))


def _reusable_head(head: Path, data: dict[str, Any], train: TrainConfig) -> bool:
    """Whether ``head`` was trained on these stage-1 annotations and half (``data``, as its
    checkpoint records them) with these options."""
    if not head.is_file():
        return False
    try:
        meta = load_checkpoint(head).meta
    except HeadError as error:
        logger.warning("training the head again: %s", error)
        return False
    recorded = {key: meta["data"].get(key) for key in data}
    return recorded == data and json.loads(json.dumps(meta["training"])) == _training_record(train)


def _train_heads(
    run: RunFolder,
    masks_sha256: str,
    out_dir: Path,
    folds: dict[str, int],
    train: TrainConfig,
    backbone: Backbone,
    train_progress: TrainProgress | None,
) -> tuple[list[Path], list[bool]]:
    """Train (or keep) one head per half on the stage-1 ``run``'s masks of that half
    (``masks_sha256``: their digest, which a kept head must have learnt from)."""
    targets = list(run_targets(run))
    heads, trained = [], []
    for fold in range(FOLDS):
        head = out_dir / head_name(fold)
        data = {"masks_sha256": masks_sha256, "fold": fold, "folds": FOLDS}
        fresh = not _reusable_head(head, data, train)
        if fresh:
            distil(
                run.path,
                head,
                train,
                backbone=backbone,
                train_progress=train_progress,
                targets=[target for target in targets if folds[target[0]] == fold],
                data=data,
            )
        heads.append(head)
        trained.append(fresh)
    return heads, trained


def _cross_fit_segmenter(
    heads: list[Path], folds: dict[str, int], backbone: Backbone, flip: bool
) -> CrossFitSegmenter:
    """The heads loaded on the backbone's device, each labelling the other half."""
    segmenters = []
    for head in heads:
        loaded = load_checkpoint(head)
        loaded.check_backbone(backbone)
        segmenters.append(head_segmenter(loaded, backbone.device, flip=flip))
    return CrossFitSegmenter(segmenters, folds)


def _check_folder_size(found: int, input_dir: str | Path) -> None:
    if found < FOLDS * MIN_IMAGES:
        raise SelfTrainError(
            f"{input_dir} has {found} images: self-training needs at least "
            f"{FOLDS * MIN_IMAGES} ({MIN_IMAGES} per half, each half labelled by a head "
            "trained on the other) to learn from; label it without self-training"
        )


def _check_stage1_masks(counts: list[int], found: int, stage1_dir: Path) -> None:
    if min(counts) < MIN_IMAGES:
        raise SelfTrainError(
            f"NCut+IPO found an object in {sum(counts)} of {found} images ({counts[0]} and "
            f"{counts[1]} in the two halves): too few to learn from (self-training needs "
            f"{MIN_IMAGES} per half); its labels are in {stage1_dir}"
        )


def self_train_folder(
    input_dir: str | Path,
    out_dir: str | Path,
    config: RunConfig | None = None,
    train: TrainConfig | None = None,
    *,
    flip: bool = HEAD_FLIP,
    overwrite: bool = False,
    backbone: Backbone | None = None,
    progress: ProgressCallback | None = None,
    train_progress: TrainProgress | None = None,
) -> SelfTrainSummary:
    """Label a folder with NCut+IPO, train a head on each half's masks, relabel each half
    with the head trained on the other half.

    Arguments:
      input_dir: the image folder.
      out_dir: the run folder (stage 1 in ``OUT/stage1``, the heads in
        ``OUT/head.fold{0,1}.pt``).
      config: run options of both labelling stages (``config.segment`` must be ``single``:
        the head learns one object per image).
      train: the heads' training options (rounds, layers...).
      flip: the heads label with test-time flip.
      overwrite: replace run folders made with other options (both stages).
      backbone: a ready backbone (built once from ``config`` when None).
      progress: called after every image of each labelling stage.
      train_progress: called after every training step.

    Raises:
      SelfTrainError: fewer than ``FOLDS * MIN_IMAGES`` images, or stage 1 found an object
        in fewer than ``MIN_IMAGES`` of a half (stage 1 is kept then).
      Everything ``label_folder`` and ``distil`` raise.
    """
    config = config or RunConfig()
    train = train or TrainConfig()
    out_dir = Path(out_dir)
    if config.segment.mode != "single":
        raise SelfTrainError(
            f"self-training learns one object per image: it needs the single mode, not "
            f"{config.segment.mode}",
            remedy="mode",
        )
    check_run_target(out_dir, overwrite)
    _check_final_target(out_dir, overwrite)
    source = input_source(input_dir, out_dir)
    found = len(source.list_images())
    _check_folder_size(found, input_dir)
    if backbone is None:
        backbone = backbone_for(config)
    stage1_dir = out_dir / STAGE1_DIR
    stage1 = label_folder(
        input_dir, stage1_dir, config, overwrite=overwrite, backbone=backbone, progress=progress
    )
    run = read_run(stage1_dir)
    folds = fold_of([image["file_name"] for image, _ in run.images()])
    counts = _masks_per_fold(run, folds)
    _check_stage1_masks(counts, found, stage1_dir)
    masks_sha256 = _masks_sha256(run)
    start = time.perf_counter()
    heads, trained = _train_heads(
        run, masks_sha256, out_dir, folds, train, backbone, train_progress
    )
    train_seconds = time.perf_counter() - start
    segmenter = _cross_fit_segmenter(heads, folds, backbone, flip)
    record = {
        "self_train": {
            "stage1": {
                "run_dir": STAGE1_DIR,
                "images_labelled": stage1.total - len(stage1.skipped),
                "images_with_masks": sum(counts),
                "annotations": stage1.annotations,
                "masks_sha256": masks_sha256,
                "seconds": round(stage1.wall_seconds, 3),
            },
            "folds": {
                "split": "sorted by file name, alternating",
                "images": [sorted(n for n, f in folds.items() if f == k) for k in range(FOLDS)],
                "images_with_masks": counts,
            },
            "heads": [
                {
                    "checkpoint": head.name,
                    "sha256": labeller.head_sha256,
                    "trained_on_fold": fold,
                    "labels_fold": (fold + 1) % FOLDS,
                    "trained_this_invocation": fresh,
                    "training": load_checkpoint(head).meta["training"],
                }
                for fold, (head, labeller, fresh) in enumerate(
                    zip(heads, segmenter.heads, trained, strict=True)
                )
            ],
            "train_seconds": round(train_seconds, 3),
            "flip": flip,
        }
    }
    if any(trained):
        _clear_stale_labels(out_dir, source.uri)
    final = label_folder(
        input_dir,
        out_dir,
        config,
        overwrite=overwrite,
        backbone=backbone,
        segmenter=segmenter,
        progress=progress,
        extra_provenance=record,
    )
    return SelfTrainSummary(stage1, heads, trained, train_seconds, final)
