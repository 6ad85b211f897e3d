"""The work of a Ray Data run, stage by stage: what runs in Ray's tasks and actors.

Every stage takes and returns a batch of rows as columns of numpy arrays (Ray Data's
``numpy`` batch format). A row that failed keeps its ``error`` (the skip reason) and travels
on untouched, so the driver journals every image, labelled or skipped. Nothing here imports
Ray: these are plain functions and one class, testable alone, that Ray calls remotely.

    file_name -> read_images (CPU task) -> decode_images (CPU task) -> LabelActor (pool) -> row
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..data.batching import batches_by_grid
from ..data.images import (
    DecodedImage,
    ImageReader,
    ImageSkip,
    decode_image_bytes,
    decoded_image,
    draft_side,
)
from ..device import resolve_device
from ..engine import FinishedImage, Labeller
from ..features.backbone import Backbone
from ..timing import StageTimer

Batch = dict[str, np.ndarray]


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-D object column (bytes and str stay scalars, whatever their lengths)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _names(batch: Batch) -> list[str]:
    return [str(name) for name in batch["file_name"]]


def _timed(work: Callable[[], Any]) -> tuple[Any, str, float]:
    """``(result or None, skip reason or "", seconds)`` of one image's work."""
    start = time.perf_counter()
    try:
        result, error = work(), ""
    except ImageSkip as skip:
        result, error = None, str(skip) or type(skip).__name__
    return result, error, time.perf_counter() - start


def read_images(batch: Batch, reader: ImageReader) -> Batch:
    """Read each image's bytes (``data``); an unreadable one gets its ``error``."""
    names = _names(batch)
    data, errors, seconds = [], [], []
    for name in names:
        content, error, spent = _timed(lambda name=name: reader.read(name))
        data.append(content or b"")
        errors.append(error)
        seconds.append(spent)
    return {
        "file_name": _objects(names),
        "data": _objects(data),
        "error": _objects(errors),
        "read_seconds": np.asarray(seconds, dtype=np.float64),
    }


@dataclass(frozen=True)
class DecodeSettings:
    """How an image becomes backbone input (the backbone's grid and normalisation).

    Arguments:
      resolution: pixels on the long side.
      patch_size: the backbone's patch size.
      mean, std: its normalisation.
      max_pixels: larger images are skipped as decompression bombs.
      guide_side: keep the RGB image, its long side at most this, to guide the edge
        refinement (None: no refinement, no guide).
      zoom: also make the four corner crops of this fraction of each side (None: none).
      thin: also make a thin image's ``thin_views`` (``Labeller.picks_grid``).
    """

    resolution: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int
    guide_side: int | None = None
    zoom: float | None = None
    thin: bool = False


def decode_images(batch: Batch, settings: DecodeSettings) -> Batch:
    """Decode, resize to the patch grid and normalise each image read (CPU tasks).

    Pixels travel as float32 bytes with their grid, since grids differ from image to image
    (a zoomed run's corner crops too, on the same grid: empty bytes without zoom; a thin
    image's other grids as their pixels one after the other and their ``[n, 2]`` grids:
    empty bytes for an image that has none).
    """
    names = _names(batch)
    keys = ("pixels", "zoom_pixels", "thin_pixels", "thin_grids", "guide")
    keys += ("width", "height", "rows", "cols", "error")
    columns: dict[str, list[Any]] = {key: [] for key in (*keys, "decode_seconds")}
    guides: list[tuple[int, int]] = []
    for name, data, error in zip(names, batch["data"], batch["error"], strict=True):
        item: DecodedImage | None = None
        spent = 0.0
        if not error:

            def decode(name: str = name, data: bytes = data) -> DecodedImage:
                draft = draft_side(settings.resolution, settings.zoom)
                image, size = decode_image_bytes(data, settings.max_pixels, draft)
                return decoded_image(
                    image,
                    name,
                    size,
                    settings.resolution,
                    settings.patch_size,
                    settings.mean,
                    settings.std,
                    guide_side=settings.guide_side,
                    zoom=settings.zoom,
                    thin=settings.thin,
                )

            item, error, spent = _timed(decode)
        columns["error"].append(str(error))
        columns["decode_seconds"].append(spent)
        columns["pixels"].append(item.pixels.tobytes() if item else b"")
        crops = item.zoom_pixels if item else None
        columns["zoom_pixels"].append(crops.tobytes() if crops is not None else b"")
        views = item.thin_views if item else []
        columns["thin_pixels"].append(b"".join(view.tobytes() for view in views))
        grids = [view.shape[1:] for view in views]
        columns["thin_grids"].append(np.asarray(grids, dtype=np.int64).tobytes())
        guide = item.guide if item else None
        columns["guide"].append(guide.tobytes() if guide is not None else b"")
        guides.append(guide.shape[:2] if guide is not None else (0, 0))
        columns["width"].append(item.width if item else 0)
        columns["height"].append(item.height if item else 0)
        columns["rows"].append(item.grid[0] if item else 0)
        columns["cols"].append(item.grid[1] if item else 0)
    return {
        "file_name": _objects(names),
        "read_seconds": np.asarray(batch["read_seconds"], dtype=np.float64),
        "pixels": _objects(columns.pop("pixels")),
        "zoom_pixels": _objects(columns.pop("zoom_pixels")),
        "thin_pixels": _objects(columns.pop("thin_pixels")),
        "thin_grids": _objects(columns.pop("thin_grids")),
        "guide": _objects(columns.pop("guide")),
        "guide_shape": np.asarray(guides, dtype=np.int64).reshape(-1, 2),
        "error": _objects(columns.pop("error")),
        **{key: np.asarray(values) for key, values in columns.items()},
    }


