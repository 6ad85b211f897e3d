"""The Selfment loop in one call: label a folder with NCut+IPO, distil those masks into the
single-object head, relabel the folder with the head.

Everything lives in one run folder ``OUT``:

    OUT/stage1/      the NCut+IPO run (a run folder of its own: resumable, reviewable)
    OUT/stage1/features/   the feature cache the head trains on
    OUT/head.pt      the head trained on stage 1's masks
    OUT/             the head's labels (annotations.json, run.json, journal, score maps)

Each stage resumes: stage 1 and stage 3 from their journals, the head is kept when it was
trained on the same stage-1 annotations with the same options. ``OUT/run.json`` records
both stages (``self_train``). A folder with too few images to learn from is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import HEAD_FLIP, RunConfig, TrainConfig
from .engine import backbone_for
from .errors import SelfmentError
from .features.backbone import Backbone
from .head.apply import apply_head
from .head.checkpoint import HeadError, load_checkpoint
from .head.train import TrainProgress, distil
from .runfolder.label import check_run_target, input_source, label_folder
from .runfolder.layout import read_run
from .runfolder.record import ProgressCallback, RunSummary

logger = logging.getLogger(__name__)

STAGE1_DIR = "stage1"
HEAD_NAME = "head.pt"
MIN_IMAGES = 10
"""Fewest images (with a stage-1 mask) self-training learns from: a head trained on 10
ecssd-dev images still beat NCut+IPO on 100 others (docs/head.md)."""


class SelfTrainError(SelfmentError, RuntimeError):
    """The folder cannot be self-trained on (too few images, or too few masks to learn)."""


@dataclass
class SelfTrainSummary:
    """What ``self_train_folder`` did.

    Arguments:
      stage1: the NCut+IPO run (``OUT/stage1``).
      head: the head checkpoint.
      head_trained: whether this invocation trained it (False: kept from an earlier one).
      train_seconds: seconds spent training (features included) by this invocation.
      final: the head's run (``OUT``).
    """

    stage1: RunSummary
    head: Path
    head_trained: bool
    train_seconds: float
    final: RunSummary


def _count_images(input_dir: str | Path, out_dir: Path) -> int:
    return len(input_source(input_dir, out_dir).list_images())


def _stage1_facts(run_dir: Path) -> tuple[int, str]:
    """Images with a mask in a run, and a digest of its images and masks (not of the
    run's date, which every resume rewrites)."""
    run = read_run(run_dir)
    content = json.dumps([run.coco["images"], run.coco["annotations"]], sort_keys=True)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()
    return sum(1 for _, anns in run.images() if anns), digest


def _training_record(train: TrainConfig) -> dict[str, Any]:
    """The training options as a checkpoint stores them (JSON-normalised, to compare)."""
    return json.loads(json.dumps(asdict(train)))


def _reusable_head(head: Path, masks_sha256: str, train: TrainConfig) -> bool:
    """Whether ``head`` was trained on these stage-1 annotations with these options."""
    if not head.is_file():
        return False
    try:
        meta = load_checkpoint(head).meta
    except HeadError as error:
        logger.warning("training the head again: %s", error)
        return False
    return meta["data"].get("masks_sha256") == masks_sha256 and json.loads(
        json.dumps(meta["training"])
    ) == _training_record(train)


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
    """Label a folder with NCut+IPO, train the head on those masks, relabel with the head.

    Arguments:
      input_dir: the image folder.
      out_dir: the run folder (stage 1 in ``OUT/stage1``, the head in ``OUT/head.pt``).
      config: run options of both labelling stages (``config.segment`` must be ``single``:
        the head learns one object per image).
      train: the head's training options (rounds, layers...).
      flip: the head labels with test-time flip.
      overwrite: replace run folders made with other options (both stages).
      backbone: a ready backbone (built once from ``config`` when None).
      progress: called after every image of each labelling stage.
      train_progress: called after every training step.

    Raises:
      SelfTrainError: fewer than ``MIN_IMAGES`` images, or stage 1 found an object in fewer
        (stage 1 is kept then).
      Everything ``label_folder``, ``distil`` and ``apply_head`` raise.
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
    found = _count_images(input_dir, out_dir)
    if found < MIN_IMAGES:
        raise SelfTrainError(
            f"{input_dir} has {found} images: self-training needs at least {MIN_IMAGES} to "
            "learn from; label it without self-training"
        )
    if backbone is None:
        backbone = backbone_for(config)
    stage1_dir = out_dir / STAGE1_DIR
    stage1 = label_folder(
        input_dir, stage1_dir, config, overwrite=overwrite, backbone=backbone, progress=progress
    )
    with_masks, masks_sha256 = _stage1_facts(stage1_dir)
    if with_masks < MIN_IMAGES:
        raise SelfTrainError(
            f"NCut+IPO found an object in {with_masks} of {found} images: too few to learn "
            f"from (self-training needs {MIN_IMAGES}); its labels are in {stage1_dir}"
        )
    head = out_dir / HEAD_NAME
    start = time.perf_counter()
    trained = not _reusable_head(head, masks_sha256, train)
    if trained:
        distil(
            stage1_dir,
            head,
            train,
            backbone=backbone,
            train_progress=train_progress,
            data={"masks_sha256": masks_sha256},
        )
    train_seconds = time.perf_counter() - start
    record = {
        "self_train": {
            "stage1": {
                "run_dir": STAGE1_DIR,
                "images_labelled": stage1.total - len(stage1.skipped),
                "images_with_masks": with_masks,
                "annotations": stage1.annotations,
                "masks_sha256": masks_sha256,
                "seconds": round(stage1.wall_seconds, 3),
            },
            "head": {
                "checkpoint": HEAD_NAME,
                "trained_this_invocation": trained,
                "train_seconds": round(train_seconds, 3),
            },
            "flip": flip,
        }
    }
    final = apply_head(
        head,
        input_dir,
        out_dir,
        config,
        overwrite=overwrite or trained,
        backbone=backbone,
        progress=progress,
        flip=flip,
        extra_provenance=record,
    )
    return SelfTrainSummary(stage1, head, trained, train_seconds, final)
