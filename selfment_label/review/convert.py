"""Masks <-> FiftyOne detections (FiftyOne's instance-mask convention).

``bounding_box`` is ``[x, y, w, h]`` relative to the image and ``mask`` is the boolean mask
cropped to that box, as ``fo.Detection.from_mask`` makes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import fiftyone as fo

LABEL = "foreground"


def mask_to_detection(
    mask: np.ndarray, score: float, label: str = LABEL, **attributes: Any
) -> fo.Detection:
    """A FiftyOne detection of a full-size boolean mask (``fo.Detection.from_mask``).

    Arguments:
      mask: ``[H, W]`` boolean mask (not empty).
      score: its confidence, stored as ``confidence``.
      label: the class label.
      attributes: extra detection attributes (``coco_id``, ``parent_id``, ``level``).
    """
    import fiftyone as fo

    return fo.Detection.from_mask(mask, label=label, confidence=float(score), **attributes)


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
