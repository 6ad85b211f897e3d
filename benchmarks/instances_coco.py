"""Class-agnostic COCO mask AP of ``run --mode instances`` and of the instance head learnt from it.

On a folder with COCO instance masks (every category merged into one: the class-agnostic
protocol of CutLER and SOHES), with ``pycocotools.cocoeval.COCOeval`` (iouType ``segm``, one
category, maxDets 100; AR@1000 as SOHES reports it):

1. ``run --mode instances`` (MaskCut + IPO), its own scores and every score set to 1.0
   (how CutLER scored MaskCut);
2. the instance head trained on that run's masks and applied to the same images (the
   labelling use case: "make my folder's labels better"), after 0, 1, 2 self-correction
   rounds;

and the time of training per round and of ``apply`` against the bare backbone (one forward
pass over the same images, measured interleaved in this process). Run from the repository
root::

    python -m benchmarks.instances_coco --images ../shared/data/coco-dev/images \\
        --gt ../shared/data/coco-dev/instances.json \\
        --weights ../shared/weights/dinov2_vits14.safetensors --work /tmp/instances-coco

The composed benchmark (train on composites of ECSSD 0001-0100, apply to composites of
0101-0200; ``benchmarks/compose_instances.py --coco-out`` writes them with their instances)::

    python benchmarks/compose_instances.py ../shared/data/ecssd-dev --weights x --images 40 \
        --seed 0 --stems 1-100 --coco-out /tmp/composed-train
    python benchmarks/compose_instances.py ../shared/data/ecssd-dev --weights x --images 40 \
        --seed 1 --stems 101-200 --coco-out /tmp/composed-test
    python -m benchmarks.instances_coco --images /tmp/composed-train/images \
        --gt /tmp/composed-train/instances.json --apply-images /tmp/composed-test/images \
        --apply-gt /tmp/composed-test/instances.json \
        --weights ../shared/weights/dinov2_vits14.safetensors --work /tmp/composed-bench

Work folders are reused (runs resume), so a second call re-evaluates at little cost.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from selfment_label.config import (
    DEFAULT_PRECISION,
    PRECISION_NAMES,
    EntitiesConfig,
    InstancesConfig,
    InstanceTrainConfig,
    RunConfig,
)
from selfment_label.data.batching import batches_by_grid, stack_pixels
from selfment_label.data.images import prepare_image
from selfment_label.data.storage import open_source
from selfment_label.features.backbone import Backbone, build_backbone
from selfment_label.head.apply import apply_head
from selfment_label.head.checkpoint import load_checkpoint, save_checkpoint
from selfment_label.head.instance_train import distil_instances
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import read_run

MAX_DETS = [1, 10, 100, 1000]


def class_agnostic_eval(
    gt_path: Path, run_dir: Path, score_one: bool = False, top_level: bool = False
) -> dict[str, float]:
    """AP, AP50, AR@100 and AR@1000 (in %) of a run folder against COCO ground truth.

    Arguments:
      gt_path: COCO ground truth (every category is merged into one).
      run_dir: a run folder; its images are matched to the ground truth by file name.
      score_one: set every predicted score to 1.0.
      top_level: leave out parts (annotations with a ``parent_id``).
    """
    run = read_run(run_dir)
    found = {
        image["file_name"]: [
            (ann["segmentation"], 1.0 if score_one else float(ann.get("score", 1.0)))
            for ann in anns
            if not (top_level and ann.get("parent_id") is not None)
        ]
        for image, anns in run.images()
    }
    return evaluate_detections(gt_path, found)


def evaluate_detections(
    gt_path: Path, found: dict[str, list[tuple[dict[str, Any], float]]]
) -> dict[str, float]:
    """AP, AP50, AR@100 and AR@1000 (in %) of ``file name -> [(RLE, score)]`` against COCO
    ground truth, every category merged into one; ``masks/img`` over the images given."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    for ann in gt.dataset["annotations"]:
        ann["category_id"] = 1
    gt.dataset["categories"] = [{"id": 1, "name": "object"}]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    ids = {image["file_name"]: image["id"] for image in gt.dataset["images"]}
    detections = [
        {"image_id": ids[name], "category_id": 1, "segmentation": rle, "score": score}
        for name, masks in found.items()
        for rle, score in masks
    ]
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AR@100": 0.0, "AR@1000": 0.0, "masks/img": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        result = gt.loadRes(detections)
        evaluator = COCOeval(gt, result, iouType="segm")
        evaluator.params.maxDets = MAX_DETS
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    recall = evaluator.eval["recall"][:, :, 0, 3]  # [iou, category, area all, maxDets 1000]
    return {
        "AP": 100 * float(evaluator.stats[0]),
        "AP50": 100 * float(evaluator.stats[1]),
        "AR@100": 100 * float(evaluator.stats[8]),
        "AR@1000": 100 * float(np.mean(recall[recall > -1])),
        "masks/img": len(detections) / max(1, len(found)),
    }


def backbone_seconds(backbone: Backbone, images: Path, resolution: int) -> float:
    """Seconds of decoding + one backbone pass over every image (the bare backbone)."""
    mean, std = backbone.mean_std
    names = list(open_source(images).list_images())
    start = time.perf_counter()
    decoded = (
        (name, prepare_image(images, name, resolution, backbone.patch_size, mean, std))
        for name in names
    )
    for batch, _ in batches_by_grid(decoded, 4, window=8):
        if batch:
            backbone.patch_tokens(stack_pixels(batch, backbone.device))
    return time.perf_counter() - start


