"""The engine: a backbone, a segmenter and the full-size masks for batches of decoded images.

``Labeller`` turns a batch of images that share a patch grid into ``FinishedImage``s (COCO
annotation records and, when asked, a score map). An ``Executor`` runs a ``LabelJob``: the
``LocalExecutor`` decodes in background threads and labels in this process; the Ray executor
(``selfment_label.distributed``) ships the same ``Labeller`` to its workers. Every finished
image and every skip goes to the job's ``Recorder`` (the run folder's, on the driver). The
same engine labels ``run``, ``apply``, the FiftyOne model (``review.model``) and the head's
training features. With a zoom (``RunConfig.zoom``) the ``Labeller`` also labels four corner
crops of every image and merges their masks into the full view's (``selfment_label.zoom``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from .config import DEFAULT_PRECISION, RunConfig
from .data.batching import batches_by_grid, lookahead, prefetch, stack_pixels
from .data.images import DecodedImage, ImageSkip, prepare_image
from .data.storage import ImageSource
from .device import pin_threads, resolve_device, resolve_precision, small_kernel_threads
from .features.backbone import Backbone, build_backbone
from .masks import FullSizeMask, annotation_record, full_size_masks
from .refine import guide_side
from .segment.base import BatchTokens, PatchMask, Segmenter, segment_batch, segmenter_tokens
from .timing import StageTimer
from .zoom import CROPS, corner_crops, merge_views


def backbone_for(config: RunConfig) -> Backbone:
    """Build the backbone (preset, weights, device, download policy) a run config asks for."""
    return build_backbone(
        config.backbone,
        config.weights,
        resolve_device(config.device),
        allow_download=config.allow_download,
    )


@dataclass
class FinishedImage:
    """One labelled image, made where the model ran and journalled by the run's driver.

    Arguments:
      file_name: path relative to the input root.
      width, height: the image's displayed size.
      annotations: its annotation records (``masks.annotation_record``).
      notes: what the segmenter noted about it (empty: nothing).
      score_png: its soft score map as an 8-bit PNG, when score maps are saved.
    """

    file_name: str
    width: int
    height: int
    annotations: list[dict[str, Any]]
    notes: dict[str, Any]
    score_png: bytes | None = None


@dataclass
class LabelledImage:
    """One image's full-size masks, before they become annotation records.

    Arguments:
      item: the decoded image.
      kept: its masks (``masks.full_size_masks``).
      union: the soft union of its patch masks at full size (None without a mask).
      notes: what the segmenter noted about it (empty: nothing).
    """

    item: DecodedImage
    kept: list[FullSizeMask]
    union: torch.Tensor | None
    notes: dict[str, Any]


def _score_png(soft: torch.Tensor) -> bytes:
    array = (soft.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _best_score(kept: list[FullSizeMask]) -> float:
    """The highest score among an image's masks (0 without a mask)."""
    return max((region.score for region in kept), default=0.0)


