"""Export reviewed labels from a FiftyOne dataset as a training dataset with train/val splits.

The labels are read back from the dataset, so the user's tags, deleted labels and edits are
honoured. Samples are filtered by tags (``tags``: keep samples with any of them;
``exclude_tags``: drop samples with any of them), then split into ``train`` and ``val``: by a
seeded hash of the file name (``val_fraction``, stable when more images are exported later;
see ``export_split``), or by the reviewer's ``train``/``val`` tags (``split_by_tag``). Formats
(``<split>`` is ``train`` or ``val``; a split without images is not written):

- ``coco``: ``annotations/instances_<split>.json`` written by our own COCO writer
  (``coco.write_coco_stream``): compressed RLE with ``iscrowd: 0`` (exact masks) or polygons,
  ``score``, and for entity runs ``level`` and ``parent_id``; images under
  ``images/<split>/`` with the run's relative paths (``file_name`` is relative to that
  folder). FiftyOne's COCO exporter is not used: it renames nested files to unique basenames,
  has no ``level``/``parent_id`` and rebuilds masks from its own box rounding.
- ``yolo``: Ultralytics segmentation: ``dataset.yaml`` (``train``, ``val``, ``names``, paths
  relative to the file), ``images/<split>/``, ``labels/<split>/``, one row per mask with its
  pieces joined into one polygon (``export_yolo``). Top-level masks only (``pseudo`` or
  ``entities``): YOLO has no hierarchy.
- ``masks``: one 8-bit PNG per image (255 = union of the masks, 0 = background), the layout
  ``selfment-label eval --gt`` reads: ``masks/<split>/`` for the top level and, for entity
  runs, ``parts/<split>/`` for the parts.

YOLO label files and mask PNGs are named after the image without its extension; images whose
names differ only by extension (``a.jpg``, ``a.png``) keep it (``a.jpg.png``, ``a.png.png``).

Media are only read from the images the run labelled: a sample's file must be its run's input
folder joined with its relative ``file_name`` (no ``..``, not absolute), recorded in the run's
journal and unchanged since (content key); a link the user placed in the input folder is
followed, as ``run`` followed it. Any other image is left out of the export and reported in
``skipped``; an export that would write no image is refused. Every output path is built from a
sanitised relative name (no ``..``, no absolute paths) and checked to lie inside the target.
The export is written into a temporary folder beside the target and renamed into place at the
end, so a failed export leaves the target as it was. A target inside, equal to or holding the
run folder, the input folder or FiftyOne's database folder is always refused. Every export
writes a marker file (``MARKER_NAME``) naming what it wrote; a non-empty target is replaced
only with ``overwrite`` and only when it is such an export holding nothing else, so
``overwrite`` never deletes a folder the tool did not make.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .. import __version__
from ..atomic import atomic_write_text, umask
from ..config import (
    DEFAULT_EXPORT_FORMAT,
    DEFAULT_EXPORT_MEDIA,
    EXPORT_FORMATS,
    EXPORT_MEDIA,
    EXPORT_SPLIT_SEED,
    EXPORT_VAL_FRACTION,
    YOLO_MIN_PIECE_AREA,
)
from ..data.storage import content_key
from ..masks import annotation_record
from ..outputs import OutputError, check_output
from ..runfolder.coco import write_coco_stream
from ..runfolder.journal import labelled_keys
from ..runfolder.layout import RUN_NAME, is_relative_name
from .convert import LABEL, detection_to_mask
from .dataset import INFO_KEY, PARTS_FIELD, PSEUDO_FIELD
from .db import ReviewError
from .fields import RUN_FIELD
from .split import (
    SPLITS,
    SplitError,
    hash_splits,
    tag_splits,
)
from .yolo import dataset_yaml, label_rows, yolo_image_name, yolo_image_problem

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
MASKS_DIR = "masks"
PARTS_DIR = "parts"
LABELS_DIR = "labels"
ANNOTATIONS_DIR = "annotations"
MARKER_NAME = ".selfment-export.json"
"""The file every export writes at its root: the proof that ``overwrite`` may replace it."""


class ExportError(ReviewError):
    """An export cannot be done (bad option, busy or protected target...)."""


@dataclass
class ExportSummary:
    """What an export wrote.

    Arguments:
      target: the target folder.
      format: ``coco``, ``yolo`` or ``masks``.
      images: images exported.
      annotations: masks exported (COCO annotations, YOLO rows; ``masks``: PNG files).
      splits: images per split (``train``, ``val``).
      skipped: ``"file name: reason"`` for each selected image left out.
    """

    target: Path
    format: str
    images: int
    annotations: int
    splits: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)


@dataclass
class _Item:
    """One sample to export: its unique relative name, output stem, split and source file."""

    name: str
    stem: str
    split: str
    source: Path


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


def check_options(fmt: str, media: str, val_fraction: float, min_piece_area: int) -> None:
    """Refuse options no export can use; cheap, so callers check them before the database.

    Raises:
      ExportError: an unknown format or media mode, a validation fraction outside ``[0, 1)``
        (NaN included), or a negative ``min_piece_area``.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if media not in EXPORT_MEDIA:
        raise ExportError(f"unknown media mode {media!r}: choose one of {', '.join(EXPORT_MEDIA)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ExportError(f"the validation fraction must be in [0, 1), not {val_fraction}")
    if min_piece_area < 0:
        raise ExportError(f"the minimum piece area must be 0 or more, not {min_piece_area}")


def check_target(target: Path, overwrite: bool, protected: dict[Path, str]) -> None:
    """Refuse a target that cannot be exported into; nothing is changed on disk.

    Arguments:
      target: the export folder.
      overwrite: a non-empty target may be replaced if it is a previous export
        (``check_own_export``).
      protected: folders the target must not be inside, equal to, nor contain (run, images,
        FiftyOne's database), each with its role.

    Raises:
      ExportError: a protected or non-folder target (``outputs.check_output``, the guard of
        every writer), a non-empty one without ``overwrite``, or one that is not a previous
        export.
    """
    try:
        check_output(target, "the export", folder=True, protected=protected)
    except OutputError as error:
        raise ExportError(str(error)) from None
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ExportError(f"{target} is not empty", remedy="export_overwrite")
        check_own_export(target)


def check_own_export(target: Path) -> None:
    """Refuse to replace a folder unless it is a previous export holding only what it wrote.

    The export's marker file (``MARKER_NAME``) lists the entries it wrote at the target's top
    level; a folder without it (a user's folder, a home, a database) or with anything else
    beside those entries is not the tool's to delete.

    Raises:
      ExportError: ``target`` is not a previous export, or holds files the export did not write.
    """
    marker = target / MARKER_NAME
    try:
        entries = set(json.loads(marker.read_text(encoding="utf-8"))["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        entries = None
    if marker.is_symlink() or entries is None:
        raise ExportError(
            f"refusing to replace {target}: it is not a selfment-label export (no {MARKER_NAME}) "
            "and only a previous export is ever replaced",
            remedy="export_target",
        )
    foreign = sorted(p.name for p in target.iterdir() if p.name not in entries | {MARKER_NAME})
    if foreign:
        raise ExportError(
            f"refusing to replace {target}: it holds {foreign[0]!r}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which the export "
            "did not write; move it out or choose another folder"
        )


def _write_marker(staging: Path, fmt: str) -> None:
    """Write the marker that lets a later ``overwrite`` replace this export (``MARKER_NAME``)."""
    entries = sorted(p.name for p in staging.iterdir())
    marker = {"tool": "selfment-label", "version": __version__, "format": fmt, "entries": entries}
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _publish(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` folder to ``target``, replacing what was there."""
    os.chmod(staging, 0o777 & ~umask())
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)


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


def _nothing_selected(
    dataset: fo.Dataset, tags: list[str] | None, exclude_tags: list[str] | None
) -> str:
    """Why the tag filters selected no sample, naming the tags the dataset has."""
    counts = dataset.count_sample_tags()
    existing = ", ".join(f"{tag} ({n})" for tag, n in sorted(counts.items())) or "none"
    if not len(dataset):
        return f"dataset {dataset.name!r} has no samples"
    if tags and not any(tag in counts for tag in tags):
        return f"no sample has any of the tags {', '.join(tags)}; the dataset's tags: {existing}"
    return (
        f"the tag filters select no sample (tags {', '.join(tags or []) or '-'}, "
        f"excluded tags {', '.join(exclude_tags or []) or '-'}); the dataset's tags: {existing}"
    )


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


def _media_path(item: _Item, fmt: str) -> str:
    """Where an item's image goes, relative to the export root: ``images/<split>/`` and its
    relative name; for YOLO, named after its label file (Ultralytics finds the labels by
    swapping ``images`` for ``labels`` and the extension for ``.txt``)."""
    if fmt == "yolo":
        name = f"{yolo_image_name(item.stem)}{PurePosixPath(item.name).suffix}"
    else:
        name = item.name
    return f"{IMAGES_DIR}/{item.split}/{name}"


def _place_media(root: Path, items: dict[str, _Item], fmt: str, media: str) -> None:
    """Copy or link every item's image into the export (nothing with ``media="none"``)."""
    if media == "none":
        return
    for item in items.values():
        dest = inside(root, _media_path(item, fmt))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if media == "symlink":
            os.symlink(item.source, dest)
        else:
            shutil.copyfile(item.source, dest)


def _save_png(array: np.ndarray, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(dest, format="PNG")


def unique_names(file_names: list[str]) -> list[str]:
    """Sanitised relative names, made unique (case-insensitively) with a ``-2``, ``-3`` suffix."""
    names: list[str] = []
    taken: set[str] = set()
    for file_name in file_names:
        rel = safe_relative_path(file_name)
        stem, suffix = os.path.splitext(rel)
        candidate, n = rel, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}{suffix}"
        taken.add(candidate.lower())
        names.append(candidate)
    return names


def distinct_stems(names: list[str]) -> dict[str, str]:
    """Name -> output stem: the name without its extension, or the whole name (``a.jpg``) when
    another name has the same stem (case-insensitively, as ``a.jpg`` and ``a.PNG``).

    The stems name the YOLO label files and mask PNGs (``<stem>.txt``, ``<stem>.png``), so no
    two images write the same file.

    Arguments:
      names: unique relative names.
    """
    counts: dict[str, int] = {}
    for name in names:
        key = str(PurePosixPath(name).with_suffix("")).lower()
        counts[key] = counts.get(key, 0) + 1
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        stem = str(PurePosixPath(name).with_suffix(""))
        candidate = name if counts[stem.lower()] > 1 else stem
        base, n = candidate, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate.lower())
        stems[name] = candidate
    return stems


@dataclass
class _RunImages:
    """What a run folder says about its images: its input folder and the content key of every
    image its journal holds as labelled."""

    input_dir: Path | None
    keys: dict[str, Any]

    @classmethod
    def read(cls, run_dir: str | None) -> _RunImages:
        """The run's input folder (from ``run.json``) and labelled images (from its journal)."""
        if not run_dir:
            return cls(None, {})
        try:
            recorded = json.loads((Path(run_dir) / RUN_NAME).read_text(encoding="utf-8"))
            input_dir = Path(recorded["input_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            input_dir = None
        return cls(input_dir, labelled_keys(Path(run_dir)))


def _source_problem(filepath: str, file_name: str | None, run: _RunImages) -> str | None:
    """Why an image cannot be read for export, or None.

    The image must be the one its run labelled: a relative file name without ``..``, at that
    name under the run's input folder, in the run's journal, and unchanged since (same content
    key). A link the user placed in the input folder is followed, as ``run`` followed it.
    """
    if not is_relative_name(file_name):
        return f"its file name {file_name!r} is not a path inside the run's input folder"
    if run.input_dir is None:
        return "its run folder does not name the run's input folder"
    if os.path.normpath(filepath) != os.path.normpath(run.input_dir / file_name):
        return f"its file {filepath} is not the run's image {run.input_dir / file_name}"
    if not Path(filepath).is_file():
        return f"missing ({filepath})"
    if file_name not in run.keys:
        return "the run never labelled it (its journal has no record of it)"
    recorded = run.keys[file_name]
    if recorded is not None and content_key(Path(filepath)) != recorded:
        return "the image changed since the run labelled it: run `selfment-label run` again"
    return None


def _plan(
    view: Any,
    run_dir: str | None,
    fmt: str,
    media: str,
    val_fraction: float,
    split_seed: int,
    split_by_tag: bool,
) -> tuple[dict[str, _Item], list[str]]:
    """Sample id -> what to write for it, and the ``"name: reason"`` of the samples left out.

    Arguments:
      run_dir: the run of samples that do not record theirs (``RUN_FIELD``).
    """
    ids, filepaths = view.values("id"), view.values("filepath")
    file_names = (
        view.values("file_name") if view.has_sample_field("file_name") else [None] * len(ids)
    )
    runs_of = view.values(RUN_FIELD) if view.has_sample_field(RUN_FIELD) else [None] * len(ids)
    names = unique_names([f or Path(p).name for f, p in zip(file_names, filepaths, strict=True)])
    stems = distinct_stems(names)
    try:
        if split_by_tag:
            splits = tag_splits(dict(zip(names, view.values("tags"), strict=True)))
        else:
            splits = hash_splits(names, val_fraction, split_seed)
    except SplitError as error:
        raise ExportError(str(error)) from None
    runs: dict[str | None, _RunImages] = {}
    items: dict[str, _Item] = {}
    skipped: list[str] = []
    for sample_id, filepath, file_name, run_of, name in zip(
        ids, filepaths, file_names, runs_of, names, strict=True
    ):
        problem = None
        if media != "none":
            run = runs.setdefault(run_of or run_dir, _RunImages.read(run_of or run_dir))
            problem = _source_problem(filepath, file_name, run)
            if problem is None and fmt == "yolo":
                problem = yolo_image_problem(Path(filepath))
        if problem:
            skipped.append(f"{name}: {problem}")
            continue
        items[sample_id] = _Item(name, stems[name], splits[name], Path(filepath).resolve())
    for reason in skipped:
        logger.warning("left out of the export: %s", reason)
    return items, skipped


def _samples(view: Any, items: dict[str, _Item]) -> Iterator[tuple[Any, _Item]]:
    """The planned samples with their items, in the view's order."""
    for sample in view.select(list(items), ordered=True).iter_samples(progress=False):
        yield sample, items[sample.id]


def _coco_info(
    description: str,
    input_dir: str | None,
    tags: list[str] | None,
    exclude_tags: list[str] | None,
    polygons: bool,
) -> dict[str, Any]:
    """The ``info`` of an export's COCO files (each split adds ``split`` and ``image_root``)."""
    return {
        "description": description,
        "version": __version__,
        "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_dir": input_dir,
        "tags": list(tags or []),
        "exclude_tags": list(exclude_tags or []),
        "segmentation": "polygons" if polygons else "rle",
    }


def _write_coco(
    view: Any,
    root: Path,
    items: dict[str, _Item],
    fields: list[str],
    media: str,
    polygons: bool,
    info: dict[str, Any],
) -> int:
    """Write ``annotations/instances_<split>.json`` (``info``: see ``_coco_info``)."""
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for sample, item in _samples(view, items):
        width, height = _image_size(sample)
        annotations = _coco_annotations(sample, fields, polygons)
        records[item.split].append(
            {"file_name": item.name, "width": width, "height": height, "annotations": annotations}
        )
    n_masks = 0
    for split, split_records in records.items():
        if not split_records:
            continue
        image_root = f"{IMAGES_DIR}/{split}" if media != "none" else info["input_dir"]
        path = inside(root, f"{ANNOTATIONS_DIR}/instances_{split}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        _, count = write_coco_stream(
            path, split_records, {**info, "split": split, "image_root": image_root}
        )
        n_masks += count
    return n_masks


def _write_yolo(
    view: Any,
    root: Path,
    items: dict[str, _Item],
    field: str,
    min_piece_area: int,
    description: str,
) -> int:
    n_rows = 0
    for sample, item in _samples(view, items):
        width, height = _image_size(sample)
        masks = [detection_to_mask(d, width, height) for d in _detections(sample, field)]
        rows = label_rows(masks, width, height, min_piece_area)
        n_rows += len(rows)
        label = inside(root, f"{LABELS_DIR}/{item.split}/{yolo_image_name(item.stem)}.txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")
    written = [split for split in SPLITS if any(i.split == split for i in items.values())]
    atomic_write_text(inside(root, "dataset.yaml"), dataset_yaml(written, [LABEL], description))
    return n_rows


def _write_masks(view: Any, root: Path, items: dict[str, _Item], fields: list[str]) -> int:
    n_files = 0
    for sample, item in _samples(view, items):
        width, height = _image_size(sample)
        for level, field in enumerate(fields):
            union = np.zeros((height, width), dtype=bool)
            for detection in _detections(sample, field):
                union |= detection_to_mask(detection, width, height)
            folder = PARTS_DIR if level else MASKS_DIR
            png = inside(root, f"{folder}/{item.split}/{item.stem}.png")
            _save_png(union.astype(np.uint8) * 255, png)
            n_files += 1
    return n_files


def _label_fields(dataset: fo.Dataset, info: dict[str, Any]) -> list[str]:
    """The dataset's selfment label fields that exist, top level first.

    Raises:
      ExportError: the dataset has none.
    """
    fields = [f for f in info.get("label_fields", [PSEUDO_FIELD]) if dataset.has_sample_field(f)]
    if not fields:
        raise ExportError(f"dataset {dataset.name!r} has no selfment label field")
    return fields


def _protected_folders(info: dict[str, Any]) -> dict[Path, str]:
    """The folders an export target must stay clear of, each with its role."""
    import fiftyone as fo

    roles = {"run_dir": "the run folder", "input_dir": "the run's input folder"}
    protected = {Path(info[key]): role for key, role in roles.items() if info.get(key)}
    protected[Path(fo.config.database_dir)] = "FiftyOne's database folder"
    return protected


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target``, put in its place when the block succeeds and
    deleted when it fails, so a failed export leaves the target as it was."""
    resolved = target.resolve()
    resolved.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", dir=resolved.parent))
    try:
        yield staging
        _publish(staging, resolved)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_dataset(
    dataset: fo.Dataset,
    target: str | Path,
    fmt: str = DEFAULT_EXPORT_FORMAT,
    *,
    tags: list[str] | None = None,
    exclude_tags: list[str] | None = None,
    polygons: bool = False,
    media: str = DEFAULT_EXPORT_MEDIA,
    overwrite: bool = False,
    val_fraction: float = EXPORT_VAL_FRACTION,
    split_seed: int = EXPORT_SPLIT_SEED,
    split_by_tag: bool = False,
    min_piece_area: int = YOLO_MIN_PIECE_AREA,
) -> ExportSummary:
    """Export a reviewed dataset's labels, split into ``train`` and ``val``.

    Arguments:
      dataset: a dataset built by ``review.build_dataset`` (its info names the label fields).
      target: the export folder (created; must be empty unless ``overwrite``).
      fmt: ``coco``, ``yolo`` or ``masks``.
      tags: keep only samples with at least one of these tags.
      exclude_tags: drop samples with any of these tags.
      polygons: COCO polygons instead of compressed RLE (``coco`` only).
      media: ``copy``, ``symlink`` or ``none`` (images not written).
      overwrite: replace the target folder when it holds a previous export (only).
      val_fraction: share of images in ``val``, by a hash of the file name (0: no ``val``).
      split_seed: the seed of that hash.
      split_by_tag: split by the samples' ``train``/``val`` tags instead (untagged: train).
      min_piece_area: YOLO: mask pieces with fewer pixels are dropped (the largest is kept).

    Returns:
      An ``ExportSummary``.

    Raises:
      ExportError: a bad option (``check_options``), a target that cannot be used
        (``check_target``), tag filters that select no sample (the message names the dataset's
        tags), or no selected image that can be exported.
    """
    check_options(fmt, media, val_fraction, min_piece_area)
    target = Path(target)
    info = dataset.info.get(INFO_KEY, {})
    fields = _label_fields(dataset, info)
    check_target(target, overwrite, _protected_folders(info))
    view = select_samples(dataset, tags, exclude_tags)
    if not len(view):
        raise ExportError(_nothing_selected(dataset, tags, exclude_tags))
    items, skipped = _plan(
        view, info.get("run_dir"), fmt, media, val_fraction, split_seed, split_by_tag
    )
    if not items:
        raise ExportError(
            f"nothing to export: none of the {len(skipped)} selected images can be exported "
            f"({skipped[0]})"
        )
    description = f"selfment-label export of FiftyOne dataset {dataset.name}"
    with _staging(target) as staging:
        _place_media(staging, items, fmt, media)
        if fmt == "coco":
            coco_info = _coco_info(description, info.get("input_dir"), tags, exclude_tags, polygons)
            n_masks = _write_coco(view, staging, items, fields, media, polygons, coco_info)
        elif fmt == "yolo":
            n_masks = _write_yolo(view, staging, items, fields[0], min_piece_area, description)
        else:
            n_masks = _write_masks(view, staging, items, fields)
        _write_marker(staging, fmt)
    splits = {split: sum(i.split == split for i in items.values()) for split in SPLITS}
    logger.info("exported %d images %s, %d masks to %s", len(items), splits, n_masks, target)
    return ExportSummary(target, fmt, len(items), n_masks, splits, skipped)
