"""Measure `single`, `instances` and `entities` on composed multi-object images.

There is no multi-instance ground truth in ECSSD, so this script makes some: it pastes two or
three ECSSD objects (cut out with their ground-truth masks, scaled down) onto other ECSSD
images used as backgrounds, with a fixed seed, away from the background's own salient object
and from each other where the image leaves room. The ground-truth instances are each pasted
object's visible mask and the background's salient object (minus the pasted pixels). Every
mode is then scored per ground-truth instance by its best IoU
with any predicted region (for entities: any entity or part): instance recall at IoU 0.5 and
mean best IoU. Predicted regions per image are reported too, since more regions make a match
easier.

    .venv/bin/python benchmarks/compose_instances.py ../shared/data/ecssd-dev \\
        --weights ../shared/weights/dinov2_vits14.safetensors --images 40 \\
        --cache /tmp/composed_tokens.pt --montage docs/instances.png

``--sweep`` also scores a grid of entity thresholds (cheap: the features are computed once).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy.stats import mannwhitneyu

from selfment_label.config import (
    DEFAULT_BACKBONE,
    DEFAULT_RESOLUTION,
    MODES,
    EntitiesConfig,
    InstancesConfig,
    ModeConfig,
    mode_config,
)
from selfment_label.data.images import prepare_image
from selfment_label.features.backbone import build_backbone
from selfment_label.masks import full_size_masks
from selfment_label.segment.registry import make_segmenter
from selfment_label.timing import StageTimer

BACKGROUND_MIN_AREA = 0.01
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
]


@dataclass
class Composite:
    """One composed image and its ground-truth instance masks.

    Arguments:
      name: file name of the composed JPEG.
      instances: ground-truth instance masks, the pasted objects first.
      pasted: how many of ``instances`` are pasted objects (the rest is the background's own
        salient object).
    """

    name: str
    instances: list[np.ndarray]
    pasted: int


def _load_mask(ecssd: Path, stem: str) -> Image.Image:
    return (
        Image.open(ecssd / "masks" / f"{stem}.png")
        .convert("L")
        .point(lambda v: 255 if v > 127 else 0)
    )


def _place(
    rng: random.Random, occupied: np.ndarray, shape: np.ndarray, tries: int
) -> tuple[int, int]:
    """The position (among ``tries`` seeded draws) where ``shape`` overlaps ``occupied`` least."""
    height, width = occupied.shape
    best: tuple[int, int, int] | None = None
    for _ in range(tries):
        x = rng.randint(0, width - shape.shape[1])
        y = rng.randint(0, height - shape.shape[0])
        overlap = int((occupied[y : y + shape.shape[0], x : x + shape.shape[1]] & shape).sum())
        if best is None or overlap < best[0]:
            best = (overlap, x, y)
        if overlap == 0:
            break
    return best[1], best[2]


def compose(
    ecssd: Path,
    out_dir: Path,
    count: int,
    seed: int,
    tries: int = 50,
    stems: list[str] | None = None,
) -> list[Composite]:
    """Write ``count`` composed images into ``out_dir`` and return their instances.

    Each pasted object is put where it overlaps the background's salient object and the
    objects pasted before it least (the first of ``tries`` seeded positions with no overlap,
    else the one with the least). The ground truth is every pasted object's visible mask plus
    the background's own salient object (its GT mask minus the pasted pixels) when it still
    covers at least ``BACKGROUND_MIN_AREA`` of the image.

    Arguments:
      ecssd: folder with ``images/`` and ``masks/``.
      out_dir: where the composed JPEGs go.
      count: images to make.
      seed: random seed (the same seed gives the same images).
      tries: positions drawn per pasted object.
      stems: the ECSSD images to draw from (default: all).
    """
    rng = random.Random(seed)
    stems = stems or sorted(p.stem for p in (ecssd / "images").glob("*.jpg"))
    composites = []
    for index in range(count):
        background_stem, *object_stems = rng.sample(stems, 1 + rng.choice((2, 3)))
        canvas = Image.open(ecssd / "images" / f"{background_stem}.jpg").convert("RGB")
        width, height = canvas.size
        salient = np.asarray(_load_mask(ecssd, background_stem).resize(canvas.size)) > 127
        occupied = salient.copy()
        visible: list[np.ndarray] = []
        for stem in object_stems:
            picture = Image.open(ecssd / "images" / f"{stem}.jpg").convert("RGB")
            mask = _load_mask(ecssd, stem)
            box = mask.getbbox()
            if box is None:
                continue
            picture, mask = picture.crop(box), mask.crop(box)
            scale = rng.uniform(0.25, 0.4) * min(width, height) / max(picture.size)
            size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            picture, mask = picture.resize(size, Image.BICUBIC), mask.resize(size, Image.BILINEAR)
            shape = np.asarray(mask) > 127
            x, y = _place(rng, occupied, shape, tries)
            canvas.paste(picture, (x, y), Image.fromarray(shape))
            placed = np.zeros((height, width), dtype=bool)
            placed[y : y + size[1], x : x + size[0]] = shape
            visible = [earlier & ~placed for earlier in visible] + [placed]
            occupied |= placed
        name = f"composite_{index:03d}.jpg"
        canvas.save(out_dir / name, quality=95)
        instances = [m for m in visible if m.sum() > 0.002 * m.size]
        remaining = salient & ~np.any(visible, axis=0) if visible else salient
        pasted = len(instances)
        if remaining.sum() >= BACKGROUND_MIN_AREA * remaining.size:
            instances.append(remaining)
        composites.append(Composite(name, instances, pasted))
    return composites


def best_ious(instances: list[np.ndarray], regions: list[np.ndarray]) -> list[float]:
    """Best IoU of every ground-truth instance with any predicted region."""
    scores = []
    for truth in instances:
        best = 0.0
        for region in regions:
            union = np.logical_or(truth, region).sum()
            best = max(best, float(np.logical_and(truth, region).sum() / union) if union else 0.0)
        scores.append(best)
    return scores


def predict(config: ModeConfig, tokens: list[torch.Tensor], sizes: list[tuple[int, int]]):
    """Full-size regions of every image for one configuration."""
    segmenter = make_segmenter(config)
    timer = StageTimer(torch.device("cpu"))
    results = []
    for image_tokens, (width, height) in zip(tokens, sizes, strict=True):
        patch_masks = segmenter(image_tokens[None], timer)[0]
        kept, _ = full_size_masks(patch_masks, width, height)
        results.append(kept)
    return results


def score(composites: list[Composite], predictions) -> dict[str, float]:
    """Instance recall and precision at IoU 0.5, mean best IoU, regions per image.

    Recall and mean best IoU are over the ground-truth instances (all, then the pasted
    objects and the backgrounds' salient objects apart). Precision is over the predicted
    regions: a region is a true positive when its IoU with some ground-truth instance (a
    pasted object or the background's own salient object) is at least 0.5; ``top-level``
    counts only entities for ``entities`` (parts are not objects of their own).
    """
    ious, kinds, region_hits, top_hits, top_scores = [], [], [], [], []
    for composite, kept in zip(composites, predictions, strict=True):
        ious += best_ious(composite.instances, [k.mask for k in kept])
        kinds += [n < composite.pasted for n in range(len(composite.instances))]
        for region in kept:
            hit = best_ious([region.mask], composite.instances)[0] >= 0.5
            region_hits.append(hit)
            if region.extra.get("level", 0) == 0:
                top_hits.append(hit)
                top_scores.append(region.score)
    ious_array, pasted = np.array(ious), np.array(kinds)
    report: dict[str, float] = {"instances": len(ious)}
    for label, chosen in (("", slice(None)), ("pasted ", pasted), ("background ", ~pasted)):
        report[f"{label}recall@0.5"] = round(float(np.mean(ious_array[chosen] >= 0.5)), 3)
        report[f"{label}mean_best_iou"] = round(float(np.mean(ious_array[chosen])), 3)
    report["precision@0.5"] = round(float(np.mean(region_hits)), 3) if region_hits else 0.0
    report["top-level precision@0.5"] = round(float(np.mean(top_hits)), 3) if top_hits else 0.0
    report["regions_per_image"] = round(float(np.mean([len(k) for k in predictions])), 2)
    hits = np.array(top_hits, dtype=bool)
    if hits.any() and not hits.all():
        # AUROC of a low score for finding the false positives (Mann-Whitney U / n1 n2)
        scores = np.array(top_scores)
        statistic = mannwhitneyu(scores[hits], scores[~hits]).statistic
        report["score AUROC for false positives"] = round(
            float(statistic / (hits.sum() * (~hits).sum())), 3
        )
    return report


def montage(
    folder: Path, composites: list[Composite], predictions: dict[str, list], target: Path
) -> None:
    """A grid: one row per image; columns image, ground truth, then each mode's regions."""
    tile = 220
    columns = ["image", "ground truth", *predictions]
    rows = composites[:4]
    sheet = Image.new("RGB", (tile * len(columns), (tile + 18) * len(rows) + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(columns):
        draw.text((col * tile + 6, 3), title, fill="black")
    for row, composite in enumerate(rows):
        image = Image.open(folder / composite.name).convert("RGB")
        index = composites.index(composite)
        layers = [[], composite.instances] + [
            [k.mask for k in sorted(p[index], key=lambda k: k.extra.get("level", 0))]
            for p in predictions.values()
        ]
        for col, masks in enumerate(layers):
            painted = np.asarray(image).astype(np.float32)
            for number, mask in enumerate(masks):
                colour = np.array(PALETTE[number % len(PALETTE)], dtype=np.float32)
                painted[mask] = 0.45 * painted[mask] + 0.55 * colour
            picture = Image.fromarray(painted.astype(np.uint8))
            picture.thumbnail((tile - 4, tile - 4))
            sheet.paste(picture, (col * tile + 2, 18 + row * (tile + 18)))
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target)


def patch_tokens(
    folder: Path, composites: list[Composite], weights: Path, resolution: int, cache: Path | None
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Backbone patch tokens and displayed sizes of the composed images.

    Arguments:
      folder: where the composed images are.
      composites: the composed images.
      weights: DINOv2 ViT-S/14 weights.
      resolution: long side of the resized image.
      cache: a ``.pt`` file that keeps the tokens between runs with the same composition and
        resolution (recomputed when those differ).
    """
    key = {"names": [c.name for c in composites], "resolution": resolution}
    key["sha256"] = [hashlib.sha256((folder / c.name).read_bytes()).hexdigest() for c in composites]
    if cache is not None and cache.exists():
        stored = torch.load(cache)
        if stored["key"] == key:
            return stored["tokens"], stored["sizes"]
    backbone = build_backbone(DEFAULT_BACKBONE, weights=weights, device="cpu")
    mean, std = backbone.mean_std
    tokens, sizes = [], []
    for composite in composites:
        item = prepare_image(folder, composite.name, resolution, backbone.patch_size, mean, std)
        tokens.append(backbone.patch_tokens(torch.from_numpy(item.pixels)[None])[0])
        sizes.append((item.width, item.height))
    if cache is not None:
        torch.save({"key": key, "tokens": tokens, "sizes": sizes}, cache)
    return tokens, sizes


def write_coco(composites: list[Composite], out_dir: Path) -> Path:
    """Write the composites' instances as class-agnostic COCO ground truth
    (``out_dir/instances.json``, one category ``object``) for ``benchmarks.instances_coco``."""
    images, annotations = [], []
    for image_id, composite in enumerate(composites, start=1):
        with Image.open(out_dir / "images" / composite.name) as opened:
            width, height = opened.size
        images.append(
            {"id": image_id, "file_name": composite.name, "width": width, "height": height}
        )
        for mask in composite.instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    path = out_dir / "instances.json"
    coco = {"images": images, "annotations": annotations}
    path.write_text(json.dumps({**coco, "categories": [{"id": 1, "name": "object"}]}))
    return path


def _stem_range(ecssd: Path, span: str) -> list[str]:
    """The sorted ECSSD stems ``first-last`` (1-based, inclusive)."""
    first, last = (int(v) for v in span.split("-"))
    return sorted(p.stem for p in (ecssd / "images").glob("*.jpg"))[first - 1 : last]


def main() -> None:
    """Compose, label in every mode, print the figures as JSON (``--coco-out``: compose only,
    as images and COCO ground truth)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ecssd", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cache", type=Path, help="keep the patch tokens in this .pt file")
    parser.add_argument("--montage", type=Path)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument(
        "--coco-out",
        type=Path,
        help="only compose: write the images to COCO_OUT/images and their instances to "
        "COCO_OUT/instances.json (for benchmarks.instances_coco)",
    )
    parser.add_argument("--stems", help="draw from these ECSSD images only, e.g. 1-100")
    args = parser.parse_args()
    stems = _stem_range(args.ecssd, args.stems) if args.stems else None
    if args.coco_out:
        (args.coco_out / "images").mkdir(parents=True, exist_ok=True)
        found = compose(args.ecssd, args.coco_out / "images", args.images, args.seed, stems=stems)
        print(write_coco(found, args.coco_out))
        return
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        composites = compose(args.ecssd, folder, args.images, args.seed, stems=stems)
        tokens, sizes = patch_tokens(folder, composites, args.weights, args.resolution, args.cache)
        predictions = {mode: predict(mode_config(mode), tokens, sizes) for mode in args.modes}
        report = {mode: score(composites, found) for mode, found in predictions.items()}
        if args.sweep:
            for floor in (0.2, 0.3, 0.4, 0.5):
                for persistence in (0.05, 0.1, 0.15, 0.2):
                    config = EntitiesConfig(merge_floor=floor, persistence=persistence)
                    key = f"entities floor={floor} persistence={persistence}"
                    report[key] = score(composites, predict(config, tokens, sizes))
            for count in (2, 3, 5):
                config = InstancesConfig(max_instances=count)
                report[f"instances max={count}"] = score(composites, predict(config, tokens, sizes))
        if args.montage:
            montage(folder, composites, predictions, args.montage)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