class Labeller:
    """Runs a backbone and a segmenter over decoded images and makes full-size masks.

    The same object labels a local run and, inside each Ray actor, a distributed one. An
    image thinner than 3:1 is also labelled on each of its ``thin_views`` grids when the
    segmenter's scores compare grids (``picks_grid``, without ``zoom``): the grid whose best
    mask scores highest is kept (docs/quality-report.md, "Thin images: more than one grid").

    Arguments:
      backbone: the frozen feature extractor.
      segmenter: turns patch tokens into patch masks.
      precision: precision of the backbone (``auto``, ``fp32``, ``fp16``, ``bf16``), resolved
        on the backbone's device (``choice``).
      refine: edge refinement of the full-size masks (``REFINE_METHODS``); the decoded
        images must carry their guide (``guide_side(refine)``) unless it is ``none``.
      zoom: also label each image's four corner crops of this fraction of its sides and
        merge their masks into the full view's (``selfment_label.zoom``); the decoded images
        must carry them (``DecodedImage.zoom_pixels``). Only for a segmenter of flat,
        disjoint instances (one that says ``zoomable``).

    Raises:
      ValueError: ``zoom`` with a segmenter that is not ``zoomable``.
    """

    def __init__(
        self,
        backbone: Backbone,
        segmenter: Segmenter,
        precision: str = DEFAULT_PRECISION,
        refine: str = "none",
        zoom: float | None = None,
    ):
        if zoom is not None and not getattr(segmenter, "zoomable", False):
            raise ValueError(
                "zoom merges flat, disjoint instances: it needs instances mode or an instance "
                "head without parts"
            )
        self.backbone = backbone
        self.segmenter = segmenter
        self.precision = precision
        self.refine = refine
        self.zoom = zoom
        self.device = backbone.device
        self.choice = resolve_precision(precision, self.device)

    @property
    def picks_grid(self) -> bool:
        """Whether a thin image's ``thin_views`` are labelled too (decoders make them only
        then): the segmenter's scores compare grids (``picks_grid``) and there is no zoom."""
        return self.zoom is None and getattr(self.segmenter, "picks_grid", False)

    def tokens(self, batch: list[DecodedImage], timer: StageTimer) -> BatchTokens:
        """``[B, rows, cols, D]`` patch tokens of a batch of images that share one grid, and
        their ``[B, D]`` class tokens where the segmenter takes them (else ``None``). With
        ``zoom``, ``[5B, ...]``: the full views, then each corner crop of every image (one
        backbone call of ``B`` views at a time)."""
        with timer.stage("backbone"):
            views = [stack_pixels(batch, self.device)]
            if self.zoom is not None:
                views += [
                    torch.from_numpy(np.stack([item.zoom_pixels[crop] for item in batch])).to(
                        self.device
                    )
                    for crop in range(CROPS)
                ]
            found = [
                segmenter_tokens(self.segmenter, self.backbone, pixels, self.choice.dtype)
                for pixels in views
            ]
            if len(found) == 1:
                return found[0]
            patches = torch.cat([view_patches for view_patches, _ in found])
            classes = [view_classes for _, view_classes in found]
            return patches, None if classes[0] is None else torch.cat(classes)

    def patch_masks(
        self, batch: list[DecodedImage], timer: StageTimer, tokens: BatchTokens | None = None
    ) -> list[list[PatchMask]]:
        """Patch masks for a batch of images that share one grid (from ``tokens`` when the
        caller already has them); with ``zoom``, the full views' then each crop's, as
        ``tokens`` orders them."""
        patches, class_tokens = self.tokens(batch, timer) if tokens is None else tokens
        with small_kernel_threads(self.device):
            names = [item.file_name for item in batch] * (len(patches) // len(batch))
            return segment_batch(self.segmenter, patches, timer, class_tokens, names)

    def _full_size(
        self, item: DecodedImage, views: list[list[PatchMask]]
    ) -> tuple[list[FullSizeMask], torch.Tensor | None]:
        """One image's full-size masks from its views' patch masks (the full view's only, or
        merged with its crops' with ``zoom``) and the full view's soft union."""
        kept, union = full_size_masks(views[0], item.width, item.height, self.refine, item.guide)
        if self.zoom is None:
            return kept, union
        crops = corner_crops(item.width, item.height, self.zoom)
        found = [
            (
                crop,
                full_size_masks(
                    masks,
                    crop.width,
                    crop.height,
                    self.refine,
                    None if item.guide is None else crop.of(item.guide),
                )[0],
            )
            for crop, masks in zip(crops, views[1:], strict=True)
        ]
        return merge_views(kept, found), union

    def _thin_masks(
        self, batch: list[DecodedImage], timer: StageTimer
    ) -> list[list[list[PatchMask]]]:
        """Per image of the batch, its patch masks on each of its ``thin_views`` (one backbone
        call a view); none for an image that is not thin, or unless ``picks_grid``."""
        if not self.picks_grid:
            return [[] for _ in batch]
        found = []
        for item in batch:
            views = []
            for pixels in item.thin_views:
                with timer.stage("backbone"):
                    patches, class_tokens = segmenter_tokens(
                        self.segmenter,
                        self.backbone,
                        torch.from_numpy(pixels[None]).to(self.device),
                        self.choice.dtype,
                    )
                with small_kernel_threads(self.device):
                    names = [item.file_name]
                    views += segment_batch(self.segmenter, patches, timer, class_tokens, names)
            found.append(views)
        return found

    def labelled(
        self, batch: list[DecodedImage], timer: StageTimer, tokens: BatchTokens | None = None
    ) -> list[LabelledImage]:
        """Full-size masks for a batch of one grid (from ``tokens`` when the caller already
        has them): the full view's, merged with its crops' with ``zoom``, or a thin image's
        best-scoring grid's. Every labelling path goes through here, so they agree."""
        patch_masks = self.patch_masks(batch, timer, tokens)
        thin_masks = self._thin_masks(batch, timer)
        found = []
        with small_kernel_threads(self.device), timer.stage("masks"):
            for index, item in enumerate(batch):
                views = patch_masks[index :: len(batch)]
                kept, union = self._full_size(item, views)
                masks = views[0]
                for other in thin_masks[index]:
                    other_kept, other_union = self._full_size(item, [other])
                    if _best_score(other_kept) > _best_score(kept):
                        kept, union, masks = other_kept, other_union, other
                notes = dict(getattr(masks, "notes", None) or {})
                found.append(LabelledImage(item, kept, union, notes))
        return found

    def label(
        self,
        batch: list[DecodedImage],
        timer: StageTimer,
        save_scores: bool = False,
        tokens: BatchTokens | None = None,
    ) -> list[FinishedImage]:
        """``labelled``'s masks as annotation records (and score maps) for a batch of one
        grid (from ``tokens`` when the caller already has them)."""
        found = self.labelled(batch, timer, tokens)
        with small_kernel_threads(self.device), timer.stage("masks"):
            return [
                FinishedImage(
                    file_name=image.item.file_name,
                    width=image.item.width,
                    height=image.item.height,
                    annotations=[
                        annotation_record(region.mask, region.score, region.extra)
                        for region in image.kept
                    ],
                    notes=image.notes,
                    score_png=(
                        _score_png(image.union) if save_scores and image.union is not None else None
                    ),
                )
                for image in found
            ]


class Recorder(Protocol):
    """Where an executor sends its results (the run folder's ``RunRecorder`` on the driver)."""

    timer: StageTimer
    """The run's stage timer: executors charge their stages to it."""

    def image(self, finished: FinishedImage) -> None:
        """Take a labelled image."""
        ...

    def skip(self, file_name: str, reason: str) -> None:
        """Take an image that could not be labelled, and why."""
        ...


@dataclass
class LabelJob:
    """What an executor labels, and where its results go.

    Arguments:
      source: where the images are.
      todo: the images still to label, in order.
      config: the run's options.
      labeller: the engine (the local one; a distributed executor ships it to its workers).
      recorder: takes every finished image and skip, on the driver.
    """

    source: ImageSource
    todo: list[str]
    config: RunConfig
    labeller: Labeller
    recorder: Recorder


class Executor(Protocol):
    """Runs a ``LabelJob``: every image of ``todo`` ends in ``recorder.image`` or
    ``recorder.skip``. A bug (not a bad image) propagates."""

    def __call__(self, job: LabelJob) -> None:
        """Label the job's images."""
        ...

    def model_device(self, config: RunConfig) -> str:
        """Where the driver builds the model (``config.device`` when it runs it)."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Keys for run.json that say where the work ran (empty for a local run)."""
        ...


class LocalExecutor:
    """Labels in this process: decoding in background threads, batches of one patch grid.

    The backbone runs one batch ahead in a background thread: while it computes batch k + 1,
    this thread cuts, refines and writes batch k, so the stages after the backbone mostly
    hide behind it (docs/speed-report.md). The masks are the same as without the overlap
    (the small stages keep their fixed thread count), and the ``backbone`` stage seconds
    overlap the others': stage seconds add up to more than the wall time.
    """

    def __call__(self, job: LabelJob) -> None:
        """Label the job's images in this process."""
        config, labeller, recorder = job.config, job.labeller, job.recorder
        timer = recorder.timer
        mean, std = labeller.backbone.mean_std
        patch = labeller.backbone.patch_size
        location = job.source.location

        def decode(name: str) -> DecodedImage:
            return prepare_image(
                location,
                name,
                config.resolution,
                patch,
                mean,
                std,
                config.max_pixels,
                guide_side(config.refine),
                config.zoom,
                labeller.picks_grid,
            )

        threads = torch.get_num_threads()

        def backbone(pair: tuple[list[DecodedImage], list]) -> BatchTokens | None:
            if not pair[0]:
                return None
            pin_threads(threads)
            return labeller.tokens(pair[0], timer)

        depth = lookahead(config.batch_size)
        stream = prefetch(job.todo, decode, workers=config.workers, depth=depth)
        batches = batches_by_grid(stream, config.batch_size, window=depth)
        for (batch, failures), tokens in prefetch(batches, backbone, workers=1, depth=2):
            for name, error in failures:
                if not isinstance(error, ImageSkip):
                    raise error
                recorder.skip(name, str(error) or type(error).__name__)
            if isinstance(tokens, BaseException):
                raise tokens
            if not batch:
                continue
            for item in batch:
                timer.add("decode", item.decode_seconds)
            for finished in labeller.label(batch, timer, config.save_scores, tokens):
                recorder.image(finished)

    def model_device(self, config: RunConfig) -> str:
        """The run's device: the model runs here."""
        return config.device

    def provenance(self) -> dict[str, Any]:
        """Nothing more than run.json's ``device``."""
        return {}
