"""Export reviewed labels from a FiftyOne dataset as a training dataset.

The labels are read back from the dataset, so the user's tags, deleted labels and edits are
honoured. Samples are filtered by tags (``tags``: keep samples with any of them;
``exclude_tags``: drop samples with any of them). Formats:

- ``coco``: ``annotations.json`` written by our own COCO writer (``coco.write_coco_stream``):
  compressed RLE with ``iscrowd: 0`` (exact masks) or polygons, ``score``, and for entity runs
  ``level`` and ``parent_id``; images under ``images/`` with the run's relative paths.
  FiftyOne's COCO exporter is not used: it renames nested files to unique basenames, has no
  ``level``/``parent_id`` and rebuilds masks from its own box rounding.
- ``yolo``: ultralytics segmentation (``dataset.yaml``, ``images/train``, ``labels/train``, one
  normalised polygon per line), written by FiftyOne's ``YOLOv5Dataset`` exporter with
  ``use_masks=True``, which fits: a mask in several pieces gives one line per piece. Only the
  top-level masks (``pseudo`` or ``entities``) are exported; YOLO has no hierarchy.
- ``masks``: one 8-bit PNG per image under ``masks/`` (255 = union of the top-level masks,
  0 = background), the layout ``selfment-label eval --gt`` reads. Our own writer, for exact
  masks and the run's relative paths.

Every output path is built from a sanitised relative name (no ``..``, no absolute paths) and
checked to lie inside the target folder; a non-empty target is refused unless ``overwrite``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .. import __version__
from ..atomic import atomic_path
from ..config import EXPORT_FORMATS, EXPORT_MEDIA
from ..runfolder.coco import annotation_record, write_coco_stream
from .convert import LABEL, detection_to_mask
from .dataset import INFO_KEY, PARTS_FIELD, PSEUDO_FIELD
from .db import ReviewError

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
MEDIA = EXPORT_MEDIA
IMAGES_DIR = "images"
MASKS_DIR = "masks"


class ExportError(ReviewError):
    """An export cannot be done (bad option, busy or protected target...)."""


@dataclass
class ExportSummary:
    """What an export wrote.

    Arguments:
      target: the target folder.
      format: ``coco``, ``yolo`` or ``masks``.
      images: images exported.
      annotations: masks exported.
    """

    target: Path
    format: str
    images: int
    annotations: int


def safe_relative_path(name: str) -> str:
    """A relative POSIX path made from any name: no root, no drive, no ``.``/``..`` parts.

    Arguments:
      name: a file name as found in a run (may hold ``..``, absolute or Windows paths).
    """
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".", "..")]
    cleaned = [re.sub(r'[\x00-\x1f:*?"<>|]', "_", p) for p in parts]
    return "/".join(cleaned) or "image"


def inside(target: Path, relative: str) -> Path:
    """``target / relative``, refusing any path that would resolve outside ``target``.

    Raises:
      ExportError: the path leaves the target folder.
    """
    root = target.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ExportError(f"refusing to write {relative!r}: it resolves outside {target}")
    return path


def prepare_target(target: Path, overwrite: bool, protected: list[Path]) -> None:
    """Make the target folder, empty; refuse a non-empty one unless ``overwrite``.

    Arguments:
      target: the export folder.
      overwrite: delete what the folder holds.
      protected: folders the target must not be, nor contain (the run, the images).

    Raises:
      ExportError: the target is not empty (without ``overwrite``), or is protected.
    """
    resolved = target.resolve()
    for folder in protected:
        folder = folder.resolve()
        if resolved == folder or resolved in folder.parents:
            raise ExportError(f"refusing to export into {target}: it holds {folder}")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ExportError(f"{target} is not empty; use --overwrite to replace its contents")
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)


def select_samples(
    dataset: fo.Dataset, tags: list[str] | None = None, exclude_tags: list[str] | None = None
) -> Any:
    """The samples to export: with any of ``tags`` (when given), none of ``exclude_tags``.

    Arguments:
      dataset: the reviewed dataset.
      tags: keep only samples with at least one of these tags.
      exclude_tags: drop samples with any of these tags.
    """
    view = dataset.view()
    if tags:
        view = view.match_tags(list(tags))
    if exclude_tags:
        view = view.match_tags(list(exclude_tags), bool=False)
    return view


def _image_size(sample: Any) -> tuple[int, int]:
    if sample.metadata is None or sample.metadata.width is None:
        sample.compute_metadata()
    return int(sample.metadata.width), int(sample.metadata.height)


def _detections(sample: Any, field: str) -> list[Any]:
    labels = sample[field] if sample.has_field(field) else None
    return list(labels.detections) if labels is not None else []


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat ``[x1, y1, x2, y2, ...]``) of the outer contours of a mask.

    Holes are not represented (a COCO polygon has none); RLE keeps the exact mask.
    """
    import cv2

    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [
        [round(float(v) + 0.5, 2) for v in contour.reshape(-1)]
        for contour in contours
        if len(contour) >= 3
    ]


