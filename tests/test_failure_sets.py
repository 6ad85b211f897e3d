"""The failure sets of ``benchmarks/failure_sets.py`` on a few real images: close-ups, a sky
band above the photo, thin images (issue 24)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.failure_sets import closeup, squeezer
from selfment_label.data.images import MIN_SHORT_PATCHES, decoded_image, grid_for
from selfment_label.evaluate import load_gt_mask
from selfment_label.features.backbone import Backbone
from selfment_label.masks import full_size_masks
from selfment_label.segment.single import NcutIpo
from selfment_label.timing import StageTimer


def label(backbone: Backbone, image: Image.Image, resolution: int = 448) -> np.ndarray:
    """The full-size single-mode mask of one image (all False when it gets none)."""
    mean, std = backbone.mean_std
    item = decoded_image(image, "x.png", image.size, resolution, backbone.patch_size, mean, std)
    tokens = backbone.patch_tokens(torch.from_numpy(item.pixels)[None])
    (masks,) = NcutIpo()(tokens, StageTimer())
    kept, _ = full_size_masks(masks, item.width, item.height)
    return kept[0].mask if kept else np.zeros((item.height, item.width), dtype=bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def source(ecssd_dir: Path, stem: str) -> tuple[Image.Image, np.ndarray]:
    """An ecssd-dev image and its ground truth."""
    with Image.open(ecssd_dir / "images" / f"{stem}.jpg") as image:
        return image.convert("RGB"), load_gt_mask(ecssd_dir / "masks" / f"{stem}.png")


def test_thin_images_keep_a_short_side_that_can_hold_an_object():
    assert grid_for(1600, 120, 448, 14) == (MIN_SHORT_PATCHES, 107)  # was (2, 32)
    assert grid_for(120, 1600, 448, 14) == (107, MIN_SHORT_PATCHES)
    assert grid_for(100_000, 100, 448, 14) == (MIN_SHORT_PATCHES, 4 * 32)  # long side capped
    # ordinary images and anything up to 2:1 keep the grid they had, at any resolution
    for resolution in (112, 224, 448):
        side = resolution // 14
        assert grid_for(640, 480, resolution, 14) == (round(side * 0.75), side)
        assert grid_for(800, 400, resolution, 14) == (side // 2, side)


@pytest.mark.slow
@pytest.mark.parametrize("stem, index", [("0036", 0), ("0013", 0)])
def test_a_thin_real_image_is_labelled_like_the_whole_one(real_backbone, ecssd_dir, stem, index):
    # squeezed to 13:1 these got a 2-patch short side and no mask ("every pair alike")
    image, truth = source(ecssd_dir, stem)
    thin, thin_truth = squeezer(13)(image, truth, index)
    whole = iou(label(real_backbone, image), truth)
    assert iou(label(real_backbone, thin), thin_truth) >= whole - 0.1


@pytest.mark.slow
@pytest.mark.parametrize("stem, index", [("0002", 1), ("0041", 40), ("0003", 2)])
def test_a_closeup_keeps_its_object(real_backbone, ecssd_dir, stem, index):
    # crops in which the object fills 60-90 % of the frame: 0002 and 0041's object holds more
    # than half of the border patches and was swapped for the strip beside it; 0003's cut
    # fell on the background, holding 41 % of the border for 19 % of the frame, and was kept
    image, truth = source(ecssd_dir, stem)
    crop, crop_truth = closeup(image, truth, index)
    mask = label(real_backbone, crop)
    assert iou(mask, ~crop_truth) <= 0.5, "the mask is the background"
    assert iou(mask, crop_truth) > 0.7
