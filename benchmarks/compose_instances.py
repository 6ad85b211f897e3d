"""Measure `single`, `instances` and `entities` on composed multi-object images.

There is no multi-instance ground truth in ECSSD, so this script makes some: it pastes two or
three ECSSD objects (cut out with their ground-truth masks, scaled down) onto other ECSSD
images used as backgrounds, with a fixed seed, and keeps each object's visible mask as one
ground-truth instance. Every mode is then scored per ground-truth instance by its best IoU
with any predicted region (for entities: any entity or part): instance recall at IoU 0.5 and
mean best IoU. Predicted regions per image are reported too, since more regions make a match
easier.

    .venv/bin/python benchmarks/compose_instances.py ../shared/data/ecssd-dev \\
        --weights ../shared/weights/dinov2_vits14.safetensors --images 40 \\
        --montage docs/instances.png

``--sweep`` also scores a grid of entity thresholds (cheap: the features are computed once).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from selfment_label.backbone import build_backbone
from selfment_label.images import prepare_image
from selfment_label.modes import MODES, make_segmenter
from selfment_label.regions import full_size_masks
from selfment_label.run import RunConfig
from selfment_label.timing import StageTimer

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
    """One composed image and its ground-truth instance masks."""

    name: str
    instances: list[np.ndarray]


def compose(ecssd: Path, out_dir: Path, count: int, seed: int) -> list[Composite]:
    """Write ``count`` composed images into ``out_dir`` and return their instances.

    Arguments:
      ecssd: folder with ``images/`` and ``masks/``.
      out_dir: where the composed JPEGs go.
      count: images to make.
      seed: random seed (the same seed gives the same images).
    """
    rng = random.Random(seed)
    stems = sorted(p.stem for p in (ecssd / "images").glob("*.jpg"))
    composites = []
    for index in range(count):
        background_stem, *object_stems = rng.sample(stems, 1 + rng.choice((2, 3)))
        canvas = Image.open(ecssd / "images" / f"{background_stem}.jpg").convert("RGB")
        width, height = canvas.size
        visible: list[np.ndarray] = []
        for stem in object_stems:
            picture = Image.open(ecssd / "images" / f"{stem}.jpg").convert("RGB")
            mask = Image.open(ecssd / "masks" / f"{stem}.png").convert("L")
            box = mask.point(lambda v: 255 if v > 127 else 0).getbbox()
            if box is None:
                continue
            picture, mask = picture.crop(box), mask.crop(box)
            scale = rng.uniform(0.25, 0.4) * min(width, height) / max(picture.size)
            size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            picture, mask = picture.resize(size, Image.BICUBIC), mask.resize(size, Image.BILINEAR)
            x, y = rng.randint(0, width - size[0]), rng.randint(0, height - size[1])
            canvas.paste(picture, (x, y), mask.point(lambda v: 255 if v > 127 else 0))
            placed = np.zeros((height, width), dtype=bool)
            placed[y : y + size[1], x : x + size[0]] = np.asarray(mask) > 127
            visible = [earlier & ~placed for earlier in visible] + [placed]
        name = f"composite_{index:03d}.jpg"
        canvas.save(out_dir / name, quality=95)
        composites.append(Composite(name, [m for m in visible if m.sum() > 0.002 * m.size]))
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


def predict(config: RunConfig, tokens: list[torch.Tensor], sizes: list[tuple[int, int]]):
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
    """Instance recall at IoU 0.5, mean best IoU and regions per image."""
    ious = [
        iou
        for composite, kept in zip(composites, predictions, strict=True)
        for iou in best_ious(composite.instances, [k.mask for k in kept])
    ]
    return {
        "instances": len(ious),
        "recall@0.5": round(float(np.mean([i >= 0.5 for i in ious])), 3),
        "mean_best_iou": round(float(np.mean(ious)), 3),
        "regions_per_image": round(float(np.mean([len(k) for k in predictions])), 2),
    }


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


def main() -> None:
    """Compose, label in every mode, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ecssd", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=RunConfig().resolution)
    parser.add_argument("--montage", type=Path)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    backbone = build_backbone("dinov2-vits14", weights=args.weights, device="cpu")
    mean, std = backbone.mean_std
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        composites = compose(args.ecssd, folder, args.images, args.seed)
        tokens, sizes = [], []
        for composite in composites:
            item = prepare_image(
                folder, composite.name, args.resolution, backbone.patch_size, mean, std
            )
            tokens.append(backbone.patch_tokens(torch.from_numpy(item.pixels)[None])[0])
            sizes.append((item.width, item.height))
        base = RunConfig(resolution=args.resolution)
        predictions = {mode: predict(replace(base, mode=mode), tokens, sizes) for mode in MODES}
        report = {mode: score(composites, found) for mode, found in predictions.items()}
        if args.sweep:
            for floor in (0.2, 0.3, 0.4, 0.5):
                for persistence in (0.05, 0.1, 0.15, 0.2):
                    config = replace(
                        base, mode="entities", merge_floor=floor, persistence=persistence
                    )
                    key = f"entities floor={floor} persistence={persistence}"
                    report[key] = score(composites, predict(config, tokens, sizes))
            for count in (2, 3, 5):
                config = replace(base, mode="instances", max_instances=count)
                report[f"instances max={count}"] = score(composites, predict(config, tokens, sizes))
        if args.montage:
            montage(folder, composites, predictions, args.montage)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
