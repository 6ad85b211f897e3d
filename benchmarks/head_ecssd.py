"""Does the distilled head beat its own pseudo-labels? And what does it cost on top of the backbone?

ecssd-dev is split by stem: 0001-0100 (train half) and 0101-0200 (test half). NCut+IPO
labels the train half (``run``), a head is trained on those masks (``train``) and labels
the test half (``apply``); NCut+IPO also labels the test half. Both are evaluated on the test
half against the ground truth with ``selfment_label.evaluate`` (pysodmetrics), from the soft
score maps (maxF, MAE...) and at the 0.5 threshold (IoU, accuracy). Then, in this same
process, ``apply`` is timed against a bare backbone forward pass over the same images.

The halves are folders of symlinks under ``--work`` (outside the repository); run folders
there are resumed, so a second invocation only re-trains and re-applies.

    .venv/bin/python benchmarks/head_ecssd.py --weights ../shared/weights/dinov2_vits14.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from selfment_label.config import DEFAULT_RESOLUTION, RunConfig, TrainConfig
from selfment_label.data.batching import batches_by_grid, lookahead, prefetch, stack_pixels
from selfment_label.data.images import DecodedImage, find_images, prepare_image
from selfment_label.evaluate import evaluate_run
from selfment_label.features.backbone import Backbone
from selfment_label.head.apply import apply_head
from selfment_label.head.train import distil
from selfment_label.runfolder.label import label_folder

SHOWN = ("max_f", "iou", "accuracy", "mae", "s_measure", "max_e")


def split_halves(data: Path, work: Path) -> dict[str, Path]:
    """Symlink folders ``train/``, ``test/`` and ``test-gt/``, ``train-gt/`` under ``work``."""
    folders = {}
    for half, stems in (("train", range(1, 101)), ("test", range(101, 201))):
        for kind, sub, ext in (("", "images", ".jpg"), ("-gt", "masks", ".png")):
            folder = work / f"{half}{kind}"
            folder.mkdir(parents=True, exist_ok=True)
            for stem in stems:
                source = data / sub / f"{stem:04d}{ext}"
                link = folder / source.name
                if source.exists() and not link.exists():
                    link.symlink_to(source.resolve())
            folders[f"{half}{kind}"] = folder
    return folders


def bare_forward_seconds(
    images: Path, backbone: Backbone, resolution: int, batch_size: int
) -> float:
    """Wall seconds of decode + backbone forward over a folder, batched like the pipeline."""
    mean, std = backbone.mean_std
    names = find_images(images)

    def decode(name: str) -> DecodedImage:
        return prepare_image(images, name, resolution, backbone.patch_size, mean, std)

    start = time.perf_counter()
    depth = lookahead(batch_size)
    for batch, _ in batches_by_grid(prefetch(names, decode, 2, depth), batch_size, depth):
        if batch:
            pixels = stack_pixels(batch)
            backbone.patch_tokens(pixels)
    return time.perf_counter() - start


def evaluate(run: Path, gt: Path) -> dict[str, float]:
    """Soft-map metrics plus IoU/accuracy of the thresholded masks."""
    soft = evaluate_run(run, gt, use_score_maps=True).metrics
    hard = evaluate_run(run, gt, use_score_maps=False).metrics
    return {**{k: soft[k] for k in SHOWN}, "iou_masks": hard["iou"], "max_f_masks": hard["max_f"]}


def main() -> None:
    """Run the benchmark and print a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("/tmp/selfment-head-bench"))
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--target-threshold", type=float, default=TrainConfig.target_threshold)
    parser.add_argument("--rounds", type=int, default=TrainConfig.rounds)
    parser.add_argument("--layers", default=None, help="Blocks the head reads, e.g. 8,11.")
    parser.add_argument("--flip", action="store_true", help="Apply with test-time flip.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the report here.")
    args = parser.parse_args()
    folders = split_halves(args.data, args.work)
    config = RunConfig(weights=str(args.weights), resolution=args.resolution, save_scores=True)
    backbone = load_backbone(args.weights)
    runs = {}
    for half in ("train", "test"):
        runs[half] = args.work / f"run-{half}"
        label_folder(folders[half], runs[half], config, backbone=backbone)
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        target_threshold=args.target_threshold,
        rounds=args.rounds,
        layers=tuple(int(b) for b in args.layers.split(",")) if args.layers else None,
    )
    start = time.perf_counter()
    result = distil(runs["train"], args.work / "head.pt", train, backbone=backbone)
    train_seconds = time.perf_counter() - start
    applied = args.work / "apply-test"
    summary = apply_head(
        result.checkpoint,
        folders["test"],
        applied,
        config,
        overwrite=True,
        backbone=backbone,
        flip=args.flip,
    )
    bare = bare_forward_seconds(folders["test"], backbone, args.resolution, config.batch_size)
    report = {
        "resolution": args.resolution,
        "training": {**vars(train), "seconds_incl_features": round(train_seconds, 2)},
        "flip": args.flip,
        "final_losses": {k: round(v, 4) for k, v in result.losses.items()},
        "pseudo_labels_train_half": evaluate(runs["train"], folders["train-gt"]),
        "ncut_ipo_test_half": evaluate(runs["test"], folders["test-gt"]),
        "head_test_half": evaluate(applied, folders["test-gt"]),
        "timing_test_half": {
            "images": summary.labelled,
            "apply_wall_s": round(summary.seconds, 2),
            "apply_stages_s": summary.stages,
            "bare_forward_wall_s": round(bare, 2),
            "apply_over_bare": round(summary.seconds / bare, 3),
        },
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
