"""Pseudo-label quality against ground-truth masks, through ``pysodmetrics``.

Predictions come from a run folder: for every image, its saved soft score map when the run
wrote one (``--save-scores``), else the union of its annotation masks. Ground-truth mask
images are matched by relative path without extension (or with the image's own extension, as
``export --format masks`` names ``a.jpg.png`` beside ``a.png.png``), with the file stem as
fallback (see ``match``);
foreground is ``gray > 127`` whatever the mask's mode (1-bit, 8-bit, RGB, palette).

The metrics follow the salient-object-detection conventions and are computed by
``pysodmetrics`` alone: maxF / mean F / adaptive F with beta^2 = 0.3 (F averaged over images
at each of 256 thresholds, then the max or the mean of that curve), IoU and pixel accuracy at
0.5, S-measure, max / mean E-measure, weighted F and MAE. Predictions are passed as
probabilities in [0, 1] without min-max stretching, so "at 0.5" is the same threshold the
engine cut its masks at.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import py_sod_metrics as sod
from PIL import Image
from scipy import ndimage

from .data.images import IMAGE_EXTENSIONS, find_images
from .errors import SelfmentError
from .runfolder.layout import RunFolderError, read_run, union_mask

logger = logging.getLogger(__name__)

GT_THRESHOLD = 127
BETA2 = 0.3
METRIC_NAMES = (
    "max_f",
    "mean_f",
    "adaptive_f",
    "iou",
    "accuracy",
    "s_measure",
    "max_e",
    "mean_e",
    "weighted_f",
    "mae",
)
BOUNDARY_TOLERANCE = 3
"""Pixels within which a boundary pixel counts as matched by ``boundary_f_measure``."""
ROW_METRICS = ("iou", "accuracy", "max_f", "s_measure", "max_e", "weighted_f", "mae")


class EvalError(SelfmentError, RuntimeError):
    """The run folder or the ground-truth folder cannot be evaluated."""


@dataclass
class Prediction:
    """Where one image's prediction comes from.

    Arguments:
      file_name: the image path relative to the run's input folder.
      width, height: size of the image as displayed.
      score_map: absolute path of the saved soft score map, if any.
      annotations: the image's COCO annotations (used when there is no score map).
    """

    file_name: str
    width: int
    height: int
    score_map: Path | None
    annotations: list[dict[str, Any]]

    @property
    def source(self) -> str:
        """``score_map`` or ``masks``."""
        return "score_map" if self.score_map is not None else "masks"

    def load(self) -> np.ndarray:
        """``[H, W]`` float64 foreground probability in [0, 1].

        Raises:
          ValueError: the score map is missing, unreadable or of the wrong size.
        """
        if self.score_map is None:
            try:
                union = union_mask(self.width, self.height, self.annotations, self.file_name)
            except RunFolderError as error:
                raise ValueError(str(error)) from None
            return union.astype(np.float64)
        try:
            with Image.open(self.score_map) as image:
                array = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read score map {self.score_map}: {error}") from None
        if array.shape != (self.height, self.width):
            raise ValueError(
                f"score map {self.score_map} is {array.shape[1]}x{array.shape[0]}, "
                f"the image is {self.width}x{self.height}"
            )
        return array


@dataclass
class ImageResult:
    """One ground-truth image's row of the per-image table.

    Arguments:
      name: the matching key (relative path without extension).
      gt_file: ground-truth file relative to the GT folder.
      prediction: the predicted image's file name, or None when the run has no prediction.
      source: ``score_map``, ``masks``, ``empty`` (no prediction) or ``error``.
      metrics: per-image metrics (``ROW_METRICS``); empty on error.
      error: why the image could not be evaluated.
    """

    name: str
    gt_file: str
    prediction: str | None
    source: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class EvalReport:
    """The outcome of an evaluation.

    Arguments:
      metrics: dataset metrics (``METRIC_NAMES``) over the evaluated images.
      evaluated: ground-truth images that entered the metrics.
      gt_without_prediction: GT files with no prediction (evaluated as empty masks).
      predictions_without_gt: predicted file names with no GT mask (not evaluated).
      errors: GT file -> reason, for images left out of the metrics (size mismatch...).
      rows: one ``ImageResult`` per GT image.
    """

    metrics: dict[str, float]
    evaluated: int
    gt_without_prediction: list[str]
    predictions_without_gt: list[str]
    errors: dict[str, str]
    rows: list[ImageResult]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-image rows)."""
        return {
            "metrics": self.metrics,
            "images_evaluated": self.evaluated,
            "gt_without_prediction": len(self.gt_without_prediction),
            "predictions_without_gt": len(self.predictions_without_gt),
            "errors": self.errors,
            "prediction_sources": {
                source: sum(r.source == source for r in self.rows)
                for source in ("score_map", "masks", "empty")
            },
        }


