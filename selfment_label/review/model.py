"""A FiftyOne ``Model`` that labels images with the engine, for ``dataset.apply_model``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import fiftyone as fo
import fiftyone.core.models as fom
import numpy as np
from PIL import Image

from ..config import RunConfig
from ..data.images import decoded_image
from ..engine import Labeller, backbone_for
from ..features.backbone import Backbone
from ..masks import FullSizeMask
from ..refine import check_available, guide_side
from ..segment.registry import make_segmenter
from ..timing import StageTimer
from .convert import mask_to_detection


def selfment_model(
    config: RunConfig | None = None, backbone: Backbone | None = None
) -> SelfmentModel:
    """A FiftyOne ``Model`` that labels images with the engine, for ``dataset.apply_model``.

    Every image becomes a ``fo.Detections`` with instance masks, labelled as ``run`` labels it
    with the same config (``Labeller.labelled``: a thin image's grids, ``zoom``); ``confidence``
    is the mask score, ``level`` and ``parent_id`` are set in ``entities`` mode:

        model = selfment_model(RunConfig(weights="dinov2_vits14.safetensors"))
        dataset.apply_model(model, label_field="selfment", batch_size=4)

    Arguments:
      config: run options (backbone, mode and its options; defaults when None).
      backbone: a ready backbone (built from ``config`` when None).
    """
    return SelfmentModel(config or RunConfig(), backbone)


class SelfmentModel(fom.Model):
    """Labels images (RGB arrays from ``apply_model``) as ``fo.Detections`` with masks.

    Arguments:
      config: run options (backbone, mode and its options).
      backbone: a ready backbone (built from ``config`` when None).
    """

    def __init__(self, config: RunConfig, backbone: Backbone | None):
        check_available(config.refine)
        if backbone is None:
            backbone = backbone_for(config)
        self.config = config
        self.labeller = Labeller(
            backbone,
            make_segmenter(config.segment),
            config.precision,
            config.refine,
            config.zoom,
        )
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
        return {
            **self.config.shared_options(),
            **self.labeller.segmenter.options(),
            **self.labeller.backbone.identity(),
        }

    def predict(self, arg: Any) -> Any:
        return self.predict_all([arg])[0]

    def predict_all(self, args: Iterable[Any]) -> list[Any]:
        images = [_as_rgb(arg) for arg in args]
        mean, std = self.labeller.backbone.mean_std
        patch = self.labeller.backbone.patch_size
        side = guide_side(self.config.refine)
        decoded = [
            decoded_image(
                image,
                str(i),
                image.size,
                self.config.resolution,
                patch,
                mean,
                std,
                guide_side=side,
                zoom=self.config.zoom,
                thin=self.labeller.picks_grid,
            )
            for i, image in enumerate(images)
        ]
        results: list[Any] = [None] * len(decoded)
        grids: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(decoded):
            grids.setdefault(item.grid, []).append(index)
        for indices in grids.values():
            labelled = self.labeller.labelled([decoded[i] for i in indices], self.timer)
            for index, image in zip(indices, labelled, strict=True):
                results[index] = _detections_of(image.kept)
        return results


def _as_rgb(arg: Any) -> Image.Image:
    if isinstance(arg, Image.Image):
        return arg.convert("RGB")
    array = np.asarray(arg)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array[..., :3]).convert("RGB")


def _detections_of(kept: list[FullSizeMask]) -> fo.Detections:
    detections = []
    for index, region in enumerate(kept):
        attributes: dict[str, Any] = {"coco_id": index + 1}
        if "level" in region.extra:
            attributes["level"] = int(region.extra["level"])
        if region.extra.get("parent") is not None:
            attributes["parent_id"] = int(region.extra["parent"]) + 1
        detections.append(mask_to_detection(region.mask, region.score, **attributes))
    return fo.Detections(detections=detections)
