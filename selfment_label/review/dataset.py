"""Review pseudo-labels in FiftyOne: build a dataset from a run folder, launch the App, label a
dataset the user already has (a FiftyOne ``Model`` for ``dataset.apply_model``).

A run folder becomes a persistent FiftyOne dataset with one sample per labelled image (skipped
images are not samples). The masks are ``fo.Detection`` objects in a ``fo.Detections`` field:
``pseudo`` for the ``single`` and ``instances`` modes (one detection per annotation), and for
``entities`` the level-0 masks in ``entities`` and the level-1 masks in ``parts``. Every
detection keeps the run's annotation id as ``coco_id`` and its position among its image's
annotations as ``ann_index`` (unlike the id, it does not change when the run rewrites
``annotations.json`` for other images); parts keep their entity's id as ``parent_id``, so the
hierarchy survives the user's edits and the export. FiftyOne's
convention for instance masks is followed: ``bounding_box`` is ``[x, y, w, h]`` relative to the
image and ``mask`` is the boolean mask cropped to that box.

Every sample records its run folder in ``run_dir``; a dataset may hold the samples of several
runs (``apply --review --name`` adds a head's run to the dataset the head learnt from). The
dataset's info (``INFO_KEY``) describes the run that made it and keeps a fingerprint of every
run it holds (input folder, backbone identity and options: what decides the masks).

Building again after the same run labelled more images adds the new images only: samples
already there, with the user's tags and edits, are left as they are. Building again after the
run changed (``run --overwrite`` with other options or another mode) replaces the labels of
every sample of that run with the current ones (tags are kept), deletes label fields the run
no longer has, and deletes the samples of images the run no longer labels.

Every sample records the content key its image had when the run labelled it (``content_key``,
from the run's journal). When the run labelled a replaced image again (another key), the
rebuild replaces that sample's size and labels with the run's current ones, and moves its tags
to the ``tags_before_image_changed`` field: a tag is the reviewer's verdict on the picture and
mask they saw, and keeping ``approved`` on a picture nobody has looked at would export an
unreviewed mask as approved; moved, the verdict is not lost and the sample shows up again as
not reviewed. The reviewer's mask edits of the old picture are dropped (they do not fit the new
one). A sample made before samples recorded their key is taken as replaced when its size
differs from the run's.

The dataset name is recorded in the run folder's ``review.json``; it is the default for the
next ``review``, ``export`` and ``train --reviewed`` of that run. Every build sets each of the
run's samples' ``score`` (the run's best top-level mask score) and ``no_mask_reason`` (why the
run wrote no mask for the image, from its notes in ``run.json``), saves the review's views
(``views``) and its App settings unless the user saved their own (``appconfig``).

``fiftyone`` is imported inside the functions that need it, so the labelling commands do not
pay its import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.images import find_images
from ..evaluate import load_gt_mask, load_predictions, match
from ..runfolder.coco import RleError, decode_rle
from ..runfolder.journal import labelled_keys
from ..runfolder.layout import (
    ANNOTATIONS_NAME,
    RunFolder,
    is_relative_name,
    read_run,
    record_reviewing_dataset,
    reviewing_datasets,
)
from .appconfig import apply_app_config
from .convert import mask_to_detection
from .db import ReviewError, connect
from .fields import (
    ENTITIES_FIELD,
    GT_FIELD,
    INFO_KEY,
    KEY_FIELD,
    NO_MASK_FIELD,
    PARTS_FIELD,
    PSEUDO_FIELD,
    REPLACED_TAGS_FIELD,
    RUN_FIELD,
    SCORE_FIELD,
    label_fields,
)
from .views import save_review_views

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)


class NotReviewed(ReviewError):
    """No FiftyOne dataset reviews a run folder (or the one named does not exist)."""


def dataset_name(run_dir: str | Path) -> str:
    """The dataset name derived from a run folder: ``selfment-<folder>-<hash of its path>``.

    Arguments:
      run_dir: the run folder.
    """
    resolved = Path(run_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", resolved.name).strip("-") or "run"
    digest = hashlib.sha1(str(resolved).encode("utf-8")).hexdigest()[:6]
    return f"selfment-{slug}-{digest}"


def run_fingerprint(provenance: dict[str, Any]) -> str:
    """A digest of what decides a run's masks: input folder, backbone identity and options.

    Arguments:
      provenance: the run's ``run.json``.
    """
    decisive = {key: provenance.get(key) for key in ("input_dir", "backbone", "options")}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def reviewing_dataset(run_dir: str | Path) -> str | None:
    """The latest dataset recorded as reviewing a run folder, or None."""
    names = reviewing_datasets(run_dir)
    return names[-1] if names else None


def _image_detections(
    annotations: list[dict[str, Any]], mode: str, image: dict[str, Any]
) -> dict[str, list[fo.Detection]]:
    fields: dict[str, list[fo.Detection]] = {name: [] for name in label_fields(mode)}
    for index, ann in enumerate(annotations):
        try:
            mask = decode_rle(ann["segmentation"], (int(image["height"]), int(image["width"])))
        except RleError as error:
            raise ReviewError(
                f"annotation {ann.get('id')} of {image['file_name']}: {error}"
            ) from None
        if not mask.any():
            continue
        attributes: dict[str, Any] = {"coco_id": int(ann["id"]), "ann_index": index}
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


def _view_mode(run: RunFolder) -> str:
    """The mode whose review views a run gets: an instance head's run (``apply`` with an
    instance head) is reviewed like an ``instances`` run, or like an ``entities`` run when
    the head writes parts."""
    options = run.provenance.get("options", {})
    if options.get("task") != "instances":
        return run.mode
    return "entities" if options.get("parts") else "instances"


def build_dataset(
    run_dir: str | Path,
    name: str | None = None,
    gt_dir: str | Path | None = None,
    *,
    add: bool = False,
) -> fo.Dataset:
    """Build, or update in place, the persistent FiftyOne dataset of a run folder.

    New images of the run become samples; samples already in the dataset keep their tags,
    labels and edits while the run is the same (same fingerprint); when the run changed,
    their labels are replaced by the run's current ones (tags kept), label fields the run
    no longer has are deleted, and samples of images the run no longer labels are deleted.
    With ``gt_dir``, samples without ground truth get it in the ``ground_truth`` field. The
    dataset name is recorded in the run's ``review.json``; the review fields, views and App
    settings are set (see the module's docstring). A sample whose image the run labelled again
    since gets the new labels (its tags move to a field, see the module's docstring). A build
    that fails on a dataset it created deletes it, so nothing half-built is left.

    Arguments:
      run_dir: a finished run folder (annotations.json and run.json).
      name: the dataset name (default: the latest recorded in the run's ``review.json``,
        else ``dataset_name(run_dir)``).
      gt_dir: optional folder of ground-truth mask images (foreground = gray > 127).
      add: allow adding the run to a dataset made from another run (same label fields).

    Returns:
      The dataset.

    Raises:
      ReviewError: the run folder cannot be read, names an image outside its input folder,
        or the name belongs to another run (and ``add`` is false, or its label fields differ).
      DatabaseError: the database cannot be reached.
    """
    import fiftyone as fo

    run = read_run(Path(run_dir).resolve())
    name = name or reviewing_dataset(run.path) or dataset_name(run.path)
    _check_file_names(run)
    connect()
    created = not fo.dataset_exists(name)
    if created:
        dataset, info = fo.Dataset(name, persistent=True), {}
    else:
        dataset = fo.load_dataset(name)
        info = dict(dataset.info.get(INFO_KEY, {}))
        _check_owner(name, info, run, add)
    try:
        _update(dataset, run, info, Path(gt_dir) if gt_dir else None)
    except BaseException:
        if created:  # a failed first build leaves nothing behind
            dataset.delete()
        raise
    return dataset


def _check_owner(name: str, info: dict[str, Any], run: RunFolder, add: bool) -> None:
    """Refuse to put a run into a dataset another run made, unless ``add`` and the label
    fields are the same.

    Raises:
      ReviewError: the dataset belongs to another run (and ``add`` is false, or its label
        fields differ).
    """
    owner, fields = info.get("run_dir"), label_fields(run.mode)
    if owner == str(run.path):
        return
    if not add:
        raise ReviewError(
            f"dataset {name!r} belongs to {owner or 'something else'}, not {run.path}",
            remedy="name",
        )
    if info.get("label_fields") != fields:
        raise ReviewError(
            f"dataset {name!r} holds labels in {info.get('label_fields')}, this run's are "
            f"in {fields}",
            remedy="name",
        )


def _check_file_names(run: RunFolder) -> None:
    """Refuse a run whose annotations name an image outside its input folder.

    Raises:
      ReviewError: a ``file_name`` is absolute or holds ``..`` (not written by ``run``).
    """
    for image in run.coco.get("images", []):
        if not is_relative_name(image.get("file_name")):
            raise ReviewError(
                f"{run.path / ANNOTATIONS_NAME} names the image {image.get('file_name')!r}, "
                "which is not a path inside the run's input folder: the file was not written "
                "by `selfment-label run`; label the images again"
            )


_Images = dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]
"""A run's labelled images by sample file path: (COCO image entry, its annotations)."""


def _update(dataset: fo.Dataset, run: RunFolder, info: dict[str, Any], gt_dir: Path | None) -> None:
    """Bring a run's samples, fields, info, views and App settings up to date (see
    ``build_dataset``); ``info`` is the dataset's selfment info as it was (empty: new)."""
    fingerprint = run_fingerprint(run.provenance)
    current = {
        str(run.input_dir / image["file_name"]): (image, anns) for image, anns in run.images()
    }
    keys = {
        str(run.input_dir / file_name): json.dumps(key)
        for file_name, key in labelled_keys(run.path).items()
    }
    _refresh_samples(dataset, run, info, fingerprint, current, keys)
    gt = _gt_detections(run.path, gt_dir) if gt_dir else {}
    added = _add_new_samples(dataset, run, current, keys, gt)
    if gt:
        _fill_missing_gt(dataset, run.input_dir, gt)
    _set_review_fields(dataset, run, current)
    _save_info(dataset, run, info, fingerprint)
    save_review_views(dataset, _view_mode(run))
    record_reviewing_dataset(run.path, dataset.name)
    logger.info("dataset %s: %d new samples, %d in all", dataset.name, added, len(dataset))


def _refresh_samples(
    dataset: fo.Dataset,
    run: RunFolder,
    info: dict[str, Any],
    fingerprint: str,
    current: _Images,
    keys: dict[str, str],
) -> None:
    """Bring the samples the dataset already has of a run up to date: claim the samples of
    older builds, relabel them all when the run changed, replace those whose image changed."""
    runs = info.get("runs", {})
    if not runs and info.get("run_dir") == str(run.path):
        _claim_unowned_samples(dataset, run.path)
    if runs.get(str(run.path), fingerprint) != fingerprint:
        fields = label_fields(run.mode)
        stale = [f for f in info.get("label_fields", []) if f not in fields]
        _relabel(dataset, run.path, current, run.mode, stale)
    _replace_changed(dataset, run.path, current, run.mode, keys)


def _add_new_samples(
    dataset: fo.Dataset,
    run: RunFolder,
    current: _Images,
    keys: dict[str, str],
    gt: dict[str, fo.Detections],
) -> int:
    """Add a sample for each image of the run the dataset does not have yet; the ground truth
    given to one is taken out of ``gt``. Returns how many were added."""
    import fiftyone as fo

    known = set(dataset.values("filepath"))
    samples = []
    for filepath, (image, anns) in current.items():
        if filepath in known:
            continue
        sample = fo.Sample(
            filepath=filepath,
            file_name=image["file_name"],
            **{RUN_FIELD: str(run.path), KEY_FIELD: keys.get(filepath)},
        )
        _set_labels(sample, image, anns, run.mode)
        if image["file_name"] in gt:
            sample[GT_FIELD] = gt.pop(image["file_name"])
        samples.append(sample)
    if samples:
        dataset.add_samples(samples, progress=False)
    return len(samples)


def _save_info(dataset: fo.Dataset, run: RunFolder, info: dict[str, Any], fingerprint: str) -> None:
    """Record the run in the dataset's info (the run that made it is described in full; every
    run's fingerprint is kept) and apply the App settings."""
    run_dir = str(run.path)
    if info.get("run_dir", run_dir) == run_dir:
        info.update(
            run_dir=run_dir,
            input_dir=str(run.input_dir),
            mode=run.mode,
            label_fields=label_fields(run.mode),
            run=run.provenance,
        )
    info["runs"] = {**info.get("runs", {}), run_dir: fingerprint}
    apply_app_config(dataset, info)
    dataset.info[INFO_KEY] = info
    dataset.save()


def no_mask_reason(image: dict[str, Any], notes: dict[str, Any]) -> str:
    """Why a run wrote no mask for an image: its segmenter's notes, or the general reason.

    Arguments:
      image: the image's COCO entry (its ``notes``, when the run recorded some there).
      notes: the segmenter's notes about the image from ``run.json``'s ``image_notes``.
    """
    found = {**image.get("notes", {}), **notes}
    if found:
        return "; ".join(f"{key}: {value}" for key, value in found.items())
    return "the run kept no mask (none passed the mode's minimum area and score)"


def _set_review_fields(
    dataset: fo.Dataset,
    run: RunFolder,
    current: _Images,
) -> None:
    """Set ``score`` (best top-level mask score) and ``no_mask_reason`` on the run's samples."""
    import fiftyone as fo

    for field, kind in ((SCORE_FIELD, fo.FloatField), (NO_MASK_FIELD, fo.StringField)):
        if not dataset.has_sample_field(field):
            dataset.add_sample_field(field, kind)
    notes = run.provenance.get("image_notes", {})
    scores: dict[str, float | None] = {}
    reasons: dict[str, str | None] = {}
    for filepath, (image, anns) in current.items():
        top = [a["score"] for a in anns if int(a.get("level", 0)) == 0]
        scores[filepath] = max(top) if top else None
        reasons[filepath] = (
            None if anns else no_mask_reason(image, notes.get(image["file_name"], {}))
        )
    present = set(dataset.values("filepath"))
    scores = {path: value for path, value in scores.items() if path in present}
    reasons = {path: value for path, value in reasons.items() if path in present}
    if scores:
        dataset.set_values(SCORE_FIELD, scores, key_field="filepath")
        dataset.set_values(NO_MASK_FIELD, reasons, key_field="filepath")


def _claim_unowned_samples(dataset: fo.Dataset, run_dir: Path) -> None:
    """Name ``run_dir`` as the run of samples built before samples named their run."""
    unowned = dataset.exists(RUN_FIELD, False) if dataset.has_sample_field(RUN_FIELD) else dataset
    if len(unowned):
        unowned.set_values(RUN_FIELD, [str(run_dir)] * len(unowned))


def _relabel(
    dataset: fo.Dataset,
    run_dir: Path,
    current: _Images,
    mode: str,
    stale: list[str],
) -> None:
    """Give a changed run's samples its current labels; delete the samples it no longer has."""
    from fiftyone import ViewField as F

    view = dataset.match(F(RUN_FIELD) == str(run_dir))
    gone = view.match(~F("filepath").is_in(list(current)))
    if len(gone):
        logger.info("deleting %d samples the run no longer labels", len(gone))
        dataset.delete_samples(gone)
    for field in stale:
        if dataset.has_sample_field(field):
            dataset.delete_sample_field(field)
    for sample in view.iter_samples(autosave=True, progress=False):
        _set_labels(sample, *current[sample.filepath], mode)


def _set_labels(
    sample: fo.Sample, image: dict[str, Any], anns: list[dict[str, Any]], mode: str
) -> None:
    """Give a sample the run's size and labels of its image."""
    import fiftyone as fo

    sample.metadata = fo.ImageMetadata(width=int(image["width"]), height=int(image["height"]))
    for field, detections in _image_detections(anns, mode, image).items():
        sample[field] = fo.Detections(detections=detections)


def _replace_changed(
    dataset: fo.Dataset,
    run_dir: Path,
    current: _Images,
    mode: str,
    keys: dict[str, str],
) -> None:
    """Replace the samples whose image the run labelled again since (see the module's
    docstring: size and labels replaced, tags moved), and record every sample's content key."""
    import fiftyone as fo
    from fiftyone import ViewField as F

    if not dataset.has_sample_field(KEY_FIELD):
        dataset.add_sample_field(KEY_FIELD, fo.StringField)
    if not dataset.has_sample_field(REPLACED_TAGS_FIELD):
        dataset.add_sample_field(REPLACED_TAGS_FIELD, fo.ListField, subfield=fo.StringField)
    view = dataset.match(F(RUN_FIELD) == str(run_dir)).select_by("filepath", list(current))
    changed = []
    for sample_id, path, stored, width, height in zip(
        *view.values(["id", "filepath", KEY_FIELD, "metadata.width", "metadata.height"]),
        strict=True,
    ):
        image, key = current[path][0], keys.get(path)
        if stored is None:
            replaced = (width, height) != (int(image["width"]), int(image["height"]))
        else:
            replaced = key is not None and stored != key
        if replaced:
            changed.append(sample_id)
    if changed:
        logger.warning(
            "%d image(s) changed since they were reviewed: their labels are the run's new ones "
            "and their tags moved to the field %r (review them again)",
            len(changed),
            REPLACED_TAGS_FIELD,
        )
    for sample in dataset.select(changed).iter_samples(autosave=True, progress=False):
        sample[REPLACED_TAGS_FIELD] = list(sample.tags)
        sample.tags = []
        _set_labels(sample, *current[sample.filepath], mode)
    present = {path: keys[path] for path in view.values("filepath") if path in keys}
    if present:
        dataset.set_values(KEY_FIELD, present, key_field="filepath")


def _fill_missing_gt(dataset: fo.Dataset, input_dir: Path, gt: dict[str, fo.Detections]) -> None:
    by_path = {str(input_dir / file_name): labels for file_name, labels in gt.items()}
    view = dataset.select_by("filepath", list(by_path))
    for sample in view.iter_samples(autosave=True, progress=False):
        if dataset.has_sample_field(GT_FIELD) and sample[GT_FIELD] is not None:
            continue
        sample[GT_FIELD] = by_path[sample.filepath]


def load_run_dataset(
    run_dir: str | Path, name: str | None = None, unreviewed: bool = False
) -> fo.Dataset:
    """The FiftyOne dataset that reviews a run folder.

    Arguments:
      run_dir: the run folder.
      name: the dataset name (default: the latest recorded in the run's ``review.json``).
      unreviewed: build the dataset from the run when it does not exist (default: refuse).

    Raises:
      NotReviewed: no such dataset and ``unreviewed`` is false.
    """
    import fiftyone as fo

    connect()
    name = name or reviewing_dataset(run_dir)
    if name and fo.dataset_exists(name):
        return fo.load_dataset(name)
    if unreviewed:
        logger.info("building the dataset of %s from the run, unreviewed", run_dir)
        return build_dataset(run_dir, name)
    if name:
        raise NotReviewed(
            f"FiftyOne dataset {name!r} does not exist",
            remedy="review_named",
            context={"run_dir": str(run_dir), "name": name},
        )
    raise NotReviewed(
        f"no FiftyOne dataset reviews {run_dir} yet",
        remedy="review",
        context={"run_dir": str(run_dir)},
    )