def _coco_annotations(sample: Any, fields: list[str], polygons: bool) -> list[dict[str, Any]]:
    width, height = _image_size(sample)
    hierarchical = PARTS_FIELD in fields
    records: list[dict[str, Any]] = []
    index_of: dict[int, int] = {}
    for level, field in enumerate(fields):
        for detection in _detections(sample, field):
            mask = detection_to_mask(detection, width, height)
            if not mask.any():
                continue
            extra: dict[str, Any] = {}
            if hierarchical:
                extra["level"] = level
                parent = detection.get_attribute_value("parent_id", None)
                extra["parent"] = index_of.get(parent) if level else None
            record = annotation_record(mask, detection.confidence or 0.0, extra)
            if polygons:
                record["segmentation"] = mask_to_polygons(mask)
            coco_id = detection.get_attribute_value("coco_id", None)
            if coco_id is not None and level == 0:
                index_of[int(coco_id)] = len(records)
            records.append(record)
    return records


def _place_media(source: str, dest: Path, media: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if media == "symlink":
        os.symlink(os.path.abspath(source), dest)
        return
    with atomic_path(dest) as tmp:
        shutil.copy2(source, tmp)


def _save_png(array: np.ndarray, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _relative_names(view: Any) -> dict[str, str]:
    """Sample id -> unique sanitised relative file name."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    has_file_name = view.has_sample_field("file_name")
    for sample_id, filepath, file_name in zip(
        view.values("id"),
        view.values("filepath"),
        view.values("file_name") if has_file_name else [None] * len(view),
        strict=True,
    ):
        rel = safe_relative_path(file_name or Path(filepath).name)
        stem, suffix = os.path.splitext(rel)
        candidate, n = rel, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}{suffix}"
        taken.add(candidate.lower())
        names[sample_id] = candidate
    return names


def export_dataset(
    dataset: fo.Dataset,
    target: str | Path,
    fmt: str = "coco",
    *,
    tags: list[str] | None = None,
    exclude_tags: list[str] | None = None,
    polygons: bool = False,
    media: str = "copy",
    overwrite: bool = False,
) -> ExportSummary:
    """Export a reviewed dataset's labels.

    Arguments:
      dataset: a dataset built by ``review.build_dataset`` (its info names the label fields).
      target: the export folder (created; must be empty unless ``overwrite``).
      fmt: ``coco``, ``yolo`` or ``masks``.
      tags: keep only samples with at least one of these tags.
      exclude_tags: drop samples with any of these tags.
      polygons: COCO polygons instead of compressed RLE (``coco`` only).
      media: ``copy``, ``symlink`` or ``none`` (images not written).
      overwrite: replace the target folder's contents.

    Returns:
      An ``ExportSummary``.

    Raises:
      ExportError: a bad option, or a target that is not empty or is protected.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if media not in MEDIA:
        raise ExportError(f"unknown media mode {media!r}: choose one of {', '.join(MEDIA)}")
    target = Path(target)
    info = dataset.info.get(INFO_KEY, {})
    fields = [f for f in info.get("label_fields", [PSEUDO_FIELD]) if dataset.has_sample_field(f)]
    if not fields:
        raise ExportError(f"dataset {dataset.name!r} has no selfment label field")
    protected = [Path(p) for p in (info.get("run_dir"), info.get("input_dir")) if p]
    prepare_target(target, overwrite, protected)
    view = select_samples(dataset, tags, exclude_tags)
    if fmt == "yolo":
        return _export_yolo(view, target, fields[0], media)
    names = _relative_names(view)
    records = []
    n_masks = 0
    for sample in view.iter_samples(progress=False):
        rel = names[sample.id]
        width, height = _image_size(sample)
        if media != "none":
            _place_media(sample.filepath, inside(target, f"{IMAGES_DIR}/{rel}"), media)
        if fmt == "masks":
            union = np.zeros((height, width), dtype=bool)
            for detection in _detections(sample, fields[0]):
                union |= detection_to_mask(detection, width, height)
                n_masks += 1
            png = str(PurePosixPath(rel).with_suffix(".png"))
            _save_png(union.astype(np.uint8) * 255, inside(target, f"{MASKS_DIR}/{png}"))
            continue
        annotations = _coco_annotations(sample, fields, polygons)
        n_masks += len(annotations)
        records.append(
            {"file_name": rel, "width": width, "height": height, "annotations": annotations}
        )
    if fmt == "coco":
        coco_info = {
            "description": f"selfment-label export of FiftyOne dataset {dataset.name}",
            "version": __version__,
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "image_root": IMAGES_DIR if media != "none" else info.get("input_dir"),
            "tags": list(tags or []),
            "exclude_tags": list(exclude_tags or []),
            "segmentation": "polygons" if polygons else "rle",
        }
        write_coco_stream(inside(target, "annotations.json"), records, coco_info)
    logger.info("exported %d images, %d masks to %s", len(names), n_masks, target)
    return ExportSummary(target=target, format=fmt, images=len(names), annotations=n_masks)


def _export_yolo(view: Any, target: Path, field: str, media: str) -> ExportSummary:
    import fiftyone as fo

    export_media = {"copy": True, "symlink": "symlink", "none": False}[media]
    view.export(
        export_dir=str(target.resolve()),
        dataset_type=fo.types.YOLOv5Dataset,
        label_field=field,
        split="train",
        classes=[LABEL],
        use_masks=True,
        export_media=export_media,
        progress=False,
    )
    n_masks = int(view.count(f"{field}.detections"))
    return ExportSummary(target=target, format="yolo", images=len(view), annotations=n_masks)
