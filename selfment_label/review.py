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
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .backbone import Backbone
from .coco import decode_rle, load_coco, masks_by_image
from .evaluate import load_gt_mask, load_predictions, match
from .images import decoded_image, find_images
from .masks import box_xywh
from .modes import make_segmenter
from .regions import full_size_masks
from .run import ANNOTATIONS_NAME, RUN_NAME, Labeller, RunConfig, backbone_for
from .timing import StageTimer

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

LABEL = "foreground"
PSEUDO_FIELD = "pseudo"
ENTITIES_FIELD = "entities"
PARTS_FIELD = "parts"
GT_FIELD = "ground_truth"
INFO_KEY = "selfment"
INSTALL_HINT = 'pip install -e ".[dev]" ./third_party/fiftyone-db-shim'


class ReviewError(RuntimeError):
    """A run folder cannot be reviewed (missing files, unknown dataset...)."""


class DatabaseError(ReviewError):
    """FiftyOne's database cannot be reached or started."""


def connect() -> None:
    """Start (or reach) FiftyOne's database, turning its failures into a ``DatabaseError``.

    The embedded MongoDB is used unless ``FIFTYONE_DATABASE_URI`` names a server.

    Raises:
      DatabaseError: with the reason and what to do.
    """
    import fiftyone as fo
    from fiftyone.core.config import FiftyOneConfigError
    from fiftyone.core.service import ServiceException

    # mongod 6.0 (the embedded one) is supported but FiftyOne warns about it at each connection.
    logging.getLogger("fiftyone.core.odm.database").setLevel(logging.ERROR)
    uri = fo.config.database_uri
    fix = (
        f"check that the server at FIFTYONE_DATABASE_URI={uri} is up and reachable"
        if uri
        else f"install the embedded database with `{INSTALL_HINT}`, or set "
        "FIFTYONE_DATABASE_URI to a MongoDB server of your own"
    )
    try:
        fo.list_datasets()
    except FiftyOneConfigError as error:
        raise DatabaseError(f"FiftyOne's database is not installed ({error}); {fix}") from None
    except PermissionError as error:
        raise DatabaseError(
            f"{error}; set FIFTYONE_DATABASE_DIR to a writable folder, or {fix}"
        ) from None
    except ServiceException as error:
        log = Path(fo.config.database_dir) / "log" / "mongo.log"
        raise DatabaseError(
            f"FiftyOne's embedded MongoDB did not start ({type(error).__name__}); "
            f"its log is {log}; {fix}"
        ) from None
    except (ConnectionError, RuntimeError) as error:
        raise DatabaseError(f"cannot connect to FiftyOne's database ({error}); {fix}") from None


