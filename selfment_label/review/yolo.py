"""YOLO segmentation labels (the Ultralytics layout) from boolean masks.

One mask is one object, so it becomes one label row: ``0 x1 y1 x2 y2 ...`` with coordinates
normalised to ``[0, 1]``. A mask in several pieces is joined into a single polygon: each piece's
outer contour is spliced into the polygon built so far at the closest pair of vertices, through
a zero-width bridge there and back (the idea Ultralytics' own COCO converter uses). Pieces
smaller than ``min_piece_area`` pixels are dropped, except the largest piece, which is always
kept; a piece whose contour is a line or a point (one pixel wide) is outlined by its pixel box,
so every row has at least 3 points. Holes are filled (a YOLO polygon has none). An image
Ultralytics would reject as corrupt (under 10 pixels a side, or a format it does not read) is
left out of a YOLO export with its reason (``yolo_image_problem``).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..config import YOLO_MIN_PIECE_AREA

IMAGE_DIR_NAME = "images"
YOLO_MIN_SIDE = 10
"""Ultralytics rejects an image with a side under this many pixels as corrupt."""
YOLO_IMAGE_FORMATS = frozenset(
    ("avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpeg2000", "jpg", "mpo", "png")
    + ("tif", "tiff", "webp")
)
"""The file formats (Pillow's names, lower case) Ultralytics reads; any other is corrupt to it."""


def yolo_image_problem(path: Path) -> str | None:
    """Why Ultralytics would reject an image as corrupt (its ``check_image`` rules), or None.

    The format is the file's own (a GIF renamed ``.png`` is a GIF), not its extension.

    Arguments:
      path: the image file.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            kind = (image.format or "unknown").lower()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return f"Ultralytics cannot read it ({error})"
    if min(width, height) < YOLO_MIN_SIDE:
        return (
            f"{width}x{height} pixels: Ultralytics rejects images under {YOLO_MIN_SIDE} "
            "pixels a side"
        )
    if kind not in YOLO_IMAGE_FORMATS:
        return f"a {kind.upper()} file, a format Ultralytics does not read"
    return None


def _piece_ring(piece: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """The outer contour of one connected piece, ``[K, 2]`` float pixel coordinates, K >= 3.

    Contour vertices are pixel centres (``index + 0.5``); a degenerate contour (fewer than 3
    vertices or no area) is replaced by the piece's pixel box, corner to corner.
    """
    import cv2

    contours, _ = cv2.findContours(
        piece.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    contour = max(contours, key=len).reshape(-1, 2) if contours else np.zeros((0, 2))
    if len(contour) >= 3 and cv2.contourArea(contour.astype(np.float32)) > 0:
        return contour.astype(np.float64) + [x0 + 0.5, y0 + 0.5]
    rows = np.flatnonzero(piece.any(axis=1))
    cols = np.flatnonzero(piece.any(axis=0))
    left, right = x0 + cols[0], x0 + cols[-1] + 1
    top, bottom = y0 + rows[0], y0 + rows[-1] + 1
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom]], dtype=np.float64)


def _splice(polygon: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """``polygon`` with ``ring`` inserted at their closest vertices (bridge there and back)."""
    distances = ((polygon[:, None, :] - ring[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
    return np.concatenate([polygon[: i + 1], ring[j:], ring[: j + 1], polygon[i:]])


def mask_polygon(mask: np.ndarray, min_piece_area: int = YOLO_MIN_PIECE_AREA) -> np.ndarray | None:
    """One polygon covering a mask's pieces, ``[K, 2]`` pixel coordinates (x, y); None if empty.

    Arguments:
      mask: ``[H, W]`` boolean mask.
      min_piece_area: pieces (8-connected) with fewer pixels are dropped, the largest excepted.
    """
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if count <= 1:
        return None
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")
    polygon: np.ndarray | None = None
    for index in order:
        x, y, w, h, area = (int(v) for v in stats[index])
        if polygon is not None and area < min_piece_area:
            break
        ring = _piece_ring(labels[y : y + h, x : x + w] == index, x, y)
        polygon = ring if polygon is None else _splice(polygon, ring)
    return polygon


def label_row(polygon: np.ndarray, width: int, height: int, class_id: int = 0) -> str:
    """A YOLO segmentation row: class, then the vertices normalised and clipped to ``[0, 1]``."""
    normalised = np.clip(polygon / [width, height], 0.0, 1.0)
    return " ".join([str(class_id), *(f"{v:.6f}" for v in normalised.reshape(-1))])


def label_rows(
    masks: list[np.ndarray], width: int, height: int, min_piece_area: int = YOLO_MIN_PIECE_AREA
) -> list[str]:
    """One row per non-empty mask (its pieces joined), in the given order."""
    rows = []
    for mask in masks:
        polygon = mask_polygon(mask, min_piece_area)
        if polygon is not None:
            rows.append(label_row(polygon, width, height))
    return rows


def yolo_image_name(name: str) -> str:
    """``name`` with every folder called ``images`` renamed ``images_``.

    Ultralytics finds an image's label file by replacing the last ``/images/`` of its path
    with ``/labels/``; a folder of that name inside the split would send it to the wrong place.
    """
    path = PurePosixPath(name)
    folders = [f"{p}_" if p == IMAGE_DIR_NAME else p for p in path.parent.parts]
    return str(PurePosixPath(*folders, path.name))


def dataset_yaml(splits: list[str], names: list[str], description: str) -> str:
    """The Ultralytics ``dataset.yaml`` text, paths relative to the file's own folder.

    There is no ``path:`` key on purpose: Ultralytics resolves a relative ``path:`` against the
    current directory, but without one it uses the folder the YAML file is in, so the export
    can be moved or opened from anywhere. Without a ``val`` split, ``val`` is the train images
    (Ultralytics requires the key).

    Arguments:
      splits: the splits written (``train`` first).
      names: the class names, index = class id.
      description: a comment line.
    """
    val = "val" if "val" in splits else "train"
    lines = [
        f"# {description}",
        "# No 'path:' key: Ultralytics resolves train/val against this file's folder.",
        "train: images/train",
        f"val: images/{val}" + ("" if val == "val" else "  # no val split: the train images"),
        "names:",
        *(f"  {i}: {json.dumps(name)}" for i, name in enumerate(names)),
    ]
    return "\n".join(lines) + "\n"
