"""Review pseudo-labels in FiftyOne: build a dataset from a run folder, launch the App, label a
dataset the user already has (a FiftyOne ``Model`` for ``dataset.apply_model``).

A run folder becomes a persistent FiftyOne dataset with one sample per labelled image (skipped
images are not samples). The masks are ``fo.Detection`` objects in a ``fo.Detections`` field:
``pseudo`` for the ``single`` and ``instances`` modes (one detection per annotation), and for
``entities`` the level-0 masks in ``entities`` and the level-1 masks in ``parts``. Every
detection keeps the run's annotation id as ``coco_id``; parts keep their entity's id as
``parent_id``, so the hierarchy survives the user's edits and the export. FiftyOne's
convention for instance masks is followed: ``bounding_box`` is ``[x, y, w, h]`` relative to the
image and ``mask`` is the boolean mask cropped to that box.

Building again after a new ``run`` adds the new images only: samples already there, with the
user's tags and edits, are left as they are.

``fiftyone`` is imported inside the functions that need it, so the labelling commands do not
pay its import time.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.images import find_images
from ..evaluate import load_gt_mask, load_predictions, match
from ..runfolder.coco import RleError, decode_rle
from ..runfolder.layout import read_run
from .convert import mask_to_detection
from .db import ReviewError, connect

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

PSEUDO_FIELD = "pseudo"
ENTITIES_FIELD = "entities"
PARTS_FIELD = "parts"
GT_FIELD = "ground_truth"
INFO_KEY = "selfment"


def dataset_name(run_dir: str | Path) -> str:
    """The dataset name derived from a run folder: ``selfment-<folder>-<hash of its path>``.

    Arguments:
      run_dir: the run folder.
    """
    resolved = Path(run_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", resolved.name).strip("-") or "run"
    digest = hashlib.sha1(str(resolved).encode("utf-8")).hexdigest()[:6]
    return f"selfment-{slug}-{digest}"


def label_fields(mode: str) -> list[str]:
    """The detection fields that hold a run's labels, top level first.

    Arguments:
      mode: the run's mode (``single``, ``instances`` or ``entities``).
    """
    return [ENTITIES_FIELD, PARTS_FIELD] if mode == "entities" else [PSEUDO_FIELD]


def _image_detections(
    annotations: list[dict[str, Any]], mode: str, image: dict[str, Any]
) -> dict[str, list[fo.Detection]]:
    fields: dict[str, list[fo.Detection]] = {name: [] for name in label_fields(mode)}
    for ann in annotations:
        try:
            mask = decode_rle(ann["segmentation"], (int(image["height"]), int(image["width"])))
        except RleError as error:
            raise ReviewError(
                f"annotation {ann.get('id')} of {image['file_name']}: {error}"
            ) from None
        if not mask.any():
            continue
        attributes: dict[str, Any] = {"coco_id": int(ann["id"])}
        field = PSEUDO_FIELD
        if mode == "entities":
            level = int(ann.get("level", 0))
            attributes["level"] = level
            field = PARTS_FIELD if level else ENTITIES_FIELD
            if ann.get("parent_id") is not None:
                attributes["parent_id"] = int(ann["parent_id"])
        fields[field].append(mask_to_detection(mask, ann["score"], **attributes))
    return fields


def _gt_detections(run_dir: Path, gt_dir: Path) -> dict[str, fo.Detections]:
    """Ground-truth masks matched to the run's images (by relative path, then stem)."""
    import fiftyone as fo

    gt_files = find_images(gt_dir)
    if not gt_files:
        raise ReviewError(f"no mask images found under {gt_dir}")
    pairs, _ = match(load_predictions(run_dir, use_score_maps=False), gt_files)
    found: dict[str, fo.Detections] = {}
    for gt_file, prediction in pairs:
        if prediction is None:
            continue
        try:
            mask = load_gt_mask(gt_dir / gt_file)
        except ValueError as error:
            logger.warning("ground truth %s left out: %s", gt_file, error)
            continue
        if mask.shape != (prediction.height, prediction.width):
            logger.warning(
                "ground truth %s left out: %dx%d, the image is %dx%d",
                gt_file,
                mask.shape[1],
                mask.shape[0],
                prediction.width,
                prediction.height,
            )
            continue
        detections = [mask_to_detection(mask, 1.0)] if mask.any() else []
        found[prediction.file_name] = fo.Detections(detections=detections)
    return found


