"""Backbone precision: run, apply, train feature extraction and start-up, each against the bare
fp32 backbone, interleaved in one process (a busy machine slows every side alike).

Each round times, for every precision: the bare backbone over pre-decoded images, a
``label_folder`` run (what ``selfment-label run`` does), an ``apply_head`` run with a head
trained once on fp32 features, and feature extraction into a fresh cache (what ``train``
does when a run's features are not cached). The best round of each is kept. Start-up is a
10-image ``label_folder`` run that loads the model itself (its ``load model`` stage and its
wall time). Masks of every precision are compared with fp32's (mean and lowest IoU) and
evaluated against the ground truth (the head's too: trained on fp32 features, applied on
features of each precision).

    .venv/bin/python -m benchmarks.bench_precision --images 16 --precisions fp32 auto
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from benchmarks.speed import bare_backbone_seconds, decode_all, link_images, machine_facts
from selfment_label.config import DEFAULT_RESOLUTION, RunConfig, TrainConfig
from selfment_label.data.images import find_images
from selfment_label.device import resolve_precision
from selfment_label.evaluate import evaluate_run
from selfment_label.features.backbone import Backbone
from selfment_label.features.cache import CacheSettings, FeatureCache, ensure_features
from selfment_label.head.apply import apply_head
from selfment_label.head.train import distil
from selfment_label.runfolder.coco import decode_rle
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import ANNOTATIONS_NAME

STARTUP_IMAGES = 10


def union_masks(run_dir: Path) -> dict[str, np.ndarray]:
    """File name -> union of the run's masks (boolean, full size)."""
    coco = json.loads((run_dir / ANNOTATIONS_NAME).read_text())
    masks = {
        image["id"]: (image["file_name"], np.zeros((image["height"], image["width"]), bool))
        for image in coco["images"]
    }
    for annotation in coco["annotations"]:
        masks[annotation["image_id"]][1][:] |= decode_rle(annotation["segmentation"])
    return dict(masks.values())


def mask_ious(reference: Path, other: Path) -> dict[str, float]:
    """File name -> IoU of ``other``'s union mask against ``reference``'s (1 when both empty)."""
    ref, got = union_masks(reference), union_masks(other)
    ious = {}
    for name, a in ref.items():
        b = got[name]
        union = (a | b).sum()
        ious[name] = float((a & b).sum() / union) if union else 1.0
    return ious


def mask_agreement(reference: Path, other: Path) -> dict[str, float]:
    """Mean and lowest IoU of ``other``'s union masks against ``reference``'s."""
    ious = list(mask_ious(reference, other).values())
    return {"mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious))}


def quality(run_dir: Path, gt: Path) -> dict[str, float]:
    """maxF, IoU and MAE of a run's masks against the ground truth."""
    metrics = evaluate_run(run_dir, gt).metrics
    return {k: round(metrics[k], 4) for k in ("max_f", "iou", "mae")}


def feature_seconds(
    backbone: Backbone, images: Path, names: list[str], precision: str, resolution: int, cache: Path
) -> float:
    """Seconds to fill a fresh feature cache for ``names`` (``train``'s feature extraction)."""
    used = resolve_precision(precision, backbone.device).name
    settings = CacheSettings.for_backbone(backbone, resolution, used)
    start = time.perf_counter()
    ensure_features(FeatureCache(cache, settings), images, names, lambda: backbone)
    return time.perf_counter() - start


def startup(subset: Path, out: Path, config: RunConfig) -> dict[str, float]:
    """``load model`` seconds and wall seconds of a run that loads its own model."""
    summary = label_folder(subset, out, config, overwrite=True)
    return {"load_model_s": summary.stages["load model"], "wall_s": summary.wall_seconds}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every figure of the module docstring, as one JSON-ready dict."""
    backbone = load_backbone(args.weights)
    images = args.data / "images"
    names = find_images(images)[: args.images]
    subset, small, gt = work / "images", work / "startup", work / "gt"
    for folder in (subset, small, gt):
        folder.mkdir()
    link_images(images, names, subset)
    link_images(args.data / "masks", [f"{Path(n).stem}.png" for n in names], gt)
    link_images(images, names[:STARTUP_IMAGES], small)
    decoded = decode_all(images, names, args.resolution, backbone)

    def config(precision: str, **extra: Any) -> RunConfig:
        return RunConfig(
            resolution=args.resolution, precision=precision, batch_size=args.batch_size, **extra
        )

    label_folder(subset, work / "run-head", config("fp32"), backbone=backbone)
    head = distil(
        work / "run-head", work / "head.pt", TrainConfig(), precision="fp32", backbone=backbone
    ).checkpoint
    sides = dict.fromkeys(("fp32", *args.precisions))
    best: dict[str, dict[str, float]] = {p: {} for p in sides}

    def keep(precision: str, key: str, seconds: float) -> None:
        best[precision][key] = min(best[precision].get(key, float("inf")), seconds)

    for round_index in range(args.rounds):
        for precision in sides:
            keep(
                precision,
                "bare",
                bare_backbone_seconds(backbone, decoded, args.batch_size, precision),
            )
            start = time.perf_counter()
            label_folder(
                subset,
                work / f"run-{precision}",
                config(precision),
                overwrite=True,
                backbone=backbone,
            )
            keep(precision, "run", time.perf_counter() - start)
            start = time.perf_counter()
            apply_head(
                head,
                subset,
                work / f"apply-{precision}",
                config(precision),
                overwrite=True,
                backbone=backbone,
            )
            keep(precision, "apply", time.perf_counter() - start)
            cache = work / f"features-{precision}-{round_index}"
            keep(
                precision,
                "features",
                feature_seconds(backbone, subset, names, precision, args.resolution, cache),
            )
            weights = config(precision, weights=str(args.weights), allow_download=False)
            for key, value in startup(small, work / f"startup-{precision}", weights).items():
                keep(precision, key, value)
    bare_fp32 = best["fp32"]["bare"]
    report: dict[str, Any] = {}
    for precision in args.precisions:
        figures = best[precision]
        report[precision] = {
            "used": resolve_precision(precision, backbone.device).as_dict(),
            "images_per_s": {
                k: len(names) / figures[k] for k in ("bare", "run", "apply", "features")
            },
            "ratio_to_bare_fp32": {
                k: bare_fp32 / figures[k] for k in ("bare", "run", "apply", "features")
            },
            "startup_10_images": {k: figures[k] for k in ("load_model_s", "wall_s")},
            "run_masks_vs_fp32": mask_agreement(work / "run-fp32", work / f"run-{precision}"),
            "apply_masks_vs_fp32": mask_agreement(work / "apply-fp32", work / f"apply-{precision}"),
            "run_vs_gt": quality(work / f"run-{precision}", gt),
            "apply_vs_gt": quality(work / f"apply-{precision}", gt),
        }
    return report


def main() -> None:
    """Parse options, measure, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="selfment-precision-") as scratch:
        report = measure(args, Path(scratch))
    facts = machine_facts(torch.device("cpu"))
    print(
        json.dumps(
            {"machine": facts, "images": args.images, "resolution": args.resolution, **report},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
