"""MaskCut on the image and on four corner crops, merged: class-agnostic COCO figures as labels.

``run --mode instances`` sees an image at one scale (448 px on the long side by default), so a
COCO street or table scene gets about 1.3 masks per image: small objects are one or two
patches. This benchmark measures what more pseudo-masks from zoomed views give, before any
product option exists for it:

1. the images are labelled with ``label_folder`` in ``instances`` mode (MaskCut + IPO);
2. four corner crops of each image (``--crop`` of its width and height, 0.6 by default: they
   overlap across the middle) are written to a work folder and labelled the same way, each
   crop at the full ``--resolution`` (a 1.7x zoom at 0.6);
3. each crop mask is put back into its image's frame and added to the image's masks, best score
   first, unless it overlaps a mask already kept at IoU >= 0.5 (NMS), its score times 0.99
   (ranked after the full view's masks of the same score). ``whole`` keeps only the crop masks
   that touch no edge of the crop lying inside the image (an object the crop cuts is left
   out); ``all`` keeps them too.

It prints AP, AP50, AR@100 (``COCOeval``, one category, as ``benchmarks/instances_coco.py``)
for the full view and both merges, and writes each merge as a run folder (``merged-whole``,
``merged-all``: the full view's run with the merged annotations) that ``selfment-label train``
takes, to measure the instance head learnt from them::

    python -m benchmarks.instances_crops --images ../shared/data/coco-dev/images \\
        --gt ../shared/data/coco-dev/instances.json \\
        --weights ../shared/weights/dinov2_vits14.safetensors --work /tmp/crops
    selfment-label train /tmp/crops/merged-whole --out /tmp/crops/head.pt \\
        --weights ../shared/weights/dinov2_vits14.safetensors
    selfment-label apply /tmp/crops/head.pt ../shared/data/coco-dev/images \\
        --out /tmp/crops/head-labels --weights ../shared/weights/dinov2_vits14.safetensors

Work folders are reused (runs resume).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_backbone
from benchmarks.instances_coco import (
    add_coco_arguments,
    check_coco_arguments,
    class_agnostic_eval,
)
from selfment_label.config import DEFAULT_PRECISION, PRECISION_NAMES, RunConfig, mode_config
from selfment_label.data.images import IMAGE_EXTENSIONS
from selfment_label.masks import annotation_record
from selfment_label.runfolder.coco import decode_rle
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import read_run

NMS_IOU = 0.5
CROP_SCORE = 0.99
MERGES = ("whole", "all")
Candidate = tuple[np.ndarray, float, bool]
"""A crop mask in its image's frame, its score, and whether its crop cuts it."""