def build_dataset(
    run_dir: str | Path, name: str | None = None, gt_dir: str | Path | None = None
) -> fo.Dataset:
    """Build, or update in place, the persistent FiftyOne dataset of a run folder.

    New images of the run become samples; samples already in the dataset keep their tags,
    labels and edits. With ``gt_dir``, samples without ground truth get it in the
    ``ground_truth`` field.

    Arguments:
      run_dir: a finished run folder (annotations.json and run.json).
      name: the dataset name (default ``dataset_name(run_dir)``).
      gt_dir: optional folder of ground-truth mask images (foreground = gray > 127).

    Returns:
      The dataset.

    Raises:
      ReviewError: the run folder cannot be read, or the name belongs to another run.
      DatabaseError: the database cannot be reached.
    """
    import fiftyone as fo

    run = read_run(Path(run_dir).resolve())
    run_dir, mode, input_dir = run.path, run.mode, run.input_dir
    name = name or dataset_name(run_dir)
    connect()
    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
        owner = dataset.info.get(INFO_KEY, {}).get("run_dir")
        if owner != str(run_dir):
            raise ReviewError(
                f"dataset {name!r} belongs to {owner or 'something else'}, not {run_dir}; "
                "choose another --name"
            )
    else:
        dataset = fo.Dataset(name, persistent=True)
    known = set(dataset.values("filepath"))
    gt = _gt_detections(run_dir, Path(gt_dir)) if gt_dir else {}
    samples = []
    for image, anns in run.images():
        filepath = str(input_dir / image["file_name"])
        if filepath in known:
            continue
        sample = fo.Sample(
            filepath=filepath,
            metadata=fo.ImageMetadata(width=int(image["width"]), height=int(image["height"])),
            file_name=image["file_name"],
        )
        for field, detections in _image_detections(anns, mode, image).items():
            sample[field] = fo.Detections(detections=detections)
        if image["file_name"] in gt:
            sample[GT_FIELD] = gt.pop(image["file_name"])
        samples.append(sample)
    if samples:
        dataset.add_samples(samples, progress=False)
    if gt:
        _fill_missing_gt(dataset, input_dir, gt)
    dataset.info[INFO_KEY] = {
        "run_dir": str(run_dir),
        "input_dir": str(input_dir),
        "mode": mode,
        "label_fields": label_fields(mode),
        "run": run.provenance,
    }
    dataset.save()
    logger.info("dataset %s: %d new samples, %d in all", name, len(samples), len(dataset))
    return dataset


def _fill_missing_gt(dataset: fo.Dataset, input_dir: Path, gt: dict[str, fo.Detections]) -> None:
    by_path = {str(input_dir / file_name): labels for file_name, labels in gt.items()}
    view = dataset.select_by("filepath", list(by_path))
    for sample in view.iter_samples(autosave=True, progress=False):
        if dataset.has_sample_field(GT_FIELD) and sample[GT_FIELD] is not None:
            continue
        sample[GT_FIELD] = by_path[sample.filepath]


def load_run_dataset(run_dir: str | Path, name: str | None = None) -> fo.Dataset:
    """The FiftyOne dataset of a run folder, built first when it does not exist yet.

    Arguments:
      run_dir: the run folder.
      name: the dataset name (default ``dataset_name(run_dir)``).
    """
    import fiftyone as fo

    connect()
    name = name or dataset_name(run_dir)
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    logger.info("dataset %s does not exist yet: building it from %s", name, run_dir)
    return build_dataset(run_dir, name)