class SodMetrics:
    """Accumulates the salient-object-detection metrics of ``pysodmetrics`` image by image."""

    def __init__(self) -> None:
        # the handlers are kept here too: their per-image results are read after each step
        self.handlers = {
            "f": sod.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=BETA2),
            "iou": sod.IOUHandler(with_dynamic=False, with_adaptive=False, with_binary=True),
            "accuracy": sod.OverallAccuracyHandler(
                with_dynamic=False, with_adaptive=False, with_binary=True
            ),
        }
        self.binary = sod.FmeasureV2(self.handlers)
        self.s_measure = sod.Smeasure()
        self.e_measure = sod.Emeasure()
        self.weighted_f = sod.WeightedFmeasure()
        self.mae = sod.MAE()
        self.count = 0

    def step(self, prediction: np.ndarray, gt: np.ndarray) -> dict[str, float]:
        """Add one image and return its own metrics.

        Arguments:
          prediction: ``[H, W]`` float foreground probability in [0, 1].
          gt: ``[H, W]`` boolean ground truth.

        Returns:
          The image's ``ROW_METRICS``.
        """
        prediction = np.clip(prediction.astype(np.float64), 0.0, 1.0)
        gt = gt.astype(bool)
        self.binary.step(prediction, gt, normalize=False)
        for metric in (self.s_measure, self.e_measure, self.weighted_f, self.mae):
            metric.step(prediction, gt, normalize=False)
        self.count += 1
        handlers = self.handlers
        return {
            "iou": float(handlers["iou"].binary_results[-1]),
            "accuracy": float(handlers["accuracy"].binary_results[-1]),
            "max_f": float(np.max(handlers["f"].dynamic_results[-1])),
            "s_measure": float(self.s_measure.sms[-1]),
            "max_e": float(np.max(self.e_measure.changeable_ems[-1])),
            "weighted_f": float(self.weighted_f.weighted_fms[-1]),
            "mae": float(self.mae.maes[-1]),
        }

    def results(self) -> dict[str, float]:
        """Dataset metrics (``METRIC_NAMES``); NaN when no image was added."""
        if self.count == 0:
            return dict.fromkeys(METRIC_NAMES, float("nan"))
        binary = self.binary.get_results()
        f_curve = binary["f"]["dynamic"]
        e_curve = self.e_measure.get_results()["em"]["curve"]
        return {
            "max_f": float(f_curve.max()),
            "mean_f": float(f_curve.mean()),
            "adaptive_f": float(binary["f"]["adaptive"]),
            "iou": float(binary["iou"]["binary"]),
            "accuracy": float(binary["accuracy"]["binary"]),
            "s_measure": float(self.s_measure.get_results()["sm"]),
            "max_e": float(e_curve.max()),
            "mean_e": float(e_curve.mean()),
            "weighted_f": float(self.weighted_f.get_results()["wfm"]),
            "mae": float(self.mae.get_results()["mae"]),
        }


def load_gt_mask(path: str | Path) -> np.ndarray:
    """Boolean ``[H, W]`` foreground of a mask image: gray value > 127.

    Arguments:
      path: a 1-bit, 8-bit, palette or RGB(A) mask image.

    Raises:
      ValueError: the file cannot be read as an image.
    """
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read ground-truth mask {path}: {error}") from None
    return gray > GT_THRESHOLD


def _key(file_name: str) -> str:
    return str(PurePosixPath(file_name).with_suffix(""))


def _stem(file_name: str) -> str:
    return PurePosixPath(file_name).stem


def load_predictions(run_dir: str | Path, use_score_maps: bool = True) -> list[Prediction]:
    """The predictions of a run folder, one per labelled image.

    Arguments:
      run_dir: a folder holding ``annotations.json`` (written by ``run`` or ``apply``).
      use_score_maps: use the soft score maps the run saved (else the binary masks).

    Raises:
      RunFolderError: the folder or its annotations.json is missing or not COCO.
    """
    run = read_run(run_dir, require_provenance=False)
    predictions = []
    for image, anns in run.images():
        predictions.append(
            Prediction(
                file_name=image["file_name"],
                width=int(image["width"]),
                height=int(image["height"]),
                score_map=run.score_map(image) if use_score_maps else None,
                annotations=anns,
            )
        )
    return predictions


def match(
    predictions: list[Prediction], gt_files: list[str]
) -> tuple[list[tuple[str, Prediction | None]], list[str]]:
    """Pair ground-truth files with predictions.

    First exactly as ``export --format masks`` names a mask when two images differ only by
    extension: the GT file without its extension is the image's file name (``a.jpg.png`` for
    ``a.jpg``); then by relative path without extension, where that names one prediction only
    (``a.png`` is ambiguous beside ``a.jpg`` and ``a.png``); then the remaining ones by file
    stem when the stem is unique among the remaining predictions and the remaining GT files.
    Every prediction left unpaired is listed, never dropped.

    Returns:
      ``([(gt file, prediction or None)] in GT order, prediction file names with no GT)``.
    """
    left = {p.file_name: p for p in predictions}
    paired: dict[str, Prediction] = {}
    for gt in gt_files:
        if _key(gt) in left:
            paired[gt] = left.pop(_key(gt))
    for key_of in (_key, _stem):
        gts = _group([g for g in gt_files if g not in paired], key_of)
        candidates = _group(list(left), key_of)
        for key, group in gts.items():
            if len(group) == 1 and len(candidates.get(key, [])) == 1:
                paired[group[0]] = left.pop(candidates[key][0])
    return [(gt, paired.get(gt)) for gt in gt_files], sorted(left)