def labeller_on(labeller: Labeller, device: torch.device) -> Labeller:
    """The same labeller with its model (and a segmenter's own modules) on ``device``.

    A segmenter that holds weights (the distilled head) moves them with its ``to(device)``;
    the label-free segmenters hold none and run where the tokens are.
    """
    backbone = labeller.backbone
    moved = Backbone(
        model=backbone.model.to(device),
        preset=backbone.preset,
        weights_file=backbone.weights_file,
        weights_sha256=backbone.weights_sha256,
    )
    segmenter = labeller.segmenter
    to_device = getattr(segmenter, "to", None)
    segmenter = to_device(device) if to_device else segmenter
    return Labeller(moved, segmenter, labeller.precision, labeller.refine, labeller.zoom)


def _guide(data: bytes, shape: np.ndarray) -> np.ndarray | None:
    """The refinement guide carried as bytes (None when the run does not refine)."""
    if not data:
        return None
    height, width = (int(side) for side in shape)
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def _thin_views(data: bytes, grids: bytes) -> list[np.ndarray]:
    """A thin image's other views carried as bytes (``decode_images``): one ``[3, H, W]``
    float32 array (a writable copy) per ``(H, W)`` pixel size."""
    pixels = np.frombuffer(data, dtype=np.float32)
    views, start = [], 0
    for height, width in np.frombuffer(grids, dtype=np.int64).reshape(-1, 2):
        size = 3 * int(height) * int(width)
        views.append(pixels[start : start + size].reshape(3, int(height), int(width)).copy())
        start += size
    return views


class LabelActor:
    """One model replica of the pool: backbone + segmenter (or head) -> journal-ready rows.

    Arguments:
      labeller: the driver's labeller (shipped on the CPU).
      device: ``auto``, ``cpu`` or ``cuda[:N]``, resolved where the actor runs.
      threads: torch CPU threads of this actor's process (None: Ray's default).
      save_scores: also return each image's score map as PNG bytes.
      batch_size: most images of one patch grid per backbone call.
    """

    def __init__(
        self,
        labeller: Labeller,
        device: str,
        threads: int | None,
        save_scores: bool,
        batch_size: int,
    ):
        if threads:
            torch.set_num_threads(threads)  # this actor's own process, nobody else's state
        self.labeller = labeller_on(labeller, resolve_device(device))
        self.save_scores = save_scores
        self.batch_size = batch_size

    def __call__(self, batch: Batch) -> Batch:
        """Label the decoded rows of ``batch``; failed rows pass through with their error."""
        names = _names(batch)
        patch = self.labeller.backbone.patch_size
        stream = []
        for i, name in enumerate(names):
            if batch["error"][i]:
                continue
            rows, cols = int(batch["rows"][i]), int(batch["cols"][i])
            pixels = np.frombuffer(batch["pixels"][i], dtype=np.float32)
            crops = np.frombuffer(batch["zoom_pixels"][i], dtype=np.float32)
            item = DecodedImage(
                file_name=name,
                width=int(batch["width"][i]),
                height=int(batch["height"][i]),
                pixels=pixels.reshape(3, rows * patch, cols * patch),
                grid=(rows, cols),
                decode_seconds=float(batch["decode_seconds"][i]),
                guide=_guide(batch["guide"][i], batch["guide_shape"][i]),
                zoom_pixels=crops.reshape(-1, 3, rows * patch, cols * patch)
                if crops.size
                else None,
                thin_views=_thin_views(batch["thin_pixels"][i], batch["thin_grids"][i]),
            )
            stream.append((name, item))
        timer = StageTimer(self.labeller.device)
        finished: dict[str, FinishedImage] = {}
        for group, _ in batches_by_grid(stream, self.batch_size, window=max(1, len(stream))):
            for image in self.labeller.label(group, timer, self.save_scores):
                finished[image.file_name] = image
        share = {k: v / len(finished) for k, v in timer.seconds.items()} if finished else {}
        records, scores, stages = [], [], []
        for i, name in enumerate(names):
            image = finished.get(name)
            spent = {"read": float(batch["read_seconds"][i])}
            spent["decode"] = float(batch["decode_seconds"][i])
            if image is not None:
                spent.update(share)
                fields = asdict(image)
                scores.append(fields.pop("score_png") or b"")
                records.append(json.dumps(fields))
            else:
                scores.append(b"")
                records.append("")
            stages.append(json.dumps(spent))
        return {
            "file_name": _objects(names),
            "error": _objects([str(e) for e in batch["error"]]),
            "record": _objects(records),
            "score_png": _objects(scores),
            "stages": _objects(stages),
            "device": _objects([str(self.labeller.device)] * len(names)),
        }


def finished_image(row: dict[str, Any]) -> FinishedImage:
    """The ``FinishedImage`` of a labelled output row."""
    return FinishedImage(**json.loads(row["record"]), score_png=row["score_png"] or None)