def dataset_name(run_dir: str | Path) -> str:
    """The dataset name derived from a run folder: ``selfment-<folder>-<hash of its path>``.

    Arguments:
      run_dir: the run folder.
    """
    resolved = Path(run_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", resolved.name).strip("-") or "run"
    digest = hashlib.sha1(str(resolved).encode("utf-8")).hexdigest()[:6]
    return f"selfment-{slug}-{digest}"


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run.json, annotations.json)`` of a run folder.

    Raises:
      ReviewError: either file is missing or unreadable.
    """
    run_dir = Path(run_dir)
    try:
        with open(run_dir / RUN_NAME, encoding="utf-8") as fh:
            provenance = json.load(fh)
        coco = load_coco(run_dir / ANNOTATIONS_NAME)
    except FileNotFoundError as error:
        raise ReviewError(
            f"{run_dir} is not a finished run folder: {error.filename} missing"
        ) from None
    except (OSError, ValueError) as error:
        raise ReviewError(f"cannot read the run folder {run_dir}: {error}") from None
    if "input_dir" not in provenance:
        raise ReviewError(f"{run_dir / RUN_NAME} does not name the input folder (input_dir)")
    return provenance, coco


def label_fields(mode: str) -> list[str]:
    """The detection fields that hold a run's labels, top level first.

    Arguments:
      mode: the run's mode (``single``, ``instances`` or ``entities``).
    """
    return [ENTITIES_FIELD, PARTS_FIELD] if mode == "entities" else [PSEUDO_FIELD]


def mask_to_detection(
    mask: np.ndarray, score: float, label: str = LABEL, **attributes: Any
) -> fo.Detection:
    """A FiftyOne detection of a full-size boolean mask (box relative, mask cropped to it).

    Arguments:
      mask: ``[H, W]`` boolean mask (not empty).
      score: its confidence, stored as ``confidence``.
      label: the class label.
      attributes: extra detection attributes (``coco_id``, ``parent_id``, ``level``).
    """
    import fiftyone as fo

    height, width = mask.shape
    x, y, w, h = (int(v) for v in box_xywh(mask))
    return fo.Detection(
        label=label,
        bounding_box=[x / width, y / height, w / width, h / height],
        mask=np.ascontiguousarray(mask[y : y + h, x : x + w]),
        confidence=float(score),
        **attributes,
    )


def detection_to_mask(detection: fo.Detection, width: int, height: int) -> np.ndarray:
    """The full-size ``[height, width]`` boolean mask of a FiftyOne detection.

    The box corners are rounded to pixels; a mask whose size differs from its box (the user
    resized the box) is resized to it with nearest-neighbour sampling; a detection without a
    mask fills its box.

    Arguments:
      detection: a detection with a relative ``bounding_box`` and optional ``mask``.
      width, height: the image size.
    """
    bx, by, bw, bh = detection.bounding_box
    x0, y0 = round(bx * width), round(by * height)
    x1, y1 = round((bx + bw) * width), round((by + bh) * height)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    full = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return full
    crop = detection.get_mask()
    if crop is None:
        full[y0:y1, x0:x1] = True
        return full
    crop = np.asarray(crop).astype(bool)
    if crop.shape != (y1 - y0, x1 - x0):
        resized = Image.fromarray(crop).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST)
        crop = np.asarray(resized, dtype=bool)
    full[y0:y1, x0:x1] = crop
    return full


def _image_detections(
    annotations: list[dict[str, Any]], mode: str
) -> dict[str, list[fo.Detection]]:
    fields: dict[str, list[fo.Detection]] = {name: [] for name in label_fields(mode)}
    for ann in annotations:
        mask = decode_rle(ann["segmentation"])
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

    run_dir = Path(run_dir).resolve()
    provenance, coco = read_run(run_dir)
    mode = provenance.get("options", {}).get("mode", "single")
    input_dir = Path(provenance["input_dir"])
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
    for image, anns in masks_by_image(coco):
        filepath = str(input_dir / image["file_name"])
        if filepath in known:
            continue
        sample = fo.Sample(
            filepath=filepath,
            metadata=fo.ImageMetadata(width=int(image["width"]), height=int(image["height"])),
            file_name=image["file_name"],
        )
        for field, detections in _image_detections(anns, mode).items():
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
        "run": provenance,
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


def launch_app(dataset: fo.Dataset, port: int = 5151, address: str = "127.0.0.1") -> Any:
    """Launch the FiftyOne App on a dataset (no browser is opened).

    Arguments:
      dataset: the dataset to show.
      port: the App's port.
      address: the address the App listens on (``127.0.0.1``: this machine only).

    Returns:
      The ``fo.Session``; call ``close()`` on it to stop the App and its server.
    """
    import fiftyone as fo

    return fo.launch_app(dataset, port=port, address=address, auto=False)


def app_url(session: Any, dataset: fo.Dataset) -> str:
    """The URL of a dataset in a running App session."""
    return f"{session.url.rstrip('/')}/datasets/{dataset.name}"


def selfment_model(config: RunConfig | None = None, backbone: Backbone | None = None) -> Any:
    """A FiftyOne ``Model`` that labels images with the engine, for ``dataset.apply_model``.

    Every image becomes a ``fo.Detections`` with instance masks (``confidence`` = mask score;
    ``level`` and ``parent_id`` in ``entities`` mode):

        model = selfment_model(RunConfig(weights="dinov2_vits14.safetensors"))
        dataset.apply_model(model, label_field="selfment", batch_size=4)

    Arguments:
      config: run options (backbone, mode and its options; defaults when None).
      backbone: a ready backbone (built from ``config`` when None).
    """
    return _model_class()(config or RunConfig(), backbone)


def _model_class() -> type:
    import fiftyone.core.models as fom

    class _SelfmentFiftyOneModel(fom.Model):
        """Labels images (RGB arrays from ``apply_model``) as ``fo.Detections`` with masks."""

        def __init__(self, config: RunConfig, backbone: Backbone | None):
            if backbone is None:
                backbone = backbone_for(config)
            self.config = config
            self.labeller = Labeller(backbone, make_segmenter(config), config.precision)
            self.timer = StageTimer(backbone.device)

        @property
        def media_type(self) -> str:
            return "image"

        @property
        def ragged_batches(self) -> bool:
            # Batches are lists of arrays; predict_all groups them by patch grid itself.
            return False

        @property
        def transforms(self) -> None:
            return None

        @property
        def preprocess(self) -> bool:
            return False

        @preprocess.setter
        def preprocess(self, value: bool) -> None:
            pass

        @property
        def has_logits(self) -> bool:
            return False

        @property
        def has_embeddings(self) -> bool:
            return False

        def options(self) -> dict[str, Any]:
            """The run options and the backbone identity (for provenance)."""
            return {**asdict(self.config), **self.labeller.backbone.identity()}

        def predict(self, arg: Any) -> Any:
            return self.predict_all([arg])[0]

        def predict_all(self, args: Iterable[Any]) -> list[Any]:
            images = [_as_rgb(arg) for arg in args]
            mean, std = self.labeller.backbone.mean_std
            patch = self.labeller.backbone.patch_size
            decoded = [
                decoded_image(image, str(i), image.size, self.config.resolution, patch, mean, std)
                for i, image in enumerate(images)
            ]
            results: list[Any] = [None] * len(decoded)
            grids: dict[tuple[int, int], list[int]] = {}
            for index, item in enumerate(decoded):
                grids.setdefault(item.grid, []).append(index)
            for indices in grids.values():
                batch = [decoded[i] for i in indices]
                patch_masks = self.labeller.patch_masks(batch, self.timer)
                for index, item, masks in zip(indices, batch, patch_masks, strict=True):
                    results[index] = _detections_of(masks, item.width, item.height)
            return results

    return _SelfmentFiftyOneModel


def _as_rgb(arg: Any) -> Image.Image:
    if isinstance(arg, Image.Image):
        return arg.convert("RGB")
    array = np.asarray(arg)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array[..., :3]).convert("RGB")


def _detections_of(masks: list[Any], width: int, height: int) -> fo.Detections:
    import fiftyone as fo

    kept, _ = full_size_masks(masks, width, height)
    detections = []
    for index, region in enumerate(kept):
        attributes: dict[str, Any] = {"coco_id": index + 1}
        if "level" in region.extra:
            attributes["level"] = int(region.extra["level"])
        if region.extra.get("parent") is not None:
            attributes["parent_id"] = int(region.extra["parent"]) + 1
        detections.append(mask_to_detection(region.mask, region.score, **attributes))
    return fo.Detections(detections=detections)