def train_per_round(
    run_dir: Path, work: Path, config: InstanceTrainConfig, weights: Path, precision: str
) -> list[tuple[Path, dict[str, Any]]]:
    """Train with ``config.rounds`` rounds; a checkpoint per round (the model as that round
    left it) with its round record. Checkpoints already in ``work`` (a rerun) are reused."""
    paths = [work / f"head-r{index}.pt" for index in range(config.rounds + 1)]
    if all(path.is_file() for path in paths):
        return [(path, load_checkpoint(path).meta["rounds"][-1]) for path in paths]
    snapshots: list[dict[str, torch.Tensor]] = []
    final = paths[-1]
    distil_instances(
        run_dir,
        final,
        config,
        weights=weights,
        precision=precision,
        round_done=lambda index, head: snapshots.append(copy.deepcopy(head.state_dict())),
    )
    loaded = load_checkpoint(final)
    out = []
    for index, state in enumerate(snapshots):
        path = work / f"head-r{index}.pt"
        meta = {**loaded.meta, "rounds": loaded.meta["rounds"][: index + 1]}
        loaded.head.load_state_dict(state)
        save_checkpoint(path, loaded.head, meta)
        out.append((path, meta["rounds"][index]))
    return out


def add_coco_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the required ``--images``, ``--gt`` (their COCO ground truth), ``--weights`` and
    ``--work`` (reused folders: runs resume)."""
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--gt", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)


def check_coco_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a usage error when ``--images``, ``--gt`` or ``--weights`` is missing."""
    for name, there in (
        ("--images", args.images.is_dir()),
        ("--gt", args.gt.is_file()),
        ("--weights", args.weights.is_file()),
    ):
        if not there:
            parser.error(f"{name} {getattr(args, name[2:])} does not exist")


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_coco_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=InstanceTrainConfig.epochs)
    parser.add_argument("--max-instances", type=int, default=InstancesConfig.max_instances)
    parser.add_argument(
        "--token-flip",
        action=argparse.BooleanOptionalAction,
        default=InstanceTrainConfig.token_flip,
        help="the head also learns every image mirrored on the patch grid",
    )
    parser.add_argument(
        "--source",
        choices=("instances", "entities"),
        default="instances",
        help="the run mode the head learns from (entities: its entities; the run's own row "
        "counts entities and parts as detections)",
    )
    parser.add_argument(
        "--apply-images",
        type=Path,
        help="apply the head to these images instead (not trained on; with --apply-gt): the "
        "run rows are then the mode's own run on them",
    )
    parser.add_argument("--apply-gt", type=Path, help="COCO ground truth of --apply-images")
    parser.add_argument(
        "--precision",
        choices=PRECISION_NAMES,
        default=DEFAULT_PRECISION,
        help="backbone precision of the runs and of the head's features",
    )
    args = parser.parse_args()
    check_coco_arguments(parser, args)
    if bool(args.apply_images) != bool(args.apply_gt):
        parser.error("--apply-images and --apply-gt go together")
    args.work.mkdir(parents=True, exist_ok=True)
    config = RunConfig(weights=str(args.weights), device="cpu", precision=args.precision)
    backbone = build_backbone(config.backbone, args.weights, "cpu")
    rows: list[tuple[str, dict[str, float]]] = []

    mode = (
        InstancesConfig(max_instances=args.max_instances)
        if args.source == "instances"
        else EntitiesConfig()
    )
    run_dir = args.work / args.source
    label_folder(args.images, run_dir, replace(config, segment=mode), backbone=backbone)
    images, gt, eval_dir = args.images, args.gt, run_dir
    if args.apply_images:
        images, gt, eval_dir = args.apply_images, args.apply_gt, args.work / f"{args.source}-apply"
        label_folder(images, eval_dir, replace(config, segment=mode), backbone=backbone)
    rows.append((f"run --mode {args.source}", class_agnostic_eval(gt, eval_dir)))
    rows.append(("  scores set to 1.0", class_agnostic_eval(gt, eval_dir, score_one=True)))
    if args.source == "entities":
        top = class_agnostic_eval(gt, eval_dir, top_level=True)
        rows.append(("  entities only", top))

    train = InstanceTrainConfig(epochs=args.epochs, rounds=args.rounds, token_flip=args.token_flip)
    timings = []
    for path, record in train_per_round(run_dir, args.work, train, args.weights, args.precision):
        out = args.work / f"apply-r{record['round']}"
        bare = backbone_seconds(backbone, images, config.resolution)
        start = time.perf_counter()
        apply_head(path, images, out, config, backbone=backbone, overwrite=True)
        applied = time.perf_counter() - start
        timings.append((record, bare, applied))
        name = f"head on {args.source}, {record['round']} rounds"
        rows.append((name, class_agnostic_eval(gt, out)))
        if args.source == "entities":
            rows.append(("  its entities only", class_agnostic_eval(gt, out, top_level=True)))

    print(f"\nclass-agnostic COCO mask eval on {images} ({gt.name})")
    print(f"{'':32}{'AP':>7}{'AP50':>7}{'AR@100':>8}{'AR@1000':>9}{'masks/img':>11}")
    for name, stats in rows:
        print(
            f"{name:32}{stats['AP']:7.2f}{stats['AP50']:7.2f}{stats['AR@100']:8.2f}"
            f"{stats['AR@1000']:9.2f}{stats['masks/img']:11.2f}"
        )
    print("\nround  pseudo-masks  replaced  dropped  added  train s  apply/backbone s (ratio)")
    for record, bare, applied in timings:
        print(
            f"{record['round']:5}  {record['pseudo_masks']:12}  {record['replaced']:8}  "
            f"{record['dropped']:7}  {record['added']:5}  {record['seconds']:7.1f}  "
            f"{applied:.1f}/{bare:.1f} ({bare / applied:.2f})"
        )
    print(json.dumps({name: stats for name, stats in rows}, indent=1))


if __name__ == "__main__":
    main()