def _group(names: list[str], key_of: Callable[[str], str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(key_of(name), []).append(name)
    return groups


def _evaluate_one(
    metrics: SodMetrics, gt_dir: Path, gt_file: str, prediction: Prediction | None
) -> ImageResult:
    name = _key(gt_file)
    pred_name = prediction.file_name if prediction else None
    try:
        gt = load_gt_mask(gt_dir / gt_file)
        if prediction is None:
            scores = np.zeros(gt.shape, dtype=np.float64)
            source = "empty"
        else:
            if (prediction.height, prediction.width) != gt.shape:
                raise ValueError(
                    f"size mismatch: ground truth is {gt.shape[1]}x{gt.shape[0]}, "
                    f"the image {prediction.file_name} is {prediction.width}x{prediction.height}"
                )
            scores = prediction.load()
            source = prediction.source
    except ValueError as error:
        return ImageResult(name, gt_file, pred_name, "error", error=str(error))
    row = metrics.step(scores, gt)
    return ImageResult(name, gt_file, pred_name, source, metrics=row)


def evaluate_run(
    run_dir: str | Path,
    gt_dir: str | Path,
    use_score_maps: bool = True,
    progress: Callable[[int, int, ImageResult], None] | None = None,
) -> EvalReport:
    """Evaluate a run folder against a folder of ground-truth masks.

    Arguments:
      run_dir: the run folder (``annotations.json``, optional ``scores/``).
      gt_dir: folder of ground-truth mask images (searched recursively).
      use_score_maps: use saved soft score maps where the run has them.
      progress: called after every GT image with ``(done, total, its result)``.

    Returns:
      An ``EvalReport``.

    Raises:
      EvalError: a folder is missing, or the GT folder holds no mask images.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise EvalError(f"ground-truth folder not found: {gt_dir}")
    predictions = load_predictions(run_dir, use_score_maps)
    gt_files = find_images(gt_dir)
    if not gt_files:
        extensions = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise EvalError(f"no ground-truth mask images under {gt_dir} (looked for {extensions})")
    pairs, unmatched = match(predictions, gt_files)
    metrics = SodMetrics()
    rows = []
    for gt_file, prediction in pairs:
        row = _evaluate_one(metrics, gt_dir, gt_file, prediction)
        if row.error:
            logger.warning("%s: %s", gt_file, row.error)
        rows.append(row)
        if progress:
            progress(len(rows), len(pairs), row)
    return EvalReport(
        metrics=metrics.results(),
        evaluated=metrics.count,
        gt_without_prediction=[r.gt_file for r in rows if r.source == "empty"],
        predictions_without_gt=unmatched,
        errors={r.gt_file: r.error for r in rows if r.error},
        rows=rows,
    )


def per_image_csv(report: EvalReport) -> str:
    """The per-image table as CSV text (one row per ground-truth image)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "gt_file", "prediction", "source", *ROW_METRICS, "error"])
    for row in report.rows:
        values = [f"{row.metrics[m]:.6f}" if m in row.metrics else "" for m in ROW_METRICS]
        writer.writerow(
            [row.name, row.gt_file, row.prediction or "", row.source, *values, row.error or ""]
        )
    return buffer.getvalue()


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a mask: the mask minus its 3x3 erosion."""
    eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    return mask & ~eroded


def boundary_f_measure(
    prediction: np.ndarray, gt: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE
) -> float:
    """Boundary F-measure of a binary mask (Csurka et al. 2013; DAVIS's contour accuracy F).

    pysodmetrics has no boundary measure. Precision is the share of the prediction's
    boundary pixels within ``tolerance`` pixels (Euclidean) of a ground-truth boundary pixel,
    recall the reverse; F is their harmonic mean. Two empty boundaries score 1, one empty
    boundary 0.

    Arguments:
      prediction: ``[H, W]`` boolean mask.
      gt: ``[H, W]`` boolean ground truth.
      tolerance: matching distance in pixels.
    """
    predicted, true = _boundary(prediction.astype(bool)), _boundary(gt.astype(bool))
    if not predicted.any() or not true.any():
        return float(predicted.any() == true.any())
    precision = float((ndimage.distance_transform_edt(~true)[predicted] <= tolerance).mean())
    recall = float((ndimage.distance_transform_edt(~predicted)[true] <= tolerance).mean())
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)
