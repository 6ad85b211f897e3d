"""Where the review of a run stands, read from its dataset without opening the App.

Samples are counted by their review tags (``approved``, ``rejected``, neither: untouched).
Masks are compared with the run's ``annotations.json`` through the ``ann_index`` every
detection keeps (its annotation's position among its image's annotations; ``coco_id`` for
datasets built before it was kept): ids are renumbered when the run rewrites
``annotations.json``, positions are not while the image is unchanged. A run annotation no
detection of its sample refers to any more was deleted; a detection that refers to it with
another mask (pixels or box) was edited; a detection that refers to none was added by the
reviewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runfolder.coco import decode_rle
from ..runfolder.layout import read_run
from .convert import detection_to_mask
from .dataset import load_run_dataset
from .fields import APPROVED_TAG, INFO_KEY, REJECTED_TAG, RUN_FIELD, label_fields


@dataclass
class ReviewStatus:
    """Counts of a run's review.

    Arguments:
      dataset: the dataset's name.
      samples: the run's samples in it.
      approved, rejected: samples with that tag (a sample with both counts twice).
      untouched: samples with neither tag.
      run_masks: masks the run wrote for those samples.
      deleted: run masks no sample holds any more.
      edited: run masks a sample holds with other pixels.
      added: masks the reviewer added.
      samples_gone: images the run labelled that are no longer samples.
      saved_views: the dataset's saved views.
    """

    dataset: str
    samples: int = 0
    approved: int = 0
    rejected: int = 0
    untouched: int = 0
    run_masks: int = 0
    deleted: int = 0
    edited: int = 0
    added: int = 0
    samples_gone: int = 0
    saved_views: list[str] = field(default_factory=list)


def _compare_masks(
    status: ReviewStatus, detections: list[Any], anns: list[dict[str, Any]], width: int, height: int
) -> None:
    """Count the deleted, edited and added masks of one sample."""
    index_of_id = {int(ann["id"]): index for index, ann in enumerate(anns)}
    seen = set()
    for detection in detections:
        index = _annotation_index(detection, index_of_id, len(anns))
        if index is None:
            status.added += 1
            continue
        seen.add(index)
        mask = detection_to_mask(detection, width, height)
        original = decode_rle(anns[index]["segmentation"], (height, width))
        if not np.array_equal(mask, original):
            status.edited += 1
    status.run_masks += len(anns)
    status.deleted += len(anns) - len(seen)


def _annotation_index(detection: Any, index_of_id: dict[int, int], count: int) -> int | None:
    """The position of the run annotation a detection comes from, or None (added by hand)."""
    index = getattr(detection, "ann_index", None)
    if index is not None:
        return int(index) if 0 <= int(index) < count else None
    coco_id = getattr(detection, "coco_id", None)
    return index_of_id.get(int(coco_id)) if coco_id is not None else None


def review_status(run_dir: str | Path, name: str | None = None) -> ReviewStatus:
    """Count a run's reviewed samples and its deleted, edited and added masks.

    Arguments:
      run_dir: the run folder.
      name: the dataset (default: the latest recorded in the run's ``review.json``).

    Raises:
      NotReviewed: no dataset reviews the run.
      RunFolderError: the run folder cannot be read.
    """
    from fiftyone import ViewField as F

    run = read_run(Path(run_dir).resolve())
    dataset = load_run_dataset(run.path, name)
    fields = [
        f
        for f in dataset.info.get(INFO_KEY, {}).get("label_fields", label_fields(run.mode))
        if dataset.has_sample_field(f)
    ]
    status = ReviewStatus(dataset=dataset.name, saved_views=dataset.list_saved_views())
    annotations = {image["file_name"]: (image, anns) for image, anns in run.images()}
    view = dataset.match(F(RUN_FIELD) == str(run.path)).select_fields(["file_name", *fields])
    for sample in view.iter_samples(progress=False):
        status.samples += 1
        tags = set(sample.tags)
        status.approved += APPROVED_TAG in tags
        status.rejected += REJECTED_TAG in tags
        status.untouched += not tags & {APPROVED_TAG, REJECTED_TAG}
        image, anns = annotations.pop(sample.file_name, (None, []))
        if image is None:
            continue
        detections = [d for f in fields if sample[f] is not None for d in sample[f].detections]
        _compare_masks(status, detections, anns, int(image["width"]), int(image["height"]))
    status.samples_gone = len(annotations)
    return status