@dataclass(frozen=True)
class Crop:
    """Where a crop lies in its image (pixels)."""

    image: str
    left: int
    top: int
    width: int
    height: int
    image_width: int
    image_height: int

    def inner_edge_touched(self, mask: np.ndarray) -> bool:
        """Whether ``mask`` (the crop's size) touches an edge of the crop that is not the
        image's own edge: the object may go on outside the crop."""
        touched = []
        if self.left > 0:
            touched.append(mask[:, 0].any())
        if self.left + self.width < self.image_width:
            touched.append(mask[:, -1].any())
        if self.top > 0:
            touched.append(mask[0, :].any())
        if self.top + self.height < self.image_height:
            touched.append(mask[-1, :].any())
        return bool(any(touched))

    def in_image(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` (the crop's size) in the image's frame."""
        full = np.zeros((self.image_height, self.image_width), dtype=bool)
        full[self.top : self.top + self.height, self.left : self.left + self.width] = mask
        return full


def write_crops(images: Path, out: Path, fraction: float) -> dict[str, Crop]:
    """Four corner crops of ``fraction`` of each image's width and height, as PNG files in
    ``out`` (kept when already there); crop file name -> where it lies."""
    out.mkdir(parents=True, exist_ok=True)
    crops = {}
    for path in sorted(images.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        width, height = image.size
        crop_w, crop_h = round(width * fraction), round(height * fraction)
        corners = [(0, 0), (width - crop_w, 0), (0, height - crop_h)]
        corners.append((width - crop_w, height - crop_h))
        for index, (left, top) in enumerate(corners):
            name = f"{path.stem}__crop{index}.png"
            crops[name] = Crop(path.name, left, top, crop_w, crop_h, width, height)
            if not (out / name).exists():
                image.crop((left, top, left + crop_w, top + crop_h)).save(out / name)
    return crops


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


Masks = dict[str, list[tuple[np.ndarray, float]]]
"""Image file name -> its masks (in the image's frame) and their scores."""


def run_masks(run_dir: Path) -> Masks:
    """A run folder's masks and scores, by image."""
    return {
        image["file_name"]: [(decode_rle(ann["segmentation"]), float(ann["score"])) for ann in anns]
        for image, anns in read_run(run_dir).images()
    }


def crop_candidates(crops_run: Path, crops: dict[str, Crop]) -> dict[str, list[Candidate]]:
    """The crops' masks in their image's frame, by image: mask, score x ``CROP_SCORE``, and
    whether it touches an inner edge of its crop."""
    candidates: dict[str, list[Candidate]] = {}
    for name, found in run_masks(crops_run).items():
        crop = crops[name]
        candidates.setdefault(crop.image, []).extend(
            (crop.in_image(mask), CROP_SCORE * score, crop.inner_edge_touched(mask))
            for mask, score in found
        )
    return candidates


def merged_masks(full: Masks, candidates: dict[str, list[Candidate]], merge: str) -> Masks:
    """The full view's masks, then the crops' (best score first) that overlap no kept mask at
    IoU >= ``NMS_IOU``; ``whole`` leaves out crop masks that touch an inner edge of their
    crop."""
    merged = {name: list(found) for name, found in full.items()}
    for name, found in candidates.items():
        kept = merged.setdefault(name, [])
        for mask, score, cut in sorted(found, key=lambda candidate: -candidate[1]):
            if merge == "whole" and cut:
                continue
            if all(_iou(mask, other) < NMS_IOU for other, _ in kept):
                kept.append((mask, score))
    return merged


def write_merged_run(full_run: Path, out: Path, masks: Masks) -> None:
    """A copy of the full view's run folder whose annotations are ``masks`` (for ``train``)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(full_run, out)
    coco = json.loads((out / "annotations.json").read_text())
    ids = {image["file_name"]: image["id"] for image in coco["images"]}
    annotations: list[dict[str, Any]] = []
    for name, found in masks.items():
        for mask, score in found:
            record = annotation_record(mask, score)
            record.update(id=len(annotations) + 1, image_id=ids[name], category_id=1, iscrowd=0)
            annotations.append(record)
    coco["annotations"] = annotations
    (out / "annotations.json").write_text(json.dumps(coco))


def main() -> None:
    """Label, merge, evaluate and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_coco_arguments(parser)
    parser.add_argument("--crop", type=float, default=0.6, help="crop side / image side")
    parser.add_argument("--precision", choices=PRECISION_NAMES, default=DEFAULT_PRECISION)
    args = parser.parse_args()
    check_coco_arguments(parser, args)
    if not 0.3 <= args.crop < 1.0:
        parser.error("--crop must be in [0.3, 1)")
    backbone = load_backbone(args.weights)
    config = RunConfig(
        weights=str(args.weights), precision=args.precision, segment=mode_config("instances")
    )
    full_run, crops_run = args.work / "full", args.work / f"crops-{args.crop}-run"
    crops = write_crops(args.images, args.work / f"crops-{args.crop}", args.crop)
    label_folder(args.images, full_run, config, backbone=backbone)
    label_folder(args.work / f"crops-{args.crop}", crops_run, config, backbone=backbone)

    full, candidates = run_masks(full_run), crop_candidates(crops_run, crops)
    rows = [("full view (run --mode instances)", class_agnostic_eval(args.gt, full_run))]
    for merge in MERGES:
        merged_run = args.work / f"merged-{merge}"
        write_merged_run(full_run, merged_run, merged_masks(full, candidates, merge))
        rows.append((f"+ crops, {merge}", class_agnostic_eval(args.gt, merged_run)))
    table = Table(title=f"instances as labels, full view + 4 crops of {args.crop}")
    for column in ("labels", "AP", "AP50", "AR@100", "masks / image"):
        table.add_column(column, justify="left" if column == "labels" else "right")
    for label, figures in rows:
        table.add_row(
            label,
            *(f"{figures[key]:.2f}" for key in ("AP", "AP50", "AR@100", "masks/img")),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
