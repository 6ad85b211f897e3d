"""COCO files: atomic streamed writes of the records ``masks.annotation_record`` makes, decoding
compressed RLE through pycocotools, reading runs back.

Conventions: dataset format (``images``/``annotations``/``categories``), ``segmentation`` is
compressed RLE with ``counts`` as str and ``iscrowd: 0``, ``bbox`` is XYWH from the mask,
``area`` is the mask's pixel count, ``score`` per annotation, ``file_name`` relative to the
image root (POSIX separators). Extra keys (``level``, ``parent_id``) are allowed: COCO
loaders ignore them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..atomic import atomic_path
from ..errors import SelfmentError

FOREGROUND_CATEGORY = {"id": 1, "name": "foreground", "supercategory": "object"}


class RleError(SelfmentError, ValueError):
    """An RLE mask that is malformed, truncated, or not the size of its image."""


def _compressed_counts(counts: bytes) -> list[int] | None:
    """Run lengths of COCO's compressed counts string; None when it is cut mid-number."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None
            char = counts[position] - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(rle: dict[str, Any], size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean ``[H, W]`` mask of a compressed (str or bytes counts) or uncompressed RLE.

    Arguments:
      rle: ``{"size": [H, W], "counts": ...}``.
      size: ``(height, width)`` the mask must have (its image's), when known.

    Raises:
      RleError: the RLE is malformed, its run lengths do not cover exactly H x W pixels
        (truncated or padded counts), or it is not ``size``.
    """
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            runs = [int(c) for c in counts]
            rle = mask_utils.frPyObjects(rle, height, width)
        else:
            counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            runs = _compressed_counts(counts)
            rle = {"size": [height, width], "counts": counts}
    except (KeyError, TypeError, ValueError) as error:
        raise RleError(f"malformed RLE mask ({error})") from None
    if runs is None or any(r < 0 for r in runs) or sum(runs) != height * width:
        raise RleError(
            f"RLE mask counts do not cover its {width}x{height} pixels (truncated or corrupt)"
        )
    if size is not None and (height, width) != tuple(size):
        raise RleError(f"RLE mask is {width}x{height} but its image is {size[1]}x{size[0]}")
    return mask_utils.decode(rle).astype(bool)


def write_coco_stream(
    path: str | Path,
    images: Iterable[dict[str, Any]],
    info: dict[str, Any] | None = None,
    categories: list[dict[str, Any]] | None = None,
) -> tuple[int, int]:
    """Write a COCO file atomically from a stream of image records, in constant memory.

    Each record is ``{"file_name", "width", "height", "annotations": [...]}`` plus optional
    keys copied to the image entry (``score_map``). Annotations are
    ``{"segmentation", "area", "bbox", "score"}`` plus optional ``level`` and ``parent``
    (index of the parent among the same image's annotations). Image ids are assigned 1..n in
    stream order, annotation ids 1..m; ``parent`` becomes ``parent_id``. The stream is read
    twice (images, then annotations), so pass a re-iterable (a list or a reader object).

    Returns:
      ``(number of images, number of annotations)``.
    """
    n_images = n_annotations = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"info": ' + json.dumps(info or {}, ensure_ascii=False))
        fh.write(',\n"licenses": [],\n"categories": ')
        fh.write(json.dumps(categories or [FOREGROUND_CATEGORY]))
        fh.write(',\n"images": [')
        for n_images, record in enumerate(images, start=1):
            entry = {"id": n_images, **{k: v for k, v in record.items() if k != "annotations"}}
            fh.write(("\n" if n_images == 1 else ",\n") + json.dumps(entry, ensure_ascii=False))
        fh.write('\n],\n"annotations": [')
        for image_id, record in enumerate(images, start=1):
            first_id = n_annotations + 1
            for ann in record.get("annotations", []):
                n_annotations += 1
                entry = _annotation_entry(ann, n_annotations, image_id, first_id)
                fh.write(("\n" if n_annotations == 1 else ",\n") + json.dumps(entry))
        fh.write("\n]}\n")
        fh.flush()
        os.fsync(fh.fileno())
    return n_images, n_annotations


def _annotation_entry(
    ann: dict[str, Any], ann_id: int, image_id: int, first_id: int
) -> dict[str, Any]:
    entry = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": ann.get("category_id", FOREGROUND_CATEGORY["id"]),
        "segmentation": ann["segmentation"],
        "area": ann["area"],
        "bbox": ann["bbox"],
        "iscrowd": 0,
        "score": ann["score"],
    }
    if "level" in ann:
        entry["level"] = ann["level"]
    if ann.get("parent") is not None:
        entry["parent_id"] = first_id + int(ann["parent"])
    return entry


def load_coco(path: str | Path) -> dict[str, Any]:
    """Read a COCO file; raise ``ValueError`` naming the file when it is not COCO."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{path} is not a COCO file: no {key!r} key")
    return data


def masks_by_image(data: dict[str, Any]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Yield ``(image entry, its annotations)`` for every image of a COCO dict."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        grouped.setdefault(ann["image_id"], []).append(ann)
    for image in data["images"]:
        yield image, grouped.get(image["id"], [])
