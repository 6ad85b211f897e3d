"""Does a review make the next head better? One loop with a simulated reviewer on ecssd-dev.

NCut+IPO labels 0001-0100 (``run``); the run is reviewed in FiftyOne (``build_dataset``) by
a simulated reviewer that tags ``rejected`` every image whose mask has IoU < ``--reject-iou``
against the ground truth; one head learns from the reviewed dataset (``train --reviewed``:
``reviewed_targets`` + ``distil``), another from every mask of the run (``train``). Both
label 0101-0200 (``apply``) and are evaluated there against the ground truth with
``selfment_label.evaluate`` (maxF/MAE/S/E from the soft maps, IoU/accuracy at 0.5).

Run folders and the feature cache under ``--work`` are reused by a second invocation; the
FiftyOne database lives there too, unless ``FIFTYONE_DATABASE_DIR`` is set.

    .venv/bin/python benchmarks/review_loop.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from benchmarks.head_ecssd import evaluate, split_halves
from selfment_label.config import DEFAULT_RESOLUTION, RunConfig, TrainConfig
from selfment_label.evaluate import evaluate_run
from selfment_label.head.apply import apply_head
from selfment_label.head.train import distil
from selfment_label.runfolder.label import label_folder


def main() -> None:
    """Run the loop and print a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("/tmp/selfment-review-bench"))
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("--reject-iou", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="Also write the report here.")
    args = parser.parse_args()
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(args.work / "fiftyone-db"))
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    import fiftyone as fo

    from selfment_label.review.dataset import build_dataset
    from selfment_label.review.targets import reviewed_targets

    folders = split_halves(args.data, args.work)
    config = RunConfig(weights=str(args.weights), resolution=args.resolution, save_scores=True)
    backbone = load_backbone(args.weights)
    run = args.work / "run-train"
    label_folder(folders["train"], run, config, backbone=backbone)

    rows = evaluate_run(run, folders["train-gt"], use_score_maps=False).rows
    iou = {row.prediction: row.metrics["iou"] for row in rows if row.prediction}
    name = f"selfment-review-bench-{uuid.uuid4().hex[:8]}"
    dataset = build_dataset(run, name)
    rejected = 0
    for sample in dataset.iter_samples(autosave=True, progress=False):
        if iou.get(sample.file_name, 0.0) < args.reject_iou:
            sample.tags.append("rejected")
            rejected += 1
    try:
        source = reviewed_targets(run, name)
    finally:
        fo.delete_dataset(name)

    train = TrainConfig()
    heads = {
        "all_masks": distil(run, args.work / "head-all.pt", train, backbone=backbone),
        "reviewed": distil(
            run,
            args.work / "head-reviewed.pt",
            train,
            backbone=backbone,
            targets=source.targets,
            data={"review": source.provenance()},
        ),
    }
    report: dict[str, object] = {
        "resolution": args.resolution,
        "reject_iou": args.reject_iou,
        "train_half_images": len(iou),
        "rejected": rejected,
        "pseudo_labels_train_half": evaluate(run, folders["train-gt"]),
    }
    for label, result in heads.items():
        applied = args.work / f"apply-{label}"
        apply_head(
            result.checkpoint, folders["test"], applied, config, overwrite=True, backbone=backbone
        )
        report[f"head_{label}"] = {
            "training_images": result.images,
            "test_half": evaluate(applied, folders["test-gt"]),
        }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
